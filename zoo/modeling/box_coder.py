"""Box2BoxTransform decoding, the Boxes helpers (clip, nonempty, area) Detectron2 uses at test time, and
the row gather of the fixed-shape path."""
from __future__ import annotations

import math

import torch

# Detectron2 caps dw/dh so exp() cannot blow up on wild predictions
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class Box2BoxTransform:
    """Decodes (dx, dy, dw, dh) deltas, divided by `weights`, relative to XYXY reference boxes."""

    def __init__(self, weights: tuple[float, float, float, float],
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """deltas [N, k*4], boxes [N, 4] -> decoded boxes [N, k*4]."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        if wx == wy and ww == wh:  # Detectron2's weights: x and y in one op each, 14 ops where 29 ran
            return self._apply_deltas_paired(deltas, boxes)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        x1 = pred_ctr_x - 0.5 * pred_w
        y1 = pred_ctr_y - 0.5 * pred_h
        x2 = pred_ctr_x + 0.5 * pred_w
        y2 = pred_ctr_y + 0.5 * pred_h
        return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)

    def _apply_deltas_paired(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """apply_deltas with (x, y) and (w, h) as pairs in the last dim: the same operations on the same values in
        the same order, so the same results, in half the ops (each a kernel launch on CUDA)."""
        n = deltas.shape[0]
        d = deltas.reshape(n, deltas.shape[1] // 4, 2, 2)  # [N, k, (dx dy | dw dh), 2]
        b = boxes.reshape(n, 1, 2, 2)  # [N, 1, (x1 y1 | x2 y2), 2]
        size = b[:, :, 1] - b[:, :, 0]  # (width, height)
        ctr = b[:, :, 0] + 0.5 * size
        shift = d[:, :, 0] / self.weights[0]
        scale = torch.clamp(d[:, :, 1] / self.weights[2], max=self.scale_clamp)
        pred_ctr = shift * size + ctr
        half = 0.5 * (torch.exp(scale) * size)
        return torch.stack((pred_ctr - half, pred_ctr + half), dim=2).reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """Clamp XYXY boxes (last dim 4) into [0, w] x [0, h]; returns a new tensor.

    (h, w) are numbers or tensors that broadcast against boxes[..., 0] (sizes kept on the device,
    e.g. inside a CUDA graph, or one per image of a batch); both give the same values.
    """
    h, w = image_size
    if isinstance(h, torch.Tensor):
        # the same two comparisons per coordinate in 3 ops, where 4 columns apart took 9 (the fixed-shape path runs
        # this 3 times an image, each op a kernel launch on CUDA)
        return torch.minimum(boxes.clamp(min=0), torch.stack((w, h, w, h), dim=-1))

    def clamp(v, hi):
        return v.clamp(min=0, max=hi)
    x1 = clamp(boxes[..., 0], w)
    y1 = clamp(boxes[..., 1], h)
    x2 = clamp(boxes[..., 2], w)
    y2 = clamp(boxes[..., 3], h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mask of boxes (last dim 4) whose width and height are both strictly greater than threshold."""
    return ((boxes[..., 2] - boxes[..., 0]) > threshold) & ((boxes[..., 3] - boxes[..., 1]) > threshold)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[g, idx[g]] along dim 1 where idx >= 0, zeros where idx is -1 (padding): x [G, n, ...], idx [G, k]."""
    flat = idx.clamp(min=0).view(*idx.shape, *([1] * (x.dim() - 2)))
    rows = x.gather(1, flat.expand(*idx.shape, *x.shape[2:]))
    ok = (idx >= 0).view(*idx.shape, *([1] * (x.dim() - 2)))
    return torch.where(ok, rows, 0)
