"""hubconf.py as torch.hub sees it: entrypoints, docstrings, local loading, pretrained via a mirror."""
import pytest
import torch
import torch.hub
from torch import nn

import zoo
from synth_weights import synth_tensor
from user_support import IMAGES, ROOT, fixture_record, mirror_with, small_manifest, state_dict_keys, synth_checkpoint
from zoo.errors import InputError
from zoo.results import Detections


@pytest.fixture
def hub_from_checkout(monkeypatch):
    # torch.hub.list/help only resolve GitHub repos; point that resolver at this checkout so torch.hub's
    # own import-and-list logic runs on our hubconf.py exactly as it would on a downloaded copy.
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *a, **k: str(ROOT))
    monkeypatch.delenv("ZOO_MANIFEST_PATH", raising=False)


def test_list_has_one_entrypoint_per_baseline(hub_from_checkout):
    names = torch.hub.list("owner/zoo")
    assert len(names) == 19
    assert sorted(names) == zoo.list_models()


def test_help_is_built_from_the_manifest(hub_from_checkout):
    doc = torch.hub.help("owner/zoo", "mask_rcnn_R_50_FPN_3x")
    for part in ("Mask R-CNN", "box 41.0", "mask 37.2", "3x schedule",
                 "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "model_final_f10217.pkl"):
        assert part in doc
    detector_doc = torch.hub.help("owner/zoo", "faster_rcnn_R_50_C4_1x")
    assert "Faster R-CNN" in detector_doc and "box 35.7\n" in detector_doc


def test_load_local_architecture_only():
    model = torch.hub.load(str(ROOT), "faster_rcnn_R_50_FPN_1x", source="local", pretrained=False)
    assert isinstance(model, nn.Module) and not model.training
    assert model.manifest.name == "faster_rcnn_R_50_FPN_1x"
    keys = state_dict_keys("faster_rcnn_R_50_FPN_1x")
    assert set(model.state_dict()) == set(keys)


def test_device_argument_reaches_zoo_get():
    if torch.cuda.is_available():
        pytest.skip("checks the error raised when CUDA is absent")
    with pytest.raises(InputError, match="CUDA is not available"):
        torch.hub.load(str(ROOT), "faster_rcnn_R_50_FPN_1x", source="local", pretrained=False, device="cuda")


def test_pretrained_weights_come_through_the_mirror(tmp_path, tmp_path_factory, monkeypatch):
    base = "faster_rcnn_R_50_FPN_1x"
    ckpt = synth_checkpoint(tmp_path_factory, base)
    manifest = small_manifest(base, ckpt)
    monkeypatch.setenv("ZOO_MIRROR", str(mirror_with(tmp_path / "mirror", manifest, ckpt)))
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ZOO_QUIET", "1")
    zoo.register(manifest)
    try:
        model = torch.hub.load(str(ROOT), manifest["name"], source="local")  # pretrained=True by default
    finally:
        zoo.registry.unregister(manifest["name"])
    w = fixture_record(base, "grace_hopper")["weights"]
    key = "roi_heads.box_predictor.cls_score.weight"
    expected = synth_tensor(key, model.state_dict()[key].shape, w["seed"], w["pixel_std"])
    assert torch.equal(model.state_dict()[key], torch.from_numpy(expected))
    det = model.predict(IMAGES / "grace_hopper.png")
    assert isinstance(det, Detections) and len(det) > 0 and det.image_size == (600, 512)
