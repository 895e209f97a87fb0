"""`zoo.get`: the one place where a manifest, its network and its weights meet."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import InputError
from .registry import get_manifest


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """Turn 'auto' / 'cpu' / 'cuda[:N]' into a usable torch.device, or explain why not."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device {device!r} asked for, but CUDA is not available here; "
            "use device='cpu' (--device cpu on the command line)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def get(
    name: str,
    pretrained: bool = True,
    *,
    weights: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device, None] = "cpu",
    quiet: Optional[bool] = None,
    precision: str = "fp32",
    static_shapes: Optional[bool] = None,
    cuda_graphs: bool = False,
    fast_convs: Optional[bool] = None,
) -> torch.nn.Module:
    """Build baseline `name` in eval mode; load released weights (pretrained) or a local file (weights).

    precision: "fp32" (default; the exact path), "bf16" (CPU or CUDA) or "fp16" (CUDA only) runs the
    network under torch.autocast; boxes, scores and masks come back fp32/bool either way. It can be
    changed later with `model.precision = ...`.

    static_shapes: None (default) uses the fixed-shape, sync-free inference path on CUDA and the dynamic one
    on CPU; True/False forces one (same detections). cuda_graphs=True (CUDA only) replays the fixed-shape
    path from CUDA graphs captured per padded batch shape. fast_convs: None (default) runs Detectron2's own
    conv and batch_norm ops for fp32 on CPU (features bit-identical to Detectron2's), and otherwise folds
    FrozenBN into the convolutions and runs them channels_last; True/False forces one (True is faster on CPU
    too, with last-bit differences that can reorder near-tied scores). All three are attributes of the model.
    """
    from .hub import fetch, load_checkpoint
    from .modeling import build_model, load_weights
    from .modeling.detector import check_graph_options, check_precision

    manifest = get_manifest(name)
    dev = resolve_device(device)
    check_precision(precision, dev)  # before any download
    check_graph_options(static_shapes, cuda_graphs, dev)
    model = build_model(manifest.architecture)
    model.manifest = manifest
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise InputError(f"weights path {path} is a folder; pass the .pkl or .pth checkpoint file in it")
        if not path.is_file():
            raise InputError(f"weights file {path} does not exist; pass the path of a .pkl or .pth checkpoint")
        load_weights(model, load_checkpoint(path))
    elif pretrained:
        ck = manifest.checkpoint
        load_weights(model, load_checkpoint(fetch(ck.url, sha256=ck.sha256, quiet=quiet)))
    model.precision = precision
    model.static_shapes = static_shapes
    model.cuda_graphs = cuda_graphs
    model.fast_convs = fast_convs
    return model.to(dev).eval()
