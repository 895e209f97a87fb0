"""Box head (conv/fc), box predictor and mask head, with Detectron2's module names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..manifest import BoxHeadSpec, MaskHeadSpec
from . import overflow
from .layers import conv_relu, fc_matmul


class FastRCNNConvFCHead(nn.Module):
    """conv{i} (3x3 + relu) then flatten and fc{i} (+ relu); the DC5/FPN baselines use 2 fcs."""

    def __init__(self, in_channels: int, resolution: int, spec: BoxHeadSpec) -> None:
        super().__init__()
        c, h, w = in_channels, resolution, resolution
        self.conv_names: list[str] = []
        self.fc_names: list[str] = []
        for i in range(spec.num_conv):
            self.add_module(f"conv{i + 1}", nn.Conv2d(c, spec.conv_dim, 3, padding=1))
            self.conv_names.append(f"conv{i + 1}")
            c = spec.conv_dim
        dim = c * h * w
        for i in range(spec.num_fc):
            self.add_module(f"fc{i + 1}", nn.Linear(dim, spec.fc_dim))
            self.fc_names.append(f"fc{i + 1}")
            dim = spec.fc_dim
        self.output_size = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R, C, S, S] pooled features -> [R, fc_dim]."""
        for name in self.conv_names:
            x = conv_relu(getattr(self, name), x)
        if self.fc_names:
            x = torch.flatten(x, start_dim=1)
            # precision="tf32": TF32 here, where fp32 costs (DC5's fc1 is 1000 x 100352 x 1024 per image) and its
            # rounding keeps parity with Detectron2; the predictors stay fp32 (cheap, and scores come from them)
            with fc_matmul(x, tf32=True):
                for name in self.fc_names:
                    x = F.relu(getattr(self, name)(x))
        return x


class FastRCNNOutputLayers(nn.Module):
    """cls_score (K+1 logits, background last) and bbox_pred (4 per class, or 4 if class-agnostic)."""

    def __init__(self, in_features: int, num_classes: int, cls_agnostic_bbox_reg: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (1 if cls_agnostic_bbox_reg else num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [R, K+1] and box deltas [R, 4K]."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        with fc_matmul(x):  # never inside another call's TF32 window
            logits, deltas = self.cls_score(x), self.bbox_pred(x)
        overflow.note(logits, deltas)
        return logits, deltas


class MaskRCNNConvUpsampleHead(nn.Module):
    """mask_fcn{i} (3x3 + relu), deconv 2x2/2 + relu, 1x1 predictor: per-class mask logits at 2x the pool size."""

    def __init__(self, in_channels: int, num_classes: int, spec: MaskHeadSpec) -> None:
        super().__init__()
        c = in_channels
        self.conv_names: list[str] = []
        for i in range(spec.num_conv):
            self.add_module(f"mask_fcn{i + 1}", nn.Conv2d(c, spec.conv_dim, 3, padding=1))
            self.conv_names.append(f"mask_fcn{i + 1}")
            c = spec.conv_dim
        self.deconv = nn.ConvTranspose2d(c, spec.conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(spec.conv_dim, 1 if spec.cls_agnostic_mask else num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R, C, S, S] -> mask logits [R, K or 1, 2S, 2S]."""
        for name in self.conv_names:
            x = conv_relu(getattr(self, name), x)
        x = conv_relu(self.deconv, x)
        logits = self.predictor(x)
        overflow.note(logits)
        return logits


def mask_probs(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Sigmoid of each instance's predicted-class channel: [R, M, M]."""
    if logits.shape[1] == 1:
        return logits[:, 0].float().sigmoid()
    idx = torch.arange(logits.shape[0], device=logits.device)
    return logits[idx, classes].float().sigmoid()
