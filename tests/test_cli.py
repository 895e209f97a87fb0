"""The `zoo` command, run as a real process."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from user_support import import_script, tiny_coco_dataset, zoo_cmd

ROOT = Path(__file__).resolve().parent.parent


def test_list_json_has_every_baseline_and_documented_keys():
    r = zoo_cmd("list", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 19
    keys = {"name", "task", "config", "lr_schedule", "train_time_s_per_iter", "inference_time_s_per_im",
            "train_memory_gb", "box_ap", "mask_ap", "model_id", "checkpoint_url", "metrics_url", "sha256"}
    for row in rows:
        assert keys <= set(row)
        assert (row["mask_ap"] is None) == (row["task"] == "detection")
        assert row["sha256"] is None
    by_name = {r["name"]: r for r in rows}
    assert by_name["mask_rcnn_R_50_FPN_3x"]["box_ap"] == 41.0
    assert by_name["mask_rcnn_R_50_FPN_3x"]["mask_ap"] == 37.2


def test_list_task_filter_and_sort():
    r = zoo_cmd("list", "--task", "detection", "--sort", "box_ap", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 10 and all(x["task"] == "detection" for x in rows)
    aps = [float(x["box_ap"]) for x in rows]
    assert aps == sorted(aps) and aps[-1] == 43.0
    r = zoo_cmd("list", "--sort", "mask_ap", "--reverse", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    maps = [float(x["mask_ap"]) for x in rows if x["mask_ap"]]
    assert maps == sorted(maps, reverse=True) and len(maps) == 9
    assert all(not x["mask_ap"] for x in rows[9:])  # detectors (no mask AP) last either way


def test_list_table_is_readable():
    r = zoo_cmd("list", "--task", "instance_segmentation")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "lr", "sched"]
    assert len(lines) == 2 + 9
    assert max(len(x) for x in lines) < 120
    assert any(x.startswith("mask_rcnn_R_50_FPN_3x") and "37.2" in x and "137849600" in x for x in lines)


def test_show():
    r = zoo_cmd("show", "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml")
    assert r.returncode == 0, r.stderr
    assert "ResNeXt-101 32x8d-FPN" in r.stdout and "139173657" in r.stdout and "43.0" in r.stdout
    # the zoo.get keywords that change them, with Detectron2's values
    assert ("test settings    score_thresh=0.05, nms_thresh=0.5, detections_per_image=100, min_size=800, "
            "max_size=1333") in r.stdout
    j = json.loads(zoo_cmd("show", "mask_rcnn_R_50_C4_1x", "--format", "json").stdout)
    assert j["architecture"]["roi_heads"]["name"] == "Res5ROIHeads"


def test_unknown_model_is_one_line_error():
    r = zoo_cmd("show", "mask_rcnn_R_50_FPN_3")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0
    assert "did you mean mask_rcnn_R_50_FPN_3x" in r.stderr and "Traceback" not in r.stderr


def test_bad_manifest_path_is_one_line_error(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    r = zoo_cmd("list", env={"ZOO_MANIFEST_PATH": str(tmp_path)})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(tmp_path / "x.json") in r.stderr


def test_readme_table_is_generated_from_manifests():
    gen_readme_table = import_script("gen_readme_table")
    readme = (ROOT / "README.md").read_text()
    assert gen_readme_table.table() in readme, "run python scripts/gen_readme_table.py"


@pytest.mark.timeout(600)
def test_wheel_ships_manifests(tmp_path):
    """Build the wheel, install it into a throwaway venv, run `zoo list` from elsewhere."""
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel = next(dist.glob("detzoo-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Install just the wheel; its dependencies come from the test environment's site-packages.
    # --ignore-installed: with --prefix alone pip first uninstalls detzoo from the running environment (the
    # developer's editable install)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--prefix",
                        str(venv), "-q", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import pydantic

    deps = str(Path(pydantic.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZOO_MANIFEST_PATH")}
    env["PYTHONPATH"] = deps
    out = tmp_path / "run"
    out.mkdir()
    script = venv / "bin" / "zoo"
    r = subprocess.run([str(py), str(script), "list", "--format", "json"], capture_output=True, text=True, env=env, cwd=out)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 19
    where = subprocess.run([str(py), "-c", "import zoo, zoo.registry as r; print(zoo.__file__); print(r._builtin_dir())"],
                           capture_output=True, text=True, env=env, cwd=out).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].endswith("_manifests"), where


def test_bench_amp_and_precision_are_alternatives():
    r = zoo_cmd("bench", "faster_rcnn_R_50_FPN_1x", "--synthetic", "--amp", "--precision", "fp32")
    assert r.returncode == 2 and "not allowed with" in r.stderr, r.stderr


def test_version_and_all_with_names():
    r = zoo_cmd("--version")
    assert r.returncode == 0 and r.stdout.startswith("zoo (detzoo) ")
    r = zoo_cmd("download", "--all", "faster_rcnn_R_50_FPN_1x")
    assert r.returncode == 1 and "not both" in r.stderr, r.stderr


def test_zoo_warnings_are_one_line_others_keep_their_form(tmp_path):
    """zoo's own warnings (here: bf16 on a CPU without bf16 units, forced so on any host) print as one
    `zoo: warning:` line like the errors, not as Python's file:line + source; other libraries' are left alone."""
    code = ("import sys, warnings; import zoo.modeling.detector as d; import zoo.commands_user as c; "
            "d.cpu_lacks_bf16_units = lambda: True; check = c.check_precision_for; "
            "c.check_precision_for = lambda a: (warnings.warn_explicit('other library', UserWarning, "
            "'/elsewhere/lib.py', 7), check(a)); "
            "from zoo.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ann = tiny_coco_dataset(tmp_path)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "results.json"  # an --out that cannot be made: the error after the warning
    r = subprocess.run([sys.executable, "-c", code, "eval", "faster_rcnn_R_50_FPN_1x", "--annotations", str(ann),
                        "--images", str(tmp_path), "--device", "cpu", "--precision", "bf16", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[0] == "/elsewhere/lib.py:7: UserWarning: other library", r.stderr
    assert lines[1:-1] == ["zoo: warning: this CPU has no bf16 units (AVX512-BF16 or AMX), so bf16 runs about 6x "
                           "slower than fp32 on it; choose fp32 here"], r.stderr
    assert lines[-1].startswith(f"zoo: error: cannot create the folder {out.parent} for --out: "), r.stderr


@pytest.mark.parametrize("args, message", [
    (["bench", "faster_rcnn_R_50_FPN_1x", "--synthetic", "--batch", "0"], "--batch and --iters must be at least 1"),
    (["bench", "faster_rcnn_R_50_FPN_1x", "--synthetic", "--min-size", "0"], "--min-size 0 is not allowed"),
    (["bench", "faster_rcnn_R_50_FPN_1x", "--synthetic", "--image", "README.md"], "cannot read 'README.md'"),
    (["predict", "faster_rcnn_R_50_FPN_1x", "no-such.jpg"], "image 'no-such.jpg' does not exist"),
    (["predict", "faster_rcnn_R_50_FPN_1x", "README.md", "--batch", "0"], "--batch must be at least 1"),
    (["eval", "faster_rcnn_R_50_FPN_1x", "--annotations", "no-such.json", "--images", "."],
     "annotation file 'no-such.json' does not exist"),
    (["eval", "faster_rcnn_R_50_FPN_1x", "--annotations", "README.md", "--images", ".", "--out", "tests"],
     "--out 'tests' is a folder"),
])
def test_option_errors_come_before_torch_loads(args, message):
    # importing torch takes 3-4 s on these machines: a mistyped option is reported without it
    code = "import sys; sys.modules['torch'] = None; from zoo.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith(f"zoo: error: {message}"), r.stderr
