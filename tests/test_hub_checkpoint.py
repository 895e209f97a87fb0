"""zoo.hub.load_checkpoint: old-style Detectron2 pickles, .pth files, and refusal of code-running pickles."""
from __future__ import annotations

import collections
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from zoo.errors import CheckpointError
from zoo.hub import load_checkpoint

pytestmark = pytest.mark.timeout(60)


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "backbone.bottom_up.stem.conv1.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "backbone.bottom_up.stem.conv1.norm.bias": rng.standard_normal(4).astype(np.float32),
        "roi_heads.box_predictor.cls_score.bias": np.arange(5, dtype=np.float64),
        "proposal_generator.anchor_generator.cell_anchors.0": np.arange(12, dtype=np.int64).reshape(3, 4),
    }


def assert_same(tensors: dict, arrays: dict) -> None:
    assert list(tensors) == list(arrays)
    for k, a in arrays.items():
        t = tensors[k]
        assert isinstance(t, torch.Tensor)
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert np.array_equal(t.numpy(), a)


def detectron2_pickle(model: dict) -> bytes:
    return pickle.dumps({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, protocol=2)


def test_protocol2_pickle_as_numpy_writes_it(tmp_path):
    p = tmp_path / "model_final_abcdef.pkl"
    p.write_bytes(detectron2_pickle(weights()))
    sd = load_checkpoint(p)
    assert_same(sd, weights())
    t = next(iter(sd.values()))
    t += 1  # a writable copy, not a view on the unpickled buffer
    assert sd["roi_heads.box_predictor.cls_score.bias"].dtype == torch.float64


def test_protocol2_pickle_naming_numpy_core(tmp_path):
    raw = detectron2_pickle(weights())
    if b"numpy._core.multiarray" in raw:  # NumPy >= 2 writes numpy._core; older releases wrote numpy.core
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"numpy._core" not in raw
    p = tmp_path / "old.pkl"
    p.write_bytes(raw)
    assert_same(load_checkpoint(p), weights())


def _py2_pickle(model: dict[str, np.ndarray]) -> bytes:
    """What Python 2 + NumPy 1.x wrote: protocol 2, byte strings (SHORT_BINSTRING/BINSTRING), numpy.core."""

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def arr(a: np.ndarray) -> bytes:
        order = b"<" if a.dtype.itemsize > 1 else b"|"
        dtype = (
            b"cnumpy\ndtype\n" + s(a.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
            + b"(K\x03" + s(order) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        )
        shape = b"(" + b"".join(b"K" + bytes([d]) for d in a.shape) + b"t"
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + s(a.astype(a.dtype.newbyteorder("<")).tobytes()) + b"tb"
        )

    body = b"}(" + b"".join(s(k.encode()) + arr(v) for k, v in model.items()) + b"u"
    return b"\x80\x02}(" + s(b"model") + body + s(b"__author__") + s(b"Detectron") + b"u."


def test_python2_style_pickle_with_latin1_byte_strings(tmp_path):
    p = tmp_path / "py2.pkl"
    raw = _py2_pickle(weights())
    assert b"_codecs" not in raw
    p.write_bytes(raw)
    assert_same(load_checkpoint(p), weights())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_newer_protocols(tmp_path, protocol):
    p = tmp_path / "new.pkl"
    p.write_bytes(pickle.dumps({"model": weights()}, protocol=protocol))
    assert_same(load_checkpoint(p), weights())


@pytest.mark.parametrize("protocol", [2, 5])
def test_loaded_tensors_are_writable_and_contiguous_without_warnings(tmp_path, protocol):
    """Tensors share the unpickled arrays' private memory where they can (no copy of every weight); a Fortran-order
    array is made C-contiguous; nothing warns about non-writable NumPy arrays."""
    import warnings

    arrays = dict(weights(), fortran=np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)))
    p = tmp_path / "w.pkl"
    p.write_bytes(pickle.dumps({"model": arrays}, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = load_checkpoint(p)
        for t in sd.values():
            assert t.is_contiguous()
            t += 1  # writable
    assert_same(sd, {k: a + 1 for k, a in arrays.items()})


def test_bare_dict_and_ordered_dict(tmp_path):
    p = tmp_path / "bare.pkl"
    p.write_bytes(pickle.dumps(weights(), protocol=2))
    assert_same(load_checkpoint(p), weights())
    p.write_bytes(pickle.dumps({"model": collections.OrderedDict(weights())}, protocol=2))
    assert_same(load_checkpoint(p), weights())


def test_big_endian_and_scalars_are_converted(tmp_path):
    p = tmp_path / "be.pkl"
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    p.write_bytes(pickle.dumps({"model": {"a": a, "s": np.float32(2.5)}}, protocol=2))
    sd = load_checkpoint(p)
    assert sd["a"].dtype == torch.float32 and sd["a"].tolist() == a.astype("<f4").tolist()
    assert sd["s"].item() == 2.5


class Evil:
    def __init__(self, target: str, how: str) -> None:
        self.target, self.how = target, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.target}",)
        if self.how == "open":
            return open, (self.target, "w")
        return eval, (f"open({self.target!r}, 'w')",)


@pytest.mark.parametrize("how, forbidden", [("system", ".system,"), ("open", ".open,"), ("eval", ".eval,")])
@pytest.mark.parametrize("nested", [False, True])
def test_code_running_pickle_is_refused_and_runs_nothing(tmp_path, how, forbidden, nested):
    target = tmp_path / "pwned"
    evil = Evil(str(target), how)
    obj = {"model": {"w": np.zeros(2, np.float32), "x": evil}} if nested else evil
    p = tmp_path / "model_final_abcdef.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert forbidden in str(ei.value)
    assert "\n" not in str(ei.value)
    assert not target.exists()


def test_codecs_encode_only_latin1(tmp_path):
    p = tmp_path / "c.pkl"
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(CheckpointError, match="latin1"):
        load_checkpoint(p)


@pytest.mark.parametrize("content", [b"", b"garbage, not a pickle", b"\x80\x02}q\x00(X\x05"])
def test_garbage_and_truncated_files(tmp_path, content):
    p = tmp_path / "bad.pkl"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint") as ei:
        load_checkpoint(p)
    assert "\n" not in str(ei.value)


def test_truncated_real_checkpoint(tmp_path):
    raw = detectron2_pickle(weights())
    p = tmp_path / "cut.pkl"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)


def test_not_a_weights_dict(tmp_path):
    p = tmp_path / "list.pkl"
    p.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(p)
    p.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "iteration": 5}}, protocol=2))
    with pytest.raises(CheckpointError, match="iteration"):
        load_checkpoint(p)
    p.write_bytes(pickle.dumps({"model": {"w": np.array(["a"], dtype=object)}}, protocol=2))
    with pytest.raises(CheckpointError, match="dtype object"):
        load_checkpoint(p)
    p.write_bytes(pickle.dumps({"__author__": "x"}, protocol=2))
    with pytest.raises(CheckpointError, match="no weight arrays"):
        load_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pkl")


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_pth_weights_only(tmp_path, wrap):
    sd = {k: torch.from_numpy(v) for k, v in weights().items()}
    p = tmp_path / "w.pth"
    torch.save(sd if wrap is None else {wrap: sd, "iteration": 90000}, p)
    assert_same(load_checkpoint(p), weights())


def test_torch_zip_detected_by_content(tmp_path):
    p = tmp_path / "actually_torch.pkl"
    torch.save({"model": {"w": torch.ones(3)}}, p)
    assert load_checkpoint(p)["w"].tolist() == [1.0, 1.0, 1.0]


def test_pth_with_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": Evil(str(target), "system")}, p)
    with pytest.raises(CheckpointError, match="weights-only") as ei:
        load_checkpoint(p)
    assert "\n" not in str(ei.value)
    assert not target.exists()


def test_whole_pickled_model_says_to_save_the_state_dict(tmp_path):
    p = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), p)
    with pytest.raises(CheckpointError, match=r"torch.save\(model.state_dict\(\), path\)") as ei:
        load_checkpoint(p)
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value)


def test_damage_advice_depends_on_where_the_file_is(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "cache"))
    for where, advice in [(tmp_path / "mine.pkl", "check that it is"),
                          (tmp_path / "cache" / "detectron2" / "x" / "model_final_abcdef.pkl", "zoo download")]:
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(b"garbage, not a pickle")
        with pytest.raises(CheckpointError, match=advice):
            load_checkpoint(where)


def test_truncated_pth(tmp_path):
    p = tmp_path / "cut.pth"
    torch.save({"w": torch.ones(1000)}, p)
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)


class Bomb:
    """A few bytes that would make numpy allocate far more than the file holds."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):
        from numpy._core import multiarray

        if self.how == "ndarray":
            return np.ndarray, ((10**12,), "f8")
        if self.how == "reconstruct":
            return multiarray._reconstruct, (np.ndarray, (10**12,), b"b")
        return multiarray.scalar, (np.dtype("V1000000000"),)


@pytest.mark.parametrize("how", ["ndarray", "reconstruct", "scalar"])
def test_allocation_bombs_are_refused(tmp_path, how):
    p = tmp_path / "bomb.pkl"
    p.write_bytes(pickle.dumps({"model": {"w": Bomb(how)}}, protocol=2))
    assert p.stat().st_size < 300
    with pytest.raises(CheckpointError, match="refus"):
        load_checkpoint(p)


def test_python2_style_scalar(tmp_path):
    # Python 2 wrote a scalar's payload as a byte string, which reads back latin1-decoded
    p = tmp_path / "py2_scalar.pkl"
    payload = struct.pack("<f", 2.5).decode("latin1")
    raw = (b"\x80\x02}q\x00X\x01\x00\x00\x00sq\x01cnumpy.core.multiarray\nscalar\nq\x02cnumpy\ndtype\nq\x03"
           b"X\x02\x00\x00\x00f4q\x04K\x00K\x01\x87q\x05Rq\x06(K\x03X\x01\x00\x00\x00<q\x07NNNJ\xff\xff\xff\xff"
           b"J\xff\xff\xff\xffK\x00tq\x08bU\x04" + payload.encode("latin1") + b"q\t\x86q\nRq\x0bs.")
    p.write_bytes(raw)
    assert load_checkpoint(p)["s"].item() == 2.5
