"""Hidden states of a data dir into feature stores: ``speechssl extract`` (the one way layers are dumped).

:func:`extract` loads any checkpoint :func:`speechssl.upstream.load` reads and writes one feature store per
requested layer, ``OUT/layer_<L>/``, each with the header :func:`speechssl.upstream.layer_feature_meta` (kind
``hubert_l<L>``, dim, frame rate, framing, ``source.checkpoint_sha1`` and ``source.layer``) plus, as every
``features`` dump, ``source.data`` (the data dir's utterance list) and the options that change the numbers
(``source.chunk`` when chunking, ``source.precision`` under bf16 autocast).

How a shard is computed:

* Sharding is :mod:`speechssl.sharding`'s rule: shard ``R`` of ``N`` is the contiguous block ``R`` of the
  C-sorted utterance ids (``--rank``, else torchrun's ``$RANK`` share, else every shard in turn), written by one
  :class:`~speechssl.features.store.FeatureWriter` per layer; a shard finished with the same header is skipped,
  an unfinished one redone (so a re-run after a crash or SIGKILL redoes only the missing shards), one finished
  with another header is an error unless ``overwrite``.
* Within a shard, utterances are sorted by duration (``utt2dur``, else audio headers; pipes are decoded) and
  packed into batches of at most ``max_duration`` seconds of padded audio (rows x longest row; an utterance
  longer than that is a batch of its own). The model runs only up to the deepest requested layer. Rows are
  independent (:class:`~speechssl.upstream.Upstream`: group norm statistics per row, padded frames masked), so
  the batching changes nothing but float rounding (<= 1e-4 in float32); ``max_duration=0`` runs one utterance
  per batch, the numbers of :func:`speechssl.upstream.layers_extractor`.
* The store holds utterances in the order they were computed (duration order within the shard); readers address
  them by id.
* ``sample_frac`` / ``seed`` (:func:`sample_utterances`): only a seeded, uniformly random fraction of the utterances,
  drawn from the sorted list before sharding and recorded in ``source.data.sample``: iteration 2 dumps only its
  k-means sample; the labels of every utterance come from the same forward (:func:`hidden_stream`) without a store
  (:mod:`speechssl.units.label_stream`).

Chunked inference (``chunk_seconds``), for recordings too long for global attention: an utterance longer than
``chunk_seconds`` goes through :func:`chunked_forward`: the frontend runs over the whole utterance (exact; the
waveform CNN window by window with the whole utterance's group norm statistics, so memory stays bounded), the
transformer on windows of ``chunk_seconds`` overlapping by ``overlap_seconds`` (default: a quarter of the chunk,
at least the positional conv's width), and each frame is taken from the window whose centre region holds it
(:func:`plan_windows`). Hidden state 0 is then exact; deeper layers are an approximation, since attention is
global (a frame of the whole utterance sees every other frame, one in a window only the window's). Measured
deviations (a random Base and a trained tiny model, 60 s recordings): ``tools/bench/README.md`` (extract); the
header records ``source.chunk`` (frames and overlap).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from speechssl.audio import SAMPLE_RATE
from speechssl.data.batching import padded_batches, prefetch
from speechssl.data.durations import durations_of
from speechssl.data.kaldi import DataDir, Utterance, load_utterance, read_data_dir
from speechssl.errors import UserError
from speechssl.features.dump import dump_meta, shard_finished
from speechssl.features.store import FeatureWriter, shard_done
from speechssl.progress import progress_bar
from speechssl.sharding import ids_sha1, resolve_shards, shard_items, torchrun_env
from speechssl.upstream import (
    Upstream,
    checkpoint_sha1,
    layer_feature_meta,
    load,
    parse_layers,
)

__all__ = ["Window", "plan_windows", "chunk_frames", "forward_rows", "chunked_forward", "extract_meta",
           "default_max_duration", "extract", "extract_with", "layer_dir", "PRECISIONS", "sample_utterances",
           "hidden_store_meta", "shard_utterances", "hidden_stream", "load_upstream"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast(bfloat16) around the forward


def layer_dir(out_dir: str | os.PathLike, layer: int) -> Path:
    """The feature store of hidden state ``layer`` under ``out_dir``: ``OUT/layer_<L>``."""
    return Path(out_dir) / f"layer_{int(layer)}"


def default_max_duration(device: str | torch.device) -> float:
    """Padded audio per batch, seconds: 40 on CPU (larger batches gain little there and raise peak memory),
    400 on GPU (kernel launches amortised; Base at 400 s is ~12 GB of activations at most in float32)."""
    return 40.0 if torch.device(device).type == "cpu" else 400.0


# ------------------------------------------------------------------------------------------------ chunking
@dataclass(frozen=True)
class Window:
    """Encoder frames ``[start, end)`` of an utterance run as one row; frames ``[keep[0], keep[1])`` are taken
    from it."""

    start: int
    end: int
    keep: tuple[int, int]


def plan_windows(num_frames: int, chunk_frames: int, overlap_frames: int) -> list[Window]:
    """Windows of ``chunk_frames`` covering ``num_frames`` frames, consecutive ones sharing at least
    ``overlap_frames`` (the last window ends at the last frame, so it may share more); each frame is kept from
    the window whose centre region holds it: the seam between two windows is the middle of their common
    frames, so a kept frame is at least ``overlap_frames // 2`` frames from the edge of its window (except at the
    utterance's own ends). One window when ``num_frames <= chunk_frames``."""
    if num_frames <= chunk_frames:
        return [Window(0, num_frames, (0, num_frames))]
    hop = chunk_frames - overlap_frames
    if overlap_frames < 0 or hop < 1:
        raise UserError(f"chunk of {chunk_frames} frames with an overlap of {overlap_frames}: need "
                        "0 <= overlap < chunk (--overlap-seconds below --chunk-seconds)")
    starts = list(range(0, num_frames - chunk_frames, hop)) + [num_frames - chunk_frames]
    seams = [0] + [(b + a + chunk_frames) // 2 for a, b in zip(starts, starts[1:])] + [num_frames]
    return [Window(a, a + chunk_frames, (seams[k], seams[k + 1])) for k, a in enumerate(starts)]


def chunk_frames(up: Upstream, chunk_seconds: float, overlap_seconds: float | None = None) -> tuple[int, int]:
    """``(chunk, overlap)`` in encoder frames of ``up``. ``overlap_seconds`` None: a quarter of the chunk, and at
    least the positional conv's width (HuBERT Base: 128 frames, 2.56 s), so that hidden state 0 of every kept
    frame is exact. UserError for a chunk under one second or an overlap outside ``[0, chunk)``."""
    kernel = int(getattr(up.model.config, "num_conv_pos_embeddings", 0))
    if overlap_seconds is None:
        overlap_seconds = max(chunk_seconds / 4, kernel / up.frame_rate)
    chunk = int(round(chunk_seconds * up.frame_rate))
    overlap = int(round(overlap_seconds * up.frame_rate))
    if chunk_seconds < 1.0 or not 0 <= overlap < chunk:
        raise UserError(f"--chunk-seconds {chunk_seconds:g} --overlap-seconds {overlap_seconds:g}: need a chunk "
                        "of at least 1 s and 0 <= overlap < chunk")
    if overlap < kernel:
        log.warning("overlap of %d frames is below the positional conv's %d: frames near the seams differ from "
                    "the whole utterance's already in hidden state 0", overlap, kernel)
    return chunk, overlap


def chunked_forward(up: Upstream, wav: np.ndarray, layers: Sequence[int], *, chunk_seconds: float,
                    overlap_seconds: float | None = None, max_duration: float | None = None,
                    precision: str = "fp32") -> dict[int, np.ndarray]:
    """``{layer: [T, D] float32}`` of one long utterance: the frontend over the whole utterance
    (:meth:`Upstream.frontend`: exact, memory of one window), then the transformer on overlapping windows of
    ``chunk_seconds`` (:func:`plan_windows`), as many rows per batch as ``max_duration`` seconds hold, stitched
    at the seams. ``T = up.num_frames(len(wav))``. The transformer's attention is global, so windows of an
    utterance longer than ``chunk_seconds`` approximate its whole-utterance states (see the module docstring)."""
    chunk, overlap = chunk_frames(up, chunk_seconds, overlap_seconds)
    seconds = default_max_duration(up.device) if max_duration is None else max_duration
    rows_per_batch = max(1, int(seconds * up.frame_rate) // chunk)
    top = max(layers)
    with _autocast(up, precision):
        x = up.frontend(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)))
        windows = plan_windows(x.shape[0], chunk, overlap)
        parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
        for b in range(0, len(windows), rows_per_batch):
            group = windows[b: b + rows_per_batch]
            hidden = up.encode(torch.stack([x[w.start: w.end] for w in group]), num_layers=top)
            for layer in layers:
                h = hidden[layer].float().cpu().numpy()
                parts[layer] += [h[i, w.keep[0] - w.start: w.keep[1] - w.start] for i, w in enumerate(group)]
    return {layer: np.concatenate(p) for layer, p in parts.items()}


def _autocast(up: Upstream, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(up.device.type, dtype=torch.bfloat16)


def forward_rows(up: Upstream, rows: Sequence[np.ndarray], layers: Sequence[int], *,
                 precision: str = "fp32") -> list[dict[int, np.ndarray]]:
    """One zero-padded batch of 1-D float32 waveforms -> per row ``{layer: [T_row, D] float32}`` (valid frames
    only), running the model up to ``max(layers)``."""
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    batch = torch.zeros(len(rows), int(lens.max()))
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32))
    with _autocast(up, precision):
        hidden, frame_lens = up(batch, lens, num_layers=max(layers))
    out: list[dict[int, np.ndarray]] = [{} for _ in rows]
    for layer in layers:
        h = hidden[layer].float().cpu().numpy()
        for i, t in enumerate(frame_lens.tolist()):
            out[i][layer] = h[i, :t]
    return out


def _max_samples(up: Upstream, max_duration: float | None) -> int:
    seconds = default_max_duration(up.device) if max_duration is None else float(max_duration)
    if seconds < 0:
        raise UserError(f"--max-duration must be >= 0 seconds, got {seconds:g}")
    return int(seconds * SAMPLE_RATE)


# ------------------------------------------------------------------------------------------------ stores
def extract_meta(up: Upstream, layer: int, ckpt_sha1: str, *, dtype: str = "float16",
                 chunk_seconds: float | None = None, overlap_seconds: float | None = None,
                 precision: str = "fp32") -> dict[str, Any]:
    """Store header of hidden state ``layer`` written by :func:`extract` (before ``source.data`` and ``nshard``):
    :func:`~speechssl.upstream.layer_feature_meta` plus ``source.chunk`` ``{"seconds", "overlap_seconds"}`` when
    chunking and ``source.precision`` when not fp32. Batch size and device are left out: they change nothing but
    float rounding."""
    if dtype not in ("float16", "float32"):
        raise UserError(f"--dtype must be float16 or float32, got {dtype!r}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    meta = layer_feature_meta(up, layer, ckpt_sha1, dtype=dtype)
    if chunk_seconds is not None:
        chunk, overlap = chunk_frames(up, chunk_seconds, overlap_seconds)
        meta["source"]["chunk"] = {"frames": chunk, "overlap_frames": overlap}
    if precision != "fp32":
        meta["source"]["precision"] = precision
    return meta


def _load(utt: Utterance) -> np.ndarray:
    return load_utterance(utt, SAMPLE_RATE)


def _extract_stream(up: Upstream, audio: Iterable[tuple[Any, np.ndarray]], layers: Sequence[int], *,
                    max_duration: float | None, chunk_seconds: float | None, overlap_seconds: float | None,
                    precision: str,
                    dtype: np.dtype) -> Iterator[tuple[Any, int, dict[int, np.ndarray]]]:
    """``(key, num_samples, {layer: [T, D] dtype})`` for each ``(key, waveform)`` of ``audio``, in order:
    consecutive utterances gathered into batches of at most ``max_duration`` seconds of padded audio (rows x
    longest row; a longer one alone); one longer than ``chunk_seconds`` (if given) through
    :func:`chunked_forward`."""
    limit = _max_samples(up, max_duration)

    def alone(wav: np.ndarray) -> bool:
        return chunk_seconds is not None and len(wav) > chunk_seconds * SAMPLE_RATE

    for batch in padded_batches(audio, lambda kw: math.inf if alone(kw[1]) else len(kw[1]), limit):
        if len(batch) == 1 and alone(batch[0][1]):
            key, wav = batch[0]
            outs = [chunked_forward(up, wav, layers, chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds,
                                    max_duration=max_duration, precision=precision)]
        else:
            outs = forward_rows(up, [w for _, w in batch], layers, precision=precision)
        for (key, wav), out in zip(batch, outs):
            yield key, len(wav), {layer: h.astype(dtype, copy=False) for layer, h in out.items()}


# ------------------------------------------------------------------------------------------------ the verb
def _checked(audio: Iterable[tuple[Utterance, np.ndarray]], up: Upstream) -> Iterator[tuple[Utterance, np.ndarray]]:
    for u, wav in audio:
        if up.num_frames(len(wav)) == 0:
            raise UserError(f"utt {u.utt_id} ({u.source}): {len(wav) / SAMPLE_RATE:.3f} s gives no frame of "
                            f"{up.source} (shorter than its receptive field); drop it (speechssl data filter "
                            "--min-duration 0.1)")
        yield u, wav


def sample_utterances(ids: Sequence[str], sample_frac: float | None, seed: int = 0) -> tuple[list[str], dict | None]:
    """A seeded, uniformly random ``sample_frac`` of the utterance list ``ids`` (the data dir's C-sorted ids):
    ``max(1, round(sample_frac * len(ids)))`` of them drawn without replacement with ``numpy`` ``default_rng(seed)``,
    returned in their sorted order with the record a store header keeps (``source.data.sample``: fraction, seed,
    and the size and :func:`~speechssl.sharding.ids_sha1` of the list sampled from). Drawn before sharding, so the
    same for any ``nshard``/``rank``. ``sample_frac`` None or 1: every utterance and no record."""
    if sample_frac is None or float(sample_frac) == 1.0:
        return list(ids), None
    frac = float(sample_frac)
    if not 0 < frac < 1:
        raise UserError(f"--sample-frac must be in (0, 1], got {sample_frac:g}")
    n = max(1, int(round(frac * len(ids))))
    picked = np.sort(np.random.default_rng(int(seed)).choice(len(ids), size=n, replace=False))
    record = {"frac": frac, "seed": int(seed), "of_num_utts": len(ids), "of_utts_sha1": ids_sha1(ids)}
    return [ids[i] for i in picked], record


def hidden_store_meta(up: Upstream, layer: int, ckpt_sha1: str, ids: Sequence[str], nshard: int, *,
                      dtype: str = "float16", chunk_seconds: float | None = None,
                      overlap_seconds: float | None = None, precision: str = "fp32",
                      sample: dict | None = None) -> dict[str, Any]:
    """The header every shard of :func:`extract`'s store of hidden state ``layer`` records for the utterance list
    ``ids`` cut in ``nshard`` shards: :func:`extract_meta` plus ``source.data`` (:func:`dump_meta`; with
    ``source.data.sample``, :func:`sample_utterances`'s record, when ``ids`` is a sample). Streaming labels
    (:func:`speechssl.units.label_stream.label_upstream`) label with this header, so theirs equal the dump's."""
    meta = extract_meta(up, layer, ckpt_sha1, dtype=dtype, chunk_seconds=chunk_seconds,
                        overlap_seconds=overlap_seconds, precision=precision)
    if sample is not None:
        meta["source"]["data"] = {"sample": dict(sample)}
    return json.loads(json.dumps(dump_meta(meta, ids, nshard)))  # plain JSON types, as a reader sees it


def shard_utterances(dd: DataDir, block: Sequence[str]) -> tuple[list[Utterance], float]:
    """The utterances of one shard's ``block`` of ids sorted by duration (the order they are computed and stored
    in), and their total seconds."""
    durs = durations_of(dd, block)
    durations = [durs[u] for u in block]
    order = sorted(range(len(block)), key=lambda i: durations[i])
    return [dd.utterance(block[i]) for i in order], float(sum(durations))


def hidden_stream(up: Upstream, utts: Sequence[Utterance], layers: Sequence[int], *,
                  max_duration: float | None = None, chunk_seconds: float | None = None,
                  overlap_seconds: float | None = None, precision: str = "fp32", dtype: str = "float16",
                  workers: int = 2) -> Iterator[tuple[Utterance, int, dict[int, np.ndarray]]]:
    """``(utt, num_samples, {layer: [T, D] dtype})`` for each of ``utts`` in order: audio read ahead by ``workers``
    threads, batches of ``max_duration`` padded seconds (chunked past ``chunk_seconds``), cast to the store
    ``dtype``. What :func:`extract` writes, and what streaming labels assign, computed the one way."""
    return _extract_stream(up, _checked(prefetch(_load, utts, workers=workers, ahead=32), up), layers, max_duration=max_duration,
                           chunk_seconds=chunk_seconds, overlap_seconds=overlap_seconds, precision=precision,
                           dtype=np.dtype(dtype))


def extract_with(up: Upstream, ckpt_sha1: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 layers: str | Sequence[int] = "all", *, max_duration: float | None = None, dtype: str = "float16",
                 nshard: int | None = None, rank: int | None = None, overwrite: bool = False,
                 chunk_seconds: float | None = None, overlap_seconds: float | None = None,
                 precision: str = "fp32", workers: int = 2, progress: bool = True,
                 sample_frac: float | None = None, seed: int = 0, dd: DataDir | None = None) -> bool:
    """:func:`extract` with an :class:`Upstream` already loaded and the SHA-1 naming its weights; returns True
    once every shard of every layer's store is finished. ``dd``: the data dir already read."""
    chosen = parse_layers(layers, up.num_layers, up.source)
    _max_samples(up, max_duration)  # option checks before any work
    dd = read_data_dir(data_dir) if dd is None else dd
    ids = dd.utt_ids()
    if not ids:
        raise UserError(f"{data_dir}: data dir has no utterances")
    ids, sample = sample_utterances(ids, sample_frac, seed)
    nshard, ranks = resolve_shards(nshard, rank)
    metas = {layer: hidden_store_meta(up, layer, ckpt_sha1, ids, nshard, dtype=dtype, chunk_seconds=chunk_seconds,
                                      overlap_seconds=overlap_seconds, precision=precision, sample=sample)
             for layer in chosen}
    for r in ranks:
        todo = [layer for layer in chosen if not shard_finished(layer_dir(out_dir, layer), r, metas[layer], overwrite)]
        if not todo:
            log.info("%s: shard %d/%d of layer(s) %s already finished with the same header, skipped", out_dir, r,
                     nshard, chosen)
            continue
        block = shard_items(ids, nshard, r)
        utts, seconds = shard_utterances(dd, block)
        with contextlib.ExitStack() as stack:
            writers = {layer: stack.enter_context(FeatureWriter(layer_dir(out_dir, layer), r, nshard, metas[layer],
                                                                overwrite=overwrite)) for layer in todo}
            bar_desc = f"extract shard {r}/{nshard} layer(s) {','.join(map(str, todo))}"
            bar = stack.enter_context(progress_bar(total=round(seconds, 1), unit="s", disable=not progress,
                                                   desc=bar_desc, dynamic_ncols=True))
            stream = hidden_stream(up, utts, todo, max_duration=max_duration, chunk_seconds=chunk_seconds,
                                   overlap_seconds=overlap_seconds, precision=precision, dtype=dtype, workers=workers)
            for u, num_samples, feats in stream:
                for layer, f in feats.items():
                    writers[layer].add(u.utt_id, f)
                bar.update(round(num_samples / SAMPLE_RATE, 3))
        log.info("%s: shard %d/%d: %d utterances, layer(s) %s", out_dir, r, nshard, len(block), todo)
    missing = [(layer, r) for layer in chosen for r in range(nshard) if not shard_done(layer_dir(out_dir, layer), r)]
    if missing:
        log.info("%s: waiting for %d shard(s) of other ranks (or rerun without --rank)", out_dir, len(missing))
    return not missing


def _source_sha1(path: str | os.PathLike) -> str:
    """What names the weights: :func:`checkpoint_sha1` of a checkpoint; ``random:<sha1 of config.json>`` of
    ``random:CKPT`` (seed 0: the config fixes the weights)."""
    return checkpoint_sha1(path)


def _device(device: str | None) -> str:
    """``device`` (None: cuda if available, else cpu); plain ``cuda`` under torchrun is ``cuda:$LOCAL_RANK``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    env = torchrun_env()
    if device == "cuda" and env is not None:
        device = f"cuda:{env.local_rank}"
    return device


def load_upstream(upstream: str | os.PathLike, *, device: str | None = None,
                  trust_pickle: bool = False) -> tuple[Upstream, str]:
    """``(model, SHA-1 naming its weights)`` of checkpoint ``upstream`` on ``device`` (None: cuda if available,
    else cpu; plain ``cuda`` under torchrun: ``cuda:$LOCAL_RANK``), as :func:`extract` loads it."""
    device = _device(device)
    return load(upstream, trust_pickle=trust_pickle, device=device), _source_sha1(upstream)


def extract(upstream: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
            layers: str | Sequence[int] = "all", *, max_duration: float | None = None, dtype: str = "float16",
            nshard: int | None = None, rank: int | None = None, device: str | None = None,
            trust_pickle: bool = False, overwrite: bool = False, chunk_seconds: float | None = None,
            overlap_seconds: float | None = None, precision: str = "fp32", workers: int = 2,
            progress: bool = True, sample_frac: float | None = None, seed: int = 0) -> bool:
    """``speechssl extract``: hidden states ``layers`` (``"all"``, ``"6,9"`` or a list; 0 = encoder input) of
    checkpoint ``upstream`` (anything :func:`speechssl.upstream.load` reads; pickles only with ``trust_pickle``)
    for every utterance of ``data_dir``, into ``OUT/layer_<L>/`` feature stores of ``dtype``.

    ``max_duration``: padded seconds of audio per batch (default :func:`default_max_duration`; 0: one utterance
    per batch). ``nshard`` / ``rank``: :mod:`speechssl.sharding`. ``device``: None = cuda if available, else cpu.
    ``chunk_seconds`` / ``overlap_seconds``: windows for utterances longer than ``chunk_seconds`` (see the module
    docstring). ``precision``: ``"fp32"`` or ``"bf16"`` (autocast). ``sample_frac`` / ``seed``: only that seeded
    random fraction of the utterances (:func:`sample_utterances`; the k-means sample of iteration 2, whose labels
    come from :func:`speechssl.units.label_stream.label_upstream` without a dump), recorded in the header.
    Returns True once every store is complete.
    """
    up, sha1 = load_upstream(upstream, device=device, trust_pickle=trust_pickle)
    return extract_with(up, sha1, data_dir, out_dir, layers, max_duration=max_duration,
                        dtype=dtype, nshard=nshard, rank=rank, overwrite=overwrite, chunk_seconds=chunk_seconds,
                        overlap_seconds=overlap_seconds, precision=precision, workers=workers, progress=progress,
                        sample_frac=sample_frac, seed=seed)
