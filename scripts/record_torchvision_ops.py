#!/usr/bin/env python3
"""Record torchvision's own CPU roi_align / nms / batched_nms on edge and tie-heavy inputs, for the tests.

torchvision does not load with the CPU torch of the build machines, so tests/test_ops_torchvision.py checks
zoo's ops against this recording. Run it where torchvision imports (on these machines: a venv with PyPI's
CUDA build of the same torch, e.g. `pip install torch==2.13.0 torchvision==0.28.0` with the local wheel
directory switched off; it runs on CPU):

    python scripts/record_torchvision_ops.py            # writes tests/fixtures/torchvision_ops.pt

Tied scores are the point of the NMS cases: batched_nms's per-class regime ends with torch's default
(unstable) sort, whose order of ties is what zoo must reproduce.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torchvision_ops.pt"


def _grid_boxes(n: int, gen: torch.Generator, span: int = 20) -> torch.Tensor:
    """Integer boxes: exact IoUs, many exactly at common thresholds."""
    xy = torch.randint(0, span, (n, 2), generator=gen).float()
    wh = torch.randint(1, 10, (n, 2), generator=gen).float()
    return torch.cat([xy, xy + wh], 1)


def _float_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 30
    wh[: n // 20] = 0  # zero-area boxes: IoU 0/0
    return torch.cat([xy, xy + wh], 1)


def nms_cases(tv, gen: torch.Generator) -> list[dict]:
    cases = []
    # (n boxes, classes, grid coordinates, score levels): both batched regimes (1000 boxes on CPU)
    for n, ncls, grid, levels in [(12, 2, True, 3), (30, 1, True, 4), (300, 3, True, 5), (700, 5, False, 8),
                                  (1100, 3, True, 5), (1500, 1, False, 6), (2500, 20, True, 5),
                                  (2000, 80, False, 0)]:
        boxes = _grid_boxes(n, gen) if grid else _float_boxes(n, gen)
        scores = (torch.randint(0, levels, (n,), generator=gen).float() / levels if levels
                  else torch.rand(n, generator=gen))
        idxs = torch.randint(0, ncls, (n,), generator=gen)
        for thr in (0.5, 0.7, 1 / 3):
            cases.append(dict(boxes=boxes, scores=scores, idxs=idxs, thr=thr,
                              nms=tv.nms(boxes, scores, thr), batched=tv.batched_nms(boxes, scores, idxs, thr)))
    return cases


def rpn_case(tv, gen: torch.Generator) -> dict:
    """One level's 6000 top candidates as an RPN ranks them (scores descending, many exact ties), and
    Detectron2's proposal step on them: batched_nms over one level, first 1000."""
    n = 6000
    boxes = _grid_boxes(n, gen, span=400)
    scores = (torch.randint(0, 60, (n,), generator=gen).float() / 60).sort(descending=True).values
    levels = torch.zeros(n, dtype=torch.int64)
    return dict(boxes=boxes, scores=scores, thr=0.7, k=1000, keep=tv.batched_nms(boxes, scores, levels, 0.7)[:1000])


def roi_align_cases(tv, gen: torch.Generator) -> list[dict]:
    cases = []
    for kind, scale in [("anywhere", 1.0), ("tiny", 0.5), ("huge", 0.25), ("half_pixel", 1 / 16)]:
        n_img, C, H, W, K = 2, 3, 13, 19, 24
        x = torch.randn(n_img, C, H, W, generator=gen)
        size = torch.tensor([W, H, W, H]) / scale
        if kind == "anywhere":  # including outside the image
            c = (torch.rand(K, 4, generator=gen) * 3 - 1) * size
        elif kind == "tiny":
            p = torch.rand(K, 2, generator=gen) * size[:2]
            c = torch.cat([p, p + torch.rand(K, 2, generator=gen) * 0.3], 1)
        elif kind == "huge":
            c = torch.cat([-torch.rand(K, 2, generator=gen) * 100,
                           torch.rand(K, 2, generator=gen) * 100 + size[:2]], 1)
        else:  # box edges on pixel borders and centres
            c = torch.randint(-4, 2 * max(H, W) + 4, (K, 4), generator=gen).float() / 2 / scale
        # torchvision rejects x2 < x1 with adaptive sampling (a negative grid)
        c = torch.cat([torch.minimum(c[:, :2], c[:, 2:]), torch.maximum(c[:, :2], c[:, 2:])], 1)
        rois = torch.cat([torch.randint(0, n_img, (K, 1), generator=gen).float(), c], 1)
        outs = {}
        for sr, aligned, out_size in itertools.product([0, 1, 2], [True, False], [(2, 3), (7, 7)]):
            outs[f"{sr}_{int(aligned)}_{out_size[0]}x{out_size[1]}"] = tv.roi_align(
                x, rois, out_size, scale, sr, aligned)
        cases.append(dict(kind=kind, x=x, rois=rois, scale=scale, outputs=outs))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=20261127)
    args = ap.parse_args()
    import torchvision
    from torchvision import ops as tv

    gen = torch.Generator().manual_seed(args.seed)
    torch.save(dict(torch=str(torch.__version__), torchvision=str(torchvision.__version__), seed=args.seed,
                    nms=nms_cases(tv, gen), rpn=rpn_case(tv, gen), roi_align=roi_align_cases(tv, gen)),
               args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) with torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
