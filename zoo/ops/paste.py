"""Mask pasting (Detectron2's `paste_masks_in_image`) in PyTorch: grid_sample, half-pixel aligned."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# bytes of float grid (plus samples) per chunk when batched; bounds memory while keeping kernels large
_GPU_CHUNK_BYTES = 1 << 28


def _paste_region(masks: torch.Tensor, boxes: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """Sample masks [N, 1, M, M] at the pixel centres of rows y0:y1, cols x0:x1 -> [N, h, w]."""
    n = masks.shape[0]
    bx0, by0, bx1, by1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5
    img_y = (img_y - by0) / (by1 - by0) * 2 - 1
    img_x = (img_x - bx0) / (bx1 - bx0) * 2 - 1
    gx = img_x[:, None, :].expand(n, img_y.shape[1], img_x.shape[1])
    gy = img_y[:, :, None].expand(n, img_y.shape[1], img_x.shape[1])
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks, grid, align_corners=False)[:, 0]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                threshold: float = 0.5, batched: bool | None = None) -> torch.Tensor:
    """Paste [N, M, M] probabilities into boxes of an (H, W) image -> bool [N, H, W] (value >= threshold).

    `batched` (default: on GPU) samples whole images per chunk instead of one box region at a time;
    both give the same pixels.
    """
    n = masks.shape[0]
    h, w = int(image_size[0]), int(image_size[1])
    out = torch.zeros((n, h, w), dtype=torch.bool, device=masks.device)
    if n == 0:
        return out
    masks = masks.float()[:, None]
    boxes = boxes.float()
    # Detectron2 on CPU samples only a box's bounding region widened by one pixel; on GPU it samples the
    # whole image. We keep the CPU semantics everywhere so results do not depend on the device.
    lo = (boxes[:, :2].floor() - 1).clamp(min=0).to(torch.int64)
    hi_x = (boxes[:, 2].ceil() + 1).clamp(max=w).to(torch.int64)
    hi_y = (boxes[:, 3].ceil() + 1).clamp(max=h).to(torch.int64)
    if batched is None:
        batched = masks.device.type != "cpu"
    if not batched:
        lo_l, hx_l, hy_l = lo.tolist(), hi_x.tolist(), hi_y.tolist()
        for i in range(n):
            (x0, y0), x1, y1 = lo_l[i], hx_l[i], hy_l[i]
            if x1 <= x0 or y1 <= y0:
                continue
            m = _paste_region(masks[i:i + 1], boxes[i:i + 1], y0, y1, x0, x1)
            out[i, y0:y1, x0:x1] = m[0] >= threshold
        return out
    per = max(1, _GPU_CHUNK_BYTES // (h * w * 4 * 3))
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    for s in range(0, n, per):
        sl = slice(s, s + per)
        m = _paste_region(masks[sl], boxes[sl], 0, h, 0, w) >= threshold
        in_y = (ys[None, :] >= lo[sl, 1:2]) & (ys[None, :] < hi_y[sl, None])
        in_x = (xs[None, :] >= lo[sl, 0:1]) & (xs[None, :] < hi_x[sl, None])
        out[sl] = m & in_y[:, :, None] & in_x[:, None, :]
    return out
