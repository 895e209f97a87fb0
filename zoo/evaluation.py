"""COCO evaluation of a model on a COCO-format dataset (pycocotools)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import InputError, ZooError

# COCOeval.stats order (the 12 lines of `summarize`).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def require_pycocotools() -> tuple[Any, Any]:
    """(COCO, COCOeval) from pycocotools, or a ZooError saying how to install it."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ZooError("COCO evaluation needs pycocotools; reinstall it with: pip install pycocotools") from None
    return COCO, COCOeval


def load_annotations(path: Union[str, os.PathLike]) -> Any:
    """A pycocotools COCO index of a COCO instances JSON file, with one clear error when it is unusable."""
    COCO, _ = require_pycocotools()
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"annotation file {str(p)!r} does not exist; pass a COCO instances JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read annotation file {str(p)!r} ({e}); pass a COCO instances JSON file") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError(f"{str(p)!r} is not COCO instances JSON (needs 'images', 'annotations' and 'categories')")
    problem = _format_problem(data)
    if problem:  # pycocotools would fail on it with a bare KeyError, some of them only after the whole inference
        raise InputError(f"{str(p)!r} is not usable COCO instances JSON: {problem}; fix the file or pass another")
    if not data["annotations"]:  # COCOeval would report AP -100 (undefined) for every metric
        raise InputError(f"{str(p)!r} has no annotations, so AP is undefined; pass a file with ground-truth boxes")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _format_problem(data: dict) -> Optional[str]:
    """The first thing in a COCO instances dict that bbox evaluation cannot use, or None."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            return f"'{key}' is not a list"
    seen: set[int] = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            return f"images[{i}] has no integer 'id'"
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            return f"images[{i}] (id {im['id']}) has no 'file_name'"
        if im["id"] in seen:
            return f"images[{i}] repeats image id {im['id']}"
        seen.add(im["id"])
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            return f"categories[{i}] has no integer 'id'"
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            return f"annotations[{i}] is not an object"
        for key in ("id", "image_id", "category_id"):
            if not _is_int(ann.get(key)):
                return f"annotations[{i}] has no integer '{key}'"
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            return f"annotations[{i}] has no 'bbox' of 4 numbers [x, y, width, height]"
        if not _is_number(ann.get("area")):
            return f"annotations[{i}] has no numeric 'area'"
        if ann.get("iscrowd") not in (0, 1) or isinstance(ann.get("iscrowd"), float):
            return f"annotations[{i}] has no 'iscrowd' of 0 or 1"
    return None


def _masks_problem(coco: Any, ids: list[int]) -> Optional[str]:
    """Why the ground truth of images `ids` cannot be scored for masks (segm AP), or None."""
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=ids)):
        seg = ann.get("segmentation")
        if not isinstance(seg, (list, dict)) or not seg:
            return f"annotation {ann['id']} has no 'segmentation'"
        compressed = isinstance(seg, dict) and isinstance(seg.get("counts"), str)
        if not compressed and not all(_is_int(coco.imgs[ann["image_id"]].get(k)) for k in ("height", "width")):
            return f"image {ann['image_id']} has no integer 'height' and 'width' for its polygon masks"
    return None


@dataclass
class EvalResult:
    """Per-IoU-type COCO stats (fractions, COCOeval order), their printed summaries and the raw results."""

    image_ids: list[int]
    results: list[dict]
    stats: dict[str, list[float]] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # the results can be thousands of records
        aps = ", ".join(f"{k} AP {100 * v[0]:.1f}" for k, v in self.stats.items())
        return f"EvalResult({len(self.image_ids)} images, {len(self.results)} results, {aps or 'not scored'})"


def image_paths(coco: Any, images: Union[str, os.PathLike], limit: Optional[int] = None) -> list[tuple[int, Path]]:
    """(image id, file) of each image to evaluate, by id; InputError where the dataset cannot give an AP."""
    images = Path(images).expanduser()
    if not images.is_dir():
        raise InputError(f"image folder {str(images)!r} does not exist; pass --images DIR holding the dataset's images")
    ids = sorted(coco.getImgIds())
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        ids = ids[:limit]
    if not ids:
        raise InputError("the annotation file lists no images; pass a COCO file with an 'images' list")
    out = []
    for i in ids:
        path = images / coco.imgs[i]["file_name"]
        if not path.is_file():
            raise InputError(f"image {str(path)!r} (listed in the annotations) does not exist; "
                             "pass --images pointing at the folder that holds the dataset's images")
        out.append((i, path))
    if not any(not a.get("iscrowd", 0) for a in coco.loadAnns(coco.getAnnIds(imgIds=ids))):
        n = len(ids)
        raise InputError(f"none of the {n} image{'s' if n != 1 else ''} to evaluate has a (non-crowd) annotation, "
                         "so AP is undefined; evaluate more images (--limit) or pass another annotation file")
    return out


def score_results(coco_gt: Any, results: list[dict], iou_type: str, image_ids: list[int]) -> tuple[list[float], str]:
    """COCOeval on `results`: the 12 summary stats and the standard 12-line text."""
    _, COCOeval = require_pycocotools()
    if not results:
        return [0.0] * len(STAT_NAMES), "  (no detections: every AP and AR is 0)\n"
    # loadRes edits records in place, so it gets copies. For segm the box goes, as in Detectron2's evaluator:
    # with a box present, pycocotools would take the box area, not the mask area, for the small/medium/large split.
    drop = {"bbox"} if iou_type == "segm" else set()
    records = [{k: v for k, v in r.items() if k not in drop} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # progress chatter
        coco_dt = coco_gt.loadRes(records)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return [float(s) for s in ev.stats], buf.getvalue()


def evaluate(model: Any, annotations: Union[str, os.PathLike, Any], images: Union[str, os.PathLike], *,
             limit: Optional[int] = None, quiet: Optional[bool] = None, batch_size: int = 1) -> EvalResult:
    """Run the model on the dataset's images and score bbox (and segm for mask models) with COCOeval.

    A zoo model streams them (`predict_iter`: images read ahead on threads, `batch_size` per forward); any
    other object with `predict(path) -> Detections` is called once per image."""
    from tqdm import tqdm

    from .hub.download import _is_quiet

    # A path, or a COCO index already loaded with `load_annotations`.
    coco = load_annotations(annotations) if isinstance(annotations, (str, os.PathLike)) else annotations
    todo = image_paths(coco, images, limit)
    results: list[dict] = []
    has_masks = False
    paths = [p for _, p in todo]
    if hasattr(model, "predict_iter"):
        dets = model.predict_iter(paths, batch_size=batch_size)
    else:
        dets = (model.predict(p) for p in paths)
    for (image_id, _), det in tqdm(zip(todo, dets), total=len(todo), desc="eval", unit="im",
                                   disable=_is_quiet(quiet)):
        has_masks = has_masks or det.masks is not None
        results.extend(det.to_coco(image_id))
    ids = [i for i, _ in todo]
    out = EvalResult(image_ids=ids, results=results)
    mask_model = has_masks or getattr(getattr(model, "manifest", None), "task", "") == "instance_segmentation"
    for iou_type in ("bbox", "segm") if mask_model else ("bbox",):
        problem = _masks_problem(coco, ids) if iou_type == "segm" else None
        if problem:
            out.notes.append(f"segm AP not scored: {problem} (box-only ground truth)")
            continue
        out.stats[iou_type], out.summaries[iou_type] = score_results(coco, results, iou_type, ids)
    return out


def format_report(result: EvalResult, manifest: Any = None) -> str:
    """The 12-line summary per IoU type, each followed by its AP beside the manifest's published AP."""
    lines = []
    for iou_type, text in result.summaries.items():
        lines.append(f"{iou_type}:")
        lines.append(text.rstrip("\n"))
        ap = 100.0 * result.stats[iou_type][0]
        published = None
        if manifest is not None:
            published = manifest.metrics.box_ap if iou_type == "bbox" else manifest.metrics.mask_ap
        tail = f"   published {published:.1f} on {manifest.provenance.evaluated_on}" if published is not None else ""
        lines.append(f"{iou_type} AP {ap:.1f}{tail}" if ap >= 0 else f"{iou_type} AP n/a (no ground truth){tail}")
        lines.append("")
    lines += result.notes
    return "\n".join(lines).rstrip("\n")
