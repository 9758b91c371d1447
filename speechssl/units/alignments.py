"""Phone alignments for label-quality metrics: Kaldi CTM files and Praat TextGrids (Montreal Forced Aligner).

Both readers return ``{utt_id: PhoneAlignment}``; :func:`frame_phones` turns one alignment into one phone per
label frame (the phone covering the frame centre). Gaps in a CTM and empty TextGrid intervals are silence
(:data:`SILENCE`), so the two formats give the same frames for the same alignment.

**Alignment vs audio length** (one rule, :func:`check_alignment_span`, applied at the labels' framing by
:func:`frame_coverage` for ``units quality`` and ``units layers``, and in seconds to ``superb --task pr``'s
``phones.ctm``).
An alignment spans ``[0, end]`` seconds (a CTM's last segment end, a TextGrid's xmax); at the labels' framing that
is ``n_ali`` frames, the labels have ``n`` (the audio's frames). Real aligners rarely agree to the frame: a Kaldi
CTM ends a frame or two before the audio (frame subsampling), a trailing pause of MFA / pocketsphinx / flite
durations runs past it. So:

* label frames past the alignment's end are **unscored** (not counted in any metric);
* alignment past the last label frame (**overhang**) is **clipped**;
* both are counted (:class:`CoverageStats`: utterances affected, frames, largest gap and its utterance) and
  reported in the JSON and summary of both verbs;
* a gap of more than ``max(0.5 s, 10 % of the utterance)`` (the utterance = ``n / label_rate`` seconds) is not
  aligner slack but a wrong pairing (the alignment of another utterance, another corpus, another sample rate):
  :class:`AlignmentError` naming the utterance and the label file. The absolute 0.5 s floor lets short
  utterances keep the slack of real aligners (a 120 ms trailing pause on a 1 s utterance is 12 %); the 10 % lets
  long ones keep a proportionate one. Alignments of another utterance are typically seconds off; the largest
  accepted gap is in the report, so a suspicious one can still be seen.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from speechssl.units.labels import LabelError, expected_num_frames, frame_centres

__all__ = ["SILENCE", "AlignmentError", "PhoneAlignment", "read_ctm", "read_textgrid", "read_textgrid_dir",
           "read_alignments", "FrameCoverage", "CoverageStats", "check_alignment_span", "frame_coverage",
           "frame_phones", "MAX_GAP_S", "MAX_GAP_FRAC"]

SILENCE = "sil"
# Neighbouring CTM segments may overlap by this much (rounding of start + duration at low time precision).
_OVERLAP_TOL = 5e-4
# An alignment may end this far from its audio (the larger of the two) before it counts as a wrong pairing.
MAX_GAP_S = 0.5
MAX_GAP_FRAC = 0.1


class AlignmentError(LabelError):
    """A malformed alignment file, or an alignment that disagrees with the labels (names file / utterance)."""


@dataclass
class PhoneAlignment:
    """Phone segments of one utterance, sorted by start time, non-overlapping; ``end`` = aligned duration (s)."""

    utt_id: str
    starts: np.ndarray  # float64 [N]
    ends: np.ndarray  # float64 [N]
    phones: list[str]
    end: float
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.starts) and np.any(self.starts[1:] < self.ends[:-1] - _OVERLAP_TOL):
            i = int(np.argmax(self.starts[1:] < self.ends[:-1] - _OVERLAP_TOL))
            raise AlignmentError(
                f"{self.source}: utt {self.utt_id}: segment '{self.phones[i + 1]}' at {self.starts[i + 1]:g} s "
                f"overlaps '{self.phones[i]}' ending at {self.ends[i]:g} s"
            )


def _segments_to_alignment(utt: str, segs: list[tuple[float, float, str]], end: float | None,
                           source: str) -> PhoneAlignment:
    """Sort segments by start and build a PhoneAlignment (end defaults to the last segment's end)."""
    segs = sorted(segs, key=lambda s: s[0])
    starts = np.array([s[0] for s in segs], dtype=np.float64)
    ends = np.array([s[1] for s in segs], dtype=np.float64)
    stop = float(end) if end is not None else (float(ends.max()) if len(ends) else 0.0)
    return PhoneAlignment(utt, starts, ends, [s[2] for s in segs], stop, source)


# ----------------------------------------------------------------------------------------------------- CTM


def read_ctm(path: str | os.PathLike) -> dict[str, PhoneAlignment]:
    """Read a Kaldi CTM, ``utt channel start duration phone [confidence]``, times in seconds at any precision.

    Lines may come in any order; ``;;`` comment lines and blank lines are skipped. Errors name file:line.
    """
    segs: dict[str, list[tuple[float, float, str]]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith(";;"):
                continue
            if len(parts) not in (5, 6):
                raise AlignmentError(f"{path}:{n}: expected 'utt channel start duration phone [conf]', got {line.strip()!r}")
            utt, _, start_s, dur_s, phone = parts[:5]
            try:
                start, dur = float(start_s), float(dur_s)
            except ValueError:
                raise AlignmentError(f"{path}:{n}: utt {utt}: start/duration must be numbers, got {start_s!r} {dur_s!r}") from None
            if not (np.isfinite(start) and np.isfinite(dur)) or start < 0 or dur < 0:
                raise AlignmentError(f"{path}:{n}: utt {utt}: negative or non-finite start/duration {start_s} {dur_s}")
            if dur > 0:
                segs.setdefault(utt, []).append((start, start + dur, phone))
            else:
                segs.setdefault(utt, [])
    return {utt: _segments_to_alignment(utt, s, None, str(path)) for utt, s in segs.items()}


# ------------------------------------------------------------------------------------------------ TextGrid

# Values of a Praat text file, long or short format: quoted strings ("" escapes a quote), <exists>/<absent>
# flags, numbers. Keys ("xmin =", "intervals: size =") and bracketed indices ("item [1]:") are skipped.
_TG_TOKEN = re.compile(
    r'"((?:[^"]|"")*)"|<(exists|absent)>|\[[^\]]*\]|([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)'
)


def _tg_tokens(text: str) -> list[Any]:
    """Praat values in file order: str for strings, bool for flags, float for numbers."""
    out: list[Any] = []
    for m in _TG_TOKEN.finditer(text):
        if m.group(1) is not None:
            out.append(m.group(1).replace('""', '"'))
        elif m.group(2) is not None:
            out.append(m.group(2) == "exists")
        elif m.group(3) is not None:
            out.append(float(m.group(3)))
    return out


def _decode_praat(raw: bytes) -> str:
    """Praat writes UTF-8 or, with non-ASCII text, UTF-16 with a BOM."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def parse_textgrid(text: str, source: str = "<string>") -> tuple[float, dict[str, list[tuple[float, float, str]]]]:
    """Parse a long- or short-format TextGrid: ``(xmax, {tier name: [(start, end, label), ...]})``.

    Point tiers (TextTier) are read as zero-length segments and are of no use as phone tiers.
    """
    tok = _tg_tokens(text)
    pos = 0

    def take(kind: type, what: str) -> Any:
        nonlocal pos
        if pos >= len(tok):
            raise AlignmentError(f"{source}: TextGrid ends early (expected {what})")
        value = tok[pos]
        if kind is float and isinstance(value, bool) or not isinstance(value, kind):
            raise AlignmentError(f"{source}: malformed TextGrid: expected {what}, got {value!r}")
        pos += 1
        return value

    if "ooBinaryFile" in text[:64]:
        raise AlignmentError(f"{source}: binary TextGrid; save it from Praat as a text file")
    if not str(take(str, "File type")).startswith("ooTextFile") or take(str, "Object class") != "TextGrid":
        raise AlignmentError(f"{source}: not a Praat TextGrid text file")
    take(float, "xmin")
    xmax = take(float, "xmax")
    tiers: dict[str, list[tuple[float, float, str]]] = {}
    if not take(bool, "<exists>/<absent>"):
        return xmax, tiers
    for _ in range(int(take(float, "number of tiers"))):
        cls, name = take(str, "tier class"), take(str, "tier name")
        take(float, "tier xmin")
        take(float, "tier xmax")
        count = int(take(float, "number of intervals"))
        segs: list[tuple[float, float, str]] = []
        for _ in range(count):
            if cls == "IntervalTier":
                a, b, label = take(float, "interval xmin"), take(float, "interval xmax"), take(str, "interval text")
            elif cls == "TextTier":
                a = b = take(float, "point time")
                label = take(str, "point mark")
            else:
                raise AlignmentError(f"{source}: unknown tier class {cls!r}")
            segs.append((a, b, label))
        tiers[name] = segs
    return xmax, tiers


def _pick_tier(tiers: Mapping[str, Any], tier: str, source: str) -> str:
    """The tier called ``tier``; else the one tier called '<speaker> - <tier>' (MFA multi-speaker output)."""
    if tier in tiers:
        return tier
    cands = [t for t in tiers if t.endswith(f" - {tier}")]
    if len(cands) == 1:
        return cands[0]
    raise AlignmentError(f"{source}: no single tier named {tier!r}; tiers are {list(tiers)}")


def read_textgrid(path: str | os.PathLike, tier: str = "phones", utt_id: str | None = None) -> PhoneAlignment:
    """One TextGrid as a PhoneAlignment of its ``tier`` (utt id defaults to the file stem).

    Empty intervals (blank text, as MFA writes silence) become :data:`SILENCE`; ``end`` is the file's xmax.
    """
    path = Path(path)
    text = _decode_praat(path.read_bytes())
    xmax, tiers = parse_textgrid(text, str(path))
    name = _pick_tier(tiers, tier, str(path))
    segs = [(a, b, lab.strip() or SILENCE) for a, b, lab in tiers[name] if b > a]
    return _segments_to_alignment(utt_id or path.stem, segs, xmax, str(path))


def read_textgrid_dir(path: str | os.PathLike, tier: str = "phones") -> dict[str, PhoneAlignment]:
    """All ``*.TextGrid`` files under ``path`` (recursively, as MFA writes per-speaker dirs), keyed by file stem."""
    out: dict[str, PhoneAlignment] = {}
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() == ".textgrid" and p.is_file())
    if not files:
        raise AlignmentError(f"{path}: no *.TextGrid files found")
    for p in files:
        ali = read_textgrid(p, tier)
        if ali.utt_id in out:
            raise AlignmentError(f"{p}: utterance {ali.utt_id!r} also aligned in {out[ali.utt_id].source}")
        out[ali.utt_id] = ali
    return out


def read_alignments(path: str | os.PathLike, tier: str = "phones") -> dict[str, PhoneAlignment]:
    """A CTM file, a single TextGrid, or a directory of TextGrids."""
    p = Path(path)
    if p.is_dir():
        return read_textgrid_dir(p, tier)
    if not p.exists():
        raise AlignmentError(f"{p}: alignment file or directory does not exist")
    if p.suffix.lower() == ".textgrid":
        ali = read_textgrid(p, tier)
        return {ali.utt_id: ali}
    return read_ctm(p)


# ---------------------------------------------------------------------------------------- frames <-> phones


@dataclass(frozen=True)
class FrameCoverage:
    """How one utterance's alignment covers its label frames: ``num_aligned`` frames vs ``num_labels``."""

    utt_id: str
    num_labels: int
    num_aligned: int  # frames the feature extractor makes from ``ali.end`` seconds of audio
    label_rate: float

    @property
    def scored(self) -> int:
        """Label frames with a phone: the first ``min(num_aligned, num_labels)``."""
        return min(self.num_aligned, self.num_labels)

    @property
    def unscored(self) -> int:
        """Label frames past the alignment's end (alignment ends early)."""
        return max(0, self.num_labels - self.num_aligned)

    @property
    def clipped(self) -> int:
        """Alignment frames past the last label frame (alignment overhangs the audio)."""
        return max(0, self.num_aligned - self.num_labels)

    @property
    def gap_s(self) -> float:
        """Length mismatch in seconds (frames / label rate)."""
        return abs(self.num_aligned - self.num_labels) / self.label_rate


@dataclass
class CoverageStats:
    """Unscored and clipped frames summed over utterances, and the largest gap (see the module docstring)."""

    num_utts: int = 0
    utts_unscored: int = 0  # utterances whose alignment ends before the audio
    unscored_frames: int = 0
    unscored_seconds: float = 0.0
    utts_clipped: int = 0  # utterances whose alignment runs past the audio
    clipped_frames: int = 0
    clipped_seconds: float = 0.0
    largest_gap_s: float = 0.0
    largest_gap_frames: int = 0
    largest_gap_utt: str | None = None
    largest_gap_kind: str | None = None  # "unscored" (alignment short) or "clipped" (alignment long)

    def add(self, cov: FrameCoverage) -> None:
        self.num_utts += 1
        if cov.unscored:
            self.utts_unscored += 1
            self.unscored_frames += cov.unscored
            self.unscored_seconds += cov.unscored / cov.label_rate
        if cov.clipped:
            self.utts_clipped += 1
            self.clipped_frames += cov.clipped
            self.clipped_seconds += cov.clipped / cov.label_rate
        if (cov.unscored or cov.clipped) and cov.gap_s > self.largest_gap_s:
            self.largest_gap_s = cov.gap_s
            self.largest_gap_frames = cov.unscored or cov.clipped
            self.largest_gap_utt = cov.utt_id
            self.largest_gap_kind = "unscored" if cov.unscored else "clipped"

    @property
    def utts_affected(self) -> int:
        return self.utts_unscored + self.utts_clipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "utts_checked": self.num_utts,
            "utts_affected": self.utts_affected,
            "utts_unscored": self.utts_unscored,
            "unscored_frames": self.unscored_frames,
            "unscored_seconds": round(self.unscored_seconds, 6),
            "utts_clipped": self.utts_clipped,
            "clipped_frames": self.clipped_frames,
            "clipped_seconds": round(self.clipped_seconds, 6),
            "largest_gap_s": round(self.largest_gap_s, 6),
            "largest_gap_frames": self.largest_gap_frames,
            "largest_gap_utt": self.largest_gap_utt,
            "largest_gap_kind": self.largest_gap_kind,
            "rule": f"unscored: label frames past the alignment's end; clipped: alignment past the audio; "
                    f"error beyond max({MAX_GAP_S:g} s, {MAX_GAP_FRAC:.0%} of the utterance)",
        }

    def summary(self) -> str | None:
        """One line for the terminal, or None when every alignment matched its labels to the frame."""
        if not self.utts_affected:
            return None
        kind = "alignment ends early" if self.largest_gap_kind == "unscored" else "alignment overhangs"
        return (f"alignment/audio length: {self.utts_affected} of {self.num_utts} utterance(s) differ; "
                f"{self.unscored_frames} frame(s) ({self.unscored_seconds:.2f} s) past the alignment's end unscored "
                f"({self.utts_unscored} utt), {self.clipped_frames} frame(s) ({self.clipped_seconds:.2f} s) of "
                f"alignment past the audio clipped ({self.utts_clipped} utt); largest gap {self.largest_gap_s:.3f} s "
                f"({self.largest_gap_frames} frames, {kind}) in utt {self.largest_gap_utt}")


def check_alignment_span(ali: PhoneAlignment, audio_s: float, audio: str, *, aligned_s: float | None = None,
                         aligned: str = "") -> None:
    """The one alignment-vs-audio rule (module docstring): ``ali`` spans ``aligned_s`` seconds (default ``ali.end``)
    of audio that lasts ``audio_s``; more than ``max(MAX_GAP_S, MAX_GAP_FRAC x audio_s)`` apart, it is the alignment
    of other audio: :class:`AlignmentError` naming the utterance, the alignment file, its span, and the audio
    (``audio``: what the duration comes from, e.g. "its audio (data/train) lasts 1.23 s"); ``aligned``: appended to
    the alignment's span (e.g. " = 298 frames")."""
    aligned_s = float(ali.end if aligned_s is None else aligned_s)
    gap = abs(aligned_s - audio_s)
    tol = max(MAX_GAP_S, MAX_GAP_FRAC * audio_s)
    if gap > tol + 1e-9:
        side, rel = ("ends", "before") if aligned_s < audio_s else ("runs", "past")
        raise AlignmentError(
            f"utt {ali.utt_id}: {audio} but the alignment ({ali.source}) lasts {ali.end:g} s{aligned}: it {side} "
            f"{gap:.2f} s {rel} the audio, more than max({MAX_GAP_S:g} s, {MAX_GAP_FRAC:.0%} of the utterance) = "
            f"{tol:.2f} s; is this the alignment of another utterance (check the utterance ids and the sample rate)?"
        )


def frame_coverage(ali: PhoneAlignment, num_labels: int, label_rate: float,
                   framing: Mapping[str, Any] | None = None, sample_rate: int = 16000,
                   label_file: str | None = None) -> FrameCoverage:
    """Frames of ``ali`` vs ``num_labels`` at this rate/framing; AlignmentError (naming the utterance and
    ``label_file``) when they differ by more than ``max(MAX_GAP_S, MAX_GAP_FRAC x the utterance)``."""
    # Frames the feature extractor makes from audio as long as the alignment (snip_edges drops the frames whose
    # window would run past the end, so counting frame centres would overshoot by up to 2 at 100 Hz).
    n_ali = expected_num_frames(int(round(ali.end * sample_rate)), framing, label_rate, sample_rate)
    cov = FrameCoverage(ali.utt_id, int(num_labels), int(n_ali), float(label_rate))
    dur = num_labels / float(label_rate)
    where = f" in {label_file}" if label_file else ""
    check_alignment_span(ali, dur, f"{num_labels} labels{where} ({dur:.2f} s at {label_rate:g} Hz)",
                         aligned_s=n_ali / float(label_rate), aligned=f" = {n_ali} frames")
    return cov


def frame_phones(ali: PhoneAlignment, num_labels: int, label_rate: float, framing: Mapping[str, Any] | None = None,
                 sample_rate: int = 16000, label_file: str | None = None,
                 coverage: CoverageStats | None = None) -> np.ndarray:
    """The phone covering the centre of each scored label frame (object array of str; gaps = :data:`SILENCE`).

    The length rule is :func:`frame_coverage` (module docstring): the result has ``min(alignment frames,
    num_labels)`` frames, so use ``labels[:len(result)]``; label frames past it are unscored, alignment past the
    last label frame is clipped. ``coverage``, if given, counts both.
    """
    cov = frame_coverage(ali, num_labels, label_rate, framing, sample_rate, label_file)
    if coverage is not None:
        coverage.add(cov)
    c = frame_centres(cov.scored, framing, label_rate, sample_rate)
    idx = np.searchsorted(ali.starts, c, side="right") - 1
    covered = idx >= 0
    covered[covered] &= c[covered] < ali.ends[idx[covered]]
    table = np.array(list(ali.phones) + [SILENCE], dtype=object)
    return table[np.where(covered, idx, len(ali.phones))]
