"""cudnn_fusion: cuDNN's fused conv + bias (+ residual) + relu on CUDA, an opt-in switch of GeneralizedRCNN.

On CPU the switch changes nothing (the fused kernels are cuDNN's); the CUDA tests compare fused and unfused runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import InputError
from zoo.modeling.layers import Conv2d, FrozenBatchNorm2d, conv_relu, cudnn_fusion

sys.path.insert(0, str(Path(__file__).parent))
from user_support import fixture_image, small_synthetic_model, top_matched  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model():
    return small_synthetic_model("mask_rcnn_R_50_FPN_3x")


def _norm_conv(cin: int, cout: int, k: int, **kw) -> Conv2d:
    gen = torch.Generator().manual_seed(cin * 100 + cout + k)
    conv = Conv2d(cin, cout, k, bias=False, norm=FrozenBatchNorm2d(cout), **kw)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        for name in ("weight", "bias", "running_mean"):
            getattr(conv.norm, name).copy_(torch.randn(cout, generator=gen) * 0.5)
        conv.norm.running_var.copy_(torch.rand(cout, generator=gen) + 0.5)
    return conv.eval()


def test_conv_relu_is_relu_of_conv_plus_residual():
    conv = _norm_conv(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 12)
    r = torch.randn(2, 16, 10, 12)
    with torch.inference_mode():
        assert torch.equal(conv_relu(conv, x), F.relu(conv(x)))
        assert torch.equal(conv_relu(conv, x, residual=r), F.relu(conv(x) + r))
        with cudnn_fusion(True):  # no effect on CPU tensors
            assert torch.equal(conv_relu(conv, x, residual=r), F.relu(conv(x) + r))


def test_switch_is_validated_and_keys_graphs(model):
    with pytest.raises(InputError, match="cudnn_fusion is True or False"):
        model.cudnn_fusion = 1
    before = model.graph_settings()
    model.cudnn_fusion = True
    try:
        assert model.graph_settings() != before  # a graph captured without fusion is not replayed with it
    finally:
        model.cudnn_fusion = False


def test_cpu_predict_unchanged_by_the_switch(model):
    img = fixture_image("grace_hopper")
    ref = model.predict(img)
    model.cudnn_fusion = True
    try:
        out = model.predict(img)
    finally:
        model.cudnn_fusion = False
    assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.scores, ref.scores)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,stride,dilation,groups", [(1, 1, 1, 1), (1, 2, 1, 1), (3, 1, 1, 1), (3, 2, 1, 1),
                                                      (3, 1, 2, 1), (3, 1, 1, 8)])
def test_cuda_fused_equals_unfused(dtype, k, stride, dilation, groups):
    conv = _norm_conv(32, 64, k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
                      groups=groups).cuda().to(memory_format=torch.channels_last)
    conv.fold_norm = True
    plain = nn.Conv2d(32, 64, k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
                      groups=groups).cuda()
    x = torch.randn(2, 32, 24, 20, generator=torch.Generator().manual_seed(k * 10 + stride)).cuda()
    x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        xx = x.to(dtype)
        r = conv(xx)  # a residual of the output's shape, layout and dtype
        for c in (conv, plain):
            want = conv_relu(c, xx)
            want_r = conv_relu(c, xx, residual=r)
            with cudnn_fusion(True):
                got = conv_relu(c, xx)
                got_r = conv_relu(c, xx, residual=r)
            tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(got_r, want_r, **tol)
            assert got.dtype == want.dtype


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_predict_with_fusion_matches_without(model, precision):
    img = fixture_image("grace_hopper")
    m = model.cuda()
    try:
        m.precision = precision
        ref = m.predict(img)
        m.cudnn_fusion = True
        out = m.predict(img)
    finally:
        m.cudnn_fusion = False
        m.precision = "fp32"
        model.cpu()
    assert top_matched(ref, out, 25, 0.9) >= 0.95
