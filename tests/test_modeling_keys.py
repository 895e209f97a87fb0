"""Every baseline builds with exactly Detectron2's state_dict keys and shapes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.modeling import build_model
from user_support import state_dict_keys

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.stem for p in (FIXTURES / "state_dicts").glob("*.json"))


def test_all_baselines_have_fixtures():
    assert sorted(zoo.list_models()) == NAMES
    assert len(NAMES) == 19


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes(name):
    ref = state_dict_keys(name)
    model = build_model(zoo.get_manifest(name).architecture)
    sd = model.state_dict()
    assert sorted(sd) == sorted(ref)
    bad = {k: (list(sd[k].shape), v["shape"]) for k, v in ref.items() if list(sd[k].shape) != v["shape"]}
    assert not bad
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert not model.training
    # normalisation constants come from the manifest, not the checkpoint
    assert "pixel_mean" not in sd and "pixel_std" not in sd
    arch = model.arch
    assert model.pixel_mean.tolist() == pytest.approx(list(arch.input.pixel_mean))
    assert model.pixel_std.tolist() == pytest.approx(list(arch.input.pixel_std))
