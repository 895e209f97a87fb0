"""Streaming inference plumbing for `GeneralizedRCNN.predict_iter`: read images ahead on threads, group them
into batches of one padded shape, and hand results back in input order, holding a bounded number at once."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], fn: Callable[[T], R], workers: int, depth: int) -> Iterator[tuple[int, R]]:
    """(index, fn(item)) for each item, in input order, with up to `depth` calls queued or running on `workers`
    threads (0: call fn inline). `items` is consumed on the caller's thread and only `depth` ahead of what has
    been yielded. An exception from fn is raised when its item's turn comes; closing the generator cancels the
    queued calls and waits for the running ones."""
    if workers <= 0:
        for i, x in enumerate(items):
            yield i, fn(x)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="zoo-read")
    pending: deque = deque()
    try:
        for i, x in enumerate(items):
            pending.append((i, pool.submit(fn, x)))
            if len(pending) >= depth:
                j, f = pending.popleft()
                yield j, f.result()
        while pending:
            j, f = pending.popleft()
            yield j, f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def group_batches(items: Iterable[tuple[int, R]], key: Callable[[R], Hashable], batch_size: int,
                  window: int, alone: Optional[Callable[[R], bool]] = None) -> Iterator[list[tuple[int, R]]]:
    """Batches of up to `batch_size` (index, item) pairs with equal key(item), each in input order.

    A batch leaves as soon as it is full. When `window` items are held, the partly filled batch holding the
    oldest one leaves, so memory and the wait for any one result stay bounded; at the end the rest leave,
    oldest first. An item for which `alone(item)` is true leaves at once as a batch of its own.
    """
    buckets: dict[Hashable, list[tuple[int, R]]] = {}
    held = 0
    for idx, item in items:
        if alone is not None and alone(item):
            yield [(idx, item)]
            continue
        k = key(item)
        bucket = buckets.setdefault(k, [])
        bucket.append((idx, item))
        held += 1
        if len(bucket) >= batch_size:
            del buckets[k]
        elif held >= window:
            bucket = buckets.pop(min(buckets, key=lambda b: buckets[b][0][0]))
        else:
            continue
        held -= len(bucket)
        yield bucket
    yield from sorted(buckets.values(), key=lambda b: b[0][0])


def in_input_order(results: Iterable[tuple[int, R]]) -> Iterator[R]:
    """Results tagged with input indices 0, 1, 2, ... (in any order) -> the results in index order, each as
    soon as all before it have come."""
    waiting: dict[int, R] = {}
    nxt = 0
    for idx, r in results:
        waiting[idx] = r
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt += 1
    if waiting:
        raise RuntimeError(f"results for indices {sorted(waiting)[:5]} came without those before them")
