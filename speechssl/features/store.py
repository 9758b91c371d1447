"""Sharded, memory-mapped feature store addressed by utterance id.

Layout of a store directory (one set of files per shard ``R`` of ``N``)::

    shard.R.bin     raw frames of every utterance in the shard, concatenated, C order, dtype from the header
    shard.R.index   text, one line per utterance: "<utt_id> <row_offset> <num_frames>" (offsets in frames)
    shard.R.json    header: kind, dim, frame_rate, dtype, nshard, source, created_by, plus shard counts
    shard.R.done    marker written last; a shard without it does not exist as far as readers are concerned

Why this shape: a writer streams frames to disk one utterance at a time (the corpus is never in RAM), ranks
write disjoint files so ``torchrun`` workers need no coordination, and a reader maps each ``.bin`` with
``np.memmap`` so k-means can stream through shards or pick single utterances without loading anything.

Writes are atomic per shard: data, index and header go to ``*.tmp`` files that are renamed on a clean close,
and the ``.done`` marker is written after the renames. An interrupted writer leaves no ``.done`` and the
shard is redone by the next dump. A finished shard is immutable: opening a writer on it raises unless
``overwrite=True`` (which first removes the ``.done`` marker, so a crash mid-rewrite leaves no valid shard).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from speechssl import __version__
from speechssl.errors import UserError

__all__ = ["FeatureStoreError", "FeatureWriter", "FeatureReader", "shard_done", "read_shard_header"]

_DTYPES = ("float32", "float16")
# Header keys that describe one shard, not the store; they may differ between shards.
_SHARD_KEYS = ("rank", "num_utts", "num_frames", "created_by")
_SHARD_RE = re.compile(r"^shard\.(\d+)\.(bin|index|json|done)$")


class FeatureStoreError(UserError):
    """A feature store is malformed, unfinished or inconsistent; the message names the file or utterance."""


def _paths(out_dir: Path, rank: int) -> dict[str, Path]:
    """Paths of the four files of shard ``rank``."""
    return {ext: out_dir / f"shard.{rank}.{ext}" for ext in ("bin", "index", "json", "done")}


def shard_done(out_dir: str | os.PathLike, rank: int) -> bool:
    """True if shard ``rank`` of the store at ``out_dir`` was finished (its ``.done`` marker exists)."""
    return _paths(Path(out_dir), rank)["done"].exists()


def read_shard_header(out_dir: str | os.PathLike, rank: int) -> dict[str, Any]:
    """The JSON header of a finished shard (raises FeatureStoreError if the shard is not finished)."""
    p = _paths(Path(out_dir), rank)
    if not p["done"].exists():
        raise FeatureStoreError(f"{p['done']}: shard {rank} is missing or unfinished (no .done marker); rerun the dump")
    try:
        return json.loads(p["json"].read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureStoreError(f"{p['json']}: unreadable shard header: {e}") from e


def store_meta(header: dict[str, Any]) -> dict[str, Any]:
    """The store-level part of a shard header (drops per-shard keys such as rank and counts)."""
    return {k: v for k, v in header.items() if k not in _SHARD_KEYS}


def _normalise_meta(meta: dict[str, Any], nshard: int) -> dict[str, Any]:
    """Validate a user meta dict and fill defaults; returns a JSON-serialisable copy."""
    m = dict(meta)
    if "kind" not in m or not isinstance(m["kind"], str) or not m["kind"]:
        raise FeatureStoreError(f"feature meta needs a non-empty 'kind' string, got {meta!r}")
    m.setdefault("dtype", "float32")
    if m["dtype"] not in _DTYPES:
        raise FeatureStoreError(f"feature dtype must be one of {_DTYPES}, got {m['dtype']!r}")
    if m.get("dim") is not None:
        if int(m["dim"]) <= 0:
            raise FeatureStoreError(f"feature dim must be positive, got {m['dim']!r}")
        m["dim"] = int(m["dim"])
    else:
        m["dim"] = None  # inferred from the first utterance
    if "frame_rate" not in m or float(m["frame_rate"]) <= 0:
        raise FeatureStoreError(f"feature meta needs a positive 'frame_rate' (Hz), got {meta!r}")
    m["frame_rate"] = float(m["frame_rate"])
    m.setdefault("source", {})
    if "nshard" in m and int(m["nshard"]) != nshard:
        raise FeatureStoreError(f"meta says nshard={m['nshard']} but the writer was opened with nshard={nshard}")
    m["nshard"] = nshard
    for k in _SHARD_KEYS:
        m.pop(k, None)
    try:
        json.dumps(m)
    except TypeError as e:
        raise FeatureStoreError(f"feature meta is not JSON-serialisable: {e}") from e
    return m


def _fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (used for small header/marker files)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class FeatureWriter:
    """Writes one shard of a feature store, one utterance at a time.

    ``FeatureWriter(out_dir, rank, nshard, meta)`` where ``meta`` holds ``kind`` (e.g. "mfcc", "hubert_l6"),
    ``frame_rate`` (Hz), optional ``dim`` (inferred from the first utterance otherwise), ``dtype``
    ("float32" default, "float16" allowed) and ``source`` (free dict: checkpoint hash, layer, options).
    Use as a context manager: a clean exit finishes the shard, an exception aborts it (temp files removed).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        nshard: int,
        meta: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> None:
        if nshard < 1 or not 0 <= rank < nshard:
            raise FeatureStoreError(f"need 0 <= rank < nshard, got rank={rank} nshard={nshard}")
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.nshard = nshard
        self.meta = _normalise_meta(meta, nshard)
        self._dtype = np.dtype(self.meta["dtype"])
        self._paths = _paths(self.out_dir, rank)
        if self._paths["done"].exists():
            if not overwrite:
                raise FeatureStoreError(
                    f"{self._paths['done']}: shard {rank} is finished and immutable; "
                    "use overwrite=True (CLI: --overwrite) to replace it"
                )
            self._paths["done"].unlink()  # from here on the old shard is invalid, so a crash cannot resurrect it
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(f"shard.{rank}.*.tmp*"):  # left by a crashed writer of this shard
            stale.unlink(missing_ok=True)
        suffix = f".tmp{os.getpid()}"
        self._tmp = {k: p.with_name(p.name + suffix) for k, p in self._paths.items() if k != "done"}
        self._bin = open(self._tmp["bin"], "wb")
        self._index = open(self._tmp["index"], "w")
        self._ids: set[str] = set()
        self._rows = 0
        self._closed = False

    @property
    def num_utts(self) -> int:
        """Utterances added so far."""
        return len(self._ids)

    @property
    def num_frames(self) -> int:
        """Frames (rows) added so far."""
        return self._rows

    def add(self, utt_id: str, feats: np.ndarray) -> None:
        """Append the ``[T, D]`` features of one utterance (cast to the store dtype; must be finite)."""
        if self._closed:
            raise FeatureStoreError(f"shard {self.rank}: writer already closed, cannot add {utt_id!r}")
        if not utt_id or any(c.isspace() for c in utt_id):
            raise FeatureStoreError(f"invalid utterance id {utt_id!r}: must be non-empty without whitespace")
        if utt_id in self._ids:
            raise FeatureStoreError(f"shard {self.rank}: duplicate utterance id {utt_id!r}")
        arr = np.asarray(feats)
        if arr.ndim != 2:
            raise FeatureStoreError(f"utt {utt_id}: features must be [T, D], got shape {arr.shape}")
        if self.meta["dim"] is None:
            self.meta["dim"] = int(arr.shape[1])
        if arr.shape[1] != self.meta["dim"]:
            raise FeatureStoreError(f"utt {utt_id}: feature dim {arr.shape[1]} != store dim {self.meta['dim']}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is caught just below
            arr = np.ascontiguousarray(arr, dtype=self._dtype)
        if not np.isfinite(arr).all():
            raise FeatureStoreError(f"utt {utt_id}: features contain NaN/inf (as {self._dtype.name})")
        self._bin.write(arr.tobytes())
        self._index.write(f"{utt_id} {self._rows} {arr.shape[0]}\n")
        self._ids.add(utt_id)
        self._rows += arr.shape[0]

    def close(self) -> None:
        """Finish the shard: fsync, rename temp files into place, write the header, then the ``.done`` marker."""
        if self._closed:
            return
        self._closed = True
        for f in (self._bin, self._index):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        header = dict(self.meta)
        header.update(rank=self.rank, num_utts=len(self._ids), num_frames=self._rows, created_by=f"speechssl {__version__}")
        _fsync_write(self._tmp["json"], json.dumps(header, indent=1, sort_keys=True) + "\n")
        for k in ("bin", "index", "json"):
            os.replace(self._tmp[k], self._paths[k])
        _fsync_write(self._paths["done"], "")

    def abort(self) -> None:
        """Drop everything written so far; the shard stays absent (no ``.done``)."""
        if self._closed:
            return
        self._closed = True
        for f in (self._bin, self._index):
            f.close()
        for p in self._tmp.values():
            p.unlink(missing_ok=True)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Shard:
    """One finished shard: ids, row offsets and the memory-mapped frames."""

    def __init__(self, out_dir: Path, rank: int, header: dict[str, Any]) -> None:
        p = _paths(out_dir, rank)
        self.rank = rank
        self.ids: list[str] = []
        starts: list[int] = []
        counts: list[int] = []
        try:
            lines = p["index"].read_text().splitlines()
        except OSError as e:
            raise FeatureStoreError(f"{p['index']}: cannot read shard index: {e}") from e
        expected = 0
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 3:
                raise FeatureStoreError(f"{p['index']}:{n}: expected '<utt> <offset> <num_frames>', got {line!r}")
            utt, off, cnt = parts[0], int(parts[1]), int(parts[2])
            if off != expected or cnt < 0:
                raise FeatureStoreError(f"{p['index']}:{n}: utt {utt}: offset {off} != expected {expected}")
            self.ids.append(utt)
            starts.append(off)
            counts.append(cnt)
            expected += cnt
        if len(self.ids) != header.get("num_utts") or expected != header.get("num_frames"):
            raise FeatureStoreError(
                f"{p['index']}: {len(self.ids)} utts / {expected} frames disagree with header "
                f"({header.get('num_utts')} / {header.get('num_frames')})"
            )
        self.offsets = np.asarray(starts + [expected], dtype=np.int64)
        dim = header["dim"] or 0
        dtype = np.dtype(header["dtype"])
        size = p["bin"].stat().st_size if p["bin"].exists() else -1
        if size != expected * dim * dtype.itemsize:
            raise FeatureStoreError(
                f"{p['bin']}: size {size} bytes, expected {expected} frames x {dim} x {dtype.itemsize} bytes "
                "(truncated or foreign file); rerun the dump with --overwrite"
            )
        if expected == 0 or dim == 0:
            self.data: np.ndarray = np.zeros((expected, dim), dtype=dtype)
        else:
            self.data = np.memmap(p["bin"], dtype=dtype, mode="r", shape=(expected, dim))


class FeatureReader:
    """Read-only view of a finished feature store: ``reader[utt]`` is a ``[T, D]`` memmap view.

    Opening checks that every shard ``0..nshard-1`` is finished, that their headers agree, that no utterance id
    occurs twice (across or within shards), and that no stray shard beyond ``nshard`` is present.
    ``ids`` follows shard order (sorted corpus order for stores written by ``dump``).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise FeatureStoreError(f"{self.out_dir}: feature store directory does not exist")
        ranks = sorted({int(m.group(1)) for f in os.listdir(self.out_dir) if (m := _SHARD_RE.match(f))})
        done = [r for r in ranks if shard_done(self.out_dir, r)]
        if not done:
            raise FeatureStoreError(f"{self.out_dir}: no finished shard (no shard.R.done); run `speechssl features dump`")
        headers = {r: read_shard_header(self.out_dir, r) for r in done}
        first = headers[done[0]]
        nshard = int(first["nshard"])
        for r, h in headers.items():
            if not _same_meta(store_meta(first), store_meta(h)):
                raise FeatureStoreError(
                    f"{self.out_dir}: header of shard {r} disagrees with shard {done[0]}: "
                    f"{_diff(store_meta(first), store_meta(h))}; redo the dump with --overwrite"
                )
        missing = [r for r in range(nshard) if r not in headers]
        if missing:
            raise FeatureStoreError(
                f"{self.out_dir}: shard(s) {missing} of {nshard} missing or unfinished (no .done); "
                "rerun `speechssl features dump` to finish them"
            )
        stray = [r for r in ranks if r >= nshard]
        if stray:
            raise FeatureStoreError(f"{self.out_dir}: stray shard file(s) for rank(s) {stray} >= nshard={nshard}; remove them")
        dims = {h["dim"] for h in headers.values() if h["dim"] is not None}
        self.meta: dict[str, Any] = store_meta(first)
        self.meta["dim"] = dims.pop() if dims else None
        self._shards = [_Shard(self.out_dir, r, headers[r]) for r in range(nshard)]
        self._where: dict[str, tuple[int, int]] = {}
        self.ids: list[str] = []
        for s in self._shards:
            for i, utt in enumerate(s.ids):
                if utt in self._where:
                    other = self._where[utt][0]
                    raise FeatureStoreError(
                        f"{self.out_dir}: utterance id {utt!r} occurs in shard {other} and shard {s.rank}"
                        if other != s.rank
                        else f"{self.out_dir}: utterance id {utt!r} occurs twice in shard {s.rank}"
                    )
                self._where[utt] = (s.rank, i)
                self.ids.append(utt)
        self.total_frames: int = int(sum(int(s.offsets[-1]) for s in self._shards))

    @property
    def dim(self) -> int | None:
        """Feature dimension (None only for a store without any utterance)."""
        return self.meta["dim"]

    @property
    def frame_rate(self) -> float:
        """Frames per second."""
        return float(self.meta["frame_rate"])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, utt: object) -> bool:
        return utt in self._where

    def _locate(self, utt: str) -> tuple[_Shard, int]:
        try:
            rank, i = self._where[utt]
        except KeyError:
            raise KeyError(f"utterance {utt!r} not in feature store {self.out_dir}") from None
        return self._shards[rank], i

    def __getitem__(self, utt: str) -> np.ndarray:
        s, i = self._locate(utt)
        return s.data[s.offsets[i] : s.offsets[i + 1]]

    def num_frames(self, utt: str) -> int:
        """Number of frames of ``utt`` (no data access)."""
        s, i = self._locate(utt)
        return int(s.offsets[i + 1] - s.offsets[i])

    def shard_arrays(self) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """Yield ``(ids, offsets, data)`` per shard for streaming passes.

        ``offsets`` has ``len(ids) + 1`` int64 entries: utterance ``ids[i]`` is ``data[offsets[i]:offsets[i+1]]``;
        ``data`` is the shard's ``[N, D]`` memmap (N = total frames of the shard).
        """
        for s in self._shards:
            yield list(s.ids), s.offsets, s.data

    def __repr__(self) -> str:
        return (
            f"FeatureReader({str(self.out_dir)!r}, kind={self.meta.get('kind')!r}, dim={self.dim}, "
            f"utts={len(self)}, frames={self.total_frames}, nshard={len(self._shards)})"
        )


def _same_meta(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Store metas agree; an empty shard (dim None) agrees with any dim."""
    a, b = dict(a), dict(b)
    if a.get("dim") is None or b.get("dim") is None:
        a.pop("dim", None)
        b.pop("dim", None)
    return a == b


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Human-readable list of differing keys."""
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))
