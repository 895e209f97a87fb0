#!/usr/bin/env python
"""Where one predict's GPU memory goes: allocated MiB (live after, peak during) at each call of a baseline, then
the Python lines whose allocations hold the most live memory (weights, caches, a CUDA graph's pool).

With '+graphs' the first call runs eagerly and the second captures (zoo.modeling.graphs), so the rows show what
a capture adds to the eager peak; Detectron2's peak for mask R50-FPN is 673 MB (the issue's memory target).
Same image and synthetic weights as scripts/bench_e2e.py.

    python scripts/memory_e2e.py [--model mask_rcnn_R_50_FPN_3x] [--variant fp32+graphs] [--calls 3]
                                 [--sites 15]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import apply_variant, load_image, synth_model  # noqa: E402

MiB = 2**20
ZOO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo") + os.sep


def where_allocated(frames: list[dict]) -> str:
    """The innermost frame in the zoo package (else the innermost one) as 'file:line name'."""
    for f in frames:
        if f.get("filename", "").startswith(ZOO_DIR):
            break
    else:
        f = frames[0] if frames else {}
    return f"{os.path.basename(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '')}".strip()


def pool_of(segment: dict) -> str:
    """'default', or 'graph' for a private pool (CUDA graphs)."""
    return "default" if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0) else "graph"


def live_blocks(snapshot: dict) -> list[tuple[int, str, str]]:
    """(bytes, pool, where) of every allocated block."""
    out = []
    for seg in snapshot.get("segments", []):
        pool = pool_of(seg)
        for b in seg.get("blocks", []):
            if b.get("state") == "active_allocated":
                out.append((b["size"], pool, where_allocated(b.get("frames", []))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mask_rcnn_R_50_FPN_3x")
    ap.add_argument("--variant", default="fp32+graphs", help="precision and flags as in bench_e2e")
    ap.add_argument("--calls", type=int, default=3, help="predict calls measured one by one")
    ap.add_argument("--sites", type=int, default=15, help="allocation sites listed, most live memory first")
    args = ap.parse_args(argv)
    if args.calls < 1:
        raise SystemExit(f"--calls {args.calls}: give 1 or more")
    if not torch.cuda.is_available():
        print(f"CUDA not available (torch {torch.__version__}): nothing measured; this script reads CUDA memory")
        return 0
    device = torch.device("cuda")
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    model = synth_model(args.model, device)
    apply_variant(model, args.variant)
    img = load_image()
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; {args.model} {args.variant}, batch 1")
    print("| stage | live MiB after | peak MiB during | graphs held |\n|---|---:|---:|---:|")
    print(f"| weights loaded | {torch.cuda.memory_allocated() / MiB:.0f} | | 0 |")
    for i in range(args.calls):
        torch.cuda.reset_peak_memory_stats()
        model.predict(img)
        torch.cuda.synchronize()
        cache = getattr(model, "_graph_cache", None)
        print(f"| call {i + 1} | {torch.cuda.memory_allocated() / MiB:.0f} | "
              f"{torch.cuda.max_memory_allocated() / MiB:.0f} | {len(cache) if cache is not None else 0} |")
    try:
        snapshot = torch.cuda.memory._snapshot()
        blocks = live_blocks(snapshot)
    except Exception as e:  # the snapshot's format is private to PyTorch; the table above still stands
        print(f"no memory snapshot ({type(e).__name__}: {e})")
        return 0
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    by_pool = Counter()
    for size, pool, _ in blocks:
        by_pool[pool] += size
    reserved = Counter()  # a graph's pool keeps what its capture freed: reserved, not allocated
    for seg in snapshot.get("segments", []):
        reserved[pool_of(seg)] += seg.get("total_size", 0)
    print("live by pool: " + ", ".join(f"{p} {n / MiB:.1f} MiB" for p, n in sorted(by_pool.items()))
          + "; reserved: " + ", ".join(f"{p} {n / MiB:.1f} MiB" for p, n in sorted(reserved.items())))
    by_site = Counter()
    for size, pool, site in blocks:
        by_site[(pool, site)] += size
    print("\n| pool | allocated at | MiB |\n|---|---|---:|")
    for (pool, site), size in by_site.most_common(args.sites):
        print(f"| {pool} | {site} | {size / MiB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
