"""Triton convolution epilogue: relu((y + bias) + residual) in one pass over a convolution's output, in place.
A projection shortcut's bias can ride along: relu((y + bias) + (shortcut + shortcut_bias)).

PyTorch runs a cuDNN convolution's bias as a separate add_ (cuDNN does not take it), then the residual add and the
relu as two more kernels: three passes over the output where one does. The arithmetic is the same: fp32 adds in the
same order, and for half outputs each step rounded back to the output dtype as PyTorch's half ops round, so the
result is bit-identical to those three ops (the GPU test checks it).

The output is viewed as a row-major [R, S] matrix: channels-last maps as [N*H*W, C] (bias per column), NCHW maps
as [N*C, H*W] (bias per row, row % C). The residual has the output's shape and strides, or (channels-last only) is
the top-down map of an FPN, half the output's height and width, read at (h // 2, w // 2): nearest-neighbour
upsampling by 2, as F.interpolate(scale_factor=2.0) does, without writing the upsampled copy.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.launch import LAUNCH_LOCK

# A program's tile: 64 rows x 64 columns (16 KB of fp32), whatever the map's size, so that one compiled kernel per
# dtype and mode serves every layer and image size (the sizes are not specialised on either, except S's
# divisibility by 16, which gives 16-byte accesses): a first call compiles a handful, not one per shape
BLOCK = 64

# residual modes
NONE, SAME, UPSAMPLED = 0, 1, 2


@triton.jit
def _half_rounded(v, dtype: tl.constexpr):
    """fp32 `v` rounded to the half dtype (to nearest, ties to even) and back. bf16 by its bits: Triton's
    interpreter truncates fp32 -> bf16 casts, where the GPU's cast and PyTorch round."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(v == v, bits.to(tl.float32, bitcast=True), v)  # NaN kept (its low bits could carry)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _per_channel(ptr, rows, cols, row_ok, col_ok, C, ON_ROWS: tl.constexpr):
    """A per-channel vector in fp32, broadcast over the [R, S] tile: channels are rows % C or the columns."""
    if ON_ROWS:  # one return: compiled Triton checks both branches' types, which differ in shape
        v = tl.load(ptr + rows % C, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        v = tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return v


@triton.jit(do_not_specialize=["R", "C", "H", "W"])
def _epilogue_kernel(y_ptr, b_ptr, r_ptr, rb_ptr, R, S, C, H, W,
                     HAS_BIAS: tl.constexpr, BIAS_ON_ROWS: tl.constexpr, RESIDUAL: tl.constexpr,
                     RESIDUAL_BIAS: tl.constexpr, RELU: tl.constexpr, ROUND: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    # a 1-d grid of tiles (CUDA caps a grid's other axes at 65535), row-major over the [R, S] matrix
    col_tiles = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0)
    rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % col_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < R
    col_ok = cols < S
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * S + cols[None, :]
    y = tl.load(y_ptr + offs, mask=mask)
    v = y.to(tl.float32)
    if HAS_BIAS:
        v = v + _per_channel(b_ptr, rows, cols, row_ok, col_ok, C, BIAS_ON_ROWS)
        if ROUND:  # PyTorch's half add_ rounds its result to the tensor's dtype
            v = _half_rounded(v, y.dtype)
    if RESIDUAL == 1:
        r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
        if RESIDUAL_BIAS:  # a projection shortcut's own bias, added to it first as PyTorch's add_ would
            r = r + _per_channel(rb_ptr, rows, cols, row_ok, col_ok, C, BIAS_ON_ROWS)
            if ROUND:
                r = _half_rounded(r, y.dtype)
        v = v + r
        if ROUND:
            v = _half_rounded(v, y.dtype)
    if RESIDUAL == 2:  # channels-last rows are pixels (n, h, w); the residual is [N, H // 2, W // 2, C]
        w = rows % W
        t = rows // W
        h = t % H
        n = t // H
        src = (n.to(tl.int64) * (H // 2) + h // 2) * (W // 2) + w // 2
        v = v + tl.load(r_ptr + src[:, None] * S + cols[None, :], mask=mask).to(tl.float32)
        if ROUND:
            v = _half_rounded(v, y.dtype)
    if RELU:  # relu as PyTorch's clamp_min(v, 0): NaN stays NaN, and so does -0.0 (on CPU; GPU test: values)
        v = tl.where(v < 0.0, 0.0, v)
    tl.store(y_ptr + offs, v.to(y.dtype), mask=mask)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _per_channel_ok(bias: Optional[Tensor], y: Tensor) -> bool:
    return bias is None or (bias.dtype in _DTYPES and bias.shape == (y.shape[1],) and bias.device == y.device)


def supports(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], upsampled: bool,
             residual_bias: Optional[Tensor] = None) -> bool:
    """Whether the kernel can run this epilogue: a 4-d fp32 or half output dense in NCHW or channels-last order,
    biases of one value per channel, the residual in the output's dtype and layout (a residual bias only with a
    residual of the output's shape)."""
    if y.dim() != 4 or y.dtype not in _DTYPES:
        return False
    if not (_per_channel_ok(bias, y) and _per_channel_ok(residual_bias, y)):
        return False
    if residual_bias is not None and (residual is None or upsampled):
        return False
    layouts = (torch.channels_last,) if upsampled else (torch.channels_last, torch.contiguous_format)
    fmt = next((f for f in layouts if y.is_contiguous(memory_format=f)), None)
    if fmt is None or residual is None:
        return fmt is not None
    if residual.dtype != y.dtype or residual.device != y.device:
        return False
    n, c, h, w = y.shape
    want = (n, c, h // 2, w // 2) if upsampled else tuple(y.shape)
    if tuple(residual.shape) != want or (upsampled and (h % 2 or w % 2)):
        return False
    if not residual.is_contiguous(memory_format=fmt):
        return False
    # both orders hold for maps with one channel or one pixel: then the strides must agree as well
    return upsampled or residual.stride() == y.stride()


def conv_epilogue(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None, relu: bool = True,
                  upsampled: bool = False, residual_bias: Optional[Tensor] = None) -> Tensor:
    """y <- relu((y + bias) + (residual + residual_bias)) in place (see the module docstring); returns y. Call
    supports() first."""
    n, c, h, w = y.shape
    if y.numel() == 0:
        return y
    channels_last = not y.is_contiguous() or upsampled
    r, s = (n * h * w, c) if channels_last else (n * c, h * w)
    # biases are read in their own dtype: PyTorch's add_ of a float bias to a half map does too
    bias = None if bias is None else bias.contiguous()
    residual_bias = None if residual_bias is None else residual_bias.contiguous()
    grid = (triton.cdiv(r, BLOCK) * triton.cdiv(s, BLOCK),)
    mode = NONE if residual is None else (UPSAMPLED if upsampled else SAME)
    with LAUNCH_LOCK:
        _epilogue_kernel[grid](y, y if bias is None else bias, y if residual is None else residual,
                               y if residual_bias is None else residual_bias,
                               r, s, c, h, w, HAS_BIAS=bias is not None, BIAS_ON_ROWS=not channels_last,
                               RESIDUAL=mode, RESIDUAL_BIAS=residual_bias is not None, RELU=bool(relu),
                               ROUND=y.dtype != torch.float32, BLOCK_R=BLOCK, BLOCK_S=BLOCK, num_warps=4,
                               enable_fp_fusion=False)
    return y
