"""Backend selection of zoo.ops: argument > ZOO_OPS > device; triton stays optional."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zoo import ops
from zoo.errors import ZooError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv("ZOO_OPS", raising=False)
    assert ops.resolve_backend(None, torch.zeros(1)) == "torch"


def test_env_forces_backend_and_argument_wins(monkeypatch):
    monkeypatch.setenv("ZOO_OPS", "torch")
    assert ops.resolve_backend(None, torch.zeros(1)) == "torch"
    monkeypatch.setenv("ZOO_OPS", "bogus")
    with pytest.raises(ZooError, match="ZOO_OPS"):
        ops.resolve_backend(None, torch.zeros(1))
    assert ops.resolve_backend("torch", torch.zeros(1)) == "torch"


def test_unknown_backend_argument():
    with pytest.raises(ZooError, match="unknown ops backend"):
        ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    # import triton (if at all) before unsetting TRITON_INTERPRET: triton fixes its mode at import, and later
    # files of the same run interpret kernels
    if not ops.triton_available():
        pytest.skip(ops.triton_problem())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ZooError, match="TRITON_INTERPRET=1"):
        ops.roi_align(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1, 1.0, 0, True,
                      backend="triton")
    monkeypatch.setenv("ZOO_OPS", "triton")
    with pytest.raises(ZooError, match="TRITON_INTERPRET=1"):
        ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def test_torch_path_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from zoo import ops\n"
        "ops.roi_align(torch.zeros(1,1,4,4), torch.tensor([[0.,0,0,2,2]]), 2, 1.0, 0, True)\n"
        "ops.multilevel_roi_align([torch.zeros(1,1,4,4)]*2, torch.tensor([[0.,0,0,2,2]]),"
        " 2, [0.25, 0.125], 0)\n"
        "ops.batched_nms(torch.zeros(2,4), torch.zeros(2), torch.zeros(2, dtype=torch.long), 0.5)\n"
        "bad = [m for m in sys.modules if m.startswith(('triton', 'zoo.kernels', 'torchvision'))]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_OPS", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


OLD_TRITON_CODE = r'''
import warnings, torch
from zoo import ops
from zoo.errors import ZooError
assert not ops.triton_available()
print("problem:", ops.triton_problem())
try:
    ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5, backend="triton")
except ZooError as e:
    print("error:", e)
if torch.cuda.is_available():  # auto choice on the GPU: the torch ops, with one warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        boxes = torch.tensor([[0., 0, 2, 2], [0, 0, 2, 2.1]], device="cuda")
        for _ in range(3):
            keep = ops.nms(boxes, torch.tensor([1., 0.9], device="cuda"), 0.5)
    assert keep.tolist() == [0], keep
    print("warnings:", [str(w.message) for w in caught])
'''


@pytest.mark.parametrize("version", ["3.0.0", "2.1.0"])
def test_too_old_triton_is_refused_with_what_to_install(tmp_path, version):
    # a real package named triton, older than the kernels support, ahead of any installed one on the path
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_OPS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    res = subprocess.run([sys.executable, "-c", OLD_TRITON_CODE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    assert f"triton {version} is older than 3.3" in lines["problem"]
    assert "pip install 'triton>=3.3'" in lines["problem"]
    assert lines["error"].startswith("the triton backend cannot run: triton " + version)
    assert lines["error"].endswith("or use backend='torch'")
    if "warnings" in lines:  # CUDA only: three calls, one warning
        assert lines["warnings"].count("older than 3.3") == 1, lines["warnings"]


def test_triton_problem_is_none_with_a_supported_triton():
    triton = pytest.importorskip("triton")
    # the test extra asks for triton>=3.3, so the installed one must be accepted
    assert ops.triton_problem() is None, f"triton {triton.__version__}: {ops.triton_problem()}"
    assert ops.triton_available()
