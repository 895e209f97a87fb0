"""Slow, loop-by-loop ports of torchvision's CPU ROIAlign/NMS, used as test oracles."""

from __future__ import annotations

import math

import torch


def _bilinear(f, y, x, H, W):
    if not (y >= -1.0 and y <= H and x >= -1.0 and x <= W):
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y = max(y, 0.0)
    x = max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yh = yl = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xh = xl = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * f[:, yl, xl] + hy * lx * f[:, yl, xh]
            + ly * hx * f[:, yh, xl] + ly * lx * f[:, yh, xh])


def roi_align(inp, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Direct port in float64 of torchvision's per-ROI loop."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    inp = inp.double()
    N, C, H, W = inp.shape
    out = torch.zeros(rois.shape[0], C, oh, ow, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for k, r in enumerate(rois.double().tolist()):
        f = inp[int(r[0])]
        sw, sh = r[1] * spatial_scale - off, r[2] * spatial_scale - off
        ew, eh = r[3] * spatial_scale - off, r[4] * spatial_scale - off
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / oh))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / ow))
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = torch.zeros(C, dtype=torch.float64)
                for iy in range(max(gh, 0)):
                    y = sh + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        x = sw + pw * bw + (ix + 0.5) * bw / gw
                        acc += _bilinear(f, y, x, H, W)
                out[k, :, ph, pw] = acc / count
    return out


def nms(boxes, scores, thr):
    """Sequential greedy NMS over a stable descending sort, float32 IoU like torchvision."""
    import numpy as np

    order = torch.sort(scores, descending=True, stable=True).indices.numpy()
    b = boxes.float().numpy()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    sup = np.zeros(len(order), dtype=bool)
    keep = []
    for a, i in enumerate(order):
        if sup[i]:
            continue
        keep.append(int(i))
        j = order[a + 1:]
        w = np.maximum(np.minimum(b[i, 2], b[j, 2]) - np.maximum(b[i, 0], b[j, 0]), np.float32(0))
        h = np.maximum(np.minimum(b[i, 3], b[j, 3]) - np.maximum(b[i, 1], b[j, 1]), np.float32(0))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (area[i] + area[j] - inter)
        sup[j[iou.astype(np.float64) > thr]] = True
    return torch.tensor(keep, dtype=torch.long)
