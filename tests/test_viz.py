"""zoo.viz.draw: boxes, translucent masks and legible labels, on plain and real images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.errors import InputError
from user_support import make_detections as _dets
from zoo.results import Detections
from zoo.viz import draw, instance_colors

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GREY = 128


def _grey(h=240, w=320):
    return np.full((h, w, 3), GREY, np.uint8)


def test_output_size_and_untouched_background():
    img = _grey()
    out = draw(img, _dets([[100, 120, 200, 200]], [0.9], [0]))
    assert isinstance(out, Image.Image) and out.size == (320, 240) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    changed = np.abs(arr - GREY).sum(axis=2) > 0
    # Box outline is drawn on all four sides.
    assert changed[160, 100] and changed[160, 199] and changed[199, 150]
    # Well inside the box, and far outside box + label, nothing changes.
    assert not changed[140:180, 120:180].any()
    assert not changed[:, 230:].any() and not changed[210:, :].any() and not changed[:, :90].any()
    # The input array is not modified in place.
    assert (img == GREY).all()


def test_label_is_legible_text_on_a_filled_background():
    out = np.asarray(draw(_grey(), _dets([[100, 120, 200, 200]], [0.87], [0]))).astype(int)
    color = np.array(instance_colors(1)[0])
    # The label sits above the box: a filled rectangle of the box colour with contrasting text in it.
    above = out[:120]
    ys, xs = np.nonzero(np.abs(above - color).sum(axis=2) == 0)
    assert len(ys) > 100 and ys.min() >= 90 and xs.min() >= 100
    label = above[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    assert label.shape[1] > 40  # "person 87%" is wider than it is tall
    lum = label @ np.array([0.299, 0.587, 0.114])
    bg_lum = float(color @ np.array([0.299, 0.587, 0.114]))
    text = np.abs(lum - bg_lum) > 100
    assert 0.05 < text.mean() < 0.6, "label text should contrast strongly with its background"


def test_label_moves_inside_when_box_touches_top_edge():
    out = np.asarray(draw(_grey(), _dets([[10, 0, 200, 100]], [0.9], [2]))).astype(int)
    color = np.array(instance_colors(1)[0])
    assert (np.abs(out[2:12, 15:40] - color).sum(axis=2) == 0).mean() > 0.3


def test_masks_tint_their_pixels_in_distinct_colours():
    masks = torch.zeros(2, 240, 320, dtype=torch.bool)
    masks[0, 50:100, 20:100] = True
    masks[1, 150:200, 200:300] = True
    dets = _dets([[20, 50, 100, 100], [200, 150, 300, 200]], [0.9, 0.8], [0, 17], masks)
    arr = np.asarray(draw(_grey(), dets)).astype(int)
    a, b = arr[75, 60], arr[175, 250]  # interiors of each mask, away from box lines and labels
    assert np.abs(a - GREY).sum() > 30 and np.abs(b - GREY).sum() > 30
    assert np.abs(a - b).sum() > 30
    # Translucent: the tint mixes with the image, it does not replace it.
    for px, k in ((a, 0), (b, 1)):
        c = np.array(instance_colors(2)[k])
        assert np.abs(px - c).sum() > 10 or np.abs(px - GREY).sum() < np.abs(c - GREY).sum()
    assert (np.abs(arr[220:, :150] - GREY).sum(axis=2) == 0).all()


def test_score_threshold_hides_weak_instances():
    dets = _dets([[100, 120, 200, 200]], [0.3], [0])
    assert (np.asarray(draw(_grey(), dets, score_thresh=0.5)) == GREY).all()
    assert (np.asarray(draw(_grey(), dets, score_thresh=0.2)) != GREY).any()


def test_empty_detections_and_pil_input():
    dets = _dets(np.zeros((0, 4)), [], [])
    out = draw(Image.fromarray(_grey()), dets)
    assert (np.asarray(out) == GREY).all()


def test_size_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="size"):
        draw(_grey(100, 100), _dets([[1, 1, 5, 5]], [0.9], [0]))


def test_real_picture_with_fixture_detections(tmp_path):
    from pycocotools import mask as mask_util
    rec = json.loads((FIXTURES / "detectron2/mask_rcnn_R_50_FPN_3x/grace_hopper.json").read_text())
    inst = rec["instances"]
    masks = np.stack([mask_util.decode({"size": r["size"], "counts": r["counts"].encode()})
                      for r in inst["masks_rle"]]).astype(bool)
    h, w = rec["input"]["height"], rec["input"]["width"]
    dets = Detections(torch.tensor(inst["boxes"]), torch.tensor(inst["scores"]), torch.tensor(inst["classes"]),
                      torch.from_numpy(masks), (h, w))
    image = FIXTURES / "images/grace_hopper.png"
    out = draw(image, dets, score_thresh=0.3)
    out.save(tmp_path / "grace_hopper.png")
    assert out.size == (w, h)
    src = np.asarray(Image.open(image).convert("RGB")).astype(int)
    diff = np.abs(np.asarray(out).astype(int) - src).sum(axis=2) > 0
    keep = np.array(inst["scores"]) >= 0.3
    # Every change lies inside a drawn box grown by its label's height.
    allowed = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in np.array(inst["boxes"])[keep]:
        allowed[max(int(y1) - 30, 0): int(y2) + 3, max(int(x1) - 3, 0): int(x2) + 120] = True
    assert diff.any() and not (diff & ~allowed).any()


def test_detections_repr_is_a_summary():
    d = _dets([[0, 0, 10, 10]] * 7, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], [0, 2, 0, 0, 0, 0, 0],
              masks=torch.zeros(7, 240, 320, dtype=torch.bool))
    r = repr(d)
    assert "\n" not in r and len(r) < 300
    assert "7 instances" in r and "person 0.90" in r and "car 0.80" in r and "(2 more)" in r and "(7, 240, 320)" in r
    assert "0 instances" in repr(_dets(torch.zeros(0, 4).tolist(), [], []))



def test_masks_are_painted_within_their_boxes_exactly_as_on_the_whole_image():
    # draw paints each mask on its bounding box plus a margin; the reference paints on the whole image
    from zoo.viz import MASK_ALPHA, _mask_edge, _paint_masks

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        masks = np.zeros((4, h, w), bool)
        for m in masks[:3]:  # random blobs, often on the image border; the last mask stays empty
            y0, y1 = sorted(rng.integers(0, h + 1, 2))
            x0, x1 = sorted(rng.integers(0, w + 1, 2))
            m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.3
        colors = instance_colors(4)
        canvas = rng.random((h, w, 3)).astype(np.float32) * 255
        want = canvas.copy()
        for m, color in zip(masks, colors):
            c = np.array(color, np.float32)
            want[m] = want[m] * (1.0 - MASK_ALPHA) + c * MASK_ALPHA
            want[_mask_edge(m)] = c
        _paint_masks(canvas, masks, colors)
        assert np.array_equal(canvas, want)


def test_masks_are_drawn_without_copying_the_stack():
    """100 masks of a 12 MP photo take 1.2 GB: draw reads each where it lies, instead of copying the filtered,
    reordered stack (NumPy's allocations, which tracemalloc sees, stay near the canvas's own size)."""
    import tracemalloc

    n, h, w = 100, 1000, 1000  # a 100 MB stack, half of it drawn; the canvas is 12 MB of float32
    boxes = [[(7 * i) % 800, (3 * i) % 700, (7 * i) % 800 + 200, (3 * i) % 700 + 300] for i in range(n)]
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1 + 5:y2 - 5, x1 + 5:x2 - 5] = True
    scores = torch.linspace(0.95, 0.1, n).tolist()
    det = _dets(boxes, scores, [i % 80 for i in range(n)], masks=masks, size=(h, w))
    img = _grey(h, w)
    want = np.asarray(draw(img, det[det.scores >= 0.5], score_thresh=0.0))
    tracemalloc.start()
    try:
        got = np.asarray(draw(img, det, score_thresh=0.5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, want)  # the same picture as drawing the filtered detections
    assert peak < 64 * 2**20, peak / 2**20  # about 35 MiB; copying the drawn half twice took 114
