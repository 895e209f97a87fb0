"""Compiled Triton kernels on CUDA at full sizes, against torchvision and the torch path.

torchvision is imported only inside the tests that compare with it.
"""

from __future__ import annotations


import pytest
import torch

from zoo import ops
from zoo.ops import reference
from zoo.ops.synthetic import random_proposals, torchvision_pooler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEV = "cuda"
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _tv():
    return pytest.importorskip("torchvision.ops", reason="torchvision not installed")


def _proposals(n: int, seed: int, **kw) -> torch.Tensor:
    return random_proposals(n, seed, device=DEV, **kw)


def _pyramid(C: int = 256, dtype=torch.float32, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, C, 800 // int(1 / s), 1216 // int(1 / s), generator=g, device=DEV,
                        dtype=dtype) for s in SCALES]


def _tv_pooler(feats, boxes, size, scales, sr):
    """Detectron2's ROIPooler built from torchvision roi_align + index_put."""
    return torchvision_pooler(_tv(), feats, reference.boxes_to_rois([boxes]), size, scales, sr)


def test_fpn_pooler_matches_torchvision():
    feats = _pyramid()
    boxes = _proposals(1000, 1)
    out = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
    torch.testing.assert_close(out, _tv_pooler(feats, boxes, 7, SCALES, 0), rtol=1e-4,
                               atol=1e-4)
    # The torch path (written to mirror the CPU kernels) on CUDA: a sample that falls exactly on a bin or image edge
    # may round to the other side (H100, 2026-11-27: 3 of 12.5M outputs, 1.4e-4 off), so allow a few such outputs.
    ref = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="torch")
    far = ((out - ref).abs() > 1e-4 + 1e-4 * ref.abs()).sum().item()
    assert far <= 1e-6 * out.numel(), far
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-3)


def test_channels_last_maps_give_the_nchw_result():
    """The networks' channels-last maps are read in place, with the same arithmetic as NCHW ones."""
    feats = _pyramid()
    boxes = _proposals(1000, 11)
    cl = [f.to(memory_format=torch.channels_last) for f in feats]
    for size in (7, 14):
        assert torch.equal(ops.multilevel_roi_align(cl, [boxes], size, SCALES, 0, True, backend="triton"),
                           ops.multilevel_roi_align(feats, [boxes], size, SCALES, 0, True, backend="triton"))
    g = torch.Generator(device=DEV).manual_seed(12)
    res4 = torch.randn(2, 1024, 50, 76, generator=g, device=DEV)
    rois = reference.boxes_to_rois([_proposals(300, 13), _proposals(300, 14)])
    assert torch.equal(ops.roi_align(res4.to(memory_format=torch.channels_last), rois, 14, 1 / 16, 0, True,
                                     backend="triton"),
                       ops.roi_align(res4, rois, 14, 1 / 16, 0, True, backend="triton"))


def test_result_layout_and_staging_keep_the_values():
    """An NCHW result from channels-last maps (the FC box heads' pooler), and NCHW maps staged through a
    channels-last copy (the sweep's candidate), compiled: the same values as the default, bit for bit."""
    from zoo import kernels

    feats = _pyramid()
    boxes = _proposals(1000, 15)
    cl = [f.to(memory_format=torch.channels_last) for f in feats]
    ref = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
    out = ops.multilevel_roi_align(cl, [boxes], 7, SCALES, 0, True, memory_format=torch.contiguous_format,
                                   backend="triton")
    assert out.is_contiguous() and torch.equal(out, ref)
    with kernels.forced_roi_align_staging():
        out = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
    assert out.is_contiguous() and torch.equal(out, ref)


def test_mask_pooler_and_c4_match_torchvision():
    tv = _tv()
    feats = _pyramid()
    boxes = _proposals(100, 2)
    out = ops.multilevel_roi_align(feats, [boxes], 14, SCALES, 0, True, backend="triton")
    torch.testing.assert_close(out, _tv_pooler(feats, boxes, 14, SCALES, 0), rtol=1e-4,
                               atol=1e-4)
    g = torch.Generator(device=DEV).manual_seed(3)
    res4 = torch.randn(1, 1024, 50, 76, generator=g, device=DEV)
    boxes = _proposals(1000, 4)
    out = ops.roi_align(res4, [boxes], 14, 1 / 16, 0, True, backend="triton")
    exp = tv.roi_align(res4, [boxes], 14, 1 / 16, 0, True)
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    # what Res5ROIHeads pools: every other bin, on the channels-last res4 of the fast convolutions
    res4_cl = res4.to(memory_format=torch.channels_last)
    out = ops.roi_align(res4_cl, [boxes], 14, 1 / 16, 0, True, bin_stride=2, backend="triton")
    torch.testing.assert_close(out, exp[:, :, ::2, ::2], rtol=1e-4, atol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("sr,aligned", [(0, True), (0, False), (2, True), (2, False)])
def test_roi_align_matches_torchvision_edge_boxes(sr, aligned):
    tv = _tv()
    g = torch.Generator(device=DEV).manual_seed(5)
    f = torch.randn(2, 64, 100, 152, generator=g, device=DEV)
    rois = reference.boxes_to_rois([_proposals(300, 6, smin=0.1, smax=3000.0) - 200,
                                    _proposals(300, 7, smin=0.1, smax=3000.0)])
    rois[:20, 3:] = rois[:20, 1:3] - 5  # inverted boxes
    out = ops.roi_align(f, rois, 7, 1 / 8, sr, aligned, backend="triton")
    torch.testing.assert_close(out, tv.roi_align(f, rois, 7, 1 / 8, sr, aligned),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_torch_path(dtype):
    feats = _pyramid(C=64, dtype=dtype)
    boxes = _proposals(500, 8)
    out = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
    ref = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="torch")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_backward_matches_torch_path():
    feats = [f.requires_grad_() for f in _pyramid(C=32)]
    boxes = _proposals(300, 9)
    out = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
    ref = ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="torch")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, feats, g), torch.autograd.grad(ref, feats, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_pooler_does_not_sync():
    feats = _pyramid(C=64)
    boxes = _proposals(1000, 10)
    scores = torch.rand(1000, device=DEV)
    ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
    ops.nms_fixed(boxes, scores, 0.7, 300, backend="triton")  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.multilevel_roi_align(feats, [boxes], 7, SCALES, 0, True, backend="triton")
        ops.nms_fixed(boxes, scores, 0.7, 300, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("n", [1, 1000, 4700, 12000, 30000, 200000])
def test_nms_matches_torchvision(n):
    tv = _tv()
    boxes = _proposals(n, 11 + n, smax=300.0)
    scores = torch.rand(n, device=DEV)
    for thr in (0.5, 0.7):
        keep = ops.nms(boxes, scores, thr, backend="triton")
        assert torch.equal(keep, tv.nms(boxes, scores, thr))
        if n <= 30000:  # the CPU reference is quadratic
            assert torch.equal(keep.cpu(), reference.nms(boxes.cpu(), scores.cpu(), thr))


@pytest.mark.parametrize("n,classes", [(4700, 80), (4741, 5), (6000, 80), (80000, 80), (40000, 1)])
def test_batched_nms_matches_torchvision(n, classes):
    # 4700x80: the ROI-heads case; 4741x5: RPN per-level (coordinate trick on GPU);
    # 6000 boxes = 24000 elements > 20000: torchvision's per-class loop regime; 80000x80: several
    # class groups (zoo.kernels.nms._GROUP); 40000x1: one class larger than a group.
    tv = _tv()
    boxes = _proposals(n, 20 + n, smax=300.0)
    scores = torch.rand(n, device=DEV)
    idxs = torch.randint(0, classes, (n,), device=DEV)
    keep = ops.batched_nms(boxes, scores, idxs, 0.5, backend="triton")
    assert torch.equal(keep, tv.batched_nms(boxes, scores, idxs, 0.5))


def test_nms_fixed_in_cuda_graph():
    boxes = _proposals(2000, 30, smax=300.0)
    scores = torch.rand(2000, device=DEV)
    expect = ops.nms(boxes, scores, 0.7, backend="torch")
    ops.nms_fixed(boxes, scores, 0.7, 1000, backend="triton")  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, cnt = ops.nms_fixed(boxes, scores, 0.7, 1000, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    k = min(1000, expect.numel())
    assert int(cnt) == k and torch.equal(idx[:k], expect[:k])
    scores.copy_(torch.rand(2000, device=DEV))
    graph.replay()
    expect = ops.nms(boxes, scores, 0.7, backend="torch")
    k = min(1000, expect.numel())
    assert int(cnt) == k and torch.equal(idx[:k], expect[:k])


def test_paste_masks_matches_torch_path():
    g = torch.Generator(device=DEV).manual_seed(40)
    masks = torch.rand(100, 28, 28, generator=g, device=DEV)
    boxes = _proposals(100, 41, smax=400.0, height=938.0, width=800.0)
    out = ops.paste_masks(masks, boxes, (938, 800), 0.5, backend="triton")
    ref = ops.paste_masks(masks, boxes, (938, 800), 0.5, backend="torch", batched=True)
    assert out.dtype == torch.bool and out.shape == ref.shape
    # the same arithmetic up to the compiler's contractions: at most a handful of threshold flips
    assert (out != ref).sum().item() <= 10, (out != ref).sum().item()
    cpu = ops.paste_masks(masks.cpu(), boxes.cpu(), (938, 800), 0.5, backend="torch")
    assert (out.cpu() != cpu).sum().item() <= 10
