"""Small building blocks shared by the backbone and heads: FrozenBatchNorm, a conv that owns its norm, and the
numeric switches of a forward pass (cuDNN's fused conv + relu, TF32 for the box head's fc layers)."""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on `device_type` now, or None when it is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except TypeError:  # torch < 2.4: one function per device
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _no_grad_call(conv: nn.Conv2d) -> bool:
    """Whether this call of `conv` needs no gradient: only then may it run a cached or fused form of itself."""
    return not (torch.is_grad_enabled() and conv.weight.requires_grad)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all stored as buffers (Detectron2 layout)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) so that y = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the frozen affine transform, with Detectron2's ops (so its rounding too)."""
        if x.requires_grad:
            scale, shift = self.scale_shift()
            return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class Conv2d(nn.Conv2d):
    """nn.Conv2d with an optional FrozenBatchNorm child named `norm`.

    With `fold_norm` set (GeneralizedRCNN's fast convolutions), inference folds the norm into a cached
    copy of the conv weight and bias: one op instead of two, but different rounding from Detectron2's
    conv-then-batch_norm, which is what runs otherwise. The parameters and buffers (and so the
    state_dict) stay exactly as in Detectron2 either way.
    """

    def __init__(self, *args, norm: Optional[FrozenBatchNorm2d] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.fold_norm = False
        self._fold_key: Optional[tuple] = None
        self._folded: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def _folded_params(self, device_type: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        norm = self.norm
        assert norm is not None
        # under autocast keep the copy in the autocast dtype: conv2d would cast it on every call anyway
        cast = autocast_dtype(device_type)
        # runs before every conv: plain dict lookups and (address, version) pairs keep it cheap; a move
        # or cast clears the cache (_apply), an in-place load bumps a version, a swapped .data its address
        p, b = self._parameters, norm._buffers
        key = (
            tuple(None if t is None else (t.data_ptr(), t._version)
                  for t in (p["weight"], p["bias"], b["weight"], b["bias"], b["running_mean"], b["running_var"])),
            torch.is_inference_mode_enabled(),
            cast,
        )
        if key != self._fold_key:
            with torch.no_grad():
                scale, shift = norm.scale_shift()
                w = self.weight.detach() * scale.view(-1, 1, 1, 1)
                b = shift if self.bias is None else self.bias.detach() * scale + shift
                # keep the memory format the conv would use (channels_last models stay fast)
                if cast is not None:
                    w, b = w.to(cast), b.to(cast)
                if self.weight.is_contiguous(memory_format=torch.channels_last):
                    w = w.contiguous(memory_format=torch.channels_last)
                self._folded = (w, b)
                self._fold_key = key
        assert self._folded is not None
        return self._folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution followed by the (folded) frozen norm."""
        if self.norm is None:
            return super().forward(x)
        if not (self.fold_norm and _no_grad_call(self)):
            return self.norm(self._conv_forward(x, self.weight, self.bias))
        w, b = self._folded_params(x.device.type)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def cached_tensors(self) -> list[torch.Tensor]:
        """The folded weight and bias copies held now (see GeneralizedRCNN.tensors_in_caches)."""
        return [t for t in self._folded or () if t is not None]

    def _apply(self, fn, recurse: bool = True):  # drop the cache when moved or cast
        self._fold_key = None
        self._folded = None
        return super()._apply(fn, recurse)


# cuDNN's fused conv + bias (+ add) + relu for inference on CUDA: off unless GeneralizedRCNN.cudnn_fusion turns it on
# for a forward pass (a context, not module state: one model may run on CPU and CUDA, from several threads)
_CUDNN_FUSION: ContextVar[bool] = ContextVar("zoo_cudnn_fusion", default=False)


@contextlib.contextmanager
def _switched(switch: ContextVar, value) -> Iterator[None]:
    token = switch.set(value)
    try:
        yield
    finally:
        switch.reset(token)


def cudnn_fusion(enabled: bool) -> contextlib.AbstractContextManager:
    """Let conv_relu use cuDNN's fused kernels inside this block (CUDA tensors only)."""
    return _switched(_CUDNN_FUSION, bool(enabled))


# Which zoo.ops backend runs what follows a convolution (bias, residual add, relu) in conv_relu and
# conv_plus_upsampled: None (default) is the ops' own choice, Triton's one-pass kernel on CUDA; "torch" PyTorch's
# separate ops, bit-identical, for benchmarks to compare against
_EPILOGUE_BACKEND: ContextVar[Optional[str]] = ContextVar("zoo_epilogue_backend", default=None)


def epilogue_backend(backend: Optional[str]) -> contextlib.AbstractContextManager:
    """Run the convolutions' epilogues inside this block with `backend` (None, "torch" or "triton")."""
    return _switched(_EPILOGUE_BACKEND, backend)


def current_epilogue_backend() -> Optional[str]:
    """The backend epilogue_backend set here (None: the ops' default); a CUDA graph bakes it in."""
    return _EPILOGUE_BACKEND.get()


def _inference_params(conv: nn.Module, x: torch.Tensor) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The (weight, bias) that a call of `conv` on `x` that needs no gradient runs with (the folded norm's, in
    autocast's dtype), or None where the conv must run as itself (gradients, an unfolded norm, fp64, padding modes)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or not _no_grad_call(conv):
        return None
    if isinstance(conv, Conv2d) and conv.norm is not None:
        if not conv.fold_norm:
            return None
        w, b = conv._folded_params(x.device.type)
    else:
        w, b = conv.weight, conv.bias
        cast = autocast_dtype(x.device.type)
        if cast is not None:
            w, b = w.to(cast), (None if b is None else b.to(cast))
    return None if torch.float64 in (x.dtype, w.dtype) else (w, b)


def _fused(conv: nn.Module, x: torch.Tensor, w: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """Whether cuDNN's fused conv + bias (+ add) + relu runs this call."""
    return (_CUDNN_FUSION.get() and x.is_cuda and not isinstance(conv, nn.ConvTranspose2d)
            # the stem: cuDNN's fused kernel is known to be slow there (pytorch#68506)
            and conv.kernel_size != (7, 7)
            and x.dtype == w.dtype and (residual is None or residual.dtype == x.dtype))


def _epilogue_on(x: torch.Tensor) -> bool:
    from zoo import ops

    return ops.resolve_backend(current_epilogue_backend(), x) == "triton"


def _unbiased(conv: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`conv` on `x` with weight `w` and no bias (PyTorch adds a cuDNN convolution's bias in a pass of its own)."""
    if isinstance(conv, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, w, None, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                  conv.dilation)
    return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_relu(conv: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
              shortcut: Optional[nn.Module] = None) -> torch.Tensor:
    """relu(conv(x) + residual) for a Conv2d or ConvTranspose2d; with `shortcut` (a residual block's projection)
    relu(conv(x) + shortcut(residual)). On CUDA the bias, residual add and relu that PyTorch runs as separate passes
    after the convolution run as one Triton pass with the same rounding (zoo.ops.conv_epilogue); inside
    cudnn_fusion(True) cuDNN's fused conv + bias (+ add) + relu runs instead, where it applies. Either way the
    shortcut runs without its bias, which that one pass adds (PyTorch would spend a pass of its own on it)."""
    from zoo import ops

    # the parameters only where a fast path may take them: under CPU autocast they are a cast copy of the weights,
    # which conv(x) would make again
    epilogue = _epilogue_on(x)
    fast = epilogue or (_CUDNN_FUSION.get() and x.is_cuda)
    params = _inference_params(conv, x) if fast else None
    sc = None if params is None or shortcut is None else _inference_params(shortcut, residual)
    if shortcut is not None and sc is None:
        residual, shortcut = shortcut(residual), None
    if params is not None:
        w, b = params
        fused = _fused(conv, x, w, residual)
        if fused or epilogue:
            shortcut_bias = None
            if shortcut is not None:
                residual, shortcut_bias = _unbiased(shortcut, residual, sc[0]), sc[1]
            if not fused:
                return ops.conv_epilogue(_unbiased(conv, x, w), b, residual, relu=True, residual_bias=shortcut_bias,
                                         backend="triton")
            geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
            if residual is None:
                return torch.cudnn_convolution_relu(x, w, b, *geometry)
            if shortcut_bias is not None:  # cuDNN adds one bias: both, summed (rounded once more than unfused)
                b = shortcut_bias if b is None else b + shortcut_bias
            return torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, *geometry)
        if shortcut is not None:
            residual = shortcut(residual)
    out = conv(x)
    if residual is not None:
        out += residual
    return F.relu_(out)


def conv_plus_upsampled(conv: nn.Module, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """conv(x) + F.interpolate(top, scale_factor=2.0, mode="nearest"), an FPN's lateral sum; on CUDA the bias and
    the upsampled add run as one Triton pass that reads `top` where the upsampled copy would be."""
    from zoo import ops

    params = _inference_params(conv, x) if _epilogue_on(x) else None
    if params is not None:
        w, b = params
        return ops.conv_epilogue(_unbiased(conv, x, w), b, top, relu=False, upsampled=True, backend="triton")
    return conv(x) + F.interpolate(top, scale_factor=2.0, mode="nearest")


# precision="tf32": the box head's fully connected layers run on TF32 tensor cores (CUDA). A context, like
# cudnn_fusion. PyTorch's switch for it is process-wide and read when a matmul is launched, so zoo sets it only
# around those layers' launches, and every fp32 matmul zoo launches on CUDA holds one lock: no call's layers are
# launched inside another thread's TF32 window, and overlapping calls each restore what they found
_TF32_FC: ContextVar[bool] = ContextVar("zoo_tf32_fc", default=False)
_MATMUL_LOCK = threading.RLock()
# PyTorch >= 2.9 has a per-backend switch; its older one (set_float32_matmul_precision) raises there once a program
# has used the new one, so the new one is used where it exists
_CUBLAS = torch.backends.cuda.matmul
_PER_BACKEND = hasattr(_CUBLAS, "fp32_precision")
_TF32_SETTING = "tf32" if _PER_BACKEND else "high"


def matmul_precision() -> str:
    """PyTorch's fp32 matmul setting for CUDA now: with per-backend switches "ieee", "tf32" or "none" (follow the
    global one), else "highest", "high" or "medium"."""
    return _CUBLAS.fp32_precision if _PER_BACKEND else torch.get_float32_matmul_precision()


def _set_matmul_precision(value: str) -> None:
    if _PER_BACKEND:
        _CUBLAS.fp32_precision = value
    else:
        torch.set_float32_matmul_precision(value)


def tf32_fc(enabled: bool) -> contextlib.AbstractContextManager:
    """Let fc_matmul launch in TF32 inside this block (fp32 CUDA tensors)."""
    return _switched(_TF32_FC, bool(enabled))


@contextlib.contextmanager
def _tf32_matmul() -> Iterator[None]:
    """TF32 for the fp32 CUDA matmuls launched inside the block, PyTorch's setting restored after; one block at a
    time, and no other zoo matmul launch meanwhile (the lock)."""
    with _MATMUL_LOCK:
        saved = matmul_precision()
        _set_matmul_precision(_TF32_SETTING)
        try:
            yield
        finally:
            _set_matmul_precision(saved)


def fc_matmul(x: torch.Tensor, tf32: bool = False) -> contextlib.AbstractContextManager:
    """The context to launch fully connected layers on `x` in. For fp32 CUDA tensors outside autocast: with `tf32`
    inside tf32_fc(True), TF32 (_tf32_matmul); otherwise the lock alone, so that PyTorch's own setting applies and
    no other call's TF32 window does. Else (CPU, autocast, half tensors) none."""
    if not (x.is_cuda and x.dtype == torch.float32) or autocast_dtype("cuda") is not None:
        return contextlib.nullcontext()
    return _tf32_matmul() if tf32 and _TF32_FC.get() else _MATMUL_LOCK
