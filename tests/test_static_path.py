"""The fixed-shape inference path (GeneralizedRCNN.static_shapes, the default on CUDA).

- It gives the dynamic path's detections (bit-exact on CPU), for one image and for a batch, and an
  image whose fixed-capacity NMS cannot guarantee exactness is recomputed with the dynamic path.
- From image tensor to compacted detections it makes no host synchronisation: checked on CPU by a
  TorchFunctionMode that records every op that would synchronise with a GPU (reading a value, a
  data-dependent shape), while the Triton kernels run in the interpreter. The CUDA tests at the end
  repeat the check with torch's own sync debug mode and cover CUDA graphs (they skip without CUDA).
"""
from __future__ import annotations

import functools
import os
import random
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

# the interpreter must be chosen before triton is first imported (see test_kernels_triton.py)
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import zoo  # noqa: E402
from zoo import ops  # noqa: E402
from zoo.modeling import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from interpreter_support import require_working_interpreter  # noqa: E402
from user_support import fixture_image as _image  # noqa: E402
from user_support import small_synthetic_model, top_matched  # noqa: E402


def _assert_same(a, b, mask_pixels: float = 0.0):
    """Identical detections; `mask_pixels` > 0 lets that share of mask pixels differ."""
    assert a.image_size == b.image_size
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None:
        if mask_pixels:
            assert a.masks.shape == b.masks.shape
            assert (a.masks != b.masks).float().mean().item() <= mask_pixels
        else:
            assert torch.equal(a.masks, b.masks)


@pytest.fixture(scope="module")
def mask_c4():
    return small_synthetic_model("mask_rcnn_R_50_C4_1x")


@pytest.fixture(scope="module")
def mask_fpn():
    return small_synthetic_model("mask_rcnn_R_50_FPN_3x")


@pytest.mark.parametrize("which", ["mask_fpn", "mask_c4"])
def test_static_equals_dynamic(request, which, monkeypatch):
    monkeypatch.setenv("ZOO_OPS", "torch")
    m = request.getfixturevalue(which)
    # a batch of two same-sized images, plus (FPN) a third size; C4 is slow on CPU (its res5 head runs on every
    # proposal), so just the batch, with 300 proposals per image instead of 1000
    images = [_image("grace_hopper"), _image("grace_hopper")[:, ::-1].copy()]
    if which == "mask_c4":
        monkeypatch.setattr(m.proposal_generator, "post_nms_topk", 300)
    if which == "mask_fpn":
        images.append(_image("scene_427x640"))
    out = {}
    for static in (False, True):
        m.static_shapes = static
        out[static] = m.predict(images)
        if which == "mask_fpn":  # one batch of mixed sizes (Detectron2's batching)
            out[static] += m.predict(images, exact=False)
    m.static_shapes = None
    assert len(out[False][0]) > 0
    for a, b in zip(out[False], out[True]):
        _assert_same(a, b)


def test_incomplete_nms_is_recomputed_exactly(mask_fpn, monkeypatch):
    monkeypatch.setenv("ZOO_OPS", "torch")
    m = mask_fpn
    m.static_shapes = False
    want = m.predict(_image("grace_hopper"))
    m.static_shapes = True
    monkeypatch.setattr(m.roi_heads, "static_nms_capacity", 8)
    with torch.inference_mode():
        batch = m.preprocess([_image("grace_hopper")])
        _, _, inst = m.run_static(batch.tensor, batch.image_sizes)
    assert not bool(inst.complete.all())  # 8 candidates cannot yield 100 detections
    got = m.predict(_image("grace_hopper"))
    m.static_shapes = None
    assert len(want) > 8
    _assert_same(want, got)


def test_default_is_static_on_cuda_only(mask_fpn):
    assert mask_fpn.static_shapes is None
    assert mask_fpn.uses_static_shapes(torch.device("cuda"))
    assert not mask_fpn.uses_static_shapes(torch.device("cpu"))


def test_get_sets_and_checks_the_inference_options():
    m = zoo.get("faster_rcnn_R_50_FPN_3x", pretrained=False, device="cpu", static_shapes=True)
    assert m.static_shapes is True and m.cuda_graphs is False and m.uses_static_shapes(m.device)
    with pytest.raises(zoo.errors.InputError, match="cuda_graphs needs a CUDA device"):
        zoo.get("faster_rcnn_R_50_FPN_3x", pretrained=False, device="cpu", cuda_graphs=True)


def test_graph_key_follows_shape_precision_settings_and_in_place_weight_changes(mask_fpn):
    from zoo.modeling.graphs import GraphCache

    cache = GraphCache(mask_fpn)
    with torch.inference_mode():
        a = mask_fpn.preprocess([_image("grace_hopper")])
        b = mask_fpn.preprocess([_image("grace_hopper")[:-7, :-5].copy()])  # same padded shape
        c = mask_fpn.preprocess([_image("scene_427x640")])
    assert cache._key(mask_fpn, a) == cache._key(mask_fpn, b) != cache._key(mask_fpn, c)
    key = cache._key(mask_fpn, a)
    mask_fpn.precision = "bf16"
    assert cache._key(mask_fpn, a) != key
    mask_fpn.precision = "fp32"
    old = mask_fpn.roi_heads.score_thresh
    mask_fpn.roi_heads.score_thresh = 0.3  # a setting a capture bakes in
    assert cache._key(mask_fpn, a) != key
    mask_fpn.roi_heads.score_thresh = old
    assert cache._key(mask_fpn, a) == key
    with torch.no_grad():
        mask_fpn.backbone.bottom_up.stem.conv1.norm.running_mean.add_(0)  # an in-place load bumps versions
    assert cache._key(mask_fpn, a) != key


def _as_is(out):
    """GraphCache.run's `take` for tests that read the graph's own buffers."""
    return out


def _eager_capture(on_capture=lambda images: None, replay=lambda: None):
    """A stand-in for GraphCache._capture (which needs CUDA): the "graph" holds the eager outputs of the capturing
    call, replays call `replay`, and each capture first calls `on_capture` with its images."""
    def capture(self, model, images, sizes):
        on_capture(images)
        out = model.compact_static(model.run_static(images, sizes)[2], sizes)
        return SimpleNamespace(replay=replay), images.clone(), sizes.clone(), out

    return capture


def test_graph_cache_captures_a_signature_on_its_second_use(monkeypatch):
    # the capture itself needs CUDA (test_cuda_* below); here a stand-in records when the cache asks for one
    from zoo.modeling.graphs import GraphCache

    captures, replays = [], []
    capture = _eager_capture(lambda images: captures.append(tuple(images.shape)), lambda: replays.append(1))
    monkeypatch.setattr(GraphCache, "_capture", capture)
    m = _tiny("mask_rcnn_R_50_FPN_3x")  # three padded shapes of these images at its 64-96 px input
    cache = GraphCache(m, max_graphs=2)
    with torch.inference_mode():
        a, b, c = (m.preprocess([_image(n)]) for n in ("grace_hopper", "scene_427x640", "wide_300x1400"))
        shape = {id(x): tuple(x.tensor.shape) for x in (a, b, c)}
        assert len(set(shape.values())) == 3
        want = m.compact_static(m.run_static(a.tensor, m.size_table(a))[2], a)
        assert int(want.counts.sum()) > 0  # detections to compare
        runs = [cache.run(m, x, _as_is) for x in (a, a, a, b, c, b)]
        # a: eager, captured + replayed, replayed; b: eager; c: eager; b: captured + replayed
        assert captures == [shape[id(a)], shape[id(b)]] and len(replays) == 3
        for got in runs[:3]:
            assert torch.equal(got.boxes, want.boxes) and torch.equal(got.counts, want.counts)
        cache.run(m, c, _as_is)  # c's second use, the cache full: c has not been used more than b (2 uses)
        assert len(cache) == 2 and len(captures) == 2
        assert cache.stats == {"replays": 3, "eager": 4, "captures": 2, "evictions": 0}
        for _ in range(3):  # c: 3, 4, 5 uses; b held with 2, so c's 5th use displaces b
            cache.run(m, c, _as_is)
        assert captures[-1] == shape[id(c)] and len(captures) == 3 and cache.stats["evictions"] == 1
        cache.run(m, b, _as_is)  # b's graph is gone and its count went with its capture: eager again
        assert len(captures) == 3 and cache.stats["eager"] == 7 and len(replays) == 4
        assert m.cuda_graph_stats() == dict.fromkeys(["graphs", "replays", "eager", "captures", "evictions"], 0)
        m._graph_cache = cache  # as _detect_unpasted() keeps it
        assert m.cuda_graph_stats() == {"graphs": 2, "replays": 4, "eager": 7, "captures": 3, "evictions": 1}
        m.clear_cuda_graphs()

        captures.clear()
        forgetful = GraphCache(m, max_seen=2)  # counts for the 2 latest signatures only
        for x in (a, b, c, a):  # c's count pushes out a's, so a's second use counts as its first
            forgetful.run(m, x, _as_is)
        assert captures == []
        forgetful.run(m, a, _as_is)
        assert captures == [shape[id(a)]]


def test_a_graph_keeps_the_cached_tensors_it_reads(monkeypatch):
    # a CUDA graph records addresses: the grid anchors (a cache of 17 shapes) and folded conv weights (refolded on a
    # precision change) it read must stay allocated while it is held, or a replay reads freed, reused memory
    from zoo.modeling.graphs import GraphCache
    from zoo.modeling.layers import Conv2d

    monkeypatch.setattr(GraphCache, "_capture", _eager_capture())
    m = _tiny("mask_rcnn_R_50_FPN_3x")
    m.fast_convs = True  # folded copies, as on CUDA
    cache = GraphCache(m)
    with torch.inference_mode():
        a = m.preprocess([_image("grace_hopper")])
        m._lay_out_convs(a.tensor.device)  # as _detect_unpasted does first: the layout change moves the weights
        for _ in range(2):  # the second use captures
            cache.run(m, a, _as_is)
    (held,) = cache._graphs.values()
    anchors = m.proposal_generator.anchor_generator.cached_tensors()
    folded = [t for c in m.modules() if isinstance(c, Conv2d) and c.norm is not None for t in c.cached_tensors()]
    assert anchors and len(folded) >= 2 * 50  # weight and bias of every folded conv of the backbone
    kept = {id(t) for t in held.keep}
    assert all(id(t) in kept for t in anchors + folded)


class _ShapeStream:
    """Stand-in model and capture for GraphCache's bookkeeping alone: a batch is its shape's name, a run is
    "eager" or "graph", no network."""

    def parameters(self):
        return iter(())

    buffers = parameters

    def tensors_in_caches(self):
        return []

    def size_table(self, batch):
        return torch.zeros(1)

    def run_static(self, images, sizes):
        return None, None, None

    def compact_static(self, raw, sizes):
        return "eager"


def _stream_cache(**kw):
    from zoo.modeling.graphs import GraphCache

    class Cache(GraphCache):
        def _key(self, model, batch):
            return batch.shape_name, getattr(batch, "versions", ())

        def _capture(self, model, images, sizes):
            return SimpleNamespace(replay=lambda: None), torch.zeros(1), torch.zeros(1), "graph"

    return Cache(_ShapeStream(), **kw)


def _play(cache, names, versions=()):
    model = _ShapeStream()
    return [cache.run(model, SimpleNamespace(shape_name=n, tensor=torch.zeros(1), versions=versions), _as_is)
            for n in names]


def test_graph_cache_does_not_thrash_on_more_shapes_than_slots():
    # COCO-like input pads to dozens of shapes; plain LRU with capture on the second use recaptured (about
    # three forward passes each) on ~40% of the calls of a uniform 36-shape stream
    rng = random.Random(0)
    uniform = _stream_cache()
    _play(uniform, [rng.randrange(36) for _ in range(2000)])
    st = uniform.stats
    assert st["captures"] <= 0.05 * 2000 and st["replays"] >= 0.15 * 2000, st

    # a few shapes carry most images: those keep their graphs, the rare ones run eagerly
    skewed = _stream_cache()
    names = [rng.randrange(6) if rng.random() < 0.7 else 6 + rng.randrange(34) for _ in range(2000)]
    _play(skewed, names)
    assert set(range(6)) <= {name for name, _ in skewed._graphs}, list(skewed._graphs)
    assert skewed.stats["replays"] >= 0.65 * 2000 and skewed.stats["captures"] <= 0.03 * 2000, skewed.stats

    # the mix changes: counts halve as they age, so the new shapes take over the slots
    shifting = _stream_cache()
    _play(shifting, [rng.randrange(8) for _ in range(1000)] + [100 + rng.randrange(8) for _ in range(1000)])
    assert {name for name, _ in shifting._graphs} == set(range(100, 108))

    # no more shapes than slots: each captured once, on its second use, and never dropped
    few = _stream_cache()
    out = _play(few, [0, 1, 0, 2, 1, 0] + [rng.randrange(8) for _ in range(500)])
    assert out[:6] == ["eager", "eager", "graph", "eager", "graph", "graph"]
    assert few.stats["captures"] == 8 and few.stats["evictions"] == 0 and few.stats["eager"] == 8

    # weights changed in place (their versions are in every key): the held graphs can never match again, so they
    # go at once instead of holding their slots until their counts decay
    assert _play(few, [0, 0], versions=(1,)) == ["eager", "graph"] and len(few) == 1


def test_graph_cache_lets_one_thread_at_a_time_between_replay_and_copy():
    # a server may share one model between threads: another thread's replay must not overwrite a graph's buffers
    # before the caller that replayed it has copied its outputs (the stand-in graph widens that window)
    from zoo.modeling.graphs import GraphCache

    class Model(_ShapeStream):
        def run_static(self, images, sizes):
            return None, None, images

        def compact_static(self, raw, sizes):
            return raw.clone()

    class Cache(GraphCache):
        def _key(self, model, batch):
            return "one shape", ()

        def _capture(self, model, images, sizes):
            static_in, out = images.clone(), torch.zeros_like(images)

            def replay():
                time.sleep(0.001)
                out.copy_(static_in)

            return SimpleNamespace(replay=replay), static_in, sizes.clone(), out

    def copy_slowly(out):
        time.sleep(0.001)
        return out.clone()

    cache, model = Cache(Model()), Model()

    def serve(worker):
        inputs = [float(1000 * worker + i) for i in range(30)]
        got = [cache.run(model, SimpleNamespace(tensor=torch.tensor([v])), copy_slowly).item() for v in inputs]
        return got == inputs

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(serve, range(4)))
    assert cache.stats["replays"] + cache.stats["eager"] == 120 and cache.stats["replays"] > 100, cache.stats


def test_load_state_dict_drops_graphs_and_layout():
    # assign=True replaces the tensors, which their versions do not show: graphs captured before would replay the
    # old weights, and the new ones arrive in the state dict's memory format
    m = _tiny("mask_rcnn_R_50_FPN_3x")
    m.fast_convs = True
    img = _image("grace_hopper")
    before = m.predict(img)
    assert m._convs_laid_out_fast is True
    m._graph_cache = object()  # stands for captured graphs (a real capture needs CUDA)
    m.load_state_dict({k: v.clone().contiguous() for k, v in m.state_dict().items()}, assign=True)
    assert m._graph_cache is None and m._convs_laid_out_fast is None
    _assert_same(before, m.predict(img))
    assert m.backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_copies_start_without_graphs(mask_fpn):
    import copy
    import pickle

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("a captured graph cannot be copied")

    mask_fpn._graph_cache = Unpicklable()
    try:
        assert copy.deepcopy(mask_fpn)._graph_cache is None
        assert pickle.loads(pickle.dumps(mask_fpn))._graph_cache is None
        assert mask_fpn._graph_cache is not None  # the original keeps its graphs
    finally:
        mask_fpn.clear_cuda_graphs()
    assert mask_fpn._graph_cache is None


# ---------------------------------------------------------------------------------------------- host syncs

_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "equal",
          "allclose", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}


_FROM_HOST = {"tensor", "as_tensor", "new_tensor", "from_numpy"}


def _is_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _is_host_index(idx) -> bool:
    """A list index becomes a tensor copied from the host."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, list) for i in items)


class SyncRecorder(TorchFunctionMode):
    """Records torch calls that would make the host wait for a GPU: reading values back, shapes that
    depend on values (boolean indexing, nonzero, ...) or tensors made from host data (a copy from
    pageable memory, which also cannot be captured in a CUDA graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.suspended = 0

    def _syncs(self, name: str, args, kwargs) -> bool:
        if name in _READS:
            return True
        if name in _FROM_HOST:
            return True
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            return _is_bool_index(args[1]) or _is_host_index(args[1])
        if name == "repeat_interleave":
            reps = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(reps, torch.Tensor) and kwargs.get("output_size") is None
        if name == "to":  # an explicit "cpu" target; a device taken from a tensor here is the CPU anyway
            return any(isinstance(a, str) and a.startswith("cpu") for a in (*args[1:], *kwargs.values()))
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if not self.suspended and self._syncs(name, args, kwargs):
            where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack()
                     if f"{os.sep}zoo{os.sep}" in f.filename]
            self.calls.append(f"{name} at {' <- '.join(reversed(where[-3:]))}")
        return func(*args, **kwargs)


def require_recorder_sees_indexing() -> None:
    """Skip where TorchFunctionMode misses Tensor.__getitem__ (torch 2.1's does, 2.4's sees it): there the
    recorder would pass code that indexes with booleans."""
    seen = []

    class Probe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    t = torch.arange(3)
    with Probe():
        t[t > 1]
    if "__getitem__" not in seen:
        pytest.skip(f"torch {torch.__version__}'s TorchFunctionMode does not see Tensor.__getitem__, so the sync "
                    "recorder would miss boolean indexing; run these with torch >= 2.4")


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """zoo.kernels in the interpreter, with a hook that pauses a SyncRecorder during kernel launches
    (the interpreter copies arguments to numpy; on a GPU a launch is asynchronous)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (CPU-only host); on CUDA "
                    "tests/test_kernels_gpu.py checks syncs with torch.cuda.set_sync_debug_mode")
    pytest.importorskip("triton")
    require_recorder_sees_indexing()
    from triton.runtime.interpreter import InterpretedFunction

    require_working_interpreter()

    recorder = SyncRecorder()
    run = InterpretedFunction.run

    def paused_run(self, *args, **kwargs):
        recorder.suspended += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            recorder.suspended -= 1

    monkeypatch.setattr(InterpretedFunction, "run", paused_run)
    monkeypatch.setenv("ZOO_OPS", "triton")
    return recorder


def _tiny(name: str):
    """`name`'s layout, narrow and small, with few proposals, random weights, scores biased so that a
    few classes pass the test threshold: the interpreter runs it in seconds."""
    arch = zoo.get_manifest(name).architecture
    rh = arch.roi_heads
    up = {"input": arch.input.model_copy(update={"min_size_test": 64, "max_size_test": 96}),
          "resnet": arch.resnet.model_copy(update={"stem_out_channels": 8, "res2_out_channels": 16,
                                                   "width_per_group": 4}),
          "rpn": arch.rpn.model_copy(update={"pre_nms_topk_test": 40, "post_nms_topk_test": 12}),
          "roi_heads": rh.model_copy(update={
              "detections_per_image": 6, "num_classes": 5,
              "box_head": rh.box_head.model_copy(update={"fc_dim": 32}),
              "mask_head": rh.mask_head.model_copy(update={"conv_dim": 8})})}
    if arch.fpn is not None:
        up["fpn"] = arch.fpn.model_copy(update={"out_channels": 16})
    m = build_model(arch.model_copy(update=up))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        m.roi_heads.box_predictor.cls_score.bias[:3] = 6.0
    return m


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy 0/0 in the kernels' padded lanes
@pytest.mark.parametrize("name", ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_1x"])
@pytest.mark.parametrize("fast_convs", [False, True])  # True: channels-last maps and pooled ROIs, as on CUDA
def test_static_path_never_syncs(interpreted_kernels, name, fast_convs):
    m = _tiny(name)
    m.fast_convs = fast_convs
    m.static_shapes = True
    gen = torch.Generator().manual_seed(1)
    images = [(torch.rand(48, 64, 3, generator=gen) * 255).to(torch.uint8).numpy() for _ in range(2)]
    pooled = []  # layouts of the pooled ROIs: (channels-last, contiguous) per pooler call
    for pooler in (p for p in m.roi_heads.modules() if type(p).__name__ == "ROIPooler"):
        pooler.register_forward_hook(lambda mod, args, out: pooled.append(
            (mod.memory_format, out.is_contiguous(memory_format=torch.channels_last), out.is_contiguous())))
    with torch.inference_mode():
        batch = m.preprocess(images)
        sizes = m.size_table(batch)  # as GraphCache.run: made from host data before the captured part
        with interpreted_kernels:
            _, _, inst = m.run_static(batch.tensor, sizes)
            final = m.compact_static(inst, sizes)
    assert interpreted_kernels.calls == [], "\n".join(interpreted_kernels.calls)
    # the FPN's FC box head gets NCHW rows to flatten (no copy); conv consumers get the maps' layout
    want_box = (torch.contiguous_format, False, True)
    want_conv = (None, fast_convs, not fast_convs)
    assert pooled == ([want_box, want_conv] if "FPN" in name else [want_conv, want_conv]), pooled
    assert bool(inst.complete.all()) and final.counts.tolist() == [6, 6]
    got = m.predict(images)

    m.static_shapes = False
    os.environ["ZOO_OPS"] = "torch"  # restored by the fixture's monkeypatch
    want = m.predict(images)
    for a, b in zip(want, got):
        assert a.image_size == b.image_size and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
        assert (a.masks != b.masks).float().mean() < 1e-3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflow_guard_keeps_the_static_path_sync_free(interpreted_kernels, monkeypatch):
    # fp16's guard (here under bf16, guarded for the test: fp16 runs on CUDA only) folds its finite checks into
    # `complete` on device; an inf makes the image incomplete without a host round trip
    from zoo.modeling import overflow

    monkeypatch.setattr(overflow, "GUARDED_PRECISIONS", frozenset({"bf16"}))
    m = _tiny("mask_rcnn_R_50_FPN_3x")
    m.precision = "bf16"
    img = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    completes = []
    with torch.inference_mode():
        batch = m.preprocess([img])
        sizes = m.size_table(batch)
        for inf in (False, True):
            handle = m.roi_heads.box_head.register_forward_hook(  # what the box predictor reads
                lambda mod, args, out: out + float("inf") if inf else None)
            with interpreted_kernels:
                _, _, inst = m.run_static(batch.tensor, sizes)
            handle.remove()
            completes.append(inst.complete.tolist())
    assert interpreted_kernels.calls == [], "\n".join(interpreted_kernels.calls)
    assert completes == [[True], [False]]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_static_path_with_nothing_detected(interpreted_kernels):
    # no class clears the threshold: empty results from the kernels' all-invalid case, as on the dynamic path
    m = _tiny("mask_rcnn_R_50_FPN_3x")
    m.roi_heads.score_thresh = 1.0
    img = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    m.static_shapes = True
    got = m.predict(img)
    m.static_shapes = False
    os.environ["ZOO_OPS"] = "torch"  # restored by the fixture's monkeypatch
    want = m.predict(img)
    assert len(got) == len(want) == 0
    assert got.boxes.shape == (0, 4) and got.masks.shape == (0, 40, 56) and got.image_size == want.image_size


def test_recorder_catches_syncs():
    require_recorder_sees_indexing()
    rec = SyncRecorder()
    t = torch.arange(6)
    with rec:
        t[t > 2]
        bool(t.sum())
        t.nonzero()
        t.to("cpu")
        t.to(t.device)  # not a move
        idx = torch.arange(1, 3)
        t[idx]  # integer indexing stays on device
        torch.where(t > 2, t, 0)
        t[[1, 2]]
        t.new_tensor([1, 2])
    assert [c.split()[0] for c in rec.calls] == ["__getitem__", "__bool__", "nonzero", "to", "__getitem__",
                                                  "new_tensor"]


# ---------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU session runs these)")


@cuda
@pytest.mark.parametrize("name", ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_1x"])
def test_cuda_static_path_never_syncs(name):
    m = _tiny(name).cuda()
    m.static_shapes = True
    gen = torch.Generator().manual_seed(1)
    images = [(torch.rand(48, 64, 3, generator=gen) * 255).to(torch.uint8).numpy() for _ in range(2)]
    with torch.inference_mode():
        batch = m.preprocess(images)
        # the sizes as GraphCache.run makes them: from host data, before the part that must not sync
        # (torch.tensor(..., device="cuda") itself waits for its copy)
        sizes = m.size_table(batch)
        m.compact_static(m.run_static(batch.tensor, sizes)[2], sizes)  # compile, fill caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            final = m.compact_static(m.run_static(batch.tensor, sizes)[2], sizes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert final.counts.tolist() == [6, 6]


@cuda
def test_cuda_static_equals_dynamic_and_graphs_equal_eager():
    # Masks may differ in a few pixels between calls: the mask head's transposed convolution runs a cuDNN
    # backward-data algorithm, and cuDNN does not promise those are deterministic (H100, 2026-11-27: identical
    # boxes, scores and labels, masks not bit-equal)
    same = functools.partial(_assert_same, mask_pixels=1e-4)
    m = small_synthetic_model("mask_rcnn_R_50_FPN_3x").cuda()
    images = [_image("grace_hopper"), _image("grace_hopper")[:, ::-1].copy(), _image("scene_427x640")]
    m.static_shapes = False
    dynamic = m.predict(images)
    m.static_shapes = True
    static = m.predict(images)
    m.cuda_graphs = True
    eager = m.predict(images)  # a signature's first use runs eagerly
    assert len(m._graph_cache) == 0
    graphs = m.predict(images)  # the second captures and replays
    assert len(m._graph_cache) == 2  # two padded input shapes
    again = m.predict(images)  # replays
    # another size that pads to the first shape replays that shape's graph with its own sizes
    cropped = images[0][:-7, :-5].copy()
    m.cuda_graphs = False
    want = m.predict(cropped)
    m.cuda_graphs = True
    got = [m.predict(cropped) for _ in range(2)]
    assert len(m._graph_cache) == 3  # batch 1 of the first shape (the first calls ran it as a batch of 2)
    same(want, got[0])
    same(want, got[1])
    got2 = m.predict([cropped, images[0]])
    assert len(m._graph_cache) == 3
    m.cuda_graphs = False
    want2 = m.predict([cropped, images[0]])  # a batch of 2 may run other cuDNN/cuBLAS algorithms than 1
    m.cuda_graphs = True
    same(want2[0], got2[0])
    same(static[0], got2[1])
    assert top_matched(want, got2[0], 20, 0.95) >= 0.95
    for d, s, e, g, a in zip(dynamic, static, eager, graphs, again):
        same(s, e)
        same(s, g)
        same(s, a)
        # dynamic vs static: GEMMs over padded vs unpadded ROI counts may pick other cuBLAS kernels
        assert torch.equal(d.labels, s.labels)
        torch.testing.assert_close(d.boxes, s.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(d.scores, s.scores, rtol=1e-4, atol=1e-5)
    m.cuda_graphs = False


@cuda
def test_cuda_predict_iter_gives_predicts_results():
    # the streaming path (reader threads, shape batches) on CUDA, eager and from graphs
    m = small_synthetic_model("mask_rcnn_R_50_FPN_3x").cuda()
    images = [_image("grace_hopper"), _image("scene_427x640"), _image("grace_hopper")[:, ::-1].copy()]
    for graphs in (False, True):
        m.cuda_graphs = graphs
        want = m.predict(images, batch_size=2)  # the same batches: both grace_hopper shapes, then the scene
        for _ in range(2):  # with graphs: the first pass captures, the second replays
            got = list(m.predict_iter(images, batch_size=2))
            for w, g in zip(want, got):
                _assert_same(w, g)
    m.cuda_graphs = False


@cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_predict_serves_threads_on_their_own_streams(graphs):
    # threads sharing one model (a server), each on its own CUDA stream; with graphs they replay one graph, and
    # without the cache's lock and its wait for the last copy a replay could overwrite another thread's outputs
    # before it copied them
    same = functools.partial(_assert_same, mask_pixels=1e-4)
    m = small_synthetic_model("mask_rcnn_R_50_FPN_3x").cuda()
    m.static_shapes, m.cuda_graphs = True, graphs
    g = _image("grace_hopper")
    images = [g, g[:, ::-1].copy(), g[::-1].copy(), g[:-7, :-5].copy()]  # one padded shape
    alone = [[m.predict(im) for _ in range(2)][-1] for im in images]  # with graphs, the shape's second use captures
    assert len(m._graph_cache or ()) == graphs

    def serve(image):
        with torch.cuda.stream(torch.cuda.Stream()):
            got = [m.predict(image) for _ in range(10)]
        torch.cuda.synchronize()
        return got

    with ThreadPoolExecutor(len(images)) as pool:
        served = list(pool.map(serve, images))
    for want, got in zip(alone, served):
        for d in got:
            same(want, d)
    assert (m.cuda_graph_stats()["replays"] >= 40) == graphs
    m.cuda_graphs = False


@cuda
def test_cuda_graphs_capture_while_other_threads_allocate():
    # in PyTorch's default capture mode another thread's cudaMalloc during a capture fails that thread's call and
    # the capture (which then falls back to eager for good): a server's first requests capture while others run
    m = small_synthetic_model("mask_rcnn_R_50_FPN_3x").cuda()
    m.static_shapes, m.cuda_graphs = True, True
    other = small_synthetic_model("faster_rcnn_R_50_FPN_3x").cuda()  # eager
    g = _image("grace_hopper")
    shapes = [g, g[:300].copy(), g[:, :400].copy(), g[:200, :300].copy()]  # four padded shapes
    done = threading.Event()

    def allocate():  # on the default stream, as a request thread would
        runs = 0
        while not done.is_set() or runs == 0:
            other.predict(g[: 100 + 37 * (runs % 9)].copy())
            # a larger block each time, so cudaMalloc runs (torch.cuda.empty_cache() would not do: PyTorch asserts
            # there that no capture is underway, in any thread)
            torch.empty((1 + runs % 128) << 20, dtype=torch.uint8, device="cuda")
            runs += 1
        return runs

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(allocate)
        try:
            got = [[m.predict(im) for _ in range(2)][-1] for im in shapes]  # each shape's second use captures
        finally:
            done.set()
        assert running.result() > 0
    assert m.cuda_graph_stats()["captures"] == 4 and not m._graph_cache._failed
    m.cuda_graphs = False
    for im, d in zip(shapes, got):
        _assert_same(m.predict(im), d, mask_pixels=1e-4)


@cuda
def test_cuda_graph_replays_outlive_the_caches_dropping_what_they_read():
    # more padded shapes than the anchor cache holds (it clears at 17), and a precision change that refolds the convs
    # (freeing the fp32 copies): a graph captured before must still replay what an eager run gives
    m = small_synthetic_model("mask_rcnn_R_50_FPN_3x").cuda()
    m.static_shapes = True
    g = _image("grace_hopper")
    want = m.predict(g)
    m.cuda_graphs = True
    [m.predict(g) for _ in range(2)]  # the second use captures
    with torch.inference_mode():
        seen, others = {tuple(m.preprocess([g]).tensor.shape)}, []
        for crop in (g[:h, :w] for h in range(40, 601, 20) for w in (120, 200, 300)):
            shape = tuple(m.preprocess([crop]).tensor.shape)
            if shape not in seen:
                seen.add(shape)
                others.append(crop.copy())
    assert len(others) >= 20  # padded shapes other than g's
    for im in others:  # each runs eagerly once
        m.predict(im)
    m.precision = "bf16"
    m.predict(g)  # a signature of its own, run eagerly: refolds the convs in bf16
    m.precision = "fp32"
    junk = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(256)]  # takes what was freed
    replays = m.cuda_graph_stats()["replays"]
    got = m.predict(g)
    assert m.cuda_graph_stats()["replays"] == replays + 1
    _assert_same(want, got, mask_pixels=1e-4)
    del junk
    m.cuda_graphs = False


@cuda
def test_cuda_graph_capture_failure_falls_back_with_one_warning(monkeypatch):
    img = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    earlier = _tiny("mask_rcnn_R_50_FPN_3x").cuda()  # a graph captured before the failure
    earlier.static_shapes, earlier.cuda_graphs = True, True
    replayed = [earlier.predict(img) for _ in range(2)][1]
    assert len(earlier._graph_cache) == 1
    # the torch NMS reads values on the host, which a capture cannot hold: run eagerly instead
    monkeypatch.setenv("ZOO_OPS", "torch")
    m = _tiny("mask_rcnn_R_50_FPN_3x").cuda()
    m.static_shapes, m.cuda_graphs = True, True
    m.predict(img)  # the first use runs eagerly; the second tries to capture
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        got = m.predict(img)
    m.cuda_graphs = False
    want = m.predict(img)
    _assert_same(want, got)
    assert len(m._graph_cache) == 0
    # a failed capture leaves PyTorch's CUDA generator marked as capturing unless GraphCache resets it: random
    # ops and replays of other graphs would then fail ("Offset increment outside graph capture")
    assert torch.randn(3, device="cuda").shape == (3,)
    monkeypatch.delenv("ZOO_OPS")
    _assert_same(replayed, earlier.predict(img))


@cuda
def test_cuda_graphs_of_every_shape_share_one_capture_stream(monkeypatch):
    # PyTorch keeps a cuBLAS workspace for each stream that has run a matmul (32 MiB on Hopper): warming up on
    # a fresh stream per capture and capturing on another held that much more memory for every new shape
    from zoo.modeling import graphs

    m = _tiny("faster_rcnn_R_50_FPN_3x").cuda()
    m.static_shapes, m.cuda_graphs = True, True
    gen = torch.Generator().manual_seed(5)
    images = [(torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
              for h, w in [(48, 64), (64, 48), (64, 64)]]  # three padded shapes
    streams = []
    real_graph = torch.cuda.graph

    def spy(*args, **kwargs):
        streams.append(kwargs.get("stream"))
        return real_graph(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", spy)
    grown = []
    for img in images:
        m.predict(img)  # a shape's first use runs eagerly
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        m.predict(img)  # its second captures
        torch.cuda.synchronize()
        grown.append(torch.cuda.memory_allocated() - before)
    assert len(m._graph_cache) == 3
    m.cuda_graphs = False
    assert streams == [graphs._capture_stream(m.device)] * 3
    # later captures add their graph's small inputs and outputs, no workspace
    assert max(grown[1:]) < 4 * 2**20, grown


@cuda
def test_cuda_batched_nms_fixed_matches_torchvision():
    tv = pytest.importorskip("torchvision.ops", reason="torchvision not installed")
    from zoo.ops.synthetic import random_proposals

    g = torch.Generator().manual_seed(3)
    # RPN (5 levels x ~1000, coordinate trick) and box head (1000 proposals x 80 classes, capacity 4096)
    # (box head at 10% valid: 8000 boxes > 5000, torchvision's per-class regime)
    for n, classes, keep_frac, max_out, capacity in [(4741, 5, 0.9, 1000, None), (80000, 80, 0.03, 100, 4096),
                                                     (80000, 80, 0.1, 100, 4096)]:
        boxes = random_proposals(n, n, device="cuda", smax=300.0)
        scores = torch.rand(n, generator=g).cuda()
        idxs = torch.randint(0, classes, (n,), generator=g).cuda()
        valid = torch.rand(n, generator=g).cuda() < keep_frac
        vidx = valid.nonzero().squeeze(1)
        want = vidx[tv.batched_nms(boxes[vidx], scores[vidx], idxs[vidx], 0.5)][:max_out]
        out, cnt, complete = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.5, max_out, capacity,
                                                   backend="triton")
        assert bool(complete) and int(cnt) == want.numel()
        assert torch.equal(out[: want.numel()], want)


def test_graph_keys_see_weights_replaced_or_swapped_by_hand():
    # a graph replays the addresses it was captured with: a parameter object replaced (conv.weight = ...), a .data
    # swapped or a module replaced after a capture must give another key, so the stale graphs go
    from zoo.modeling.graphs import GraphCache

    m = _tiny("mask_rcnn_R_50_FPN_3x")
    cache = GraphCache(m)
    batch = SimpleNamespace(tensor=torch.zeros(1, 3, 64, 96))
    keys = [cache._key(m, batch)]
    assert cache._key(m, batch) == keys[0]  # nothing changed, nothing seen
    cls = m.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls.weight = torch.nn.Parameter(cls.weight.clone())
        keys.append(cache._key(m, batch))
        cls.bias.data = cls.bias.data.clone()
        keys.append(cache._key(m, batch))
        cls.bias.add_(0)
        keys.append(cache._key(m, batch))
        old = m.roi_heads.box_predictor.bbox_pred
        m.roi_heads.box_predictor.bbox_pred = torch.nn.Linear(old.in_features, old.out_features)
        keys.append(cache._key(m, batch))
    assert len({k[-1] for k in keys}) == len(keys), "a change went unseen"
    assert all(k[:-1] == keys[0][:-1] for k in keys)
    unrelated = torch.nn.Linear(2, 2)  # modules built elsewhere make the cache list its tensors again: same key
    assert unrelated is not None and cache._key(m, batch) == keys[-1]
    from zoo.modeling.layers import epilogue_backend

    with epilogue_backend("torch"):  # the ops a capture records
        assert cache._key(m, batch) != keys[-1]
