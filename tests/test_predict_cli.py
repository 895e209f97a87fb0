"""`zoo predict` run as a real process: pictures, COCO results, and the errors a user meets."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from user_support import (IMAGES, baseline_state_dict, mirror_with, small_manifest, synth_checkpoint,
                          tiny_coco_dataset, write_manifest_dir, zoo_cmd)
from zoo.results import COCO_CATEGORY_IDS

BASE = "mask_rcnn_R_50_FPN_1x"


def assert_one_line_error(r, *needles):
    """Exit status 1 and exactly one `zoo: error:` line on stderr that mentions every needle."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_env(tmp_path_factory):
    """A small-input Mask R-CNN whose synthetic checkpoint is served from a ZOO_MIRROR folder."""
    root = tmp_path_factory.mktemp("predict_env")
    ckpt = synth_checkpoint(tmp_path_factory, BASE)
    m = small_manifest(BASE, ckpt)
    env = {
        "ZOO_MANIFEST_PATH": str(write_manifest_dir(root / "manifests", m)),
        "ZOO_MIRROR": str(mirror_with(root / "mirror", m, ckpt)),
        "ZOO_HOME": str(root / "cache"),
    }
    return m["name"], env


def test_predict_folder_writes_pictures_and_coco_results(tmp_path, small_env):
    name, env = small_env
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(IMAGES / "wide_300x1400.png", folder / "wide.png")
    Image.open(IMAGES / "grace_hopper.png").convert("RGB").save(folder / "hopper.JPG", quality=95)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()  # an earlier run's folder: its picture of the same name is replaced, other files are left
    (out / "hopper.png").write_bytes(b"stale")
    (out / "old.png").write_bytes(b"an earlier run's picture")
    # ZOO_QUIET unset: the progress bar must still stay quiet because stderr is not a terminal.
    r = zoo_cmd("predict", name, str(folder), "--out", str(out), "--score-thresh", "0.3", "--device", "auto",
                env={**env, "ZOO_QUIET": ""})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == ["hopper.png", "old.png", "results.json", "wide.png"]
    assert (out / "old.png").read_bytes() == b"an earlier run's picture"
    for src, pic in ((folder / "hopper.JPG", "hopper.png"), (folder / "wide.png", "wide.png")):
        a = np.asarray(Image.open(src).convert("RGB")).astype(int)
        b = np.asarray(Image.open(out / pic).convert("RGB")).astype(int)
        assert a.shape == b.shape and (np.abs(a - b).sum(axis=2) > 0).any()
    results = json.loads((out / "results.json").read_text())
    assert results, r.stdout
    from pycocotools import mask as mask_util
    sizes = {1: (600, 512), 2: (300, 1400)}  # ids follow the sorted folder listing
    assert {x["image_id"] for x in results} <= set(sizes)
    for x in results:
        assert x["category_id"] in COCO_CATEGORY_IDS and x["score"] >= 0.3
        bx, by, bw, bh = x["bbox"]
        assert bw > 0 and bh > 0
        rle = x["segmentation"]
        assert tuple(rle["size"]) == sizes[x["image_id"]]
        assert mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).any()
    assert "wrote 2 pictures and results.json" in r.stdout


def test_predict_batch_changes_no_result(tmp_path, small_env):
    name, env = small_env
    images = [str(IMAGES / f) for f in ("grace_hopper.png", "scene_427x640.png", "grace_hopper.png")]
    results = {}
    for batch in ("1", "2"):
        out = tmp_path / batch
        r = zoo_cmd("predict", name, *images, "--out", str(out), "--score-thresh", "0.3", "--device", "cpu",
                    "--batch", batch, env=env)
        assert r.returncode == 0, r.stderr
        results[batch] = json.loads((out / "results.json").read_text())
        assert sorted(p.name for p in out.iterdir()) == ["grace_hopper.png", "grace_hopper_1.png", "results.json",
                                                        "scene_427x640.png"]
    # the same detections; a batched convolution may round differently in the last bits
    one, two = results["1"], results["2"]
    assert one and [(x["image_id"], x["category_id"]) for x in one] == [(x["image_id"], x["category_id"]) for x in two]
    np.testing.assert_allclose([x["bbox"] for x in one], [x["bbox"] for x in two], rtol=0, atol=1e-3)
    np.testing.assert_allclose([x["score"] for x in one], [x["score"] for x in two], rtol=0, atol=1e-5)
    assert {1, 3} <= {x["image_id"] for x in two} <= {1, 2, 3}
    # the same file name twice: path and picture say which input and which drawing each record belongs to
    pictures = {1: "grace_hopper.png", 2: "scene_427x640.png", 3: "grace_hopper_1.png"}
    assert all(x["picture"] == pictures[x["image_id"]] and x["path"] == images[x["image_id"] - 1]
               and x["file_name"] == Path(images[x["image_id"] - 1]).name for x in two)
    r = zoo_cmd("predict", name, *images, "--out", str(tmp_path / "0"), "--batch", "0", env=env)
    assert_one_line_error(r, "--batch must be at least 1")
    assert not (tmp_path / "0").exists()


def test_predict_min_size_changes_the_input_size(tmp_path, small_env):
    name, env = small_env
    image = str(IMAGES / "grace_hopper.png")  # 512 wide, 600 high
    r = zoo_cmd("predict", name, image, "--out", str(tmp_path / "a"), "--score-thresh", "0.2", "--device", "cpu",
                env=env)
    assert r.returncode == 0, r.stderr
    r = zoo_cmd("predict", name, image, "--out", str(tmp_path / "b"), "--score-thresh", "0.2", "--device", "cpu",
                "--min-size", "256", "--max-size", "400", env=env)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a and b and [x["bbox"] for x in a] != [x["bbox"] for x in b]  # another input size, other detections
    for x in b:  # still in the original image's pixels
        bx, by, bw, bh = x["bbox"]
        assert 0 <= bx and bx + bw <= 512 + 1e-3 and 0 <= by and by + bh <= 600 + 1e-3
        assert x["segmentation"]["size"] == [600, 512]
    r = zoo_cmd("predict", name, image, "--out", str(tmp_path / "c"), "--min-size", "-5", env=env)
    assert_one_line_error(r, "--min-size -5 is not allowed", "leave --min-size out for the manifest's ")
    assert not (tmp_path / "c").exists()


def test_an_image_that_fails_to_decode_is_skipped_and_the_rest_are_done(tmp_path, small_env):
    """A truncated file passes the header check made before the model loads and fails when decoded: it is named in
    one warning, the other images get their pictures and results.json, and the run ends with one error (exit 1)."""
    name, env = small_env
    whole = (IMAGES / "grace_hopper.png").read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b_truncated.png").write_bytes(whole[: len(whole) // 2])
    shutil.copy(IMAGES / "grace_hopper.png", folder / "a.png")
    shutil.copy(IMAGES / "scene_427x640.png", folder / "c.png")
    out = tmp_path / "out"
    r = zoo_cmd("predict", name, str(folder), "--out", str(out), "--device", "cpu", env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"zoo: warning: skipped {folder / 'b_truncated.png'}: cannot read")
    assert err[1] == ("zoo: error: 1 of 3 images could not be read (each named above) and were skipped; fix or "
                      "remove them and run again for those")
    assert "wrote 2 pictures and results.json" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "results.json"]
    assert {x["image_id"] for x in json.loads((out / "results.json").read_text())} <= {1, 3}
    # every image unreadable: no results file, no folder left, one error after the warnings
    (folder / "a.png").write_bytes(whole[: len(whole) // 2])
    (folder / "c.png").unlink()
    r = zoo_cmd("predict", name, str(folder), "--out", str(tmp_path / "none"), "--device", "cpu", env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "zoo: error: none of the 2 images could be read (each named above); check that they are whole image files")
    assert not (tmp_path / "none").exists()
    # one image: its own error is the run's, on one line
    r = zoo_cmd("predict", name, str(folder / "a.png"), "--out", str(tmp_path / "one"), "--device", "cpu", env=env)
    assert_one_line_error(r, "cannot read", "a.png")
    assert not (tmp_path / "one").exists()


def test_unknown_model_suggests_close_names(tmp_path):
    r = zoo_cmd("predict", "mask_rcnn_R50_FPN_3x", str(IMAGES / "grace_hopper.png"), "--out", str(tmp_path))
    assert_one_line_error(r, "unknown model", "did you mean", "mask_rcnn_R_50_FPN_3x")


def test_unreadable_image(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"this is not a jpeg")
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(bad), "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "cannot read", "photo.jpg")
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(tmp_path / "nope.png"))
    assert_one_line_error(r, "does not exist")


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "taken").write_text("a file")
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(IMAGES / "grace_hopper.png"), "--out", str(tmp_path / "taken"))
    assert_one_line_error(r, "--out", "is a file")


def test_out_that_cannot_be_created_fails_before_the_model_loads(tmp_path):
    (tmp_path / "file").write_text("a file")
    # offline with an empty cache: had the model been loaded first, the error would be about the weights
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(IMAGES / "grace_hopper.png"),
                "--out", str(tmp_path / "file" / "sub"),
                env={"ZOO_OFFLINE": "1", "ZOO_HOME": str(tmp_path / "empty_cache")})
    assert_one_line_error(r, "--out", "writable")


def test_eval_out_that_cannot_be_created_fails_before_evaluating(tmp_path):
    (tmp_path / "file").write_text("a file")
    r = zoo_cmd("eval", "faster_rcnn_R_50_FPN_1x", "--annotations", str(tiny_coco_dataset(tmp_path)),
                "--images", str(tmp_path), "--out", str(tmp_path / "file" / "results.json"),
                env={"ZOO_OFFLINE": "1", "ZOO_HOME": str(tmp_path / "cache")})
    # before the model: offline with nothing cached, loading it would be the error
    assert_one_line_error(r, "--out", "writable")


def test_bad_download_settings_are_one_line_errors(tmp_path):
    for env, needle in [({"ZOO_OFFLINE": "maybe"}, "ZOO_OFFLINE"), ({"ZOO_TIMEOUT": "-5"}, "ZOO_TIMEOUT"),
                        ({"ZOO_RETRIES": "1.5"}, "ZOO_RETRIES")]:
        env = dict(env, ZOO_HOME=str(tmp_path / "cache"), ZOO_MIRROR="http://127.0.0.1:9/")  # port 9: nobody
        r = zoo_cmd("download", "faster_rcnn_R_50_FPN_1x", env=env)
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_zoo_home_that_is_a_file(tmp_path):
    (tmp_path / "home").write_text("a file")
    r = zoo_cmd("download", "faster_rcnn_R_50_FPN_1x", env={"ZOO_HOME": str(tmp_path / "home"),
                                                            "ZOO_MIRROR": str(tmp_path / "mirror")})
    assert r.returncode == 1 and "ZOO_HOME" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_offline_with_nothing_cached_says_how_to_fix(tmp_path):
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(IMAGES / "grace_hopper.png"), "--out", str(tmp_path),
                env={"ZOO_OFFLINE": "1", "ZOO_HOME": str(tmp_path / "empty_cache")})
    assert_one_line_error(r, "ZOO_OFFLINE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_asked_for_but_absent(tmp_path):
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(IMAGES / "grace_hopper.png"), "--device", "cuda",
                cwd=tmp_path)
    assert_one_line_error(r, "CUDA is not available")
    assert not (tmp_path / "predictions").exists()  # the default --out folder it made is gone again


def test_predict_in_bf16(tmp_path, small_env):
    name, env = small_env
    out = tmp_path / "out"
    r = zoo_cmd("predict", name, str(IMAGES / "grace_hopper.png"), "--out", str(out), "--score-thresh", "0.3",
                "--device", "cpu", "--precision", "bf16", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "results.json").read_text()), r.stdout


def test_score_thresh_below_the_models_own_lowers_it(tmp_path, small_env):
    # weights whose box classifier favours background: the best scores fall to about 0.07, most below the
    # model's own threshold (0.05), so without lowering it --score-thresh 0.02 would find (almost) nothing
    name, env = small_env
    state = dict(baseline_state_dict(BASE))
    key = "roi_heads.box_predictor.cls_score.bias"
    state[key] = state[key].copy()
    state[key][-1] += 5.0
    ckpt = tmp_path / "dim.pkl"
    with open(ckpt, "wb") as f:
        pickle.dump({"model": state}, f, protocol=4)
    scores = {}
    for t in ("0.05", "0.02"):
        r = zoo_cmd("predict", name, str(IMAGES / "grace_hopper.png"), "--out", str(tmp_path / t), "--score-thresh",
                    t, "--device", "cpu", "--weights", str(ckpt), env=env)
        assert r.returncode == 0, r.stderr
        scores[t] = sorted((x["score"] for x in json.loads((tmp_path / t / "results.json").read_text())),
                           reverse=True)
    assert all(s >= 0.05 for s in scores["0.05"]) and all(s >= 0.02 for s in scores["0.02"])
    assert sum(s < 0.05 for s in scores["0.02"]) >= 10
    # above the default threshold, lowering it changes nothing
    assert [s for s in scores["0.02"] if s >= 0.05] == scores["0.05"]


def test_cli_precision_choices_are_the_models():
    from zoo.commands_user import PRECISION_CHOICES
    from zoo.modeling.detector import PRECISIONS

    assert PRECISION_CHOICES == tuple(PRECISIONS)


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_cuda_only_precision_on_cpu_is_refused_before_anything(tmp_path, small_env, precision):
    name, env = small_env
    r = zoo_cmd("predict", name, str(IMAGES / "grace_hopper.png"), "--device", "cpu", "--precision", precision,
                env=env, cwd=tmp_path)
    assert_one_line_error(r, precision, "bf16")
    assert not (tmp_path / "predictions").exists()


def test_corrupt_checkpoint_file(tmp_path):
    bad = tmp_path / "model_final.pkl"
    bad.write_bytes(b"\x80\x04garbage that is not a pickle")
    r = zoo_cmd("predict", "faster_rcnn_R_50_FPN_1x", str(IMAGES / "grace_hopper.png"), "--weights", str(bad),
                "--out", str(tmp_path / "out"))
    assert_one_line_error(r, "model_final.pkl")


def test_corrupt_download_from_mirror(tmp_path):
    m = small_manifest("faster_rcnn_R_50_FPN_1x")  # its URL names MD5 prefix 000000
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"truncated download" * 100)
    env = {"ZOO_MANIFEST_PATH": str(write_manifest_dir(tmp_path / "manifests", m)),
           "ZOO_MIRROR": str(mirror_with(tmp_path / "mirror", m, junk)), "ZOO_HOME": str(tmp_path / "cache")}
    r = zoo_cmd("predict", m["name"], str(IMAGES / "grace_hopper.png"), "--out", str(tmp_path / "out"), env=env)
    assert_one_line_error(r)
    assert "md5" in r.stderr.lower() or "corrupt" in r.stderr.lower()
