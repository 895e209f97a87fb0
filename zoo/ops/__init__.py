"""Detection ops (ROIAlign, FPN ROI pooler, NMS, mask paste) and the convolutions' epilogue, each with a torch and
a Triton backend.

Backend choice: an explicit ``backend=`` argument wins, then the ``ZOO_OPS``
environment variable (``torch`` or ``triton``), then "triton" for CUDA tensors when
triton >= 3.3 imports and "torch" otherwise (CUDA tensors then warn once). ``zoo.kernels``
(and triton) is imported only when the triton backend is actually used.

Semantics notes:
- roi_align coordinates and sampling run in fp32 (fp64 for fp64 input on the torch
  path) and results accumulate in fp32; boxes are not cast to the feature dtype.
- nms sorts scores with a *stable* descending sort, so tied scores keep the lower
  index first, as torchvision's CPU nms does (checked against torchvision 0.28).
- batched_nms's per-class regime ends, like torchvision's, with torch's default
  (unstable) sort of the kept scores: the same call on the same input reproduces its
  order of exact ties (on CPU not index order above 16 kept boxes). The Triton
  fixed-shape path (batched_nms_fixed) orders ties by index instead.
- IoU is compared with the threshold as torchvision's CPU kernel does (float IoU vs
  double threshold); torchvision's CUDA kernel rounds the threshold to float first,
  which differs only when float(thr) > thr and an IoU equals float(thr) exactly.
- batched_nms uses torchvision's regime switch (per-class above 4000 elements on CPU,
  20000 on GPU; coordinate-offset trick otherwise), so results match it in both.
- Half/bfloat16 boxes are handled in fp32 (torchvision's CPU nms rejects them).
- Every op runs with autocast disabled: coordinates, sampling and IoU stay in fp32
  under torch.autocast too, and roi_align returns the features' dtype.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from zoo.errors import ZooError
from zoo.ops import reference
from zoo.ops.reference import BoxesLike

__all__ = ["roi_align", "multilevel_roi_align", "nms", "batched_nms", "nms_fixed", "batched_nms_fixed",
           "paste_masks", "conv_epilogue", "resolve_backend", "triton_available", "triton_problem"]

_BACKENDS = ("torch", "triton")
MIN_TRITON = (3, 3)  # the oldest triton the kernels are checked against (torch >= 2.7 ships it)
_fallback_warned = False


@functools.lru_cache(maxsize=None)
def triton_problem() -> Optional[str]:
    """Why the triton backend cannot run here, or None when it can."""
    want = ".".join(map(str, MIN_TRITON))
    try:
        import triton
    except Exception as e:  # any import failure means "not usable"
        return f"triton does not import ({type(e).__name__}); pip install 'triton>={want}'"
    found = tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2])
    if found < MIN_TRITON:
        return (f"triton {triton.__version__} is older than {want}, which zoo's kernels need; "
                f"pip install 'triton>={want}' (torch >= 2.7 ships it)")
    return None


def triton_available() -> bool:
    """True when a triton that can run zoo's kernels (>= MIN_TRITON) imports."""
    return triton_problem() is None


def _auto_backend(tensor: Tensor) -> str:
    """Triton for CUDA tensors where it can run (else torch, with one warning), torch for the rest."""
    global _fallback_warned
    if not tensor.is_cuda:
        return "torch"
    if triton_available():
        return "triton"
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"{triton_problem()}; running zoo's ROIAlign and NMS with the slower pure-torch ops "
                      "on the GPU (set ZOO_OPS=torch to silence this)", RuntimeWarning, stacklevel=3)
    return "torch"


def resolve_backend(backend: Optional[str], tensor: Tensor) -> str:
    """Pick "torch" or "triton" for an op on `tensor` (argument > ZOO_OPS > device)."""
    undo = "use backend='torch'"  # how to take back an unusable choice, where it was made
    if backend is None:
        env = os.environ.get("ZOO_OPS", "").strip().lower()
        if env:
            if env not in _BACKENDS:
                raise ZooError(f"ZOO_OPS={env!r} is not a known backend; "
                               f"set it to one of {_BACKENDS} or unset it")
            backend, undo = env, "unset ZOO_OPS"
        else:
            backend = _auto_backend(tensor)
    if backend not in _BACKENDS:
        raise ZooError(f"unknown ops backend {backend!r}; use one of {_BACKENDS}")
    if backend == "triton":
        if not triton_available():
            raise ZooError(f"the triton backend cannot run: {triton_problem()}; or {undo}")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ZooError("the triton backend needs CUDA tensors; for CPU tensors set "
                           f"TRITON_INTERPRET=1 (slow, for testing) or {undo}")
    return backend


def _no_autocast(tensor: Tensor):
    # autocast would turn the fp32 matmuls inside roi_align into bf16/fp16 and mix dtypes
    return torch.autocast(tensor.device.type, enabled=False)


def _kernels(tensor: Tensor):
    import zoo.kernels  # deferred: triton is optional

    # triton.jit picks interpreted vs compiled when zoo.kernels is first imported.
    if not tensor.is_cuda and not zoo.kernels.INTERPRET:
        raise ZooError("zoo.kernels was imported without TRITON_INTERPRET=1, so it cannot "
                       "run on CPU tensors; set TRITON_INTERPRET=1 before the first use")
    return zoo.kernels


def _check_memory_format(memory_format: Optional[torch.memory_format]) -> None:
    if memory_format not in (None, torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be None, torch.contiguous_format or torch.channels_last, "
                         f"got {memory_format!r}")


def _laid_out(out: Tensor, memory_format: Optional[torch.memory_format]) -> Tensor:
    return out if memory_format is None else out.contiguous(memory_format=memory_format)


def roi_align(input: Tensor, boxes: BoxesLike, output_size: Union[int, Sequence[int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              *, bin_stride: int = 1, memory_format: Optional[torch.memory_format] = None,
              backend: Optional[str] = None) -> Tensor:
    """ROIAlign (torchvision semantics): [N,C,H,W] x boxes -> [K,C,oh,ow].

    bin_stride=s computes only every s-th bin of the output_size grid along each axis, i.e.
    roi_align(...)[:, :, ::s, ::s] for 1/s**2 of the work (what a stride-s 1x1 convolution reads).
    memory_format lays the result out as asked (torch.contiguous_format or torch.channels_last);
    None leaves it to the backend (Triton: the maps' layout; torch: contiguous). Values are the same.
    """
    _check_memory_format(memory_format)
    with _no_autocast(input):
        if resolve_backend(backend, input) == "triton":
            return _kernels(input).roi_align(input, boxes, output_size, spatial_scale,
                                             sampling_ratio, aligned, bin_stride, memory_format)
        return _laid_out(reference.roi_align(input, boxes, output_size, spatial_scale,
                                             sampling_ratio, aligned, bin_stride=bin_stride), memory_format)


def multilevel_roi_align(features: Sequence[Tensor], boxes: BoxesLike,
                         output_size: Union[int, Sequence[int]], scales: Sequence[float],
                         sampling_ratio: int, aligned: bool = True,
                         canonical_box_size: float = 224, canonical_level: int = 4,
                         *, memory_format: Optional[torch.memory_format] = None,
                         backend: Optional[str] = None) -> Tensor:
    """Detectron2 ROIPooler: assign each box an FPN level, pool, keep input order (memory_format as in
    roi_align)."""
    _check_memory_format(memory_format)
    with _no_autocast(features[0]):
        if resolve_backend(backend, features[0]) == "triton":
            return _kernels(features[0]).multilevel_roi_align(
                features, boxes, output_size, scales, sampling_ratio, aligned,
                canonical_box_size, canonical_level, memory_format)
        return _laid_out(reference.multilevel_roi_align(features, boxes, output_size, scales,
                                                        sampling_ratio, aligned,
                                                        canonical_box_size, canonical_level), memory_format)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float,
        *, backend: Optional[str] = None) -> Tensor:
    """Greedy NMS like torchvision.ops.nms: kept indices by decreasing score."""
    with _no_autocast(boxes):
        if resolve_backend(backend, boxes) == "triton":
            return _kernels(boxes).nms(boxes, scores, iou_threshold)
        return reference.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                *, backend: Optional[str] = None) -> Tensor:
    """Per-category NMS like torchvision.ops.batched_nms (same regime switch)."""
    with _no_autocast(boxes):
        if resolve_backend(backend, boxes) == "triton":
            return _kernels(boxes).batched_nms(boxes, scores, idxs, iou_threshold)
        return reference.batched_nms(boxes, scores, idxs, iou_threshold)


def nms_fixed(boxes: Tensor, scores: Tensor, iou_threshold: float, max_out: int,
              *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """NMS with static output: (indices[max_out] padded with -1, kept-count tensor)."""
    with _no_autocast(boxes):
        if resolve_backend(backend, boxes) == "triton":
            return _kernels(boxes).nms_fixed(boxes, scores, iou_threshold, max_out)
        keep = reference.nms(boxes, scores, iou_threshold)
        out = torch.full((max_out,), -1, dtype=torch.long, device=boxes.device)
        n = min(max_out, keep.numel())
        out[:n] = keep[:n]
        return out, torch.tensor(n, dtype=torch.long, device=boxes.device)


def batched_nms_fixed(boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor,
                      iou_threshold: float, max_out: int, capacity: Optional[int] = None,
                      *, backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Static-shape batched_nms over the `valid` boxes: (indices[max_out] padded with -1,
    kept count, complete flag), all tensors. boxes [G, n, 4] (scores, valid [G, n]; idxs [G, n]
    or [n]) solves G independent problems at once: [G, max_out], [G], [G].

    Only the `capacity` highest-scoring valid boxes are candidates (None: all); `complete`
    is False when fewer than max_out survive among them while more valid boxes exist, i.e.
    when the result may differ from batched_nms(...)[:max_out]. The triton backend never
    synchronises with the host (CUDA-graph friendly); the torch backend does.
    """
    with _no_autocast(boxes):
        if resolve_backend(backend, boxes) == "triton":
            return _kernels(boxes).batched_nms_fixed(boxes, scores, idxs, valid, iou_threshold,
                                                     max_out, capacity)
        return reference.batched_nms_fixed(boxes, scores, idxs, valid, iou_threshold, max_out,
                                           capacity)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5,
                *, batched: Optional[bool] = None, backend: Optional[str] = None) -> Tensor:
    """Detectron2's paste_masks_in_image: [N, M, M] probabilities into [N, 4] boxes of an (H, W)
    image -> bool [N, H, W] (sample >= threshold), each box's region widened by one pixel.

    The triton backend is one launch that writes only the result; the torch backend samples with
    grid_sample, per box region (`batched=False`, the CPU default) or whole images in chunks.
    """
    from zoo.ops import paste

    with _no_autocast(masks):
        if resolve_backend(backend, masks) == "triton":
            return _kernels(masks).paste_masks(masks, boxes, image_size, threshold)
        return paste.paste_masks(masks, boxes, image_size, threshold, batched)


def conv_epilogue(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None, relu: bool = True,
                  *, upsampled: bool = False, residual_bias: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tensor:
    """What follows a convolution without its bias, in place: y <- relu((y + bias) + residual), each step rounded
    as PyTorch's ops round it (returns y). `bias` has one value per channel; `residual` y's shape, or with
    `upsampled` half its height and width, read nearest-neighbour as F.interpolate(scale_factor=2.0) would give it
    (an FPN's top-down sum). `residual_bias` (one per channel, with a residual of y's shape) is added to the
    residual first: a projection shortcut's bias, its convolution run without it. The triton backend does it in one
    pass over y, bit-identical to the torch backend's add_, add_, relu_; for layouts it does not take (dense NCHW or
    channels-last; channels-last with `upsampled`) it runs those ops itself."""
    def per_channel(b: Tensor) -> Tensor:
        return b.view(1, -1, *([1] * (y.dim() - 2)))

    if residual_bias is not None and (residual is None or upsampled):
        raise ValueError("conv_epilogue: residual_bias needs a residual of the output's shape")
    with _no_autocast(y):
        if resolve_backend(backend, y) == "triton":
            kernels = _kernels(y)
            from zoo.kernels import epilogue

            if epilogue.supports(y, bias, residual, upsampled, residual_bias):
                return kernels.conv_epilogue(y, bias, residual, relu, upsampled, residual_bias)
        if bias is not None:
            y.add_(per_channel(bias))
        if residual is not None:
            if upsampled:
                residual = torch.nn.functional.interpolate(residual, scale_factor=2.0, mode="nearest")
            elif residual_bias is not None:
                residual = residual + per_channel(residual_bias)
            y.add_(residual)
        return y.relu_() if relu else y
