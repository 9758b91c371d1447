"""Unit labels keyed by utterance id, and the checks that keep them aligned with audio.

A label dir holds::

    text.km     "utt u1 u2 u3 ..." one line per utterance, sorted by utterance id in C byte order
    meta.json   {"label_rate": 100.0, "k": 100, "kmeans_hash": "...", "features": {...}, "framing": {...},
                 "num_utts": N, "num_labels": M}

fairseq aligns its ``.km`` files to the audio manifest by line number and only warns when a duration disagrees
by more than 0.1 s. Here every line carries its utterance id, and a consumer (the trainer) checks each
utterance through one helper, :func:`check_label_length`, against the number of frames the feature extractor
produces for that many samples (tolerance: one frame). ``meta.json`` is written after ``text.km`` and is the
commit marker: a label dir without it is unfinished.

Framing (how many frames a feature extractor makes of ``S`` samples) is a small JSON-able dict, kept in
``meta.json`` so that consumers need not know which extractor made the labels:

* ``{"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": true}`` (Kaldi MFCC/fbank):
  ``1 + (S - 400) // 160`` frames with snip_edges, ``(S + 80) // 160`` without;
* ``{"type": "conv", "layers": [[10, 5], [3, 2], ...]}`` (kernel, stride) of a waveform CNN, no padding:
  ``L <- (L - kernel) // stride + 1`` per layer (HuBERT: 49 frames per second of audio);
* absent: ``floor(S * label_rate / sample_rate)``, which is within one frame of a 50 Hz CNN but NOT of
  snip_edges MFCC (two frames short at 100 Hz); labels written by ``speechssl kmeans label`` always record it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from speechssl.data.kaldi import c_sorted
from speechssl.errors import UserError
from speechssl.fileio import atomic_write_text

__all__ = [
    "LabelError",
    "LabelSet",
    "read_labels",
    "write_labels",
    "expected_num_frames",
    "framing_from_features",
    "check_label_length",
    "label_stride",
    "check_same_utterances",
    "check_labels_cover",
    "atomic_write_text",
]

TEXT_NAME = "text.km"
META_NAME = "meta.json"


class LabelError(UserError):
    """Labels are malformed or disagree with audio / features; the message names the utterance and file."""


# ----------------------------------------------------------------------------------------------- small helpers


def _unit_dtype(k: int) -> np.dtype:
    """Smallest signed dtype for unit ids below ``k`` (int16 halves the RAM of 960 h of labels)."""
    return np.dtype(np.int16) if k <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


# -------------------------------------------------------------------------------------------------- framing


def expected_num_frames(num_samples: int, framing: Mapping[str, Any] | None, label_rate: float,
                        sample_rate: int = 16000) -> int:
    """Frames a feature extractor described by ``framing`` produces from ``num_samples`` samples.

    See the module docstring for the framing dict. With ``framing=None`` the count is
    ``floor(num_samples * label_rate / sample_rate)``.
    """
    s = int(num_samples)
    if framing is None:
        return int(math.floor(s * float(label_rate) / sample_rate + 1e-9))
    kind = framing.get("type")
    if kind == "window":
        length, shift = int(framing["frame_length"]), int(framing["frame_shift"])
        if framing.get("snip_edges", True):
            return 0 if s < length else 1 + (s - length) // shift
        return (s + shift // 2) // shift
    if kind == "conv":
        n = s
        for kernel, stride in framing["layers"]:
            n = 0 if n < kernel else (n - int(kernel)) // int(stride) + 1
        return n
    raise LabelError(f"unknown framing type {kind!r} in {dict(framing)!r} (expected 'window' or 'conv')")


def frame_centres(num_frames: int, framing: Mapping[str, Any] | None, label_rate: float,
                  sample_rate: int = 16000) -> np.ndarray:
    """Time in seconds of the centre of each frame (window centre, or receptive-field centre of a CNN).

    Used to read a frame's phone off an alignment. Without framing: ``(i + 0.5) / label_rate``.
    """
    i = np.arange(num_frames, dtype=np.float64)
    if framing is None:
        return (i + 0.5) / float(label_rate)
    kind = framing.get("type")
    if kind == "window":
        length, shift = int(framing["frame_length"]), int(framing["frame_shift"])
        if framing.get("snip_edges", True):
            return (i * shift + length / 2.0) / sample_rate
        return (i * shift + shift / 2.0) / sample_rate  # Kaldi centres frames on i * shift + shift / 2
    if kind == "conv":
        field, stride = 1, 1
        for kernel, s in framing["layers"]:
            field += (int(kernel) - 1) * stride
            stride *= int(s)
        return (i * stride + field / 2.0) / sample_rate
    raise LabelError(f"unknown framing type {kind!r} in {dict(framing)!r} (expected 'window' or 'conv')")


def framing_from_features(meta: Mapping[str, Any], sample_rate: int = 16000) -> dict[str, Any] | None:
    """The framing of a feature store from its header: an explicit ``framing`` entry (top level or in
    ``source``) wins; MFCC / fbank default to Kaldi's 25 ms / 10 ms windows with snip_edges, overridden by
    ``frame_length_ms``, ``frame_shift_ms``, ``snip_edges`` in ``source`` or ``source.options``. Else None."""
    for where in (meta, meta.get("source") or {}):
        if isinstance(where.get("framing"), Mapping):
            return dict(where["framing"])
    kind = str(meta.get("kind", "")).lower()
    if kind.startswith(("mfcc", "fbank")):
        src = meta.get("source") or {}
        src = src.get("options", src)  # `features dump` keeps its extractor options under source.options
        shift_ms = float(src.get("frame_shift_ms", 10.0))
        length_ms = float(src.get("frame_length_ms", 25.0))
        return {
            "type": "window",
            "frame_length": int(round(length_ms * sample_rate / 1000)),
            "frame_shift": int(round(shift_ms * sample_rate / 1000)),
            "snip_edges": bool(src.get("snip_edges", True)),
        }
    return None


# ------------------------------------------------------------------------------------------- length checks


def check_label_length(
    utt_id: str,
    num_labels: int,
    num_samples: int,
    label_rate: float,
    sample_rate: int = 16000,
    *,
    expected: int | None = None,
    framing: Mapping[str, Any] | None = None,
    label_file: str | os.PathLike | None = None,
) -> int:
    """Raise LabelError unless ``num_labels`` is within ONE frame of the expected count; return the expected count.

    The expected count is ``expected`` if given, else :func:`expected_num_frames` of ``num_samples`` with
    ``framing`` (take it from the label dir's ``meta.json``; :class:`LabelSet` does this for you).
    """
    if expected is None:
        expected = expected_num_frames(num_samples, framing, label_rate, sample_rate)
    if abs(int(num_labels) - int(expected)) > 1:
        where = f" in {label_file}" if label_file is not None else ""
        raise LabelError(
            f"utt {utt_id}: {num_labels} labels{where} but {num_samples} samples at {sample_rate} Hz give "
            f"{expected} frames at {label_rate:g} Hz (tolerance 1 frame); the labels were made from other audio "
            "or another feature extractor: relabel this data dir"
        )
    return int(expected)


def label_stride(label_rate: float, frame_rate: float) -> int:
    """How many labels per model frame: 100 Hz labels for a 50 Hz model -> 2 (use every second label).

    Raises LabelError unless ``label_rate / frame_rate`` is a positive whole number (a model faster than its
    labels, or 100 Hz labels for a 40 Hz model, cannot be aligned by striding).
    """
    if label_rate <= 0 or frame_rate <= 0:
        raise LabelError(f"label rate {label_rate} and frame rate {frame_rate} must be positive")
    ratio = float(label_rate) / float(frame_rate)
    stride = int(round(ratio))
    if stride < 1 or abs(ratio - stride) > 1e-6 * max(1.0, ratio):
        raise LabelError(
            f"label rate {label_rate:g} Hz is not a whole multiple of the model frame rate {frame_rate:g} Hz "
            f"(ratio {ratio:g}); make labels at {frame_rate:g} Hz or a multiple of it"
        )
    return stride


def check_same_utterances(label_ids: Iterable[str], other_ids: Iterable[str], *, labels_name: str,
                          other_name: str) -> None:
    """Raise LabelError naming the utterances (first 5 and counts) that one side has and the other lacks."""
    a, b = set(label_ids), set(other_ids)
    if a == b:
        return
    parts = []
    for missing, have, lack in ((b - a, other_name, labels_name), (a - b, labels_name, other_name)):
        if missing:
            first = ", ".join(c_sorted(missing)[:5])
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            parts.append(f"{len(missing)} utterance(s) in {have} but not in {lack}: {first}{more}")
    raise LabelError("; ".join(parts) + "; relabel, or filter the data dir to the labelled utterances")


def _source_ids(source: Any) -> tuple[list[str], str]:
    """Utterance ids and a printable name of a feature store, data dir, store/data-dir path or id iterable."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if (path / "shard.0.done").exists():
            from speechssl.features.store import FeatureReader

            return list(FeatureReader(path).ids), str(path)
        from speechssl.data.kaldi import read_data_dir  # floor 2, lazy: only this path needs it

        return list(read_data_dir(path, validate=False).utt_ids()), str(path)
    if hasattr(source, "ids"):
        return list(source.ids), str(getattr(source, "out_dir", source))
    return list(source), "the given utterance list"


def check_labels_cover(label_dir: str | os.PathLike, source: Any) -> None:
    """Check that a label dir and ``source`` hold exactly the same utterance ids (LabelError naming them).

    ``source`` is a feature store (a ``FeatureReader`` or anything with ``.ids``), a Kaldi data dir path (read
    with ``speechssl.data.kaldi.read_data_dir``), a feature store path (a dir with ``shard.0.done``), or an
    iterable of ids.
    """
    labels, _ = read_labels(label_dir)
    ids, name = _source_ids(source)
    check_same_utterances(labels.keys(), ids, labels_name=str(_text_path(label_dir)[0]), other_name=name)


# ---------------------------------------------------------------------------------------------------- IO


def _text_path(label_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(text.km, meta.json)`` paths of a label dir (a path to the text file itself is accepted too)."""
    p = Path(label_dir)
    if p.is_file():
        return p, p.with_name(META_NAME)
    return p / TEXT_NAME, p / META_NAME


def read_meta(label_dir: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a label dir (raises LabelError if absent: the label dir is unfinished)."""
    _, meta_path = _text_path(label_dir)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise LabelError(f"{meta_path}: missing; the label dir is unfinished (rerun `speechssl kmeans label`)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LabelError(f"{meta_path}: unreadable: {e}") from e
    for key in ("label_rate", "k"):
        if key not in meta:
            raise LabelError(f"{meta_path}: no {key!r} entry")
    return meta


def iter_label_lines(path: str | os.PathLike, k: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(utt, units)`` of a ``text.km``-style file, checking each line (errors name file:line)."""
    dtype = _unit_dtype(k) if k is not None else np.dtype(np.int32)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split(maxsplit=1)
            if not parts:
                raise LabelError(f"{path}:{n}: empty line (expected 'utt u1 u2 ...')")
            utt = parts[0]
            try:
                units = np.array(parts[1].split() if len(parts) > 1 else [], dtype=np.int64)
            except ValueError:
                raise LabelError(f"{path}:{n}: utt {utt}: units must be integers") from None
            if units.size and (units.min() < 0 or (k is not None and units.max() >= k)):
                bad = int(units.min() if units.min() < 0 else units.max())
                raise LabelError(f"{path}:{n}: utt {utt}: unit {bad} outside [0, {k})")
            yield utt, units.astype(dtype)


def read_labels(label_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a label dir: ``({utt: int array of units}, meta)``. Line order is irrelevant; ids must be unique."""
    text_path, _ = _text_path(label_dir)
    meta = read_meta(label_dir)
    labels: dict[str, np.ndarray] = {}
    if not text_path.exists():
        raise LabelError(f"{text_path}: missing although {META_NAME} exists; relabel")
    n = 0
    for n, (utt, units) in enumerate(iter_label_lines(text_path, int(meta["k"])), 1):
        if utt in labels:
            raise LabelError(f"{text_path}:{n}: duplicate utterance id {utt!r}")
        labels[utt] = units
    if "num_utts" in meta and int(meta["num_utts"]) != len(labels):
        raise LabelError(f"{text_path}: {len(labels)} utterances but meta.json says {meta['num_utts']}; relabel")
    return labels, meta


def format_label_line(utt: str, units: Sequence[int] | np.ndarray) -> str:
    """One ``text.km`` line (with newline)."""
    body = " ".join(map(str, np.asarray(units, dtype=np.int64).tolist()))
    return f"{utt} {body}\n" if body else f"{utt}\n"


def write_labels(label_dir: str | os.PathLike, labels: Mapping[str, Sequence[int] | np.ndarray],
                 meta: Mapping[str, Any]) -> None:
    """Write ``text.km`` (sorted by id, C byte order) then ``meta.json`` (the commit marker), each atomically.

    ``meta`` needs ``label_rate`` and ``k``; ``num_utts`` and ``num_labels`` are filled in.
    """
    for key in ("label_rate", "k"):
        if key not in meta:
            raise LabelError(f"label meta needs {key!r}, got {dict(meta)!r}")
    k = int(meta["k"])
    out = Path(label_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines, total = [], 0
    for utt in c_sorted(labels):
        if not utt or any(c.isspace() for c in utt):
            raise LabelError(f"invalid utterance id {utt!r}: must be non-empty without whitespace")
        units = np.asarray(labels[utt])
        if units.size and (units.min() < 0 or units.max() >= k):
            raise LabelError(f"utt {utt}: unit ids must lie in [0, {k})")
        lines.append(format_label_line(utt, units))
        total += units.size
    full = dict(meta, num_utts=len(lines), num_labels=int(total))
    (out / META_NAME).unlink(missing_ok=True)  # text.km and meta.json from different runs must never pair up
    atomic_write_text(out / TEXT_NAME, "".join(lines))
    atomic_write_text(out / META_NAME, json.dumps(full, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- the one helper


class LabelSet:
    """Labels of a label dir, handed out per utterance with the length check every consumer must do.

    ``labels = LabelSet(label_dir)``; ``labels.get(utt, num_samples)`` returns the units of ``utt`` after
    :func:`check_label_length` with the framing recorded in ``meta.json``; ``labels.for_model(frame_rate)``
    gives the stride to apply (see :func:`label_stride`).
    """

    def __init__(self, label_dir: str | os.PathLike, sample_rate: int = 16000) -> None:
        self.label_dir = Path(label_dir)
        self.labels, self.meta = read_labels(label_dir)
        self.text_path = _text_path(label_dir)[0]
        self.label_rate = float(self.meta["label_rate"])
        self.k = int(self.meta["k"])
        self.framing: dict[str, Any] | None = self.meta.get("framing")
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, utt: object) -> bool:
        return utt in self.labels

    @property
    def ids(self) -> list[str]:
        """Utterance ids, sorted in C byte order."""
        return c_sorted(self.labels)

    def get(self, utt: str, num_samples: int | None = None) -> np.ndarray:
        """Units of ``utt``; with ``num_samples``, checked against the audio length (LabelError on mismatch)."""
        try:
            units = self.labels[utt]
        except KeyError:
            raise LabelError(f"utt {utt}: no labels in {self.text_path}") from None
        if num_samples is not None:
            check_label_length(utt, len(units), num_samples, self.label_rate, self.sample_rate,
                               framing=self.framing, label_file=self.text_path)
        return units

    def stride_for(self, frame_rate: float) -> int:
        """Labels per model frame (100 Hz labels, 50 Hz model -> 2)."""
        return label_stride(self.label_rate, frame_rate)

    def check_covers(self, source: Any) -> None:
        """Same utterance ids as ``source`` (see :func:`check_labels_cover`)."""
        ids, name = _source_ids(source)
        check_same_utterances(self.labels.keys(), ids, labels_name=str(self.text_path), other_name=name)
