"""The benchmark scripts, run here on CPU at their smallest: the GPU session (scripts/gpu_session.sh) is rare and
short, so a script that breaks must be caught before it. The timings themselves are not checked."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from user_support import ROOT, import_script

MODEL = "faster_rcnn_R_50_FPN_3x"  # the quickest baseline at full size


def run_script(*args: str, env: dict[str, str] | None = None, rc: int = 0) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("ZOO_OPS", "TRITON_INTERPRET"):
        full_env.pop(k, None)
    full_env.update(env or {})
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == rc, (res.stdout[-2000:], res.stderr[-4000:])
    return res


def table_row(text: str, *first_cells: str) -> list[str]:
    """The cells of the markdown row that starts with `first_cells`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no row {first_cells} in:\n{text}")


@pytest.mark.parametrize("script", ["gpu_session.sh", "fetch_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# phase -> the step timeouts it must add up to (the device call's timeout_s is planned from them)
GPU_PHASE_SECONDS = {"Q": 500, "R": 220, "A": 290, "B": 465}


def run_gpu_session(phase: str, out) -> subprocess.CompletedProcess:
    # PY=echo prints each step's command instead of running it
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), phase], cwd=out.parent,
                          capture_output=True, text=True, env=dict(os.environ, OUT=str(out), PY="echo"), timeout=60)


@pytest.mark.parametrize("phase", sorted(GPU_PHASE_SECONDS))
def test_gpu_session_phase_fits_the_device_call(phase, tmp_path):
    out = tmp_path / "out"
    res = run_gpu_session(phase, out)
    assert res.returncode == 0, res.stderr
    summary = (out / "summary.log").read_text()
    steps = re.findall(r"^=== \S+ \(timeout (\d+)s\)", summary, re.M)
    assert steps and sum(map(int, steps)) == GPU_PHASE_SECONDS[phase]
    assert summary.count(": rc=0 in ") == len(steps)
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # the device tool brings back at most 8 files
    # a variant that bench_e2e (or profile/memory_e2e, which share its parser) rejects would waste its step
    bench_e2e = import_script("bench_e2e")
    commands = [line for line in re.findall(r"^=== \S+ \(timeout \d+s\): (.*)$", summary, re.M)
                if re.search(r"(bench|profile|memory)_e2e\.py", line)]
    variants = [v for cmd in commands for arg in re.findall(r"--variants? (\S+)", cmd) for v in arg.split(",")]
    assert variants or phase == "A"  # A's headline step times bench_e2e's default variants
    for v in variants:
        bench_e2e.check_variant(v)


def test_gpu_session_unknown_phase(tmp_path):
    res = run_gpu_session("X", tmp_path / "out")
    assert res.returncode == 2 and "usage" in res.stderr


def test_bench_e2e_on_cpu(tmp_path):
    out = tmp_path / "e2e.md"
    # one run per column: the counts are set explicitly, and the table's ms/image run gives the detections
    run_script("scripts/bench_e2e.py", "--device", "cpu", "--quick", "--iters", "1", "--warmup", "0",
               "--batch-iters", "1", "--batch-warmup", "0", "--batch", "1", "--min-size", "400",
               "--models", MODEL, "--variants", "fp32,bf16,fp32+graphs,fp32+fused,tf32,bf16+torchepilogue", "--out", str(out))
    text = out.read_text()
    cells = table_row(text, MODEL, "zoo fp32")
    assert float(cells[2]) > 0 and float(cells[5]) > 0  # ms/image, images/s
    assert int(cells[-2]) == 100  # the synthetic weights give 100 detections on the bench image
    assert cells[-1] == "100%"  # fp32 is the reference the other variants are matched against
    assert 50 <= float(table_row(text, MODEL, "zoo bf16")[-1].rstrip("%")) <= 100
    assert "image 469x400;" in text  # grace_hopper (600x512) at --min-size 400, as the model would resize it
    assert f"{MODEL} fp32+graphs: skipped (needs CUDA)" in text
    assert table_row(text, MODEL, "zoo fp32+fused")[-1] == "100%"  # the switch leaves CPU results as they are
    # CPU runs PyTorch's epilogue either way: the same detections as bf16's
    assert table_row(text, MODEL, "zoo bf16+torchepilogue")[-1] == table_row(text, MODEL, "zoo bf16")[-1]
    assert f"{MODEL} tf32: skipped (needs CUDA)" in text


def test_bench_e2e_keeps_cudnn_benchmark_variants_to_a_run_of_their_own():
    # PyTorch caches the cuDNN algorithm first picked per shape whatever cudnn.benchmark says: mixed in one process,
    # the autotuned and the heuristic variants would time each other's picks
    res = run_script("scripts/bench_e2e.py", "--device", "cpu", "--variants", "tf32+graphs,tf32+graphs+cudnnbench",
                     rc=1)
    assert "of their own" in res.stderr and "|" not in res.stdout


def test_bench_stream_on_cpu():
    # short side 192 (quick's default is 320): a quarter less time, most of it emulated bf16 on AVX2-only hosts
    res = run_script("scripts/bench_stream.py", "--quick", "--device", "cpu", "--model", MODEL, "--min-size", "192",
                     "--shapes", "3")
    assert float(table_row(res.stdout, "loop", "fp32")[4]) == 1.0  # the loop is the baseline of "vs loop"
    for label, precision in (("stream b1", "fp32"), ("stream b2", "fp32"), ("stream b2", "bf16")):
        cells = table_row(res.stdout, label, precision)
        assert float(cells[2]) > 0 and float(cells[3]) > 0  # images/s, ms/image
        # each image's detections as the loop found them (bf16 rounds differently)
        assert (50 if precision == "bf16" else 100) <= float(cells[6].rstrip("%")) <= 100, cells
    assert "host prep (decode + resize, one thread):" in res.stdout and "short side 192;" in res.stdout
    assert "4 JPEGs (drawn from 3 sizes that pad to 3 input shapes)" in res.stdout
    assert "fp32 graphs" not in res.stdout  # no CUDA graphs on CPU


def test_profile_e2e_on_cpu():
    res = run_script("scripts/profile_e2e.py", "--device", "cpu", "--model", MODEL, "--iters", "1", "--rows", "5",
                     "--batch", "2", "--variant", "fp32+fused")
    assert "ms/image" in res.stdout and "Self CPU" in res.stdout and "fp32+fused, batch 2," in res.stdout


def test_cpu_bench_table():
    res = run_script("scripts/bench.py", "--models", MODEL, "--repeats", "1", "--warmup", "0")
    cells = table_row(res.stdout, MODEL)
    exact, fast, bf16, d2 = (float(c) for c in cells[1:5])
    assert exact > 0 and fast > 0 and bf16 > 0 and d2 == 1.69
    share_all, share_top = (float(c.rstrip("%")) for c in cells[-1].split(" / "))
    assert 0 <= share_all <= 100 and share_top >= 90  # bf16 keeps fp32's best detections


def test_large_image_bench_on_cpu():
    res = run_script("scripts/bench_large_images.py", "--size", "320x240", "--min-size", "128", "--repeats", "1",
                     "--batch", "2", "--load-models", MODEL)
    assert "network input short side 128" in res.stdout
    for row in ("predict one 320x240 photo", "predict_iter 2 photos at batch 2",
                "viz.draw of one photo's detections (score >= 0.05)", f"zoo.get {MODEL} from a local .pkl"):
        seconds, peak, above = (float(c) for c in table_row(res.stdout, row)[1:4])
        assert seconds > 0 and peak > 0 and above <= peak, row


def test_memory_script():
    memory_e2e = import_script("memory_e2e")
    zoo_line = {"filename": memory_e2e.ZOO_DIR + "modeling/layers.py", "line": 40, "name": "forward"}
    torch_line = {"filename": "/site-packages/torch/nn/modules/conv.py", "line": 7, "name": "_conv_forward"}
    snapshot = {"segments": [  # the shape of torch.cuda.memory._snapshot()
        {"segment_pool_id": (0, 0), "blocks": [{"size": 1 << 20, "state": "active_allocated", "frames": [torch_line]},
                                               {"size": 512, "state": "inactive", "frames": []}]},
        {"segment_pool_id": (1, 2), "blocks": [{"size": 3 << 20, "state": "active_allocated",
                                                "frames": [torch_line, zoo_line]}]}]}
    # free blocks are not counted; a block is put down to zoo's innermost line, else to the innermost one
    assert memory_e2e.live_blocks(snapshot) == [(1 << 20, "default", "conv.py:7 _conv_forward"),
                                                (3 << 20, "graph", "layers.py:40 forward")]
    if not torch.cuda.is_available():
        res = run_script("scripts/memory_e2e.py", "--calls", "1")
        assert "CUDA not available" in res.stdout


def test_bench_kernels_on_cpu():
    res = run_script("scripts/bench_kernels.py", "--only", "NMS n=1000", "--repeats", "1")
    cells = table_row(res.stdout, "NMS n=1000 (IoU 0.7)")
    assert cells[1] == "n/a" and float(cells[3]) > 0  # no CUDA: only the torch column is timed


def test_bench_kernels_sweep_under_the_interpreter():
    res = run_script("scripts/bench_kernels.py", "--sweep", "--tiny", "--only", "NMS n=", "--repeats", "1",
                     "--warmup", "1", env={"TRITON_INTERPRET": "1"})
    rows = [line for line in res.stdout.splitlines() if line.startswith("| NMS n=300")]
    assert len(rows) == 10 and "16x1 fixpoint (default)" in rows[0] and any("16x1 serial |" in r for r in rows)
    assert all(line.rstrip(" |").endswith("yes") for line in rows)  # every scan tile keeps the same boxes
    if not torch.cuda.is_available():
        res = run_script("scripts/bench_kernels.py", "--sweep", rc=2)
        assert "--sweep needs CUDA" in res.stdout
