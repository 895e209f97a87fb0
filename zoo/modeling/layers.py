"""Small building blocks shared by the backbone and heads: FrozenBatchNorm and a conv that owns its norm."""
from __future__ import annotations

from typing import Optional

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
        if not self.fold_norm or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.norm(self._conv_forward(x, self.weight, self.bias))
        w, b = self._folded_params(x.device.type)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _apply(self, fn, recurse: bool = True):  # drop the cache when moved or cast
        self._fold_key = None
        self._folded = None
        return super()._apply(fn, recurse)
