"""Strict weight loading, the synthetic-weight generator, and the folded-FrozenBN cache."""
from __future__ import annotations

import hashlib
import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.errors import CheckpointError
from zoo.modeling import build_model, load_weights
from zoo.modeling.layers import Conv2d, FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).parent))
from synth_weights import synth_state_dict, synth_tensor  # noqa: E402
from user_support import state_dict_keys  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_GENERATOR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "synth_weights.py"
SMALL = "faster_rcnn_R_50_C4_1x"  # the smallest baseline


@pytest.fixture(scope="module")
def model():
    return build_model(zoo.get_manifest(SMALL).architecture)


def _own_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_accepts_numpy_and_tensors(model):
    sd = _own_state(model)
    sd["roi_heads.box_predictor.cls_score.bias"] = np.arange(81, dtype=np.float32)
    sd["backbone.stem.conv1.norm.running_var"] = torch.full((64,), 2.0)
    load_weights(model, sd)
    assert model.roi_heads.box_predictor.cls_score.bias.tolist() == list(range(81))
    assert model.backbone.stem.conv1.norm.running_var.tolist() == [2.0] * 64


def test_strict_load_reports_every_problem_on_one_line(model):
    sd = _own_state(model)
    del sd["backbone.res2.0.conv1.weight"]
    sd["roi_heads.extra.weight"] = torch.zeros(3)
    sd["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(4, 2048)
    with pytest.raises(CheckpointError) as ei:
        load_weights(model, sd)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "1 missing (backbone.res2.0.conv1.weight)" in msg
    assert "1 unexpected (roi_heads.extra.weight)" in msg
    assert "1 shape-mismatched (roi_heads.box_predictor.bbox_pred.weight: checkpoint [4, 2048] vs model [320, 2048])" in msg
    assert "use the checkpoint released for this model name" in msg


def test_strict_load_truncates_long_lists(model):
    other = build_model(zoo.get_manifest("faster_rcnn_R_50_FPN_1x").architecture).state_dict()
    with pytest.raises(CheckpointError) as ei:
        load_weights(model, other)
    msg = str(ei.value)
    n_missing = len(set(model.state_dict()) - set(other))
    assert f"{n_missing} missing (" in msg and ", ...)" in msg
    assert "\n" not in msg


def test_strict_load_rejects_non_mapping_and_garbage(model):
    with pytest.raises(CheckpointError, match="mapping"):
        load_weights(model, [1, 2, 3])
    sd = _own_state(model)
    sd["backbone.stem.conv1.weight"] = "not an array"
    with pytest.raises(CheckpointError, match="not an array"):
        load_weights(model, sd)


def test_failed_load_leaves_model_untouched(model):
    before = model.backbone.stem.conv1.weight.clone()
    sd = _own_state(model)
    sd["backbone.stem.conv1.weight"] = torch.ones_like(before)
    del sd["roi_heads.res5.0.conv1.weight"]
    with pytest.raises(CheckpointError):
        load_weights(model, sd)
    assert torch.equal(model.backbone.stem.conv1.weight, before)


def test_nan_entry_leaves_model_untouched(model):
    sd = _own_state(model)
    first = next(iter(sd))
    before = model.state_dict()[first].clone()
    sd[first] = torch.full_like(before, 7.0)
    last = list(sd)[-1]
    sd[last] = torch.full_like(sd[last], float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_weights(model, sd)
    assert torch.equal(model.state_dict()[first], before)


def test_released_pkl_layout_round_trip(model, tmp_path):
    keys = state_dict_keys(SMALL)
    sd = synth_state_dict(keys, seed=7)
    path = tmp_path / "model_final_synthetic.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": sd, "__author__": "synthetic", "matching_heuristics": False}, f)
    load_weights(model, zoo.load_checkpoint(path))
    got = model.state_dict()
    for k in ("backbone.stem.conv1.weight", "roi_heads.res5.2.conv3.norm.bias", "proposal_generator.rpn_head.conv.bias"):
        assert np.array_equal(got[k].numpy(), sd[k])


# sha256 prefixes of tensors from the published scheme (checked bit-identical against the shared generator)
PINNED = [
    ("backbone.bottom_up.stem.conv1.weight", (64, 3, 7, 7), 1.0, "c39540ee873d3e6b"),
    ("backbone.bottom_up.stem.conv1.weight", (64, 3, 7, 7), 57.63, "aaf4bdb1628a3927"),
    ("backbone.res2.0.conv1.norm.running_var", (64,), 1.0, "f4cba3955a2235d2"),
    ("roi_heads.mask_head.deconv.weight", (256, 256, 2, 2), 1.0, "48eddbf72315a538"),
    ("roi_heads.box_predictor.cls_score.bias", (81,), 1.0, "598a667ce62c462e"),
    ("proposal_generator.rpn_head.objectness_logits.bias", (3,), 1.0, "d0d1ef1ef84d78b4"),
    ("roi_heads.box_predictor.bbox_pred.weight", (320, 1024), 1.0, "5725b52d799f1cc7"),
    ("backbone.res3.0.conv3.weight", (512, 128, 1, 1), 1.0, "3ad492061d1f4620"),
]


@pytest.mark.parametrize("name,shape,pixel_std,digest", PINNED)
def test_synth_weights_pinned(name, shape, pixel_std, digest):
    arr = synth_tensor(name, shape, 20261124, pixel_std)
    assert arr.dtype == np.float32 and arr.shape == shape
    assert hashlib.sha256(arr.tobytes()).hexdigest()[:16] == digest


@pytest.mark.skipif(not SHARED_GENERATOR.is_file(), reason="shared fixture generator not present")
@pytest.mark.parametrize("name", ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_1x"])
def test_synth_weights_match_shared_generator(name):
    spec = importlib.util.spec_from_file_location("shared_synth", SHARED_GENERATOR)
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    keys = state_dict_keys(name)
    for seed, ps in ((20261124, 1.0), (5, 57.63)):
        ours = synth_state_dict(keys, seed, ps)
        theirs = shared.synth_state_dict(keys, seed, ps)
        assert all(ours[k].tobytes() == theirs[k].tobytes() for k in keys)


def test_folded_frozen_bn_matches_and_follows_reloads():
    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(16))
    with torch.no_grad():
        conv.norm.weight.uniform_(0.5, 1.5)
        conv.norm.bias.normal_()
        conv.norm.running_mean.normal_()
        conv.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 9, 9)

    def unfolded():
        with torch.no_grad():
            y = torch.nn.functional.conv2d(x, conv.weight, None, 1, 1)
            return torch.nn.functional.batch_norm(y, conv.norm.running_mean, conv.norm.running_var,
                                                  conv.norm.weight, conv.norm.bias, False, 0.0, 1e-5)

    with torch.inference_mode():
        assert torch.equal(conv(x), unfolded())  # unfolded by default: Detectron2's two ops
        conv.fold_norm = True
        torch.testing.assert_close(conv(x), unfolded(), rtol=1e-5, atol=1e-5)
        assert conv._folded is not None
    # a later in-place load must invalidate the folded copy
    sd = {k: v * 1.5 for k, v in conv.state_dict().items()}
    conv.load_state_dict(sd)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), unfolded(), rtol=1e-5, atol=1e-5)
    assert "_folded" not in "".join(conv.state_dict())


def test_folded_copy_in_autocast_dtype_gives_the_same_result():
    # under autocast the folded copy is kept in bf16; conv2d would have cast the fp32 copy the same way
    torch.manual_seed(1)
    conv = Conv2d(8, 16, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(16))
    conv.fold_norm = True  # as GeneralizedRCNN sets it for fast convolutions
    with torch.no_grad():
        conv.norm.weight.uniform_(0.5, 1.5)
        conv.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 9, 9)
    with torch.inference_mode():
        fp32_w, fp32_b = conv._folded_params("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = torch.nn.functional.conv2d(x, fp32_w, fp32_b, 1, 1)
            got = conv(x)
            assert conv._folded[0].dtype == torch.bfloat16
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
        assert conv(x).dtype == torch.float32 and conv._folded[0].dtype == torch.float32


def test_a_model_built_without_random_init_loads_to_the_same_state(model):
    """zoo.get skips the random fills of a model it then loads (most of the build's time): after the load every
    parameter and buffer, the non-persistent ones (pixel mean and std, cell anchors) included, equals a randomly
    initialised model's after the same load."""
    import threading

    from zoo.modeling.detector import _NoRandomInit

    sd = model.state_dict()  # the module fixture's weights, whatever earlier tests loaded
    bare = build_model(zoo.get_manifest(SMALL).architecture, random_init=False)
    load_weights(bare, sd)
    got, want = dict(bare.named_buffers()), dict(model.named_buffers())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    got, want = dict(bare.named_parameters()), dict(model.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the skip holds in the building thread only: another thread's modules are still randomly initialised
    inside, done = threading.Event(), threading.Event()

    def hold():
        with _NoRandomInit():
            inside.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        inside.wait(30)
        assert torch.nn.Linear(256, 256).weight.std() > 0.01
    finally:
        done.set()
        t.join()
