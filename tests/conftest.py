"""Suite-wide settings. Under pytest-xdist (the README's `-n auto`) each worker gets an equal share of the cores,
so that two workers running torch at once do not oversubscribe them (its default is one thread per core)."""
from __future__ import annotations

import os

import torch


def _worker_threads() -> int | None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


THREADS = _worker_threads()
if THREADS is not None:
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # the scripts and CLIs the tests run in subprocesses
