#!/usr/bin/env python3
"""Differential check against Detectron2's own source: both run a baseline on any images, with the synthetic
weights of any seed, and a table says where they differ (sizes, top RPN proposals, detections, masks).

The recorded fixtures cover 3 images and one seed; this reaches the cases they do not (tiny, huge, flat,
grey or extreme-aspect images, other weights). Detectron2 is imported from --detectron2 (a source tree; its
C++ extension is not needed for these models), e.g. the sdist of `detectron2-cdo` (Detectron2 0.5):

    pip download --no-deps --no-build-isolation detectron2-cdo==0.5 && tar xzf detectron2_cdo-0.5.tar.gz
    python scripts/detectron2_oracle.py mask_rcnn_R_50_C4_3x img1.png img2.jpg --detectron2 detectron2_cdo-0.5 \
        --seeds 20261124 7

Needs Detectron2's pure-Python dependencies (fvcore, iopath, yacs, omegaconf, termcolor, tabulate, cloudpickle,
pycocotools). Where torchvision does not import (its wheel fails with the CPU torch of the build machines), its
roi_align and nms are stood in by zoo's PyTorch reference ops: the check then covers everything Detectron2 does
around those ops, not the ops themselves (tests/test_ops_* and the GPU tests cover those). The real torchvision
runs on CPU in a venv with PyPI's CUDA build of torch, e.g. `pip install torch==2.13.0 torchvision==0.28.0`
with the local wheel directory switched off (PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=). Detectron2 < 0.6 ranks
RPN candidates with sort, current Detectron2 with topk: exactly tied logits may then be kept in another order.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
MATCH_IOU = 0.98  # as tests/test_parity.py, with its matcher (tests/user_support.greedy_match)
MIN_MASK_IOU = 0.97


def _stand_in_torchvision() -> None:
    """A `torchvision` module whose ops are zoo's PyTorch reference implementations."""
    from zoo import ops

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.26.0"  # Detectron2 checks >= 0.7 for aligned ROIAlign
    tv_ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")

    def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        return ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned, backend="torch")

    def nms(b, s, thr):
        return ops.nms(b, s, thr, backend="torch")

    def batched_nms(b, s, idxs, thr):
        return ops.batched_nms(b, s, idxs, thr, backend="torch")

    def unavailable(*args, **kwargs):
        raise NotImplementedError("not part of the stand-in torchvision")

    tv_ops.roi_align, tv_ops.nms, tv_ops.boxes = roi_align, nms, boxes
    tv_ops.RoIPool = tv_ops.deform_conv2d = unavailable
    boxes.nms, boxes.batched_nms = nms, batched_nms
    boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    tv.ops = tv_ops
    sys.modules.update({"torchvision": tv, "torchvision.ops": tv_ops, "torchvision.ops.boxes": boxes})


def import_detectron2(src: Path) -> str:
    """Put Detectron2's source on the path; returns which torchvision ops it will call."""
    sys.path.insert(0, str(src))
    try:
        import torchvision

        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # the CPU machines' wheel fails here
        used = f"torchvision {torchvision.__version__}"
    except Exception:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        _stand_in_torchvision()
        used = "zoo's reference ops standing in for torchvision"
    sys.modules.setdefault("detectron2._C", types.ModuleType("detectron2._C"))  # rotated/deformable ops only
    from PIL import Image

    if not hasattr(Image, "LINEAR"):  # Detectron2 0.5 names a constant Pillow 10 removed
        Image.LINEAR = Image.BILINEAR
    return used


def detectron2_model(name: str, config: Path, state: dict):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.set_new_allowed(True)  # merged configs of later versions carry keys 0.5 does not know
    cfg.merge_from_file(str(config))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"pixel_mean", "pixel_std"}:
        raise SystemExit(f"{name}: state_dict mismatch (missing {missing}, unexpected {unexpected})")
    return model, cfg


def detectron2_inputs(cfg, paths: list[Path]) -> list[dict]:
    """Detectron2's model inputs for `paths`, made as for the fixtures: PIL RGB (flipped where INPUT.FORMAT is BGR),
    ResizeShortestEdge, CHW float32, with the original height and width."""
    from detectron2.data import transforms as T
    from PIL import Image

    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    inputs = []
    for path in paths:
        img = np.asarray(Image.open(path).convert("RGB"))
        if cfg.INPUT.FORMAT == "BGR":
            img = img[:, :, ::-1]
        resized = resize.get_transform(img).apply_image(img)
        inputs.append({"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32")),
                       "height": img.shape[0], "width": img.shape[1]})
    return inputs


def _run_detectron2(model, cfg, paths: list[Path]) -> list[dict]:
    """Detectron2's results for `paths` run as one batch (padded to a common size, as its inference does)."""
    from detectron2.modeling.postprocessing import detector_postprocess

    inputs = detectron2_inputs(cfg, paths)
    originals = [(d["height"], d["width"]) for d in inputs]
    with torch.no_grad():
        batch = model.preprocess_image(inputs)
        feats = model.backbone(batch.tensor)
        props, _ = model.proposal_generator(batch, feats, None)
        inst, _ = model.roi_heads(batch, feats, props, None)
    out = []
    for i, (h, w) in enumerate(originals):
        r = detector_postprocess(inst[i], h, w)
        out.append({"sizes": (*batch.image_sizes[i], tuple(batch.tensor.shape[-2:])),
                    "proposals": props[i].proposal_boxes.tensor.numpy(), "boxes": r.pred_boxes.tensor.numpy(),
                    "scores": r.scores.numpy(), "labels": r.pred_classes.numpy(),
                    "masks": r.pred_masks.numpy() if r.has("pred_masks") else None})
    return out


def _run_zoo(model, paths: list[Path]) -> list[dict]:
    """zoo's results for `paths` run as one batch (trace pads them together, like predict(exact=False))."""
    tr = model.trace(list(paths))
    return [{"sizes": (*tr.batch.image_sizes[i], tuple(tr.batch.tensor.shape[-2:])),
             "proposals": p.boxes.numpy(), "boxes": d.boxes.numpy(), "scores": d.scores.numpy(),
             "labels": d.labels.numpy(), "masks": None if d.masks is None else d.masks.numpy()}
            for i, (p, d) in enumerate(zip(tr.proposals, tr.detections))]


def compare(ref: dict, out: dict) -> dict:
    """What differs: proposal rows (bitwise), detections matched (same class, IoU >= 0.98), masks below 0.97."""
    row = {"sizes": ref["sizes"] == out["sizes"], "n": f"{len(ref['boxes'])}/{len(out['boxes'])}"}
    p, q = ref["proposals"], out["proposals"]
    row["proposals equal"] = f"{int((p == q).all(1).sum()) if p.shape == q.shape else 0}/{len(p)}"
    from user_support import greedy_match, mask_iou

    match = greedy_match(*(torch.from_numpy(np.asarray(ref[k])) for k in ("boxes", "scores", "labels")),
                         torch.from_numpy(np.asarray(out["boxes"])), torch.from_numpy(np.asarray(out["labels"])),
                         MATCH_IOU)
    pairs = [(i, j) for i, j in enumerate(match) if j >= 0]
    matched = len(pairs)
    worst = max((float(np.abs(ref["boxes"][i] - out["boxes"][j]).max()) for i, j in pairs), default=0.0)
    bad_masks = sum(mask_iou(ref["masks"][i], out["masks"][j]) < MIN_MASK_IOU
                    for i, j in (pairs if ref["masks"] is not None else ()))
    row.update({"matched": f"{matched}/{len(ref['boxes'])}", "max box diff": f"{worst:.1e}",
                "masks < 0.97": bad_masks})
    row["ok"] = (row["sizes"] and len(ref["boxes"]) == len(out["boxes"]) and matched >= 0.97 * len(ref["boxes"])
                 and not bad_masks)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="baseline, e.g. mask_rcnn_R_50_C4_3x")
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--detectron2", type=Path, required=True, help="Detectron2 source tree (holds detectron2/)")
    ap.add_argument("--configs", type=Path, default=ROOT.parent / "shared" / "reference" / "detectron2_configs",
                    help="folder of the baselines' merged Detectron2 configs (<name>.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[20261124])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--path", choices=("dynamic", "static"), default="dynamic", help="zoo's inference path")
    ap.add_argument("--fast-convs", action="store_true", help="zoo with fast (folded, channels_last) convolutions")
    ap.add_argument("--batched", action="store_true",
                    help="all images as one padded batch (Detectron2's batched inference; zoo's predict(exact=False))")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops_used = import_detectron2(a.detectron2)
    import zoo
    from user_support import baseline_state_dict
    from zoo.modeling import build_model, load_weights

    config = a.configs / f"{a.name}.yaml"
    if not config.is_file():
        raise SystemExit(f"no Detectron2 config {config}; pass --configs with the merged <name>.yaml files")
    cols = ["seed", "image", "ok", "sizes", "n", "proposals equal", "matched", "max box diff", "masks < 0.97"]
    print(f"{a.name}: Detectron2 from {a.detectron2} vs zoo ({a.path} path, "
          f"{'fast' if a.fast_convs else 'exact'} convs), {a.threads} threads"
          f"{', one batch' if a.batched else ''}; Detectron2 calls {ops_used}\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    failures = 0
    for seed in a.seeds:
        state = baseline_state_dict(a.name, seed)
        d2, cfg = detectron2_model(a.name, config, state)
        ours = build_model(zoo.get_manifest(a.name).architecture, random_init=False)
        load_weights(ours, state)
        ours.static_shapes, ours.fast_convs = a.path == "static", a.fast_convs or None
        for paths in [a.images] if a.batched else [[p] for p in a.images]:
            for path, ref, out in zip(paths, _run_detectron2(d2, cfg, paths), _run_zoo(ours, paths)):
                row = compare(ref, out)
                row.update(seed=seed, image=path.name)
                failures += not row["ok"]
                print("| " + " | ".join(str(row[c]) for c in cols) + " |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
