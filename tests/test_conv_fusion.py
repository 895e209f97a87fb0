"""What follows a convolution: bias, residual add and relu.

- cudnn_fusion: cuDNN's fused conv + bias (+ residual) + relu on CUDA, an opt-in switch of GeneralizedRCNN. On CPU
  the switch changes nothing (the fused kernels are cuDNN's); the CUDA tests compare fused and unfused runs.
- The Triton epilogue (zoo.ops.conv_epilogue), which conv_relu and conv_plus_upsampled run on CUDA in place of
  PyTorch's separate passes: here under the interpreter (ZOO_OPS=triton), against the same arithmetic in PyTorch's
  ops; on CUDA bit for bit against PyTorch's own conv with bias.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import torch

# the interpreter must be chosen before triton is first imported (see test_kernels_triton.py)
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from zoo.errors import InputError  # noqa: E402
from zoo.modeling.layers import (  # noqa: E402
    Conv2d, FrozenBatchNorm2d, _inference_params, _unbiased, conv_plus_upsampled, conv_relu, cudnn_fusion,
    epilogue_backend)

sys.path.insert(0, str(Path(__file__).parent))
from interpreter_support import require_working_interpreter  # noqa: E402
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


@pytest.fixture
def epilogue_launches(monkeypatch):
    """ZOO_OPS=triton with zoo.kernels in the interpreter; the list grows by one per epilogue kernel launch."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (a CPU-only host); the CUDA tests "
                    "below cover the compiled kernel")
    pytest.importorskip("triton")
    kernels = importlib.import_module("zoo.kernels")
    if not kernels.INTERPRET:
        pytest.skip("zoo.kernels was already imported in compiled mode")
    require_working_interpreter()
    launches = []
    real = kernels.conv_epilogue
    monkeypatch.setattr(kernels, "conv_epilogue", lambda *a, **kw: launches.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setenv("ZOO_OPS", "triton")
    return launches


def _head_convs():
    """A folded conv+norm with channels-last weights (the backbone's, as fast_convs runs it), a plain conv (the
    heads'), a transposed conv (the mask head's deconv)."""
    folded = _norm_conv(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
    folded.fold_norm = True
    torch.manual_seed(3)
    return {"folded": folded, "plain": nn.Conv2d(8, 16, 3, padding=1).eval(),
            "deconv": nn.ConvTranspose2d(8, 16, 2, stride=2).eval()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["folded", "plain", "deconv"])
def test_conv_relu_runs_the_triton_epilogue(epilogue_launches, kind, dtype):
    conv = _head_convs()[kind]
    fmt = torch.channels_last if kind == "folded" else torch.contiguous_format
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 10, 12, generator=gen).contiguous(memory_format=fmt)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        w, b = _inference_params(conv, x)
        y = _unbiased(conv, x, w)
        residuals = [None] if kind == "deconv" else [None, torch.randn(y.shape, generator=gen).to(y.dtype)
                                                     .contiguous(memory_format=fmt)]
        for r in residuals:
            # the same arithmetic in PyTorch's ops: conv without bias, bias, residual, relu
            want = y + b.view(1, -1, 1, 1)
            want = torch.relu(want if r is None else want + r)
            n = len(epilogue_launches)
            got = conv_relu(conv, x, residual=r)
            assert len(epilogue_launches) == n + 1
            assert torch.equal(got, want) and got.dtype == want.dtype and got.stride() == want.stride()
            # and conv_relu's PyTorch path (CPU convolutions add their bias their own way: close, not equal)
            with epilogue_backend("torch"):
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(conv_relu(conv, x, residual=r), got, rtol=tol, atol=tol)
            assert len(epilogue_launches) == n + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_end_folds_the_shortcuts_bias_into_the_epilogue(epilogue_launches, dtype):
    conv3 = _norm_conv(8, 16, 1).to(memory_format=torch.channels_last)
    shortcut = _norm_conv(12, 16, 1, stride=2).to(memory_format=torch.channels_last)
    conv3.fold_norm = shortcut.fold_norm = True
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    block_in = torch.randn(2, 12, 10, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        got = conv_relu(conv3, x, residual=block_in, shortcut=shortcut)
        assert len(epilogue_launches) == 1  # one pass for both biases, the add and the relu
        w, b = _inference_params(conv3, x)
        ws, bs = _inference_params(shortcut, block_in)
        s = _unbiased(shortcut, block_in, ws) + bs.view(1, -1, 1, 1)  # PyTorch's shortcut: conv, then its bias
        want = torch.relu(_unbiased(conv3, x, w) + b.view(1, -1, 1, 1) + s)
        assert torch.equal(got, want) and got.dtype == want.dtype
        with epilogue_backend("torch"):
            torch.testing.assert_close(conv_relu(conv3, x, residual=shortcut(block_in)), got,
                                       rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                       atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert len(epilogue_launches) == 1


def test_fpn_sum_runs_the_triton_epilogue(epilogue_launches):
    conv = _head_convs()["plain"].to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 10, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    top = torch.randn(2, 16, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = conv_plus_upsampled(conv, x, top)
        assert epilogue_launches == [(2, 16, 10, 12)]
        up = F.interpolate(top, scale_factor=2.0, mode="nearest")
        assert torch.equal(got, F.conv2d(x, conv.weight, None, padding=1) + conv.bias.view(1, -1, 1, 1) + up)
        with epilogue_backend("torch"):  # Detectron2's own expression
            assert torch.equal(conv_plus_upsampled(conv, x, top), conv(x) + up)
        nchw = conv_plus_upsampled(conv, x.contiguous(), top.contiguous())  # not the kernel's layout: PyTorch's ops
        torch.testing.assert_close(nchw, got, rtol=1e-5, atol=1e-5)
    assert len(epilogue_launches) == 1


def _pytorch_cuda_convs(monkeypatch) -> None:
    """Make CPU convolutions with a bias run as PyTorch's CUDA ones do: the convolution without it (cuDNN takes
    none), then `add_` of the bias, the pass the epilogue replaces. oneDNN adds the bias inside its convolution,
    which rounds differently for some shapes (a stride-2 block end here)."""
    for name in ("conv2d", "conv_transpose2d"):
        real = getattr(F, name)

        def conv(x, w, b=None, *args, _real=real):
            y = _real(x, w, None, *args)  # under autocast: in autocast's dtype, which the bias is cast to first
            return y if b is None else y.add_(b.to(y.dtype).view(1, -1, 1, 1))
        monkeypatch.setattr(F, name, conv)


@pytest.mark.parametrize("name,dtype", [
    pytest.param(name, dtype, id=f"{name}-{str(dtype or 'fp32').replace('torch.', '')}")
    for name, dtype in [("mask_rcnn_R_50_FPN_3x", None), ("faster_rcnn_X_101_32x8d_FPN_3x", None),
                        ("faster_rcnn_R_50_DC5_1x", None), ("mask_rcnn_R_50_C4_1x", None),
                        ("mask_rcnn_R_50_FPN_3x", torch.bfloat16), ("mask_rcnn_R_50_C4_1x", torch.float16)]])
def test_whole_networks_are_bit_identical_with_the_epilogue(epilogue_launches, monkeypatch, name, dtype):
    """Every conv_relu and FPN sum of a baseline's backbone, RPN head, C4 res5 head and mask head (stem, strided
    and dilated blocks, grouped convolutions, shortcut biases, upsampled sums, deconvolution) through the Triton
    epilogue equals PyTorch's passes bit for bit, given convolutions that add their bias as PyTorch's CUDA ones do."""
    _pytorch_cuda_convs(monkeypatch)
    m = small_synthetic_model(name, min_size=64, max_size=96)
    m.fast_convs = True
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 64, 96, generator=gen)
    heads = [("rpn", m.proposal_generator.rpn_head, lambda f: [f[k] for k in m.proposal_generator.in_features])]

    def pooled(channels: int):  # stands in for a pooler's ROIs (channels-last, as the Triton pooler writes them)
        rois = torch.randn(3, channels, 14, 14, generator=gen).relu().contiguous(memory_format=torch.channels_last)
        return lambda features: rois
    res5 = getattr(m.roi_heads, "res5", None)  # C4's box head
    if res5 is not None:
        heads.append(("res5", res5, pooled(res5[0].conv1.in_channels)))
    mask_head = getattr(m.roi_heads, "mask_head", None)
    if mask_head is not None:
        first = mask_head.mask_fcn1 if hasattr(mask_head, "mask_fcn1") else mask_head.deconv
        heads.append(("mask", mask_head, pooled(first.in_channels)))
    runs = []
    # under autocast (dtype: bf16 or fp16, as precision="bf16"/"fp16" runs) each step rounds to that dtype
    numeric = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), numeric:
        x = x.contiguous(memory_format=m._lay_out_convs(x.device))
        for backend in ("torch", None):
            with epilogue_backend(backend):
                start = len(epilogue_launches)
                features = m.backbone(x)
                outs = dict(features)
                for key, head, inputs in heads:
                    out = head(inputs(features))
                    outs.update({f"{key}{i}": t for i, t in enumerate(torch.utils._pytree.tree_leaves(out))})
                runs.append((outs, len(epilogue_launches) - start))
    (ref, none), (got, launched) = runs
    assert none == 0 and launched > 10  # the torch run used no kernel; the default one used it throughout
    assert ref.keys() == got.keys()
    for key in ref:
        assert ref[key].dtype == (dtype or torch.float32) and torch.equal(ref[key], got[key]), key


def test_epilogue_leaves_calls_that_need_gradients_alone(epilogue_launches):
    conv = _head_convs()["plain"]
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    out = conv_relu(conv, x)
    assert out.grad_fn is not None and epilogue_launches == []
    out.sum().backward()
    assert conv.weight.grad is not None


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_block_end_with_a_shortcut(dtype):
    # fused, cuDNN adds conv3's and the shortcut's biases as one (their sum): close to the unfused block end
    conv3 = _norm_conv(8, 16, 1).cuda().to(memory_format=torch.channels_last)
    shortcut = _norm_conv(12, 16, 1, stride=2).cuda().to(memory_format=torch.channels_last)
    conv3.fold_norm = shortcut.fold_norm = True
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 20, 18, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    block_in = torch.randn(2, 12, 40, 36, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        x, block_in = x.to(dtype), block_in.to(dtype)
        want = conv_relu(conv3, x, residual=block_in, shortcut=shortcut)
        with cudnn_fusion(True):
            got = conv_relu(conv3, x, residual=block_in, shortcut=shortcut)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


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


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_epilogue_is_bit_identical_to_pytorchs_passes(dtype):
    # the same cuDNN convolution, then either PyTorch's bias add_, residual add and relu_ or the one Triton pass
    gen = torch.Generator().manual_seed(6)
    convs = {k: c.cuda() for k, c in _head_convs().items()}
    convs["plain_nhwc"] = _head_convs()["plain"].cuda().to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True), \
            torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        for kind, conv in convs.items():
            fmt = torch.contiguous_format if kind in ("plain", "deconv") else torch.channels_last
            x = torch.randn(2, 8, 40, 36, generator=gen).cuda().contiguous(memory_format=fmt)
            want = {}
            with epilogue_backend("torch"):
                want["relu"] = conv_relu(conv, x)
                if kind != "deconv":
                    r = (want["relu"] - 0.5).contiguous(memory_format=fmt)  # a residual with negatives
                    want["residual"] = conv_relu(conv, x, residual=r)
            got = {"relu": conv_relu(conv, x)}
            if kind != "deconv":
                got["residual"] = conv_relu(conv, x, residual=r)
            for case in want:
                assert got[case].dtype == want[case].dtype and got[case].stride() == want[case].stride()
                assert torch.equal(got[case], want[case]), (kind, case, (got[case] - want[case]).abs().max())
        # a block's end with a projection shortcut: its bias joins the epilogue
        conv3 = convs["folded"]
        shortcut = _norm_conv(12, 16, 1, stride=2).cuda().to(memory_format=torch.channels_last)
        shortcut.fold_norm = True
        x = torch.randn(2, 8, 20, 18, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
        block_in = torch.randn(2, 12, 40, 36, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
        with epilogue_backend("torch"):
            want = conv_relu(conv3, x, residual=block_in, shortcut=shortcut)
        got = conv_relu(conv3, x, residual=block_in, shortcut=shortcut)
        assert got.dtype == want.dtype and torch.equal(got, want), (got - want).abs().max()
        # the FPN's top-down sum
        lateral = convs["plain_nhwc"]
        x = torch.randn(2, 8, 40, 36, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
        top = torch.randn(2, 16, 20, 18, generator=gen).cuda().to(lateral(x).dtype)
        top = top.contiguous(memory_format=torch.channels_last)
        with epilogue_backend("torch"):
            want = conv_plus_upsampled(lateral, x, top)
        got = conv_plus_upsampled(lateral, x, top)
        assert got.dtype == want.dtype and torch.equal(got, want)


@cuda
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_cuda_predict_with_the_epilogue_is_identical(model, precision):
    img = fixture_image("grace_hopper")
    m = model.cuda()
    try:
        m.precision = precision
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            with epilogue_backend("torch"):
                ref = m.predict(img)
            out = m.predict(img)
    finally:
        m.precision = None
        model.cpu()
    assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.scores, ref.scores)
    assert torch.equal(out.labels, ref.labels) and torch.equal(out.masks, ref.masks)
