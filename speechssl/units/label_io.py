"""Labelling with a fitted k-means model: every utterance's frames to their nearest centroid, written per utterance
id, per shard (``shards/R-of-N.km`` + header), and merged into one sorted ``text.km`` with ``meta.json`` by
whichever process finishes the last shard (:func:`merge_label_shards`). Which shards a process labels is the one
rule of :mod:`speechssl.sharding` (``--rank``, else torchrun, else all).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from speechssl import __version__
from speechssl.data.kaldi import c_sorted
from speechssl.fileio import atomic_path, atomic_write_text
from speechssl.progress import progress_bar
from speechssl.sharding import ids_sha1, resolve_shards, shard_items
from speechssl.units.fit import ASSIGN_BATCH, FEATURE_KEYS, Assigner, KMeansModel, feature_spec
from speechssl.units.labels import LabelError, META_NAME, TEXT_NAME, format_label_line, framing_from_features

__all__ = ["label_with", "label_store", "merge_label_shards"]

log = logging.getLogger(__name__)


def _shard_paths(out_dir: Path, rank: int, nshard: int) -> tuple[Path, Path]:
    base = out_dir / "shards" / f"{rank}-of-{nshard}"
    return base.with_suffix(".km"), base.with_suffix(".json")


def _without_data(spec: Mapping[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    if isinstance(spec.get("source"), Mapping):
        spec["source"] = {k: v for k, v in spec["source"].items() if k != "data"}
    return spec


def _check_features(km: KMeansModel, meta: Mapping[str, Any]) -> None:
    """The features to label must be the kind the centroids were fitted on (kind, dim, frame rate, source)."""
    # Which utterances the features came from (source["data"]) is not part of their kind: dev features are
    # labelled with centroids fitted on train.
    fitted = _without_data(km.meta.get("features") or {})
    here = _without_data(feature_spec(meta))
    diff = {key: (fitted.get(key), here.get(key)) for key in FEATURE_KEYS if fitted.get(key) != here.get(key)}
    if diff:
        raise LabelError(
            f"features differ from those the k-means model was fitted on (fitted vs now): {diff}; "
            "fit k-means on these features, or pass check_features=False if you are sure"
        )


def _iter_feats(features: Callable[[str], np.ndarray] | Iterable[tuple[str, np.ndarray]],
                ids: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(utt, feats)`` for exactly ``ids``: call a function per id, or check an iterator yields each id once."""
    if callable(features):
        for utt in ids:
            yield utt, features(utt)
        return
    wanted, seen = set(ids), set()
    for utt, feats in features:
        if utt not in wanted:
            raise LabelError(f"utt {utt}: yielded by the feature iterator but not among this rank's utterance ids")
        if utt in seen:
            raise LabelError(f"utt {utt}: yielded twice by the feature iterator")
        seen.add(utt)
        yield utt, feats
    missing = wanted - seen
    if missing:
        raise LabelError(f"feature iterator ended without {len(missing)} utterance(s), e.g. {c_sorted(missing)[:3]}")


def _shard_header(model: KMeansModel, meta: Mapping[str, Any], ids: list[str], rank: int, nshard: int) -> dict[str, Any]:
    """Header of label shard ``rank`` (``num_labels`` and ``created_by`` are added when it is written)."""
    return {
        "rank": rank, "nshard": nshard, "num_utts": len(ids), "utts_sha1": ids_sha1(ids),
        "first": ids[0] if ids else None, "last": ids[-1] if ids else None,
        "label_rate": float(meta["frame_rate"]), "k": model.k, "kmeans_hash": model.hash,
        "features": feature_spec(meta), "framing": framing_from_features(meta),
    }


def _shard_finished(out: Path, header: Mapping[str, Any]) -> bool:
    """True if label shard ``header["rank"]`` is already written with this header (same model, features, ids)."""
    km_path, head_path = _shard_paths(out, header["rank"], header["nshard"])
    if not (km_path.exists() and head_path.exists()):
        return False
    try:
        old = json.loads(head_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(old.get(key) == value for key, value in header.items())


def _label_shard(
    features: Callable[[str], np.ndarray] | Iterable[tuple[str, np.ndarray]],
    ids: list[str],
    model: KMeansModel,
    out: Path,
    header: dict[str, Any],
    *,
    device: str,
    batch_frames: int,
    progress: bool,
) -> None:
    """Write ``shards/R-of-N.km`` (sorted lines of ``ids``) and then its header (the shard's commit marker)."""
    rank, nshard = header["rank"], header["nshard"]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)  # the merged labels are stale from here until the merge
    km_path, head_path = _shard_paths(out, rank, nshard)
    head_path.unlink(missing_ok=True)
    for stale in km_path.parent.glob(f".{km_path.name}.*.tmp.km"):  # left by a killed writer of this shard
        stale.unlink(missing_ok=True)
    assign = Assigner(model.centroids, device=device, batch=batch_frames)
    unit_dtype = np.int16 if model.k <= 32768 else np.int32
    results: dict[str, np.ndarray] = {}  # labelled, not yet written (only grows if input comes out of order)
    buf: list[tuple[str, np.ndarray]] = []
    buffered = total = next_i = 0
    with atomic_path(km_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:

        def flush() -> None:
            """Assign the buffered frames in one batch; write every line that is next in sorted order."""
            nonlocal buffered, next_i
            if buf:
                labels = assign(np.concatenate([f for _, f in buf])).astype(unit_dtype)
                s = 0
                for utt, f in buf:
                    results[utt] = labels[s : s + len(f)]
                    s += len(f)
                buf.clear()
                buffered = 0
            while next_i < len(ids) and ids[next_i] in results:
                fh.write(format_label_line(ids[next_i], results.pop(ids[next_i])))
                next_i += 1

        for utt, feats in progress_bar(_iter_feats(features, ids), total=len(ids), unit="utt",
                                       desc=f"labelling rank {rank}/{nshard}", disable=not progress):
            f = np.asarray(feats)
            if f.ndim != 2 or f.shape[1] != model.dim:
                raise LabelError(f"utt {utt}: features of shape {f.shape}, k-means dim is {model.dim}")
            if not np.isfinite(f).all():
                raise LabelError(f"utt {utt}: features contain NaN/inf")
            buf.append((utt, f))
            buffered += len(f)
            total += len(f)
            if buffered >= batch_frames:
                flush()
        flush()
        assert next_i == len(ids) and not results, "every utterance of the block is written exactly once"
    header = dict(header, num_labels=total, created_by=f"speechssl {__version__}")
    atomic_write_text(head_path, json.dumps(header, indent=1, sort_keys=True) + "\n")


def label_with(
    features: Callable[[str], np.ndarray] | Iterable[tuple[str, np.ndarray]],
    utt_ids: Iterable[str],
    km: KMeansModel | str | os.PathLike,
    out_dir: str | os.PathLike,
    meta: Mapping[str, Any],
    *,
    rank: int | None = None,
    nshard: int | None = None,
    device: str = "auto",
    batch_frames: int = ASSIGN_BATCH,
    check_features: bool = True,
    progress: bool = True,
) -> bool:
    """Label this process's shards of ``utt_ids`` and merge when every shard is done.

    Shards by :func:`speechssl.sharding.resolve_shards`: ``rank`` given, that shard; under torchrun, the worker's
    shards; otherwise every shard in turn. A shard is the contiguous block :func:`speechssl.sharding.shard_items`
    of the C-sorted ids; one already written with the same header (k-means model, features, ids) is skipped.
    ``features`` is ``fn(utt) -> [T, D]`` (e.g. a model layer computed on the fly) or an iterator of
    ``(utt, feats)`` over exactly the one shard this process labels, in any order. ``meta`` is the
    feature-store-style header of those features (``kind``, ``dim``, ``frame_rate``, ``source``, optional
    ``framing``); ``frame_rate`` becomes the label rate. Returns True if the merged ``text.km`` + ``meta.json`` are
    complete after this call (whichever process finishes the last shard merges; merging is idempotent).
    """
    model = km if isinstance(km, KMeansModel) else KMeansModel.load(km)
    if check_features:
        _check_features(model, meta)
    if "frame_rate" not in meta:
        raise LabelError(f"feature meta needs 'frame_rate' (the label rate), got {dict(meta)!r}")
    nshard, ranks = resolve_shards(nshard, rank)
    if not callable(features) and len(ranks) > 1:
        raise LabelError(f"a feature iterator covers one shard, but this process labels shards {ranks} of "
                         f"{nshard}; pass rank=, or a function utt -> features")
    out = Path(out_dir)
    ids = c_sorted(utt_ids)
    for r in ranks:
        block = shard_items(ids, nshard, r)
        header = _shard_header(model, meta, block, r, nshard)
        if _shard_finished(out, header):
            log.info("labels in %s: shard %d/%d already done with this k-means model, skipped", out, r, nshard)
            continue
        _label_shard(features, block, model, out, header, device=device, batch_frames=batch_frames,
                     progress=progress)
    return merge_label_shards(out, nshard, kmeans_hash=model.hash)


def merge_label_shards(out_dir: str | os.PathLike, nshard: int, *, kmeans_hash: str | None = None) -> bool:
    """Concatenate ``shards/R-of-N.km`` (R = 0..N-1) into ``text.km`` + ``meta.json`` if all are done and agree.

    Returns False (logging which ranks are missing or stale) while some rank is unfinished or was made with
    another k-means model than ``kmeans_hash``. Safe to run from several ranks at once: each writes a temp file
    and renames; all produce the same bytes.
    """
    out = Path(out_dir)
    heads: list[dict[str, Any]] = []
    missing, stale = [], []
    for r in range(nshard):
        km_path, head_path = _shard_paths(out, r, nshard)
        if not head_path.exists() or not km_path.exists():
            missing.append(r)
            continue
        h = json.loads(head_path.read_text())
        if kmeans_hash is not None and h.get("kmeans_hash") != kmeans_hash:
            stale.append(r)
        heads.append(h)
    if missing or stale:
        log.info("labels in %s: waiting for rank(s) %s%s", out, missing,
                 f"; rank(s) {stale} were made with another k-means model and must be rerun" if stale else "")
        return False
    ref = {key: heads[0][key] for key in ("label_rate", "k", "kmeans_hash", "features", "framing")}
    for h in heads[1:]:
        for key, value in ref.items():
            if h.get(key) != value:
                raise LabelError(f"{out}/shards: rank {h['rank']} has {key}={h.get(key)!r}, rank 0 has {value!r}; "
                                 f"rerun rank {h['rank']}")
    prev: bytes | None = None
    n_utts = n_labels = 0
    with atomic_path(out / TEXT_NAME) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r, h in enumerate(heads):
            km_path, _ = _shard_paths(out, r, nshard)
            rows = 0
            with open(km_path, encoding="utf-8") as src:
                for line in src:
                    parts = line.split()
                    key = parts[0].encode()
                    if prev is not None and key <= prev:
                        raise LabelError(f"{km_path}: utt {parts[0]} out of order or duplicated; rerun rank {r}")
                    prev = key
                    rows += 1
                    n_labels += len(parts) - 1
                    fh.write(line)
            if rows != h["num_utts"]:
                raise LabelError(f"{km_path}: {rows} utterances, header says {h['num_utts']}; rerun rank {r}")
            n_utts += rows
    meta = dict(ref, num_utts=n_utts, num_labels=n_labels, nshard=nshard, created_by=f"speechssl {__version__}")
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return True


def label_store(
    feats_dir: str | os.PathLike,
    km_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    nshard: int | None = None,
    device: str = "auto",
    batch_frames: int = ASSIGN_BATCH,
) -> bool:
    """``speechssl kmeans label``: label every utterance of a feature store, sharded as :func:`label_with`
    (``rank=None``: the torchrun worker's shards, else all); True once the merged labels are complete."""
    from speechssl.features.store import FeatureReader

    reader = FeatureReader(feats_dir)
    return label_with(reader.__getitem__, reader.ids, km_dir, out_dir, reader.meta, rank=rank, nshard=nshard,
                      device=device, batch_frames=batch_frames)
