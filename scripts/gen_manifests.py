#!/usr/bin/env python3
"""Regenerate manifests/*.json from Detectron2's MODEL_ZOO.md table and merged configs.

Maintainer tool (needs PyYAML and the reference files); the package itself never reads YAML.
    python scripts/gen_manifests.py --seed ../shared/seeds/MODEL_ZOO.md \
        --configs ../shared/reference/detectron2_configs --out manifests
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

ROW = re.compile(r"<!-- ROW: (\S+) -->(.*?)</tr>", re.S)
CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)
HREF = re.compile(r'href="([^"]+)"')


def parse_seed(text: str) -> dict[str, dict]:
    rows = {}
    for section in text.split("### ")[1:]:
        segm = section.startswith("COCO Instance Segmentation")
        for name, body in ROW.findall(section):
            cells = CELL.findall(body)
            links = HREF.findall(cells[-1])
            vals = [c.strip() for c in cells[1:-1]]
            row = {
                "lr_sched": vals[0],
                "train_time": float(vals[1]),
                "inference_time": float(vals[2]),
                "train_mem": float(vals[3]),
                "box_ap": float(vals[4]),
                "mask_ap": float(vals[5]) if segm else None,
                "model_id": int(vals[6] if segm else vals[5]),
                "checkpoint_url": links[0],
                "metrics_url": links[1],
            }
            rows[name] = row
    return rows


def pooler(cfg: dict) -> dict:
    return {
        "type": cfg["POOLER_TYPE"],
        "resolution": cfg["POOLER_RESOLUTION"],
        "sampling_ratio": cfg["POOLER_SAMPLING_RATIO"],
    }


def architecture(cfg: dict) -> dict:
    m, inp = cfg["MODEL"], cfg["INPUT"]
    r = m["RESNETS"]
    fpn = m["BACKBONE"]["NAME"] == "build_resnet_fpn_backbone"
    layout = "FPN" if fpn else ("DC5" if r["RES5_DILATION"] == 2 else "C4")
    bh, mh, rh, rpn, ag = m["ROI_BOX_HEAD"], m["ROI_MASK_HEAD"], m["ROI_HEADS"], m["RPN"], m["ANCHOR_GENERATOR"]
    return {
        "meta_architecture": m["META_ARCHITECTURE"],
        "layout": layout,
        "resnet": {
            "depth": r["DEPTH"],
            "num_groups": r["NUM_GROUPS"],
            "width_per_group": r["WIDTH_PER_GROUP"],
            "stem_out_channels": r["STEM_OUT_CHANNELS"],
            "res2_out_channels": r["RES2_OUT_CHANNELS"],
            "stride_in_1x1": r["STRIDE_IN_1X1"],
            "res5_dilation": r["RES5_DILATION"],
            "norm": r["NORM"],
            "out_features": r["OUT_FEATURES"],
        },
        "fpn": {
            "in_features": m["FPN"]["IN_FEATURES"],
            "out_channels": m["FPN"]["OUT_CHANNELS"],
            "norm": m["FPN"]["NORM"],
            "fuse_type": m["FPN"]["FUSE_TYPE"],
            "top_block": "max_pool",
        } if fpn else None,
        "rpn": {
            "in_features": rpn["IN_FEATURES"],
            "head_conv_dims": rpn["CONV_DIMS"],
            "anchor_generator": {
                "sizes": ag["SIZES"],
                "aspect_ratios": ag["ASPECT_RATIOS"],
                "offset": ag["OFFSET"],
            },
            "bbox_reg_weights": rpn["BBOX_REG_WEIGHTS"],
            "nms_thresh": rpn["NMS_THRESH"],
            "pre_nms_topk_test": rpn["PRE_NMS_TOPK_TEST"],
            "post_nms_topk_test": rpn["POST_NMS_TOPK_TEST"],
            "min_size": m["PROPOSAL_GENERATOR"]["MIN_SIZE"],
        },
        "roi_heads": {
            "name": rh["NAME"],
            "in_features": rh["IN_FEATURES"],
            "num_classes": rh["NUM_CLASSES"],
            "score_thresh_test": rh["SCORE_THRESH_TEST"],
            "nms_thresh_test": rh["NMS_THRESH_TEST"],
            "detections_per_image": cfg["TEST"]["DETECTIONS_PER_IMAGE"],
            "box_head": {
                "name": bh["NAME"],
                "num_conv": bh["NUM_CONV"],
                "conv_dim": bh["CONV_DIM"],
                "num_fc": bh["NUM_FC"],
                "fc_dim": bh["FC_DIM"],
                "norm": bh["NORM"],
                "pooler": pooler(bh),
                "bbox_reg_weights": bh["BBOX_REG_WEIGHTS"],
                "cls_agnostic_bbox_reg": bh["CLS_AGNOSTIC_BBOX_REG"],
            },
            "mask_head": {
                "name": mh["NAME"],
                "num_conv": mh["NUM_CONV"],
                "conv_dim": mh["CONV_DIM"],
                "norm": mh["NORM"],
                "pooler": pooler(mh),
                "cls_agnostic_mask": mh["CLS_AGNOSTIC_MASK"],
                "mask_threshold": 0.5,
            } if m["MASK_ON"] else None,
        },
        "input": {
            "format": inp["FORMAT"],
            "pixel_mean": m["PIXEL_MEAN"],
            "pixel_std": m["PIXEL_STD"],
            "min_size_test": inp["MIN_SIZE_TEST"],
            "max_size_test": inp["MAX_SIZE_TEST"],
            "resize_interpolation": "bilinear",
            # Detectron2 takes this from the backbone: FPN pads to 32, plain ResNets do not pad.
            "size_divisibility": 32 if fpn else 0,
        },
    }


def manifest(name: str, row: dict, cfg: dict) -> dict:
    url = row["checkpoint_url"]
    config = url.split("/detectron2/", 1)[1].split(f"/{name}/", 1)[0] + f"/{name}.yaml"
    s = cfg["SOLVER"]
    return {
        "schema_version": 1,
        "name": name,
        "task": "instance_segmentation" if row["mask_ap"] is not None else "detection",
        "dataset": "COCO 2017",
        "config": config,
        "lr_schedule": {
            "name": row["lr_sched"],
            "max_iter": s["MAX_ITER"],
            "steps": s["STEPS"],
            "base_lr": s["BASE_LR"],
            "ims_per_batch": s["IMS_PER_BATCH"],
        },
        "metrics": {
            "train_time_s_per_iter": row["train_time"],
            "inference_time_s_per_im": row["inference_time"],
            "train_memory_gb": row["train_mem"],
            "box_ap": row["box_ap"],
            "mask_ap": row["mask_ap"],
        },
        "model_id": row["model_id"],
        "checkpoint": {"url": url, "metrics_url": row["metrics_url"], "sha256": None, "size_bytes": None},
        "provenance": {
            "trained_on": "COCO train2017",
            "evaluated_on": "COCO val2017 (box/mask AP)",
            "speed_measured_on": "8x NVIDIA V100 servers; inference time at batch 1",
            "source": "Detectron2 MODEL_ZOO.md",
        },
        "architecture": architecture(cfg),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=Path, required=True)
    ap.add_argument("--configs", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("manifests"))
    a = ap.parse_args()
    rows = parse_seed(a.seed.read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    for name, row in rows.items():
        cfg = yaml.safe_load((a.configs / f"{name}.yaml").read_text())
        data = manifest(name, row, cfg)
        (a.out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {len(rows)} manifests to {a.out}")


if __name__ == "__main__":
    main()
