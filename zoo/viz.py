"""Pictures of detections: translucent masks, boxes and legible labels, drawn with PIL and NumPy only."""
from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

if TYPE_CHECKING:
    from .results import Detections

MASK_ALPHA = 0.45


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """`n` saturated RGB colours whose hues are spread by the golden ratio, so neighbours differ."""
    out = []
    for i in range(n):
        hue = (0.11 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    # Black on light backgrounds, white on dark ones (perceived luminance).
    lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if lum > 150 else (255, 255, 255)


def _mask_edge(mask: np.ndarray) -> np.ndarray:
    # Pixels of the mask with at least one 4-neighbour outside it.
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _paint_masks(canvas: np.ndarray, masks: np.ndarray, colors: list[tuple[int, int, int]],
                 order: Optional[Sequence[int]] = None) -> None:
    """Tint the pixels of masks[order[k]] in colors[k] (later ones on top; default order: all masks) and outline
    them, in place on an HxWx3 float canvas. Masks are read where they lie: a stack of 100 at 12 MP is 1.2 GB."""
    import torch

    from .results import mask_bounds

    for i, color in zip(range(len(masks)) if order is None else order, colors):
        m = masks[i]
        bounds = mask_bounds(torch.from_numpy(m[None]))[0]
        if bounds is None:
            continue
        y0, y1, x0, x1 = bounds
        # the mask's bounding box plus a 1-pixel margin (the edge test looks at neighbours): the same pixels as
        # working on the whole image, at a fraction of the cost (3x faster for 20 masks at 640x480)
        region = (slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
        sub, view = m[region], canvas[region]
        c = np.array(color, np.float32)
        view[sub] = view[sub] * (1.0 - MASK_ALPHA) + c * MASK_ALPHA
        view[_mask_edge(sub)] = c


def draw(image: Any, detections: "Detections", score_thresh: float = 0.5) -> Image.Image:
    """Render `detections` on `image` (anything `predict` takes) as a new RGB PIL image."""
    from .modeling.transforms import to_rgb_array

    rgb = to_rgb_array(image)
    h, w = rgb.shape[:2]
    if tuple(detections.image_size) != (h, w):
        raise InputError(f"detections are for an image of size {tuple(detections.image_size)} but the image is "
                         f"{(h, w)}; draw on the image that was passed to predict")
    # the instances drawn, by index: no filtered copy of the masks is made
    all_scores = detections.scores.detach().float().cpu().numpy()
    picked = np.flatnonzero(all_scores >= score_thresh)
    boxes = detections.boxes.detach().float().cpu().numpy().reshape(-1, 4)[picked]
    scores = all_scores[picked]
    all_names = detections.class_names
    names = [all_names[i] for i in picked.tolist()]

    # Large instances first, so small ones stay visible on top of them.
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    colors = instance_colors(len(order))

    canvas = rgb.astype(np.float32)
    if detections.masks is not None:
        import torch

        masks = detections.masks.detach().cpu()
        _paint_masks(canvas, (masks if masks.dtype == torch.bool else masks.bool()).numpy(), colors, picked[order])
    out = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))

    pen = ImageDraw.Draw(out)
    scale = (h * w) ** 0.5  # wide or tall images still get readable labels
    line = max(2, round(scale / 250))
    font = _font(int(np.clip(scale * 0.026, 11, 40)))
    pad = max(2, line)
    for k, i in enumerate(order):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        color = colors[k]
        pen.rectangle([x1, y1, x2, y2], outline=color, width=line)
        text = f"{names[i]} {scores[i] * 100:.0f}%"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top edge; never off the image.
        lx = min(max(x1, 0.0), max(w - tw, 0))
        ly = y1 - th if y1 - th >= 0 else min(max(y1, 0.0), max(h - th, 0))
        pen.rectangle([lx, ly, lx + tw - 1, ly + th - 1], fill=color)
        pen.text((lx + pad - left, ly + pad - top), text, fill=_text_color(color), font=font)
    return out
