"""Dump features of a Kaldi data dir into a sharded feature store (`speechssl features dump`).

Sharding follows the one rule of :mod:`speechssl.sharding`: the sorted utterance list is cut into ``nshard``
contiguous ranges (``shard_range``), shard ``R`` is written by one ``FeatureWriter``, and ``resolve_shards`` picks
the shards of this process (``--rank R``: that one; under torchrun: ``$RANK``, ``$RANK + $WORLD_SIZE``, ...;
otherwise every shard in turn). The store has no merge step: a reader combines the shards once all are finished,
and the dump reports whether the store is complete. Re-running is cheap and safe: a finished shard whose header
matches is skipped, an unfinished one is redone, and a finished one with a different header (other options, other
data) is an error unless ``overwrite=True`` — so a store never silently mixes two configurations.

Every header records a SHA-1 of the data dir's sorted utterance list, so shards dumped from a data dir that
has since changed are detected instead of being combined with new ones.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from speechssl.data.batching import padded_batches, prefetch
from speechssl.audio import SAMPLE_RATE
from speechssl.data.kaldi import DataDir, Utterance, load_utterance, read_data_dir
from speechssl.errors import UserError
from speechssl.features.kaldi import add_deltas, fbank, mfcc, num_frames
from speechssl.features.store import (
    FeatureStoreError,
    FeatureWriter,
    _diff,
    _normalise_meta,
    _same_meta,
    read_shard_header,
    shard_done,
    store_meta,
)
from speechssl.progress import progress_bar
from speechssl.sharding import ids_sha1, resolve_shards, shard_range

__all__ = ["dump_features", "dump_with", "batch_extractor", "shard_range", "resolve_shards", "feature_meta", "KINDS",
           "dump_meta", "shard_finished", "speaker_cmvn", "CMVN_MODES"]

log = logging.getLogger(__name__)

KINDS = ("mfcc", "fbank")
BatchFn = Callable[[list[np.ndarray]], list[np.ndarray]]


CMVN_MODES = ("mean", "meanvar", "spk-mean", "spk-meanvar")


def feature_meta(kind: str, cmvn: bool | str = False) -> dict[str, Any]:
    """Store meta for the built-in kinds: everything that determines the numbers (but not the device)."""
    cmvn_mode = {False: None, True: "mean", None: None}.get(cmvn, cmvn)  # type: ignore[call-overload]
    if cmvn_mode is not None and cmvn_mode not in CMVN_MODES:
        raise UserError(f"cmvn must be False, True/'mean', 'meanvar', 'spk-mean' or 'spk-meanvar', got {cmvn!r}")
    common = {
        "sample_rate": SAMPLE_RATE,
        "frame_length_ms": 25.0,
        "frame_shift_ms": 10.0,
        "snip_edges": True,
        "dither": 0.0,
        "input_scale": "float [-1, 1]",
        "cmvn": cmvn_mode,
        "implementation": "speechssl.features.kaldi",
    }
    if kind == "mfcc":
        opts = {**common, "num_ceps": 13, "num_mel_bins": 23, "cepstral_lifter": 22.0, "use_energy": False,
                "deltas": "fairseq (compute_deltas twice, window 2)"}
        dim = 39
    elif kind == "fbank":
        opts = {**common, "num_mel_bins": 80, "use_energy": False}
        dim = 80
    else:
        raise UserError(f"unknown feature kind {kind!r}; choose from {KINDS}")
    return {"kind": kind, "dim": dim, "frame_rate": 100.0, "dtype": "float32", "source": {"options": opts}}


def default_batch_seconds(device: str) -> float:
    """Padded audio per batch: small on CPU (cache-resident buffers beat batching there: measured ~1.3-1.5x
    faster at 8-12 s than at 120 s), large on GPU (kernel launches amortised over many utterances)."""
    return 10.0 if torch.device(device).type == "cpu" else 300.0


def batch_extractor(
    kind: str,
    *,
    cmvn: bool | str = False,
    device: str = "cpu",
    batch_seconds: float | None = None,
    deltas: bool = True,
) -> BatchFn:
    """A function list-of-waveforms -> list-of-[T, D] features computed in padded batches.

    Sorts by length, pads into batches of at most ``batch_seconds`` of padded audio, runs ``mfcc``/``fbank``
    with ``lengths`` (so each result equals the unbatched one) and cuts each row at ``num_frames``.
    ``deltas`` only applies to MFCC.
    """
    if kind not in KINDS:
        raise UserError(f"unknown feature kind {kind!r}; choose from {KINDS}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    extract = functools.partial(mfcc, deltas=deltas) if kind == "mfcc" else fbank
    if batch_seconds is None:
        batch_seconds = default_batch_seconds(device)

    def run(wavs: list[np.ndarray]) -> list[np.ndarray]:
        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
        out: list[np.ndarray] = [np.empty(0)] * len(wavs)
        for idx in padded_batches(order, lambda i: len(wavs[i]), int(batch_seconds * SAMPLE_RATE)):
            if len(idx) == 1:  # no padding needed
                batch = torch.from_numpy(np.ascontiguousarray(wavs[idx[0]], dtype=np.float32)).unsqueeze(0)
                lengths = None
            else:
                batch = torch.zeros(len(idx), len(wavs[idx[-1]]))
                for j, i in enumerate(idx):
                    batch[j, : len(wavs[i])] = torch.from_numpy(wavs[i])
                lengths = torch.tensor([len(wavs[i]) for i in idx], device=dev)
            with torch.inference_mode():
                feats = extract(batch.to(dev), lengths=lengths, cmvn=cmvn).cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = feats[j, : num_frames(len(wavs[i]))]
        return out

    return run


def _load_chunks(utts: list[Utterance], chunk_seconds: float, workers: int) -> Iterator[list[tuple[Utterance, np.ndarray]]]:
    """Load audio in chunks of about ``chunk_seconds`` (read ahead in parallel threads; order preserved)."""
    chunk: list[tuple[Utterance, np.ndarray]] = []
    seconds = 0.0
    for utt, wav in prefetch(functools.partial(load_utterance, sample_rate=SAMPLE_RATE), utts, workers=workers,
                             ahead=32):
        chunk.append((utt, wav))
        seconds += len(wav) / SAMPLE_RATE
        if seconds >= chunk_seconds:
            yield chunk
            chunk, seconds = [], 0.0
    if chunk:
        yield chunk


def dump_meta(meta: dict[str, Any], utt_ids: Sequence[str], nshard: int) -> dict[str, Any]:
    """The store-level header every shard of a dump of ``utt_ids`` (the data dir's sorted list) records: ``meta``
    normalised as :class:`FeatureWriter` stores it, plus ``source.data`` (number of utterances and
    :func:`~speechssl.sharding.ids_sha1` of the list, so shards of a changed data dir are never combined), added to
    any ``source.data`` keys ``meta`` has (per-speaker CMVN: ``utt2spk_sha1``)."""
    meta = dict(meta)
    source = dict(meta.get("source") or {})
    source["data"] = {**(source.get("data") or {}), "num_utts": len(utt_ids), "utts_sha1": ids_sha1(utt_ids)}
    meta["source"] = source
    return _normalise_meta(meta, nshard)


def shard_finished(out_dir: str | os.PathLike, rank: int, meta: dict[str, Any], overwrite: bool) -> bool:
    """True if shard ``rank`` of the store at ``out_dir`` is finished with header ``meta`` (:func:`dump_meta`):
    skip it. False if unfinished, or finished with another header and ``overwrite``: (re)write it. A shard
    finished with another header without ``overwrite`` is a FeatureStoreError naming the differing keys."""
    return _check_or_skip(Path(out_dir), rank, meta, overwrite)


def _check_or_skip(out_dir: Path, rank: int, meta: dict[str, Any], overwrite: bool) -> bool:
    """True if shard ``rank`` is already finished with this header (skip it); raise if finished with another."""
    if not shard_done(out_dir, rank):
        return False
    old = store_meta(read_shard_header(out_dir, rank))
    if _same_meta(old, meta):
        return True
    if overwrite:
        return False
    raise FeatureStoreError(
        f"{out_dir}/shard.{rank}: already dumped with a different header ({_diff(old, meta)}); "
        "use --overwrite (overwrite=True) to redo it, or choose another --out"
    )


def _dump(
    dd: DataDir,
    out_dir: Path,
    batch_fn: BatchFn,
    meta: dict[str, Any],
    nshard: int | None,
    rank: int | None,
    overwrite: bool,
    chunk_seconds: float,
    workers: int,
    shard_post: Callable[[list[Utterance]], Callable[[Utterance, np.ndarray], np.ndarray]] | None = None,
) -> bool:
    """Shared driver of ``dump_features`` and ``dump_with``: this process's shards (``resolve_shards``), then
    True if every shard of the store is finished. ``shard_post(shard's utterances)``, if given, returns a
    function ``(utterance, features) -> features`` applied to each utterance of that shard before it is written
    (per-speaker CMVN)."""
    utt_ids = dd.utt_ids()
    if not utt_ids:
        raise UserError("data dir has no utterances")
    nshard, ranks = resolve_shards(nshard, rank)
    meta = dump_meta(meta, utt_ids, nshard)
    for r in ranks:
        if _check_or_skip(out_dir, r, meta, overwrite):
            log.info("%s: shard %d/%d already finished with the same header, skipped", out_dir, r, nshard)
            continue
        start, end = shard_range(len(utt_ids), nshard, r)
        utts = [dd.utterance(u) for u in utt_ids[start:end]]
        post = shard_post(utts) if shard_post is not None else None
        with FeatureWriter(out_dir, r, nshard, meta, overwrite=overwrite) as writer, progress_bar(
            total=len(utts), desc=f"features shard {r}/{nshard}", unit="utt", dynamic_ncols=True
        ) as bar:
            for chunk in _load_chunks(utts, chunk_seconds, workers):
                for u, wav in chunk:
                    if num_frames(len(wav)) == 0:
                        raise UserError(
                            f"utt {u.utt_id} ({u.source}): {len(wav) / SAMPLE_RATE:.3f} s is shorter than one 25 ms "
                            "frame; drop it (speechssl data filter --min-duration 0.1)"
                        )
                feats = batch_fn([w for _, w in chunk])
                for (u, wav), f in zip(chunk, feats):
                    f = np.asarray(f) if post is None else post(u, np.asarray(f))
                    if f.ndim != 2:
                        raise ValueError(f"utt {u.utt_id}: feature function returned shape {f.shape}, expected [T, D]")
                    writer.add(u.utt_id, f)
                bar.update(len(chunk))
        log.info("%s: shard %d/%d: %d utterances, %d frames", out_dir, r, nshard, writer.num_utts, writer.num_frames)
    missing = [r for r in range(nshard) if not shard_done(out_dir, r)]
    if missing:
        log.info("%s: waiting for shard(s) %s of %d (other ranks, or rerun without --rank)", out_dir, missing, nshard)
    return not missing


def dump_features(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str = "mfcc",
    nshard: int | None = None,
    rank: int | None = None,
    cmvn: bool | str = False,
    device: str = "cpu",
    overwrite: bool = False,
    batch_seconds: float | None = None,
    workers: int = 2,
) -> bool:
    """Dump ``kind`` ("mfcc": 39-d fairseq HuBERT iteration-1 MFCC; "fbank": 80-d log-mel) features at 100 Hz.

    Shards by :func:`speechssl.sharding.resolve_shards` (``nshard=None``: ``$WORLD_SIZE``, else 1; ``rank=None``:
    the torchrun worker's shards, else every shard); returns True once every shard is finished. Audio is read
    with ``workers`` threads and features are computed in padded batches of at most ``batch_seconds`` of audio on
    ``device`` (default: 10 s on CPU, 300 s on GPU, see ``default_batch_seconds``).

    ``cmvn``: ``"mean"``/``"meanvar"`` normalise each utterance by its own statistics; ``"spk-mean"``/
    ``"spk-meanvar"`` by its speaker's (utt2spk), as Kaldi's ``compute-cmvn-stats --spk2utt | apply-cmvn`` does.
    Both act on the static features, before MFCC deltas. Per-speaker statistics are summed over every utterance
    of the speakers in a shard, wherever they lie, so the numbers do not depend on ``nshard``. That pass reads the
    audio and computes the static features once more (cheap beside reading; holding a shard's features in RAM
    instead would not scale to a large corpus).
    """
    meta = feature_meta(kind, cmvn)
    mode = meta["source"]["options"]["cmvn"]
    dd = read_data_dir(data_dir)
    chunk_seconds = max(60.0, 4 * (batch_seconds or default_batch_seconds(device)))  # audio held in RAM at once
    if mode is None or not mode.startswith("spk-"):
        extract = batch_extractor(kind, cmvn=mode or False, device=device, batch_seconds=batch_seconds)
        return _dump(dd, Path(out_dir), extract, meta, nshard, rank, overwrite, chunk_seconds=chunk_seconds,
                     workers=workers)
    # the speakers decide the numbers: a store dumped under another utt2spk is refused (or redone). Like the utterance
    # list, they belong to the data (source.data), not to the kind of features a k-means model accepts.
    meta["source"]["data"] = {"utt2spk_sha1": ids_sha1([f"{u} {dd.utt2spk[u]}" for u in dd.utt_ids()])}
    statics = batch_extractor(kind, device=device, batch_seconds=batch_seconds, deltas=False)

    def shard_post(utts: list[Utterance]) -> Callable[[Utterance, np.ndarray], np.ndarray]:
        norm = speaker_cmvn(dd, {u.speaker for u in utts}, statics, variance=mode == "spk-meanvar",
                            chunk_seconds=chunk_seconds, workers=workers)

        def post(u: Utterance, x: np.ndarray) -> np.ndarray:
            shift, scale = norm[u.speaker]
            y = ((x.astype(np.float64) - shift) * scale).astype(np.float32)
            if kind == "mfcc":
                y = add_deltas(torch.from_numpy(y), order=2, window=2, mode="fairseq").numpy()
            return y

        return post

    return _dump(dd, Path(out_dir), statics, meta, nshard, rank, overwrite, chunk_seconds=chunk_seconds,
                 workers=workers, shard_post=shard_post)


def speaker_cmvn(
    dd: DataDir,
    speakers: set[str],
    statics: BatchFn,
    *,
    variance: bool,
    chunk_seconds: float = 60.0,
    workers: int = 2,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{speaker: (mean, scale)}`` over every frame of every utterance of ``speakers`` (``statics`` gives the
    features): ``(x - mean) * scale`` is the speaker's CMVN. ``scale`` is ``1 / std`` (variance floored at 1e-10,
    as ``apply_cmvn``) with ``variance``, else ones."""
    utts = [dd.utterance(u) for u in dd.utt_ids() if dd.utt2spk[u] in speakers]
    sums: dict[str, list] = {}
    for chunk in _load_chunks(utts, chunk_seconds, workers):
        for (u, _), x in zip(chunk, statics([w for _, w in chunk])):
            x = np.asarray(x, dtype=np.float64)
            acc = sums.setdefault(u.speaker, [0, 0.0, 0.0])
            acc[0] += len(x)
            acc[1] = acc[1] + x.sum(0)
            acc[2] = acc[2] + (x * x).sum(0)
    out = {}
    for spk, (n, s1, s2) in sums.items():
        if n == 0:  # every utterance shorter than a frame: the dump names the first one, as for any too-short utterance
            continue
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
        out[spk] = (mean, 1.0 / np.sqrt(np.maximum(var, 1e-10)) if variance else np.ones_like(mean))
    return out


def dump_with(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fn: Callable[[np.ndarray], np.ndarray],
    meta: dict[str, Any],
    *,
    nshard: int | None = None,
    rank: int | None = None,
    overwrite: bool = False,
    workers: int = 2,
) -> bool:
    """Dump ``fn(wav) -> [T, D]`` for every utterance (``wav``: float32 [-1, 1] at 16 kHz).

    The generic path for hidden-layer features of a model: the caller (``units``) owns the model and passes
    ``meta`` = ``{"kind": "hubert_l6", "frame_rate": 50.0, "dtype": "float16", "source": {"checkpoint_sha1": ...,
    "layer": 6}}``; the features room never imports models. Shards, skipping, ``overwrite`` and the result as
    ``dump_features``.
    """
    dd = read_data_dir(data_dir)

    def run(wavs: list[np.ndarray]) -> list[np.ndarray]:
        return [fn(w) for w in wavs]

    return _dump(dd, Path(out_dir), run, meta, nshard, rank, overwrite, chunk_seconds=60.0, workers=workers)
