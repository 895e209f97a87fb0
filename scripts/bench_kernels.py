#!/usr/bin/env python
"""Benchmark zoo's Triton ops against torchvision and zoo's torch fallback (same GPU).

Prints a markdown table of median milliseconds and speed-ups. Without CUDA it says
so and times only the torch path on CPU (exit code 0).

    python scripts/bench_kernels.py [--repeats 20] [--warmup 3] [--only nms]
    python scripts/bench_kernels.py --sweep [--only C4]

`--sweep` times the Triton kernels under each candidate program tile (ROIAlign: channels x bins x warps, and for
NCHW maps also "staged": read from a channels-last copy; NMS scan: propagation words x warps, and how a block is
resolved, "fixpoint" or "serial") against the default one, and checks that each gives the default's result.
It needs CUDA, or TRITON_INTERPRET=1 with `--tiny` (small inputs, to check the script itself on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Iterator, Optional

import torch
import triton  # zoo.kernels, imported below, needs it anyway

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zoo import ops  # noqa: E402
from zoo import kernels  # noqa: E402
from zoo.ops import reference  # noqa: E402
from zoo.ops.synthetic import clustered_proposals, random_proposals, torchvision_pooler  # noqa: E402

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def proposals(n: int, seed: int, device: str, **kw) -> torch.Tensor:
    """RPN-like boxes on an 800x1216 image."""
    return random_proposals(n, seed, device=device, **kw)


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of fn in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def tv_pooler(tv, feats, rois, size: int, sr: int) -> torch.Tensor:
    """Detectron2's ROIPooler: level assignment, per-level roi_align, index_put."""
    return torchvision_pooler(tv, feats, rois, size, SCALES, sr)


def workloads(device: str, tv):
    """(name, triton fn, torchvision fn, torch fn) for each benchmark."""
    g = torch.Generator(device=device).manual_seed(0)
    feats = [torch.randn(1, 256, int(800 * s), int(1216 * s), generator=g, device=device)
             for s in SCALES]
    res4 = torch.randn(1, 1024, 50, 76, generator=g, device=device)
    feats_cl = [f.to(memory_format=torch.channels_last) for f in feats]
    res4_cl = res4.to(memory_format=torch.channels_last)
    rois1000 = reference.boxes_to_rois([proposals(1000, 1, device)])
    rois100 = reference.boxes_to_rois([proposals(100, 2, device)])
    rois_c4 = reference.boxes_to_rois([proposals(1000, 3, device)])

    def trip(fn_name, *args, **kw):
        return lambda: getattr(ops, fn_name)(*args, backend="triton", **kw)

    def torch_path(fn_name, *args, **kw):
        return lambda: getattr(ops, fn_name)(*args, backend="torch", **kw)

    out = [
        ("FPN pooler 1000 boxes C=256 7x7 (sr 0, aligned)",
         trip("multilevel_roi_align", feats, rois1000, 7, SCALES, 0, True),
         (lambda: tv_pooler(tv, feats, rois1000, 7, 0)) if tv else None,
         torch_path("multilevel_roi_align", feats, rois1000, 7, SCALES, 0, True)),
        # the layout the networks' fast convolutions leave: Triton reads it in place, torchvision copies it to NCHW
        ("FPN pooler 1000 boxes C=256 7x7, channels-last maps",
         trip("multilevel_roi_align", feats_cl, rois1000, 7, SCALES, 0, True),
         (lambda: tv_pooler(tv, feats_cl, rois1000, 7, 0)) if tv else None,
         torch_path("multilevel_roi_align", feats_cl, rois1000, 7, SCALES, 0, True)),
        # what the FPN baselines' box pooler runs: the FC head flattens NCHW rows, so the result is written NCHW
        ("FPN pooler 1000 boxes C=256 7x7, channels-last maps, NCHW result (FC box head)",
         trip("multilevel_roi_align", feats_cl, rois1000, 7, SCALES, 0, True, memory_format=torch.contiguous_format),
         (lambda: tv_pooler(tv, feats_cl, rois1000, 7, 0)) if tv else None,
         torch_path("multilevel_roi_align", feats_cl, rois1000, 7, SCALES, 0, True,
                    memory_format=torch.contiguous_format)),
        ("Mask pooler 100 boxes C=256 14x14",
         trip("multilevel_roi_align", feats, rois100, 14, SCALES, 0, True),
         (lambda: tv_pooler(tv, feats, rois100, 14, 0)) if tv else None,
         torch_path("multilevel_roi_align", feats, rois100, 14, SCALES, 0, True)),
        ("Mask pooler 100 boxes C=256 14x14, channels-last maps",
         trip("multilevel_roi_align", feats_cl, rois100, 14, SCALES, 0, True),
         (lambda: tv_pooler(tv, feats_cl, rois100, 14, 0)) if tv else None,
         torch_path("multilevel_roi_align", feats_cl, rois100, 14, SCALES, 0, True)),
        ("C4 pooler 1000 boxes res4 C=1024 14x14 (stride 16)",
         trip("roi_align", res4, rois_c4, 14, 1 / 16, 0, True),
         (lambda: tv.roi_align(res4, rois_c4, 14, 1 / 16, 0, True)) if tv else None,
         torch_path("roi_align", res4, rois_c4, 14, 1 / 16, 0, True)),
        ("C4 pooler 1000 boxes res4 C=1024 14x14, channels-last",
         trip("roi_align", res4_cl, rois_c4, 14, 1 / 16, 0, True),
         (lambda: tv.roi_align(res4_cl, rois_c4, 14, 1 / 16, 0, True)) if tv else None,
         torch_path("roi_align", res4_cl, rois_c4, 14, 1 / 16, 0, True)),
        # what Res5ROIHeads runs: the even bins its stride-2 1x1 convolutions read; torchvision pools all 14x14
        ("C4 pooler as zoo's C4 heads run it: even bins of 14x14 (bin_stride 2), channels-last",
         trip("roi_align", res4_cl, rois_c4, 14, 1 / 16, 0, True, bin_stride=2),
         (lambda: tv.roi_align(res4_cl, rois_c4, 14, 1 / 16, 0, True)) if tv else None,
         torch_path("roi_align", res4_cl, rois_c4, 14, 1 / 16, 0, True, bin_stride=2)),
    ]
    for n in (1000, 4700, 12000, 30000):
        b = proposals(n, 10 + n, device, smax=300.0)
        s = torch.rand(n, generator=g, device=device)
        out.append((f"NMS n={n} (IoU 0.7)", trip("nms", b, s, 0.7),
                    (lambda b=b, s=s: tv.nms(b, s, 0.7)) if tv else None,
                    torch_path("nms", b, s, 0.7)))
    for n, seed, what in ((4700, 99, ""), (80000, 98, "per-class regime, ")):
        b = proposals(n, seed, device, smax=300.0)
        s = torch.rand(n, generator=g, device=device)
        c = torch.randint(0, 80, (n,), generator=g, device=device)
        out.append((f"Batched NMS 80 classes n={n} ({what}IoU 0.5)", trip("batched_nms", b, s, c, 0.5),
                    (lambda b=b, s=s, c=c: tv.batched_nms(b, s, c, 0.5)) if tv else None,
                    torch_path("batched_nms", b, s, c, 0.5)))
    # the box head's fixed-shape NMS: 1000 proposals x 80 classes, 3% above the score threshold
    valid = torch.rand(80000, generator=g, device=device) < 0.03
    out.append(("Fixed-shape batched NMS 1000x80, 3% valid, capacity 4096, top 100",
                trip("batched_nms_fixed", b, s, c, valid, 0.5, 100, 4096), None,
                torch_path("batched_nms_fixed", b, s, c, valid, 0.5, 100, 4096)))
    # the RPN's fixed-shape NMS: ~4700 proposals of 5 levels (1000 per level, fewer on the coarsest), top 1000
    b = proposals(4700, 96, device, smax=300.0)
    s = torch.rand(4700, generator=g, device=device)
    lv = torch.arange(4700, device=device) // 1000
    ok = torch.ones(4700, dtype=torch.bool, device=device)
    out.append(("Fixed-shape batched NMS 4700 in 5 levels (RPN, IoU 0.7), top 1000",
                trip("batched_nms_fixed", b, s, lv, ok, 0.7, 1000), None,
                torch_path("batched_nms_fixed", b, s, lv, ok, 0.7, 1000)))
    # mask paste: 100 masks 28x28 into a 938x800 image (torchvision: its per-mask paste, float output)
    masks = torch.rand(100, 28, 28, generator=g, device=device)
    boxes = proposals(100, 97, device, smax=400.0, height=938.0, width=800.0)
    tv_paste = None
    if tv is not None:
        try:
            from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_fn
            tv_paste = lambda: tv_paste_fn(masks[:, None], boxes, (938, 800), padding=1)  # noqa: E731
        except Exception:  # older/newer torchvision layout: leave the column n/a
            tv_paste = None
    out.append(("Mask paste 100 masks 28x28 into 938x800", trip("paste_masks", masks, boxes, (938, 800)),
                tv_paste, torch_path("paste_masks", masks, boxes, (938, 800), batched=True)))
    return out


# candidate tiles; the first of each list is the default (ROIAlign: channels, bins, warps; NMS scan: words, warps,
# block method)
POOL_TILES_7 = [(32, 64, 8), (32, 64, 4), (64, 32, 4), (64, 32, 8), (128, 16, 8), (256, 8, 8)]
POOL_TILES_14 = [(8, 256, 8), (16, 128, 8), (32, 64, 4), (64, 32, 4), (128, 16, 4), (128, 16, 8), (256, 8, 8)]
# NCHW maps: the same tiles read in place, then two staged through a channels-last copy
# (kernels.forced_roi_align_staging)
POOL_TILES_7_NCHW = POOL_TILES_7 + [(32, 64, 8, "staged"), (32, 64, 4, "staged")]
SCAN_TILES = [(16, 1, "fixpoint"), (32, 1, "fixpoint"), (64, 1, "fixpoint"), (16, 2, "fixpoint"), (64, 4, "fixpoint"),
              (16, 1, "serial"), (32, 1, "serial"), (64, 1, "serial"), (32, 2, "serial"), (64, 4, "serial")]


@contextlib.contextmanager
def pool_candidate(channels: int, bins: int, warps: int, staged: str = "") -> Iterator[None]:
    """A ROIAlign tile, optionally reading NCHW maps from a channels-last copy."""
    with kernels.forced_roi_align_tile(channels, bins, warps), kernels.forced_roi_align_staging(bool(staged)):
        yield


def sweeps(device: str, tiny: bool):
    """(workload, run, candidate tiles, context manager forcing a tile) for the tile sweep."""
    g = torch.Generator(device=device).manual_seed(0)
    c, size, many, few, n_nms = (16, (64, 96), 24, 8, 300) if tiny else (256, (800, 1216), 1000, 100, 4700)
    feats = [torch.randn(1, c, int(size[0] * s), int(size[1] * s), generator=g, device=device)
             .to(memory_format=torch.channels_last) for s in SCALES]
    res4 = torch.randn(1, 4 * c, size[0] // 16, size[1] // 16, generator=g, device=device)
    # the main table's boxes at full size (RPN-like up to 800 px for the poolers, 300 px for NMS)
    geo = dict(height=float(size[0]), width=float(size[1]), smax=20.0) if tiny else {}
    rois_many = reference.boxes_to_rois([proposals(many, 1, device, **geo)])
    rois_few = reference.boxes_to_rois([proposals(few, 2, device, **geo)])
    rois_c4 = reference.boxes_to_rois([proposals(many, 3, device, **geo)])
    res4_cl = res4.to(memory_format=torch.channels_last)
    tri = dict(backend="triton")
    pool = kernels.forced_roi_align_tile
    feats_nchw = [f.contiguous() for f in feats]
    b = proposals(n_nms, 10 + n_nms, device, **(geo or dict(smax=300.0)))
    s = torch.rand(n_nms, generator=g, device=device)
    lv = torch.arange(n_nms, device=device) * 5 // n_nms
    ok = torch.ones(n_nms, dtype=torch.bool, device=device)
    # the RPN row's boxes overlap as an RPN's do (the fixed point's rounds follow the chains of suppressions)
    rb, rs = clustered_proposals(n_nms, 10 + n_nms, device=device)
    scan = kernels.forced_nms_scan
    out = [
        # first: the scan's default block method is the one choice here not yet timed on a GPU
        (f"NMS n={n_nms} (IoU 0.7)", lambda: ops.nms(b, s, 0.7, **tri), SCAN_TILES, scan),
        (f"Fixed-shape batched NMS {n_nms} in 5 levels, clustered like an RPN's (IoU 0.7), top {many}",
         lambda: ops.batched_nms_fixed(rb, rs, lv, ok, 0.7, many, **tri), SCAN_TILES, scan),
        (f"FPN pooler {many} boxes C={c} 7x7, channels-last maps",
         lambda: ops.multilevel_roi_align(feats, rois_many, 7, SCALES, 0, True, **tri), POOL_TILES_7, pool),
        (f"Mask pooler {few} boxes C={c} 14x14, channels-last maps",
         lambda: ops.multilevel_roi_align(feats, rois_few, 14, SCALES, 0, True, **tri), POOL_TILES_14, pool),
        (f"C4 pooler {many} boxes res4 C={4 * c} 14x14, channels-last",
         lambda: ops.roi_align(res4_cl, rois_c4, 14, 1 / 16, 0, True, **tri), POOL_TILES_14, pool),
        (f"C4 pooler {many} boxes res4 C={4 * c} 14x14, NCHW",
         lambda: ops.roi_align(res4, rois_c4, 14, 1 / 16, 0, True, **tri), POOL_TILES_14, pool),
        (f"C4 pooler {many} boxes res4 C={4 * c}, even bins of 14x14, channels-last",
         lambda: ops.roi_align(res4_cl, rois_c4, 14, 1 / 16, 0, True, bin_stride=2, **tri), POOL_TILES_7, pool),
    ]
    out += [
        # last: the networks never pool from NCHW maps on a GPU, so this row must not crowd out the others
        (f"FPN pooler {many} boxes C={c} 7x7, NCHW maps",
         lambda: ops.multilevel_roi_align(feats_nchw, rois_many, 7, SCALES, 0, True, **tri), POOL_TILES_7_NCHW,
         pool_candidate),
    ]
    return out


def same(a, b) -> bool:
    """Equal results (tensors, or tuples of them)."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return all(same(x, y) for x, y in zip(a, b))


def run_sweep(device: str, tiny: bool, only: str, warmup: int, repeats: int) -> None:
    """Print each candidate tile's median time against the default tile's, and whether its result is the same."""
    print("| workload | tile | triton ms | vs default | same result |")
    print("|---|---|---:|---:|---|")
    for name, run, tiles, forced in sweeps(device, tiny):
        if only and only.lower() not in name.lower():
            continue
        ref = run()
        base = None
        for tile in tiles:
            with forced(*tile):
                ok = same(run(), ref)
                t = time_ms(run, device, warmup, repeats)
            base = base or t
            label = "x".join(str(v) for v in tile if isinstance(v, int)) + \
                "".join(f" {v}" for v in tile if isinstance(v, str)) + (" (default)" if tile == tiles[0] else "")
            print(f"| {name} | {label} | {fmt(t)} | {speedup(base, t)} | {'yes' if ok else 'NO'} |", flush=True)


def fmt(ms: Optional[float]) -> str:
    return "n/a" if ms is None else f"{ms:.3f}"


def speedup(base: Optional[float], new: Optional[float]) -> str:
    return "n/a" if base is None or new is None or new <= 0 else f"{base / new:.2f}x"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmarks and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first")
    ap.add_argument("--only", default="", help="substring filter on workload names")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--sweep", action="store_true", help="time the Triton kernels' candidate tiles instead")
    ap.add_argument("--tiny", action="store_true", help="--sweep on small inputs (for TRITON_INTERPRET=1 on CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    repeats = args.repeats or (20 if cuda else 3)
    warmup = args.warmup or (3 if cuda else 1)
    if args.sweep:
        if not cuda and not (args.tiny and kernels.INTERPRET):
            print("--sweep needs CUDA (or TRITON_INTERPRET=1 with --tiny to check the script on CPU)")
            return 2
        if cuda:
            print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                  f"median of {repeats} runs after {warmup} warm-up")
        with torch.inference_mode():
            run_sweep(device, args.tiny, args.only, warmup, repeats)
        return 0
    torch_repeats = max(3, repeats // 4)
    tv = None
    if cuda:
        try:
            import torchvision.ops as tv  # only for the baseline column, only on GPU
        except Exception as exc:  # missing or broken install: skip that column
            print(f"torchvision unavailable ({exc}); its column is n/a")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"median of {repeats} runs after {warmup} warm-up (torch column: {torch_repeats} after 1)")
    else:
        print("CUDA not available: timing only the torch fallback on CPU "
              f"({torch.get_num_threads()} threads, median of {repeats} runs)")
    print()
    print("| workload | triton ms | torchvision ms | torch ms | triton vs torchvision "
          "| triton vs torch |")
    print("|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, f_tri, f_tv, f_torch in workloads(device, tv):
            if args.only and args.only.lower() not in name.lower():
                continue
            t_tri = time_ms(f_tri, device, warmup, repeats) if cuda else None
            t_tv = time_ms(f_tv, device, warmup, repeats) if f_tv is not None else None
            # on a GPU the torch fallback is only a reference column (and slow for big NMS): fewer runs
            t_torch = time_ms(f_torch, device, 1, torch_repeats) if cuda else time_ms(f_torch, device, warmup, repeats)
            print(f"| {name} | {fmt(t_tri)} | {fmt(t_tv)} | {fmt(t_torch)} "
                  f"| {speedup(t_tv, t_tri)} | {speedup(t_torch, t_tri)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
