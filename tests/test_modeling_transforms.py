"""Preprocessing: image conversion, ResizeShortestEdge sizes, normalisation/padding, bad input errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.errors import InputError
from zoo.modeling import build_model
from zoo.modeling.transforms import normalize_and_pad, resize_uint8, resized_size, to_rgb_array

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("image", ["grace_hopper", "scene_427x640", "wide_300x1400"])
def test_resized_size_matches_detectron2(image):
    inp = json.loads((FIXTURES / "detectron2" / "mask_rcnn_R_50_FPN_3x" / f"{image}.json").read_text())["input"]
    assert resized_size(inp["height"], inp["width"], 800, 1333) == (inp["resized_height"], inp["resized_width"])


@pytest.mark.parametrize("hw,expected", [
    ((480, 640), (800, 1067)),
    ((640, 480), (1067, 800)),
    ((800, 800), (800, 800)),
    ((1000, 100), (1333, 133)),  # long side capped at 1333
    ((100, 1000), (133, 1333)),
    ((1, 1), (800, 800)),
    ((3000, 4000), (800, 1067)),
])
def test_resized_size_examples(hw, expected):
    assert resized_size(*hw, 800, 1333) == expected


def test_resize_is_pil_bilinear_on_uint8():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = resize_uint8(img, (80, 115))
    assert out.dtype == np.uint8 and out.shape == (80, 115, 3)
    assert np.array_equal(out, np.asarray(Image.fromarray(img).resize((115, 80), Image.BILINEAR)))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_pil_modes_become_rgb(mode):
    img = Image.new("RGB", (7, 5), (10, 200, 30)).convert(mode)
    arr = to_rgb_array(img)
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8 and arr.flags["C_CONTIGUOUS"]
    assert np.array_equal(arr, np.asarray(img.convert("RGB")))


def test_path_and_array_inputs(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    p = tmp_path / "x.png"
    Image.fromarray(arr).save(p)
    assert np.array_equal(to_rgb_array(p), arr)
    assert np.array_equal(to_rgb_array(str(p)), arr)
    assert np.array_equal(to_rgb_array(arr[:, ::-1]), arr[:, ::-1])  # non-contiguous views are fine
    gray = arr[:, :, 0]
    assert np.array_equal(to_rgb_array(gray), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(to_rgb_array(gray[:, :, None]), np.repeat(gray[:, :, None], 3, axis=2))  # as tensors


def test_tensor_inputs_as_torchvision_reads_images():
    arr = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    chw = torch.from_numpy(arr).permute(2, 0, 1)  # torchvision.io.read_image's layout
    assert np.array_equal(to_rgb_array(chw), arr)
    assert np.array_equal(to_rgb_array(chw.contiguous()), arr)
    assert np.array_equal(to_rgb_array(torch.from_numpy(arr)), arr)  # HxWx3 as well
    rgba = torch.cat([chw, torch.full((1, 6, 9), 7, dtype=torch.uint8)])  # alpha dropped, as PIL's RGB does
    assert np.array_equal(to_rgb_array(rgba), arr)
    grey = chw[:1]
    want = np.repeat(arr[:, :, :1], 3, axis=2)
    assert np.array_equal(to_rgb_array(grey), want) and np.array_equal(to_rgb_array(grey[0]), want)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((4, 4, 3), dtype=np.float32), "dtype float32"),
    (np.zeros((4, 4, 4), dtype=np.uint8), "HxWx3"),
    (np.zeros((4,), dtype=np.uint8), "HxWx3"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "at least 1"),
    (12, "unsupported image type int"),
    (torch.zeros(3, 4, 4), "image tensor has dtype torch.float32; pass uint8"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), r"shape \(2, 3, 4, 4\); pass one image as 3xHxW"),
    (torch.zeros(5, 4, 2, dtype=torch.uint8), r"shape \(5, 4, 2\)"),
    (torch.zeros(3, 0, 4, dtype=torch.uint8), "at least 1"),
    ([1, 2], "unsupported image type list"),
    ("/nonexistent/image.png", "does not exist"),
])
def test_bad_inputs_raise_one_line_input_error(bad, match):
    with pytest.raises(InputError, match=match) as ei:
        to_rgb_array(bad)
    assert isinstance(ei.value, ValueError)
    assert "\n" not in str(ei.value)


def test_unreadable_file(tmp_path):
    p = tmp_path / "not_an_image.png"
    p.write_bytes(b"hello")
    with pytest.raises(InputError, match="cannot read") as ei:
        to_rgb_array(p)
    assert "\n" not in str(ei.value)


def test_normalize_and_pad_single_and_batch():
    mean = torch.tensor([1.0, 2.0, 3.0])
    std = torch.tensor([2.0, 2.0, 2.0])
    a = torch.full((3, 5, 7), 9, dtype=torch.uint8)
    b = torch.full((3, 6, 4), 5, dtype=torch.uint8)
    one = normalize_and_pad([a], mean, std, 32)
    assert one.shape == (1, 3, 32, 32)
    assert torch.equal(one[0, :, :5, :7], ((a.float() - mean.view(3, 1, 1)) / 2))
    assert one[0, :, 5:].abs().sum() == 0 and one[0, :, :, 7:].abs().sum() == 0  # zeros after normalising
    assert normalize_and_pad([a], mean, std, 0).shape == (1, 3, 5, 7)
    two = normalize_and_pad([a, b], mean, std, 0)
    assert two.shape == (2, 3, 6, 7)
    assert torch.equal(two[0, :, :5, :7], one[0, :, :5, :7])
    assert torch.equal(two[1, :, :6, :4], (b.float() - mean.view(3, 1, 1)) / 2)
    assert two[1, :, :, 4:].abs().sum() == 0


def test_normalize_and_pad_reorders_channels_and_lays_out_the_batch():
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([100.0, 110.0, 120.0]), torch.tensor([55.0, 56.0, 57.0])
    hwc = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8) for h, w in ((5, 7), (6, 4))]
    views = [t.permute(2, 0, 1) for t in hwc]  # what prepare hands over: channels-last strides, RGB
    want = normalize_and_pad([v.flip(0).contiguous() for v in views], mean, std, 4)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = normalize_and_pad(views, mean, std, 4, flip_channels=True, memory_format=fmt)
        assert got.is_contiguous(memory_format=fmt) and torch.equal(got, want)
    assert not torch.equal(normalize_and_pad(views, mean, std, 4), want)  # the flip bites


@pytest.mark.parametrize("name", ["faster_rcnn_R_50_FPN_3x", "faster_rcnn_X_101_32x8d_FPN_3x"])
def test_preprocess_channel_order_and_sizes(name):
    model = build_model(zoo.get_manifest(name).architecture)
    img = np.zeros((300, 1400, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30  # R, G, B
    batch = model.preprocess([img])
    assert batch.image_sizes == [(286, 1333)] and batch.original_sizes == [(300, 1400)]
    assert tuple(batch.tensor.shape) == (1, 3, 288, 1344)
    inp = model.arch.input
    order = [2, 1, 0] if inp.format == "BGR" else [0, 1, 2]
    for c in range(3):
        want = ((10, 20, 30)[order[c]] - inp.pixel_mean[c]) / inp.pixel_std[c]
        assert batch.tensor[0, c, 0, 0].item() == pytest.approx(want, rel=1e-6)
    assert batch.tensor[0, :, 286:].abs().sum() == 0


def test_predict_rejects_empty_list_and_bad_items():
    model = build_model(zoo.get_manifest("faster_rcnn_R_50_FPN_3x").architecture)
    with pytest.raises(InputError, match="empty list"):
        model.predict([])
    with pytest.raises(InputError, match="dtype float64"):
        model.predict(np.zeros((8, 8, 3)))


def test_16bit_png_keeps_its_top_8_bits(tmp_path):
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = to_rgb_array(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb[:, :, 0], (ramp >> 8).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01  # not clipped to white


def test_float_image_mode_is_refused():
    with pytest.raises(InputError, match="convert it to 8-bit RGB"):
        to_rgb_array(Image.fromarray(np.ones((4, 4), dtype=np.float32)))


def test_too_elongated_image_is_a_clear_error():
    with pytest.raises(InputError, match="too elongated"):
        resized_size(1, 3000, 800, 1333)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    with pytest.raises(InputError, match="MAX_IMAGE_PIXELS"):
        to_rgb_array(path)


def test_one_lazily_loaded_pil_image_from_many_reader_threads(tmp_path):
    # predict([im, im]) hands the same PIL image to predict_iter's reader threads; PIL's first load of a file
    # is not thread-safe (unguarded, most of these rounds failed with "image file is truncated")
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "photo.jpg"
    Image.open(Path(__file__).parent / "fixtures" / "images" / "grace_hopper.png").convert("RGB").save(path)
    ref = to_rgb_array(path)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(40):
            im = Image.open(path)  # lazily loaded: nothing decoded yet
            assert all(np.array_equal(a, ref) for a in pool.map(to_rgb_array, [im] * 4))
