"""Pure-torch reference implementations of ROIAlign, the FPN ROI pooler and NMS.

Semantics follow torchvision's CPU kernels (which Detectron2 calls); the code is
vectorised over boxes and runs on any device torch supports.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

BoxesLike = Union[Tensor, Sequence[Tensor]]

# Elements (samples x channels) gathered per chunk; bounds peak memory of roi_align.
_CHUNK_ELEMS = 1 << 22
# Block of sorted boxes the greedy NMS scan handles at once.
_NMS_BLOCK = 256


def _pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    oh, ow = size
    return int(oh), int(ow)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def boxes_to_rois(boxes: BoxesLike, device: torch.device | None = None) -> Tensor:
    """Convert a [K,5] tensor or a list of per-image [Ki,4] tensors to [K,5] rois."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes tensor must be [K,5], got {tuple(boxes.shape)}")
        return boxes
    boxes = list(boxes)
    parts = []
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"per-image boxes must be [Ki,4], got {tuple(b.shape)}")
        parts.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1))
    if not parts:
        return torch.zeros((0, 5), device=device)
    return torch.cat(parts, dim=0)


def _roi_geometry(rois: Tensor, spatial_scale: float, oh: int, ow: int,
                  sampling_ratio: int, aligned: bool):
    """Per-ROI start, bin size and sampling grid (torchvision's formulas)."""
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    rw = x2 - x1
    rh = y2 - y1
    if not aligned:  # legacy mode forces a minimum roi size of 1
        rw = rw.clamp(min=1.0)
        rh = rh.clamp(min=1.0)
    bh = rh / oh
    bw = rw / ow
    if sampling_ratio > 0:
        gh = torch.full_like(rh, sampling_ratio, dtype=torch.long)
        gw = gh.clone()
    else:
        # ceil(roi/bin); negative sizes (aligned, x2<x1) give an empty grid.
        gh = torch.nan_to_num(torch.ceil(rh / oh), nan=0.0, posinf=0.0, neginf=0.0)
        gw = torch.nan_to_num(torch.ceil(rw / ow), nan=0.0, posinf=0.0, neginf=0.0)
        gh = gh.clamp(min=0).long()
        gw = gw.clamp(min=0).long()
    return y1, x1, bh, bw, gh, gw


def _binned(n: int, stride: int) -> int:
    """How many of n bins a bin stride computes (bins 0, stride, 2 * stride, ...)."""
    return -(-n // stride)


def _axis_taps(start: Tensor, bsz: Tensor, g: Union[int, Tensor], i0: int, i1: int,
               n_out: int, size: int, stride: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for samples i0..i1-1 of a grid of g per bin, for bins 0, stride, ... of n_out.

    Returns low/high pixel indices and their weights, shape [K, _binned(n_out, stride), i1-i0];
    samples outside [-1, size] get zero weight, as in torchvision.
    """
    dt = start.dtype
    p = torch.arange(0, n_out, stride, device=start.device, dtype=dt)
    i = torch.arange(i0, i1, device=start.device, dtype=dt)
    v = (start[:, None, None] + p[None, :, None] * bsz[:, None, None]
         + (i[None, None, :] + 0.5) * bsz[:, None, None] / g)
    valid = (v >= -1.0) & (v <= size)
    v = torch.nan_to_num(v, nan=0.0).clamp(0.0, float(size))
    lo = v.long()
    edge = lo >= size - 1
    lo = torch.where(edge, torch.full_like(lo, size - 1), lo)
    hi = torch.where(edge, lo, lo + 1)
    v = torch.where(edge, lo.to(dt), v)
    l = v - lo.to(dt)
    h = 1.0 - l
    m = valid.to(dt)
    return lo, hi, h * m, l * m


class _Scratch:
    """Reusable flat buffers for no-grad calls: fresh large allocations page-fault."""

    def __init__(self, like: Tensor, enabled: bool):
        self.like = like
        self.enabled = enabled
        self.bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor | None:
        """A view of buffer `name` with `shape`, or None when disabled."""
        if not self.enabled:
            return None
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.like.new_empty((n,))
            self.bufs[name] = buf
        return buf[:n].view(shape)

    def index_select(self, name: str, src: Tensor, idx: Tensor) -> Tensor:
        out = self.get(name, (idx.numel(), src.shape[1]))
        return src.index_select(0, idx) if out is None else torch.index_select(src, 0, idx, out=out)

    def bmm(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        out = self.get(name, (a.shape[0], a.shape[1], b.shape[2]))
        return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)


def _roi_align_group(flat: Tensor, rois: Tensor, H: int, W: int, spatial_scale: float,
                     oh: int, ow: int, gh: int, gw: int, aligned: bool,
                     scratch: _Scratch, stride: int = 1) -> Tensor:
    """ROIAlign [K, nh, nw, C] (the bins of oh x ow a bin stride keeps) for ROIs sharing one grid (gh, gw);
    flat is [N*H*W, C]."""
    K = rois.shape[0]
    C = flat.shape[1]
    nh, nw = _binned(oh, stride), _binned(ow, stride)
    if gh == 0 or gw == 0:
        return flat.new_zeros((K, nh, nw, C))
    y1, x1, bh, bw, _, _ = _roi_geometry(rois, spatial_scale, oh, ow, 1, aligned)
    base = rois[:, 0].long() * (H * W)
    xlo, xhi, wxl, wxh = _axis_taps(x1, bw, gw, 0, gw, ow, W, stride)
    X = torch.stack([xlo, xhi], -1).reshape(K, 1, nw, 1, 2 * gw)
    WX = torch.stack([wxl, wxh], -1).reshape(K, 1, nw, 1, 2 * gw)
    # Chunk over sample rows so one huge ROI cannot exhaust memory.
    per_row = nh * nw * 2 * (2 * gw) * C
    rows = max(1, min(gh, _CHUNK_ELEMS // max(per_row, 1)))
    acc = None
    for i0 in range(0, gh, rows):
        i1 = min(gh, i0 + rows)
        ylo, yhi, wyl, wyh = _axis_taps(y1, bh, gh, i0, i1, oh, H, stride)
        n = i1 - i0
        Y = torch.stack([ylo, yhi], -1).reshape(K, nh, 1, 2 * n, 1)
        WY = torch.stack([wyl, wyh], -1).reshape(K, nh, 1, 2 * n, 1)
        idx = (base[:, None, None, None, None] + Y * W + X).reshape(-1)
        # Fold the 1/count average into the weights.
        wt = (WY * WX).reshape(K * nh * nw, 1, 4 * n * gw) / float(gh * gw)
        vals = scratch.index_select("vals", flat, idx).view(K * nh * nw, 4 * n * gw, C)
        part = torch.bmm(wt, vals)
        acc = part if acc is None else acc + part
    return acc.view(K, nh, nw, C)


def _interp_matrix(start: Tensor, bsz: Tensor, g: Tensor, n_out: int, size: int, stride: int = 1) -> Tensor:
    """Dense [K, _binned(n_out, stride), size] matrix averaging one axis' bilinear taps over each kept bin.

    ROIAlign is separable: out = AY @ F @ AX^T with AY/AX from this function, since
    both the bilinear weights and the in-range test factor per axis.
    """
    K = start.shape[0]
    dt = start.dtype
    n = _binned(n_out, stride)
    mat = torch.zeros(K, n, size, dtype=dt, device=start.device)
    gmax = int(g.max()) if K else 0
    inv_g = 1.0 / g.clamp(min=1).to(dt)
    step = max(1, _CHUNK_ELEMS // max(K * n * 2, 1))
    for i0 in range(0, gmax, step):
        i1 = min(gmax, i0 + step)
        lo, hi, wl, wh = _axis_taps(start, bsz, g.clamp(min=1).to(dt)[:, None, None],
                                    i0, i1, n_out, size, stride)
        on = (torch.arange(i0, i1, device=start.device)[None, None, :] < g[:, None, None])
        scale = on.to(dt) * inv_g[:, None, None]
        mat.scatter_add_(2, lo.reshape(K, n, -1), (wl * scale).reshape(K, n, -1))
        mat.scatter_add_(2, hi.reshape(K, n, -1), (wh * scale).reshape(K, n, -1))
    return mat


def _nonzero_span(mat: Tensor) -> tuple[Tensor, Tensor]:
    """First index and length of the nonzero column span of each [n_out, size] matrix."""
    nz = (mat != 0).any(1)
    size = nz.shape[1]
    first = nz.to(torch.uint8).argmax(1)
    last = size - 1 - nz.flip(1).to(torch.uint8).argmax(1)
    length = torch.where(nz.any(1), last - first + 1, torch.zeros_like(first))
    return first, length


def _roi_align_window(feat: Tensor, rois: Tensor, spatial_scale: float, oh: int, ow: int,
                      sampling_ratio: int, aligned: bool, scratch: _Scratch, stride: int = 1) -> Tensor:
    """ROIAlign as AY @ window @ AX^T per ROI: one read per window pixel, then matmuls."""
    N, C, H, W = feat.shape
    K = rois.shape[0]
    dev = feat.device
    y1, x1, bh, bw, gh, gw = _roi_geometry(rois, spatial_scale, oh, ow, sampling_ratio, aligned)
    ay = _interp_matrix(y1, bh, gh, oh, H, stride)  # [K, nh, H]
    ax = _interp_matrix(x1, bw, gw, ow, W, stride)  # [K, nw, W]
    oh, ow = ay.shape[1], ax.shape[1]  # from here on: the bins computed
    ys, yl = _nonzero_span(ay)
    xs, xl = _nonzero_span(ax)
    flat = feat.permute(0, 2, 3, 1).reshape(N * H * W, C)
    base = rois[:, 0].long() * (H * W)
    # Batch ROIs of similar window size; each batch pads to its largest window.
    order = torch.sort(torch.maximum(yl, xl) * (W + 1) + torch.minimum(yl, xl), stable=True).indices
    yl_s, xl_s = yl[order].tolist(), xl[order].tolist()
    out = feat.new_empty((K, C, oh, ow))  # every row is written below
    s = 0
    while s < K:
        e = s
        rmax = wmax = 0
        while e < K:  # grow the batch while the padded size stays within budget
            r, w = max(rmax, yl_s[e]), max(wmax, xl_s[e])
            if e > s and (e - s + 1) * max(r * w * C, oh * w * C) > _CHUNK_ELEMS:
                break
            rmax, wmax, e = r, w, e + 1
        idx = order[s:e]
        s = e
        k = idx.numel()
        if rmax == 0 or wmax == 0:  # nothing sampled inside the map
            out.index_fill_(0, idx, 0.0)
            continue
        y0 = torch.minimum(ys[idx], torch.full_like(ys[idx], H - rmax))
        x0 = torch.minimum(xs[idx], torch.full_like(xs[idx], W - wmax))
        ry = y0[:, None] + torch.arange(rmax, device=dev)
        rx = x0[:, None] + torch.arange(wmax, device=dev)
        pix = base[idx, None, None] + ry[:, :, None] * W + rx[:, None, :]
        win = scratch.index_select("win", flat, pix.reshape(-1)).view(k, rmax, wmax * C)
        ayw = ay[idx].gather(2, ry[:, None, :].expand(k, oh, rmax))
        axw = ax[idx].gather(2, rx[:, None, :].expand(k, ow, wmax))
        t = scratch.bmm("t", ayw, win).view(k * oh, wmax, C)
        res = torch.bmm(axw.repeat_interleave(oh, 0), t)  # [k*oh, ow, C]
        # .to: under autocast bmm returns bf16/fp16 while out is fp32
        out.index_copy_(0, idx, res.view(k, oh, ow, C).permute(0, 3, 1, 2).to(out.dtype))
    return out


def _roi_align_gather(feat: Tensor, rois: Tensor, spatial_scale: float, oh: int, ow: int,
                      gh: Tensor, gw: Tensor, aligned: bool, scratch: _Scratch, stride: int = 1) -> Tensor:
    """ROIAlign by gathering every bilinear tap; best when bins hold few samples."""
    N, C, H, W = feat.shape
    K = rois.shape[0]
    flat = feat.permute(0, 2, 3, 1).reshape(N * H * W, C)
    # Group ROIs by their sampling grid so no sample is padded or masked away.
    key = gh * (int(gw.max()) + 1) + gw
    key_sorted, order = torch.sort(key, stable=True)
    _, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    gh_s = gh[order].tolist()
    gw_s = gw[order].tolist()
    nh, nw = _binned(oh, stride), _binned(ow, stride)
    out = feat.new_zeros((K, C, nh, nw))
    start = 0
    for cnt in counts.tolist():
        g_h, g_w = gh_s[start], gw_s[start]
        if g_h > 0 and g_w > 0:
            step = max(1, _CHUNK_ELEMS // (nh * nw * 4 * g_h * g_w * C))
            for s in range(start, start + cnt, step):
                idx = order[s:min(s + step, start + cnt)]
                res = _roi_align_group(flat, rois[idx], H, W, spatial_scale, oh, ow,
                                       g_h, g_w, aligned, scratch, stride)
                out.index_copy_(0, idx, res.permute(0, 3, 1, 2).to(out.dtype))
        start += cnt
    return out


# A gathered element costs about this many matmul flops on CPU (memory-bound).
_GATHER_VS_FLOP = 16.0


def _pick_method(rois: Tensor, spatial_scale: float, oh: int, ow: int, gh: Tensor,
                 gw: Tensor, H: int, W: int) -> str:
    """Estimate both methods' cost from ROI sizes; windows win unless bins are sparse."""
    rw = ((rois[:, 3] - rois[:, 1]) * spatial_scale).abs().nan_to_num(0.0).clamp(max=W) + 2
    rh = ((rois[:, 4] - rois[:, 2]) * spatial_scale).abs().nan_to_num(0.0).clamp(max=H) + 2
    taps = float((gh * gw).clamp(min=1).sum()) * 4 * oh * ow
    win = float((rw * rh).sum())
    flops = 2.0 * float((oh * rh * rw + oh * ow * rw).sum())
    return "window" if win + flops / _GATHER_VS_FLOP < taps else "gather"


def check_bin_stride(bin_stride: int) -> int:
    """Validate roi_align's bin_stride (an int >= 1)."""
    if isinstance(bin_stride, bool) or not isinstance(bin_stride, int) or bin_stride < 1:
        raise ValueError(f"bin_stride must be an int >= 1, got {bin_stride!r}")
    return bin_stride


def roi_align(input: Tensor, boxes: BoxesLike, output_size: Union[int, Sequence[int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, method: str = "auto", bin_stride: int = 1) -> Tensor:
    """ROIAlign with torchvision/Detectron2 semantics, vectorised over boxes.

    method: "gather" (one gather per bilinear tap), "window" (gather each ROI's pixel
    window once, then two small matmuls) or "auto" (cheaper one by a cost model).
    bin_stride: compute only bins 0, s, 2s, ... of the output_size grid along each axis (the result of
    roi_align(...)[:, :, ::s, ::s] for a fraction of the work).
    """
    if input.dim() != 4:
        raise ValueError(f"input must be [N,C,H,W], got {tuple(input.shape)}")
    stride = check_bin_stride(bin_stride)
    oh, ow = _pair(output_size)
    N, C, H, W = input.shape
    rois = boxes_to_rois(boxes, input.device)
    K = rois.shape[0]
    if K == 0 or C == 0:
        return input.new_zeros((K, C, _binned(oh, stride), _binned(ow, stride)))
    acc = acc_dtype(input.dtype)
    rois = rois.to(device=input.device, dtype=acc)
    feat = input.to(acc)
    _, _, _, _, gh, gw = _roi_geometry(rois, spatial_scale, oh, ow, sampling_ratio, aligned)
    if method == "auto":
        method = _pick_method(rois, spatial_scale, _binned(oh, stride), _binned(ow, stride), gh, gw, H, W)
    scratch = _Scratch(feat, not (torch.is_grad_enabled() and feat.requires_grad))
    if method == "window":
        out = _roi_align_window(feat, rois, spatial_scale, oh, ow, sampling_ratio, aligned,
                                scratch, stride)
    elif method == "gather":
        out = _roi_align_gather(feat, rois, spatial_scale, oh, ow, gh, gw, aligned, scratch, stride)
    else:
        raise ValueError(f"unknown roi_align method {method!r}")
    return out.to(input.dtype)


def box_area(boxes: Tensor) -> Tensor:
    """Detectron2 Boxes.area(): (x2-x1)*(y2-y1), no +1."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def level_range(scales: Sequence[float]) -> tuple[int, int]:
    """(min_level, max_level) of a pyramid from its scales, as Detectron2's ROIPooler."""
    lo = -math.log2(scales[0])
    hi = -math.log2(scales[-1])
    if abs(lo - round(lo)) > 1e-6 or abs(hi - round(hi)) > 1e-6:
        raise ValueError(f"feature scales must be powers of 2, got {list(scales)}")
    return int(round(lo)), int(round(hi))


def assign_levels(rois: Tensor, min_level: int, max_level: int,
                  canonical_box_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """Pyramid level index (0-based) of each [K,5] roi, Detectron2's formula."""
    size = torch.sqrt(box_area(rois[:, 1:]))
    lvl = torch.floor(canonical_level + torch.log2(size / canonical_box_size + 1e-8))
    # NaN (negative area) would be undefined in Detectron2; send it to the finest level.
    lvl = torch.nan_to_num(lvl, nan=float(min_level)).clamp(min=min_level, max=max_level)
    return lvl.to(torch.int64) - min_level


def multilevel_roi_align(features: Sequence[Tensor], boxes: BoxesLike,
                         output_size: Union[int, Sequence[int]], scales: Sequence[float],
                         sampling_ratio: int, aligned: bool = True,
                         canonical_box_size: float = 224.0,
                         canonical_level: int = 4) -> Tensor:
    """Detectron2 ROIPooler (ROIAlign/ROIAlignV2): pool each box from its FPN level."""
    if len(features) != len(scales):
        raise ValueError("features and scales must have the same length")
    oh, ow = _pair(output_size)
    rois = boxes_to_rois(boxes, features[0].device)
    if len(features) == 1:
        return roi_align(features[0], rois, (oh, ow), scales[0], sampling_ratio, aligned)
    N, C = features[0].shape[:2]
    K = rois.shape[0]
    ref = features[0]
    if K == 0:
        return ref.new_zeros((0, C, oh, ow))
    min_level, max_level = level_range(scales)
    lvl = assign_levels(rois, min_level, max_level, canonical_box_size, canonical_level)
    out = ref.new_empty((K, C, oh, ow))  # each box has exactly one level
    for i, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.nonzero(lvl == i).squeeze(1)
        if idx.numel() == 0:
            continue
        pooled = roi_align(feat, rois[idx], (oh, ow), scale, sampling_ratio, aligned)
        out.index_copy_(0, idx, pooled.to(out.dtype))
    return out


def threshold_below(thr: float, dtype: torch.dtype) -> float:
    """Largest `dtype` value <= thr: for x in dtype, x > thr (in double) iff x > it."""
    if dtype in _NUMPY_FLOATS:  # host arithmetic only: no torch tensor to read back
        t = _NUMPY_FLOATS[dtype](thr)
        return float(np.nextafter(t, -np.inf, dtype=t.dtype) if float(t) > thr else t)
    t = torch.tensor(thr, dtype=dtype)
    if float(t) > thr:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return float(t)


_NUMPY_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


class _IouGt:
    """IoU > thr masks computed op by op like torchvision's CPU loop, in reused buffers."""

    def __init__(self, thr: float, dtype: torch.dtype, device: torch.device):
        # torchvision compares the float IoU with the double threshold.
        self.thr = threshold_below(thr, dtype)
        self.dtype = dtype
        self.device = device
        self.cap = 0

    def _bufs(self, n: int) -> None:
        if n > self.cap:
            self.cap = n
            self.t1, self.t2, self.t3 = (torch.empty(n, dtype=self.dtype, device=self.device)
                                         for _ in range(3))
            self.m = torch.empty(n, dtype=torch.bool, device=self.device)

    def __call__(self, a: Tensor, a_area: Tensor, b: Tensor, b_area: Tensor) -> Tensor:
        """[len(a), len(b)] bool mask (a view into a reused buffer)."""
        shape = (a.shape[0], b.shape[0])
        self._bufs(shape[0] * shape[1])
        n = shape[0] * shape[1]
        t1, t2, t3 = (t[:n].view(shape) for t in (self.t1, self.t2, self.t3))
        torch.minimum(a[:, None, 2], b[None, :, 2], out=t1)
        torch.maximum(a[:, None, 0], b[None, :, 0], out=t2)
        t1.sub_(t2).clamp_(min=0)  # w
        torch.minimum(a[:, None, 3], b[None, :, 3], out=t2)
        torch.maximum(a[:, None, 1], b[None, :, 1], out=t3)
        t2.sub_(t3).clamp_(min=0)  # h
        t1.mul_(t2)  # inter
        torch.add(a_area[:, None], b_area[None, :], out=t2)
        t2.sub_(t1)
        t1.div_(t2)  # iou
        return torch.gt(t1, self.thr, out=self.m[:n].view(shape))


# Kept boxes compared with a block at once; keeps the IoU buffers cache-sized.
_NMS_KEPT_CHUNK = 1024


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS identical to torchvision.ops.nms; ties broken by lower index first."""
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.dim() != 1 or \
            scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"nms expects boxes [N,4] and scores [N], got "
                         f"{tuple(boxes.shape)} and {tuple(scores.shape)}")
    n = boxes.shape[0]
    dev = boxes.device
    if n == 0:
        return torch.empty((0,), dtype=torch.long, device=dev)
    cdt = acc_dtype(boxes.dtype)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes.detach().to(cdt).index_select(0, order)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iou_gt = _IouGt(iou_threshold, cdt, dev)
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    kept_b = torch.empty((n, 4), dtype=cdt, device=dev)
    kept_a = torch.empty((n,), dtype=cdt, device=dev)
    nk = 0
    for s in range(0, n, _NMS_BLOCK):
        e = min(n, s + _NMS_BLOCK)
        bb, ba = b[s:e], area[s:e]
        alive = torch.ones(e - s, dtype=torch.bool, device=dev)
        for k0 in range(0, nk, _NMS_KEPT_CHUNK):
            k1 = min(nk, k0 + _NMS_KEPT_CHUNK)
            alive &= ~iou_gt(kept_b[k0:k1], kept_a[k0:k1], bb, ba).any(0)
        sup = torch.triu(iou_gt(bb, ba, bb, ba), diagonal=1)
        # Fixed-point iteration of the greedy rule; unique because sup is strictly
        # upper triangular, so it equals the sequential scan.
        cur = alive
        while True:
            nxt = alive & ~(sup & cur[:, None]).any(0)
            if torch.equal(nxt, cur):
                break
            cur = nxt
        keep[s:e] = cur
        m = int(cur.sum())
        kept_b[nk:nk + m] = bb[cur]
        kept_a[nk:nk + m] = ba[cur]
        nk += m
    return order[keep]


def _batched_nms_vanilla(boxes: Tensor, scores: Tensor, idxs: Tensor,
                         iou_threshold: float) -> Tensor:
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for cls in torch.unique(idxs):
        cur = torch.nonzero(idxs == cls).squeeze(1)
        k = nms(boxes[cur], scores[cur], iou_threshold)
        keep_mask[cur[k]] = True
    return order_kept_by_score(torch.nonzero(keep_mask).squeeze(1), scores)


def order_kept_by_score(keep: Tensor, scores: Tensor) -> Tensor:
    """torchvision's last step of per-class batched_nms: kept indices (ascending) by decreasing score.

    Its sort is torch's default, unstable one (for more than 16 elements on CPU tied scores do not keep
    index order), so the same call on the same input is what reproduces its order of ties.
    """
    return keep[scores[keep].sort(descending=True)[1]]


def _batched_nms_coordinate_trick(boxes: Tensor, scores: Tensor, idxs: Tensor,
                                  iou_threshold: float) -> Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def vanilla_batched_nms_limit(device: torch.device) -> int:
    """torchvision's rule: batched_nms loops per class above this many box elements (4 per box)."""
    return 4000 if device.type == "cpu" else 20000


def use_vanilla_batched_nms(boxes: Tensor) -> bool:
    """torchvision's rule: per-class loop above 4000 (CPU) / 20000 (GPU) elements."""
    return boxes.numel() > vanilla_batched_nms_limit(boxes.device)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-category NMS identical to torchvision.ops.batched_nms (same regime rule)."""
    if use_vanilla_batched_nms(boxes):
        return _batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


def batched_nms_fixed(boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor,
                      iou_threshold: float, max_out: int,
                      capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """batched_nms over the boxes where `valid`, as static-shape tensors.

    boxes [n,4] with scores/idxs/valid [n]; or [G,n,4] with [G,n] (idxs may be [n]) for G
    independent problems, giving [G,max_out], [G], [G].

    Returns (indices [max_out] padded with -1, kept count, complete). Only the `capacity`
    highest-scoring valid boxes enter NMS (all when None); the regime and the coordinate
    offset still come from all valid boxes, as if NMS had seen them. Greedy NMS decides a box
    from higher-scoring boxes only, so the first max_out kept are exact whenever max_out boxes
    survive among those candidates; `complete` is False when that is not guaranteed. (In the
    per-class regime torchvision orders exactly tied scores with an unstable sort of all kept
    boxes; with fewer candidates than valid boxes, ties may come out in another order.)
    """
    if boxes.dim() == 3:
        idxs = idxs.expand(scores.shape)
        parts = [batched_nms_fixed(b, s, i, v, iou_threshold, max_out, capacity)
                 for b, s, i, v in zip(boxes, scores, idxs, valid)]
        return tuple(torch.stack(t) for t in zip(*parts)) if parts else (
            torch.full((0, max_out), -1, dtype=torch.long, device=boxes.device),
            torch.zeros((0,), dtype=torch.long, device=boxes.device),
            torch.ones((0,), dtype=torch.bool, device=boxes.device))
    dev = boxes.device
    out = torch.full((max_out,), -1, dtype=torch.long, device=dev)
    vidx = torch.nonzero(valid).squeeze(1)
    nv = vidx.numel()
    if nv == 0 or max_out == 0:
        return out, torch.zeros((), dtype=torch.long, device=dev), torch.ones((), dtype=torch.bool, device=dev)
    if capacity is None or capacity >= nv:
        cand = vidx
    else:  # the best `capacity`, back in index order: torchvision's sorts see them as batched_nms would
        cand = vidx[torch.sort(scores[vidx], descending=True, stable=True).indices[:capacity]].sort().values
    b, s, c = boxes[cand], scores[cand], idxs[cand]
    if nv * 4 > vanilla_batched_nms_limit(dev):
        keep = _batched_nms_vanilla(b, s, c, iou_threshold)
    else:
        max_coordinate = boxes[vidx].max()
        offsets = c.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        keep = nms(b + offsets[:, None], s, iou_threshold)
    keep = cand[keep[:max_out]]
    out[:keep.numel()] = keep
    complete = cand.numel() == nv or keep.numel() >= max_out
    return (out, torch.tensor(keep.numel(), dtype=torch.long, device=dev),
            torch.tensor(complete, device=dev))
