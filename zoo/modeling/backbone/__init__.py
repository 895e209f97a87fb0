"""Backbones: ResNet/ResNeXt (C4, DC5) and ResNet+FPN."""
from __future__ import annotations

from torch import nn

from ...manifest import Architecture
from .fpn import FPN
from .resnet import ResNet, make_stage, res5_stage_args

__all__ = ["FPN", "ResNet", "build_backbone", "make_stage", "res5_stage_args"]


def build_backbone(arch: Architecture) -> nn.Module:
    """The backbone for a layout; it has `output_shape()` -> {name: (channels, stride)}."""
    resnet = ResNet(arch.resnet)
    if arch.layout == "FPN":
        assert arch.fpn is not None
        return FPN(resnet, arch.fpn)
    return resnet
