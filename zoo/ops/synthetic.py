"""RPN-like random boxes for benchmarks and GPU tests of the ops."""
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
