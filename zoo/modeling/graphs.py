"""CUDA graphs of the fixed-shape inference path, one per input signature.

A graph replays the whole network (run_static + compact_static) as one launch, so the host no
longer issues hundreds of kernels per image. Shapes, image sizes and precision are baked into a
capture, so graphs are keyed by them and kept in a small LRU cache; all share one memory pool.
That is safe because replays never overlap and callers copy a replay's outputs (finalize_static
slices and clones them) before the next replay may reuse the pool.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any, Optional

import torch

from .roi_heads import InstanceBatch


class GraphCache:
    """Captured graphs of `model.compact_static(model.run_static(...))`, keyed by input signature."""

    def __init__(self, max_graphs: int = 8) -> None:
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, InstanceBatch]] = OrderedDict()
        self._failed: set[tuple] = set()
        self._pool: Optional[Any] = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and with them their memory)."""
        self._graphs.clear()
        self._failed.clear()
        self._pool = None

    @staticmethod
    def _key(model, batch) -> tuple:
        t = batch.tensor
        # tensor versions: weights loaded or changed in place after a capture must not replay stale folds
        weights = tuple(v._version for v in model.state_dict(keep_vars=True).values())
        return (tuple(t.shape), str(t.device), tuple(batch.image_sizes), tuple(batch.original_sizes),
                model.precision, os.environ.get("ZOO_OPS", ""), id(model), weights)

    def run(self, model, batch) -> InstanceBatch:
        """Compacted fixed-shape detections for `batch`, replayed from a graph (captured on first use).

        The returned tensors belong to the graph: copy what you keep before the next call.
        Falls back to running eagerly (with one warning) where a capture fails.
        """
        key = self._key(model, batch)
        entry = self._graphs.get(key)
        if entry is None and key not in self._failed:
            entry = self._capture(model, batch, key)
        if entry is None:
            return model.compact_static(model.run_static(batch.tensor, batch.image_sizes)[2], batch)
        self._graphs.move_to_end(key)
        graph, static_in, out = entry
        static_in.copy_(batch.tensor)
        graph.replay()
        return out

    def _capture(self, model, batch, key: tuple):
        def body(x):
            return model.compact_static(model.run_static(x, batch.image_sizes)[2], batch)

        static_in = batch.tensor.clone()
        try:
            # warm up on a side stream: compiles the Triton kernels, lets cuDNN pick algorithms and fills
            # caches (anchors, folded convs) so the capture only records kernels
            side = torch.cuda.Stream(device=static_in.device)
            side.wait_stream(torch.cuda.current_stream(static_in.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    body(static_in)
            torch.cuda.current_stream(static_in.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = body(static_in)
        except Exception as e:  # e.g. ZOO_OPS=torch, whose NMS reads values on the host
            self._failed.add(key)
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          "running this input shape without graphs", RuntimeWarning, stacklevel=3)
            return None
        self._graphs[key] = (graph, static_in, out)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return self._graphs[key]
