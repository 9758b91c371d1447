"""Frozen-upstream features for SUPERB heads: extracted once into the feature store, or computed every step.

s3prl runs the frozen upstream again on every step of every epoch (s3prl#390). Here the layers a task needs are
extracted once per (upstream fingerprint, layer set, data-dir fingerprint) into per-layer feature stores
(:mod:`speechssl.features.store`, float16), and heads train from memory-mapped reads:

    CACHE_ROOT/<upstream label>-<key>/layer_<L>/shard.R.{bin,index,json,done}   one store per layer
    CACHE_ROOT/<upstream label>-<key>/cache.json                              written last: the cache is complete

``key`` = SHA-1 of the upstream's fingerprint (weights SHA-1 or spectral options), the layer list and the data
fingerprint (utterance ids, their audio sources and segment times, file sizes and mtimes). The disk estimate is
logged before anything is written (and a cache larger than the free space is refused). Extraction is resumable:
utterances are cut into shards of ``shard_utts`` (C-sorted, contiguous: :func:`speechssl.sharding.shard_range`),
a shard finished in every layer is skipped on a rerun, an unfinished one redone.

The stores are written by ``speechssl.upstream.extract.extract_with`` (``speechssl extract``'s function: the one
way hidden layers are dumped), so a cache layer is an ordinary feature store of kind ``hubert_l<L>``.

Both feature sources give the same thing: ``source.get(utt_ids) -> (layers [L, B, T, D] float32, lens [B])``.
:class:`CachedFeatures` reads the stores; :class:`LiveFeatures` loads audio and runs the upstream (``--cache none``:
for upstreams too large to cache, and the s3prl-style reference of ``tools/bench/superb.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from speechssl.audio import SAMPLE_RATE, is_pipe
from speechssl.data.durations import durations_of
from speechssl.data.kaldi import DataDir, load_utterance, read_data_dir
from speechssl.errors import UserError
from speechssl.features.store import FeatureReader
from speechssl.fileio import atomic_write_text

__all__ = ["FeatureSource", "CachedFeatures", "LiveFeatures", "PooledFeatures", "UnionFeatures", "build_cache",
           "cache_dir_for", "data_fingerprint", "disk_estimate", "forward_layers"]

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class FeatureSource(Protocol):
    layers: list[int]
    dim: int
    frame_rate: float

    def get(self, utt_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``([L, B, T, D] float32, lens [B])`` for these utterances (zero-padded past each length)."""


def data_fingerprint(dd: DataDir) -> str:
    """SHA-1 of what the features of a data dir depend on: per utterance (C-sorted) its id, audio source,
    segment times, and for a file source its size and mtime (a regenerated corpus gets a new fingerprint)."""
    h = hashlib.sha1()
    for utt in dd.utterances():
        stat = ""
        if not is_pipe(utt.source):
            try:
                st = os.stat(utt.source)
                stat = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stat = "missing"
        h.update(f"{utt.utt_id}\t{utt.source}\t{utt.start}\t{utt.end}\t{stat}\n".encode())
    return h.hexdigest()


def cache_dir_for(cache_root: str | Path, label: str, upstream_sha1: str, layers: Sequence[int],
                  data_sha1: str) -> Path:
    """The cache directory of one (upstream, layers, data) triple."""
    key = hashlib.sha1(json.dumps({"v": CACHE_VERSION, "upstream": upstream_sha1, "layers": list(layers),
                                   "data": data_sha1, "dtype": "float16"}).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "upstream"
    return Path(cache_root) / f"{safe}-{key}"


def disk_estimate(total_seconds: float, frame_rate: float, dims: Sequence[int], bytes_per_value: int = 2) -> int:
    """Bytes of a float16 cache of ``dims`` layers over ``total_seconds`` of audio."""
    return int(total_seconds * frame_rate * sum(dims) * bytes_per_value)


def _pad_stack(per_utt: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """``[L, T_i, D]`` arrays -> ``([L, B, T_max, D] float32, lens [B])``."""
    lens = torch.tensor([a.shape[1] for a in per_utt], dtype=torch.long)
    L, D = per_utt[0].shape[0], per_utt[0].shape[2]
    out = torch.zeros(L, len(per_utt), int(lens.max()), D)
    for b, a in enumerate(per_utt):
        out[:, b, : a.shape[1]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out, lens


class CachedFeatures:
    """Reads a finished cache directory (see the module docstring)."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        info_path = self.cache_dir / "cache.json"
        if not info_path.is_file():
            raise UserError(f"{info_path}: no such file; the feature cache is unfinished (rerun to complete it)")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        self.layers = [int(x) for x in self.info["layers"]]
        self.readers = [FeatureReader(self.cache_dir / f"layer_{layer}") for layer in self.layers]
        self.dim = int(self.info["dim"])
        self.frame_rate = float(self.info["frame_rate"])

    def __contains__(self, utt: str) -> bool:
        return utt in self.readers[0]

    def num_frames(self, utt: str) -> int:
        return self.readers[0].num_frames(utt)

    def get(self, utt_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        per_utt = []
        for utt in utt_ids:
            if utt not in self.readers[0]:
                raise UserError(f"{self.cache_dir}: utterance {utt} is not in the feature cache (the data dir changed "
                                "after it was built?)")
            per_utt.append(np.stack([r[utt] for r in self.readers]))
        return _pad_stack(per_utt)


class PooledFeatures:
    """Each utterance's per-layer time mean, as a one-frame utterance: ``get`` -> ``([L, B, 1, D], ones [B])``.

    For heads that are linear up to a mean over time (mean-pool + linear: KS, SID, ER, IC) behind a linear featurizer
    (weighted sum without per-layer norm), ``mean_t(P(sum_l w_l h_lt)) = P(sum_l w_l mean_t h_lt)``: the same model,
    the same batches (still drawn by each utterance's duration) and, up to float rounding, the same losses, while a
    step costs a few hundred vectors instead of every frame. The means are computed once per utterance and kept.
    """

    def __init__(self, source: Any):
        self.source = source
        self.layers, self.dim, self.frame_rate = source.layers, source.dim, source.frame_rate
        self._means: dict[str, Tensor] = {}

    def __contains__(self, utt: str) -> bool:
        return utt in self.source

    def get(self, utt_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        todo = [u for u in dict.fromkeys(utt_ids) if u not in self._means]
        if todo:
            x, lens = self.source.get(todo)
            sums = x.sum(2)   # zero-padded past each length
            for b, u in enumerate(todo):
                self._means[u] = sums[:, b] / float(lens[b])
        return torch.stack([self._means[u] for u in utt_ids], 1).unsqueeze(2), torch.ones(len(utt_ids), dtype=torch.long)


class UnionFeatures:
    """One feature source over several per-data-dir sources (ER pools its data dirs): each utterance is read from
    the first source that has it."""

    def __init__(self, sources: Sequence[Any]):
        self.parts = list(sources)
        self.layers, self.dim, self.frame_rate = self.parts[0].layers, self.parts[0].dim, self.parts[0].frame_rate

    def __contains__(self, utt: str) -> bool:
        return any(utt in src for src in self.parts)

    def get(self, utt_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        if len(self.parts) == 1:
            return self.parts[0].get(utt_ids)
        per: dict[str, np.ndarray] = {}
        for src in self.parts:
            mine = [u for u in dict.fromkeys(utt_ids) if u in src and u not in per]
            if mine:
                x, lens = src.get(mine)
                per.update({u: x[:, b, : int(lens[b])].numpy() for b, u in enumerate(mine)})
        return _pad_stack([per[u] for u in utt_ids])


class LiveFeatures:
    """Runs the upstream on every call (``--cache none``; s3prl's way): loads the audio of the utterances and
    returns the selected layers. ``round_fp16`` rounds them as the cache stores them."""

    def __init__(self, upstream: nn.Module, dd: DataDir, layers: Sequence[int], *, round_fp16: bool = False):
        self.upstream, self.dd, self.layers = upstream, dd, [int(x) for x in layers]
        self.dim = int(upstream.hidden_sizes[self.layers[0]])
        self.frame_rate = float(upstream.frame_rate)
        self.round_fp16 = round_fp16

    def __contains__(self, utt: str) -> bool:
        return utt in self.dd.utt2spk

    def get(self, utt_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        wavs = [torch.from_numpy(load_utterance(self.dd.utterance(u), SAMPLE_RATE)) for u in utt_ids]
        return forward_layers(self.upstream, wavs, self.layers, round_fp16=self.round_fp16)


@torch.no_grad()
def forward_layers(upstream: nn.Module, wavs: list[Tensor], layers: Sequence[int], *,
                   round_fp16: bool = False) -> tuple[Tensor, Tensor]:
    """``([L, B, T, D] float32 on the CPU, lens [B])``: one upstream forward of a batch of waveforms, only the
    layers needed (``num_layers`` = the highest selected)."""
    top = max(layers)
    hidden, lens = upstream(wavs, num_layers=top if top > 0 else None)
    x = torch.stack([hidden[layer] for layer in layers]).float().cpu()
    lens = lens.cpu().long()
    mask = torch.arange(x.shape[2])[None, :] < lens[:, None]  # padded frames are garbage: zero them
    x = x * mask[None, :, :, None]
    if round_fp16:
        x = x.half().float()
    return x, lens


def build_cache(upstream: Any, data_dir: str | os.PathLike, layers: str | Sequence[int] = "all",
                cache_root: str | Path = "feature_cache", *, dd: DataDir | None = None,
                durations: dict[str, float] | None = None, device: str = "cpu", max_duration: float | None = None,
                shard_utts: int = 256, progress: bool = True) -> CachedFeatures:
    """Extract the layers of ``upstream`` for every utterance of the data dir into the cache (or find it done).

    ``upstream``: a :class:`speechssl.superb.upstreams.ResolvedUpstream` (its layers; ``layers`` is then unused),
    or a spec, resolved here with ``layers``. ``dd`` / ``durations``: the data dir already read (else read here).
    The stores are written by :func:`speechssl.upstream.extract.extract_with` (the one way layers are dumped:
    duration-sorted batches of at most ``max_duration`` padded seconds, rows independent of their batch,
    sharded and resumable) into ``<cache dir>/layer_<L>/``; ``nshard = ceil(utterances / shard_utts)``.
    Returns the reader of the finished cache.
    """
    from speechssl.upstream.extract import extract_with

    from speechssl.superb.upstreams import ResolvedUpstream, resolve_upstream

    up = upstream if isinstance(upstream, ResolvedUpstream) else resolve_upstream(upstream, layers, device=device)
    dd = read_data_dir(data_dir) if dd is None else dd
    data_sha1 = data_fingerprint(dd)
    out = cache_dir_for(cache_root, up.label, up.sha1, up.layers, data_sha1)
    if (out / "cache.json").is_file():
        log.info("feature cache %s: complete, reused", out)
        return CachedFeatures(out)
    utt_ids = dd.utt_ids()
    if not utt_ids:
        raise UserError(f"{data_dir}: data dir has no utterances")
    durs = durations_of(dd) if durations is None else durations
    dims = [int(up.module.hidden_sizes[x]) for x in up.layers]
    if len(set(dims)) != 1:
        raise UserError(f"{up.spec}: layers {up.layers} differ in width {dims}; select layers of one width")
    need = disk_estimate(sum(durs.values()), up.frame_rate, dims)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    log.info("feature cache %s: %s, layers %s, %d utterances (%.2f h): about %.2f GB on disk (float16), %.1f GB free",
             out, up.spec, up.layers, len(utt_ids), sum(durs.values()) / 3600, need / 1e9, free / 1e9)
    if need > free:
        raise UserError(f"{out}: the feature cache needs about {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is "
                        "free; use --cache none (upstream every step) or another --cache-dir")
    nshard = max(1, math.ceil(len(utt_ids) / shard_utts))
    complete = extract_with(up.module, up.sha1, data_dir, out, up.layers, max_duration=max_duration,
                            dtype="float16", nshard=nshard, progress=progress, dd=dd)
    if not complete:
        raise UserError(f"{out}: some shards are still being extracted by another process; rerun when it is done")
    info = {"version": CACHE_VERSION, "upstream": up.fingerprint, "layers": up.layers, "dim": dims[0],
            "frame_rate": up.frame_rate, "dtype": "float16", "data_sha1": data_sha1,
            "data_dir": str(data_dir), "num_utts": len(utt_ids), "seconds": round(sum(durs.values()), 3),
            "bytes_estimate": need, "nshard": nshard}
    atomic_write_text(out / "cache.json", json.dumps(info, indent=1) + "\n")
    return CachedFeatures(out)
