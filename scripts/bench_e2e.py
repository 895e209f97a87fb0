#!/usr/bin/env python
"""End-to-end inference speed of zoo's baselines (fp32/bf16, with and without CUDA graphs) vs Detectron2's GPU times.

For each model prints one markdown row per variant: ms/image at batch 1 (median after warm-up,
CUDA-synchronised), images/s at batch --batch, peak GPU memory (torch.cuda.max_memory_allocated, reset per
variant), detections per image, the share of the first fp32 variant's detections that a variant also finds
(same class, IoU >= 0.9: the bf16 target's criterion), and Detectron2's recorded ms divided by ours.
torchvision's counterpart (CUDA only, imported only there) runs in the same process for the R50-FPN models.

Weights are the fixtures' synthetic ones (tests/synth_weights.py, seed 20261124), which give ~100
detections per image, as in the Detectron2 measurement. Input: tests/fixtures/images/grace_hopper.png
resized to 938x800 (HxW, short side 800; --min-size picks another) once, so no model resizes inside the timed
region.

    python scripts/bench_e2e.py [--models a,b] [--iters 50] [--batch 8] [--device cuda] [--quick] [--min-size 800]
        [--out F.md]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SEED = 20261124

# Detectron2 ms/image, batch 1, one H100, fp32 (TF32 allowed, PyTorch defaults), 938x800 grace_hopper,
# synthetic weights: the project's reference timings (shared/reference/anchors.md, kept outside this
# repository; "GPU" table, measured 2026-11-24).
D2_MS = {
    "mask_rcnn_R_50_FPN_3x": 34.8,
    "faster_rcnn_R_50_FPN_3x": 24.9,
    "mask_rcnn_R_50_C4_1x": 42.3,
    "faster_rcnn_R_50_DC5_1x": 29.4,
    "mask_rcnn_R_101_FPN_3x": 41.5,
    "faster_rcnn_X_101_32x8d_FPN_3x": 35.9,
}
# torchvision's counterparts (same file): ms/image on that H100
TV_MODELS = {"mask_rcnn_R_50_FPN_3x": ("maskrcnn_resnet50_fpn", 100.1),
             "faster_rcnn_R_50_FPN_3x": ("fasterrcnn_resnet50_fpn", 58.3)}


def load_image(short_side: int = 800, max_size: int = 1333) -> np.ndarray:
    """grace_hopper (600x512, HxW) resized as the model would (938x800 at short side 800), so it runs unresized."""
    from PIL import Image

    from zoo.modeling.transforms import resized_size

    im = Image.open(os.path.join(FIXTURES, "images", "grace_hopper.png")).convert("RGB")
    h, w = resized_size(im.height, im.width, short_side, max_size)
    return np.asarray(im.resize((w, h), Image.BILINEAR))


def matched_share(ref, out, top_n: Optional[int] = None) -> str:
    """Share of `ref`'s detections (its top_n best, default all) that `out` also has (same class, IoU >= 0.9),
    as a percentage."""
    from user_support import top_matched

    if ref is None or not len(ref):
        return ""
    n = len(ref) if top_n is None else min(top_n, len(ref))
    return f"{100 * top_matched(ref, out, n, 0.9):.0f}%" if len(out) else "0%"


def synth_model(name: str, device: torch.device):
    from user_support import synthetic_baseline

    return synthetic_baseline(name).to(device)


def parse_variant(variant: str) -> tuple[str, list[str]]:
    """'bf16+graphs' -> ('bf16', ['graphs']): the precision, then flags (graphs, dynamic, fused, cudnnbench,
    torchops, torchepilogue)."""
    prec, *flags = variant.split("+")
    return prec, flags


VARIANT_FLAGS = ("graphs", "dynamic", "fused", "cudnnbench", "torchops", "torchepilogue")
_VARIANT_CONTEXT = contextlib.ExitStack()  # the context a variant runs in, until the next apply_variant


def check_variant(variant: str) -> tuple[str, list[str]]:
    """parse_variant, exiting with a message on an unknown precision or flag."""
    from zoo.modeling.detector import PRECISIONS

    prec, flags = parse_variant(variant)
    if prec not in PRECISIONS:
        raise SystemExit(f"unknown precision {prec!r} in {variant!r}; use {', '.join(PRECISIONS)}")
    unknown = set(flags) - set(VARIANT_FLAGS)
    if unknown:
        raise SystemExit(f"unknown variant flag(s) {', '.join(sorted(unknown))} in {variant!r}; "
                         f"use {', '.join(VARIANT_FLAGS)}")
    return prec, flags


def check_variants(variants: list[str]) -> None:
    """check_variant for each; '+cudnnbench' on all of them or on none (exits with a message otherwise)."""
    if len({"cudnnbench" in check_variant(v)[1] for v in variants}) > 1:
        raise SystemExit("time '+cudnnbench' variants in a bench_e2e run of their own: PyTorch keeps the cuDNN "
                         "algorithm it first picks for each convolution shape, with or without cudnn.benchmark, "
                         "so variants sharing a process would share those picks")


def apply_variant(model, variant: str) -> list[str]:
    """Set a variant such as 'bf16+graphs' on the model (precision, '+graphs', '+dynamic', '+fused' for
    cudnn_fusion, '+cudnnbench' for PyTorch's process-wide cudnn.benchmark, '+torchepilogue' for PyTorch's separate
    bias, residual and relu passes after each convolution in place of zoo's Triton epilogue, until the next call
    in this thread); returns its flags."""
    from zoo.modeling.layers import epilogue_backend

    prec, flags = check_variant(variant)
    _VARIANT_CONTEXT.close()
    _VARIANT_CONTEXT.enter_context(epilogue_backend("torch" if "torchepilogue" in flags else None))
    # cuDNN times its algorithms for each new shape and keeps the fastest (Detectron2's inference leaves it off,
    # as PyTorch does); only measured here so far, not a model setting (check_variants keeps it to runs of its own)
    torch.backends.cudnn.benchmark = "cudnnbench" in flags
    model.clear_cuda_graphs()  # an earlier variant's graphs would hold memory and count in this one's peak
    model.precision = prec
    model.cuda_graphs = "graphs" in flags
    model.static_shapes = False if "dynamic" in flags else None
    model.cudnn_fusion = "fused" in flags
    return flags


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple[float, Any]:
    """Median wall seconds of fn, synchronised after each call, and the last call's result."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(run1: Callable[[], Any], runb: Callable[[], Any], count: Callable[[Any], int],
            device: torch.device, args) -> dict:
    """batch-1 ms, batch-B images/s, peak MiB (batch 1 and batch B), detections per image, and one batch-1 output."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    s1, out = median_s(run1, device, args.warmup, args.iters)
    peak1 = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    dets = count(out)
    s, _ = median_s(runb, device, args.batch_warmup, args.batch_iters)
    peakb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"ms": 1000 * s1, "ips": args.batch / s, "peak1": peak1, "peakb": peakb, "dets": dets, "out": out}


def torchvision_model(tv_name: str, device: torch.device):
    """torchvision's model, weights=None, defaults kept; its cls_score drawn like the synthetic weights so
    that boxes clear the 0.05 score threshold (random init scores ~1/91 and would return nothing)."""
    import torchvision  # GPU path only

    m = getattr(torchvision.models.detection, tv_name)(weights=None, weights_backbone=None)
    cls = m.roi_heads.box_predictor.cls_score
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=g) * 4.0 / cls.weight.shape[1] ** 0.5)
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=g))
    return m.to(device).eval()


def fmt(v: Optional[float], spec: str) -> str:
    return "" if v is None else format(v, spec)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(D2_MS), help="comma-separated baseline names")
    ap.add_argument("--iters", type=int, help="timed batch-1 runs (median; default 50, --quick 3)")
    ap.add_argument("--warmup", type=int, help="batch-1 warm-up runs (default 10, --quick 1)")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the throughput column")
    ap.add_argument("--batch-iters", type=int, help="timed batched runs (median; default 10, --quick 1)")
    ap.add_argument("--batch-warmup", type=int,
                    help="batched warm-up runs (default: warm-up / 5, at least 2 since CUDA graphs capture a shape "
                         "on its second use)")
    ap.add_argument("--variants", "--precisions", dest="variants",
                    default="fp32,fp32+dynamic,fp32+graphs,fp32+graphs+fused,tf32+graphs+fused,bf16+graphs+fused,"
                            "fp16+graphs+fused",
                    help="zoo variants to time: a precision (fp32, tf32, bf16, fp16), '+graphs' for CUDA graphs, "
                         "'+dynamic' for the dynamic (host-synchronising) path, '+fused' for cuDNN's fused "
                         "conv-bias-add-relu (cudnn_fusion), '+cudnnbench' for torch.backends.cudnn.benchmark, "
                         "'+torchops' for ZOO_OPS=torch, '+torchepilogue' for PyTorch's bias, residual and relu "
                         "passes after each convolution (zoo's default on CUDA: one Triton pass)")
    ap.add_argument("--no-torchvision", action="store_true", help="skip torchvision's counterparts")
    ap.add_argument("--quick", action="store_true",
                    help="tiny default counts: 3 timed runs, 1 warm-up, 1 batched run (explicit counts still win)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--min-size", type=int, default=800,
                    help="test-time short side, for image and models (default 800, the baselines' and the "
                         "Detectron2 timings'; smaller only for quick checks: the D2 column stays at 800)")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    for key, full, quick in (("iters", 50, 3), ("warmup", 10, 1), ("batch_iters", 10, 1)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.batch_warmup is None:
        args.batch_warmup = max(2, args.warmup // 5)
    if min(args.iters, args.batch_iters) < 1 or min(args.warmup, args.batch_warmup) < 0:
        raise SystemExit("--iters and --batch-iters must be at least 1, --warmup and --batch-warmup at least 0")
    if args.min_size < 32:
        raise SystemExit(f"--min-size must be at least 32 pixels, got {args.min_size}")
    variants = [p.strip() for p in args.variants.split(",") if p.strip()]
    check_variants(variants)

    notes: list[str] = []
    lines: list[str] = []
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        notes.append(f"CUDA not available (torch {torch.__version__}): nothing measured; "
                     "run with --device cpu for a CPU check")
    else:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"CPU, {torch.get_num_threads()} threads"
        tf32 = (f", TF32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}"
                if device.type == "cuda" else "")
        img = load_image(args.min_size)
        notes.append(f"{where}, torch {torch.__version__}{tf32}; image {img.shape[0]}x{img.shape[1]}; "
                     f"batch-1 median of {args.iters} "
                     f"after {args.warmup} warm-up; batch {args.batch} median of {args.batch_iters} after {args.batch_warmup}")
        notes.append("Detectron2 ms: the project's reference timings of 2026-11-24 (one H100, fp32); "
                     "'D2/ours' > 1 means faster than Detectron2 (the goal is >= 3)")
        lines += ["| model | variant | ms/image b1 | D2 ms | D2/ours | images/s b%d | peak MiB b1 | peak MiB b%d "
                  "| dets/img | matched vs fp32 |" % (args.batch, args.batch), "|---" * 10 + "|"]
        tv_ok = device.type == "cuda" and not args.no_torchvision
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            d2 = D2_MS.get(name)
            model = synth_model(name, device)
            model.min_size_test = args.min_size
            ref = None  # the first fp32 variant's detections
            for variant in variants:
                prec, flags = parse_variant(variant)
                if device.type != "cuda" and (prec in ("fp16", "tf32") or "graphs" in flags):
                    notes.append(f"{name} {variant}: skipped (needs CUDA)")
                    continue
                apply_variant(model, variant)
                r = None
                for ops_env in (["torch"] if "torchops" in flags else ["", "torch"]):
                    # a variant that fails with the Triton ops is retried with the PyTorch ones, so a kernel
                    # problem still leaves a timing of the rest (the row says so)
                    os.environ["ZOO_OPS"] = ops_env
                    try:
                        r = measure(lambda: model.predict(img), lambda: model.predict([img] * args.batch), len,
                                    device, args)
                        break
                    except Exception as e:  # report and go on
                        notes.append(f"{name} {variant}{' (ZOO_OPS=torch)' if ops_env else ''}: failed: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                os.environ.pop("ZOO_OPS", None)
                if r is None:
                    continue
                if ops_env and "torchops" not in flags:
                    variant += " (retried with ZOO_OPS=torch)"
                if ref is None and prec == "fp32":
                    ref = r["out"]
                matched = matched_share(ref, r["out"])
                lines.append(f"| {name} | zoo {variant} | {r['ms']:.1f} | {fmt(d2, '.1f')} | "
                             f"{fmt(d2 / r['ms'] if d2 else None, '.2f')} | {r['ips']:.1f} | "
                             f"{fmt(r['peak1'], '.0f')} | {fmt(r['peakb'], '.0f')} | {r['dets']} | {matched} |")
                print(lines[-1], flush=True)
            del model, ref
            if name in TV_MODELS and not tv_ok and device.type != "cuda":
                notes.append(f"{name}: torchvision's {TV_MODELS[name][0]} not timed (CPU run; GPU-only)")
            if name in TV_MODELS and tv_ok:
                tv_name, tv_ms = TV_MODELS[name]
                try:
                    tv = torchvision_model(tv_name, device)
                    tv.transform.min_size = (args.min_size,)  # its own resize, to the same short side
                    x = torch.from_numpy(img.transpose(2, 0, 1).copy()).to(device).float() / 255

                    def tv1():
                        with torch.inference_mode():
                            return tv([x])

                    def tvb():
                        with torch.inference_mode():
                            return tv([x] * args.batch)

                    r = measure(tv1, tvb, lambda o: len(o[0]["boxes"]), device, args)
                    lines.append(f"| {name} | torchvision {tv_name} fp32 (anchors: {tv_ms} ms) | {r['ms']:.1f} | "
                                 f"{fmt(d2, '.1f')} | {fmt(d2 / r['ms'] if d2 else None, '.2f')} | {r['ips']:.1f} | "
                                 f"{fmt(r['peak1'], '.0f')} | {fmt(r['peakb'], '.0f')} | {r['dets']} | |")
                    print(lines[-1], flush=True)
                    del tv
                except Exception as e:
                    notes.append(f"{name}: torchvision {tv_name} not timed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}")
    text = "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
