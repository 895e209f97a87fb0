"""`zoo bench` run as a real process: timing and memory beside the published V100 time."""
import re

from user_support import small_manifest, write_manifest_dir, zoo_cmd
from zoo.registry import get_manifest

BASE = "faster_rcnn_R_50_FPN_1x"


def test_bench_synthetic_prints_time_memory_and_published_time(tmp_path):
    m = small_manifest(BASE)
    env = {"ZOO_MANIFEST_PATH": str(write_manifest_dir(tmp_path / "manifests", m)), "ZOO_OFFLINE": "1",
           "ZOO_HOME": str(tmp_path / "cache")}  # --synthetic must not need the network or the cache
    r = zoo_cmd("bench", m["name"], "--synthetic", "--device", "auto", "--iters", "2", "--warmup", "1", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"^time\s+\d+\.\d+ s/im median of 2 .*after 1 warm-up$", out, re.M), out
    published = get_manifest(BASE).metrics.inference_time_s_per_im
    assert re.search(rf"^published\s+{published:.3f} s/im \(.*V100", out, re.M), out
    assert re.search(r"^peak mem\s+\d+ MiB", out, re.M), out
    assert "grace_hopper.jpg 512x600 resized to 320x375, batch 1" in out  # the bundled image, at the test size
    assert "synthetic" in out
    assert re.search(r"^path\s+dynamic$", out, re.M), out  # the CPU defaults
    assert re.search(r"^convs\s+exact \(Detectron2 ops\)$", out, re.M), out
    r = zoo_cmd("bench", m["name"], "--synthetic", "--iters", "1", "--warmup", "0", "--path", "static",
                "--convs", "fast", "--min-size", "256", env=env)
    assert r.returncode == 0 and re.search(r"^path\s+fixed-shape$", r.stdout, re.M), r.stdout + r.stderr
    assert "512x600 resized to 256x300, batch 1" in r.stdout  # --min-size replaces the manifest's 320
    assert re.search(r"^convs\s+fast \(FrozenBN folded, channels_last\)$", r.stdout, re.M), r.stdout


def test_bench_rejects_bad_options_before_loading(tmp_path):
    r = zoo_cmd("bench", BASE, "--synthetic", "--batch", "0")
    assert r.returncode == 1 and r.stderr.startswith("zoo: error: --batch"), r.stderr
    bad = tmp_path / "x.png"
    bad.write_text("no image")
    r = zoo_cmd("bench", BASE, "--synthetic", "--image", str(bad))
    assert r.returncode == 1 and r.stderr.startswith("zoo: error: cannot read"), r.stderr
    r = zoo_cmd("bench", "faster_rcnn_R_50_FPN", "--synthetic")
    assert r.returncode == 1 and "did you mean" in r.stderr
    r = zoo_cmd("bench", BASE, "--synthetic", "--min-size", "0")
    assert r.returncode == 1 and r.stderr.startswith("zoo: error: --min-size 0 is not allowed"), r.stderr
    r = zoo_cmd("bench", BASE, "--synthetic", "--device", "cpu", "--cuda-graphs")
    assert r.returncode == 1 and r.stderr.startswith("zoo: error: --cuda-graphs needs a CUDA device"), r.stderr
