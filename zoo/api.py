"""`zoo.get`: the one place where a manifest, its network and its weights meet."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .errors import InputError
from .registry import get_manifest

if TYPE_CHECKING:  # torch loads where it is used: the CLI's option checks run without it
    import torch


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """Turn 'auto' / 'cpu' / 'cuda[:N]' into a usable torch.device, or explain why not."""
    import torch

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


def checked_test_settings(arch, *, cli: bool = False, **settings):
    """arch with the settings given (not None) replaced; a bad value is an InputError naming the keyword (the
    command-line option with `cli`)."""
    from pydantic import ValidationError

    from .manifest import TEST_SETTINGS

    try:
        return arch.with_test_settings(**settings)
    except ValidationError as e:
        err = e.errors()[0]
        key = next(k for k, place in TEST_SETTINGS.items() if tuple(err["loc"][:2]) == place)
        default = arch.test_settings()[key]
        kind = "an integer" if isinstance(default, int) else "a number"
        why = f"{err['msg'][0].lower()}{err['msg'][1:]}"
        if cli:
            option = "--" + key.replace("_", "-")
            raise InputError(f"{option} {settings[key]!r} is not allowed ({why}); pass {kind} in range, or leave "
                             f"{option} out for the manifest's {default}") from None
        raise InputError(f"{key}={settings[key]!r} is not allowed ({why}); "
                         f"pass {kind} in range, or None for the manifest's {default}") from None


def get(
    name: str,
    pretrained: bool = True,
    *,
    weights: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device, None] = "cpu",
    quiet: Optional[bool] = None,
    precision: Optional[str] = None,
    static_shapes: Optional[bool] = None,
    cuda_graphs: bool = False,
    fast_convs: Optional[bool] = None,
    score_thresh: Optional[float] = None,
    nms_thresh: Optional[float] = None,
    detections_per_image: Optional[int] = None,
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
) -> torch.nn.Module:
    """Build baseline `name` in eval mode; load released weights (pretrained) or a local file (weights).

    precision: None (default) is "tf32" on CUDA and "fp32" elsewhere. "fp32" is the exact path; "tf32" (CUDA only)
    runs the box head's fully connected layers on TF32 tensor cores (convolutions follow PyTorch's cuDNN flag,
    TF32 by default, in both), within the same parity with Detectron2; "bf16" (CPU or CUDA) and "fp16" (CUDA only)
    run the network under torch.autocast; a batch that overflows fp16 is run again in tf32, with a warning. Boxes,
    scores and masks come back fp32/bool either way. It can be changed later with `model.precision = ...`.

    static_shapes: None (default) uses the fixed-shape, sync-free inference path on CUDA and the dynamic one
    on CPU; True/False forces one (same detections). cuda_graphs=True (CUDA only) replays the fixed-shape
    path from CUDA graphs captured per padded batch shape. fast_convs: None (default) runs Detectron2's own
    conv and batch_norm ops for fp32 on CPU (features bit-identical to Detectron2's), and otherwise folds
    FrozenBN into the convolutions and runs them channels_last; True/False forces one (True is faster on CPU
    too, with last-bit differences that can reorder near-tied scores). All three are attributes of the model.

    Test-time settings (None keeps the manifest's, which are Detectron2's): score_thresh (0.05: boxes must
    score above it), nms_thresh (per-class NMS IoU, 0.5), detections_per_image (100), min_size / max_size (the
    resize of the shorter / cap on the longer image side, 800 / 1333). `model.arch` holds the values used;
    `model.manifest` stays the published record.
    """
    from .hub import fetch, load_checkpoint
    from .modeling import build_model, load_weights
    from .modeling.detector import check_graph_options, check_precision

    manifest = get_manifest(name)
    arch = checked_test_settings(manifest.architecture, score_thresh=score_thresh, nms_thresh=nms_thresh,
                               detections_per_image=detections_per_image, min_size=min_size, max_size=max_size)
    dev = resolve_device(device)
    check_precision(precision, dev)  # before any download
    check_graph_options(static_shapes, cuda_graphs, dev)
    model = build_model(arch, random_init=weights is None and not pretrained)  # loaded weights replace it all
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
