"""RTTM files and the diarization error rate (DER), computed here (no md-eval / dscore / pyannote needed).

RTTM (NIST): one ``SPEAKER <file> <chnl> <tbeg> <tdur> <ortho> <stype> <name> <conf> [<slat>]`` line per speaker
turn (9 or 10 fields; s3prl's ``make_rttm.py`` writes 9, LibriMix's RTTMs have 10). Lines of other RTTM types
(``SPKR-INFO``, ``LEXEME``, ...) are skipped; a malformed ``SPEAKER`` line is an error naming ``file:line``.

DER = (missed speech + false alarm + speaker confusion) / total reference speech, all in seconds, with the
optimal one-to-one mapping of hypothesis to reference speakers (the mapping that maximises their co-occurring
time: Hungarian algorithm via scipy, else brute force over permutations). Every speaking speaker counts: a region
where 2 reference speakers talk holds 2x its duration of reference speech (overlap scored), as md-eval does.
The time axis is cut at every turn boundary and scored exactly (no frame step). ``collar`` seconds on each side
of every reference boundary are not scored (md-eval ``-c``; pyannote.metrics' ``collar`` is the full width, 2x
this); ``skip_overlap`` drops regions with more than one reference speaker. Turns of one speaker that overlap or
touch are merged first.

SUPERB's convention (s3prl ``downstream/diarization/score.sh``): dscore (github.com/ftshijt/dscore) ``score.py``
with its defaults, i.e. md-eval with collar 0 and overlapping speech scored; the errors are summed over all
recordings before dividing (dscore's OVERALL row).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from speechssl.data.kaldi import c_sorted
from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_write_text

__all__ = ["Turn", "read_rttm", "format_rttm", "write_rttm", "merge_intervals", "der_components",
           "diarization_error_rate", "rates", "optimal_mapping", "frames_to_turns", "turns_to_frames", "COMPONENTS"]

COMPONENTS = ("total", "missed", "false_alarm", "confusion")


class Turn(NamedTuple):
    speaker: str
    start: float
    end: float


def read_rttm(path: str | os.PathLike) -> dict[str, list[Turn]]:
    """file id -> its ``SPEAKER`` turns (sorted by start, speaker) of an RTTM file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such RTTM file")
    out: dict[str, list[Turn]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        f = line.split()
        if not f or f[0].startswith(";") or f[0] != "SPEAKER":
            continue
        if len(f) not in (9, 10):
            raise UserError(f"{path}:{n}: an RTTM SPEAKER line has 9 or 10 fields (SPEAKER file chnl tbeg tdur "
                            f"<NA> <NA> speaker <NA> [<NA>]), got {len(f)}: {line.strip()!r}")
        try:
            start, dur = float(f[3]), float(f[4])
        except ValueError:
            raise UserError(f"{path}:{n}: tbeg {f[3]!r} / tdur {f[4]!r} are not numbers") from None
        if not (math.isfinite(start) and math.isfinite(dur)) or start < 0 or dur < 0:
            raise UserError(f"{path}:{n}: tbeg {f[3]} and tdur {f[4]} must be finite and >= 0")
        out.setdefault(f[1], []).append(Turn(f[7], start, start + dur))
    return {k: sorted(v, key=lambda t: (t.start, t.speaker, t.end)) for k, v in out.items()}


def format_rttm(turns: Mapping[str, Sequence[Turn]]) -> str:
    """RTTM text (10 fields, milliseconds) of ``file id -> turns``, files C-sorted, turns by start."""
    lines = []
    for fid in c_sorted(turns):
        for t in sorted(turns[fid], key=lambda t: (t.start, t.speaker, t.end)):
            if len(fid.split()) != 1 or len(str(t.speaker).split()) != 1:
                raise UserError(f"RTTM: file id {fid!r} and speaker {t.speaker!r} must be single tokens")
            lines.append(f"SPEAKER {fid} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n")
    return "".join(lines)


def write_rttm(path: str | os.PathLike, turns: Mapping[str, Sequence[Turn]]) -> None:
    """Write ``file id -> turns`` as an RTTM file, atomically."""
    atomic_write_text(path, format_rttm(turns))


def merge_intervals(intervals: Sequence[tuple[float, float]] | np.ndarray, min_gap: float = 0.0) -> np.ndarray:
    """``[K, 2]`` sorted disjoint intervals: the union of ``intervals``, also bridging gaps shorter than
    ``min_gap`` (0: only overlapping or touching ones merge); empty intervals are dropped."""
    iv = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
    iv = iv[iv[:, 1] > iv[:, 0]]
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    out: list[list[float]] = []
    for s, e in iv:
        if out and s - out[-1][1] <= min_gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def _by_speaker(turns: Sequence[Turn]) -> dict[str, np.ndarray]:
    spk: dict[str, list[tuple[float, float]]] = {}
    for t in turns:
        spk.setdefault(str(t.speaker), []).append((t.start, t.end))
    merged = {s: merge_intervals(v) for s, v in spk.items()}
    return {s: v for s, v in merged.items() if len(v)}


def _active(iv: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which ``points`` fall in one of the sorted disjoint half-open intervals ``iv``."""
    if not len(iv):
        return np.zeros(len(points), dtype=bool)
    i = np.searchsorted(iv[:, 0], points, side="right") - 1
    return (i >= 0) & (points < iv[np.maximum(i, 0), 1])


def optimal_mapping(cooc: np.ndarray) -> list[tuple[int, int]]:
    """(reference, hypothesis) index pairs, one-to-one, maximising the summed ``cooc[r, h]``."""
    n_r, n_h = cooc.shape
    if n_r == 0 or n_h == 0:
        return []
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # brute force over the permutations of the larger side
        n = max(n_r, n_h)
        if n > 8:
            raise UserError(f"{n} speakers: the optimal speaker mapping needs scipy beyond 8") from None
        sq = np.zeros((n, n))
        sq[:n_r, :n_h] = cooc
        best = max(itertools.permutations(range(n)), key=lambda p: sum(sq[r, p[r]] for r in range(n)))
        return [(r, best[r]) for r in range(n_r) if best[r] < n_h]
    rows, cols = linear_sum_assignment(-cooc)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def der_components(ref: Sequence[Turn], hyp: Sequence[Turn], *, collar: float = 0.0,
                   skip_overlap: bool = False) -> dict[str, float]:
    """Seconds of ``total`` reference speech, ``missed``, ``false_alarm`` and ``confusion`` of one recording."""
    R, H = _by_speaker(ref), _by_speaker(hyp)
    cuts = [iv.ravel() for iv in (*R.values(), *H.values())]
    zones = np.zeros((0, 2))
    if collar > 0 and R:
        b = np.concatenate([iv.ravel() for iv in R.values()])
        zones = merge_intervals(np.stack([b - collar, b + collar], 1))
        cuts.append(zones.ravel())
    if not cuts:
        return dict.fromkeys(COMPONENTS, 0.0)
    t = np.unique(np.concatenate(cuts))
    mid, dur = (t[:-1] + t[1:]) / 2, np.diff(t)
    ra = np.stack([_active(iv, mid) for iv in R.values()]) if R else np.zeros((0, len(mid)), bool)
    ha = np.stack([_active(iv, mid) for iv in H.values()]) if H else np.zeros((0, len(mid)), bool)
    n_ref, n_sys = ra.sum(0), ha.sum(0)
    scored = ~_active(zones, mid)
    if skip_overlap:
        scored &= n_ref <= 1
    w = dur * scored
    cooc = (ra[:, None, :] & ha[None, :, :]).astype(np.float64) @ w
    matched = sum(cooc[r, h] for r, h in optimal_mapping(cooc))
    return {"total": float(n_ref @ w), "missed": float(np.maximum(n_ref - n_sys, 0) @ w),
            "false_alarm": float(np.maximum(n_sys - n_ref, 0) @ w),
            "confusion": max(0.0, float(np.minimum(n_ref, n_sys) @ w - matched))}


def diarization_error_rate(ref: Mapping[str, Sequence[Turn]], hyp: Mapping[str, Sequence[Turn]], *,
                           collar: float = 0.0, skip_overlap: bool = False) -> dict[str, float]:
    """DER over every file of ``ref`` (a file missing from ``hyp`` is all missed; hypothesis files absent
    from ``ref`` are not scored): ``der``, ``missed``, ``false_alarm``, ``confusion`` as fractions of the total
    reference speech, plus ``total`` seconds. Errors are summed over files before dividing."""
    acc = dict.fromkeys(COMPONENTS, 0.0)
    for fid, turns in ref.items():
        for k, v in der_components(turns, hyp.get(fid, ()), collar=collar, skip_overlap=skip_overlap).items():
            acc[k] += v
    return rates(acc)


def rates(acc: Mapping[str, float]) -> dict[str, float]:
    """Summed seconds (``COMPONENTS``) -> ``der`` and each error as a fraction of ``total``."""
    tot = acc["total"]
    out = {k: (acc[k] / tot if tot > 0 else 0.0) for k in COMPONENTS[1:]}
    return {"der": sum(out.values()), **out, "total": float(tot)}


def frames_to_turns(active: np.ndarray, frame_rate: float, speakers: Sequence[str] | None = None) -> list[Turn]:
    """Turns of a ``[T, S]`` 0/1 activity matrix; frame ``i`` covers ``[i, i + 1) / frame_rate`` seconds
    (s3prl ``make_rttm.py``). ``speakers``: a name per column (default ``"0"``, ``"1"``, ...)."""
    a = np.asarray(active).astype(bool).reshape(len(active), -1)
    names = list(speakers) if speakers is not None else [str(i) for i in range(a.shape[1])]
    out = []
    for s in range(a.shape[1]):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], a[:, s].astype(np.int8), [0]])))
        out += [Turn(names[s], b / frame_rate, e / frame_rate) for b, e in zip(edges[::2], edges[1::2])]
    return sorted(out, key=lambda t: (t.start, t.speaker))


def turns_to_frames(turns: Sequence[Turn], speakers: Sequence[str], num_frames: int, frame_rate: float) -> np.ndarray:
    """``[num_frames, len(speakers)]`` float32 0/1 targets: frames ``rint(start * rate)`` up to
    ``rint(end * rate)`` of each turn are 1 (s3prl ``DiarizationDataset._get_labeled_speech``)."""
    col = {s: i for i, s in enumerate(speakers)}
    y = np.zeros((num_frames, len(speakers)), dtype=np.float32)
    for t in turns:
        y[int(np.rint(t.start * frame_rate)):max(0, int(np.rint(t.end * frame_rate))), col[t.speaker]] = 1.0
    return y
