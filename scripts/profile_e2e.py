#!/usr/bin/env python
"""Where one predict's time goes on the GPU: torch.profiler over a few runs of one baseline (batch 1 by default).

Prints the wall time per image, the GPU time summed over kernels per image (so their ratio shows how much
the host leaves the GPU idle), and the top kernels and ops by GPU time. Same image and synthetic weights as
scripts/bench_e2e.py.

    python scripts/profile_e2e.py [--model mask_rcnn_R_50_FPN_3x] [--variant fp32|bf16|fp32+graphs|...] [--iters 10]
                                  [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import apply_variant, load_image, synth_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mask_rcnn_R_50_FPN_3x")
    ap.add_argument("--variant", default="fp32", help="precision, '+graphs', '+dynamic' as in bench_e2e")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="images per predict call (times are per image)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only checks that the script runs")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("CUDA not available: nothing to profile")
        return 0
    from torch.profiler import ProfilerActivity, profile

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    if args.batch < 1:
        raise SystemExit(f"--batch {args.batch}: give 1 or more images per call")
    model = synth_model(args.model, device)
    apply_variant(model, args.variant)
    img = load_image()
    batch = img if args.batch == 1 else [img] * args.batch
    for _ in range(5 if on_gpu else 1):
        model.predict(batch)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.iters):
            model.predict(batch)
        sync()
        wall = (time.perf_counter() - t0) / (args.iters * args.batch)
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / (args.iters * args.batch)
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"{where}, torch {torch.__version__}; {args.model} {args.variant}, batch {args.batch}, {args.iters} runs "
          "under the profiler (which adds host overhead); the table's totals are over all runs")
    print(f"wall {wall * 1e3:.2f} ms/image; GPU kernels {gpu_us / 1e3:.2f} ms/image "
          f"({100 * gpu_us / 1e3 / (wall * 1e3):.0f}% busy)")
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
