"""Strict weight loading with a readable report of what does not fit."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError

_SHOW = 5  # names listed per category in the error message


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CheckpointError(f"checkpoint entry {name!r} is a {type(value).__name__}, not an array; "
                          "pass a Detectron2 state_dict of tensors or numpy arrays")


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
    return f"{len(items)} {label} ({shown})"


def load_weights(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Copy a Detectron2 state_dict into `model`; keys and shapes must match exactly (CheckpointError if not)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a mapping of parameter names to arrays, got {type(state_dict).__name__}; "
                              "pass checkpoint['model'] or use zoo.load_checkpoint")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    tensors = {}
    mismatched = []
    for k, v in state_dict.items():
        if k not in own:
            continue
        t = _as_tensor(k, v)
        if tuple(t.shape) != tuple(own[k].shape):
            mismatched.append(f"{k}: checkpoint {list(t.shape)} vs model {list(own[k].shape)}")
        tensors[k] = t
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(_listing("missing", missing))
        if unexpected:
            parts.append(_listing("unexpected", unexpected))
        if mismatched:
            parts.append(_listing("shape-mismatched", mismatched))
        raise CheckpointError("checkpoint does not fit this architecture: " + "; ".join(parts)
                              + "; use the checkpoint released for this model name")
    # every entry is checked before any is copied, so a bad file leaves the model untouched
    for k, t in tensors.items():
        if not t.is_floating_point() and own[k].is_floating_point():
            raise CheckpointError(f"checkpoint entry {k!r} has dtype {t.dtype}, expected floating point; "
                                  "use the checkpoint released for this model name")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint entry {k!r} contains NaN or Inf; the file is corrupt, "
                                  "download it again")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
