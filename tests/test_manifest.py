"""Manifests: every number equals the seed table; bad data fails with file and field named."""
import copy
import json
import os
import re
from pathlib import Path

import pytest

import zoo
from zoo import registry
from zoo.errors import ManifestError, UnknownModelError

SEED = Path(__file__).parent / "fixtures" / "MODEL_ZOO.md"
MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def seed_rows() -> dict[str, dict]:
    """Parse the Detectron2 table independently of scripts/gen_manifests.py."""
    text = SEED.read_text()
    rows = {}
    for section in text.split("### ")[1:]:
        segm = "Instance Segmentation" in section.splitlines()[0]
        for name, body in re.findall(r"<!-- ROW: (\S+) -->(.*?)</tr>", section, re.S):
            cells = re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)
            urls = re.findall(r'href="([^"]+)"', body)
            nums = cells[1:-1]
            rows[name] = {
                "lr_schedule": nums[0],
                "train_time_s_per_iter": float(nums[1]),
                "inference_time_s_per_im": float(nums[2]),
                "train_memory_gb": float(nums[3]),
                "box_ap": float(nums[4]),
                "mask_ap": float(nums[5]) if segm else None,
                "model_id": int(nums[6] if segm else nums[5]),
                "checkpoint_url": urls[0],
                "metrics_url": urls[1],
                "task": "instance_segmentation" if segm else "detection",
            }
    return rows


SEED_ROWS = seed_rows()


def test_seed_has_19_baselines():
    assert len(SEED_ROWS) == 19
    assert sum(r["task"] == "detection" for r in SEED_ROWS.values()) == 10


def test_registry_lists_exactly_the_seed_baselines():
    assert zoo.list_models() == sorted(SEED_ROWS)
    assert len(zoo.list_models(task="detection")) == 10
    assert len(zoo.list_models(task="instance_segmentation")) == 9
    assert zoo.list_models(pattern="*X_101*") == ["faster_rcnn_X_101_32x8d_FPN_3x"]


@pytest.mark.parametrize("name", sorted(SEED_ROWS))
def test_manifest_numbers_equal_seed_table(name):
    summary = zoo.get_manifest(name).summary()
    for key, value in SEED_ROWS[name].items():
        assert summary[key] == value, f"{name}.{key}"


@pytest.mark.parametrize("name", sorted(SEED_ROWS))
def test_architecture_matches_name(name):
    a = zoo.get_manifest(name).architecture
    assert a.layout in name
    assert a.resnet.depth == (50 if "_50_" in name else 101)
    assert a.mask_on == name.startswith("mask_rcnn")
    if "X_101" in name:
        assert (a.resnet.num_groups, a.resnet.width_per_group, a.resnet.stride_in_1x1) == (32, 8, False)
        assert a.input.pixel_std == (57.375, 57.12, 58.395)
    else:
        assert a.input.pixel_std == (1.0, 1.0, 1.0)
    # Detectron2's merged configs feed BGR to every baseline, X101 included.
    assert a.input.format == "BGR" and a.input.pixel_mean == (103.53, 116.28, 123.675)
    assert a.rpn.pre_nms_topk_test == (1000 if a.layout == "FPN" else 6000)
    assert a.input.size_divisibility == (32 if a.layout == "FPN" else 0)


def test_config_path_is_accepted_as_name():
    m = zoo.get_manifest("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert m.name == "mask_rcnn_R_50_FPN_3x"
    with pytest.raises(UnknownModelError):
        zoo.get_manifest("COCO-Detection/mask_rcnn_R_50_FPN_3x.yaml")  # wrong folder


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="did you mean mask_rcnn_R_50_FPN_3x"):
        zoo.get_manifest("mask_rcnn_R50_FPN_3x")
    # names are case-sensitive, but a name typed in the wrong case is suggested in the right one
    with pytest.raises(UnknownModelError, match=r"unknown model 'MASK_RCNN_R_50_FPN_3X'; did you mean "
                                                r"mask_rcnn_R_50_FPN_3x\b"):
        zoo.get_manifest("MASK_RCNN_R_50_FPN_3X")


def good_record() -> dict:
    return json.loads((MANIFESTS / "faster_rcnn_R_50_FPN_3x.json").read_text())


def renamed(rec: dict, name: str) -> dict:
    rec = copy.deepcopy(rec)
    old = rec["name"]
    rec["name"] = name
    rec["config"] = rec["config"].replace(old, name)
    for k in ("url", "metrics_url"):
        rec["checkpoint"][k] = rec["checkpoint"][k].replace(old, name)
    return rec


def _bad(rec, path, value):
    node = rec
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return rec


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("metrics", "box_ap"), 140.0, "metrics.box_ap"),
        (("metrics", "box_ap"), -1.0, "metrics.box_ap"),
        (("metrics", "inference_time_s_per_im"), -0.1, "metrics.inference_time_s_per_im"),
        (("metrics", "train_time_s_per_iter"), -2, "metrics.train_time_s_per_iter"),
        (("task",), "keypoints", "task"),
        (("checkpoint", "url"), "https://example.com/model_final_280758.pkl", "(record)"),
        (("checkpoint", "sha256"), "abc", "checkpoint.sha256"),
        (("architecture", "layout"), "DC5", "architecture"),
        (("surprise",), 1, "surprise"),
    ],
)
def test_bad_manifest_names_file_and_field(tmp_path, monkeypatch, path, value, field):
    rec = _bad(renamed(good_record(), "my_model"), path, value)
    f = tmp_path / "my_model.json"
    f.write_text(json.dumps(rec))
    monkeypatch.setenv("ZOO_MANIFEST_PATH", str(tmp_path))
    with pytest.raises(ManifestError) as err:
        zoo.list_models()
    msg = str(err.value)
    assert str(f) in msg and f"field '{field}'" in msg


def test_detection_with_mask_ap_is_rejected():
    rec = renamed(good_record(), "my_model")
    rec["metrics"]["mask_ap"] = 30.0
    with pytest.raises(ManifestError, match="mask_ap"):
        registry.parse_manifest(rec, "x.json")


def test_duplicate_name_is_rejected(tmp_path, monkeypatch):
    (tmp_path / "faster_rcnn_R_50_FPN_3x.json").write_text(json.dumps(good_record()))
    monkeypatch.setenv("ZOO_MANIFEST_PATH", str(tmp_path))
    with pytest.raises(ManifestError, match="duplicate name 'faster_rcnn_R_50_FPN_3x'"):
        zoo.list_models()


def test_a_folder_listed_twice_is_read_once(tmp_path, monkeypatch):
    (tmp_path / "my_model.json").write_text(json.dumps(renamed(good_record(), "my_model")))
    monkeypatch.setenv("ZOO_MANIFEST_PATH", os.pathsep.join([str(tmp_path), str(tmp_path) + "/"]))
    assert "my_model" in zoo.list_models()


def test_pattern_ignores_case():
    assert zoo.list_models(pattern="*fpn*") == zoo.list_models(pattern="*FPN*") != []


def test_unreadable_manifest_and_missing_dir(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setenv("ZOO_MANIFEST_PATH", str(tmp_path))
    with pytest.raises(ManifestError, match="broken.json"):
        zoo.list_models()
    monkeypatch.setenv("ZOO_MANIFEST_PATH", str(tmp_path / "nope"))
    with pytest.raises(ManifestError, match="does not exist"):
        zoo.list_models()


def test_user_manifest_directory_and_register(tmp_path, monkeypatch):
    (tmp_path / "my_model.json").write_text(json.dumps(renamed(good_record(), "my_model")))
    monkeypatch.setenv("ZOO_MANIFEST_PATH", str(tmp_path))
    assert "my_model" in zoo.list_models(task="detection")
    monkeypatch.delenv("ZOO_MANIFEST_PATH")
    assert "my_model" not in zoo.list_models()

    m = zoo.register(renamed(good_record(), "other_model"))
    try:
        assert zoo.get_manifest("other_model") is m
        with pytest.raises(ManifestError, match="already registered"):
            zoo.register(renamed(good_record(), "other_model"))
        with pytest.raises(ManifestError, match="<register>: field 'metrics.box_ap'"):
            zoo.register(_bad(renamed(good_record(), "third"), ("metrics", "box_ap"), 101), overwrite=True)
    finally:
        registry.unregister("other_model")


def test_manifests_are_frozen():
    m = zoo.get_manifest("mask_rcnn_R_50_FPN_3x")
    with pytest.raises(Exception):
        m.name = "x"
    assert m.checkpoint.md5_prefix == "f10217"
    assert m.checkpoint.sha256 is None  # never invented


@pytest.mark.parametrize("bad", [None, 123, ["mask_rcnn_R_50_FPN_3x"]])
def test_a_name_that_is_not_a_string_is_a_zoo_error(bad):
    with pytest.raises(UnknownModelError, match="a model name is a string"):
        zoo.get(bad)
