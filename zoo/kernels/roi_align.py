"""Triton ROIAlign: one kernel for single-level and fused multi-level (FPN) pooling.

Each program pools one ROI for a block of channels and a block of output bins, from NCHW or
channels-last (NHWC) maps as they are, into a result of the same layout unless the caller asks
for the other (an FC box head flattens NCHW rows, so a channels-last result would cost it a copy). With several
levels the program assigns the ROI's level itself (Detectron2's formula) and reads
that level's map, so the whole FPN pooler is one launch with output in box order.
Backward scatters into fp32 gradient buffers with atomic adds.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.launch import LAUNCH_LOCK
from zoo.ops import reference
from zoo.ops.reference import BoxesLike

MAX_LEVELS = 5
# triton.jit decides interpreted vs compiled at import time, so this is fixed too.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not _INTERPRET:  # libdevice's log2 matches torch's CUDA log2f; the interpreter lacks it
    from triton.language.extra import libdevice as _libdevice
else:
    _libdevice = None


@triton.jit
def _log2(x, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.log2(x)
    else:
        return _libdevice.log2(x)


@triton.jit
def _pick(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
    """Select the value of level `lvl` (also works for pointers)."""
    v = v0
    if NUM_LEVELS > 1:
        v = tl.where(lvl == 1, v1, v)
    if NUM_LEVELS > 2:
        v = tl.where(lvl == 2, v2, v)
    if NUM_LEVELS > 3:
        v = tl.where(lvl == 3, v3, v)
    if NUM_LEVELS > 4:
        v = tl.where(lvl == 4, v4, v)
    return v


@triton.jit
def _axis(start, p, bsz, i, g, size):
    """Sample coordinate -> (low, high, low weight, high weight), torchvision's rules."""
    v = start + p * bsz + tl.math.div_rn((i + 0.5) * bsz, g)
    valid = (v >= -1.0) & (v <= size)
    v = tl.where(v == v, v, 0.0)  # NaN -> 0 (weight is 0 anyway)
    v = tl.minimum(tl.maximum(v, 0.0), size * 1.0)
    lo = v.to(tl.int32)
    edge = lo >= size - 1
    lo = tl.where(edge, size - 1, lo)
    hi = tl.where(edge, lo, lo + 1)
    v = tl.where(edge, lo.to(tl.float32), v)
    l = v - lo.to(tl.float32)
    h = 1.0 - l
    m = valid.to(tl.float32)
    return lo, hi, h * m, l * m


@triton.jit
def _roi_setup(rois_ptr, k, s0, s1, s2, s3, s4, H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
               min_level, max_level, canon_size, canon_level, sr,
               OH: tl.constexpr, OW: tl.constexpr, ALIGNED: tl.constexpr,
               NUM_LEVELS: tl.constexpr, INTERPRET: tl.constexpr):
    """Level, batch index, geometry and sampling grid of ROI k."""
    r = rois_ptr + k * 5
    bi = tl.load(r).to(tl.int64)
    bx1 = tl.load(r + 1)
    by1 = tl.load(r + 2)
    bx2 = tl.load(r + 3)
    by2 = tl.load(r + 4)
    lvl = 0
    if NUM_LEVELS > 1:
        # Detectron2: floor(canonical_level + log2(sqrt(area) / canonical + 1e-8)).
        area = (bx2 - bx1) * (by2 - by1)
        ratio = tl.math.div_rn(tl.sqrt_rn(area), canon_size) + 1e-8
        lf = tl.math.floor(canon_level + _log2(ratio, INTERPRET))
        lf = tl.where(lf == lf, lf, min_level)  # negative area -> finest level
        lf = tl.minimum(tl.maximum(lf, min_level), max_level)
        lvl = (lf - min_level).to(tl.int32)
    scale = _pick(lvl, s0, s1, s2, s3, s4, NUM_LEVELS)
    H = _pick(lvl, H0, H1, H2, H3, H4, NUM_LEVELS)
    W = _pick(lvl, W0, W1, W2, W3, W4, NUM_LEVELS)
    if ALIGNED:  # ROIAlignV2: half-pixel shift
        x1 = bx1 * scale - 0.5
        y1 = by1 * scale - 0.5
        x2 = bx2 * scale - 0.5
        y2 = by2 * scale - 0.5
    else:
        x1 = bx1 * scale
        y1 = by1 * scale
        x2 = bx2 * scale
        y2 = by2 * scale
    rw = x2 - x1
    rh = y2 - y1
    if not ALIGNED:
        rw = tl.maximum(rw, 1.0)
        rh = tl.maximum(rh, 1.0)
    bh = tl.math.div_rn(rh, OH * 1.0)
    bw = tl.math.div_rn(rw, OW * 1.0)
    # Adaptive grid ceil(roi/bin); NaN / negative -> empty, cap keeps the cast defined.
    ch = tl.math.ceil(bh)
    cw = tl.math.ceil(bw)
    ch = tl.where(ch == ch, tl.minimum(tl.maximum(ch, 0.0), 1.0e6), 0.0)
    cw = tl.where(cw == cw, tl.minimum(tl.maximum(cw, 0.0), 1.0e6), 0.0)
    gh = tl.where(sr > 0, sr, ch.to(tl.int32))
    gw = tl.where(sr > 0, sr, cw.to(tl.int32))
    return lvl, bi, H, W, y1, x1, bh, bw, gh, gw


@triton.jit
def _tile(cb, bb, C, PH: tl.constexpr, PW: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_B: tl.constexpr, C_ALIGN: tl.constexpr):
    """This program's channels and output bins (of PH x PW: every STRIDE-th bin of the ROI's grid), their masks,
    and each bin's (row, col) in that grid."""
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if BLOCK_B >= PH * PW:  # the usual tile, all bins: no offset (it cost sm_90 stack space at 128 registers)
        offs_b = tl.arange(0, BLOCK_B)
    else:
        offs_b = bb * BLOCK_B + tl.arange(0, BLOCK_B)
    ph = ((offs_b // PW) * STRIDE).to(tl.float32)
    pw = ((offs_b % PW) * STRIDE).to(tl.float32)
    if C_ALIGN > 1:  # whole channel blocks (see _c_align): a mask Triton knows to be constant along channels
        cmask = tl.full([BLOCK_C], 1, tl.int1)
    else:
        cmask = offs_c < C
    return offs_c, offs_b, cmask, offs_b < PH * PW, ph, pw


@triton.jit
def _planes(base, bi, offs_c, C, H, W, CHANNELS_LAST: tl.constexpr, C_ALIGN: tl.constexpr):
    """Pointer to pixel (0, 0) of each channel of image `bi` ([BLOCK_C, 1]) and the stride between pixels.

    Channels-last maps put a pixel's channels side by side, so a warp's loads of one sample are one contiguous run.
    """
    if CHANNELS_LAST:
        chan = bi * H * W * C + offs_c.to(tl.int64)
        if C_ALIGN > 1:  # see _c_align
            chan = tl.multiple_of(chan, C_ALIGN)
        plane = base + chan[:, None]
        pix = C
    else:
        plane = base + (bi * C + offs_c.to(tl.int64))[:, None] * H * W
        pix = 1
    return plane, pix


@triton.jit
def _at(y, x, W, pix, C_ALIGN: tl.constexpr):
    """Offset of pixels (y, x) from `_planes`' pointers, as a [1, BLOCK_B] row (int32: H*W*C < 2**31 is checked)."""
    off = (y * W + x) * pix
    if C_ALIGN > 1:  # channels-last maps only (see _c_align): multiples of C
        off = tl.multiple_of(off, C_ALIGN)
    return off[None, :]


@triton.jit
def _pooled(base, k, C, offs_c, offs_b, PH: tl.constexpr, PW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
            C_ALIGN: tl.constexpr):
    """Pointers to ROI k's output bins for this program's channels ([BLOCK_C, BLOCK_B]) in a channels-last or
    NCHW result. Channels-last is what the convolutions after a C4 or mask pooler read, and from channels-last
    maps its stores run along the same channels as the loads."""
    if CHANNELS_LAST:
        chan = k.to(tl.int64) * (PH * PW) * C + offs_c.to(tl.int64)
        bins = offs_b * C
        if C_ALIGN > 1:
            chan = tl.multiple_of(chan, C_ALIGN)
            bins = tl.multiple_of(bins, C_ALIGN)
        ptr = base + chan[:, None] + bins[None, :]
    else:
        ptr = base + (k * C + offs_c.to(tl.int64))[:, None] * (PH * PW) + offs_b[None, :]
    return ptr


_NO_SPEC = ["C", "H0", "H1", "H2", "H3", "H4", "W0", "W1", "W2", "W3", "W4", "sr"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _roi_align_fwd_kernel(
        out_ptr, rois_ptr, C,
        f0, f1, f2, f3, f4,
        H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
        s0, s1, s2, s3, s4,
        min_level, max_level, canon_size, canon_level, sr,
        OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, STRIDE: tl.constexpr,
        ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, OUT_CHANNELS_LAST: tl.constexpr, C_ALIGN: tl.constexpr,
        INTERPRET: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    bb = tl.program_id(2)
    lvl, bi, H, W, y1, x1, bh, bw, gh, gw = _roi_setup(
        rois_ptr, k, s0, s1, s2, s3, s4, H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
        min_level, max_level, canon_size, canon_level, sr, OH, OW, ALIGNED, NUM_LEVELS,
        INTERPRET)
    feat = _pick(lvl, f0, f1, f2, f3, f4, NUM_LEVELS)
    offs_c, offs_b, cmask, bmask, ph, pw = _tile(cb, bb, C, PH, PW, STRIDE, BLOCK_C, BLOCK_B, C_ALIGN)
    plane, pix = _planes(feat, bi, offs_c, C, H, W, CHANNELS_LAST, C_ALIGN)
    acc = tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32)
    ghf = gh * 1.0
    gwf = gw * 1.0
    for iy in range(0, gh):
        ylo, yhi, wyl, wyh = _axis(y1, ph, bh, iy * 1.0, ghf, H)
        for ix in range(0, gw):
            xlo, xhi, wxl, wxh = _axis(x1, pw, bw, ix * 1.0, gwf, W)
            m = cmask[:, None] & (bmask & ((wyl + wyh) * (wxl + wxh) != 0.0))[None, :]
            v1 = tl.load(plane + _at(ylo, xlo, W, pix, C_ALIGN), mask=m, other=0.0).to(tl.float32)
            v2 = tl.load(plane + _at(ylo, xhi, W, pix, C_ALIGN), mask=m, other=0.0).to(tl.float32)
            v3 = tl.load(plane + _at(yhi, xlo, W, pix, C_ALIGN), mask=m, other=0.0).to(tl.float32)
            v4 = tl.load(plane + _at(yhi, xhi, W, pix, C_ALIGN), mask=m, other=0.0).to(tl.float32)
            acc += ((wyl * wxl)[None, :] * v1 + (wyl * wxh)[None, :] * v2
                    + (wyh * wxl)[None, :] * v3 + (wyh * wxh)[None, :] * v4)
    count = tl.maximum(gh * gw, 1) * 1.0
    res = tl.math.div_rn(acc, count + tl.zeros_like(acc))
    optr = _pooled(out_ptr, k, C, offs_c, offs_b, PH, PW, OUT_CHANNELS_LAST, C_ALIGN)
    tl.store(optr, res.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & bmask[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _roi_align_bwd_kernel(
        gout_ptr, rois_ptr, C,
        g0, g1, g2, g3, g4,
        H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
        s0, s1, s2, s3, s4,
        min_level, max_level, canon_size, canon_level, sr,
        OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, STRIDE: tl.constexpr,
        ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, OUT_CHANNELS_LAST: tl.constexpr, C_ALIGN: tl.constexpr,
        INTERPRET: tl.constexpr):
    k = tl.program_id(0)
    cb = tl.program_id(1)
    bb = tl.program_id(2)
    lvl, bi, H, W, y1, x1, bh, bw, gh, gw = _roi_setup(
        rois_ptr, k, s0, s1, s2, s3, s4, H0, H1, H2, H3, H4, W0, W1, W2, W3, W4,
        min_level, max_level, canon_size, canon_level, sr, OH, OW, ALIGNED, NUM_LEVELS,
        INTERPRET)
    grad = _pick(lvl, g0, g1, g2, g3, g4, NUM_LEVELS)
    offs_c, offs_b, cmask, bmask, ph, pw = _tile(cb, bb, C, PH, PW, STRIDE, BLOCK_C, BLOCK_B, C_ALIGN)
    gptr = _pooled(gout_ptr, k, C, offs_c, offs_b, PH, PW, OUT_CHANNELS_LAST, C_ALIGN)
    g = tl.load(gptr, mask=cmask[:, None] & bmask[None, :], other=0.0).to(tl.float32)
    count = tl.maximum(gh * gw, 1) * 1.0
    g = tl.math.div_rn(g, count + tl.zeros_like(g))
    plane, pix = _planes(grad, bi, offs_c, C, H, W, CHANNELS_LAST, C_ALIGN)
    ghf = gh * 1.0
    gwf = gw * 1.0
    for iy in range(0, gh):
        ylo, yhi, wyl, wyh = _axis(y1, ph, bh, iy * 1.0, ghf, H)
        for ix in range(0, gw):
            xlo, xhi, wxl, wxh = _axis(x1, pw, bw, ix * 1.0, gwf, W)
            m = cmask[:, None] & (bmask & ((wyl + wyh) * (wxl + wxh) != 0.0))[None, :]
            tl.atomic_add(plane + _at(ylo, xlo, W, pix, C_ALIGN), g * (wyl * wxl)[None, :], mask=m)
            tl.atomic_add(plane + _at(ylo, xhi, W, pix, C_ALIGN), g * (wyl * wxh)[None, :], mask=m)
            tl.atomic_add(plane + _at(yhi, xlo, W, pix, C_ALIGN), g * (wyh * wxl)[None, :], mask=m)
            tl.atomic_add(plane + _at(yhi, xhi, W, pix, C_ALIGN), g * (wyh * wxh)[None, :], mask=m)


class Tile(NamedTuple):
    """A program's share of one ROI: `channels` x `bins` outputs (powers of two) on `warps` warps."""
    channels: int
    bins: int
    warps: int


_TILE: ContextVar[Optional[Tile]] = ContextVar("zoo_roi_align_tile", default=None)


@contextlib.contextmanager
def forced_tile(channels: int, bins: int, warps: int) -> Iterator[None]:
    """Launch every ROIAlign inside the block with this tile (for scripts/bench_kernels.py's sweep).

    Any tile gives the same results bit for bit: each output sums its samples in the same order.
    """
    for v in (channels, bins, warps):
        if v < 1 or v & (v - 1):
            raise ValueError(f"tile sizes must be powers of two, got {(channels, bins, warps)}")
    token = _TILE.set(Tile(channels, bins, warps))
    try:
        yield
    finally:
        _TILE.reset(token)


_STAGE: ContextVar[bool] = ContextVar("zoo_roi_align_stage", default=False)


@contextlib.contextmanager
def forced_staging(enabled: bool = True) -> Iterator[None]:
    """Inside the block, NCHW maps are copied to channels-last first and pooled from the copy (one pass over the
    maps buys coalesced loads); the result keeps the layout it would have had. For bench_kernels' sweep: whether
    that pays depends on the tile, so it is off until a GPU's numbers say otherwise. Same results bit for bit."""
    token = _STAGE.set(bool(enabled))
    try:
        yield
    finally:
        _STAGE.reset(token)


def _blocks(C: int, oh: int, ow: int) -> Tile:
    """The tile: ~2K accumulators, ~8 per thread, all bins of a ROI in one program.

    Checked with cuobjdump for sm_90 (NCHW maps): 7x7 -> 32x64 tiles at 109 registers, 14x14 ->
    8x256 at 80, no spills (4K-element tiles hit 255 registers and spilled); channels-last maps with whole
    channel blocks (_c_align) take 64-72. bench_kernels --sweep times the alternatives.
    """
    forced = _TILE.get()
    if forced is not None:
        return forced
    bins = triton.next_power_of_2(oh * ow)
    block_c = max(1, min(triton.next_power_of_2(max(C, 1)), max(1, 2048 // bins)))
    warps = max(1, min(8, (block_c * bins) // 256))
    return Tile(block_c, bins, warps)


class _Args:
    """Per-level launch arguments padded to MAX_LEVELS."""

    def __init__(self, feats: Sequence[Tensor], scales: Sequence[float]):
        n = len(feats)
        self.num_levels = n
        pad = MAX_LEVELS - n
        self.H = [int(f.shape[2]) for f in feats] + [1] * pad
        self.W = [int(f.shape[3]) for f in feats] + [1] * pad
        self.s = [float(s) for s in scales] + [1.0] * pad


def _c_align(C: int, block_c: int) -> int:
    """Where the channel blocks are whole (C a multiple of the block, as the networks' 256 to 2048 channels are),
    what every channels-last offset in a program is a multiple of (elements, at most 16); else 1. Told to Triton (C
    itself stays unspecialised, see _NO_SPEC), with the channel mask dropped, it lets each thread load and store up
    to 16 bytes of channels at once: compiled for sm_90, the FPN pooler's inner loop on channels-last maps fell from
    ~480 instructions to ~190 and its registers from 128 to 64-72. Only for channels-last maps: NCHW loads gain
    nothing, and there it cost the 7x7 pooler a stack frame."""
    return min(16, block_c) if C % block_c == 0 else 1


def _launch(kernel, first: Tensor, rois: Tensor, C: int, ptrs: Sequence[Tensor], a: _Args,
            levels: tuple[float, float, float, float], oh: int, ow: int, stride: int, sr: int,
            aligned: bool, channels_last: bool, out_channels_last: bool) -> None:
    K = rois.shape[0]
    ph, pw = first.shape[2:]  # the pooled bins: `first` is the result (forward) or its gradient (backward)
    block_c, block_b, warps = _blocks(C, ph, pw)
    ptrs = list(ptrs) + [ptrs[0]] * (MAX_LEVELS - len(ptrs))
    grid = (K, triton.cdiv(C, block_c), triton.cdiv(ph * pw, block_b))
    with LAUNCH_LOCK:
        kernel[grid](first, rois, C, *ptrs, *a.H, *a.W, *a.s, *levels, max(int(sr), 0),
                     OH=oh, OW=ow, PH=ph, PW=pw, STRIDE=stride, ALIGNED=bool(aligned),
                     NUM_LEVELS=a.num_levels, BLOCK_C=block_c, BLOCK_B=block_b,
                     CHANNELS_LAST=channels_last, OUT_CHANNELS_LAST=out_channels_last,
                     C_ALIGN=_c_align(C, block_c) if channels_last else 1, INTERPRET=_INTERPRET,
                     num_warps=warps, enable_fp_fusion=False)


def _all_channels_last(feats: Sequence[Tensor]) -> bool:
    """Every map is channels-last (NHWC) in memory: the kernel then reads it as it is, where NCHW would need a copy
    of the whole pyramid each call. Maps that are both (one channel, or 1x1) count as NCHW; so do maps whose one
    image holds 2**31 values or more (the kernel's pixel offsets are int32)."""
    return all(f.is_contiguous(memory_format=torch.channels_last) for f in feats) and \
        not all(f.is_contiguous() for f in feats) and max(f[0].numel() for f in feats) < 2**31


class _RoiAlignFn(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton atomic-add backward."""

    @staticmethod
    def forward(ctx, rois: Tensor, oh: int, ow: int, stride: int, scales: tuple, sr: int, aligned: bool,
                levels: tuple, out_format: Optional[torch.memory_format], *feats: Tensor) -> Tensor:
        channels_last = _all_channels_last(feats)
        # by default the result takes the maps' layout, as PyTorch's own ops do
        out_cl = channels_last if out_format is None else out_format == torch.channels_last
        if not channels_last and _STAGE.get():
            feats = tuple(f.contiguous(memory_format=torch.channels_last) for f in feats)
            channels_last = _all_channels_last(feats)
        if not channels_last:
            feats = tuple(f.contiguous() for f in feats)
        C = feats[0].shape[1]
        a = _Args(feats, scales)
        ph, pw = reference._binned(oh, stride), reference._binned(ow, stride)
        out = torch.empty((rois.shape[0], C, ph, pw), dtype=feats[0].dtype, device=feats[0].device,
                          memory_format=torch.channels_last if out_cl else torch.contiguous_format)
        if rois.shape[0] > 0 and C > 0:
            _launch(_roi_align_fwd_kernel, out, rois, C, feats, a, levels, oh, ow, stride, sr, aligned,
                    channels_last, out_cl)
        ctx.save_for_backward(rois)
        ctx.cfg = (oh, ow, stride, scales, sr, aligned, levels)
        ctx.shapes = [(f.shape, f.dtype) for f in feats]
        return out

    @staticmethod
    def backward(ctx, gout: Tensor):
        (rois,) = ctx.saved_tensors
        oh, ow, stride, scales, sr, aligned, levels = ctx.cfg
        grads = [torch.zeros(shape, dtype=torch.float32, device=gout.device)
                 for shape, _ in ctx.shapes]
        C = grads[0].shape[1]
        if rois.shape[0] > 0 and C > 0:
            _launch(_roi_align_bwd_kernel, gout.contiguous(), rois, C, grads,
                    _Args(grads, scales), levels, oh, ow, stride, sr, aligned, False, False)
        grads = [g.to(dt) for g, (_, dt) in zip(grads, ctx.shapes)]
        return (None, None, None, None, None, None, None, None, None, *grads)


def _rois_f32(boxes: BoxesLike, device: torch.device) -> Tensor:
    return reference.boxes_to_rois(boxes, device).to(device=device,
                                                     dtype=torch.float32).contiguous()


def roi_align(input: Tensor, boxes: BoxesLike, output_size: Union[int, Sequence[int]],
              spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, bin_stride: int = 1,
              memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """Triton ROIAlign; same contract as zoo.ops.roi_align (coordinates in fp32)."""
    oh, ow = reference._pair(output_size)
    stride = reference.check_bin_stride(bin_stride)
    rois = _rois_f32(boxes, input.device)
    return _RoiAlignFn.apply(rois, oh, ow, stride, (float(spatial_scale),), int(sampling_ratio),
                             bool(aligned), (0.0, 0.0, 224.0, 4.0), memory_format, input)


def multilevel_roi_align(features: Sequence[Tensor], boxes: BoxesLike,
                         output_size: Union[int, Sequence[int]], scales: Sequence[float], sampling_ratio: int, aligned: bool = True,
                         canonical_box_size: float = 224.0,
                         canonical_level: int = 4, memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """Fused FPN ROIPooler: one launch, level picked per box inside the kernel."""
    if len(features) != len(scales):
        raise ValueError("features and scales must have the same length")
    if len(features) > MAX_LEVELS:
        raise ValueError(f"at most {MAX_LEVELS} pyramid levels are supported")
    f0 = features[0]
    for f in features[1:]:
        if f.dtype != f0.dtype or f.device != f0.device or f.shape[:2] != f0.shape[:2]:
            raise ValueError("pyramid levels must share dtype, device, batch and channels")
    oh, ow = reference._pair(output_size)
    rois = _rois_f32(boxes, f0.device)
    if len(features) == 1:
        levels = (0.0, 0.0, 224.0, 4.0)
    else:
        lo, hi = reference.level_range(scales)
        levels = (float(lo), float(hi), float(canonical_box_size), float(canonical_level))
    return _RoiAlignFn.apply(rois, oh, ow, 1, tuple(float(s) for s in scales),
                             int(sampling_ratio), bool(aligned), levels, memory_format, *features)
