#!/usr/bin/env python
"""Images/s over a folder of JPEG files: zoo's streaming inference (predict_iter) vs a plain predict loop.

Writes --count JPEGs of COCO's usual sizes (640x480 and 480x640, made from the fixture photo) to a temporary
folder, then times one model with the fixtures' synthetic weights over all of them:
  loop        for path in paths: model.predict(path)   decode, resize and network one after another
  stream b1   model.predict_iter(paths)                reader threads decode and resize ahead
  stream bN   model.predict_iter(paths, batch_size=N)
  stream bN bf16
Each variant first runs once over the first images untimed (kernel compiles, cuDNN's choices). The
"host prep" line is decode + resize alone per image (GeneralizedRCNN.prepare), the work the threads hide.

    python scripts/bench_stream.py [--model mask_rcnn_R_50_FPN_3x] [--device auto] [--count 64] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def write_jpegs(folder: str, count: int) -> list[str]:
    from PIL import Image

    photo = Image.open(os.path.join(ROOT, "tests", "fixtures", "images", "grace_hopper.png")).convert("RGB")
    paths = []
    for i in range(count):
        size = (640, 480) if i % 2 == 0 else (480, 640)  # (w, h), COCO's two most common
        im = photo.resize(size, Image.BILINEAR)
        if i % 4 >= 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"{i:05d}.jpg")
        im.save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mask_rcnn_R_50_FPN_3x")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--count", type=int, default=64, help="JPEG files to run through")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched rows")
    ap.add_argument("--min-size", type=int, help="test-time short side (default: the manifest's 800)")
    ap.add_argument("--quick", action="store_true",
                    help="4 images, batch 2, 2 warm-up images, short side 320 (a CPU smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.count, args.batch, args.min_size = 4, 2, args.min_size or 320

    import zoo
    from user_support import baseline_state_dict
    from zoo.api import resolve_device
    from zoo.modeling import load_weights

    device = resolve_device(args.device)
    model = zoo.get(args.model, pretrained=False, device="cpu", min_size=args.min_size)
    load_weights(model, baseline_state_dict(args.model))
    model.to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    n, b = args.count, args.batch
    warm = min(n, b if args.quick else 2 * b)  # 2b: a full batch of each of the two image shapes

    def loop(paths):
        for p in paths:
            model.predict(p)

    def stream(paths, batch):
        for _ in model.predict_iter(paths, batch_size=batch):
            pass

    variants = [("loop", "fp32", loop), ("stream b1", "fp32", lambda p: stream(p, 1)),
                (f"stream b{b}", "fp32", lambda p: stream(p, b)), (f"stream b{b}", "bf16", lambda p: stream(p, b))]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, n)
        prep = timed(lambda: [model.prepare(p) for p in paths], torch.device("cpu")) / n
        base = None
        for label, precision, fn in variants:
            model.precision = precision
            fn(paths[:warm])
            s = timed(lambda: fn(paths), device)
            base = base or s
            rows.append(f"| {label} | {precision} | {n / s:.2f} | {1000 * s / n:.1f} | {base / s:.2f} |")
            print(rows[-1], flush=True)
    print(f"\n{args.model} on {where}, torch {torch.__version__}; {n} JPEGs (640x480 / 480x640), short side "
          f"{model.min_size_test}; synthetic weights\n")
    print("| variant | precision | images/s | ms/image | vs loop |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nhost prep (decode + resize, one thread): {1000 * prep:.1f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
