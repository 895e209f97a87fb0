"""Region proposal network at test time: StandardRPNHead, anchors, decoding, find_top_rpn_proposals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..manifest import RPNSpec
from . import overflow
from .anchors import AnchorGenerator
from .box_coder import Box2BoxTransform, clip_boxes, gather_rows, nonempty
from .layers import conv_relu


@dataclass
class Proposals:
    """RPN output for one image: XYXY boxes in resized-image pixels, sorted by objectness."""

    boxes: torch.Tensor  # [R, 4]
    objectness_logits: torch.Tensor  # [R]


@dataclass
class ProposalBatch:
    """Static-shape RPN output: `counts[i]` leading rows of image i are its proposals, the rest is
    zero padding; `complete[i]` False means the fixed-capacity NMS could not guarantee exactness."""

    boxes: torch.Tensor  # [N, K, 4]
    objectness_logits: torch.Tensor  # [N, K]
    counts: torch.Tensor  # [N] int64
    complete: torch.Tensor  # [N] bool

    def unbatch(self) -> list[Proposals]:
        """Per-image Proposals (reads the counts: synchronises with the device)."""
        return [Proposals(b[:c], s[:c]) for b, s, c in
                zip(self.boxes, self.objectness_logits, self.counts.tolist())]


class StandardRPNHead(nn.Module):
    """Shared 3x3 conv + relu, then 1x1 objectness (A) and 1x1 deltas (A*4) on every level."""

    def __init__(self, in_channels: int, num_anchors: int, conv_dims: Sequence[int] = (-1,)) -> None:
        super().__init__()
        if len(conv_dims) != 1:
            raise ValueError("only a single shared RPN conv is supported")
        cout = in_channels if conv_dims[0] == -1 else conv_dims[0]
        self.conv = nn.Conv2d(in_channels, cout, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(cout, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(cout, num_anchors * 4, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: logits [N, A, H, W] and deltas [N, A*4, H, W]."""
        logits, deltas = [], []
        for x in features:
            t = conv_relu(self.conv, x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


class RPN(nn.Module):
    """Proposal generator: head, anchors, and Detectron2's test-time selection of proposals."""

    def __init__(self, spec: RPNSpec, input_shape: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.in_features = tuple(spec.in_features)
        channels = {input_shape[f][0] for f in self.in_features}
        if len(channels) != 1:
            raise ValueError("RPN needs the same channel count on every input feature")
        ag = spec.anchor_generator
        self.anchor_generator = AnchorGenerator(ag.sizes, ag.aspect_ratios,
                                                [input_shape[f][1] for f in self.in_features], ag.offset)
        num_anchors = set(self.anchor_generator.num_cell_anchors)
        if len(num_anchors) != 1:
            raise ValueError("every RPN level must have the same number of anchors")
        self.rpn_head = StandardRPNHead(channels.pop(), num_anchors.pop(), spec.head_conv_dims)
        self.box2box_transform = Box2BoxTransform(spec.bbox_reg_weights)
        self.nms_thresh = spec.nms_thresh
        self.pre_nms_topk = spec.pre_nms_topk_test
        self.post_nms_topk = spec.post_nms_topk_test
        self.min_box_size = float(spec.min_size)

    def forward(self, features: dict[str, torch.Tensor], image_sizes: Sequence[tuple[int, int]] | torch.Tensor,
                static: bool = False) -> list[Proposals] | ProposalBatch:
        """Proposals for each image of the batch; static=True (image_sizes an [N, 2] tensor): a ProposalBatch,
        no host synchronisation."""
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        logits, deltas = self.rpn_head(feats)
        n = feats[0].shape[0]
        # (N, A, H, W) -> (N, H*W*A), matching the anchors' (y, x, a) order
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(n, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                  for x in deltas]
        if static:
            return self.find_top_proposals_static(anchors, logits, deltas, image_sizes)
        return self.find_top_proposals(anchors, logits, deltas, image_sizes)

    def _decode_top_per_level(self, anchors: list[torch.Tensor], logits: list[torch.Tensor],
                              deltas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k logits per level and their decoded boxes: scores [N, C], boxes [N, C, 4], levels [C]."""
        n = logits[0].shape[0]
        batch_idx = torch.arange(n, device=logits[0].device)[:, None]
        scores_l, deltas_l, anchors_l, level_l = [], [], [], []
        for lvl, (a, lg, d) in enumerate(zip(anchors, logits, deltas)):
            k = min(lg.shape[1], self.pre_nms_topk)
            # fp32 before ranking: under autocast the head's logits are bf16/fp16 (no-op in fp32)
            top_scores, top_idx = lg.float().topk(k, dim=1)
            scores_l.append(top_scores)
            deltas_l.append(d[batch_idx, top_idx])  # [N, k, 4]
            anchors_l.append(a[top_idx])  # [N, k, 4]
            level_l.append(torch.full((k,), lvl, dtype=torch.int64, device=lg.device))
        scores = torch.cat(scores_l, dim=1)
        sel_d = torch.cat(deltas_l, dim=1)
        overflow.note(scores, sel_d)
        # decoding is elementwise, so decoding just the top-k (of all levels at once) equals Detectron2's
        # decode-all-then-select
        boxes = self.box2box_transform.apply_deltas(sel_d.reshape(-1, 4), torch.cat(anchors_l, dim=1).reshape(-1, 4))
        levels = torch.cat(level_l, dim=0)
        return scores, boxes.view(sel_d.shape), levels

    def find_top_proposals(self, anchors: list[torch.Tensor], logits: list[torch.Tensor],
                           deltas: list[torch.Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Proposals]:
        """Top-k per level (decoding only those), then per image: clip, size filter, per-level NMS, top-k."""
        scores, boxes, levels = self._decode_top_per_level(anchors, logits, deltas)
        results = []
        for i, size in enumerate(image_sizes):
            b, s, lv = boxes[i], scores[i], levels
            valid = torch.isfinite(b).all(dim=1) & torch.isfinite(s)
            if not bool(valid.all()):
                b, s, lv = b[valid], s[valid], lv[valid]
            b = clip_boxes(b, size)
            keep = nonempty(b, self.min_box_size)
            if not bool(keep.all()):
                b, s, lv = b[keep], s[keep], lv[keep]
            keep = _nms_topk(b, s, lv, self.nms_thresh, self.post_nms_topk, single_level=len(anchors) == 1)
            results.append(Proposals(b[keep], s[keep]))
        return results

    def find_top_proposals_static(self, anchors: list[torch.Tensor], logits: list[torch.Tensor],
                                  deltas: list[torch.Tensor], image_sizes: torch.Tensor) -> ProposalBatch:
        """find_top_proposals with fixed shapes, all images at once: filters become a validity mask, NMS a
        fixed-capacity op. image_sizes: [N, >=2] tensor of (h, w) per image."""
        from .. import ops

        scores, boxes, levels = self._decode_top_per_level(anchors, logits, deltas)
        valid = torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores)
        boxes = clip_boxes(boxes, (image_sizes[:, 0:1], image_sizes[:, 1:2]))
        valid &= nonempty(boxes, self.min_box_size)
        keep, counts, complete = ops.batched_nms_fixed(boxes, scores, levels, valid, self.nms_thresh,
                                                       self.post_nms_topk)
        return ProposalBatch(gather_rows(boxes, keep), gather_rows(scores, keep), counts, complete)


def _nms_topk(boxes: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor, thresh: float, k: int,
              single_level: bool) -> torch.Tensor:
    """First k indices kept by batched NMS, in decreasing score order.

    Greedy NMS decides each box from the boxes ranked above it only, so on one level whose boxes are
    already sorted by score, NMS over a prefix keeps exactly the full result's boxes of that prefix.
    C4/DC5 keep 1000 of 6000, so this skips most of the work, bit-exactly. The full result's order of
    tied scores comes from torchvision's unstable sort of all kept boxes, so the prefix is trusted only
    when its first k+1 kept scores are strictly decreasing (then every order of the full set agrees).
    """
    from .. import ops

    n = boxes.shape[0]
    if single_level and n > 2 * k:
        m = 2 * k
        while m < n:
            keep = ops.batched_nms(boxes[:m], scores[:m], levels[:m], thresh)
            if keep.numel() > k:
                head = scores[keep[:k + 1]]
                if bool((head[1:] < head[:-1]).all()):
                    return keep[:k]
                break  # tied scores near the top: only the full NMS orders them as torchvision does
            m = 2 * m
    return ops.batched_nms(boxes, scores, levels, thresh)[:k]
