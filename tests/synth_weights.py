"""The project's own deterministic synthetic-weight generator (the fixtures' published scheme).

Each tensor is drawn from NumPy's PCG64 seeded by (seed, crc32(name)), so the same key, shape and seed
give bit-identical float32 arrays on any machine; that is what lets Detectron2's recorded outputs
be reproduced here without real checkpoints.
"""
from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np

DEFAULT_SEED = 20261124


def _draw(name: str, shape: tuple[int, ...], seed: int, pixel_std: float) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    parts = name.split(".")
    leaf = parts[-1]
    owner = parts[-2] if len(parts) >= 2 else ""
    if ".norm." in name or owner == "norm":
        if leaf == "weight":
            return rng.uniform(0.5, 1.5, shape)
        if leaf in ("bias", "running_mean"):
            return rng.normal(0.0, 0.1, shape)
        if leaf == "running_var":
            return rng.uniform(0.5, 2.0, shape)
    if leaf == "bias":
        if "objectness_logits" in name:
            return rng.normal(-1.0, 0.5, shape)
        return rng.normal(0.0, 1.0 if "cls_score" in name else 0.01, shape)
    if len(shape) == 4:
        # ConvTranspose2d stores (in, out, kh, kw)
        fan_in = shape[0] * shape[2] * shape[3] / 4.0 if "deconv" in name else shape[1] * shape[2] * shape[3]
        std = math.sqrt(2.0 / fan_in)
        if owner == "conv3":
            std *= 0.1
        if name.endswith("stem.conv1.weight"):
            std *= pixel_std / 60.0
        if "fpn_" in name:
            std *= 0.3
        if "anchor_deltas" in name:
            std *= 0.05
        if "mask_head.predictor" in name:
            std *= 2.0
        return rng.normal(0.0, std, shape)
    if len(shape) == 2:
        std = math.sqrt(1.0 / shape[1])
        if "bbox_pred" in name:
            std *= 0.05
        if "cls_score" in name:
            std *= 4.0
        return rng.normal(0.0, std, shape)
    return rng.normal(0.0, 0.1, shape)


def synth_tensor(name: str, shape: Sequence[int], seed: int = DEFAULT_SEED, pixel_std: float = 1.0) -> np.ndarray:
    """One float32 array for state-dict key `name`."""
    shape = tuple(int(s) for s in shape)
    return np.asarray(_draw(name, shape, seed, pixel_std)).astype(np.float32)


def synth_state_dict(keys: Mapping[str, Mapping], seed: int = DEFAULT_SEED, pixel_std: float = 1.0) -> dict:
    """{key: float32 array} for a {key: {"shape": [...]}} listing (tests/fixtures/state_dicts/*.json)."""
    return {k: synth_tensor(k, v["shape"], seed, pixel_std) for k, v in keys.items()}
