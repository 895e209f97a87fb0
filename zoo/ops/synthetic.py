"""Helpers for the ops benchmarks and GPU tests: RPN-like random boxes, the torchvision baseline pooler."""
from __future__ import annotations

import math

import torch


def random_proposals(n: int, seed: int, *, smin: float = 8.0, smax: float = 800.0, height: float = 800.0,
                     width: float = 1216.0, device: str | torch.device = "cpu") -> torch.Tensor:
    """[n,4] XYXY boxes with log-uniform sizes and random aspect ratios, clipped to the image."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.empty(n).uniform_(math.log(smin), math.log(smax), generator=g))
    ar = torch.exp(torch.empty(n).uniform_(-1.0, 1.0, generator=g))
    bw, bh = s * ar.sqrt(), s / ar.sqrt()
    cx, cy = torch.rand(n, generator=g) * width, torch.rand(n, generator=g) * height
    b = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    return b.to(device)


def clustered_proposals(n: int, seed: int, *, per: int = 8, jitter: float = 0.1, score_noise: float = 0.05,
                        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and scores shaped like an RPN's: clusters of `per` boxes jittered around random_proposals' (by `jitter`
    of their size), each cluster's scores close together, so a cluster's boxes sit near each other in score order
    and suppress in chains. 4700 of them at IoU 0.7 keep about half, as the networks' RPN NMS does, where
    random_proposals' scattered boxes keep 94%."""
    g = torch.Generator().manual_seed(seed)
    k = (n + per - 1) // per
    b = random_proposals(k, seed, smax=300.0).repeat_interleave(per, 0)[:n]
    size = (b[:, 2:] - b[:, :2]).repeat(1, 2)
    b = b + torch.randn(n, 4, generator=g) * jitter * size
    s = torch.rand(k, generator=g).repeat_interleave(per)[:n] + torch.rand(n, generator=g) * score_noise
    return b.to(device), s.to(device)


def torchvision_pooler(tv_ops, feats: list[torch.Tensor], rois: torch.Tensor, size: int, scales: list[float],
                       sampling_ratio: int) -> torch.Tensor:
    """Detectron2's ROIPooler built from torchvision's roi_align (module passed in): per-level calls + scatter."""
    from .reference import assign_levels

    lvl = assign_levels(rois, 2, 5)
    out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], size, size))
    for i, (f, s) in enumerate(zip(feats, scales)):
        idx = torch.nonzero(lvl == i).squeeze(1)
        out[idx] = tv_ops.roi_align(f, rois[idx], size, s, sampling_ratio, True)
    return out
