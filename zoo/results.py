"""Detections returned by `predict`, and their COCO-format export."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

# The 80 COCO classes in Detectron2's contiguous order, with their COCO category ids.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASS_NAMES: tuple[str, ...] = tuple(n for _, n in COCO_CATEGORIES)
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i, _ in COCO_CATEGORIES)


def _as_position(index: Any) -> Any:
    """An integer scalar of any kind (NumPy integer, 0-d integer tensor or array) as an int; anything else as is."""
    if isinstance(index, torch.Tensor):
        scalar = index.ndim == 0 and not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool)
        return int(index) if scalar else index
    if isinstance(index, np.ndarray):
        return int(index) if index.ndim == 0 and np.issubdtype(index.dtype, np.integer) else index
    if isinstance(index, (bool, np.bool_)):
        return index
    try:
        return operator.index(index)
    except TypeError:
        return index


@dataclass
class Detections:
    """Instances found in one image; boxes are XYXY in original-image pixels."""

    boxes: torch.Tensor  # float [N, 4]
    scores: torch.Tensor  # float [N]
    labels: torch.Tensor  # int64 [N], contiguous 0..79
    masks: Optional[torch.Tensor]  # bool [N, H, W], or None for detection models
    image_size: tuple[int, int]  # (H, W) of the original image

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __repr__(self) -> str:
        # the dataclass repr would print every tensor (megabytes for 100 masks)
        top = ", ".join(f"{c} {s:.2f}" for c, s in zip(self.class_names[:5], self.scores[:5].tolist()))
        more = f", ... ({len(self) - 5} more)" if len(self) > 5 else ""
        masks = "" if self.masks is None else f", masks {tuple(self.masks.shape)}"
        h, w = self.image_size
        return (f"Detections({len(self)} instance{'s' if len(self) != 1 else ''} in a {h}x{w} image"
                f"{masks}, device {self.boxes.device}: {top or 'none'}{more})")

    @property
    def class_names(self) -> list[str]:
        """COCO class name of each instance."""
        return [COCO_CLASS_NAMES[i] for i in self.labels.tolist()]

    def to(self, device: torch.device | str) -> "Detections":
        """A copy with every tensor on `device`."""
        masks = None if self.masks is None else self.masks.to(device)
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), masks, self.image_size)

    def __getitem__(self, index) -> "Detections":
        """The instances picked by an int, a slice, a bool mask or an index tensor, as Detections (an int gives one
        instance, as Detectron2's Instances do): `det[:10]` (the 10 best), `det[det.labels == 0]` (people)."""
        index = _as_position(index)
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"instance {index} asked for, but there are {n}")
            index = slice(index % n, index % n + 1)
        masks = None if self.masks is None else self.masks[index]
        return Detections(self.boxes[index], self.scores[index], self.labels[index], masks, self.image_size)

    def filter(self, score_thresh: float) -> "Detections":
        """Only instances scoring at least `score_thresh`. For detections sorted by score (as predict gives them)
        those are the first ones: a slice, whose tensors share this one's memory as det[:k] does, not a copy of the
        masks (100 masks of a 12 MP photo take 1.1 GiB)."""
        keep = self.scores >= score_thresh
        k = int(keep.sum())
        return self[:k] if bool(keep[:k].all()) else self[keep]

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results records: category ids mapped, XYWH boxes, RLE masks (needs pycocotools)."""
        boxes = self.boxes.detach().float().cpu().numpy()
        scores = self.scores.detach().float().cpu().tolist()
        labels = self.labels.detach().cpu().tolist()
        rles = _encode_masks(self.masks) if self.masks is not None else None
        out = []
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            rec = {
                "image_id": int(image_id),
                "category_id": COCO_CATEGORY_IDS[labels[i]],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": scores[i],
            }
            if rles is not None:
                rec["segmentation"] = rles[i]
            out.append(rec)
        return out


def mask_bounds(masks: torch.Tensor) -> list[Optional[tuple[int, int, int, int]]]:
    """(y0, y1, x0, x1) of each [H, W] mask's set pixels (ends exclusive), or None for an empty mask. The
    reductions run on the masks' device; amax over uint8 is ~10x faster than any() on CPU."""
    m = masks.detach().bool().view(torch.uint8)
    rows, cols = m.amax(dim=2).cpu().numpy(), m.amax(dim=1).cpu().numpy()
    out: list[Optional[tuple[int, int, int, int]]] = []
    for r, c in zip(rows, cols):
        ys, xs = np.flatnonzero(r), np.flatnonzero(c)
        out.append(None if ys.size == 0 else (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1))
    return out


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    """COCO RLE of each [H, W] mask, exactly as pycocotools.mask.encode gives it (counts as ASCII).

    Built from each mask's bounding crop: only the crops leave the device, and the full-image transposes that
    encode needs (its input is column-major) are skipped, which made them most of the time for 100 masks.
    """
    try:
        from pycocotools import mask as mask_util
    except ImportError:  # pragma: no cover - depends on the environment
        from .errors import ZooError

        raise ZooError("mask export needs pycocotools; reinstall it with: pip install pycocotools") from None
    n, h, w = masks.shape
    if n == 0:
        return []
    masks = masks.detach().bool()
    objs = []
    for i, bounds in enumerate(mask_bounds(masks)):
        if bounds is None:
            objs.append({"size": [h, w], "counts": [h * w]})
            continue
        y0, y1, x0, x1 = bounds
        crop = masks[i, y0:y1, x0:x1].cpu().numpy()
        objs.append({"size": [h, w], "counts": _rle_counts(crop, y0, x0, h, w)})
    rles = mask_util.frPyObjects(objs, h, w)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _rle_counts(crop: np.ndarray, y0: int, x0: int, h: int, w: int) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, zeros first) of an h x w mask that is zero outside
    `crop`, a bool array placed at row y0, column x0."""
    padded = np.zeros((crop.shape[0] + 2, crop.shape[1]), np.int8)
    padded[1:-1] = crop
    steps = np.diff(padded, axis=0).T  # [crop w, crop h + 1]: nonzero where a run of ones starts or ends
    cols, rows = np.nonzero(steps)  # in column-major order, so the edges below come sorted
    edges = (x0 + cols) * h + y0 + rows
    if crop.shape[0] == h:  # a run ending at a column's bottom and one starting at the next top are one run
        same = edges[1:] == edges[:-1]
        keep = np.ones(len(edges), bool)
        keep[1:][same] = False
        keep[:-1][same] = False
        edges = edges[keep]
    counts = np.diff(edges, prepend=0, append=h * w).tolist()
    if counts[-1] == 0:  # the last pixel is set: encode ends with its run of ones
        counts.pop()
    return counts
