"""zoo's torch ops against torchvision's own CPU results (tests/fixtures/torchvision_ops.pt, recorded by
scripts/record_torchvision_ops.py where torchvision loads: it does not with the CPU torch here).

The NMS cases are tie-heavy on purpose: torchvision's per-class batched_nms ends with torch's unstable sort,
so kept indices must come out in its order of ties, not in index order.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoo import ops
from zoo.modeling import rpn

GOLDEN = torch.load(Path(__file__).parent / "fixtures" / "torchvision_ops.pt", weights_only=True)
# The order of exact ties comes from torch's unstable sort, which another torch release may implement
# differently (zoo calls the same sort, so it would still agree with torchvision there): the order is
# compared under the recording's torch release (CI's); under another one, what no order of ties changes.
SAME_TORCH = torch.__version__.split("+")[0].split(".")[:2] == GOLDEN["torch"].split("+")[0].split(".")[:2]


def _assert_same_keep(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, cut: bool) -> None:
    """cut: the result is a first-k prefix, whose tied boxes at the cut depend on the order too."""
    if SAME_TORCH:
        assert torch.equal(got, want)
    elif cut:
        assert torch.equal(scores[got], scores[want])
    else:
        assert torch.equal(got.sort().values, want.sort().values) and torch.equal(scores[got], scores[want])


def _case_id(c: dict) -> str:
    return f"n{c['boxes'].shape[0]}-c{int(c['idxs'].max()) + 1}-thr{c['thr']:.3f}"


@pytest.mark.parametrize("case", GOLDEN["nms"], ids=_case_id)
def test_nms_and_batched_nms_equal_torchvision(case):
    b, s, i, thr = case["boxes"], case["scores"], case["idxs"], case["thr"]
    assert torch.equal(ops.nms(b, s, thr, backend="torch"), case["nms"])  # a stable order: any torch
    _assert_same_keep(ops.batched_nms(b, s, i, thr, backend="torch"), case["batched"], s, cut=False)


def test_the_cases_have_ties_a_stable_order_would_break():
    """Guards the recording: with a stable final sort some per-class results would differ."""
    differ = 0
    for c in GOLDEN["nms"]:
        k = c["batched"].sort().values
        stable = k[torch.sort(c["scores"][k], descending=True, stable=True).indices]
        differ += not torch.equal(stable, c["batched"])
    assert differ >= 5


def test_rpn_single_level_shortcut_orders_ties_like_torchvision():
    """C4/DC5 proposals: NMS over a prefix of the 6000 candidates must give torchvision's first 1000."""
    c = GOLDEN["rpn"]
    levels = torch.zeros(c["boxes"].shape[0], dtype=torch.int64)
    keep = rpn._nms_topk(c["boxes"], c["scores"], levels, c["thr"], c["k"], single_level=True)
    _assert_same_keep(keep, c["keep"], c["scores"], cut=True)


@pytest.mark.parametrize("case", GOLDEN["roi_align"], ids=lambda c: c["kind"])
def test_roi_align_equals_torchvision(case):
    worst = 0.0
    for key, want in case["outputs"].items():
        sr, aligned, size = key.split("_")
        out_size = tuple(int(v) for v in size.split("x"))
        got = ops.roi_align(case["x"], case["rois"], out_size, case["scale"], int(sr), bool(int(aligned)),
                            backend="torch")
        assert got.shape == want.shape
        worst = max(worst, float((got - want).abs().max()))
    # summation order differs (matmuls vs torchvision's per-sample loop): fp32 rounding only
    assert worst < 2e-6, f"{case['kind']}: max difference {worst:.2e}"
