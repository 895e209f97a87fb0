"""Test-time preprocessing exactly as Detectron2's DefaultPredictor + GeneralizedRCNN.preprocess_image."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
_PIL_INPUT_LOCK = threading.Lock()


def _pil_rgb(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB from a PIL image of any mode; 16-bit greyscale keeps its top 8 bits."""
    if im.mode.startswith("I;16"):
        # convert("RGB") would clip every value above 255 to white
        grey = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode in ("I", "F"):
        raise InputError(f"image mode {im.mode!r} (32-bit) has no standard 8-bit rendering; "
                         "convert it to 8-bit RGB first")
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def _rgb_hwc(image: np.ndarray, what: str, layouts: str) -> np.ndarray:
    """An HxWx3, HxWx1 or HxW uint8 array -> contiguous HxWx3 (greyscale repeated); `what` (array, tensor) and
    `layouts` (what to pass instead) word the errors."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim == 3 and image.shape[2] == 1:  # greyscale
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image {what} has shape {tuple(image.shape)}; pass {layouts}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"image {what} has shape {tuple(image.shape)}; height and width must be at least 1")
    return np.ascontiguousarray(image)


def _tensor_rgb(t: torch.Tensor) -> np.ndarray:
    """A uint8 image tensor (torchvision's CxHxW with C = 1, 3 or 4 (alpha dropped, as PIL's RGB conversion
    does), HxWx3, or HxW greyscale; any device) -> HxWx3 uint8 RGB array. A first dimension of 1, 3 or 4 means
    CxHxW."""
    if t.dtype != torch.uint8:
        raise InputError(f"image tensor has dtype {t.dtype}; pass uint8 RGB values in 0..255 "
                         "(e.g. (t * 255).round().to(torch.uint8) for a 0..1 float image)")
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t[:3].permute(1, 2, 0)
    return _rgb_hwc(t.numpy(), "tensor", "one image as 3xHxW (torchvision's layout) or HxWx3, and a batch as a "
                                         "list of them")


def to_rgb_array(image: Any) -> np.ndarray:
    """A path, PIL image (any mode), HxWx3 uint8 RGB array or uint8 image tensor (3xHxW as torchvision reads
    images, or HxWx3) -> contiguous HxWx3 uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise InputError(f"{str(path)!r} is a folder, not an image file; pass the path of an image")
        if not path.is_file():
            raise InputError(f"image file {str(path)!r} does not exist; check the path")
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)  # Detectron2's read_image honours EXIF orientation
                return _pil_rgb(im)
        except Image.DecompressionBombError:
            raise InputError(f"{str(path)!r} is larger than PIL.Image.MAX_IMAGE_PIXELS allows; downscale it, "
                             "or raise that limit if you trust the file") from None
        except (OSError, ValueError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise InputError(f"cannot read {str(path)!r} as an image ({type(e).__name__}"
                             f"{': ' + detail if detail else ''}); pass a complete PNG/JPEG/BMP/WebP file") from None
    if isinstance(image, Image.Image):
        # a caller's PIL image may be lazily loaded and passed more than once (predict([im, im])): its first load
        # reads the file, which is not safe from two reader threads at a time
        with _PIL_INPUT_LOCK:
            return _pil_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputError(f"image array has dtype {image.dtype}; pass uint8 RGB values in 0..255 "
                             "(e.g. arr.astype(numpy.uint8))")
        return _rgb_hwc(image, "array", "an HxWx3 RGB array")
    if isinstance(image, torch.Tensor):
        return _tensor_rgb(image)
    raise InputError(f"unsupported image type {type(image).__name__}; pass a file path, a PIL.Image, an HxWx3 "
                     "uint8 RGB numpy array or a 3xHxW uint8 tensor")


def resized_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """ResizeShortestEdge's output (h, w): scale the short side to short_edge, cap the long side, round half up."""
    size = float(short_edge)
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    out = int(newh + 0.5), int(neww + 0.5)
    if min(out) < 1:  # Detectron2 would fail inside PIL here
        raise InputError(f"a {w}x{h} image is too elongated: resizing it to at most {max_size} pixels long "
                         "leaves a side of 0 pixels; crop or pad it first")
    return out


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of an HxWx3 uint8 array to (h, w), as Detectron2's ResizeTransform does."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # writable (asarray's is not): chw_view


def padded_size(h: int, w: int, size_divisibility: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of size_divisibility (unchanged when it is 0 or 1)."""
    d = size_divisibility
    if d <= 1:
        return int(h), int(w)
    return (int(h) + d - 1) // d * d, (int(w) + d - 1) // d * d


def chw_view(hwc: np.ndarray) -> torch.Tensor:
    """A contiguous HxWx3 uint8 array as a [3, H, W] tensor that shares its memory (channels-last strides). The
    HWC -> CHW copy is a slow byte gather on the host (1.4 ms for 938x800 on a build machine); normalize_and_pad
    does it on the device as part of normalising, or not at all for channels-last convolutions."""
    if not hwc.flags.writeable:  # torch.from_numpy warns on read-only arrays (zoo never writes to this one)
        hwc = hwc.copy()
    return torch.from_numpy(hwc).permute(2, 0, 1)


def normalize_and_pad(images: Sequence[torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
                      size_divisibility: int, flip_channels: bool = False,
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(x - mean) / std per [3, h, w] image (channels reversed first with `flip_channels`: RGB -> BGR), zero-padded
    into one [N, 3, H, W] batch in `memory_format` (ImageList.from_tensors)."""
    max_h, max_w = padded_size(max(int(im.shape[-2]) for im in images), max(int(im.shape[-1]) for im in images),
                               size_divisibility)
    mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    out = torch.empty((len(images), 3, max_h, max_w), dtype=torch.float32, device=images[0].device,
                      memory_format=memory_format).zero_()
    for i, im in enumerate(images):
        if flip_channels:
            im = im.flip(0)
        torch.div(im.float() - mean, std, out=out[i, :, : im.shape[-2], : im.shape[-1]])
    return out
