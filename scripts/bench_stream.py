#!/usr/bin/env python
"""Images/s over a folder of JPEG files: zoo's streaming inference (predict_iter) vs a plain predict loop.

Writes --count JPEGs of COCO's usual sizes (640x480 and 480x640, made from the fixture photo) to a temporary
folder, then times one model with the fixtures' synthetic weights over all of them:
  loop        for path in paths: model.predict(path)   decode, resize and network one after another
  stream b1   model.predict_iter(paths)                reader threads decode and resize ahead
  stream bN   model.predict_iter(paths, batch_size=N)
  stream bN bf16
  stream b1 fp32 graphs  (CUDA: cuda_graphs=True, with the cache's replay / capture counts)
--variants picks rows (loop, b1, b1+graphs, bN, bN+bf16).
--shapes N draws the images from N sizes that pad to N different inputs, the case that tests how the CUDA graph
cache copes with more shapes than it holds. Each variant first runs untimed over the first images (with --shapes,
one of each size): kernel compiles, cuDNN's choices; the graphs it captured are then dropped, so the timed pass
pays for its own captures. "matched" is the share of the first variant's detections (all images) that a variant
also finds: same class, IoU >= 0.9 (graphs must give 100%: a check of their replays across many shapes). The
"host prep" line is decode + resize alone per image (GeneralizedRCNN.prepare),
the work the threads hide.

    python scripts/bench_stream.py [--model mask_rcnn_R_50_FPN_3x] [--device auto] [--count 64] [--batch 8]
        [--shapes N] [--variants b1,b1+graphs]
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


def coco_sizes() -> list[tuple[int, int]]:
    """COCO's two most common image sizes, (w, h)."""
    return [(640, 480), (480, 640)]


def many_sizes(count: int, model) -> list[tuple[int, int]]:
    """`count` image sizes (w, h) that pad to `count` different network inputs for `model`: landscape and
    portrait, long side 480-1000 px at short side 480 (aspect ratios 1-2.1, as in COCO)."""
    from zoo.modeling.transforms import padded_size, resized_size

    sizes, inputs = [], set()
    for long in range(480, 1001, 4):
        for w, h in ((long, 480), (480, long)):
            padded = padded_size(*resized_size(h, w, model.min_size_test, model.max_size_test),
                                 model.size_divisibility)
            if padded not in inputs and len(sizes) < count:
                inputs.add(padded)
                sizes.append((w, h))
    if len(sizes) < count:
        raise SystemExit(f"--shapes {count}: at most {len(sizes)} input shapes at short side {model.min_size_test}")
    return sizes


def write_jpegs(folder: str, count: int, sizes: list[tuple[int, int]],
                seed: int = 0) -> tuple[list[str], list[str]]:
    """`count` JPEGs of the fixture photo; image i takes sizes[i % 2] for COCO's pair, else a size drawn
    uniformly (seeded), the case where no few shapes dominate. Also returns the first image of each size."""
    import random

    from PIL import Image

    photo = Image.open(os.path.join(ROOT, "tests", "fixtures", "images", "grace_hopper.png")).convert("RGB")
    rng = random.Random(seed)
    paths, first = [], {}
    for i in range(count):
        size = sizes[i % 2] if len(sizes) == 2 else rng.choice(sizes)
        im = photo.resize(size, Image.BILINEAR)
        if i % 4 >= 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"{i:05d}.jpg")
        im.save(path, quality=90)
        paths.append(path)
        first.setdefault(size, path)
    return paths, list(first.values())


def matched(ref: list, out: list) -> float:
    """Share of `ref`'s detections, over all images, that `out` also has for that image: same class, IoU >= 0.9
    (what bench_e2e's "matched" column counts)."""
    from user_support import top_matched

    total = sum(len(r) for r in ref)
    hits = sum(round(top_matched(r, o, len(r), 0.9) * len(r))
               for r, o in zip(ref, out, strict=True) if len(r) and len(o))
    return hits / total if total else 1.0


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
    ap.add_argument("--shapes", type=int,
                    help="draw the images from this many sizes that pad to different inputs (default: COCO's "
                         "640x480 and 480x640 in turn); CUDA graphs then show how they cope with many shapes")
    ap.add_argument("--variants", help="comma-separated rows to run, of loop, b1, b1+graphs (CUDA), bN, bN+bf16 "
                                       "(default: all that the device runs); the last column compares with the first")
    ap.add_argument("--quick", action="store_true",
                    help="4 images, batch 2, 2 warm-up images, short side 320 (a CPU smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.count, args.batch, args.min_size = 4, 2, args.min_size or 320

    import zoo
    from user_support import baseline_state_dict
    from zoo.api import resolve_device
    from zoo.modeling import load_weights
    from zoo.results import Detections

    device = resolve_device(args.device)
    model = zoo.get(args.model, pretrained=False, device="cpu", min_size=args.min_size)
    load_weights(model, baseline_state_dict(args.model))
    model.to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    n, b = args.count, args.batch
    warm = min(n, b if args.quick else 2 * b)  # 2b: a full batch of each of the two image shapes

    def boxes(det):  # what the "matched" column compares (masks of every image would not fit in memory)
        return Detections(det.boxes.cpu(), det.scores.cpu(), det.labels.cpu(), None, det.image_size)

    def loop(paths):
        return [boxes(model.predict(p)) for p in paths]

    def stream(paths, batch):
        return [boxes(d) for d in model.predict_iter(paths, batch_size=batch)]

    # name: (label, precision, CUDA graphs, run)
    table = {"loop": ("loop", "fp32", False, loop), "b1": ("stream b1", "fp32", False, lambda p: stream(p, 1)),
             "b1+graphs": ("stream b1", "fp32", True, lambda p: stream(p, 1)),
             "bN": (f"stream b{b}", "fp32", False, lambda p: stream(p, b)),
             "bN+bf16": (f"stream b{b}", "bf16", False, lambda p: stream(p, b))}
    names = args.variants.split(",") if args.variants else [
        v for v in table if device.type == "cuda" or v != "b1+graphs"]
    unknown = [v for v in names if v not in table]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    if device.type != "cuda" and "b1+graphs" in names:
        raise SystemExit("b1+graphs needs --device cuda (CUDA graphs)")
    variants = [table[v] for v in names]
    sizes = many_sizes(args.shapes, model) if args.shapes else coco_sizes()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths, one_each = write_jpegs(folder, n, sizes)
        warm_paths = one_each if args.shapes else paths[:warm]
        sample = paths[:32]  # decode + resize per image needs no more (it is ~20 ms each on one core)
        prep = timed(lambda: [model.prepare(p) for p in sample], torch.device("cpu")) / len(sample)
        base = first = None
        for label, precision, graphs, fn in variants:
            model.precision, model.cuda_graphs = precision, graphs
            fn(warm_paths)
            model.clear_cuda_graphs()  # the timed pass pays for its own captures
            out = []
            s = timed(lambda: out.extend(fn(paths)), device)
            base, first = base or s, first or out
            used = " ".join(f"{k} {v}" for k, v in model.cuda_graph_stats().items()) if graphs else ""
            rows.append(f"| {label} | {precision}{' graphs' if graphs else ''} | {n / s:.2f} | {1000 * s / n:.1f} "
                        f"| {base / s:.2f} | {used} | {100 * matched(first, out):.1f}% |")
            print(rows[-1], flush=True)
        model.cuda_graphs = False
    what = (f"drawn from {len(sizes)} sizes that pad to {len(sizes)} input shapes" if args.shapes
            else "640x480 / 480x640")
    print(f"\n{args.model} on {where}, torch {torch.__version__}; {n} JPEGs ({what}), short side "
          f"{model.min_size_test}; synthetic weights\n")
    print(f"| variant | precision | images/s | ms/image | vs {names[0]} | graphs | matched vs {names[0]} |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nhost prep (decode + resize, one thread): {1000 * prep:.1f} ms/image (first {len(sample)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
