#!/usr/bin/env python3
"""CPU speed of zoo's models next to Detectron2's, as a markdown table (seconds per image).

Full `predict` on one image (read, resize, network, postprocess, mask pasting), synthetic weights
(tests/synth_weights.py, seed 20261124), median of N runs after one warm-up, on T threads; zoo twice: with the
CPU default (exact: Detectron2's conv and batch_norm ops) and with fast_convs=True (FrozenBN folded, channels_last).
Detectron2's figures come from the project's reference timings (shared/reference/anchors.md, kept outside
this repository; section "CPU: these 2-core machines", measured 2026-11-26 with the same image, weights and
protocol).

    python scripts/bench.py [--models NAME ...] [--repeats 3] [--threads 2] [--image PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def _synth():
    spec = importlib.util.spec_from_file_location("synth_weights", ROOT / "tests" / "synth_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_model(name: str, image: Path, repeats: int, fast_convs: bool) -> list[float]:
    """Seconds per predict call, after one warm-up call."""
    import zoo
    from zoo.modeling import build_model, load_weights

    arch = zoo.get_manifest(name).architecture
    model = build_model(arch)
    keys = json.loads((ROOT / "tests" / "fixtures" / "state_dicts" / f"{name}.json").read_text())
    pixel_std = sum(arch.input.pixel_std) / 3
    load_weights(model, _synth().synth_state_dict(keys, 20261124, pixel_std))
    model.fast_convs = fast_convs
    model.predict(image)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(image)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, default=ROOT / "tests" / "fixtures" / "images" / "grace_hopper.png")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, {a.image.name}, median of {a.repeats} after 1 warm-up\n")
    print("| model | zoo exact s/image | zoo fast_convs s/image | Detectron2 s/image | exact / D2 | fast / D2 |")
    print("|---|---|---|---|---|---|")
    for name in a.models:
        exact, fast = (statistics.median(bench_model(name, a.image, a.repeats, f)) for f in (False, True))
        ref = DETECTRON2_CPU_S.get(name)
        ratios = f"{exact / ref:.2f} | {fast / ref:.2f}" if ref else " | "
        print(f"| {name} | {exact:.2f} | {fast:.2f} | {ref if ref else ''} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
