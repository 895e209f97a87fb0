#!/usr/bin/env python3
"""CPU speed of zoo's models next to Detectron2's (and torchvision's), as a markdown table (seconds per image).

Full `predict` on one image (read, resize, network, postprocess, mask pasting), synthetic weights
(tests/synth_weights.py, seed 20261124), on T threads; zoo three times: with the CPU default (exact: Detectron2's
conv and batch_norm ops), with fast_convs=True (FrozenBN folded, channels_last) and with precision="bf16" (autocast,
fast convs; quick only where the CPU has bf16 matrix units, e.g. AMX, and not parity-exact; "bf16 matched" is the
share of the exact run's detections that bf16 also finds, same class at IoU >= 0.9, the GPU target's criterion,
then the same for the exact run's 50 best). Every system runs once to warm up (--warmup),
then the systems take turns, one run each per round, for N rounds, and each gets the median of its N runs: on a
shared, noisy machine the turns let them all see the same slow and fast spells.

Detectron2: with --detectron2 SRC, Detectron2 itself (its Python source, loaded as scripts/detectron2_oracle.py
does) runs in the same rounds on the same weights and image, its input made as for the fixtures (PIL,
ResizeShortestEdge). Without it the column shows the project's recorded times (shared/reference/anchors.md,
kept outside this repository; "CPU: these 2-core machines", 2026-11-26), which other runs may not reproduce.
With --torchvision, torchvision's counterparts of the R50-FPN models (as scripts/bench_e2e.py builds them) join
the rounds. Both need a torch/torchvision pair that loads together, which the build machines' CPU wheel is not:
e.g. a separate venv with PyPI's `torch==2.13.0 torchvision==0.28.0` (see scripts/detectron2_oracle.py).

    python scripts/bench.py [--models NAME ...] [--repeats 3] [--warmup 1] [--threads 2] [--image PATH] [--torchvision]
                            [--detectron2 SRC [--configs DIR]]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

# Detectron2, 2 threads, grace_hopper.png, median of 3 after a warm-up (the project's reference timings, 2026-11-26)
DETECTRON2_CPU_S = {
    "faster_rcnn_R_50_FPN_3x": 1.69,
    "mask_rcnn_R_50_FPN_3x": 2.29,
    "faster_rcnn_R_50_C4_3x": 9.14,
    "mask_rcnn_R_50_C4_3x": 9.45,
    "faster_rcnn_R_50_DC5_3x": 4.17,
    "mask_rcnn_R_50_DC5_3x": 5.43,
    "faster_rcnn_X_101_32x8d_FPN_3x": 6.44,
}
DEFAULT_MODELS = list(DETECTRON2_CPU_S)

Runner = Callable[[], Any]


def medians_in_turns(runners: dict[str, Runner], repeats: int,
                     warmup: int = 1) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each runner (`warmup` untimed rounds, then `repeats` timed rounds of one call each),
    and what each runner's last call returned."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    outputs: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, fn in runners.items():
            t = time.perf_counter()
            outputs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outputs


def zoo_runner(name: str, image: Path, fast_convs: bool, precision: str = "fp32") -> Runner:
    from user_support import synthetic_baseline

    model = synthetic_baseline(name)
    model.fast_convs, model.precision = fast_convs, precision
    return lambda: model.predict(image)


def torchvision_runner(tv_name: str, image: Path) -> Runner:
    """torchvision's model on `image`, read with PIL; its own resize and postprocess."""
    import numpy as np
    import torch
    from bench_e2e import torchvision_model
    from PIL import Image

    model = torchvision_model(tv_name, torch.device("cpu"))

    def run():
        x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).transpose(2, 0, 1).copy()).float() / 255
        with torch.inference_mode():
            return model([x])

    return run


def detectron2_runner(name: str, image: Path, configs: Path) -> Runner:
    """Detectron2's model([input]) on `image` (detectron2_oracle.import_detectron2 must have run)."""
    import torch
    from detectron2_oracle import detectron2_inputs, detectron2_model
    from user_support import baseline_state_dict

    model, cfg = detectron2_model(name, configs / f"{name}.yaml", baseline_state_dict(name))

    def run():
        with torch.no_grad():
            return model(detectron2_inputs(cfg, [image]))

    return run


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each system runs once per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, default=ROOT / "tests" / "fixtures" / "images" / "grace_hopper.png")
    ap.add_argument("--detectron2", type=Path, metavar="SRC",
                    help="time Detectron2 from this source tree in the same rounds (else its recorded times)")
    ap.add_argument("--configs", type=Path, default=ROOT.parent / "shared" / "reference" / "detectron2_configs",
                    help="the baselines' merged Detectron2 configs (<name>.yaml), for --detectron2")
    ap.add_argument("--torchvision", action="store_true",
                    help="also time torchvision's R50-FPN counterparts (needs a torchvision that loads)")
    a = ap.parse_args()
    if a.repeats < 1 or a.warmup < 0:
        raise SystemExit("--repeats must be at least 1 and --warmup at least 0")

    import torch
    from bench_e2e import matched_share

    torch.set_num_threads(a.threads)
    if a.detectron2:
        from detectron2_oracle import import_detectron2

        d2_note = f"Detectron2 from {a.detectron2} in the same rounds, calling {import_detectron2(a.detectron2)}"
    else:
        d2_note = "Detectron2: the recorded times of 2026-11-26"
    tv_models: dict[str, str] = {}
    if a.torchvision:
        from bench_e2e import TV_MODELS

        tv_models = {k: v[0] for k, v in TV_MODELS.items()}
    print(f"torch {torch.__version__}, {a.threads} threads, {a.image.name}, median of {a.repeats} rounds after "
          f"{a.warmup} warm-up; {d2_note}\n")
    cols = ["model", "zoo exact s/image", "zoo fast_convs s/image", "zoo bf16 s/image", "Detectron2 s/image",
            "exact / D2", "fast / D2", "bf16 / D2", "bf16 matched (all / top 50)"]
    if a.torchvision:
        cols += ["torchvision s/image", "exact / torchvision"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name in a.models:
        runners = {"exact": zoo_runner(name, a.image, False), "fast": zoo_runner(name, a.image, True),
                   "bf16": zoo_runner(name, a.image, True, "bf16")}
        if a.detectron2:
            runners["d2"] = detectron2_runner(name, a.image, a.configs)
        if name in tv_models:
            runners["tv"] = torchvision_runner(tv_models[name], a.image)
        s, outputs = medians_in_turns(runners, a.repeats, a.warmup)
        ref, low = outputs["exact"], outputs["bf16"]
        matched = f"{matched_share(ref, low)} / {matched_share(ref, low, 50)}"
        del runners, outputs
        d2 = s.get("d2", None if a.detectron2 else DETECTRON2_CPU_S.get(name))
        row = [name, f"{s['exact']:.2f}", f"{s['fast']:.2f}", f"{s['bf16']:.2f}", f"{d2:.2f}" if d2 else "",
               ratio(s["exact"], d2), ratio(s["fast"], d2), ratio(s["bf16"], d2), matched]
        if a.torchvision:
            tv = s.get("tv")
            row += [f"{tv:.2f} ({tv_models[name]})" if tv else "", ratio(s["exact"], tv)]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
