"""CUDA graphs of the fixed-shape inference path, one per input signature.

A graph replays the whole network (run_static + compact_static) as one launch, so the host no
longer issues hundreds of kernels per image. The padded batch shape, the precision and the test-time
settings (thresholds, top-k) are baked into a capture, so graphs are keyed by them and kept in a small
cache; the image sizes travel as a device tensor (GeneralizedRCNN.size_table), so every image that
pads to one shape shares a graph. A shape is captured the second time it is seen (a capture costs
about three forward passes, which inputs of a one-off shape would never earn back; those run eagerly),
and once the cache is full only a shape used more often than a held one displaces it.
All graphs share one memory pool. That is safe because replays never overlap: a cache holds its lock from
a replay's input copy until its caller has copied the outputs (GraphCache.run's `take`), and on CUDA the
next replay's stream waits for that copy, so threads sharing one model (a server), each on its own stream,
never see or overwrite each other's buffers.
"""
from __future__ import annotations

import operator
import os
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import nn

from .detector import resolve_precision
from .layers import current_epilogue_backend
from .roi_heads import InstanceBatch


# per-batch counts a cache keeps: replayed from a graph, run eagerly (not yet or not worth a graph, or its
# capture failed), graphs captured, graphs dropped for a more used signature
STAT_NAMES = ("replays", "eager", "captures", "evictions")

T = TypeVar("T")


_address = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")

# Parameters, buffers or submodules (re)assigned anywhere in the process: a count the caches compare with the one
# they last listed their model's tensors at, so that a weight replaced by hand (conv.weight = nn.Parameter(...)) is
# seen. PyTorch calls these hooks only when a module registers one (construction, assignment), never per forward.
_registrations = [0]


def _registered(*_args) -> None:
    _registrations[0] += 1


for _hook in (nn.modules.module.register_module_parameter_registration_hook,
              nn.modules.module.register_module_buffer_registration_hook,
              nn.modules.module.register_module_module_registration_hook):
    _hook(_registered)


class _Held:
    """A captured graph, its input and output buffers, how often its signature has been used (decayed), and the
    model's cached tensors at its capture (`keep`: a graph records addresses, not references, so the anchors and
    folded weights it reads must outlive the model's caches dropping them)."""
    __slots__ = ("graph", "images", "sizes", "out", "uses", "keep")

    def __init__(self, entry: tuple, uses: int, keep: list) -> None:
        self.graph, self.images, self.sizes, self.out = entry
        self.uses = uses
        self.keep = keep


class GraphCache:
    """Captured graphs of `model.compact_static(model.run_static(...))`, keyed by input signature.

    One per model (GeneralizedRCNN drops it when moved or cast). Weights loaded or edited in place after a capture
    are noticed through the tensors' versions, a .data swapped through their addresses, a parameter, buffer or
    module assigned by hand through PyTorch's registration hooks (the tensors are listed again), and the model's
    load_state_dict drops its cache.

    Which signatures hold a graph: each is counted per use (eagerly run ones too), and every
    `halve_every` runs all counts are halved, so they follow the recent mix. A signature is captured on
    its `capture_after`-th use while fewer than `max_graphs` are held; once full, only if its count
    beats the least-used graph's by more than `margin`, which is then dropped. Plain LRU recaptured on
    about 40% of the calls of a stream drawn evenly from 36 shapes (COCO's aspect ratios pad to dozens),
    each capture costing about three forward passes: slower than no graphs.
    """

    def __init__(self, model, max_graphs: int = 8, capture_after: int = 2, max_seen: int = 256,
                 halve_every: int = 128, margin: int = 2) -> None:
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.max_seen = max_seen
        self.halve_every = halve_every
        self.margin = margin
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self._runs = 0
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # uses of signatures without a graph
        self._tensors: list[torch.Tensor] = []
        self._listed_at: Optional[int] = None  # _registrations when _tensors was listed
        self._graphs: OrderedDict[tuple, _Held] = OrderedDict()  # least recently used first
        self._failed: set[tuple] = set()
        self._versions: Optional[tuple] = None  # the weights' versions in the keys held
        self._pool: Optional[Any] = None
        self._lock = threading.Lock()  # bookkeeping, captures and replay-to-copy spans: one thread at a time
        self._copied: Optional[Any] = None  # CUDA event: the last replay's outputs copied (the buffers free again)

    def __len__(self) -> int:
        return len(self._graphs)

    def _key(self, model, batch) -> tuple:
        t = batch.tensor
        if self._listed_at != _registrations[0]:
            self._tensors = list(model.parameters()) + list(model.buffers())
            self._listed_at = _registrations[0]
        # each weight's address and version, last (run() reads them there): a graph reads the addresses it was
        # captured with, so weights changed in place, swapped (.data) or replaced after a capture must not replay
        weights = (tuple(map(_address, self._tensors)), tuple(map(_version, self._tensors)))  # map: ~2x a genexpr
        return (tuple(t.shape), str(t.device), resolve_precision(model.precision, t.device),
                os.environ.get("ZOO_OPS", ""), current_epilogue_backend(), model.graph_settings(), weights)

    def run(self, model, batch, take: Callable[[InstanceBatch], T]) -> T:
        """`take` applied to the compacted fixed-shape detections for `batch`, replayed from its signature's
        graph if one is held or now earns one (see the class docstring); otherwise run eagerly.

        `take` gets tensors that belong to the graph: it must return copies of what it keeps. No other call
        replays meanwhile (see the module docstring). Falls back to running eagerly (with one warning) where a
        capture fails.
        """
        sizes = model.size_table(batch)
        with self._lock:
            held = self._choose(model, batch, sizes)
            if held is not None:
                return self._replay(held, batch.tensor, sizes, take)
        # no graph buffers involved: other threads may replay meanwhile
        return take(_compacted(model, batch.tensor, sizes))

    def _choose(self, model, batch, sizes: torch.Tensor) -> Optional[_Held]:
        """Count a use of `batch`'s signature; its graph (captured now if it has earned one), or None: run
        eagerly."""
        key = self._key(model, batch)
        if key[-1] != self._versions:  # weights changed in place: no held graph can match again
            self._graphs.clear()
            self._seen.clear()
            self._failed.clear()
            self._versions = key[-1]
        self._age()
        held = self._graphs.get(key)
        if held is not None:
            held.uses += 1
        elif key not in self._failed:
            held = self._admit(key, model, batch.tensor, sizes)
        if held is None:
            self.stats["eager"] += 1
            return None
        self.stats["replays"] += 1
        self._graphs.move_to_end(key)
        return held

    def _replay(self, held: _Held, images: torch.Tensor, sizes: torch.Tensor,
                take: Callable[[InstanceBatch], T]) -> T:
        self._after_last_copy(images)
        held.images.copy_(images)
        held.sizes.copy_(sizes)
        held.graph.replay()
        result = take(held.out)
        if images.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(images.device))
        return result

    def _after_last_copy(self, images: torch.Tensor) -> None:
        """Make this thread's stream wait until the last replay's outputs were copied (another thread's stream
        may still be copying them when its call has returned)."""
        if images.is_cuda and self._copied is not None:
            torch.cuda.current_stream(images.device).wait_event(self._copied)

    def _age(self) -> None:
        self._runs += 1
        if self._runs % self.halve_every == 0:
            for held in self._graphs.values():
                held.uses //= 2
            for key in list(self._seen):
                self._seen[key] //= 2
                if not self._seen[key]:
                    del self._seen[key]

    def _admit(self, key: tuple, model, images: torch.Tensor, sizes: torch.Tensor) -> Optional[_Held]:
        """Count one use of a signature without a graph; capture it if it has earned a slot (the held graph
        it displaces is dropped). None: run it eagerly."""
        n = self._seen.pop(key, 0) + 1
        victim = None
        if len(self._graphs) >= self.max_graphs:
            victim = min(self._graphs, key=lambda k: self._graphs[k].uses)  # ties: the least recently used
        if n < self.capture_after or (victim is not None and n <= self._graphs[victim].uses + self.margin):
            self._seen[key] = n
            while len(self._seen) > self.max_seen:
                self._seen.popitem(last=False)
            return None
        self._after_last_copy(images)  # a capture allocates from the pool the last replay used
        entry = self._capture(model, images, sizes)
        if entry is None:
            self._failed.add(key)
            return None
        if victim is not None:
            del self._graphs[victim]
            self.stats["evictions"] += 1
        self.stats["captures"] += 1
        # uses: its count so far, or a newcomer would displace it
        held = self._graphs[key] = _Held(entry, uses=n, keep=model.tensors_in_caches())
        return held

    def _capture(self, model, images: torch.Tensor, sizes: torch.Tensor):
        """(graph, input buffer, sizes buffer, outputs) of a new capture, or None (with a warning) if it fails."""
        static_in, static_sizes = images.clone(), sizes.clone()
        # one capture at a time: the stream is shared, and another thread's kernels queued on it during a
        # capture would be recorded into this graph
        with _CAPTURE_LOCK:
            return self._capture_locked(model, static_in, static_sizes)

    def _capture_locked(self, model, static_in: torch.Tensor, static_sizes: torch.Tensor):
        try:
            # warm up on the stream that captures: compiles the Triton kernels, lets cuDNN pick algorithms
            # and fills caches (anchors, folded convs) so the capture only records kernels
            side = _capture_stream(static_in.device)
            side.wait_stream(torch.cuda.current_stream(static_in.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    _compacted(model, static_in, static_sizes)
            torch.cuda.current_stream(static_in.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: PyTorch's default ("global") fails a capture, and the other thread's call, when another
            # thread allocates GPU memory meanwhile (a server's first requests capture while others run); their
            # work goes to other streams, which a capture does not record
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                out = _compacted(model, static_in, static_sizes)
        except Exception as e:  # e.g. ZOO_OPS=torch, whose NMS reads values on the host
            _reset_rng_after_failed_capture(static_in.device)
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          "running this input shape without graphs", RuntimeWarning, stacklevel=4)
            return None
        return graph, static_in, static_sizes, out


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_CAPTURE_LOCK = threading.Lock()
_NEW_CACHE_LOCK = threading.Lock()


def graph_cache(model) -> GraphCache:
    """`model`'s GraphCache, made on first use (once, whichever threads ask at the same time)."""
    cache = model._graph_cache
    if cache is None:
        with _NEW_CACHE_LOCK:
            cache = model._graph_cache
            if cache is None:
                cache = model._graph_cache = GraphCache(model)
    return cache


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream that warms up and captures every graph on `device`. PyTorch keeps a cuBLAS
    workspace (32 MiB on Hopper) for each stream that has run a matmul, for the life of the process: a
    fresh pooled stream per capture (PyTorch cycles through 32) plus torch.cuda.graph's own capture stream
    would each add one to the memory a model holds."""
    device = torch.device(device)
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def _reset_rng_after_failed_capture(device: torch.device) -> None:
    """A capture that fails ends without its generator epilogue, so PyTorch leaves the device's default CUDA
    generator marked as capturing: every later random op there ("Offset increment outside graph capture
    encountered unexpectedly") and every replay of earlier graphs then fails (seen on the H100, torch 2.11).
    A trivial capture that succeeds runs that epilogue and clears the mark."""
    try:
        t = torch.zeros(1, device=device)
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                t.add_(1)
        del graph
    except Exception as e:  # leave the original failure as the one reported
        warnings.warn(f"could not reset the CUDA generator after a failed capture ({type(e).__name__}); random "
                      "ops on this device may fail", RuntimeWarning, stacklevel=5)


def _compacted(model, images: torch.Tensor, sizes: torch.Tensor) -> InstanceBatch:
    """What a graph holds: the fixed-shape network and its on-device postprocess."""
    return model.compact_static(model.run_static(images, sizes)[2], sizes)
