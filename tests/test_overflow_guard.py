"""fp16's overflow guard (zoo.modeling.overflow): a batch whose heads saw inf or NaN is recomputed at the device's
default precision, on both inference paths.

fp16 runs on CUDA only. On CPU the guard is exercised under bf16 (added to the guarded precisions for the test),
with an inf written into one backbone stage's output only while autocast is on, as an fp16 overflow would write
it: the recompute (fp32 on CPU) must then give exactly the fp32 detections. The CUDA test makes fp16 overflow for
real.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.modeling import overflow
from zoo.modeling.layers import autocast_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_support import fixture_image, small_synthetic_model  # noqa: E402

NAME = "mask_rcnn_R_50_FPN_3x"


@pytest.fixture(scope="module")
def model():
    m = small_synthetic_model(NAME)
    m.fast_convs = True  # one weight layout for bf16 and its fp32 recompute (as on CUDA, where it always is)
    return m


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(fixture_image("scene_427x640"))


def _same(a, b) -> bool:
    return (torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
            and torch.equal(a.masks, b.masks))


def _predict(model, image, **settings):
    """predict with these attributes set (restored after), and the RuntimeWarnings it gave."""
    saved = {k: getattr(model, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(model, k, v)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.predict(image)
    finally:
        for k, v in saved.items():
            setattr(model, k, v)
    return out, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _inf_under_autocast(module: torch.nn.Module):
    """Make `module` write an inf into its output whenever autocast is on (what an fp16 overflow does)."""
    def hook(_module, _inputs, out):
        if autocast_dtype(out.device.type) is None:
            return None
        out = out.clone()
        out[:, :, 3, 5] = float("inf")
        return out
    return module.register_forward_hook(hook)


def test_notes_flag_inf_and_nan_and_only_inside_a_guard():
    finite = torch.ones(3, 4, dtype=torch.float16)
    with overflow.overflow_guard(True) as notes:
        overflow.note(finite, finite.float())
        assert bool(overflow.all_finite(notes))
        for bad in (float("inf"), float("-inf"), float("nan")):
            with overflow.overflow_guard(True) as inner:
                t = finite.clone()
                t[1, 2] = bad
                overflow.note(finite, t)
                assert not bool(overflow.all_finite(inner)), bad
        assert len(notes) == 2  # the inner guards collected their own notes
    with overflow.overflow_guard(False) as off:
        assert off is None
        overflow.note(torch.tensor([float("nan")]))  # nothing collects it: no error, no effect
    overflow.note(torch.tensor([float("nan")]))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "fixed-shape"])
def test_an_overflowed_batch_is_recomputed_at_the_default_precision(model, image, monkeypatch, static):
    ref, quiet = _predict(model, image, precision="fp32", static_shapes=static)
    assert not quiet and len(ref) > 0
    monkeypatch.setattr(overflow, "GUARDED_PRECISIONS", frozenset({"bf16", "fp16"}))
    handle = _inf_under_autocast(model.backbone.bottom_up.res3)
    try:
        out, said = _predict(model, image, precision="bf16", static_shapes=static)
        # and the guard is what saves it: unguarded, bf16 hands on detections from the inf-filled features
        monkeypatch.setattr(overflow, "GUARDED_PRECISIONS", frozenset())
        unguarded, silent = _predict(model, image, precision="bf16", static_shapes=static)
    finally:
        handle.remove()
    assert _same(out, ref)
    assert len(said) == 1 and "bf16 overflowed" in said[0] and "again in fp32" in said[0], said
    assert not silent and not _same(unguarded, ref)


def test_trace_of_an_overflowed_image_holds_the_recomputed_instances(model, image, monkeypatch):
    model.precision = "fp32"
    try:
        ref = model.trace(image).instances[0]
        monkeypatch.setattr(overflow, "GUARDED_PRECISIONS", frozenset({"bf16"}))
        handle = _inf_under_autocast(model.backbone.bottom_up.res4)
        model.precision, model.static_shapes = "bf16", True
        with pytest.warns(RuntimeWarning, match="overflowed"):
            got = model.trace(image).instances[0]
    finally:
        handle.remove()
        model.precision, model.static_shapes = "fp32", None
    assert torch.equal(got.boxes, ref.boxes) and torch.equal(got.scores, ref.scores)


def test_the_guard_changes_nothing_when_nothing_overflows(model, image, monkeypatch):
    plain, _ = _predict(model, image, precision="bf16")
    monkeypatch.setattr(overflow, "GUARDED_PRECISIONS", frozenset({"bf16"}))
    for static in (False, True):
        guarded, said = _predict(model, image, precision="bf16", static_shapes=static)
        assert not said and _same(guarded, plain)


def _overflowing_in_fp16(model, image) -> None:
    """Scale res2's first block so that its conv2 output peaks at 4x fp16's largest value (a positive one, which its
    relu passes on), and its conv3 weights down by as much: the same function in exact arithmetic (relu(k x) =
    k relu(x)), float32 holds the values easily, fp16 turns them into inf. Real networks overflow fp16 this way, in
    large intermediate activations."""
    block = model.backbone.bottom_up.res2[0]
    peak = []

    def measure(_block, args):  # conv2's largest output after its relu (on CUDA conv_relu calls no conv's forward)
        with torch.no_grad():
            peak.append(float(block.conv2(torch.relu(block.conv1(args[0]))).max()))
    handle = block.register_forward_pre_hook(measure)
    model.predict(image)
    handle.remove()
    with torch.no_grad():
        k = 4 * 65504 / peak[0]
        block.conv2.norm.weight.mul_(k)
        block.conv2.norm.bias.mul_(k)
        block.conv3.weight.div_(k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fp16 runs on CUDA only")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_fp16_overflow_on_cuda_is_recomputed_in_tf32(image, graphs, monkeypatch):
    m = small_synthetic_model(NAME).to("cuda")
    _overflowing_in_fp16(m, image)
    ref, quiet = _predict(m, image)  # the default, tf32
    assert not quiet and len(ref) > 0
    for _ in range(3 if graphs else 1):  # with graphs: eager, capture, replay
        out, said = _predict(m, image, precision="fp16", cuda_graphs=graphs)
        assert len(said) == 1 and "fp16 overflowed" in said[0] and "again in tf32" in said[0], said
        assert _same(out, ref)
    # unguarded, the same fp16 run loses detections without a word (on CPU's fp16 autocast: all 100 of them)
    monkeypatch.setattr(overflow, "GUARDED_PRECISIONS", frozenset())
    lost, silent = _predict(m, image, precision="fp16")
    assert not silent and len(lost) < len(ref)
