"""What the installed Triton interpreter (TRITON_INTERPRET=1) can do, for the tests that run the kernels on CPU.

Measured 2026-11-27: triton 3.3-3.6's interpreter stops with numpy >= 2.4 (it converts one-element arrays
with int()); 3.7 and later run. Before 3.9 it evaluates tl.fma as a product and a sum, rounding twice,
where compiled code and later interpreters round once.
"""
from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def _probe_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def loop_count(out_ptr, n):
        acc = tl.zeros([], dtype=tl.int32)
        for _ in range(0, n):  # a loop bound taken from a scalar argument
            acc += 1
        tl.store(out_ptr, acc)

    @triton.jit
    def fma(a_ptr, b_ptr, c_ptr, out_ptr):
        tl.store(out_ptr, tl.fma(tl.load(a_ptr), tl.load(b_ptr), tl.load(c_ptr)))

    return loop_count, fma


def require_working_interpreter() -> None:
    """Fail with one line that says what to install if this triton's interpreter cannot run our kernels."""
    import numpy
    import triton

    from zoo import ops

    if ops.triton_problem():
        pytest.fail(ops.triton_problem(), pytrace=False)

    loop_count, _ = _probe_kernels()
    out = torch.zeros(1, dtype=torch.int32)
    try:
        loop_count[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure here means the kernels cannot run either
        pytest.fail(f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                    f"({type(e).__name__}); install numpy<2.4 or triton>=3.7", pytrace=False)
    assert int(out) == 3


def interpreter_fma_rounds_once() -> bool:
    """Whether tl.fma in this interpreter rounds once, as it does in compiled code."""
    _, fma = _probe_kernels()
    a = torch.tensor([1 + 2.0 ** -12])
    c = torch.tensor([-(1 + 2.0 ** -11)])
    out = torch.zeros(1)
    fma[(1,)](a, a, c, out)
    return float(out) == 2.0 ** -24  # a*a = 1 + 2^-11 + 2^-24 exactly; rounded first, the sum is 0
