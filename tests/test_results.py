"""Detections: indexing like Detectron2's Instances, and COCO export (boxes, category ids, RLE masks exactly as
pycocotools encodes them)."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from user_support import make_detections as _dets
from zoo.results import COCO_CATEGORY_IDS, Detections


def _pycocotools_rles(masks: torch.Tensor) -> list[dict]:
    """What pycocotools.mask.encode gives for full-image masks (the reference for zoo's crop encoder)."""
    rles = mask_util.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def test_index_like_detectron2_instances():
    masks = torch.zeros(4, 240, 320, dtype=torch.bool)
    for i in range(4):
        masks[i, i] = True  # mask i marks row i, so the picked masks can be told apart
    d = _dets([[i, i, 10 + i, 10 + i] for i in range(4)], [0.9, 0.8, 0.4, 0.3], [0, 2, 0, 5], masks=masks)
    top = d[:2]
    assert isinstance(top, Detections) and len(top) == 2 and top.image_size == d.image_size
    assert top.class_names == ["person", "car"] and torch.equal(top.masks, masks[:2])
    people = d[d.labels == 0]
    assert people.scores.tolist() == pytest.approx([0.9, 0.4]) and torch.equal(people.boxes, d.boxes[[0, 2]])
    assert torch.equal(people.masks, masks[[0, 2]])
    one, last = d[1], d[-1]
    assert len(one) == 1 and one.class_names == ["car"] and one.masks.shape == (1, 240, 320)
    assert len(last) == 1 and last.labels.tolist() == [5] and torch.equal(last.masks, masks[3:])
    assert len(d[torch.tensor([3, 0])]) == 2 and d[torch.tensor([3, 0])].labels.tolist() == [5, 0]
    kept = d.filter(0.4)  # at least 0.4
    assert kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.4]) and kept.masks.shape[0] == 3
    assert kept.masks.data_ptr() == masks.data_ptr()  # sorted by score: the first three, not a copy
    assert torch.equal(kept.masks, masks[:3]) and len(d.filter(0.95)) == 0 and len(d.filter(0.0)) == 4
    shuffled = d[torch.tensor([2, 0, 3, 1])]  # not sorted: the instances that pass, in their order
    picked = shuffled.filter(0.4)
    assert picked.scores.tolist() == pytest.approx([0.4, 0.9, 0.8]) and torch.equal(picked.masks, masks[[2, 0, 1]])
    no_masks = _dets([[0, 0, 1, 1]], [0.5], [1])
    assert repr(no_masks).startswith("Detections(1 instance in a 240x320 image, device cpu: bicycle 0.50")
    assert no_masks[0].masks is None and len(no_masks[1:]) == 0
    # integers of any kind pick one instance, as a plain int does (e.g. from np.argsort or torch.argmax)
    for i in (np.int64(2), np.array(2), torch.tensor(2), torch.tensor(-2, dtype=torch.int32)):
        got = d[i]
        assert len(got) == 1 and got.boxes.shape == (1, 4) and got.labels.tolist() == [0], type(i)
        assert torch.equal(got.masks, masks[2:3])
    assert len(d[np.array([0, 3])]) == 2 and len(d[np.array([True, False, True, False])]) == 2  # arrays as before
    with pytest.raises(IndexError, match="instance 4 asked for, but there are 4"):
        d[4]
    with pytest.raises(IndexError, match="instance 4 asked for, but there are 4"):
        d[np.int64(4)]
    with pytest.raises(IndexError):
        d[-5]


def test_to_coco_records():
    masks = torch.zeros(2, 240, 320, dtype=torch.bool)
    masks[0, 10:20, 30:50] = True
    masks[1, 100:140, 0:5] = True
    d = _dets([[30, 10, 50, 20], [0, 100, 5, 140]], [0.9, 0.25], [0, 79], masks=masks)
    recs = d.to_coco(7)
    assert [r["image_id"] for r in recs] == [7, 7]
    assert [r["category_id"] for r in recs] == [COCO_CATEGORY_IDS[0], COCO_CATEGORY_IDS[79]] == [1, 90]
    assert recs[0]["bbox"] == [30, 10, 20, 10] and recs[1]["score"] == pytest.approx(0.25)
    for r, m in zip(recs, masks):
        rle = r["segmentation"]
        assert rle["size"] == [240, 320] and isinstance(rle["counts"], str)
        assert np.array_equal(mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}), m.numpy())
    assert "segmentation" not in _dets([[0, 0, 1, 1]], [0.5], [1]).to_coco(1)[0]
    assert _dets(torch.zeros(0, 4).tolist(), [], [], masks=torch.zeros(0, 240, 320, dtype=torch.bool)).to_coco(1) == []


def test_mask_rles_equal_pycocotools_encode():
    # zoo encodes each mask's bounding crop; the strings must be pycocotools' own, byte for byte, including
    # masks that touch the borders, fill whole columns (runs that continue into the next column), are full,
    # empty, or a single corner pixel
    rng = np.random.default_rng(0)
    for _ in range(600):
        h, w = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        masks = torch.zeros(6, h, w, dtype=torch.bool)
        masks[0] = torch.from_numpy(rng.random((h, w)) > 0.5)
        masks[1] = True
        y0, y1 = sorted(rng.integers(0, h + 1, 2))
        x0, x1 = sorted(rng.integers(0, w + 1, 2))
        masks[2, y0:y1, x0:x1] = True
        masks[3, :, int(rng.integers(0, w)):] = True
        masks[4, -1, -1] = masks[4, 0, 0] = True
        d = _dets([[0, 0, 1, 1]] * 6, [0.5] * 6, [0] * 6, masks=masks, size=(h, w))
        assert [r["segmentation"] for r in d.to_coco(1)] == _pycocotools_rles(masks)
    # a realistic image: 100 blobs of many runs
    masks = torch.zeros(100, 480, 640, dtype=torch.bool)
    for i in range(100):
        y, x, bh, bw = (int(v) for v in rng.integers([0, 0, 5, 5], [400, 560, 80, 80]))
        masks[i, y:y + bh, x:x + bw] = torch.from_numpy(rng.random((min(bh, 480 - y), min(bw, 640 - x))) > 0.2)
    d = _dets([[0, 0, 1, 1]] * 100, [0.5] * 100, [0] * 100, masks=masks, size=(480, 640))
    assert [r["segmentation"] for r in d.to_coco(1)] == _pycocotools_rles(masks)
