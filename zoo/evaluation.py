"""COCO evaluation of a model on a COCO-format dataset (pycocotools)."""
from __future__ import annotations

import contextlib
import io
import json
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
    if not data["annotations"]:  # COCOeval would report AP -100 (undefined) for every metric
        raise InputError(f"{str(p)!r} has no annotations, so AP is undefined; pass a file with ground-truth boxes")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


@dataclass
class EvalResult:
    """Per-IoU-type COCO stats (fractions, COCOeval order), their printed summaries and the raw results."""

    image_ids: list[int]
    results: list[dict]
    stats: dict[str, list[float]] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)


def _image_paths(coco: Any, images: Path, limit: Optional[int]) -> list[tuple[int, Path]]:
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
    todo = _image_paths(coco, Path(images).expanduser(), limit)
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
        tail = f"   published {published:.1f} ({manifest.provenance.evaluated_on})" if published is not None else ""
        lines.append(f"{iou_type} AP {ap:.1f}{tail}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
