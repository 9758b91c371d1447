"""Sampling for k-means: a uniform, memory-capped draw of frames in one streaming pass (``kmeans fit``), and the
same draw planned as indices for frames produced on the fly (``units layers``).

``n = min(round(sample_frac * total), max_frames)`` frames, drawn *uniformly without replacement* across all
shards by sequential hypergeometric splits over chunks of 65,536 frames. The only allocations are the ``[n, dim]``
sample and one chunk's index/gather buffers, so memory is known before the pass starts
(:func:`speechssl.units.fit.memory_estimate`, printed by the CLI).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from speechssl.errors import UserError
from speechssl.progress import progress_bar

__all__ = ["CHUNK_FRAMES", "sample_size", "sample_indices", "StreamSampler", "sample_frames"]

CHUNK_FRAMES = 65536  # sampling granularity: bounds the per-chunk index and gather buffers


def sample_size(total_frames: int, sample_frac: float, max_frames: int | None) -> int:
    """Frames to sample: ``round(sample_frac * total)``, capped by ``max_frames``."""
    if not 0 < sample_frac <= 1:
        raise UserError(f"--sample-frac must be in (0, 1], got {sample_frac}")
    n = int(round(sample_frac * total_frames))
    if max_frames is not None:
        if max_frames < 1:
            raise UserError(f"--max-frames must be positive, got {max_frames}")
        n = min(n, int(max_frames))
    return max(min(n, total_frames), 0)


def _split_count(rng: np.random.Generator, ngood: int, nbad: int, nsample: int) -> int:
    """How many of ``nsample`` draws without replacement fall in the first ``ngood`` of ``ngood + nbad`` items."""
    if nsample <= 0 or ngood <= 0:
        return 0
    if nbad <= 0:
        return nsample
    if ngood + nbad < 10**9:  # numpy's hypergeometric limit
        return int(rng.hypergeometric(ngood, nbad, nsample))
    # Populations beyond 1e9 frames (>2,700 h at 100 Hz): the binomial is indistinguishable at chunk scale.
    return int(min(max(rng.binomial(nsample, ngood / (ngood + nbad)), nsample - nbad), ngood))


def _chunk_draw(rng: np.random.Generator, m: int, pop_left: int, need: int) -> np.ndarray:
    """Sorted local indices of the draws that fall in the next chunk of ``m`` of the ``pop_left`` remaining
    frames, ``need`` draws remaining: the one RNG step shared by :func:`sample_frames` and :func:`sample_indices`."""
    take = _split_count(rng, m, pop_left - m, need)
    if not take:
        return np.empty(0, dtype=np.int64)
    return np.sort(rng.choice(m, size=take, replace=False))


def sample_indices(shard_rows: Sequence[int], n: int, seed: int = 0, chunk: int = CHUNK_FRAMES) -> np.ndarray:
    """The rows :func:`sample_frames` draws from shards of ``shard_rows`` frames, as sorted global indices into
    the concatenation of the shards (int64 ``[n]``). Lets a caller that produces frames on the fly (a model
    layer, ``units layers``) take exactly the sample ``kmeans fit`` would take from a store with that layout."""
    total = int(sum(shard_rows))
    if n > total:
        raise ValueError(f"cannot sample {n} frames from {total}")
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    pos, base, pop_left, need = 0, 0, total, int(n)
    for rows in shard_rows:
        for start in range(0, int(rows), chunk):
            m = min(chunk, int(rows) - start)
            idx = _chunk_draw(rng, m, pop_left, need)
            out[pos : pos + len(idx)] = base + start + idx
            pos += len(idx)
            pop_left -= m
            need -= len(idx)
        base += int(rows)
    assert pos == n
    return out


class StreamSampler:
    """Collects the rows at sorted global indices ``idx`` (from :func:`sample_indices`) out of a stream of
    ``[T, D]`` blocks fed in order; memory is the ``[len(idx), D]`` result in ``dtype``."""

    def __init__(self, idx: np.ndarray, dim: int, total: int, dtype: Any = np.float32, name: str = "") -> None:
        self.idx = np.asarray(idx, dtype=np.int64)
        self.out = np.empty((len(self.idx), int(dim)), dtype=dtype)
        self.total, self.name = int(total), name
        self.seen = 0  # frames fed so far
        self.taken = 0  # rows of out filled

    def feed(self, x: np.ndarray) -> None:
        t = int(x.shape[0])
        if x.ndim != 2 or x.shape[1] != self.out.shape[1]:
            raise ValueError(f"{self.name}: block of shape {tuple(x.shape)}, sampler dim is {self.out.shape[1]}")
        hi = int(np.searchsorted(self.idx, self.seen + t, side="left"))
        if hi > self.taken:
            self.out[self.taken : hi] = x[self.idx[self.taken : hi] - self.seen]
            self.taken = hi
        self.seen += t

    def result(self) -> np.ndarray:
        if self.seen != self.total or self.taken != len(self.idx):
            raise ValueError(f"{self.name}: stream gave {self.seen} frames, expected {self.total}")
        return self.out


def sample_frames(
    shards: Iterable[tuple[Sequence[str], np.ndarray, np.ndarray]],
    total_frames: int,
    n: int,
    seed: int = 0,
    chunk: int = CHUNK_FRAMES,
    progress: bool = True,
) -> np.ndarray:
    """Draw ``n`` of ``total_frames`` frames uniformly without replacement in one pass over ``shards``.

    ``shards`` yields ``(ids, offsets, data)`` as ``FeatureReader.shard_arrays()`` does (``data`` a memmap).
    Each chunk of ``chunk`` frames receives a hypergeometric share of the remaining draws, so every subset of
    size ``n`` is equally likely, and memory stays at the ``[n, D]`` float32 result plus one chunk's buffers.
    """
    if n > total_frames:
        raise ValueError(f"cannot sample {n} frames from {total_frames}")
    rng = np.random.default_rng(seed)
    out: np.ndarray | None = None
    pos, pop_left, need = 0, int(total_frames), int(n)
    bar = progress_bar(total=total_frames, desc="sampling frames", unit="frame", unit_scale=True, disable=not progress)
    for _, _, data in shards:
        rows = int(data.shape[0])
        if out is None:
            out = np.empty((n, data.shape[1]), dtype=np.float32)
        elif data.shape[1] != out.shape[1]:
            raise ValueError(f"shard dim {data.shape[1]} != {out.shape[1]}")
        for start in range(0, rows, chunk):
            m = min(chunk, rows - start)
            idx = _chunk_draw(rng, m, pop_left, need)
            take = len(idx)
            if take:
                out[pos : pos + take] = data[start + idx]
                pos += take
            pop_left -= m
            need -= take
            bar.update(m)
    bar.close()
    if pos != n or pop_left != 0:
        raise ValueError(f"feature store yielded {total_frames - pop_left} frames, header says {total_frames}")
    return out if out is not None else np.empty((0, 0), dtype=np.float32)
