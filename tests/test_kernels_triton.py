"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, compared with the torch path.

Inputs are kept small: the interpreter runs every program in numpy. On a machine with
CUDA these are skipped (tests/test_kernels_gpu.py covers the compiled kernels).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

# The interpreter must be chosen before triton is first imported (triton's own jit
# helpers are decorated at import), so set it at collection time on CPU-only hosts.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from interpreter_support import interpreter_fma_rounds_once, require_working_interpreter  # noqa: E402
from zoo import ops  # noqa: E402
from zoo.ops import reference  # noqa: E402

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="interpreter tests run on CPU-only machines; see test_kernels_gpu"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy 0/0 in padded lanes
]


@pytest.fixture(scope="module")
def K():
    """zoo.kernels in interpreter mode."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; "
                    "run this file on its own or export TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module("zoo.kernels")
    if not mod.INTERPRET:
        pytest.skip("zoo.kernels was already imported in compiled mode")
    require_working_interpreter()
    return mod


def _rois(gen, n_img: int, H: int, W: int, scale: float) -> torch.Tensor:
    """A mix of ordinary, degenerate, tiny, out-of-image and huge boxes (image coords)."""
    ih, iw = H / scale, W / scale
    k = 10
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([iw, ih])
    wh = torch.rand(k, 2, generator=gen) * torch.tensor([iw, ih]) * 0.6
    boxes = torch.cat([xy, xy + wh], 1)
    extra = torch.tensor([
        [5.0, 5.0, 5.0, 5.0],                         # zero size
        [9.0, 7.0, 3.0, 2.0],                         # inverted
        [1.0, 1.0, 1.3, 1.2],                         # tiny
        [-40.0, -30.0, -20.0, -10.0],                 # fully outside (negative)
        [iw + 10, ih + 10, iw + 60, ih + 40],         # fully outside (beyond)
        [-iw * 0.5, -ih * 0.5, iw * 1.5, ih * 1.5],   # huge, covers everything
        [-3.0, -3.0, 6.0, 6.0],                       # straddles the corner
    ])
    boxes = torch.cat([boxes, extra])
    bi = torch.randint(0, n_img, (boxes.shape[0], 1), generator=gen).float()
    return torch.cat([bi, boxes], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [0, 1, 2])
def test_roi_align_forward_matches_torch(K, sr, aligned):
    gen = torch.Generator().manual_seed(100 + 10 * sr + aligned)
    f = torch.randn(2, 5, 9, 12, generator=gen)
    rois = _rois(gen, 2, 9, 12, 0.5)
    out = K.roi_align(f, rois, (3, 4), 0.5, sr, aligned)
    ref = reference.roi_align(f, rois, (3, 4), 0.5, sr, aligned)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_roi_align_channel_blocks_and_big_bins(K):
    # C=70 with 7x7 bins spans two channel blocks; 14x14 uses 256-bin tiles.
    gen = torch.Generator().manual_seed(6)
    f = torch.randn(1, 70, 12, 16, generator=gen)
    rois = _rois(gen, 1, 12, 16, 0.25)[:6]
    for size in (7, (14, 14)):
        torch.testing.assert_close(K.roi_align(f, rois, size, 0.25, 2, True),
                                   reference.roi_align(f, rois, size, 0.25, 2, True),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_low_precision(K, dtype):
    gen = torch.Generator().manual_seed(7)
    f = torch.randn(1, 6, 10, 10, generator=gen).to(dtype)
    rois = _rois(gen, 1, 10, 10, 1.0)
    out = K.roi_align(f, rois, 2, 1.0, 0, True)
    ref = reference.roi_align(f, rois, 2, 1.0, 0, True)
    assert out.dtype == dtype
    # Both accumulate in fp32; only the final rounding / summation order may differ.
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("sr,aligned", [(0, True), (2, False)])
def test_roi_align_backward_matches_torch(K, sr, aligned):
    gen = torch.Generator().manual_seed(8 + sr)
    f = torch.randn(2, 3, 8, 9, generator=gen, requires_grad=True)
    rois = _rois(gen, 2, 8, 9, 0.5)
    g = torch.randn(rois.shape[0], 3, 2, 3, generator=gen)
    out = K.roi_align(f, rois, (2, 3), 0.5, sr, aligned)
    (ga,) = torch.autograd.grad(out, f, g)
    ref = reference.roi_align(f, rois, (2, 3), 0.5, sr, aligned)
    (gr,) = torch.autograd.grad(ref, f, g)
    torch.testing.assert_close(ga, gr, rtol=1e-5, atol=1e-5)


def test_roi_align_empty_and_list_boxes(K):
    f = torch.randn(2, 3, 6, 6)
    assert K.roi_align(f, torch.zeros(0, 5), 2, 1.0, 0, True).shape == (0, 3, 2, 2)
    b = [torch.tensor([[0.0, 0, 4, 4]]), torch.zeros(0, 4)]
    torch.testing.assert_close(K.roi_align(f, b, 2, 1.0, 0, True),
                               reference.roi_align(f, b, 2, 1.0, 0, True))


def _pyramid(gen, C: int = 3, requires_grad: bool = False):
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [torch.randn(2, C, 32 // 2 ** i, 48 // 2 ** i, generator=gen,
                         requires_grad=requires_grad) for i in range(4)]
    xy = torch.rand(16, 2, generator=gen) * 150
    wh = torch.exp(torch.rand(16, 2, generator=gen) * 6)
    boxes = torch.cat([xy, xy + wh], 1)
    # Exact level boundaries (sizes 112, 224, 448) plus degenerate boxes.
    boxes[:5] = torch.tensor([[0.0, 0, 112, 112], [0, 0, 224, 224], [10, 10, 458, 458],
                              [3, 3, 2, 9], [5, 5, 5, 5]])
    return feats, scales, [boxes[:9], boxes[9:]]


def test_multilevel_forward_and_backward(K):
    gen = torch.Generator().manual_seed(9)
    feats, scales, boxes = _pyramid(gen, requires_grad=True)
    rois = reference.boxes_to_rois(boxes)
    lvl = reference.assign_levels(rois, 2, 5)
    assert lvl[:3].tolist() == [1, 2, 3] and len(set(lvl.tolist())) >= 3
    out = K.multilevel_roi_align(feats, boxes, 3, scales, 0, True)
    ref = reference.multilevel_roi_align(feats, boxes, 3, scales, 0, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    ga = torch.autograd.grad(out, feats, g)
    gr = torch.autograd.grad(ref, feats, g)
    for a, b in zip(ga, gr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_roi_align_reads_channels_last_maps_as_they_are(K):
    """The fast convolutions leave channels-last maps: the kernel reads them in place (no NCHW copy of the pyramid)
    and writes a channels-last result, with the same arithmetic, so outputs and gradients equal the NCHW run's bit
    for bit."""
    RA = importlib.import_module("zoo.kernels.roi_align")
    gen = torch.Generator().manual_seed(12)
    feats, scales, boxes = _pyramid(gen, C=5)
    nhwc = [f.detach().to(memory_format=torch.channels_last).requires_grad_() for f in feats]
    nchw = [f.detach().clone().requires_grad_() for f in feats]
    assert RA._all_channels_last(nhwc) and not RA._all_channels_last(nchw)
    assert not RA._all_channels_last([nhwc[0], nchw[1]])  # mixed layouts: copied to NCHW
    assert not RA._all_channels_last([torch.zeros(2, 3, 1, 1).to(memory_format=torch.channels_last)])
    out = K.multilevel_roi_align(nhwc, boxes, 3, scales, 0, True)
    ref = K.multilevel_roi_align(nchw, boxes, 3, scales, 0, True)
    assert torch.equal(out, ref)
    # the result keeps the maps' layout (what the convolutions after a pooler read)
    assert out.is_contiguous(memory_format=torch.channels_last) and ref.is_contiguous()
    g = torch.randn(out.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(out, nhwc, g), torch.autograd.grad(ref, nchw, g)):
        assert torch.equal(a, b)
    # one level, two images, adaptive and fixed sampling: three channel blocks, the last part-empty (C=70 at 7x7),
    # and two whole ones (C=64), which the kernel reads unmasked, 16 channels aligned (_c_align)
    assert (RA._c_align(70, 32), RA._c_align(64, 32), RA._c_align(1024, 8), RA._c_align(12, 4)) == (1, 16, 8, 4)
    rois = _rois(gen, 2, 12, 16, 0.25)
    for c in (70, 64):
        f = torch.randn(2, c, 12, 16, generator=gen)
        for sr in (0, 2):
            out = K.roi_align(f.to(memory_format=torch.channels_last), rois, 7, 0.25, sr, True)
            assert torch.equal(out, K.roi_align(f, rois, 7, 0.25, sr, True)), (c, sr)
            assert torch.equal(out, K.roi_align(f, rois, 7, 0.25, sr, True, memory_format=torch.channels_last))


@pytest.mark.parametrize("maps_cl", [False, True])
def test_roi_align_result_layout_and_staging(K, maps_cl):
    """memory_format picks the result's layout whatever the maps' (an FC box head wants NCHW from channels-last
    maps), and staging NCHW maps through a channels-last copy (bench_kernels' sweep) changes nothing but speed:
    the same values bit for bit, the same gradients, on the fused FPN pooler and a one-level pooler."""
    RA = importlib.import_module("zoo.kernels.roi_align")
    gen = torch.Generator().manual_seed(15)
    feats, scales, boxes = _pyramid(gen, C=6)
    if maps_cl:
        feats = [f.to(memory_format=torch.channels_last) for f in feats]
    feats = [f.requires_grad_() for f in feats]
    ref = K.multilevel_roi_align(feats, boxes, 7, scales, 0, True)
    default = torch.channels_last if maps_cl else torch.contiguous_format
    other = torch.contiguous_format if maps_cl else torch.channels_last
    assert ref.is_contiguous(memory_format=default) and not ref.is_contiguous(memory_format=other)
    g = torch.randn(ref.shape, generator=gen)
    ref_grads = torch.autograd.grad(ref, feats, g)
    f = feats[0].detach()
    rois = _rois(gen, 2, f.shape[2], f.shape[3], scales[0])
    one = K.roi_align(f, rois, 5, scales[0], 2, True)
    # staging only applies to NCHW maps; channels-last ones are read as they are either way
    for staged, fmt in [(False, other)] + ([] if maps_cl else [(True, None), (True, other)]):
        with RA.forced_staging(staged):
            out = K.multilevel_roi_align(feats, boxes, 7, scales, 0, True, memory_format=fmt)
            assert torch.equal(out, ref) and out.is_contiguous(memory_format=fmt or default), (staged, fmt)
            for a, b in zip(torch.autograd.grad(out, feats, g), ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            out = K.roi_align(f, rois, 5, scales[0], 2, True, memory_format=fmt)
            assert torch.equal(out, one) and out.is_contiguous(memory_format=fmt or default), (staged, fmt)
    # through zoo.ops: the argument is checked, and the torch path lays its result out the same way
    out = ops.multilevel_roi_align(feats, boxes, 7, scales, 0, True, memory_format=other, backend="torch")
    assert out.is_contiguous(memory_format=other)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_format"):
        ops.roi_align(f, rois, 5, scales[0], 2, True, memory_format=torch.preserve_format)


def test_roi_align_any_tile_gives_the_same_result(K):
    """bench_kernels sweeps program tiles, including bin blocks that split a ROI's bins over several programs
    (14x14 = 196 bins in blocks of 32: the last block is 4 bins); each must pool exactly what the default does.
    The FPN pooler on NCHW maps with gradients, the C4 pooler on channels-last maps (forward: its backward is the
    same NCHW kernel)."""
    RA = importlib.import_module("zoo.kernels.roi_align")
    gen = torch.Generator().manual_seed(13)
    feats, scales, boxes = _pyramid(gen, C=6)
    feats = [f.requires_grad_() for f in feats]
    boxes = [boxes[0][:6], boxes[1][:3]]
    f = torch.randn(2, 12, 12, 16, generator=gen).to(memory_format=torch.channels_last)
    rois = _rois(gen, 2, 12, 16, 0.25)[::2]
    fpn = K.multilevel_roi_align(feats, boxes, 7, scales, 0, True)
    g = torch.randn(fpn.shape, generator=gen)
    fpn_grads = torch.autograd.grad(fpn, feats, g)
    c4 = K.roi_align(f, rois, 14, 0.25, 0, True)
    for tile in ((4, 32, 2), (16, 16, 1)):
        with RA.forced_tile(*tile):
            out = K.multilevel_roi_align(feats, boxes, 7, scales, 0, True)
            assert torch.equal(out, fpn), tile
            # the backward's atomic adds may land in another order: close, not equal
            for a, b in zip(torch.autograd.grad(out, feats, g), fpn_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            out = K.roi_align(f, rois, 14, 0.25, 0, True)
            assert torch.equal(out, c4) and out.is_contiguous(memory_format=torch.channels_last), tile
    with pytest.raises(ValueError, match="powers of two"):
        with RA.forced_tile(48, 32, 4):
            pass


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_bin_stride(K, channels_last):
    """Every other bin of 14x14 (the C4 pooler) and every third of 7x9: the full result's bins, bit for bit, in the
    maps' layout, with the full result's gradients."""
    gen = torch.Generator().manual_seed(14)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f = torch.randn(2, 10, 12, 16, generator=gen).to(memory_format=fmt).requires_grad_()
    rois = _rois(gen, 2, 12, 16, 0.25)[::2]
    for size, stride in ((14, 2), ((7, 9), 3)):
        full = K.roi_align(f, rois, size, 0.25, 0, True)[:, :, ::stride, ::stride]
        sub = K.roi_align(f, rois, size, 0.25, 0, True, stride)
        assert torch.equal(sub, full) and sub.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(sub, reference.roi_align(f.detach(), rois, size, 0.25, 0, True,
                                                            bin_stride=stride), rtol=1e-5, atol=1e-5)
        g = torch.randn(sub.shape, generator=gen)
        torch.testing.assert_close(torch.autograd.grad(sub, f, g)[0], torch.autograd.grad(full, f, g)[0],
                                   rtol=1e-5, atol=1e-5)


def test_multilevel_single_level_and_dispatch(K, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(10)
    f = torch.randn(1, 4, 10, 10, generator=gen)
    rois = torch.tensor([[0.0, 10, 10, 100, 70], [0.0, 1, 1, 3, 3]])
    out = ops.multilevel_roi_align([f], rois, 2, [1 / 16], 0, True, backend="triton")
    torch.testing.assert_close(out, ops.roi_align(f, rois, 2, 1 / 16, 0, True), rtol=1e-5,
                               atol=1e-5)
    monkeypatch.setenv("ZOO_OPS", "triton")
    torch.testing.assert_close(ops.roi_align(f, rois, 2, 1 / 16, 0, True), out, rtol=1e-5,
                               atol=1e-5)


def _boxes(gen, n: int, ties: bool):
    xy = torch.rand(n, 2, generator=gen) * 60
    wh = torch.rand(n, 2, generator=gen) * 30
    wh[: n // 8] = 0  # degenerate
    boxes = torch.cat([xy, xy + wh], 1)
    scores = (torch.randint(0, 8, (n,), generator=gen).float() if ties
              else torch.rand(n, generator=gen))
    return boxes, scores


@pytest.mark.parametrize("n", [0, 1, 2, 65, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_nms_matches_torch(K, n, ties):
    gen = torch.Generator().manual_seed(n + 1000 * ties)
    boxes, scores = _boxes(gen, n, ties)
    for thr in (0.3, 0.5, 0.7):
        keep = K.nms(boxes, scores, thr)
        assert keep.dtype == torch.long
        assert torch.equal(keep, reference.nms(boxes, scores, thr))


def test_nms_any_scan_tile_gives_the_same_result(K):
    """bench_kernels sweeps the scan's propagation width, warps and block method: narrow tiles walk the later words
    in several steps, and the kept set must not change."""
    NM = importlib.import_module("zoo.kernels.nms")
    gen = torch.Generator().manual_seed(21)
    boxes, scores = _boxes(gen, 600, False)  # 10 words
    ref = reference.nms(boxes, scores, 0.5)
    for tile in ((1, 1), (2, 2), (4, 1), (64, 4)):
        for method in NM.SCAN_METHODS:
            with NM.forced_scan(*tile, method):
                assert torch.equal(K.nms(boxes, scores, 0.5), ref), (tile, method)
                idx, cnt = K.nms_fixed(boxes, scores, 0.5, 100)  # the early-stop loop
                assert int(cnt) == 100 and torch.equal(idx, ref[:100]), (tile, method)
    with pytest.raises(ValueError, match="powers of two"):
        with NM.forced_scan(3, 1):
            pass
    with pytest.raises(ValueError, match="method must be one of"):
        with NM.forced_scan(16, 1, "parallel"):
            pass


def test_nms_long_suppression_chains(K):
    """A row of boxes, each overlapping the next (IoU 0.6) but not the one after (0.33), scored in order: greedy NMS
    keeps every other box, as the chain resolves one link at a time (the fixpoint method's worst case: a round
    per link, 64 in a block), also across blocks and with a second chain interleaved in the score order."""
    NM = importlib.import_module("zoo.kernels.nms")
    x = torch.arange(150, dtype=torch.float32) * 2.5
    row = torch.stack([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)], 1)
    boxes = torch.cat([row, row + torch.tensor([0.0, 100, 0, 100])])  # a second chain far below the first
    scores = torch.cat([1 - torch.arange(150) / 150, 1 - (torch.arange(150) + 0.5) / 150])
    ref = reference.nms(boxes, scores, 0.5)
    assert len(ref) == 150 and bool((ref % 150 % 2 == 0).all())  # the chains' even boxes
    for method in NM.SCAN_METHODS:
        with NM.forced_scan(16, 1, method):
            assert torch.equal(K.nms(boxes, scores, 0.5), ref), method
            idx, cnt = K.nms_fixed(boxes, scores, 0.5, 100)
            assert int(cnt) == 100 and torch.equal(idx, ref[:100]), method


def test_nms_iou_exactly_at_threshold(K):
    boxes = torch.tensor([[0.0, 0, 3, 1], [1, 0, 4, 1], [0, 0, 4, 1]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU(0,1) = 0.5 exactly, IoU(0,2) = 0.75, IoU(1,2) = 0.75.
    assert K.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert K.nms(boxes, scores, 0.75).tolist() == [0, 1, 2]
    assert K.nms(boxes, scores, 0.25).tolist() == [0]


def test_nms_other_dtypes(K):
    gen = torch.Generator().manual_seed(11)
    boxes, scores = _boxes(gen, 100, False)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(K.nms(boxes.to(dt), scores.to(dt), 0.5),
                           reference.nms(boxes.to(dt), scores.to(dt), 0.5))


def test_nms_fixed(K):
    gen = torch.Generator().manual_seed(12)
    boxes, scores = _boxes(gen, 130, True)
    ref = reference.nms(boxes, scores, 0.5)
    idx, cnt = K.nms_fixed(boxes, scores, 0.5, 200)
    assert idx.shape == (200,) and int(cnt) == ref.numel()
    assert torch.equal(idx[: ref.numel()], ref) and bool((idx[ref.numel():] == -1).all())
    idx, cnt = K.nms_fixed(boxes, scores, 0.5, 7)
    assert int(cnt) == 7 and torch.equal(idx, ref[:7])
    # the scan stops once max_out are kept: around the 64-box blocks it walks, the kept prefix is still exact
    boxes, scores = _boxes(gen, 400, False)
    ref = reference.nms(boxes, scores, 0.5)
    assert ref.numel() > 200
    for max_out in (1, 63, 64, 65, 128, 129, 200):
        idx, cnt = K.nms_fixed(boxes, scores, 0.5, max_out)
        assert int(cnt) == max_out and torch.equal(idx, ref[:max_out]), max_out
    idx, cnt = K.nms_fixed(boxes[:0], scores[:0], 0.5, 4)
    assert idx.tolist() == [-1] * 4 and int(cnt) == 0


@pytest.mark.parametrize("n,classes", [(0, 3), (40, 1), (300, 80), (1100, 5)])
def test_batched_nms_matches_torch(K, n, classes):
    gen = torch.Generator().manual_seed(n + classes)
    boxes, scores = _boxes(gen, n, False)
    idxs = torch.randint(0, classes, (n,), generator=gen)
    # 1100 boxes = 4400 elements > 4000: the per-class regime on CPU tensors.
    assert reference.use_vanilla_batched_nms(boxes) == (n == 1100)
    assert torch.equal(K.batched_nms(boxes, scores, idxs, 0.5),
                       reference.batched_nms(boxes, scores, idxs, 0.5))


def _fixed_case(seed: int, n: int, classes: int, invalid_frac: float):
    gen = torch.Generator().manual_seed(seed)
    boxes, scores = _boxes(gen, n, ties=seed % 2 == 0)
    idxs = torch.randint(0, classes, (n,), generator=gen)
    valid = torch.rand(n, generator=gen) >= invalid_frac
    return boxes, scores, idxs, valid


def _want_fixed(boxes, scores, idxs, valid, thr, max_out, ties_by_index=False):
    """batched_nms over the valid boxes only, mapped back to the original indices; ties_by_index:
    exactly tied scores in index order (the triton path) rather than in torchvision's unstable order."""
    vidx = torch.nonzero(valid).squeeze(1)
    keep = vidx[reference.batched_nms(boxes[vidx], scores[vidx], idxs[vidx], thr)]
    if ties_by_index:
        keep = keep.sort().values
        keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    return keep[:max_out]


# (n, classes): 1100 boxes with few invalid cross torchvision's CPU regime limit (1000 boxes)
@pytest.mark.parametrize("n,classes,invalid", [(0, 3, 0.0), (50, 1, 0.3), (300, 80, 0.5),
                                               (1100, 4, 0.05), (1100, 4, 0.2)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_nms_fixed_equals_batched_nms_of_valid(K, n, classes, invalid, backend):
    boxes, scores, idxs, valid = _fixed_case(n + classes, n, classes, invalid)
    for max_out in (5, 1000):
        want = _want_fixed(boxes, scores, idxs, valid, 0.5, max_out, ties_by_index=backend == "triton")
        out, cnt, complete = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.5, max_out,
                                                   backend=backend)
        assert out.shape == (max_out,) and out.dtype == torch.long
        assert int(cnt) == want.numel() and bool(complete)
        assert torch.equal(out[: want.numel()], want)
        assert bool((out[want.numel():] == -1).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_nms_fixed_capacity(K, backend):
    # one class of heavily overlapping boxes: few survive, so a small capacity is incomplete
    gen = torch.Generator().manual_seed(5)
    n = 400
    xy = torch.rand(n, 2, generator=gen) * 8
    boxes = torch.cat([xy, xy + 40], 1)
    scores = torch.rand(n, generator=gen)
    idxs = torch.zeros(n, dtype=torch.long)
    valid = torch.ones(n, dtype=torch.bool)
    full = _want_fixed(boxes, scores, idxs, valid, 0.7, 50)
    out, cnt, complete = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.7, 50, capacity=n,
                                               backend=backend)
    assert bool(complete) and torch.equal(out[: int(cnt)], full)
    k = 2  # a prefix that keeps >= max_out boxes gives exactly the full result's first ones
    out, cnt, complete = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.7, k,
                                               capacity=3 * k, backend=backend)
    assert bool(complete) == (int(cnt) >= k)
    if bool(complete):
        assert torch.equal(out, full[:k])
    out, cnt, complete = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.7, 50, capacity=4,
                                               backend=backend)
    assert not bool(complete) and int(cnt) <= 4


def test_batched_nms_fixed_invalid_boxes_do_not_suppress(K):
    # the invalid top-scoring box covers the valid one exactly: it must not remove it
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.5, float("nan")])
    idxs = torch.zeros(3, dtype=torch.long)
    valid = torch.tensor([False, True, False])
    for backend in ("torch", "triton"):
        out, cnt, _ = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.5, 3, backend=backend)
        assert out.tolist() == [1, -1, -1] and int(cnt) == 1, backend


def _torchvision_recording():
    from pathlib import Path

    return torch.load(Path(__file__).parent / "fixtures" / "torchvision_ops.pt", weights_only=True)


# tie-heavy recordings in both regimes (300 boxes: coordinate trick; 1100, 1500: per class)
@pytest.mark.parametrize("n", [300, 1100, 1500])
def test_nms_equals_torchvision_recording(K, n):
    cases = [c for c in _torchvision_recording()["nms"] if c["boxes"].shape[0] == n and c["thr"] == 0.5]
    assert len(cases) == 1
    b, s, i = cases[0]["boxes"], cases[0]["scores"], cases[0]["idxs"]
    assert torch.equal(K.nms(b, s, 0.5), cases[0]["nms"])
    assert torch.equal(K.batched_nms(b, s, i, 0.5), cases[0]["batched"])


def test_roi_align_equals_torchvision_recording(K):
    # two of the twelve settings per box kind: the interpreter is slow on the huge boxes' grids
    for case in _torchvision_recording()["roi_align"]:
        for key in ("0_1_7x7", "2_0_2x3"):
            want = case["outputs"][key]
            sr, aligned, size = key.split("_")
            got = K.roi_align(case["x"], case["rois"], tuple(int(v) for v in size.split("x")), case["scale"],
                              int(sr), bool(int(aligned)))
            assert float((got - want).abs().max()) < 2e-6, (case["kind"], key)


@pytest.mark.parametrize("classes", [1, 3, 40])
def test_batched_nms_per_class_groups(K, classes, monkeypatch):
    # above the group size, the per-class regime runs several class-aware launches over whole classes
    # (one class bigger than a group runs alone); the result must not change
    knms = importlib.import_module("zoo.kernels.nms")  # the package's `nms` attribute is the function
    monkeypatch.setattr(knms, "_GROUP", 200)
    gen = torch.Generator().manual_seed(classes)
    boxes, scores = _boxes(gen, 1100, ties=True)
    idxs = torch.randint(0, classes, (1100,), generator=gen)
    assert reference.use_vanilla_batched_nms(boxes)
    for thr in (0.3, 0.6):
        assert torch.equal(K.batched_nms(boxes, scores, idxs, thr),
                           reference.batched_nms(boxes, scores, idxs, thr))


@pytest.mark.parametrize("near_half", [False, True])
def test_paste_masks_matches_torch(K, near_half):
    gen = torch.Generator().manual_seed(21 + near_half)
    n, H, W = 12, 70, 90
    masks = torch.rand(n, 28, 28, generator=gen)
    if near_half:  # every sample close to the threshold: rounding differences would show
        if not interpreter_fma_rounds_once():
            pytest.skip("this triton's interpreter rounds tl.fma twice (compiled code and triton>=3.9 round "
                        "once), so samples at the threshold would differ; the far-from-threshold case still runs")
        masks = 0.5 + (masks - 0.5) * 1e-3
    masks[0] = 1.0  # bleeds only into the one-pixel widened region
    xy = torch.rand(n, 2, generator=gen) * 80 - 10  # some boxes leave the image
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 60 + 0.3], 1)
    boxes[1] = torch.tensor([0.0, 0, 90, 70])
    boxes[2] = torch.tensor([50.5, 5.5, 51.5, 6.5])  # one pixel
    out = ops.paste_masks(masks, boxes, (H, W), 0.5, backend="triton")
    assert out.dtype == torch.bool and out.shape == (n, H, W)
    assert torch.equal(out, ops.paste_masks(masks, boxes, (H, W), 0.5, backend="torch", batched=False))
    assert torch.equal(out, ops.paste_masks(masks, boxes, (H, W), 0.5, backend="torch", batched=True))
    assert ops.paste_masks(masks[:0], boxes[:0], (H, W), backend="triton").shape == (0, H, W)


def test_paste_masks_regions_on_tile_borders(K):
    # the kernel stores zeros without sampling in tiles (16 x 64 pixels) that miss a box's region
    # (floor(x0) - 1 <= x < ceil(x1) + 1): regions that start or end exactly at a tile border, or one pixel
    # past it, must still be pasted whole. A threshold below every sample makes the output the region itself.
    from zoo.kernels import paste as kpaste

    assert (kpaste._BLOCK_H, kpaste._BLOCK_W) == (16, 64), "the boxes below are placed for these tiles"
    H, W = 100, 200
    boxes = torch.tensor([[64.2, 16.4, 127.6, 30.2],  # region cols 63..128, rows 15..31: one past each border
                          [65.0, 17.0, 126.0, 30.0],  # cols 64..127, rows 16..31: exactly the borders
                          [65.5, 17.5, 127.0, 31.0],  # the same region from fractional corners
                          [-50.0, -40.0, -10.0, -5.0],  # outside the image
                          [-1e6, -1e6, 1e6, 1e6],  # covers everything
                          [190.5, 95.5, 199.9, 99.9]])  # the last, partial tiles
    masks = torch.rand(len(boxes), 28, 28, generator=torch.Generator().manual_seed(4))
    out = ops.paste_masks(masks, boxes, (H, W), -1.0, backend="triton")
    want = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ys = slice(max(math.floor(y0) - 1, 0), max(min(math.ceil(y1) + 1, H), 0))
        xs = slice(max(math.floor(x0) - 1, 0), max(min(math.ceil(x1) + 1, W), 0))
        want[i, ys, xs] = True
    assert want[0, 15, 63] and want[0, 31, 128] and not want[1, 15, 63] and want[1, 16, 64] and want[4].all()
    assert torch.equal(out, want)
    assert torch.equal(out, ops.paste_masks(masks, boxes, (H, W), -1.0, backend="torch", batched=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_nms_fixed_coordinate_trick_with_negative_boxes(K, backend):
    # below -1 the offset trick lets classes meet; torchvision's batched_nms does it, so must we
    gen = torch.Generator().manual_seed(31)
    n = 200
    xy = torch.rand(n, 2, generator=gen) * 40 - 60
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 30 + 1], 1)
    scores = torch.rand(n, generator=gen)
    idxs = torch.randint(0, 4, (n,), generator=gen)
    valid = torch.ones(n, dtype=torch.bool)
    want = reference.batched_nms(boxes, scores, idxs, 0.3)
    out, cnt, _ = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.3, n, backend=backend)
    assert torch.equal(out[: int(cnt)], want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared_idxs", [False, True])
def test_batched_nms_fixed_solves_groups_independently(K, backend, shared_idxs):
    # G problems in one call equal G single calls (different valid counts, so different live rows)
    groups, n = 3, 150
    cases = [_fixed_case(40 + g, n, 6, 0.2 * g) for g in range(groups)]
    boxes = torch.stack([c[0] for c in cases])
    scores = torch.stack([c[1] for c in cases])
    idxs = cases[0][2] if shared_idxs else torch.stack([c[2] for c in cases])
    valid = torch.stack([c[3] for c in cases])
    for capacity in (None, 40):
        out, cnt, complete = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.5, 20, capacity, backend=backend)
        assert out.shape == (groups, 20) and cnt.shape == complete.shape == (groups,)
        for g in range(groups):
            gi = idxs if shared_idxs else idxs[g]
            o, c, d = ops.batched_nms_fixed(boxes[g], scores[g], gi, valid[g], 0.5, 20, capacity, backend="torch")
            assert torch.equal(out[g], o) and int(cnt[g]) == int(c) and bool(complete[g]) == bool(d), (g, capacity)


def test_kernels_from_several_threads_at_once(K):
    # threads sharing a model launch kernels at the same time; the interpreter patches triton.language while a kernel
    # runs, and without zoo's launch lock 20 of 24 such runs raised
    gen = torch.Generator().manual_seed(41)
    feat = torch.randn(1, 16, 24, 32, generator=gen)
    rois = _rois(gen, 1, 24, 32, 0.25)
    boxes = torch.rand(120, 4, generator=gen) * 50
    boxes[:, 2:] += boxes[:, :2] + 1
    scores = torch.rand(120, generator=gen)
    masks = torch.rand(6, 14, 14, generator=gen)
    paste_boxes = torch.tensor([[2.0, 3.0, 30.0, 25.0]]).repeat(6, 1)
    jobs = [
        lambda: ops.roi_align(feat, rois, (7, 7), 0.25, 0, True, backend="triton"),
        lambda: ops.nms(boxes, scores, 0.5, backend="triton"),
        lambda: K.paste_masks(masks, paste_boxes, (40, 48), 0.5),
    ]
    want = [job() for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: jobs[i % 3](), range(18)))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % 3]), i


def _epilogue_case(gen, shape, dtype, fmt, residual):
    y = (torch.randn(shape, generator=gen) * 4).to(dtype).contiguous(memory_format=fmt)
    flat = y.permute(0, 2, 3, 1).reshape(-1) if fmt == torch.channels_last else y.view(-1)
    specials = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 0.0, -1e-30])
    flat[:min(6, flat.numel())] = specials[:flat.numel()].to(dtype)  # through the view: y itself changes
    b = torch.randn(shape[1], generator=gen).to(dtype)
    r = None
    if residual == "same":
        r = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    elif residual == "upsampled":
        n, c, h, w = shape
        r = torch.randn(n, c, h // 2, w // 2, generator=gen).to(dtype).contiguous(memory_format=fmt)
    return y, b, r


def _assert_same_bits(out, want):
    assert out.dtype == want.dtype and out.stride() == want.stride()
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.equal(out.signbit() | out.isnan(), want.signbit() | want.isnan())  # -0.0 too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,residual", [(torch.channels_last, None), (torch.channels_last, "same"),
                                          (torch.channels_last, "biased"), (torch.channels_last, "upsampled"),
                                          (torch.contiguous_format, None), (torch.contiguous_format, "same"),
                                          (torch.contiguous_format, "biased")])
@pytest.mark.parametrize("shape", [(2, 5, 6, 4), (1, 80, 4, 10), (1, 2, 70, 66)])
def test_conv_epilogue_is_bit_identical_to_torch_ops(K, dtype, fmt, residual, shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(str(residual)))
    y, b, r = _epilogue_case(gen, shape, dtype, fmt, "same" if residual == "biased" else residual)
    up = residual == "upsampled"
    rb = torch.randn(shape[1], generator=gen).to(dtype) if residual == "biased" else None  # a shortcut's bias
    for relu in (True, False):
        want = ops.conv_epilogue(y.clone(), b, r, relu, upsampled=up, residual_bias=rb, backend="torch")
        # the torch backend is PyTorch's own out-of-place arithmetic, in that order
        expect = y + b.view(1, -1, 1, 1)
        if r is not None:
            shortcut = r if rb is None else r + rb.view(1, -1, 1, 1)
            expect = expect + (torch.nn.functional.interpolate(r, scale_factor=2.0, mode="nearest") if up
                               else shortcut)
        torch.testing.assert_close(want, torch.relu(expect) if relu else expect, rtol=0, atol=0, equal_nan=True)
        got = y.clone()
        out = ops.conv_epilogue(got, b, r, relu, upsampled=up, residual_bias=rb, backend="triton")
        assert out is got  # in place
        _assert_same_bits(out, want)


def test_conv_epilogue_rounds_half_results_like_pytorch(K):
    # fp32 sums exactly halfway between two bf16 / fp16 values (ties to even, up and down), one that carries into
    # the exponent and ones that overflow: the interpreter's own fp32 -> bf16 cast truncates, the kernel must not
    cases = {
        torch.bfloat16: ([1.0, 1 + 2 ** -7, 2 - 2 ** -7, -(1 + 2 ** -7), 3.3e38, 1.0],
                         [2 ** -8, 2 ** -8, 2 ** -8, -(2 ** -8), 3.3e38, 3 * 2 ** -9]),
        torch.float16: ([1.0, 1 + 2 ** -10, 2 - 2 ** -10, -(1 + 2 ** -10), 65504.0, 1.0],
                        [2 ** -11, 2 ** -11, 2 ** -11, -(2 ** -11), 32.0, 3 * 2 ** -12]),
    }
    for dtype, (ys, bs) in cases.items():
        y = torch.tensor(ys).to(dtype).view(1, -1, 1, 1)  # one value per channel, and its own bias
        b = torch.tensor(bs).to(dtype)
        want = ops.conv_epilogue(y.clone(), b, None, False, backend="torch")
        assert want.view(-1)[0] == 1.0 and want.view(-1)[2] == 2.0 and want.view(-1)[4].isinf(), want  # the cases bite
        _assert_same_bits(ops.conv_epilogue(y.clone(), b, None, False, backend="triton"), want)
        r = torch.full_like(y, float(ys[1]) / 64)
        _assert_same_bits(ops.conv_epilogue(y.clone(), b, r, True, backend="triton"),
                          ops.conv_epilogue(y.clone(), b, r, True, backend="torch"))


def test_conv_epilogue_odd_layouts_and_sizes(K):
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(2, 6, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    b = torch.randn(6, generator=gen)
    r_nchw = torch.randn(2, 6, 4, 4, generator=gen)  # another layout than y's: PyTorch's ops run it
    want = ops.conv_epilogue(y.clone(), b, r_nchw, backend="torch")
    _assert_same_bits(ops.conv_epilogue(y.clone(), b, r_nchw, backend="triton"), want)
    # no bias (so -0.0 and NaN meet the relu as they are); an empty batch; a non-dense output
    y[0, :2, 0, 0] = torch.tensor([-0.0, float("nan")])
    _assert_same_bits(ops.conv_epilogue(y.clone(), None, None, backend="triton"), torch.relu(y))
    empty = torch.empty(0, 6, 4, 4)
    assert ops.conv_epilogue(empty, b, None, backend="triton").shape == (0, 6, 4, 4)
    sliced = torch.randn(2, 6, 4, 8, generator=gen)[..., ::2]
    _assert_same_bits(ops.conv_epilogue(sliced.clone(), b, backend="triton"),
                      ops.conv_epilogue(sliced.clone(), b, backend="torch"))
    from zoo.kernels import epilogue

    assert epilogue.supports(y, b, None, False) and not epilogue.supports(sliced, b, None, False)
    assert not epilogue.supports(y, b, r_nchw, False) and not epilogue.supports(y.double(), None, None, False)
    assert not epilogue.supports(y, b, torch.randn(2, 6, 2, 2), True)  # upsampled: channels-last only
    assert not epilogue.supports(y, b, None, False, residual_bias=b)  # a residual's bias needs a residual
    with pytest.raises(ValueError, match="residual_bias needs a residual"):
        ops.conv_epilogue(y.clone(), b, None, residual_bias=b, backend="triton")
