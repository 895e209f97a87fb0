"""Test-time settings chosen at zoo.get (score_thresh, nms_thresh, detections_per_image, min_size, max_size):
validated before anything is built or downloaded, and each changes the detections the way Detectron2's config
keys do (compared with the default model on the same synthetic weights)."""
from __future__ import annotations

import pytest
import torch

import zoo
from synth_weights import synth_state_dict
from user_support import box_iou, fixture_image, state_dict_keys
from zoo.manifest import TEST_SETTINGS
from zoo.modeling import load_weights

NAME = "faster_rcnn_R_50_FPN_3x"
SMALL = {"min_size": 320, "max_size": 512}  # small inputs keep the CPU tests fast


def _model(**settings):
    m = zoo.get(NAME, pretrained=False, **{**SMALL, **settings})
    load_weights(m, synth_state_dict(state_dict_keys(NAME)))
    return m


@pytest.fixture(scope="module")
def default_dets():
    return _model().predict(fixture_image("grace_hopper"))


def _assert_same(a, b):
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


def test_with_test_settings_replaces_only_what_is_given():
    arch = zoo.get_manifest(NAME).architecture
    assert arch.test_settings() == {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_image": 100,
                                    "min_size": 800, "max_size": 1333}  # Detectron2's test-time values
    new = arch.with_test_settings(score_thresh=0.3, detections_per_image=20, nms_thresh=None)
    assert new.test_settings() == {**arch.test_settings(), "score_thresh": 0.3, "detections_per_image": 20}
    assert new.model_copy(update={"roi_heads": arch.roi_heads}) == arch  # nothing else changed
    assert zoo.get_manifest(NAME).architecture.roi_heads.score_thresh_test == 0.05  # the registry's is untouched
    with pytest.raises(TypeError, match="unknown test-time setting"):
        arch.with_test_settings(score_threshold=0.3)
    assert set(TEST_SETTINGS) == set(arch.test_settings())


@pytest.mark.parametrize("kwargs, needle", [
    ({"score_thresh": 1.5}, "score_thresh=1.5 is not allowed (input should be less than or equal to 1)"),
    ({"nms_thresh": 0.0}, "nms_thresh=0.0 is not allowed (input should be greater than 0)"),
    ({"detections_per_image": 0}, "detections_per_image=0 is not allowed"),
    ({"detections_per_image": 2.0}, "pass an integer in range, or None for the manifest's 100"),
    ({"min_size": "800"}, "min_size='800' is not allowed"),
    ({"max_size": True}, "max_size=True is not allowed"),
])
def test_bad_settings_fail_before_any_download(kwargs, needle, tmp_path, monkeypatch):
    # offline with an empty cache: had zoo.get gone on to the weights, the error would be about them
    monkeypatch.setenv("ZOO_HOME", str(tmp_path))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(zoo.errors.InputError) as e:
        zoo.get(NAME, pretrained=True, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_model_uses_the_settings_and_keeps_the_published_manifest():
    m = zoo.get(NAME, pretrained=False, score_thresh=0.3, nms_thresh=0.4, detections_per_image=7, min_size=600,
                max_size=1000)
    assert (m.roi_heads.score_thresh, m.roi_heads.nms_thresh, m.roi_heads.detections_per_image) == (0.3, 0.4, 7)
    assert (m.min_size_test, m.max_size_test) == (600, 1000)
    assert m.arch.test_settings()["detections_per_image"] == 7
    assert m.manifest.architecture.test_settings()["detections_per_image"] == 100


def test_detections_per_image_keeps_the_best(default_dets):
    assert len(default_dets) == 100
    for static in (False, True):  # both inference paths
        m = _model(detections_per_image=10)
        m.static_shapes = static
        d = m.predict(fixture_image("grace_hopper"))
        _assert_same(d, default_dets[:10])


def test_higher_score_thresh_keeps_the_default_instances_above_it(default_dets):
    # per-class NMS decides a box from higher-scoring boxes only, so raising the threshold only drops boxes
    # a threshold halfway between the 30th and 31st best scores (so none equals it)
    s = default_dets.scores.double()
    t = float(s[29] + s[30]) / 2
    assert s[29] > t > s[30]
    d = _model(score_thresh=t).predict(fixture_image("grace_hopper"))
    _assert_same(d, default_dets[:30])


def test_lower_nms_thresh_leaves_no_same_class_overlap_above_it(default_dets):
    def worst_overlap(d):
        iou = box_iou(d.boxes.double(), d.boxes.double())
        iou[d.labels[:, None] != d.labels[None, :]] = 0
        iou.fill_diagonal_(0)
        return float(iou.max())

    assert worst_overlap(default_dets) > 0.3  # the default (0.5) leaves such pairs, so the check below can fail
    d = _model(nms_thresh=0.3).predict(fixture_image("grace_hopper"))
    assert len(d) > 0 and worst_overlap(d) <= 0.3


def test_min_and_max_size_set_the_resize():
    m = zoo.get(NAME, pretrained=False, min_size=256, max_size=300)
    tr = m.trace(fixture_image("grace_hopper"))  # 600 x 512 (h x w): the short side goes to 256
    assert tr.batch.image_sizes == [(300, 256)]  # 256 / 512 * 600 = 300: the long side meets max_size exactly
    tr = m.trace(fixture_image("wide_300x1400"))
    assert tr.batch.image_sizes == [(64, 300)]  # capped by max_size: 300 / 1400 * 300 = 64.3
