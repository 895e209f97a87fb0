"""DefaultAnchorGenerator: cell anchors centred at 0, shifted over each feature's stride grid."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def _broadcast(params: Sequence[Sequence[float]], n: int) -> list[list[float]]:
    # one list given for several levels means "the same on every level"
    if len(params) == 1:
        return [list(params[0])] * n
    if len(params) != n:
        raise ValueError(f"expected 1 or {n} anchor parameter lists, got {len(params)}")
    return [list(p) for p in params]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """[len(sizes)*len(ratios), 4] XYXY anchors around (0, 0); sizes outer, ratios inner."""
    out = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)  # computed in double, stored as float32


class AnchorGenerator(nn.Module):
    """Anchors for each feature level, ordered (y, x, cell anchor) like the RPN head's outputs."""

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int], offset: float) -> None:
        super().__init__()
        self.strides = list(strides)
        n = len(self.strides)
        cells = [cell_anchors(s, a) for s, a in zip(_broadcast(sizes, n), _broadcast(aspect_ratios, n))]
        for i, c in enumerate(cells):
            # not persistent: Detectron2's state_dict has no anchors
            self.register_buffer(f"cell_anchors_{i}", c, persistent=False)
        self.offset = float(offset)
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    @property
    def num_cell_anchors(self) -> list[int]:
        """Anchors per location, per level."""
        return [getattr(self, f"cell_anchors_{i}").shape[0] for i in range(len(self.strides))]

    def grid_anchors(self, grid_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """[Hi*Wi*A, 4] anchors per level for the given feature sizes (cached per size and device)."""
        device = self.cell_anchors_0.device
        key = (tuple(tuple(int(v) for v in g) for g in grid_sizes), str(device), torch.is_inference_mode_enabled())
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = []
        for i, ((gh, gw), stride) in enumerate(zip(grid_sizes, self.strides)):
            base = getattr(self, f"cell_anchors_{i}")
            sx = torch.arange(self.offset * stride, gw * stride, step=stride, dtype=torch.float32, device=device)
            sy = torch.arange(self.offset * stride, gh * stride, step=stride, dtype=torch.float32, device=device)
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = out
        return out

    def cached_tensors(self) -> list[torch.Tensor]:
        """The grid anchors held now (see GeneralizedRCNN.tensors_in_caches)."""
        return [t for level in self._cache.values() for t in level]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors for each feature map."""
        return self.grid_anchors([tuple(f.shape[-2:]) for f in features])

    def _apply(self, fn, recurse: bool = True):
        self._cache = {}
        return super()._apply(fn, recurse)
