"""Triton mask pasting: every instance's probabilities sampled into the (zeroed) full image in one launch.

PyTorch's path builds an [N, H, W, 2] float grid for grid_sample (600 MB for 100 masks on a
938x800 image); this kernel computes each pixel's bilinear sample directly and writes only the
[N, H, W] bool result. The arithmetic follows the zoo.ops torch path: grid coordinates as
(x + 0.5 - x0) / (x1 - x0) * 2 - 1, then grid_sample's unnormalisation (align_corners=False),
bilinear weights and zero padding in the order of PyTorch's CUDA grid sampler (with explicit
fused multiply-adds where its compiled code is expected to contract; the GPU test measures how
many pixels differ), and Detectron2's CPU rule that only a box's region widened by one pixel is
pasted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.launch import LAUNCH_LOCK

_BLOCK_H = 16
_BLOCK_W = 64


@triton.jit
def _paste_kernel(masks_ptr, boxes_ptr, out_ptr, H, W, thr, M: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n = tl.program_id(0)
    ty = tl.program_id(1) * BLOCK_H
    tx = tl.program_id(2) * BLOCK_W
    ys = ty + tl.arange(0, BLOCK_H)
    xs = tx + tl.arange(0, BLOCK_W)
    bx0 = tl.load(boxes_ptr + n * 4 + 0)
    by0 = tl.load(boxes_ptr + n * 4 + 1)
    bx1 = tl.load(boxes_ptr + n * 4 + 2)
    by1 = tl.load(boxes_ptr + n * 4 + 3)
    offs = n.to(tl.int64) * H * W + ys[:, None].to(tl.int64) * W + xs[None, :]
    inside = (ys[:, None] < H) & (xs[None, :] < W)
    # the pasted region: lo <= x < hi with lo = floor(x0) - 1, hi = ceil(x1) + 1 (rows alike), inside the image
    lo_x, hi_x = tl.floor(bx0) - 1.0, tl.ceil(bx1) + 1.0
    lo_y, hi_y = tl.floor(by0) - 1.0, tl.ceil(by1) + 1.0
    # Most tiles lie outside the box's region (a box covers a small part of the image): the output comes zeroed
    # (one memset at full bandwidth, where this kernel's stores are a byte each unless W is a multiple of 16), so
    # they store nothing. A tile is in when its last row/column reaches lo and its first is below hi.
    hit = (((ty + BLOCK_H - 1).to(tl.float32) >= lo_y) & (ty.to(tl.float32) < hi_y)
           & ((tx + BLOCK_W - 1).to(tl.float32) >= lo_x) & (tx.to(tl.float32) < hi_x))
    if hit:
        _paste_tile(masks_ptr, out_ptr, n, ys, xs, bx0, by0, bx1, by1, lo_x, hi_x, lo_y, hi_y, offs, inside,
                    H, W, thr, M)


@triton.jit
def _paste_tile(masks_ptr, out_ptr, n, ys, xs, bx0, by0, bx1, by1, lo_x, hi_x, lo_y, hi_y, offs, inside,
                H, W, thr, M: tl.constexpr):
    yf = ys.to(tl.float32)
    xf = xs.to(tl.float32)
    row_in = (yf >= lo_y) & (yf < hi_y) & (ys < H)
    col_in = (xf >= lo_x) & (xf < hi_x) & (xs < W)
    # IEEE divisions, as PyTorch's kernels (Triton's default fp32 division is approximate)
    gy = tl.math.div_rn((yf + 0.5) - by0, by1 - by0) * 2.0 - 1.0
    gx = tl.math.div_rn((xf + 0.5) - bx0, bx1 - bx0) * 2.0 - 1.0
    iy = tl.math.div_rn(tl.fma(gy + 1.0, M * 1.0, -1.0), 2.0)
    ix = tl.math.div_rn(tl.fma(gx + 1.0, M * 1.0, -1.0), 2.0)
    y0f = tl.floor(iy)
    x0f = tl.floor(ix)
    # NaN/huge coordinates fail these comparisons, so their taps are never loaded
    y0ok = (y0f >= 0.0) & (y0f < M)
    y1ok = (y0f >= -1.0) & (y0f < M - 1.0)
    x0ok = (x0f >= 0.0) & (x0f < M)
    x1ok = (x0f >= -1.0) & (x0f < M - 1.0)
    y0 = tl.where(y0f == y0f, tl.minimum(tl.maximum(y0f, -1.0), M * 1.0), 0.0).to(tl.int32)
    x0 = tl.where(x0f == x0f, tl.minimum(tl.maximum(x0f, -1.0), M * 1.0), 0.0).to(tl.int32)
    wy1 = iy - y0f
    wy0 = (y0f + 1.0) - iy
    wx1 = ix - x0f
    wx0 = (x0f + 1.0) - ix
    base = masks_ptr + n * (M * M)
    r0 = y0[:, None] * M
    r1 = r0 + M
    c0 = x0[None, :]
    c1 = c0 + 1
    live = row_in[:, None] & col_in[None, :]
    v00 = tl.load(base + r0 + c0, mask=live & y0ok[:, None] & x0ok[None, :], other=0.0)
    v01 = tl.load(base + r0 + c1, mask=live & y0ok[:, None] & x1ok[None, :], other=0.0)
    v10 = tl.load(base + r1 + c0, mask=live & y1ok[:, None] & x0ok[None, :], other=0.0)
    v11 = tl.load(base + r1 + c1, mask=live & y1ok[:, None] & x1ok[None, :], other=0.0)
    # PyTorch's accumulation order: nw, ne, sw, se
    acc = v00 * (wx0[None, :] * wy0[:, None])
    acc = tl.fma(v01, wx1[None, :] * wy0[:, None], acc)
    acc = tl.fma(v10, wx0[None, :] * wy1[:, None], acc)
    acc = tl.fma(v11, wx1[None, :] * wy1[:, None], acc)
    keep = live & (acc >= thr)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=inside)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int],
                threshold: float = 0.5) -> Tensor:
    """[N, M, M] probabilities and [N, 4] boxes -> bool [N, H, W]; see zoo.ops.paste_masks."""
    n = masks.shape[0]
    h, w = int(image_size[0]), int(image_size[1])
    out = torch.zeros((n, h, w), dtype=torch.uint8, device=masks.device)
    if n == 0 or h == 0 or w == 0:
        return out.view(torch.bool)
    if masks.dim() != 3 or masks.shape[1] != masks.shape[2] or boxes.shape != (n, 4):
        raise ValueError(f"paste_masks expects masks [N,M,M] and boxes [N,4], got "
                         f"{tuple(masks.shape)} and {tuple(boxes.shape)}")
    grid = (n, triton.cdiv(h, _BLOCK_H), triton.cdiv(w, _BLOCK_W))
    masks, boxes = masks.float().contiguous(), boxes.float().contiguous()
    with LAUNCH_LOCK:
        _paste_kernel[grid](masks, boxes, out, h, w, float(threshold), M=masks.shape[1], BLOCK_H=_BLOCK_H,
                            BLOCK_W=_BLOCK_W, num_warps=4, enable_fp_fusion=False)
    return out.view(torch.bool)
