#!/usr/bin/env python3
"""Time and peak memory of the steps that grow with the photo, not the network: a Mask R-CNN's masks are pasted at
the original size (100 masks of a 4000x3000 photo take 1.1 GiB), then drawn; plus loading a model from a local
checkpoint. Prints a markdown table.

Each row runs in a fresh Python process (synthetic weights, tests/synth_weights.py), so its peak resident memory
(VmHWM) is its own. Just before the timed step (model built and loaded, warmed up on a small image) the peak is
restarted (Linux's /proc/self/clear_refs), so "peak" is the step's own and "above start" what the step added to
the resident memory it started with. The network sees the photo at --min-size (short side), so the rows measure
mask pasting, drawing and copying rather than convolutions.

    python scripts/bench_large_images.py [--size 4000x3000] [--min-size 320] [--batch 4] [--repeats 3] [--threads 2]
                                         [--load-models NAME ...]
"""
from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MODEL = "mask_rcnn_R_50_FPN_3x"
LOAD_MODELS = ["mask_rcnn_R_50_FPN_3x", "faster_rcnn_X_101_32x8d_FPN_3x", "faster_rcnn_R_50_DC5_1x"]

# Runs in the child: {model, photo, min_size, batch, repeats, threads} in argv[1] as JSON, one step in argv[2].
CHILD = r'''
import json, resource, statistics, sys, time
a = json.loads(sys.argv[1]); step = sys.argv[2]
sys.path[:0] = [a["root"], a["root"] + "/tests"]
import numpy as np, torch
from PIL import Image
torch.set_num_threads(a["threads"])
import zoo

def status_mib(field):  # Linux: VmHWM (peak of this process image) or VmRSS (now), else ru_maxrss
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def peak_mib():  # peak so far; not ru_maxrss, which counts the parent's memory at the fork on Linux
    return status_mib("VmHWM")

def current_mib():  # resident now; also restarts the peak from here where Linux lets us (clear_refs 5)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status_mib("VmRSS")

def timed(fn):
    ts = []
    for _ in range(a["repeats"]):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

if step == "load":
    start = current_mib()
    s = timed(lambda: zoo.get(a["model"], weights=a["checkpoint"], quiet=True))
else:
    from user_support import small_synthetic_model
    from zoo.viz import draw
    model = small_synthetic_model(a["model"], a["min_size"], max(a["min_size"] * 5 // 3, a["min_size"]))
    photo = np.asarray(Image.open(a["photo"]).convert("RGB"))
    model.predict(photo[:64, :64].copy())  # warm-up on a small image
    if step == "draw":
        det = model.predict(photo)
        start = current_mib()
        s = timed(lambda: draw(photo, det, score_thresh=0.05))
    else:
        start = current_mib()
        if step == "predict":
            s = timed(lambda: model.predict(photo))
        else:
            def stream():
                for d in model.predict_iter([photo] * a["batch"], batch_size=a["batch"]):
                    del d
            s = timed(stream)
print(json.dumps({"s": s, "start": start, "peak": peak_mib()}))
'''


def run_step(step: str, args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args), step], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4000x3000", help="photo size WxH (grace_hopper resized)")
    p.add_argument("--min-size", type=int, default=320, help="short side the network sees")
    p.add_argument("--batch", type=int, default=4, help="photos in the predict_iter row, one batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load-models", nargs="*", default=LOAD_MODELS, help="models for the zoo.get rows")
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))

    from PIL import Image

    from user_support import IMAGES, baseline_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "photo.jpg"
        Image.open(IMAGES / "grace_hopper.png").convert("RGB").resize((w, h)).save(photo, quality=90)
        common = {"root": str(ROOT), "model": MODEL, "photo": str(photo), "min_size": a.min_size, "batch": a.batch,
                  "repeats": a.repeats, "threads": a.threads}
        rows = [(f"predict one {w}x{h} photo", run_step("predict", common)),
                (f"predict_iter {a.batch} photos at batch {a.batch}", run_step("stream", common)),
                ("viz.draw of one photo's detections (score >= 0.05)", run_step("draw", common))]
        for name in a.load_models:
            ckpt = Path(tmp) / f"{name}.pkl"
            with open(ckpt, "wb") as f:
                pickle.dump({"model": baseline_state_dict(name), "__author__": "synthetic"}, f, protocol=4)
            rows.append((f"zoo.get {name} from a local .pkl", run_step("load", dict(common, model=name,
                                                                                     checkpoint=str(ckpt)))))
            ckpt.unlink()

    print(f"{MODEL} unless named, synthetic weights, network input short side {a.min_size}, {a.threads} threads, "
          f"median of {a.repeats}\n")
    print("| step | s | peak RSS MiB | above start MiB |")
    print("|---|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['s']:.2f} | {r['peak']:.0f} | {r['peak'] - r['start']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
