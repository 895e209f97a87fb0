"""predict_iter: images read ahead on threads, batched by padded shape, results in input order, bounded memory;
and the three helpers it is made of (zoo.modeling.streaming)."""
from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from user_support import fixture_image, small_synthetic_model
from zoo.errors import InputError
from zoo.modeling.streaming import group_batches, in_input_order, read_ahead


class Counting:
    """An iterator over `items` that counts how many were taken (predict_iter must take them lazily)."""

    def __init__(self, items):
        self.items, self.taken = list(items), 0

    def __iter__(self):
        for x in self.items:
            self.taken += 1
            yield x


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("zoo-read")]


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize("workers", [0, 3])
def test_read_ahead_keeps_order_and_reads_only_depth_ahead(workers):
    src = Counting(range(20))
    names = set()

    def slow_square(x):
        names.add(threading.current_thread().name)
        time.sleep(0.002 * (x % 3))  # later items may finish first
        return x * x

    out = []
    for i, r in read_ahead(src, slow_square, workers, depth=4):
        assert src.taken <= i + 4  # never more than depth ahead of what was handed out
        out.append((i, r))
    assert out == [(i, i * i) for i in range(20)]
    assert all(n.startswith("zoo-read") for n in names) if workers else names == {"MainThread"}
    assert not _reader_threads()


def test_read_ahead_raises_at_the_failing_item_and_stops_its_threads():
    def fn(x):
        if x == 5:
            raise ValueError("bad item 5")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 5"):
        for _, r in read_ahead(range(10), fn, 2, depth=3):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]
    assert not _reader_threads()


def test_read_ahead_closed_early_cancels_queued_work():
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.01)
        return x

    gen = read_ahead(range(1000), fn, 2, depth=8)
    assert next(gen) == (0, 0)
    gen.close()
    n = len(calls)
    assert n <= 10 and not _reader_threads()  # what was queued never ran
    time.sleep(0.05)
    assert len(calls) == n


def test_group_batches_fills_batches_and_bounds_what_it_holds():
    keys = "AABACBBCAAAAC"
    src = Counting(enumerate(keys))
    seen, batches = [], []
    for b in group_batches(src, key=lambda k: k, batch_size=2, window=3):
        held = src.taken - sum(len(x) for x in batches)
        assert held <= 3  # never more than window items waiting
        assert len({k for _, k in b}) == 1 and 1 <= len(b) <= 2
        assert [i for i, _ in b] == sorted(i for i, _ in b)
        batches.append(b)
        seen.extend(i for i, _ in b)
    assert sorted(seen) == list(range(len(keys)))
    # the first two A's leave together; then each time 3 wait (B2 A3 C4, then A3 C4 B5), the batch holding the
    # oldest leaves part full
    assert [[i for i, _ in b] for b in batches][:3] == [[0, 1], [2], [3]]


def test_group_batches_with_room_for_everything_is_one_batch_per_key():
    batches = list(group_batches(enumerate("ABAB"), key=lambda k: k, batch_size=99, window=99))
    assert [[i for i, _ in b] for b in batches] == [[0, 2], [1, 3]]


def test_in_input_order():
    assert list(in_input_order([(2, "c"), (0, "a"), (1, "b"), (3, "d")])) == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="indices"):
        list(in_input_order([(1, "b")]))


# ---------------------------------------------------------------- predict_iter


@pytest.fixture(scope="module")
def model():
    return small_synthetic_model("faster_rcnn_R_50_FPN_3x")


def _images():
    g = fixture_image("grace_hopper")
    return [g, fixture_image("scene_427x640"), np.ascontiguousarray(g[::-1]), fixture_image("wide_300x1400"),
            np.ascontiguousarray(g[:, ::-1])]


def _same(a, b):
    assert a.image_size == b.image_size
    assert torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def test_predict_iter_equals_predicting_each_image_alone(model):
    images = _images()
    singles = [model.predict(im) for im in images]
    src = Counting(images)
    calls = []
    forward = model.forward
    model.forward = lambda t, s: (calls.append(t.shape[0]), forward(t, s))[1]
    try:
        out = list(model.predict_iter(src, batch_size=2))
    finally:
        del model.forward
    assert len(out) == len(images) and src.taken == len(images)
    assert sorted(calls) == [1, 1, 1, 2]  # the three same-shaped images: one batch of two, one alone
    for s, d in zip(singles, out):
        _same(s, d)
        assert not d.boxes.is_inference()  # plain tensors, as predict returns


@pytest.mark.parametrize("fast_convs", [False, True])
def test_one_model_serves_several_threads(fast_convs):
    # a server shares one model between request threads; a fresh one, so that the threads' first calls also race
    # to lay the weights out (channels-last and folded norms with fast_convs)
    shared = small_synthetic_model("faster_rcnn_R_50_FPN_3x")
    shared.fast_convs = fast_convs
    images = _images()[:4]
    start = threading.Barrier(len(images))

    def serve(image):
        start.wait()
        return [shared.predict(image) for _ in range(2)]

    with ThreadPoolExecutor(len(images)) as pool:
        served = list(pool.map(serve, images))
    for image, results in zip(images, served):
        alone = shared.predict(image)
        for d in results:
            _same(alone, d)


def test_predict_iter_over_nothing_yields_nothing(model):
    assert list(model.predict_iter([])) == [] and list(model.predict_iter(iter(()), batch_size=4)) == []
    assert not _reader_threads()


def test_predict_iter_takes_images_lazily(model):
    src = Counting(_images() * 4)
    it = model.predict_iter(src, batch_size=1, window=2, workers=2)
    next(it)
    assert src.taken <= 4  # read ahead by at most about the window, not the whole input
    it.close()
    assert not _reader_threads()


def test_predict_iter_reports_a_bad_image_when_its_turn_comes(model, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    images = _images()[:2] + [bad] + _images()[2:]
    got = []
    with pytest.raises(InputError, match="broken.jpg"):
        for d in model.predict_iter(images, batch_size=1):
            got.append(d)
    assert len(got) == 2
    assert not _reader_threads()


@pytest.mark.parametrize("kwargs, needle", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"workers": -1}, "workers must be a non-negative integer"),
    ({"window": 0}, "window must be a positive integer"),
    ({"batch_size": 2.0}, "batch_size must be a positive integer"),
])
def test_predict_iter_checks_its_arguments_at_the_call(model, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        model.predict_iter(_images(), **kwargs)


@pytest.mark.parametrize("kind", ["array", "tensor"])
def test_predict_iter_copes_with_a_caller_that_reuses_one_buffer(model, kind):
    # a video reader may fill one buffer again and again; images are taken ahead of the network, so each must
    # be read before the buffer changes
    g = _images()[0]
    frames = [g, g[:, ::-1], g[::-1]]  # one shape, three pictures
    buffer = np.empty_like(g)
    if kind == "tensor":  # uint8 3xHxW, as torchvision reads images
        frames = [torch.from_numpy(np.array(f)).permute(2, 0, 1).contiguous() for f in frames]
        buffer = torch.empty_like(frames[0])
        _same(model.predict(g), model.predict(frames[0]))

    def reader():
        for f in frames:
            buffer[...] = f
            yield buffer

    got = list(model.predict_iter(reader(), window=3, workers=2))
    for f, d in zip(frames, got):
        _same(model.predict(f), d)


def test_predict_iter_reads_a_reused_buffer_already_at_the_network_size(model):
    # an array at the network's size is not resized, and prepare hands its memory on without a copy; a batch of
    # three waits for its third image, so without predict_iter's own copy all three would read the last frame
    from zoo.modeling.transforms import resized_size

    g = fixture_image("grace_hopper")
    base = np.array(model.prepare(g).tensor.permute(1, 2, 0))  # grace_hopper at the network's size
    assert base.shape[:2] == resized_size(*g.shape[:2], model.min_size_test, model.max_size_test) != g.shape[:2]
    frames = [base, np.ascontiguousarray(base[:, ::-1]), np.ascontiguousarray(base[::-1])]
    shared = model.prepare(frames[0]).tensor
    assert shared.data_ptr() == frames[0].ctypes.data  # no host copy
    buffer = np.empty_like(base)

    def reader():
        for f in frames:
            buffer[...] = f
            yield buffer

    want = [model.predict(f) for f in frames]
    assert not torch.equal(want[0].boxes, want[1].boxes)
    for workers in (0, 2):
        got = list(model.predict_iter(reader(), batch_size=3, window=3, workers=workers))
        for a, b in zip(want, got):
            _same(a, b)


def test_predict_starts_reader_threads_only_where_there_is_reading_to_do(model, monkeypatch):
    from zoo.modeling import streaming

    calls = []
    real = streaming.read_ahead
    monkeypatch.setattr(streaming, "read_ahead", lambda items, fn, workers, depth: calls.append(workers) or
                        real(items, fn, workers, depth))
    g = fixture_image("grace_hopper")
    sized = np.array(model.prepare(g).tensor.permute(1, 2, 0))  # already at the network's size: nothing to read
    a = model.predict([sized, sized[::-1].copy()])
    b = model.predict([sized, g])  # grace_hopper itself needs a resize
    assert calls == [0, 2]
    _same(a[0], b[0])


def test_prepare_takes_read_only_arrays_quietly(model):
    g = fixture_image("grace_hopper")
    frozen = np.array(g)
    frozen.flags.writeable = False  # as numpy.asarray(PIL image) gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on read-only arrays
        _same(model.predict(frozen), model.predict(g))


def test_predict_iter_can_yield_errors_in_place_and_go_on(model, tmp_path):
    """errors="yield": an unreadable image's InputError comes in its place, in order, and the others are predicted
    exactly as without it (batched around the gap)."""
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = _images()
    images = good[:2] + [bad, tmp_path / "missing.png"] + good[2:]
    want = list(model.predict_iter(good, batch_size=2))
    got = list(model.predict_iter(images, batch_size=2, errors="yield"))
    assert len(got) == len(images)
    assert isinstance(got[2], InputError) and "broken.jpg" in str(got[2])
    assert isinstance(got[3], InputError) and "missing.png" in str(got[3])
    for a, b in zip(want, got[:2] + got[4:]):
        _same(a, b)
    assert not _reader_threads()
    with pytest.raises(InputError, match="errors must be 'raise' or 'yield'"):
        model.predict_iter(images, errors="skip")
