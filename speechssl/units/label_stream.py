"""Streaming labels of a hidden layer (``speechssl kmeans label --upstream``): iteration-2 units without a dump.

Dumping layer ``L`` for the whole corpus only to label it once costs 768-d x 50 Hz x 2 B = 265 GB for 960 h,
although k-means is fitted on a sample. Here each shard's utterances go through the same duration-sorted, batched
upstream forward as ``speechssl extract`` (:func:`speechssl.upstream.extract.hidden_stream`), are cast to the same
store dtype (float16 by default: the numbers a dump would hold) and go straight into nearest-centroid assignment
(:func:`speechssl.units.label_io.label_with`: torch on the GPU when there is one, faiss on a CPU), which writes
``shards/R-of-N.km`` and merges ``text.km`` + ``meta.json``. The features' header is the one the dump's store
would carry (:func:`~speechssl.upstream.extract.hidden_store_meta` of the whole data dir), so the k-means model's
feature check applies unchanged and the labels, headers included, are those of ``extract`` + ``kmeans label
--feats`` with the same ``--nshard`` and ``--max-duration``. Disk is the labels alone.

Sharding, skipping and resuming are :func:`label_with`'s: shard ``R`` of ``N`` is the contiguous block ``R`` of
the C-sorted ids (:mod:`speechssl.sharding`), one finished with the same header is skipped (its audio not even
read), an unfinished one (killed or failed mid-shard: no header was written) is redone, and whoever finishes the
last shard merges.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from speechssl.data.kaldi import read_data_dir
from speechssl.errors import UserError
from speechssl.sharding import resolve_shards, shard_items
from speechssl.units.fit import ASSIGN_BATCH, KMeansModel
from speechssl.units.label_io import label_with
from speechssl.upstream import Upstream
from speechssl.upstream.extract import (
    _max_samples,
    extract_meta,
    hidden_store_meta,
    hidden_stream,
    load_upstream,
    shard_utterances,
)

__all__ = ["label_upstream", "label_upstream_with"]


def label_upstream_with(
    up: Upstream,
    ckpt_sha1: str,
    data_dir: str | os.PathLike,
    km: KMeansModel | str | os.PathLike,
    out_dir: str | os.PathLike,
    layer: int | str,
    *,
    nshard: int | None = None,
    rank: int | None = None,
    max_duration: float | None = None,
    dtype: str = "float16",
    chunk_seconds: float | None = None,
    overlap_seconds: float | None = None,
    precision: str = "fp32",
    workers: int = 2,
    batch_frames: int = ASSIGN_BATCH,
    progress: bool = True,
) -> bool:
    """:func:`label_upstream` with an :class:`Upstream` already loaded and the SHA-1 naming its weights."""
    try:
        layer = int(layer)
    except (TypeError, ValueError):
        raise UserError(f"--layer must be one integer (a hidden state), got {layer!r}") from None
    if not 0 <= layer < up.num_layers:
        raise UserError(f"--layer {layer}: {up.source or 'the checkpoint'} has hidden states 0..{up.num_layers - 1}")
    _max_samples(up, max_duration)
    extract_meta(up, layer, ckpt_sha1, dtype=dtype, chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds,
                 precision=precision)  # option checks before any work
    model = km if isinstance(km, KMeansModel) else KMeansModel.load(km)
    dd = read_data_dir(data_dir)
    ids = dd.utt_ids()
    if not ids:
        raise UserError(f"{data_dir}: data dir has no utterances")
    nshard, ranks = resolve_shards(nshard, rank)
    meta = hidden_store_meta(up, layer, ckpt_sha1, ids, nshard, dtype=dtype, chunk_seconds=chunk_seconds,
                             overlap_seconds=overlap_seconds, precision=precision)

    def shard_feats(r: int) -> Iterator[tuple[str, np.ndarray]]:
        """Shard ``r``'s features, lazily: nothing is read unless label_with consumes it (skipped shards)."""
        utts, _ = shard_utterances(dd, shard_items(ids, nshard, r))
        for u, _, feats in hidden_stream(up, utts, [layer], max_duration=max_duration, chunk_seconds=chunk_seconds,
                                         overlap_seconds=overlap_seconds, precision=precision, dtype=dtype,
                                         workers=workers):
            yield u.utt_id, feats[layer]

    merged = False
    for r in ranks:  # label_with takes one iterator per shard: one call per shard, each merging if it is the last
        merged = label_with(shard_feats(r), ids, model, out_dir, meta, rank=r, nshard=nshard,
                            device=str(up.device), batch_frames=batch_frames, progress=progress)
    return merged


def label_upstream(
    upstream: str | os.PathLike,
    data_dir: str | os.PathLike,
    km: KMeansModel | str | os.PathLike,
    out_dir: str | os.PathLike,
    layer: int | str,
    *,
    nshard: int | None = None,
    rank: int | None = None,
    device: str | None = None,
    trust_pickle: bool = False,
    max_duration: float | None = None,
    dtype: str = "float16",
    chunk_seconds: float | None = None,
    overlap_seconds: float | None = None,
    precision: str = "fp32",
    workers: int = 2,
    batch_frames: int = ASSIGN_BATCH,
    progress: bool = True,
) -> bool:
    """``speechssl kmeans label --upstream``: unit labels of hidden state ``layer`` of checkpoint ``upstream``
    (anything :func:`speechssl.upstream.load` reads, ``random:CKPT`` included) for every utterance of
    ``data_dir``, with the k-means model ``km``, into ``out_dir`` (``text.km`` + ``meta.json``), computed on the
    fly (see the module docstring). Options as :func:`speechssl.upstream.extract.extract` (``device`` None: cuda
    if available, else cpu, for the forward and the assignment) and :func:`label_with`. Returns True once the
    merged labels are complete."""
    up, sha1 = load_upstream(upstream, device=device, trust_pickle=trust_pickle)
    return label_upstream_with(up, sha1, data_dir, km, out_dir, layer, nshard=nshard, rank=rank,
                               max_duration=max_duration, dtype=dtype, chunk_seconds=chunk_seconds,
                               overlap_seconds=overlap_seconds, precision=precision, workers=workers,
                               batch_frames=batch_frames, progress=progress)
