"""Shared by the tests that run models: synthetic checkpoints on disk, small test manifests and models,
fixture images, the CLI runner."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Optional

from synth_weights import synth_state_dict

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"
MIRROR_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"


def import_script(name: str):
    """A module of scripts/, imported with scripts/ on sys.path (the scripts import their neighbours by name)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def fixture_record(name: str, image: str) -> dict:
    """Detectron2's recorded output for baseline `name` on fixture image `image` (stem)."""
    return json.loads((FIXTURES / "detectron2" / name / f"{image}.json").read_text())


def state_dict_keys(name: str) -> dict:
    """Detectron2's state_dict listing of baseline `name`: {key: {"shape": [...], "dtype": ...}}."""
    return json.loads((FIXTURES / "state_dicts" / f"{name}.json").read_text())


def baseline_state_dict(name: str, seed: Optional[int] = None) -> dict:
    """The synthetic weights Detectron2's outputs were recorded with for `name` (its seed unless `seed` is given,
    and its pixel_std: 57.63 for X101, 1.0 otherwise)."""
    w = fixture_record(name, "grace_hopper")["weights"]
    return synth_state_dict(state_dict_keys(name), w["seed"] if seed is None else seed, w["pixel_std"])


def synthetic_baseline(name: str):
    """Baseline `name` as zoo builds it, with baseline_state_dict(name) loaded, in eval mode."""
    import zoo
    from zoo.modeling import build_model, load_weights

    model = build_model(zoo.get_manifest(name).architecture, random_init=False)  # as zoo.get builds it
    load_weights(model, baseline_state_dict(name))
    return model.eval()


def synth_checkpoint(tmp_path_factory, name: str) -> Path:
    """The fixtures' synthetic weights for `name` as a released-layout .pkl, written once per session."""
    path = tmp_path_factory.getbasetemp() / "synth_checkpoints" / f"{name}.pkl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        state = baseline_state_dict(name)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            pickle.dump({"model": state, "__author__": "synthetic", "matching_heuristics": False}, f, protocol=4)
        tmp.replace(path)
    return path


def md5_prefix(path: Path) -> str:
    """The 6 hex digits Detectron2 puts in a released file name."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:6]


def small_manifest(base: str, checkpoint: Optional[Path] = None, *, min_size: int = 320, max_size: int = 512) -> dict:
    """Manifest `small_<base>`: `base`'s network at a small test size, so CPU tests run in a fraction of the time.

    Its checkpoint URL names `checkpoint`'s true MD5 prefix, so the hub accepts the file from a mirror.
    """
    from zoo.registry import get_manifest

    m = get_manifest(base).model_dump(mode="json")
    name = f"small_{base}"
    md5 = md5_prefix(checkpoint) if checkpoint is not None else "000000"
    m["name"] = name
    m["config"] = f"Test/{name}.yaml"
    m["checkpoint"]["url"] = f"{MIRROR_PREFIX}Test/{name}/{m['model_id']}/model_final_{md5}.pkl"
    m["checkpoint"]["sha256"] = None
    m["architecture"]["input"].update(min_size_test=min_size, max_size_test=max_size)
    m["architecture"]["rpn"].update(pre_nms_topk_test=300, post_nms_topk_test=100)
    return m


def mirror_with(directory: Path, manifest: dict, checkpoint: Path) -> Path:
    """Lay `checkpoint` out under `directory` where ZOO_MIRROR=directory serves `manifest`'s URL."""
    dest = directory / manifest["checkpoint"]["url"][len(MIRROR_PREFIX):]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.symlink(checkpoint, dest)
    return directory


def write_manifest_dir(directory: Path, *manifests: dict) -> Path:
    """A folder for ZOO_MANIFEST_PATH holding `manifests`."""
    directory.mkdir(parents=True, exist_ok=True)
    for m in manifests:
        (directory / f"{m['name']}.json").write_text(json.dumps(m, indent=1))
    return directory


def zoo_cmd(*args: str, env: Optional[dict] = None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m zoo ARGS` from this checkout, quietly, with an isolated cache unless env says otherwise."""
    e = dict(os.environ)
    e.pop("ZOO_MIRROR", None)
    e.update({"ZOO_QUIET": "1", **(env or {})})
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=timeout)


def tiny_coco_dataset(root: Path) -> Path:
    """One 8x8 PNG (root/a.png) with one person box, as COCO instances JSON: enough for zoo eval's input checks."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "a.png")
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                                "area": 16, "iscrowd": 0}],
                               "categories": [{"id": 1, "name": "person", "supercategory": ""}]}))
    return ann


def fixture_image(stem: str):
    """A fixture image as an HxWx3 uint8 RGB array."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(IMAGES / f"{stem}.png").convert("RGB"))


def small_synthetic_model(name: str, min_size: int = 320, max_size: int = 512):
    """Baseline `name` with the fixtures' synthetic weights, fed at a small test size (CPU tests stay fast)."""
    import zoo
    from zoo.modeling import build_model, load_weights

    model = build_model(zoo.get_manifest(name).architecture.with_test_settings(min_size=min_size, max_size=max_size),
                        random_init=False)
    load_weights(model, synth_state_dict(state_dict_keys(name)))
    return model


def box_iou(a, b):
    """IoU of every box in a [n, 4] with every box in b [m, 4] (x1, y1, x2, y2) -> [n, m]."""
    import torch

    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def mask_iou(a, b) -> float:
    """IoU of two boolean masks of one shape; 1.0 when both are empty."""
    import numpy as np

    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def top_matched(ref, out, top_n: int, min_iou: float) -> float:
    """Share of `ref`'s top_n Detections that `out` has too: same class and IoU >= min_iou, anywhere in its list
    (near-tied scores may legitimately reorder or swap the low ones between devices, precisions, batch sizes)."""
    assert len(ref) >= top_n and len(out) > 0, (len(ref), len(out))
    iou = box_iou(ref.boxes[:top_n].double().cpu(), out.boxes.double().cpu())
    iou[ref.labels[:top_n, None].cpu() != out.labels.cpu()[None, :]] = 0
    return (iou.max(dim=1).values >= min_iou).float().mean().item()


def greedy_match(ref_boxes, ref_scores, ref_labels, boxes, labels, min_iou: float) -> list[int]:
    """For each reference instance (by decreasing score): the best unused same-class instance with IoU >= min_iou,
    or -1. Tensors (boxes [n, 4] / [m, 4])."""
    import torch

    iou = box_iou(ref_boxes.double(), boxes.double())
    iou[ref_labels[:, None] != labels[None, :]] = -1
    used = torch.zeros(len(boxes), dtype=torch.bool)
    match = [-1] * len(ref_boxes)
    for i in torch.argsort(ref_scores, descending=True, stable=True).tolist():
        row = iou[i].clone()
        row[used] = -1
        if len(row) and row.max() >= min_iou:
            j = int(row.argmax())
            match[i], used[j] = j, True
    return match


def make_detections(boxes, scores, labels, masks=None, size=(240, 320)):
    """Detections from plain lists (float32 boxes and scores, int64 labels), for tests of results and pictures."""
    import torch

    from zoo.results import Detections

    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32),
                      torch.tensor(labels, dtype=torch.int64), masks, size)
