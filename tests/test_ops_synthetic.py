"""The benchmark helpers: the per-level baseline pooler agrees with our fused multi-level pooler; the NMS inputs
overlap as described."""
import types

import torch

from zoo import ops
from zoo.ops.reference import boxes_to_rois
from zoo.ops.synthetic import clustered_proposals, random_proposals, torchvision_pooler

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_per_level_pooler_equals_multilevel_roi_align():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, int(200 * s), int(304 * s), generator=g) for s in SCALES]
    boxes = random_proposals(64, 1, height=200.0, width=304.0, smin=4.0, smax=200.0)
    assert boxes.shape == (64, 4) and bool((boxes[:, 2:] >= boxes[:, :2]).all())
    # torchvision's roi_align signature, served by our reference op
    fake_tv = types.SimpleNamespace(roi_align=lambda f, r, size, s, sr, aligned: ops.roi_align(
        f, r, (size, size), s, sr, aligned, backend="torch"))
    rois = boxes_to_rois([boxes])
    got = torchvision_pooler(fake_tv, feats, rois, 7, SCALES, 0)
    want = ops.multilevel_roi_align(feats, [boxes], (7, 7), SCALES, 0, backend="torch")
    torch.testing.assert_close(got, want)


def test_clustered_proposals_suppress_like_an_rpn():
    """bench_kernels' sweep times the NMS scan on these: about half survive NMS at IoU 0.7 (the networks' RPN NMS
    kept 42% in a CPU run), where random_proposals' scattered boxes nearly all survive."""
    boxes, scores = clustered_proposals(2000, 3)
    assert boxes.shape == (2000, 4) and scores.shape == (2000,)
    kept = len(ops.nms(boxes, scores, 0.7, backend="torch")) / 2000
    scattered = random_proposals(2000, 3, smax=300.0)
    kept_scattered = len(ops.nms(scattered, torch.rand(2000, generator=torch.Generator().manual_seed(0)), 0.7,
                                 backend="torch")) / 2000
    assert 0.3 < kept < 0.7 and kept_scattered > 0.9, (kept, kept_scattered)
