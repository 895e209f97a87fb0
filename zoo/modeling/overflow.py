"""fp16's overflow guard.

fp16 holds values up to 65504. An activation above that becomes inf, and what the heads compute from it inf or
NaN, which the score threshold and NMS then drop without a word. Under a guarded precision the heads note each
output they hand on (the RPN's selected logits and deltas, the box predictor's, the mask logits); a batch where
one holds a non-finite value is recomputed at the device's default precision (GeneralizedRCNN.run), and the
fixed-shape path marks its images incomplete, which sends them there too. A few small reductions per forward,
no host synchronisation on the fixed-shape path.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

# bf16 has float32's range: what overflows bf16 overflows the float32 recompute too
GUARDED_PRECISIONS = frozenset({"fp16"})

_NOTES: ContextVar[Optional[list[torch.Tensor]]] = ContextVar("zoo_overflow_notes", default=None)


@contextlib.contextmanager
def overflow_guard(enabled: bool) -> Iterator[Optional[list[torch.Tensor]]]:
    """Collect the notes taken inside the block (a list, or None when not enabled)."""
    notes: Optional[list[torch.Tensor]] = [] if enabled else None
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(*tensors: torch.Tensor) -> None:
    """Record whether these outputs are finite, when a guard is collecting (otherwise nothing)."""
    notes = _NOTES.get()
    if notes is not None:
        notes.extend(torch.isfinite(t).all() for t in tensors)


def all_finite(notes: list[torch.Tensor]) -> torch.Tensor:
    """A scalar bool tensor: every noted output was finite."""
    return torch.stack(notes).all()
