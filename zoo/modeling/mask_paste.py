"""Detectron2's `paste_masks_in_image`, and `detector_postprocess` up to the paste."""
from __future__ import annotations

from typing import Optional

import torch

from .box_coder import clip_boxes, nonempty


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                         threshold: float = 0.5, batched: Optional[bool] = None) -> torch.Tensor:
    """Paste [N, M, M] probabilities into boxes of an (H, W) image -> bool [N, H, W] (value >= threshold).

    zoo.ops.paste_masks: the Triton kernel on CUDA, PyTorch's grid_sample otherwise (`batched` picks
    whole-image chunks or per-box regions there; same pixels).
    """
    from .. import ops

    # Outside inference mode, so that the result (the largest one, N x H x W at the original size) is an ordinary
    # tensor that callers may edit in place: predict need not copy it.
    with torch.inference_mode(False), torch.no_grad():
        return ops.paste_masks(masks, boxes, image_size, threshold, batched=batched)


def rescale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Scale XYXY boxes from the resized (h, w) to the original (h, w) and clip to it."""
    scale_x = to_size[1] / from_size[1]
    scale_y = to_size[0] / from_size[0]
    boxes = boxes.clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    return clip_boxes(boxes, to_size)


def postprocess_boxes(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                      mask_probs: torch.Tensor | None, resized_size: tuple[int, int], orig_size: tuple[int, int]):
    """detector_postprocess up to the paste: rescale + clip boxes to the original image, drop empty ones (and their
    mask probabilities)."""
    boxes = rescale_boxes(boxes, resized_size, orig_size)
    keep = nonempty(boxes)
    if not bool(keep.all()):
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        mask_probs = None if mask_probs is None else mask_probs[keep]
    return boxes, scores, classes, mask_probs
