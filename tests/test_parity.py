"""Parity with Detectron2: all 19 baselines x 3 images against its recorded outputs (synthetic weights).

Each case regenerates the synthetic weights with tests/synth_weights.py, loads them strictly and compares
sizes, backbone feature summaries, the top-50 RPN proposals and the final instances (boxes, scores,
classes, masks), for the device's default inference path on every image and the other one (dynamic or
fixed-shape, GeneralizedRCNN.static_shapes) on the first. Baselines that share an architecture and weights (the 1x and 3x schedules) compute
identical outputs, so the network runs once per distinct (architecture, seed, pixel_std) and image.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import zoo
from zoo.modeling import build_model, load_weights

sys.path.insert(0, str(Path(__file__).parent))
from synth_weights import synth_tensor  # noqa: E402
from user_support import greedy_match, mask_iou, state_dict_keys  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = ("grace_hopper", "scene_427x640", "wide_300x1400")
NAMES = sorted(p.name for p in (FIXTURES / "detectron2").iterdir() if p.is_dir())

FEATURE_RTOL = 1e-3
PROPOSAL_ATOL = 0.05  # px, resized image
BOX_ATOL = 0.1  # px, original image
SCORE_ATOL = 2e-3
MATCH_IOU = 0.98
MIN_MATCHED = 0.97
MIN_MASK_IOU = 0.97
# ZOO_TEST_DEVICE=cuda runs the networks on the GPU (same tolerances; TF32 off, except where the precision asks for
# it: the CUDA default, tf32, runs the box head's fc layers on TF32 tensor cores)
DEVICE = os.environ.get("ZOO_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda"):
    if not torch.cuda.is_available():
        pytest.skip("ZOO_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
# ZOO_TEST_CUDNN_FUSION=1 checks the networks with model.cudnn_fusion on (it acts on CUDA only)
CUDNN_FUSION = os.environ.get("ZOO_TEST_CUDNN_FUSION") == "1"
# ZOO_TEST_PRECISION=fp32|tf32 (tf32: CUDA only) checks that precision; unset, the device's default (tf32 on CUDA,
# fp32 on CPU)
PRECISION = os.environ.get("ZOO_TEST_PRECISION") or None
if PRECISION not in (None, "fp32", "tf32") or (PRECISION == "tf32" and not DEVICE.startswith("cuda")):
    raise pytest.UsageError(f"ZOO_TEST_PRECISION={PRECISION!r}: use fp32, or tf32 with ZOO_TEST_DEVICE=cuda")


def _fixture(name: str, image: str) -> dict:
    return json.loads((FIXTURES / "detectron2" / name / f"{image}.json").read_text())


def _key(name: str) -> tuple:
    w = _fixture(name, IMAGES[0])["weights"]
    return (zoo.get_manifest(name).architecture.model_dump_json(), w["seed"], w["pixel_std"])


def _order(name: str) -> tuple:
    # same computation back to back (one model in memory at a time), and Faster/Mask R-CNN of one
    # backbone adjacent so their shared synthetic tensors are generated once
    arch = zoo.get_manifest(name).architecture
    return (arch.layout, arch.resnet.model_dump_json(), _key(name), name)


# Each device's default inference path on every image; the other path (static_shapes) on the first image.
DEFAULT_PATH = "static" if DEVICE.startswith("cuda") else "dynamic"
OTHER_PATH = "dynamic" if DEFAULT_PATH == "static" else "static"
CASES = [c for n in sorted(NAMES, key=_order)
         for c in [(n, im, DEFAULT_PATH) for im in IMAGES] + [(n, IMAGES[0], OTHER_PATH)]]


def _group(name: str) -> str:
    # under pytest-xdist's --dist loadgroup one worker runs all cases of a backbone, in the order above, so
    # each network is still built once and its synthetic tensors generated once
    arch = zoo.get_manifest(name).architecture
    return f"parity-{arch.layout}-{arch.resnet.depth}-{arch.resnet.num_groups}"


@dataclass
class Outcome:
    resized: tuple[int, int]
    padded: tuple[int, int]
    features: dict[str, dict]  # name -> shape, mean, std, flattened tensor (image 0)
    proposals: torch.Tensor
    logits: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: Optional[torch.Tensor]


class Runner:
    """Builds one model per distinct computation and memoises its outputs per image."""

    def __init__(self) -> None:
        self._key = None
        self._model = None
        self._results: dict[tuple, Outcome] = {}
        self._weights: dict[tuple, np.ndarray] = {}

    def _synth(self, keys: dict, seed: int, pixel_std: float) -> dict:
        """Synthetic state_dict, reusing tensors of the previous model (each depends only on name, shape, seed)."""
        new = {}
        for k, v in keys.items():
            wk = (k, tuple(v["shape"]), seed, pixel_std)
            new[wk] = self._weights[wk] if wk in self._weights else synth_tensor(k, v["shape"], seed, pixel_std)
        self._weights = new
        return {wk[0]: a for wk, a in new.items()}

    def model(self, name: str):
        key = _key(name)
        if key != self._key:
            self._model = None  # free the previous network first
            self._results = {k: v for k, v in self._results.items() if k[0] == key}
            arch = zoo.get_manifest(name).architecture
            keys = state_dict_keys(name)
            model = build_model(arch, random_init=False)  # as zoo.get builds a model it loads
            load_weights(model, self._synth(keys, key[1], key[2]))
            model.cudnn_fusion = CUDNN_FUSION
            model.precision = PRECISION
            self._model, self._key = model.to(DEVICE), key
        return self._model

    def run(self, name: str, image: str, path: str) -> Outcome:
        model = self.model(name)
        rk = (self._key, image, path)
        if rk not in self._results:
            model.static_shapes = path == "static"
            tr = model.trace(FIXTURES / "images" / f"{image}.png")
            det = tr.detections[0]
            feats = {k: {"shape": list(v.shape[1:]), "flat": v[0].float().flatten().cpu(),
                         "mean": v[0].double().mean().item(), "std": v[0].double().std().item()}
                     for k, v in tr.features.items()}
            self._results[rk] = Outcome(
                resized=tuple(tr.batch.image_sizes[0]), padded=tuple(tr.batch.tensor.shape[-2:]),
                features=feats, proposals=tr.proposals[0].boxes.cpu(),
                logits=tr.proposals[0].objectness_logits.cpu(), boxes=det.boxes.cpu(), scores=det.scores.cpu(),
                labels=det.labels.cpu(), masks=None if det.masks is None else det.masks.cpu())
        return self._results[rk]


@pytest.fixture(scope="module")
def runner():
    return Runner()


def _decode_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_util

    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@pytest.mark.parametrize("name,image,path", [pytest.param(*c, marks=pytest.mark.xdist_group(_group(c[0])))
                                              for c in CASES], ids=[f"{n}-{i}-{p}" for n, i, p in CASES])
def test_parity(runner, name, image, path):
    _assert_parity(_fixture(name, image), runner.run(name, image, path))


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32's 10 mantissa bits (to nearest, ties to even), as tensor cores take them."""
    bits = t.detach().contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32).view(t.shape)


@pytest.mark.skipif(DEVICE != "cpu", reason="emulates TF32 on CPU; on CUDA the default precision runs the real one")
@pytest.mark.parametrize("name", ["faster_rcnn_R_50_DC5_1x", "mask_rcnn_R_50_FPN_3x"])
def test_parity_with_the_box_head_fcs_in_tf32(name):
    """precision="tf32", the CUDA default, runs the box head's fc layers on TF32 tensor cores: inputs and weights
    rounded to 10 mantissa bits, products accumulated in fp32. Emulated that way on CPU, it keeps the parity
    tolerances. DC5's fc1 sums the most products (100352 a row); FPN's has masks downstream."""
    runner = Runner()
    head = runner.model(name).roi_heads.box_head
    changed = []

    def round_input(_, args):
        x = _tf32(args[0])
        changed.append(not torch.equal(x, args[0]))
        return (x,)

    for fc in (getattr(head, n) for n in head.fc_names):
        with torch.no_grad():
            fc.weight.copy_(_tf32(fc.weight))
        fc.register_forward_pre_hook(round_input)
    _assert_parity(_fixture(name, IMAGES[0]), runner.run(name, IMAGES[0], DEFAULT_PATH))
    assert len(changed) == len(head.fc_names) and all(changed)  # the emulation ran and changed every input


def _assert_parity(ref: dict, out: Outcome) -> None:
    # input pipeline
    inp = ref["input"]
    assert out.resized == (inp["resized_height"], inp["resized_width"])
    assert list(out.padded) == inp["padded_shape"]

    # backbone features
    assert sorted(out.features) == sorted(ref["features"])
    for k, f in ref["features"].items():
        o = out.features[k]
        assert o["shape"] == f["shape"], k
        assert o["std"] == pytest.approx(f["std"], rel=FEATURE_RTOL), k
        assert abs(o["mean"] - f["mean"]) <= FEATURE_RTOL * max(abs(f["mean"]), f["std"]), k
        vals = o["flat"][f["samples"]["flat_index"]].double().numpy()
        want = np.asarray(f["samples"]["values"], dtype=np.float64)
        # relative, with a floor of 10% of the feature's std for samples near zero
        tol = FEATURE_RTOL * np.maximum(np.abs(want), 0.1 * f["std"])
        assert np.all(np.abs(vals - want) <= tol), (k, vals, want)

    # proposals: every one of Detectron2's top 50 is among ours
    rp = ref["proposals"]
    assert abs(len(out.proposals) - rp["count"]) <= 2
    ref_props = torch.tensor(rp["boxes"], dtype=torch.float64)
    ref_logits = torch.tensor(rp["objectness_logits"], dtype=torch.float64)
    dist = (ref_props[:, None, :] - out.proposals.double()[None, :, :]).abs().amax(dim=2)
    best = dist.min(dim=1)
    assert best.values.max().item() <= PROPOSAL_ATOL, best.values.max().item()
    assert (out.logits.double()[best.indices] - ref_logits).abs().max().item() <= 1e-3

    # instances
    ri = ref["instances"]
    ref_boxes = torch.tensor(ri["boxes"], dtype=torch.float64).reshape(-1, 4)
    ref_scores = torch.tensor(ri["scores"], dtype=torch.float64)
    ref_labels = torch.tensor(ri["classes"], dtype=torch.int64)
    assert abs(len(out.scores) - len(ref_scores)) <= 2
    match = greedy_match(ref_boxes, ref_scores, ref_labels, out.boxes, out.labels, MATCH_IOU)
    matched = [i for i, j in enumerate(match) if j >= 0]
    assert len(matched) >= MIN_MATCHED * len(ref_scores), (len(matched), len(ref_scores))
    top = torch.argsort(ref_scores, descending=True, stable=True)[:50].tolist()
    assert all(match[i] >= 0 for i in top), [i for i in top if match[i] < 0]
    if matched:
        mi = torch.tensor(matched)
        mj = torch.tensor([match[i] for i in matched])
        assert (out.boxes.double()[mj] - ref_boxes[mi]).abs().max().item() <= BOX_ATOL
        assert (out.scores.double()[mj] - ref_scores[mi]).abs().max().item() <= SCORE_ATOL
    if "masks_rle" in ri:
        assert out.masks is not None and out.masks.dtype == torch.bool
        assert tuple(out.masks.shape[1:]) == (inp["height"], inp["width"])
        ious = [mask_iou(_decode_rle(ri["masks_rle"][i]), out.masks[match[i]].numpy()) for i in matched]
        assert np.mean(ious) >= MIN_MASK_IOU, np.mean(ious)
    else:
        assert out.masks is None
