"""Torch reference ops: hand-computed cases, oracle comparisons, gradients, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from zoo import ops
from zoo.ops import naive, reference


def _rand_rois(n_img: int, k: int, lo: float, hi: float, smax: float, gen) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * smax - 0.2 * smax
    bi = torch.randint(0, n_img, (k, 1), generator=gen).double()
    return torch.cat([bi, xy, xy + wh], 1)


# ---------------------------------------------------------------- roi_align


def test_roi_align_hand_computed_2x2():
    f = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # One sample at (0.5, 0.5): the mean of the four pixels.
    out = ops.roi_align(f, torch.tensor([[0.0, 0, 0, 1, 1]]), 1, 1.0, 1, False)
    assert out.shape == (1, 1, 1, 1) and out.item() == pytest.approx(1.5)
    # aligned=True shifts by half a pixel: sample at (0,0) -> pixel value 0.
    out = ops.roi_align(f, torch.tensor([[0.0, 0, 0, 1, 1]]), 1, 1.0, 1, True)
    assert out.item() == pytest.approx(0.0)
    # Adaptive 2x2 grid over the whole map with aligned=False: samples at 0.5, 1.5
    # -> 1.5 clamps to the last pixel: x in {0.5, 1}, y in {0.5, 1}.
    out = ops.roi_align(f, torch.tensor([[0.0, 0, 0, 2, 2]]), 1, 1.0, 0, False)
    vals = [0.5 * 1 + 0.5 * 2 * 1, 1 + 0.5 * 2, 0.5 + 2, 1 + 2]  # x + 2y at the samples
    assert out.item() == pytest.approx(sum(vals) / 4)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [0, 1, 2])
def test_roi_align_constant_map(aligned, sr):
    f = torch.full((2, 3, 10, 12), 2.5)
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 7.0], [0.0, 0.0, 12.0, 10.0]]),
             torch.tensor([[3.0, 2.0, 3.5, 2.2]])]
    out = ops.roi_align(f, boxes, (4, 3), 1.0, sr, aligned)
    assert out.shape == (3, 3, 4, 3)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


@pytest.mark.parametrize("sr", [0, 2, 3])
def test_roi_align_linear_ramp_is_bin_centre(sr):
    # Bilinear interpolation reproduces a linear function, and the sample grid is
    # symmetric in each bin, so each output is the ramp at the bin centre.
    H, W = 20, 30
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    f = (0.7 * xs - 1.3 * ys + 4.0)[None, None]
    box = torch.tensor([[0.0, 6.0, 4.0, 40.0, 26.0]], dtype=torch.float64)  # scale 0.5
    out = ops.roi_align(f, box, (5, 4), 0.5, sr, True)
    x0, y0, bw, bh = 3.0 - 0.5, 2.0 - 0.5, (20.0 - 3.0) / 4, (13.0 - 2.0) / 5
    cx = x0 + (torch.arange(4, dtype=torch.float64) + 0.5) * bw
    cy = y0 + (torch.arange(5, dtype=torch.float64) + 0.5) * bh
    expect = 0.7 * cx[None, :] - 1.3 * cy[:, None] + 4.0
    torch.testing.assert_close(out[0, 0], expect)


def test_roi_align_out_of_image_and_degenerate():
    f = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([
        [0.0, 20.0, 20.0, 30.0, 30.0],    # fully outside: samples beyond H/W -> 0
        [0.0, -9.0, -9.0, -3.0, -3.0],    # fully outside (negative)
        [0.0, 5.0, 5.0, 2.0, 2.0],        # inverted box, aligned: empty grid -> 0
    ])
    out = ops.roi_align(f, rois, 2, 1.0, 0, True)
    assert torch.count_nonzero(out) == 0
    # Samples in [-1, 0] clamp to the first pixel instead of being dropped.
    edge = ops.roi_align(f, torch.tensor([[0.0, -1.0, -1.0, 0.0, 0.0]]), 1, 1.0, 1, False)
    torch.testing.assert_close(edge[0, :, 0, 0], f[0, :, 0, 0])


def test_roi_align_empty():
    f = torch.randn(2, 5, 6, 7)
    assert ops.roi_align(f, torch.zeros(0, 5), 3, 1.0, 0, True).shape == (0, 5, 3, 3)
    assert ops.roi_align(f, [torch.zeros(0, 4), torch.zeros(0, 4)], (2, 4), 1.0, 0,
                         True).shape == (0, 5, 2, 4)
    assert ops.roi_align(f, [], 3, 1.0, 0, True).shape == (0, 5, 3, 3)


@pytest.mark.parametrize("method", ["gather", "window"])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [0, 1, 2])
def test_roi_align_matches_loop_oracle(aligned, sr, method):
    gen = torch.Generator().manual_seed(10 * sr + aligned)
    f = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    rois = _rand_rois(2, 40, -8.0, 30.0, 20.0, gen)
    out = reference.roi_align(f, rois, (3, 4), 0.5, sr, aligned, method=method)
    torch.testing.assert_close(out, naive.roi_align(f, rois, (3, 4), 0.5, sr, aligned),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["gather", "window"])
@pytest.mark.parametrize("sr,aligned", [(0, True), (2, False)])
def test_roi_align_bin_stride_is_the_sliced_result(method, sr, aligned):
    """bin_stride=s pools bins 0, s, 2s, ... of the full grid: the full result sliced [::s, ::s], for odd sizes too."""
    gen = torch.Generator().manual_seed(31 + sr)
    f = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    rois = _rand_rois(2, 30, -8.0, 30.0, 20.0, gen)
    for size, stride in ((14, 2), (7, 2), ((6, 9), 3), (5, 1)):
        full = reference.roi_align(f, rois, size, 0.5, sr, aligned, method=method)
        sub = ops.roi_align(f, rois, size, 0.5, sr, aligned, bin_stride=stride, backend="torch") \
            if method == "gather" else reference.roi_align(f, rois, size, 0.5, sr, aligned, method=method,
                                                            bin_stride=stride)
        assert sub.shape == full[:, :, ::stride, ::stride].shape
        torch.testing.assert_close(sub, full[:, :, ::stride, ::stride], rtol=0, atol=1e-12)
    assert ops.roi_align(f, [], 14, 1.0, 0, True, bin_stride=2).shape == (0, 3, 7, 7)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="bin_stride must be an int >= 1"):
            ops.roi_align(f, rois, 14, 0.5, sr, aligned, bin_stride=bad)


def test_roi_align_list_equals_tensor_boxes():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 4, 16, 16, generator=gen)
    b0 = torch.rand(5, 4, generator=gen) * 10
    b1 = torch.rand(3, 4, generator=gen) * 10
    b0[:, 2:] += b0[:, :2]
    b1[:, 2:] += b1[:, :2]
    rois = reference.boxes_to_rois([b0, b1])
    assert rois[:5, 0].eq(0).all() and rois[5:, 0].eq(1).all()
    torch.testing.assert_close(ops.roi_align(f, [b0, b1], 7, 0.5, 0, True),
                               ops.roi_align(f, rois, 7, 0.5, 0, True))


@pytest.mark.parametrize("method", ["gather", "window"])
def test_roi_align_big_grid_chunks_over_samples(monkeypatch, method):
    # Force chunking over sample rows and ROIs; results must not change.
    gen = torch.Generator().manual_seed(4)
    f = torch.randn(1, 3, 30, 30, generator=gen, dtype=torch.float64)
    rois = _rand_rois(1, 12, 0.0, 20.0, 60.0, gen)
    full = reference.roi_align(f, rois, 2, 1.0, 0, True, method=method)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 64)
    torch.testing.assert_close(reference.roi_align(f, rois, 2, 1.0, 0, True, method=method),
                               full)
    torch.testing.assert_close(full, naive.roi_align(f, rois, 2, 1.0, 0, True))


@pytest.mark.parametrize("method", ["gather", "window"])
def test_roi_align_gradcheck(method):
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _rand_rois(2, 5, -2.0, 10.0, 6.0, gen)
    for sr, al in [(0, True), (2, False)]:
        assert torch.autograd.gradcheck(
            lambda x: reference.roi_align(x, rois, (2, 3), 0.8, sr, al, method=method), (f,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_low_precision(dtype):
    gen = torch.Generator().manual_seed(6)
    f = torch.randn(1, 8, 20, 20, generator=gen)
    rois = _rand_rois(1, 10, 0.0, 30.0, 20.0, gen).float()
    ref = ops.roi_align(f, rois, 7, 0.5, 0, True)
    out = ops.roi_align(f.to(dtype), rois, 7, 0.5, 0, True)
    assert out.dtype == dtype
    # Only the input rounding differs: the sampling itself accumulates in fp32.
    ref_lp = ops.roi_align(f.to(dtype).float(), rois, 7, 0.5, 0, True)
    torch.testing.assert_close(out.float(), ref_lp.to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------- multilevel pooler


def test_assign_levels_detectron2_formula():
    sizes = torch.tensor([1.0, 50.0, 111.9, 112.0, 224.0, 447.0, 448.0, 1000.0, 5000.0])
    rois = torch.zeros(len(sizes), 5)
    rois[:, 3] = sizes
    rois[:, 4] = sizes
    lvl = reference.assign_levels(rois, 2, 5)
    expect = [min(max(math.floor(4 + math.log2(s / 224 + 1e-8)), 2), 5) - 2 for s in sizes]
    assert lvl.tolist() == expect == [0, 0, 0, 1, 2, 2, 3, 3, 3]


def test_multilevel_matches_per_level_roi_align():
    gen = torch.Generator().manual_seed(7)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [torch.randn(2, 3, 64 // (2 ** i), 96 // (2 ** i), generator=gen) for i in range(4)]
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=gen) * 300
        wh = torch.exp(torch.rand(30, 2, generator=gen) * 6)
        boxes.append(torch.cat([xy, xy + wh], 1))
    out = ops.multilevel_roi_align(feats, boxes, 7, scales, 0, True)
    rois = reference.boxes_to_rois(boxes)
    lvl = reference.assign_levels(rois, 2, 5)
    assert len(set(lvl.tolist())) >= 3  # the test really spans levels
    for k in range(rois.shape[0]):
        i = int(lvl[k])
        one = ops.roi_align(feats[i], rois[k:k + 1], 7, scales[i], 0, True)
        torch.testing.assert_close(out[k:k + 1], one)


def test_multilevel_single_level_and_empty():
    f = torch.randn(1, 4, 20, 20)
    rois = torch.tensor([[0.0, 10, 10, 200, 150], [0.0, 1, 1, 3, 3]])
    torch.testing.assert_close(ops.multilevel_roi_align([f], rois, 14, [1 / 16], 0, True),
                               ops.roi_align(f, rois, 14, 1 / 16, 0, True))
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    assert ops.multilevel_roi_align(feats, [torch.zeros(0, 4)], 7, [1 / 4, 1 / 8], 0,
                                    True).shape == (0, 4, 7, 7)


def test_multilevel_gradcheck():
    gen = torch.Generator().manual_seed(8)
    feats = [torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True),
             torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)]
    rois = torch.tensor([[0.0, 1, 1, 10, 12], [0.0, 0, 0, 30, 30], [0.0, 5, 3, 9, 6]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.multilevel_roi_align([a, b], rois, 2, [0.25, 0.125], 2, True,
                                              canonical_box_size=16, canonical_level=3),
        tuple(feats))


# ---------------------------------------------------------------------- nms


def test_nms_three_boxes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.8, 0.9, 0.7])
    # IoU(0,1) = 81/119 = 0.68: box 0 is suppressed by the higher-scored box 1.
    assert ops.nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert ops.nms(boxes, scores, 0.7).tolist() == [1, 0, 2]


def test_nms_iou_exactly_at_threshold_is_kept():
    boxes = torch.tensor([[0.0, 0, 3, 1], [1, 0, 4, 1]])  # inter 2, union 4 -> IoU 0.5
    scores = torch.tensor([0.9, 0.8])
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert ops.nms(boxes, scores, 0.4999).tolist() == [0]


def test_nms_ties_lower_index_first():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 2]


def test_nms_empty_and_single():
    assert ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).dtype == torch.long
    assert ops.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.3]), 0.5).tolist() == [0]


@pytest.mark.parametrize("n", [2, 17, 300, 700])
def test_nms_matches_sequential_oracle(n):
    gen = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 40
    wh[: n // 10] = 0  # degenerate boxes: area 0 -> IoU NaN or 0, never suppress
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.randint(0, 30, (n,), generator=gen).float()  # many ties
    for thr in (0.3, 0.5, 0.7):
        assert torch.equal(ops.nms(boxes, scores, thr), naive.nms(boxes, scores, thr))


def test_nms_fixed_torch_path():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.8, 0.9, 0.7])
    idx, cnt = ops.nms_fixed(boxes, scores, 0.5, 4)
    assert idx.tolist() == [1, 2, -1, -1] and int(cnt) == 2
    idx, cnt = ops.nms_fixed(boxes, scores, 0.5, 1)
    assert idx.tolist() == [1] and int(cnt) == 1


def _batched_by_loop(boxes, scores, idxs, thr):
    keep = []
    for c in idxs.unique().tolist():
        sel = torch.nonzero(idxs == c).squeeze(1)
        keep.append(sel[naive.nms(boxes[sel], scores[sel], thr)])
    keep = torch.cat(keep)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


@pytest.mark.parametrize("n", [0, 1, 50, 999, 1001, 3000])
def test_batched_nms_both_regimes(n):
    gen = torch.Generator().manual_seed(n + 1)
    xy = torch.rand(n, 2, generator=gen) * 200
    wh = torch.rand(n, 2, generator=gen) * 60
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=gen)
    idxs = torch.randint(0, 5, (n,), generator=gen)
    assert reference.use_vanilla_batched_nms(boxes) == (n > 1000)
    keep = ops.batched_nms(boxes, scores, idxs, 0.5)
    assert keep.dtype == torch.long
    if n == 0:
        assert keep.shape == (0,)
        return
    # Generic boxes: both regimes equal the per-class definition.
    assert torch.equal(keep, _batched_by_loop(boxes, scores, idxs, 0.5))
    trick = reference._batched_nms_coordinate_trick(boxes, scores, idxs, 0.5)
    assert torch.equal(trick, keep)
