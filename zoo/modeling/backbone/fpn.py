"""Feature pyramid (top-down sum, 3x3 output convs) with the max-pool P6 block, as in Detectron2."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...manifest import FPNSpec
from ..layers import conv_plus_upsampled
from .resnet import ResNet


class FPN(nn.Module):
    """`bottom_up` ResNet plus fpn_lateral{k}/fpn_output{k} convs; outputs p2..p6."""

    def __init__(self, bottom_up: ResNet, spec: FPNSpec) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        shapes = bottom_up.output_shape()
        self.in_features = tuple(spec.in_features)
        self.stages: list[int] = []
        for f in self.in_features:
            cin, stride = shapes[f]
            stage = int(math.log2(stride))
            self.add_module(f"fpn_lateral{stage}", nn.Conv2d(cin, spec.out_channels, 1))
            self.add_module(f"fpn_output{stage}", nn.Conv2d(spec.out_channels, spec.out_channels, 3, padding=1))
            self.stages.append(stage)
        self.out_channels = spec.out_channels
        last = self.stages[-1]
        self._strides = {f"p{s}": 2 ** s for s in self.stages + [last + 1]}

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """{name: (channels, stride)} for p2..p6."""
        return {k: (self.out_channels, s) for k, s in self._strides.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bottom-up, then top-down with lateral sums; P6 subsamples P5."""
        feats = self.bottom_up(x)
        outs: list[torch.Tensor] = []
        prev: Optional[torch.Tensor] = None
        for f, s in zip(reversed(self.in_features), reversed(self.stages)):
            lateral_conv = getattr(self, f"fpn_lateral{s}")
            # the top-down sum: lateral + prev upsampled 2x (nearest)
            prev = lateral_conv(feats[f]) if prev is None else conv_plus_upsampled(lateral_conv, feats[f], prev)
            outs.insert(0, getattr(self, f"fpn_output{s}")(prev))
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self._strides.keys(), outs))
