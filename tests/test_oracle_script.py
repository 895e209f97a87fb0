"""scripts/detectron2_oracle.py without Detectron2: its torchvision stand-in and its comparison (Detectron2
itself is not installed here; the script's end-to-end use is documented in the README)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo.ops

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "detectron2_oracle.py"


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("detectron2_oracle", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stand_in_torchvision_is_zoos_reference_ops(oracle, monkeypatch):
    for k in [k for k in sys.modules if k.startswith("torchvision")]:
        monkeypatch.delitem(sys.modules, k)
    for k in ("torchvision", "torchvision.ops", "torchvision.ops.boxes"):
        monkeypatch.setitem(sys.modules, k, None)  # so the stand-in is removed again when the test ends
    oracle._stand_in_torchvision()
    from torchvision.ops import boxes as box_ops
    from torchvision.ops import nms, roi_align

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 50
    b = torch.cat([xy, xy + 5 + torch.rand(40, 2, generator=g) * 30], 1)
    s = torch.rand(40, generator=g)
    cls = torch.randint(0, 3, (40,), generator=g)
    assert torch.equal(nms(b, s, 0.5), zoo.ops.nms(b, s, 0.5, backend="torch"))
    assert torch.equal(box_ops.batched_nms(b, s, cls, 0.5), zoo.ops.batched_nms(b, s, cls, 0.5, backend="torch"))
    feat = torch.randn(1, 4, 20, 20, generator=g)
    rois = torch.cat([torch.zeros(40, 1), b / 4], 1)
    assert torch.equal(roi_align(feat, rois, (7, 7), 0.25, 0, True),
                       zoo.ops.roi_align(feat, rois, (7, 7), 0.25, 0, True, backend="torch"))


def _result(boxes, labels, scores=None, masks=None):
    boxes = np.asarray(boxes, dtype=np.float32)
    return {"sizes": (800, 1200, (800, 1216)), "proposals": boxes.copy(), "boxes": boxes,
            "scores": np.linspace(0.9, 0.1, len(boxes), dtype=np.float32) if scores is None else scores,
            "labels": np.asarray(labels), "masks": masks}


def test_compare_flags_what_differs(oracle):
    boxes = [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 90, 70]]
    ref = _result(boxes, [1, 2, 3])
    same = oracle.compare(ref, _result(boxes, [1, 2, 3]))
    assert same["ok"] and same["matched"] == "3/3" and same["proposals equal"] == "3/3"
    moved = oracle.compare(ref, _result([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 90, 71]], [1, 2, 3]))
    assert moved["proposals equal"] == "2/3" and moved["matched"] == "2/3" and not moved["ok"]
    relabelled = oracle.compare(ref, _result(boxes, [1, 2, 4]))
    assert relabelled["matched"] == "2/3" and not relabelled["ok"]
    masks = np.zeros((3, 100, 100), dtype=bool)
    masks[:, :10, :10] = True
    other = masks.copy()
    other[2, :10, :5] = False
    bad = oracle.compare(_result(boxes, [1, 2, 3], masks=masks), _result(boxes, [1, 2, 3], masks=other))
    assert bad["masks < 0.97"] == 1 and not bad["ok"]


def test_stand_in_is_gone_after_the_test():  # runs after the test above (file order)
    tv = sys.modules.get("torchvision")
    assert tv is None or getattr(tv, "__file__", None) is not None  # absent, or the real package (GPU machine)
