"""Unit checks of the pieces: anchors, box decoding, mask pasting, and predict end to end on a small input."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.modeling.anchors import AnchorGenerator, cell_anchors
from zoo.modeling.box_coder import Box2BoxTransform, clip_boxes, nonempty
from zoo.modeling.mask_paste import paste_masks_in_image, rescale_boxes
from zoo.results import Detections

sys.path.insert(0, str(Path(__file__).parent))
from user_support import small_synthetic_model, top_matched  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def test_cell_anchors_values_and_order():
    a = cell_anchors([32, 64], [0.5, 1.0, 2.0])
    assert a.shape == (6, 4) and a.dtype == torch.float32
    w = math.sqrt(32 * 32 / 0.5)
    assert a[0].tolist() == pytest.approx([-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2])
    assert a[4].tolist() == [-32.0, -32.0, 32.0, 32.0]  # size 64, ratio 1
    # centred at zero, no rounding
    assert torch.allclose(a[:, :2] + a[:, 2:], torch.zeros(6, 2))


def test_grid_anchors_follow_y_x_anchor_order():
    gen = AnchorGenerator([[32], [64]], [[0.5, 1.0, 2.0]], [4, 8], 0.0)
    lv = gen.grid_anchors([(3, 5), (2, 3)])
    assert [x.shape[0] for x in lv] == [3 * 5 * 3, 2 * 3 * 3]
    base = cell_anchors([64], [0.5, 1.0, 2.0])
    y, x, k = 1, 2, 1
    assert torch.equal(lv[1][(y * 3 + x) * 3 + k], base[k] + torch.tensor([x * 8.0, y * 8.0, x * 8.0, y * 8.0]))


def test_box_decoding_identity_and_scale_clamp():
    t = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 4.0, 8.0]])
    assert torch.allclose(t.apply_deltas(torch.zeros(2, 8), boxes), boxes.repeat(1, 2))
    big = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    out = t.apply_deltas(big, torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert out[0, 2] - out[0, 0] == pytest.approx(1000.0, rel=1e-5)  # exp(log(1000/16)) * 16
    assert out[0, 3] - out[0, 1] == pytest.approx(1000.0, rel=1e-5)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
@pytest.mark.parametrize("n,k", [(300, 81), (4700, 1), (0, 81)])
def test_decoding_x_and_y_as_pairs_gives_the_per_coordinate_results(weights, n, k):
    # Detectron2's weights (wx == wy, ww == wh) take the paired form; it must equal the per-coordinate one bit for
    # bit, NaN, clamped and infinite deltas included
    class Unequal(float):  # a weight that compares unequal to everything: forces the per-coordinate form
        def __eq__(self, other):
            return False

        __hash__ = float.__hash__

    g = torch.Generator().manual_seed(n + k)
    boxes = torch.rand(n, 4, generator=g) * 500
    boxes[:, 2:] += boxes[:, :2]
    deltas = torch.randn(n, 4 * k, generator=g) * 3
    if n:
        deltas[0, 0], deltas[1, 2], deltas[2, 3] = float("nan"), 50.0, -float("inf")
    per_coordinate = Box2BoxTransform(weights)
    per_coordinate.weights = (Unequal(weights[0]), weights[1], Unequal(weights[2]), weights[3])
    want = per_coordinate.apply_deltas(deltas, boxes)
    got = Box2BoxTransform(weights).apply_deltas(deltas, boxes)
    assert got.shape == want.shape == deltas.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_clip_and_nonempty_are_strict():
    b = clip_boxes(torch.tensor([[-5.0, -1.0, 20.0, 30.0], [3.0, 3.0, 3.0, 9.0]]), (10, 12))
    assert b.tolist() == [[0.0, 0.0, 12.0, 10.0], [3.0, 3.0, 3.0, 9.0]]
    assert nonempty(b).tolist() == [True, False]
    assert nonempty(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), 2.0).tolist() == [False]


def test_clip_with_sizes_on_the_device_equals_clip_with_numbers():
    # the fixed-shape path passes one (h, w) per image as tensors; each image must clip as with plain numbers
    boxes = torch.randn(2, 50, 4, generator=torch.Generator().manual_seed(0)) * 400 + 100
    boxes[0, 0] = torch.tensor([float("nan"), -float("inf"), float("inf"), -0.0])
    sizes = torch.tensor([[240.0, 320.0], [311.0, 97.0]])
    got = clip_boxes(boxes, (sizes[:, 0:1], sizes[:, 1:2]))
    for i, (h, w) in enumerate(sizes.tolist()):
        want = clip_boxes(boxes[i], (h, w))
        torch.testing.assert_close(got[i], want, rtol=0, atol=0, equal_nan=True)


def test_rescale_boxes_to_original():
    b = rescale_boxes(torch.tensor([[0.0, 0.0, 800.0, 938.0], [100.0, 50.0, 2000.0, 60.0]]), (938, 800), (600, 512))
    assert b[0].tolist() == pytest.approx([0.0, 0.0, 512.0, 600.0])
    assert b[1, 2].item() == 512.0  # clipped


def _paste_reference(mask: torch.Tensor, box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Whole-image grid_sample for one box, restricted to its region widened by one pixel."""
    x0, y0, x1, y1 = box.tolist()
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    gy = (ys - y0) / (y1 - y0) * 2 - 1
    gx = (xs - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack([gx[None, :].expand(h, w), gy[:, None].expand(h, w)], dim=2)[None]
    out = F.grid_sample(mask[None, None], grid, align_corners=False)[0, 0] >= 0.5
    region = torch.zeros(h, w, dtype=torch.bool)
    r0, c0 = max(int(math.floor(y0)) - 1, 0), max(int(math.floor(x0)) - 1, 0)
    region[r0:min(int(math.ceil(y1)) + 1, h), c0:min(int(math.ceil(x1)) + 1, w)] = True
    return out & region


@pytest.mark.parametrize("batched", [False, True])
def test_paste_masks_matches_reference(batched):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 28, 28, generator=g)
    masks[0] = 1.0  # a full mask bleeds past its box only within the widened region
    boxes = torch.tensor([[10.3, 20.7, 130.2, 40.9], [0.0, 0.0, 64.0, 48.0], [50.5, 5.5, 51.5, 6.5],
                          [-3.0, 30.0, 20.0, 47.0], [60.0, 40.0, 63.9, 47.9]])
    out = paste_masks_in_image(masks, boxes, (48, 64), 0.5, batched=batched)
    assert out.dtype == torch.bool and out.shape == (5, 48, 64)
    for i in range(5):
        assert torch.equal(out[i], _paste_reference(masks[i], boxes[i], 48, 64)), i
    assert paste_masks_in_image(masks[:0], boxes[:0], (48, 64)).shape == (0, 48, 64)


@pytest.fixture(scope="module")
def small_model():
    """Mask R-CNN R50-FPN with synthetic weights, fed at a reduced test size to keep this fast."""
    return small_synthetic_model("mask_rcnn_R_50_FPN_3x", 224, 400)


def test_predict_single_and_list(small_model):
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(FIXTURES / "images" / "grace_hopper.png")
                     .convert("RGB"))
    det = small_model.predict(img)
    assert isinstance(det, Detections)
    assert det.image_size == (600, 512)
    n = len(det)
    assert 0 < n <= 100
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == torch.float32
    assert det.labels.dtype == torch.int64 and int(det.labels.min()) >= 0 and int(det.labels.max()) < 80
    assert bool((det.scores > 0.05).all()) and bool((det.scores[:-1] >= det.scores[1:]).all())
    assert bool((det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= 512).all() and (det.boxes[:, 3] <= 600).all())
    assert det.masks is not None and det.masks.shape == (n, 600, 512) and det.masks.dtype == torch.bool
    det.boxes += 1  # results are ordinary tensors
    # a batch of same-sized images gives the same per-image results as single calls
    flipped = np.ascontiguousarray(img[:, ::-1])
    both = small_model.predict([img, flipped])
    assert isinstance(both, list) and len(both) == 2
    single_flipped = small_model.predict(flipped)
    torch.testing.assert_close(both[0].boxes, det.boxes - 1, atol=1e-3, rtol=0)
    torch.testing.assert_close(both[1].scores, single_flipped.scores, atol=1e-4, rtol=0)
    assert torch.equal(both[1].labels, single_flipped.labels)


def test_predict_returns_the_pasted_masks_without_a_copy(small_model, monkeypatch):
    """Masks at the original size are the largest result (100 x 12 MP is 1.2 GB): predict hands over the tensor the
    paste wrote, an ordinary one that callers may edit in place, instead of copying it out of inference mode."""
    from zoo import ops

    pasted = []
    paste = ops.paste_masks
    monkeypatch.setattr(ops, "paste_masks", lambda *a, **k: pasted.append(paste(*a, **k)) or pasted[-1])
    for static in (False, True):
        small_model.static_shapes = static
        try:
            det = small_model.predict(FIXTURES / "images" / "scene_427x640.png")
        finally:
            small_model.static_shapes = None
        assert len(det) > 0 and det.masks.data_ptr() == pasted[-1].data_ptr(), static
        assert not det.masks.is_inference() and not det.boxes.is_inference()
        det.masks[0] = ~det.masks[0]  # in place, outside inference mode
        det.boxes[0] += 1


def test_predict_iter_pastes_each_images_masks_as_it_hands_it_over(small_model, monkeypatch):
    """A batch's masks are not pasted all at once: each image's are made when its turn comes, so a batch of large
    photos holds one image's N x H x W masks at a time, not batch_size of them."""
    from zoo import ops

    pasted = []
    paste = ops.paste_masks
    monkeypatch.setattr(ops, "paste_masks", lambda m, *a, **k: pasted.append(len(m)) or paste(m, *a, **k))
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(FIXTURES / "images" / "scene_427x640.png")
                     .convert("RGB"))
    for static in (False, True):
        small_model.static_shapes = static
        pasted.clear()
        try:
            it = small_model.predict_iter([img, img[::-1].copy(), img], batch_size=3, workers=0)
            first = next(it)
            assert pasted == [len(first)], static  # one forward ran for all three, one paste so far
            rest = list(it)
        finally:
            small_model.static_shapes = None
        assert pasted == [len(d) for d in [first, *rest]] and len(rest) == 2
        assert torch.equal(first.masks, rest[1].masks)


def test_trace_exposes_intermediates(small_model):
    tr = small_model.trace(FIXTURES / "images" / "wide_300x1400.png")
    assert tr.batch.image_sizes == [(86, 400)] and tuple(tr.batch.tensor.shape[-2:]) == (96, 416)
    assert sorted(tr.features) == ["p2", "p3", "p4", "p5", "p6"]
    assert tr.features["p2"].shape[-2:] == (24, 104)
    p = tr.proposals[0]
    assert p.boxes.shape[1] == 4 and bool((p.objectness_logits[:-1] >= p.objectness_logits[1:]).all())
    assert len(tr.detections) == 1 and tr.detections[0].image_size == (300, 1400)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(small_model):
    img = FIXTURES / "images" / "scene_427x640.png"
    cpu = small_model.predict(img)
    gpu_model = small_model.to("cuda")
    try:
        gpu = gpu_model.predict(img)
    finally:
        small_model.to("cpu")
    assert gpu.boxes.device.type == "cuda"
    assert abs(len(gpu) - len(cpu)) <= 2
    # TF32 convolutions may reorder near-tied scores, so each confident CPU box is looked up, not indexed
    assert top_matched(cpu, gpu, 20, 0.95) >= 0.95


@pytest.mark.parametrize("ties", [False, True])
def test_rpn_prefix_nms_equals_full_nms(ties):
    from zoo import ops
    from zoo.modeling.rpn import _nms_topk

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(3000, 2, generator=g) * 200
    wh = torch.rand(3000, 2, generator=g) * 60 + 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randn(3000, generator=g)
    if ties:  # the full result orders exact ties by torchvision's unstable sort: no prefix can know it
        scores = (scores * 8).round() / 8
    scores = torch.sort(scores, descending=True).values
    levels = torch.zeros(3000, dtype=torch.int64)
    for k in (50, 300, 1000):
        full = ops.batched_nms(boxes, scores, levels, 0.7)[:k]
        assert torch.equal(_nms_topk(boxes, scores, levels, 0.7, k, single_level=True), full)


def test_no_detections_gives_empty_results(small_model):
    heads = small_model.roi_heads
    old = heads.score_thresh
    heads.score_thresh = 1.0  # softmax never exceeds it strictly
    try:
        det = small_model.predict(np.zeros((40, 60, 3), dtype=np.uint8))
    finally:
        heads.score_thresh = old
    assert len(det) == 0 and det.image_size == (40, 60)
    assert det.boxes.shape == (0, 4) and det.labels.dtype == torch.int64
    assert det.masks is not None and det.masks.shape == (0, 40, 60)


def test_exact_convs_are_detectron2s_ops(small_model):
    """On CPU (default) each conv+FrozenBN is Detectron2's conv2d then batch_norm on NCHW tensors, bit for bit."""
    assert small_model.fast_convs is None and not small_model.uses_fast_convs("cpu")
    small_model.trace(FIXTURES / "images" / "wide_300x1400.png")
    conv = small_model.backbone.bottom_up.res2[0].conv2
    assert not conv.fold_norm and conv.weight.is_contiguous()
    x = torch.randn(1, conv.in_channels, 37, 53, generator=torch.Generator().manual_seed(0))
    n = conv.norm
    with torch.inference_mode():
        want = F.batch_norm(F.conv2d(x, conv.weight, None, conv.stride, conv.padding), n.running_mean,
                            n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        assert torch.equal(conv(x), want)


def test_fast_convs_switch_layout_and_back(small_model):
    image = FIXTURES / "images" / "wide_300x1400.png"
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    exact = small_model.trace(image).features
    conv = small_model.backbone.bottom_up.res2[0].conv2
    try:
        small_model.fast_convs = True
        fast = small_model.trace(image).features
        assert conv.fold_norm and conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert fast["p2"].is_contiguous(memory_format=torch.channels_last)
        for k in exact:  # folding rounds differently, within float noise
            torch.testing.assert_close(fast[k], exact[k], rtol=1e-4, atol=1e-4)
    finally:
        small_model.fast_convs = None
    again = small_model.trace(image).features
    assert not conv.fold_norm and conv.weight.is_contiguous()
    assert all(torch.equal(again[k], exact[k]) for k in exact)
    after = small_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # converted inside predict's inference mode, yet still trainable parameters
    assert not any(p.is_inference() for p in small_model.parameters())


def test_c4_head_chunks_do_not_change_its_outputs():
    """res5 runs over the ROIs in chunks (250 on CPU, 1000 on CUDA) to bound memory: the class logits, box deltas
    and mask logits must not depend on where the chunks split."""
    from zoo.modeling.roi_heads import Res5ROIHeads
    from zoo.ops.synthetic import random_proposals

    heads = small_synthetic_model("mask_rcnn_R_50_C4_1x").roi_heads
    assert (Res5ROIHeads.chunk_size, Res5ROIHeads.cuda_chunk_size) == (250, 1000)
    gen = torch.Generator().manual_seed(6)
    feature = torch.randn(1, 1024, 20, 30, generator=gen)
    boxes = [random_proposals(23, 1, height=320.0, width=480.0, smax=300.0)]
    outs = {}
    for size in (250, 23, 5):
        heads.chunk_size = size  # the instance's own, as a user would tune it
        with torch.no_grad():
            logits, deltas = heads._predict(feature, boxes)
            masks = torch.cat([heads.mask_head(x) for x in heads._res5_chunks(feature, boxes)])
        outs[size] = (logits, deltas, masks)
    for size in (23, 5):
        for ours, whole in zip(outs[size], outs[250]):
            torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)


def test_c4_head_pools_only_the_bins_res5_reads():
    """Res5ROIHeads pools every other bin and runs res5's first block at stride 1: Detectron2's full 14x14 pooling
    followed by the stride-2 block gives the same features."""
    import zoo
    from zoo import ops
    from zoo.modeling.backbone.resnet import make_stage, res5_stage_args
    from zoo.modeling.roi_heads import Res5ROIHeads
    from zoo.ops.reference import boxes_to_rois
    from zoo.ops.synthetic import random_proposals

    heads = small_synthetic_model("mask_rcnn_R_50_C4_1x").roi_heads
    first = heads.res5[0]
    assert heads.pooler.bin_stride == 2
    assert first.conv1.stride == first.shortcut.stride == first.conv2.stride == (1, 1)
    arch = zoo.get_manifest("mask_rcnn_R_50_C4_1x").architecture
    d2_res5 = make_stage(first_stride=2, **res5_stage_args(arch.resnet))
    d2_res5.load_state_dict(heads.res5.state_dict())
    gen = torch.Generator().manual_seed(5)
    feature = torch.randn(1, 1024, 20, 30, generator=gen)
    rois = boxes_to_rois([random_proposals(12, 0, height=320.0, width=480.0, smax=300.0)])
    with torch.no_grad():
        ours = heads.res5(heads.pooler([feature], rois))
        theirs = d2_res5.eval()(ops.roi_align(feature, rois, 14, 1 / 16, 0, True))
    assert ours.shape == theirs.shape == (12, 2048, 7, 7)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # with the stride on the 3x3 convolution the first block reads every bin: the full grid is pooled
    other = arch.model_copy(update={"resnet": arch.resnet.model_copy(update={"stride_in_1x1": False})})
    heads = Res5ROIHeads(other, {"res4": (1024, 16)})
    assert heads.pooler.bin_stride == 1 and heads.res5[0].conv2.stride == (2, 2)
