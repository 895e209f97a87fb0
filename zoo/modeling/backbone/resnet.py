"""ResNet / ResNeXt bottleneck backbone with FrozenBatchNorm, laid out like Detectron2's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...manifest import ResNetSpec
from ..layers import Conv2d, FrozenBatchNorm2d, conv_relu

_BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1,
             groups: int = 1) -> Conv2d:
    return Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, bias=False, norm=FrozenBatchNorm2d(cout))


class BasicStem(nn.Module):
    """7x7/2 conv + FrozenBN + relu, then 3x3/2 max pool: total stride 4."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, out_channels, 7, stride=2, padding=3)
        self.out_channels = out_channels
        self.stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem forward."""
        x = conv_relu(self.conv1, x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 residual block; projection shortcut only if channels change."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, stride: int,
                 num_groups: int, stride_in_1x1: bool, dilation: int) -> None:
        super().__init__()
        self.shortcut = (_conv_bn(in_channels, out_channels, 1, stride=stride)
                         if in_channels != out_channels else None)
        # MSRA weights put the stride on the 1x1 conv, the others on the 3x3
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv_bn(in_channels, bottleneck_channels, 1, stride=s1)
        self.conv2 = _conv_bn(bottleneck_channels, bottleneck_channels, 3, stride=s3, padding=dilation,
                              dilation=dilation, groups=num_groups)
        self.conv3 = _conv_bn(bottleneck_channels, out_channels, 1)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block forward."""
        out = conv_relu(self.conv1, x)
        out = conv_relu(self.conv2, out)
        return conv_relu(self.conv3, out, residual=x, shortcut=self.shortcut)


def make_stage(num_blocks: int, first_stride: int, in_channels: int, out_channels: int,
               bottleneck_channels: int, num_groups: int, stride_in_1x1: bool, dilation: int) -> nn.Sequential:
    """A stage of bottleneck blocks; only the first block may stride or change channels."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(BottleneckBlock(in_channels, out_channels, bottleneck_channels,
                                      first_stride if i == 0 else 1, num_groups, stride_in_1x1, dilation))
        in_channels = out_channels
    return nn.Sequential(*blocks)


def res5_stage_args(spec: ResNetSpec) -> dict:
    """Arguments of the res5 stage (channel sizes derive from res2 doubling per stage)."""
    return dict(
        num_blocks=_BLOCKS_PER_STAGE[spec.depth][3],
        in_channels=spec.res2_out_channels * 4,
        out_channels=spec.res2_out_channels * 8,
        bottleneck_channels=spec.num_groups * spec.width_per_group * 8,
        num_groups=spec.num_groups,
        stride_in_1x1=spec.stride_in_1x1,
        dilation=spec.res5_dilation,
    )


class ResNet(nn.Module):
    """Stem plus res2.. up to the last requested stage; returns {name: feature} for out_features."""

    def __init__(self, spec: ResNetSpec, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = BasicStem(in_channels, spec.stem_out_channels)
        self.out_features = tuple(spec.out_features)
        last = max(int(f[-1]) for f in self.out_features)
        self.stage_names: list[str] = []
        self._out_channels: dict[str, int] = {}
        self._strides: dict[str, int] = {}
        cin = spec.stem_out_channels
        cout = spec.res2_out_channels
        bottleneck = spec.num_groups * spec.width_per_group
        stride = self.stem.stride
        for idx, stage in enumerate(range(2, last + 1)):
            dilation = spec.res5_dilation if stage == 5 else 1
            first_stride = 1 if idx == 0 or (stage == 5 and dilation == 2) else 2
            name = f"res{stage}"
            self.add_module(name, make_stage(_BLOCKS_PER_STAGE[spec.depth][idx], first_stride, cin, cout,
                                             bottleneck, spec.num_groups, spec.stride_in_1x1, dilation))
            self.stage_names.append(name)
            stride *= first_stride
            self._out_channels[name] = cout
            self._strides[name] = stride
            cin, cout, bottleneck = cout, cout * 2, bottleneck * 2

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """{name: (channels, stride)} of the returned features."""
        return {f: (self._out_channels[f], self._strides[f]) for f in self.out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the stages and collect the requested outputs."""
        out = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                out[name] = x
        return out
