"""GPU-resident greedy NMS: an IoU bitmask kernel plus a single-program scan kernel.

Boxes are sorted by score (stable, descending) on device; the mask kernel sets bit j
of word (i, j // 64) when sorted box j > i overlaps box i above the threshold; the
scan walks 64-box blocks in order, resolves each block in registers (see SCAN_METHODS)
and ORs the kept rows into the removed set. Nothing leaves the device; only `nms`'s variable-length
result needs the final count (like torchvision); `nms_fixed` is fully sync-free.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.launch import LAUNCH_LOCK
from zoo.ops import reference

_WORD = 64
# How the scan resolves a 64-box block: "serial" walks its rows in order; "fixpoint" repeats, for all rows at once,
# "kept = not removed earlier and not overlapped by a kept row above", which reaches greedy NMS's answer in as
# many rounds as the block's longest chain of suppressions (at most 64, usually a few)
SCAN_METHODS = ("serial", "fixpoint")


class Scan(NamedTuple):
    """The scan's launch: ORs a block's kept rows into `width` later words at a time, on `warps` warps, resolving
    each block by `method` (see SCAN_METHODS)."""
    width: int
    warps: int
    method: str


_SCAN: ContextVar[Optional[Scan]] = ContextVar("zoo_nms_scan", default=None)
# One warp per problem: a block is one warp-wide OR per round (sm_90: REDUX.OR). No spill on sm_90
# (test_kernels_compile). "fixpoint" over "serial": for sm_90 the serial 64 steps compile to ~1100 dependent
# instructions per block with the later rows' loads inside the chain, a fixpoint round to ~25, and blocks of the
# networks' NMS (RPN and box head, R50-FPN and R50-C4, synthetic weights) needed 1.6-2.8 rounds on average, 5 at
# most. Not yet timed on a GPU: bench_kernels --sweep times both.
_DEFAULT_SCAN = Scan(16, 1, "fixpoint")


@contextlib.contextmanager
def forced_scan(width: int, warps: int, method: str = _DEFAULT_SCAN.method) -> Iterator[None]:
    """Launch every NMS scan inside the block with this propagation width (words), warp count and block method, for
    scripts/bench_kernels.py's sweep; the result does not depend on them."""
    if method not in SCAN_METHODS:
        raise ValueError(f"scan method must be one of {', '.join(SCAN_METHODS)}, got {method!r}")
    for v in (width, warps):
        if v < 1 or v & (v - 1):
            raise ValueError(f"scan sizes must be powers of two, got {(width, warps)}")
    token = _SCAN.set(Scan(width, warps, method))
    try:
        yield
    finally:
        _SCAN.reset(token)


@triton.jit(do_not_specialize=["n", "n_words", "thr"])
def _nms_mask_kernel(boxes_ptr, cls_ptr, thr, thr_ptr, mask_ptr, n, n_ptr, n_words,
                     USE_CLASS: tl.constexpr, THR_FROM_PTR: tl.constexpr, N_FROM_PTR: tl.constexpr,
                     BLOCK: tl.constexpr):
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)  # independent problems of n rows each, side by side
    boxes_ptr += g * n * 4
    cls_ptr += g * n
    mask_ptr += g * n * n_words
    if THR_FROM_PTR:  # fp64 boxes: a float argument would round the threshold
        t = tl.load(thr_ptr)
    else:
        t = thr
    if N_FROM_PTR:  # live rows counted on device: blocks past them are skipped, never read
        n = tl.load(n_ptr + g)
    if (cb >= rb) & (cb * BLOCK < n):
        rows = rb * BLOCK + tl.arange(0, BLOCK)
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        rm = rows < n
        cm = cols < n
        rx1 = tl.load(boxes_ptr + rows * 4 + 0, mask=rm, other=0.0)
        ry1 = tl.load(boxes_ptr + rows * 4 + 1, mask=rm, other=0.0)
        rx2 = tl.load(boxes_ptr + rows * 4 + 2, mask=rm, other=0.0)
        ry2 = tl.load(boxes_ptr + rows * 4 + 3, mask=rm, other=0.0)
        cx1 = tl.load(boxes_ptr + cols * 4 + 0, mask=cm, other=0.0)
        cy1 = tl.load(boxes_ptr + cols * 4 + 1, mask=cm, other=0.0)
        cx2 = tl.load(boxes_ptr + cols * 4 + 2, mask=cm, other=0.0)
        cy2 = tl.load(boxes_ptr + cols * 4 + 3, mask=cm, other=0.0)
        ra = (rx2 - rx1) * (ry2 - ry1)
        ca = (cx2 - cx1) * (cy2 - cy1)
        w = tl.maximum(tl.minimum(rx2[:, None], cx2[None, :])
                       - tl.maximum(rx1[:, None], cx1[None, :]), 0.0)
        h = tl.maximum(tl.minimum(ry2[:, None], cy2[None, :])
                       - tl.maximum(ry1[:, None], cy1[None, :]), 0.0)
        inter = w * h
        # Same op order as torchvision's CPU loop; IEEE division (launched without
        # fp fusion) so the bits match the torch reference.
        union = (ra[:, None] + ca[None, :]) - inter
        if THR_FROM_PTR:
            iou = inter / union  # fp64 division is IEEE already
        else:
            iou = tl.math.div_rn(inter, union)
        hit = (iou > t) & (cols[None, :] > rows[:, None]) & cm[None, :]
        if USE_CLASS:
            rc = tl.load(cls_ptr + rows, mask=rm, other=0)
            cc = tl.load(cls_ptr + cols, mask=cm, other=0)
            hit = hit & (rc[:, None] == cc[None, :])
        bit = (tl.arange(0, BLOCK) % 64).to(tl.int64)
        word = tl.sum(hit.to(tl.int64) << bit[None, :], axis=1)
        tl.store(mask_ptr + rows.to(tl.int64) * n_words + cb, word, mask=rm)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _scan_block(mask_ptr, order_ptr, removed_ptr, out_ptr, b, n, n_words, live_words, count, max_out,
                BLOCK_W: tl.constexpr, FIXPOINT: tl.constexpr):
    """Resolve 64-box block `b`: write its kept boxes after the `count` kept so far, mark what they remove in
    every later word; returns the new count."""
    lane = tl.arange(0, 64)
    one = tl.full([], 1, tl.int64)
    rows = b * 64 + lane
    valid = rows < n
    # Rows past n count as already removed.
    pad = tl.sum(tl.where(valid, 0, one << lane.to(tl.int64)))
    rem = tl.load(removed_ptr + b, volatile=True) | pad
    if FIXPOINT:
        # every row's diagonal word in one load; each round is one OR across the lanes
        diag = tl.load(mask_ptr + rows.to(tl.int64) * n_words + b, mask=valid, other=0)
        keepw = ~rem
        last = rem  # differs from keepw: at least one round
        while keepw != last:
            last = keepw
            hit = ((keepw >> lane.to(tl.int64)) & 1) == 1
            keepw = ~rem & ~tl.reduce(tl.where(hit, diag, 0), 0, _or)
    else:
        keepw = tl.zeros([], dtype=tl.int64)
        for t in tl.static_range(64):
            # each row's diagonal word as a scalar load: the loads do not depend on `rem`, so they
            # can all be in flight at once, where a cross-lane reduction per step would serialise
            r_t = b * 64 + t
            d_t = tl.load(mask_ptr + r_t.to(tl.int64) * n_words + b, mask=r_t < n, other=0)
            free = ((rem >> t) & 1) == 0
            rem = tl.where(free, rem | d_t, rem)
            keepw = tl.where(free, keepw | (one << t), keepw)
    kept = ((keepw >> lane.to(tl.int64)) & 1) == 1
    pos = count + tl.cumsum(kept.to(tl.int64), 0) - 1
    src = tl.load(order_ptr + rows, mask=kept, other=0)
    tl.store(out_ptr + pos, src, mask=kept & (pos < max_out))
    count += tl.sum(kept.to(tl.int64))
    # Propagate this block's kept rows to every later word.
    for c0 in range(b + 1, live_words, BLOCK_W):
        cols = c0 + tl.arange(0, BLOCK_W)
        cm = cols < live_words
        tile = tl.load(mask_ptr + rows.to(tl.int64)[:, None] * n_words + cols[None, :],
                       mask=kept[:, None] & cm[None, :], other=0)
        acc = tl.reduce(tile, 0, _or)
        old = tl.load(removed_ptr + cols, mask=cm, other=0, volatile=True)
        tl.store(removed_ptr + cols, old | acc, mask=cm)
    tl.debug_barrier()  # make the removed words visible to the next block's load
    return count


@triton.jit(do_not_specialize=["n", "n_words", "max_out"])
def _nms_scan_kernel(mask_ptr, order_ptr, removed_ptr, out_ptr, count_ptr,
                     n, n_ptr, n_words, max_out, N_FROM_PTR: tl.constexpr, STOP_AT_MAX: tl.constexpr,
                     BLOCK_W: tl.constexpr, FIXPOINT: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)  # one program per problem
    mask_ptr += g * n * n_words
    order_ptr += g * n
    removed_ptr += g * n_words
    out_ptr += g * max_out
    count_ptr += g
    count = tl.zeros([], dtype=tl.int64)
    if N_FROM_PTR:
        n = tl.load(n_ptr + g)
    live_words = (n + 63) // 64  # n_words stays the row stride of the mask
    if STOP_AT_MAX:
        # Greedy NMS decides each box from higher-scoring ones only, so once max_out are kept the rest cannot
        # change the output: stop there (the RPN keeps 1000 of ~4700, the box head 100 of thousands).
        b = 0
        while (b < live_words) & (count < max_out):
            count = _scan_block(mask_ptr, order_ptr, removed_ptr, out_ptr, b, n, n_words, live_words, count,
                                max_out, BLOCK_W, FIXPOINT)
            b += 1
    else:
        # a counted loop when every box may be kept: on the H100 the while loop made full NMS of 4700 boxes
        # 1.8x slower (0.78 -> 1.42 ms)
        for b in range(0, live_words):
            count = _scan_block(mask_ptr, order_ptr, removed_ptr, out_ptr, b, n, n_words, live_words, count,
                                max_out, BLOCK_W, FIXPOINT)
    tl.store(count_ptr, tl.minimum(count, max_out))


def _prepare(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.dim() != 1 or \
            scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"nms expects boxes [N,4] and scores [N], got "
                         f"{tuple(boxes.shape)} and {tuple(scores.shape)}")
    cdt = reference.acc_dtype(boxes.dtype)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    return order, boxes.detach().to(cdt).index_select(0, order).contiguous(), cdt


def _mask_warps(dtype: torch.dtype) -> int:
    """fp64 64x64 tiles spill heavily below 16 warps (sm_90); fp32 fits 4 warps."""
    return 16 if dtype == torch.float64 else 4


def _run(boxes: Tensor, scores: Tensor, iou_threshold: float, max_out: int,
         idxs: Tensor | None) -> tuple[Tensor, Tensor]:
    """Kept original indices in score order, padded with -1, and the count tensor."""
    dev = boxes.device
    if boxes.shape[0] == 0 or max_out == 0:
        return _empty((), max_out, dev)
    order, sb, cdt = _prepare(boxes, scores)
    cls = idxs.index_select(0, order).to(torch.int64).contiguous() if idxs is not None else None
    return _launch(sb, order, cls, iou_threshold, max_out, cdt)


def _empty(groups: tuple, max_out: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.full((*groups, max_out), -1, dtype=torch.long, device=dev),
            torch.zeros(groups, dtype=torch.long, device=dev))


def _launch(sb: Tensor, order: Tensor, cls: Tensor | None, iou_threshold: float, max_out: int,
            cdt: torch.dtype, live: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """NMS over boxes already in score order (`sb`, [n,4] in `cdt`, or [G,n,4] for G independent
    problems in one launch each kernel); `order[..., i]` is the index written out for row i; `cls`
    (optional) makes it class-aware; `live` (optional, int32 [G] on device) limits each problem
    to its first rows without the host reading the values."""
    single = sb.dim() == 2
    if single:
        sb, order = sb[None], order[None]
        cls = None if cls is None else cls[None]
    dev = sb.device
    groups, n = sb.shape[0], sb.shape[1]
    out, count = _empty((groups,), max_out, dev)
    n_words = triton.cdiv(n, _WORD)
    # x > thr (double) iff x > the largest representable value <= thr; an fp32 value
    # travels exactly as a float argument (no host->device copy, graph-capturable).
    thr = reference.threshold_below(iou_threshold, cdt)
    thr_t = torch.tensor([thr], dtype=cdt, device=dev) if cdt == torch.float64 else sb
    mask = torch.empty((groups, n, n_words), dtype=torch.int64, device=dev)
    n_ptr = out if live is None else live  # unused without N_FROM_PTR
    removed = torch.zeros((groups, n_words), dtype=torch.int64, device=dev)
    scan = _SCAN.get() or _DEFAULT_SCAN
    block_w = min(scan.width, triton.next_power_of_2(n_words))
    with LAUNCH_LOCK:
        _nms_mask_kernel[(n_words, n_words, groups)](sb, order if cls is None else cls, thr, thr_t, mask,
                                                     n, n_ptr, n_words, USE_CLASS=cls is not None,
                                                     THR_FROM_PTR=cdt == torch.float64,
                                                     N_FROM_PTR=live is not None, BLOCK=_WORD,
                                                     num_warps=_mask_warps(cdt), enable_fp_fusion=False)
        _nms_scan_kernel[(groups,)](mask, order, removed, out, count, n, n_ptr, n_words, max_out,
                                    N_FROM_PTR=live is not None, STOP_AT_MAX=max_out < n, BLOCK_W=block_w,
                                    FIXPOINT=scan.method == "fixpoint", num_warps=scan.warps)
    return (out[0], count[0]) if single else (out, count)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS on device; returns kept indices by decreasing score."""
    out, _ = _run(boxes, scores, iou_threshold, boxes.shape[0], None)
    return out[out >= 0]  # the only host sync: the result's length


def nms_fixed(boxes: Tensor, scores: Tensor, iou_threshold: float,
              max_out: int) -> tuple[Tensor, Tensor]:
    """CUDA-graph friendly NMS: (indices[max_out] padded with -1, count tensor)."""
    return _run(boxes, scores, iou_threshold, int(max_out), None)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-category NMS with torchvision's regime rule (per-class vs coordinate trick)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    if reference.use_vanilla_batched_nms(boxes):
        return _batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    max_coordinate = boxes.max()  # stays on device: no sync
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


# Boxes per class-aware launch in torchvision's per-class regime. The bitmask is n x n/64 words, so one
# launch over 80k boxes would take 800 MB; groups of whole classes bound it (32 MB here, or one class's
# own square when a class alone is larger, as in torchvision's per-class loop) with few launches.
_GROUP = 16384


def _batched_nms_per_class(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS (class-aware IoU on the original coordinates), kept indices by decreasing score."""
    n = boxes.shape[0]
    if n <= _GROUP:
        out, _ = _run(boxes, scores, iou_threshold, n, idxs)
        return reference.order_kept_by_score(out[out >= 0].sort().values, scores)
    order, sb, cdt = _prepare(boxes, scores)
    cls = idxs.index_select(0, order).to(torch.int64)
    by_class = torch.sort(cls, stable=True).indices  # class-major, score order inside each class
    order, sb, cls = order[by_class], sb[by_class], cls[by_class]
    sizes = torch.unique_consecutive(cls, return_counts=True)[1].tolist()  # host sync, as the result's length
    bounds, start, end = [], 0, 0
    for size in sizes:
        if end > start and end - start + size > _GROUP:
            bounds.append((start, end))
            start = end
        end += size
    bounds.append((start, end))
    kept = []
    for s, e in bounds:
        out, _ = _launch(sb[s:e].contiguous(), order[s:e].contiguous(), cls[s:e].contiguous(),
                         iou_threshold, e - s, cdt)
        kept.append(out)
    keep = torch.cat(kept)
    return reference.order_kept_by_score(keep[keep >= 0].sort().values, scores)


def batched_nms_fixed(boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor,
                      iou_threshold: float, max_out: int,
                      capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sync-free batched NMS over the `valid` boxes; see zoo.ops.batched_nms_fixed.

    boxes [n,4] (scores, idxs, valid [n]), or [G,n,4] for G independent problems solved by the
    same launches (idxs may then be [n], shared). torchvision's regime is chosen on device from
    each problem's valid count: per-class NMS is class-aware NMS on the original coordinates,
    the coordinate trick class-agnostic NMS on offset ones (all classes 0), so one launch serves
    both. Invalid boxes sort last and are left out of the kernels by a device-side row count.
    Kept boxes come out by decreasing score with ties in index order (torchvision's per-class
    regime may order exact ties otherwise: its last sort is unstable; on CPU above 16 boxes).
    """
    single = boxes.dim() == 2
    if single:
        boxes, scores, valid, idxs = boxes[None], scores[None], valid[None], idxs[None]
    groups, n = scores.shape
    idxs = idxs.expand(groups, n)
    dev = boxes.device
    if n == 0 or max_out == 0:
        out, count = _empty((groups,), max_out, dev)
        complete = torch.ones((groups,), dtype=torch.bool, device=dev)
    else:
        out, count, complete = _fixed(boxes, scores, idxs, valid.to(torch.bool), iou_threshold, max_out,
                                      n if capacity is None else min(n, int(capacity)))
    return (out[0], count[0], complete[0]) if single else (out, count, complete)


def _fixed(boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor, iou_threshold: float, max_out: int,
           m: int) -> tuple[Tensor, Tensor, Tensor]:
    groups, n = scores.shape
    n_valid = valid.sum(dim=1)
    vanilla = n_valid * 4 > reference.vanilla_batched_nms_limit(boxes.device)
    b = boxes.detach()
    max_coordinate = torch.where(valid[..., None], b, float("-inf")).amax(dim=(1, 2))
    # same dtype and rounding as the coordinate trick of torchvision / zoo.ops.reference; a
    # Python 1 instead of torch.tensor(1) keeps host->device copies out of CUDA graphs
    offsets = idxs.to(b) * (max_coordinate[:, None] + 1)
    coords = torch.where(vanilla[:, None, None], b, b + offsets[..., None])
    # valid first, each part by decreasing score, ties by index (two stable sorts)
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    invalid_first = torch.sort((~valid.gather(1, order)).to(torch.uint8), dim=1, stable=True).indices
    order = order.gather(1, invalid_first)[:, :m].contiguous()
    cdt = reference.acc_dtype(boxes.dtype)
    sel = coords.gather(1, order[..., None].expand(groups, m, 4)).to(cdt)
    sb = torch.where(valid.gather(1, order)[..., None], sel, 0).contiguous()
    # class-agnostic in the trick's regime, as torchvision (boxes below -1 can then meet across classes)
    cls = torch.where(vanilla[:, None], idxs.gather(1, order).to(torch.int64), 0).contiguous()
    # valid rows come first: NMS over just those, however many there are, without reading the count;
    # rows past them count as removed, so the kernels' output and count are the valid kept ones
    live = torch.clamp(n_valid, max=m).to(torch.int32)
    out, count = _launch(sb, order, cls, iou_threshold, max_out, cdt, live)
    complete = (n_valid <= m) | (count >= max_out)
    return out, count, complete
