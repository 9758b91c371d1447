"""Per-utterance iteration helpers shared by every room: audio read ahead in threads, and batches bounded by padded
duration (rows x longest row), the one rule by which feature dumps, layer extraction and SUPERB heads batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

__all__ = ["prefetch", "padded_batches", "duration_batches"]

_T = TypeVar("_T")
_R = TypeVar("_R")


def prefetch(fn: Callable[[_T], _R], items: Sequence[_T], *, workers: int = 1, ahead: int = 4) -> Iterator[tuple[_T, _R]]:
    """``(item, fn(item))`` in order, ``fn`` running in ``workers`` threads at most ``ahead`` items in advance (audio
    decoding releases the GIL). The first exception ``fn`` raises is raised here, at its item."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[tuple[_T, Future]] = []
        nxt = 0
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < max(1, ahead):
                pending.append((items[nxt], pool.submit(fn, items[nxt])))
                nxt += 1
            item, fut = pending.pop(0)
            yield item, fut.result()


def padded_batches(items: Iterable[_T], size: Callable[[_T], float], limit: float) -> Iterator[list[_T]]:
    """Consecutive ``items`` gathered while ``rows x largest size`` stays ``<= limit``; an item larger than ``limit``
    (or of infinite size: "always alone") is a batch of its own. Lazy: works on a stream."""
    batch: list[_T] = []
    longest = 0.0
    for item in items:
        s = size(item)
        if batch and (len(batch) + 1) * max(longest, s) > limit:
            yield batch
            batch, longest = [], 0.0
        batch.append(item)
        longest = max(longest, s)
    if batch:
        yield batch


def duration_batches(durations: Sequence[float], max_duration: float, *, num_buckets: int = 10, seed: int = 0,
                     epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Indices in batches of at most ``max_duration`` seconds of padded audio (:func:`padded_batches`).
    ``shuffle``: utterances sorted by duration are cut into ``num_buckets`` equal buckets, shuffled within each,
    batched, and the batches shuffled (``seed + epoch``); otherwise sorted by duration (evaluation)."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        buckets = [b for b in np.array_split(np.array(order, dtype=np.int64), max(1, num_buckets)) if len(b)]
        groups = [[int(i) for i in rng.permutation(b)] for b in buckets]
    else:
        groups = [order]
    batches = [b for g in groups for b in padded_batches(g, lambda i: durations[i], max_duration)]
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[int(i)] for i in perm]
    return batches
