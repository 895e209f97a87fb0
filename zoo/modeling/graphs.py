"""CUDA graphs of the fixed-shape inference path, one per input signature.

A graph replays the whole network (run_static + compact_static) as one launch, so the host no
longer issues hundreds of kernels per image. The padded batch shape, the precision and the test-time
settings (thresholds, top-k) are baked into a capture, so graphs are keyed by them and kept in a small
LRU cache; the image sizes travel as a device tensor (GeneralizedRCNN.size_table), so every image that
pads to one shape shares a graph. A shape is captured the second time it is seen (a capture costs
about three forward passes, which inputs of a one-off shape would never earn back; those run eagerly).
All graphs share one memory pool. That is safe because replays never overlap and callers copy a replay's
outputs (GeneralizedRCNN.detect clones them) before the next replay may reuse the pool.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from typing import Any, Optional

import torch

from .roi_heads import InstanceBatch


class GraphCache:
    """Captured graphs of `model.compact_static(model.run_static(...))`, keyed by input signature.

    One per model (GeneralizedRCNN drops it when moved or cast). Weights loaded or edited in place
    after a capture are noticed through the tensors' versions; replacing a parameter object is not.
    """

    def __init__(self, model, max_graphs: int = 8, capture_after: int = 2, max_seen: int = 256) -> None:
        self.max_graphs = max_graphs
        self.capture_after = capture_after  # capture on this use of a signature (earlier ones run eagerly)
        self.max_seen = max_seen
        self._seen: OrderedDict[tuple, int] = OrderedDict()
        self._tensors = list(model.parameters()) + list(model.buffers())
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, InstanceBatch]] = \
            OrderedDict()
        self._failed: set[tuple] = set()
        self._pool: Optional[Any] = None

    def __len__(self) -> int:
        return len(self._graphs)

    def _key(self, model, batch) -> tuple:
        t = batch.tensor
        # tensor versions: weights changed in place after a capture must not replay stale folded copies
        weights = tuple(v._version for v in self._tensors)
        return (tuple(t.shape), str(t.device), model.precision, os.environ.get("ZOO_OPS", ""),
                model.graph_settings(), weights)

    def run(self, model, batch) -> InstanceBatch:
        """Compacted fixed-shape detections for `batch`, replayed from a graph (captured on the
        `capture_after`-th use of its signature; until then run eagerly).

        The returned tensors belong to the graph: copy what you keep before the next call.
        Falls back to running eagerly (with one warning) where a capture fails.
        """
        key = self._key(model, batch)
        sizes = model.size_table(batch)
        entry = self._graphs.get(key)
        if entry is None and key not in self._failed and self._capture_due(key):
            entry = self._capture(model, batch.tensor, sizes)
            if entry is None:
                self._failed.add(key)
            else:
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
        if entry is None:
            return _compacted(model, batch.tensor, sizes)
        self._graphs.move_to_end(key)
        graph, static_in, static_sizes, out = entry
        static_in.copy_(batch.tensor)
        static_sizes.copy_(sizes)
        graph.replay()
        return out

    def _capture_due(self, key: tuple) -> bool:
        """Count one more use of a signature without a graph; True on its `capture_after`-th use (then it is
        captured or marked failed, so its count is dropped). Counts are kept for the `max_seen` latest."""
        n = self._seen.pop(key, 0) + 1
        if n >= self.capture_after:
            return True
        self._seen[key] = n
        while len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        return False

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
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                out = _compacted(model, static_in, static_sizes)
        except Exception as e:  # e.g. ZOO_OPS=torch, whose NMS reads values on the host
            _reset_rng_after_failed_capture(static_in.device)
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          "running this input shape without graphs", RuntimeWarning, stacklevel=4)
            return None
        return graph, static_in, static_sizes, out


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_CAPTURE_LOCK = threading.Lock()


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
            with torch.cuda.graph(graph):
                t.add_(1)
        del graph
    except Exception as e:  # leave the original failure as the one reported
        warnings.warn(f"could not reset the CUDA generator after a failed capture ({type(e).__name__}); random "
                      "ops on this device may fail", RuntimeWarning, stacklevel=5)


def _compacted(model, images: torch.Tensor, sizes: torch.Tensor) -> InstanceBatch:
    """What a graph holds: the fixed-shape network and its on-device postprocess."""
    return model.compact_static(model.run_static(images, sizes)[2], sizes)
