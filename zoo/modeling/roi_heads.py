"""ROI heads at test time: StandardROIHeads (DC5/FPN) and Res5ROIHeads (C4), with the mask branch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..manifest import Architecture, PoolerSpec
from ..ops.reference import boxes_to_rois
from .backbone import make_stage, res5_stage_args
from .box_coder import Box2BoxTransform, clip_boxes, gather_rows
from .heads import FastRCNNConvFCHead, FastRCNNOutputLayers, MaskRCNNConvUpsampleHead, mask_probs


@dataclass
class RawInstances:
    """Detections for one image in resized-image pixels, before postprocessing."""

    boxes: torch.Tensor  # [D, 4]
    scores: torch.Tensor  # [D]
    classes: torch.Tensor  # [D] int64
    mask_probs: Optional[torch.Tensor] = None  # [D, M, M] in [0, 1]


@dataclass
class InstanceBatch:
    """Static-shape detections: `counts[i]` leading rows of image i are real, the rest zero padding.

    `complete[i]` False means a fixed-capacity NMS could not guarantee Detectron2's exact result
    (the caller recomputes that image with the dynamic path).
    """

    boxes: torch.Tensor  # [N, D, 4]
    scores: torch.Tensor  # [N, D]
    classes: torch.Tensor  # [N, D] int64
    counts: torch.Tensor  # [N] int64
    complete: torch.Tensor  # [N] bool
    mask_probs: Optional[torch.Tensor] = None  # [N, D, M, M]

    def unbatch(self) -> list[RawInstances]:
        """Per-image RawInstances (reads the counts: synchronises with the device)."""
        out = []
        for i, c in enumerate(self.counts.tolist()):
            mp = None if self.mask_probs is None else self.mask_probs[i, :c]
            out.append(RawInstances(self.boxes[i, :c], self.scores[i, :c], self.classes[i, :c], mp))
        return out


class ROIPooler(nn.Module):
    """ROIAlign (aligned) over one or several levels via zoo.ops; output in box order.

    bin_stride > 1 (one level only) pools every bin_stride-th bin of the resolution x resolution grid;
    memory_format (None: the ops' choice) lays the result out for its consumer.
    """

    def __init__(self, spec: PoolerSpec, scales: Sequence[float], bin_stride: int = 1,
                 memory_format: Optional[torch.memory_format] = None) -> None:
        super().__init__()
        if spec.type != "ROIAlignV2":
            raise ValueError(f"unsupported pooler type {spec.type!r}")
        if bin_stride != 1 and len(scales) != 1:
            raise ValueError("bin_stride needs a single-level pooler")
        self.output_size = spec.resolution
        self.sampling_ratio = spec.sampling_ratio
        self.scales = [float(s) for s in scales]
        self.bin_stride = bin_stride
        self.memory_format = memory_format

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """features: per level [N, C, H, W]; boxes: per image [Ri, 4], or [K, 5] rois -> [sum Ri, C, S, S]
        (S = ceil(resolution / bin_stride))."""
        from .. import ops

        if len(self.scales) == 1:
            return ops.roi_align(features[0], boxes, self.output_size, self.scales[0], self.sampling_ratio, True,
                                 bin_stride=self.bin_stride, memory_format=self.memory_format)
        return ops.multilevel_roi_align(features, boxes, self.output_size, self.scales, self.sampling_ratio,
                                        aligned=True, memory_format=self.memory_format)


def fast_rcnn_inference_single_image(boxes: torch.Tensor, scores: torch.Tensor, image_size: tuple[int, int],
                                     score_thresh: float, nms_thresh: float, topk: int) -> RawInstances:
    """Detectron2's per-image inference: drop background, clip, threshold, per-class NMS, top-k by score."""
    from .. import ops

    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not bool(valid.all()):
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    num_reg = boxes.shape[1] // 4
    boxes = clip_boxes(boxes.reshape(-1, 4), image_size).view(-1, num_reg, 4)
    mask = scores > score_thresh  # strict, as in Detectron2
    inds = mask.nonzero()  # (proposal, class), row-major
    boxes = boxes[inds[:, 0], 0] if num_reg == 1 else boxes[mask]
    scores = scores[mask]
    keep = ops.batched_nms(boxes, scores, inds[:, 1], nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    return RawInstances(boxes[keep], scores[keep], inds[keep, 1])


def fast_rcnn_inference_fixed(boxes: torch.Tensor, scores: torch.Tensor, proposal_valid: torch.Tensor,
                              image_sizes: torch.Tensor, score_thresh: float, nms_thresh: float, topk: int,
                              capacity: Optional[int]) -> InstanceBatch:
    """fast_rcnn_inference_single_image for a whole batch, with static shapes and no host synchronisation.

    boxes [N, R, 4 or 4K], scores [N, R, K+1], proposal_valid [N, R], image_sizes [N, >=2] (h, w). The
    filters become a validity mask over all (proposal, class) pairs in Detectron2's row-major order, and
    NMS runs on each image's `capacity` best of them. Detections come zero padded to [N, topk].
    """
    from .. import ops

    n, r = scores.shape[:2]
    row_ok = torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores).all(dim=-1) & proposal_valid
    scores = scores[..., :-1]
    k = scores.shape[-1]
    num_reg = boxes.shape[-1] // 4
    boxes = clip_boxes(boxes.reshape(n, -1, 4), (image_sizes[:, 0:1], image_sizes[:, 1:2]))
    boxes = boxes.view(n, r, num_reg, 4).expand(n, r, k, 4).reshape(n, -1, 4)
    valid = ((scores > score_thresh) & row_ok[..., None]).reshape(n, -1)
    scores = scores.reshape(n, -1)
    classes = torch.arange(k, device=scores.device).repeat(r)
    keep, counts, complete = ops.batched_nms_fixed(boxes, scores, classes, valid, nms_thresh, topk, capacity)
    return InstanceBatch(gather_rows(boxes, keep), gather_rows(scores, keep),
                         gather_rows(classes.expand(n, -1), keep), counts, complete)


class _ROIHeadsBase(nn.Module):
    # NMS candidates per image in the static path (of up to 1000 proposals x 80 classes): the
    # best-scoring ones; an image where fewer than detections_per_image survive among them while
    # more passed the score threshold is flagged incomplete and recomputed exactly
    static_nms_capacity = 4096

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        rh = arch.roi_heads
        self.in_features = tuple(rh.in_features)
        self.num_classes = rh.num_classes
        self.score_thresh = rh.score_thresh_test
        self.nms_thresh = rh.nms_thresh_test
        self.detections_per_image = rh.detections_per_image
        self.box2box_transform = Box2BoxTransform(rh.box_head.bbox_reg_weights)
        self.mask_on = rh.mask_head is not None

    def _inference(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: list[torch.Tensor],
                   image_sizes: Sequence[tuple[int, int]]) -> list[RawInstances]:
        counts = [len(p) for p in proposals]
        if sum(counts) == 0:
            pred = deltas.new_zeros((0, deltas.shape[1]))
        else:
            pred = self.box2box_transform.apply_deltas(deltas, torch.cat(proposals))
        probs = torch.softmax(logits.float(), dim=-1)  # fp32 scores under autocast too
        return [
            fast_rcnn_inference_single_image(b, s, size, self.score_thresh, self.nms_thresh,
                                             self.detections_per_image)
            for b, s, size in zip(pred.split(counts), probs.split(counts), image_sizes)
        ]

    def _inference_static(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: torch.Tensor,
                          counts: torch.Tensor, image_sizes: torch.Tensor) -> InstanceBatch:
        if self.detections_per_image < 0:
            raise ValueError("the static path needs detections_per_image >= 0")
        n, k = proposals.shape[:2]
        pred = self.box2box_transform.apply_deltas(deltas, proposals.reshape(-1, 4)).view(n, k, -1)
        probs = torch.softmax(logits.float(), dim=-1).view(n, k, -1)
        slots = torch.arange(k, device=proposals.device)
        return fast_rcnn_inference_fixed(pred, probs, slots < counts[:, None], image_sizes, self.score_thresh,
                                         self.nms_thresh, self.detections_per_image, self.static_nms_capacity)

    def _attach_masks(self, results: list[RawInstances], mask_logits: torch.Tensor) -> None:
        classes = torch.cat([r.classes for r in results]) if results else torch.zeros(0, dtype=torch.long)
        probs = mask_probs(mask_logits, classes)
        for r, p in zip(results, probs.split([len(r.classes) for r in results])):
            r.mask_probs = p


class StandardROIHeads(_ROIHeadsBase):
    """Pool (one level for DC5, p2..p5 for FPN), FC box head, predictor; mask head on the kept boxes."""

    def __init__(self, arch: Architecture, input_shape: dict[str, tuple[int, int]]) -> None:
        super().__init__(arch)
        rh = arch.roi_heads
        channels = {input_shape[f][0] for f in self.in_features}
        if len(channels) != 1:
            raise ValueError("ROI heads need the same channel count on every input feature")
        c = channels.pop()
        scales = [1.0 / input_shape[f][1] for f in self.in_features]
        bh = rh.box_head
        # an FC-only head flattens NCHW rows: pooling straight into that layout saves a copy of every pooled ROI
        # (400 MB for DC5's 1000 x 2048 x 7 x 7) when the maps are channels-last
        self.box_pooler = ROIPooler(bh.pooler, scales,
                                    memory_format=torch.contiguous_format if bh.num_conv == 0 else None)
        self.box_head = FastRCNNConvFCHead(c, bh.pooler.resolution, bh)
        self.box_predictor = FastRCNNOutputLayers(self.box_head.output_size, rh.num_classes,
                                                  bh.cls_agnostic_bbox_reg)
        if rh.mask_head is not None:
            self.mask_pooler = ROIPooler(rh.mask_head.pooler, scales)
            self.mask_head = MaskRCNNConvUpsampleHead(c, rh.num_classes, rh.mask_head)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> list[RawInstances]:
        """Detections (and mask probabilities) per image from per-image proposal boxes."""
        feats = [features[f] for f in self.in_features]
        x = self.box_head(self.box_pooler(feats, proposals))
        logits, deltas = self.box_predictor(x)
        del x
        results = self._inference(logits, deltas, proposals, image_sizes)
        if self.mask_on:
            boxes = [r.boxes for r in results]
            self._attach_masks(results, self.mask_head(self.mask_pooler(feats, boxes)))
        return results

    def forward_static(self, features: dict[str, torch.Tensor], proposals: torch.Tensor, counts: torch.Tensor,
                       image_sizes: torch.Tensor) -> InstanceBatch:
        """forward() on padded proposals [N, K, 4] (first counts[i] real), with static shapes throughout;
        image_sizes: [N, >=2] tensor of (h, w)."""
        feats = [features[f] for f in self.in_features]
        x = self.box_head(self.box_pooler(feats, _rois(proposals)))
        logits, deltas = self.box_predictor(x)
        del x
        out = self._inference_static(logits, deltas, proposals, counts, image_sizes)
        if self.mask_on:
            mask_logits = self.mask_head(self.mask_pooler(feats, _rois(out.boxes)))
            out.mask_probs = _static_mask_probs(mask_logits, out.classes)
        return out


class Res5ROIHeads(_ROIHeadsBase):
    """C4: pool 14x14 from res4, run res5 (stride 2), mean-pool for the predictor; mask head re-runs res5.

    With the MSRA weights' stride on res5's first 1x1 convolutions (every C4 baseline), that block reads only the
    even bins of each 14x14 pooled ROI: those alone are pooled (a quarter of the pooler's work and memory) and the
    block runs at stride 1 on them, the same products and sums as Detectron2's. Its weights are unchanged.
    """

    # ROIs per res5 pass: bounds peak memory; results do not depend on it. On CUDA one image's 1000 proposals pass
    # at once: res5 on 250 ROIs x 7 x 7 leaves the last wave of a convolution's tiles part-empty on 132 SMs, and 4x
    # the launches; the activations of 1000 ROIs (~1.2 MB each in fp32) keep the peak under Detectron2's (2.9 GB)
    chunk_size = 250
    cuda_chunk_size = 1000

    def __init__(self, arch: Architecture, input_shape: dict[str, tuple[int, int]]) -> None:
        super().__init__(arch)
        rh = arch.roi_heads
        (f,) = self.in_features
        bh = rh.box_head
        args = res5_stage_args(arch.resnet)
        subsample = 2 if args["stride_in_1x1"] else 1  # the pooler takes the first block's stride
        self.pooler = ROIPooler(bh.pooler, [1.0 / input_shape[f][1]], bin_stride=subsample)
        self.res5 = make_stage(first_stride=2 // subsample, **args)
        out_channels = args["out_channels"]
        self.box_predictor = FastRCNNOutputLayers(out_channels, rh.num_classes, bh.cls_agnostic_bbox_reg)
        if rh.mask_head is not None:
            self.mask_head = MaskRCNNConvUpsampleHead(out_channels, rh.num_classes, rh.mask_head)

    def _res5_chunks(self, feature: torch.Tensor, boxes: list[torch.Tensor] | torch.Tensor):
        # flatten (image, box) pairs into chunks (see chunk_size): the pooled ROIs and res5's activations of a
        # batch's proposals never sit in memory at once
        flat = _rois(boxes) if isinstance(boxes, torch.Tensor) else boxes_to_rois(boxes, feature.device)
        size = self.cuda_chunk_size if feature.is_cuda else self.chunk_size
        for start in range(0, max(len(flat), 1), size):
            chunk = flat[start:start + size]
            yield self.res5(self.pooler([feature], chunk))

    def _predict(self, feature: torch.Tensor, boxes: list[torch.Tensor] | torch.Tensor):
        """Class logits and box deltas of every ROI. The predictor takes all pooled ROIs in one call, as in
        Detectron2: a matrix product over a chunk of rows can round differently from one over all of them."""
        pooled = torch.cat([x.mean(dim=[2, 3]) for x in self._res5_chunks(feature, boxes)])
        return self.box_predictor(pooled)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> list[RawInstances]:
        """Detections (and mask probabilities) per image from per-image proposal boxes."""
        feature = features[self.in_features[0]]
        logits, deltas = self._predict(feature, proposals)
        results = self._inference(logits, deltas, proposals, image_sizes)
        if self.mask_on:
            boxes = [r.boxes for r in results]
            mask_logits = torch.cat([self.mask_head(x) for x in self._res5_chunks(feature, boxes)])
            self._attach_masks(results, mask_logits)
        return results

    def forward_static(self, features: dict[str, torch.Tensor], proposals: torch.Tensor, counts: torch.Tensor,
                       image_sizes: torch.Tensor) -> InstanceBatch:
        """forward() on padded proposals [N, K, 4] (first counts[i] real), with static shapes throughout;
        image_sizes: [N, >=2] tensor of (h, w)."""
        feature = features[self.in_features[0]]
        logits, deltas = self._predict(feature, proposals)
        out = self._inference_static(logits, deltas, proposals, counts, image_sizes)
        if self.mask_on:
            mask_logits = torch.cat([self.mask_head(x) for x in self._res5_chunks(feature, out.boxes)])
            out.mask_probs = _static_mask_probs(mask_logits, out.classes)
        return out


def _rois(boxes: torch.Tensor) -> torch.Tensor:
    """[N, K, 4] per-image boxes -> [N*K, 5] rows of (image index, x1, y1, x2, y2)."""
    n, k = boxes.shape[:2]
    idx = torch.arange(n, dtype=boxes.dtype, device=boxes.device)[:, None].expand(n, k).reshape(-1)
    return torch.cat([idx[:, None], boxes.reshape(-1, 4)], dim=1)


def _static_mask_probs(mask_logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    n, d = classes.shape
    probs = mask_probs(mask_logits, classes.reshape(-1))
    return probs.view(n, d, *probs.shape[1:])


def build_roi_heads(arch: Architecture, input_shape: dict[str, tuple[int, int]]) -> nn.Module:
    """ROI heads for the layout."""
    if arch.roi_heads.name == "Res5ROIHeads":
        return Res5ROIHeads(arch, input_shape)
    return StandardROIHeads(arch, input_shape)
