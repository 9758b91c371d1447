"""Kaldi data directories: read, validate, write and fix.

A data dir is a folder of line-oriented tables keyed by their first field:

==============  =====================================  =====================================
file            line                                   keyed by
==============  =====================================  =====================================
``wav.scp``     ``<rec> <path>`` or ``<rec> <cmd> |``  recording (= utterance w/o segments)
``utt2spk``     ``<utt> <spk>``                        utterance
``spk2utt``     ``<spk> <utt1> <utt2> ...``            speaker (derived from utt2spk)
``text``        ``<utt> <words ...>``                  utterance
``segments``    ``<utt> <rec> <start> <end>``          utterance
``utt2dur``     ``<utt> <seconds>``                    utterance
``reco2dur``    ``<rec> <seconds>``                    recording
``utt2*``       ``<utt> <value ...>`` (utt2kw, ...)    utterance (kept in ``DataDir.extra``)
==============  =====================================  =====================================

The checks are those of Kaldi's ``utils/validate_data_dir.sh --no-feats`` (and ``validate_text.pl``), which
this module must never be laxer than: every file ends in a newline, is sorted by its key in C byte order with
no duplicates; utt2spk is also sorted by speaker (speaker ids must be prefixes of utterance ids), spk2utt
expands to exactly utt2spk; text, segments (or wav.scp), utt2dur and every utt2* file list exactly the
utterances of utt2spk; segments have 4 fields with end > start, every wav.scp recording is used by some
segment; text holds no ``<s>``, ``</s>``, ``#0``, CR, non-ASCII whitespace or non-printable characters (control
characters, unassigned code points: what ``grep '[^[:print:][:space:]]'`` finds in a UTF-8 locale); wav.scp
paths do not start with ``~``; durations are > 0; utt2num_frames holds positive integers and utt2warp factors in
(0.5, 1.5). On top of that, lines must be UTF-8, non-empty, without leading whitespace or CR,
and times must be finite numbers. Every problem raises one `DataDirError` naming ``file:line``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from speechssl.audio import SAMPLE_RATE, load_audio
from speechssl.errors import UserError
from speechssl.fileio import atomic_dir, atomic_path

__all__ = [
    "DataDirError",
    "Utterance",
    "DataDir",
    "read_data_dir",
    "write_data_dir",
    "validate_data_dir",
    "fix_data_dir",
    "load_utterance",
    "subset_data_dir",
    "c_sorted",
    "format_seconds",
]

log = logging.getLogger(__name__)

# Files this module reads and writes (besides the utt2* extras).
_CORE_FILES = ("wav.scp", "utt2spk", "spk2utt", "text", "segments", "utt2dur", "reco2dur")
# utt2* files that are not free-form extras.
_NOT_EXTRA = {"utt2spk", "utt2dur"}
_LHOTSE_MANIFESTS = ("recordings.jsonl.gz", "supervisions.jsonl.gz", "cuts.jsonl.gz")
_ILLEGAL_TEXT_SYMBOLS = re.compile(r"(?<![A-Za-z0-9_])(<s>|</s>|#0)(?![A-Za-z0-9_])")
_LINE = re.compile(r"([^ \t]+)(?:[ \t]+(.*?))?[ \t]*\Z", re.DOTALL)
_FIELD_SEP = re.compile(r"[ \t]+")
_BAD_WHITESPACE = re.compile(r"[^\S \t]")  # any whitespace other than space and tab
_SPACE_CC = frozenset("\t\n\v\f\r")  # control characters that are [:space:], not non-printable


def _non_printable(s: str) -> str | None:
    """The first character of ``s`` that is neither [:print:] nor [:space:] in glibc's C.UTF-8 locale, if any.

    That is Unicode category Cc (controls) except TAB, LF, VT, FF, CR, and Cn (unassigned code points and
    noncharacters, as of Python's Unicode database); format characters (Cf) and private use (Co) are printable.
    """
    if s.isprintable():  # fast path: no Cc, Cn (nor Z*, Cf, Co, Cs)
        return None
    for ch in s:
        if unicodedata.category(ch) in ("Cc", "Cn") and ch not in _SPACE_CC:
            return ch
    return None


class DataDirError(UserError):
    """A malformed or inconsistent data dir; the message names ``file:line`` and what is wrong."""


def c_sorted(ids: Iterable[str]) -> list[str]:
    """Sort ids as ``LC_ALL=C sort`` does: by UTF-8 bytes (== code point order)."""
    return sorted(ids, key=lambda s: s.encode("utf-8"))


def format_seconds(x: float) -> str:
    """Canonical text of a time in seconds: up to 6 decimals, no trailing zeros (``1.5``, ``3``, ``0.000063``)."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


@dataclass
class Utterance:
    """One utterance, resolved through segments/wav.scp: what `load_utterance` needs to read its audio."""

    utt_id: str
    rec_id: str
    source: str  # path or "cmd |"
    start: float
    end: float | None  # None: to the end of the recording
    speaker: str
    text: str | None

    @property
    def duration(self) -> float | None:
        """Segment duration from the segment times, when known without reading audio."""
        return None if self.end is None else self.end - self.start


@dataclass
class DataDir:
    """A Kaldi data dir in memory. spk2utt is derived from utt2spk, never stored."""

    wav_scp: dict[str, str]
    utt2spk: dict[str, str]
    text: dict[str, str] | None = None
    segments: dict[str, tuple[str, float, float]] | None = None
    utt2dur: dict[str, float] | None = None
    extra: dict[str, dict[str, str]] = field(default_factory=dict)
    reco2dur: dict[str, float] | None = None

    def __len__(self) -> int:
        return len(self.utt2spk)

    def utt_ids(self) -> list[str]:
        """Utterance ids, sorted LC_ALL=C."""
        return c_sorted(self.utt2spk)

    def rec_ids(self) -> list[str]:
        """Recording ids (wav.scp keys), sorted LC_ALL=C."""
        return c_sorted(self.wav_scp)

    def spk2utt(self) -> dict[str, list[str]]:
        """speaker -> sorted utterance ids, speakers sorted LC_ALL=C."""
        out: dict[str, list[str]] = {spk: [] for spk in c_sorted(set(self.utt2spk.values()))}
        for utt in self.utt_ids():
            out[self.utt2spk[utt]].append(utt)
        return out

    def utterance(self, utt_id: str) -> Utterance:
        """Resolve one utterance (segments -> recording -> source)."""
        if utt_id not in self.utt2spk:
            raise KeyError(f"utterance {utt_id!r} not in data dir")
        if self.segments is not None:
            rec, start, end = self.segments[utt_id]
            source: str = self.wav_scp[rec]
            seg_end: float | None = end
        else:
            rec, start, seg_end = utt_id, 0.0, None
            source = self.wav_scp[utt_id]
        text = self.text.get(utt_id) if self.text is not None else None
        return Utterance(utt_id, rec, source, start, seg_end, self.utt2spk[utt_id], text)

    def utterances(self) -> Iterator[Utterance]:
        """Every utterance in LC_ALL=C order."""
        for utt in self.utt_ids():
            yield self.utterance(utt)

    def subset(self, utt_ids: Iterable[str]) -> DataDir:
        """A new DataDir with only ``utt_ids`` (unknown ids are an error) and the recordings they use."""
        keep = set(utt_ids)
        unknown = c_sorted(keep - self.utt2spk.keys())
        if unknown:
            raise DataDirError(f"{len(unknown)} utterance ids not in the data dir, e.g. {unknown[0]!r}")

        def pick(d: dict | None, keys: set[str]) -> dict | None:
            return None if d is None else {k: v for k, v in d.items() if k in keys}

        if self.segments is not None:
            recs = {self.segments[u][0] for u in keep}
        else:
            recs = keep
        return DataDir(
            wav_scp=pick(self.wav_scp, recs),
            utt2spk=pick(self.utt2spk, keep),
            text=pick(self.text, keep),
            segments=pick(self.segments, keep),
            utt2dur=pick(self.utt2dur, keep),
            extra={name: pick(d, keep) for name, d in self.extra.items()},
            reco2dur=pick(self.reco2dur, recs),
        )

    def validate(self, where: str | os.PathLike = "<memory>") -> None:
        """Check this DataDir would be a valid Kaldi dir; messages name ``where/<file>:<line it would have>``."""
        _cross_check(_tables_from_datadir(self, Path(where)), Path(where))


# --------------------------------------------------------------------------------------------------------------
# Reading tables


@dataclass
class _Entry:
    line: int
    fields: list[str]  # for text-like files: [whole rest]
    raw: str  # the rest of the line after the key


@dataclass
class _Table:
    """One key-value file: entries in file order (first occurrence of each key), plus what fixing it would take."""

    path: Path
    entries: dict[str, _Entry]
    order: list[str]  # keys in file order (first occurrences)
    duplicates: int = 0
    unsorted: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    def loc(self, key: str) -> str:
        return f"{self.path}:{self.entries[key].line}"


def _decode_error(path: Path, lineno: int, bline: bytes, e: UnicodeDecodeError) -> DataDirError:
    return DataDirError(
        f"{path}:{lineno}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column {e.start + 1}); "
        "convert the file to UTF-8"
    )


def _read_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, key, rest) for each line, enforcing the lexical rules shared by all tables."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataDirError(f"{path}: cannot read: {e.strerror or e}") from e
    if not raw:
        raise DataDirError(f"{path}: empty file")
    blines = raw.split(b"\n")
    if blines[-1] != b"":
        raise DataDirError(f"{path}:{len(blines)}: missing newline at end of file")
    for lineno, bline in enumerate(blines[:-1], start=1):
        if b"\r" in bline:
            raise DataDirError(f"{path}:{lineno}: carriage return (Windows CRLF line ending?); convert with dos2unix")
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _decode_error(path, lineno, bline, e) from e
        if not line.strip(" \t"):
            raise DataDirError(f"{path}:{lineno}: empty line")
        if line[0] in " \t":
            raise DataDirError(f"{path}:{lineno}: line starts with whitespace")
        m = _BAD_WHITESPACE.search(line)
        if m:
            raise DataDirError(
                f"{path}:{lineno}: disallowed whitespace character U+{ord(m.group()):04X} (only space and tab separate fields)"
            )
        km = _LINE.match(line)
        assert km is not None  # non-empty, no leading blank
        yield lineno, km.group(1), km.group(2) or ""


def _read_table(path: Path, *, strict: bool) -> _Table:
    """Read ``path``; with ``strict`` an unsorted or duplicated key is an error, else it is recorded for fixing."""
    entries: dict[str, _Entry] = {}
    order: list[str] = []
    table = _Table(path, entries, order)
    prev: bytes | None = None
    for lineno, key, rest in _read_lines(path):
        kb = key.encode("utf-8")
        if key in entries:
            if strict:
                raise DataDirError(f"{path}:{lineno}: duplicate id {key!r} (first at line {entries[key].line})")
            table.duplicates += 1
            continue
        if prev is not None and kb < prev:
            if strict:
                raise DataDirError(
                    f"{path}:{lineno}: not sorted: {key!r} comes after {order[-1]!r} "
                    "(files must be sorted with LC_ALL=C; run `speechssl data fix`)"
                )
            table.unsorted = True
        prev = kb if prev is None or kb > prev else prev
        entries[key] = _Entry(lineno, _FIELD_SEP.split(rest) if rest else [], rest)
        order.append(key)
    return table


def _num(table: _Table, key: str, value: str, what: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise DataDirError(f"{table.loc(key)}: {what} {value!r} is not a number") from None
    if not np.isfinite(x):
        raise DataDirError(f"{table.loc(key)}: {what} {value!r} is not a finite number")
    return x


def _expect_fields(table: _Table, key: str, n: int | None, usage: str, *, at_least: int = 0) -> list[str]:
    fields = table.entries[key].fields
    got = len(fields) + 1
    if (n is not None and len(fields) != n) or len(fields) < at_least:
        raise DataDirError(f"{table.loc(key)}: expected {usage}, got {got} field{'s' if got != 1 else ''}")
    return fields


def _parse_tables(tables: dict[str, _Table]) -> None:
    """Per-line format checks that need the file kind (field counts, numbers, illegal symbols)."""
    for name, t in tables.items():
        for key, e in t.entries.items():
            if name == "utt2spk":
                _expect_fields(t, key, 1, "2 fields '<utt> <speaker>'")
            elif name == "spk2utt":
                _expect_fields(t, key, None, "'<speaker> <utt1> [<utt2> ...]'", at_least=1)
            elif name == "wav.scp":
                _expect_fields(t, key, None, "'<recording> <path or command |>'", at_least=1)
                if e.raw.startswith("~"):
                    raise DataDirError(f"{t.loc(key)}: path starts with '~' (tilde is not expanded); use a full path")
            elif name == "segments":
                _, start_s, end_s = _expect_fields(t, key, 3, "4 fields '<utt> <recording> <start> <end>'")
                start = _num(t, key, start_s, "segment start")
                end = _num(t, key, end_s, "segment end")
                if start < 0:
                    raise DataDirError(f"{t.loc(key)}: negative segment start {start_s}")
                if end <= start:
                    raise DataDirError(f"{t.loc(key)}: segment end {end_s} is not after start {start_s}")
            elif name in ("utt2dur", "reco2dur"):
                (d,) = _expect_fields(t, key, 1, f"2 fields '<id> <seconds>'")
                if _num(t, key, d, "duration") <= 0:
                    raise DataDirError(f"{t.loc(key)}: duration {d} is not > 0")
            elif name == "text":
                m = _ILLEGAL_TEXT_SYMBOLS.search(f"{key} {e.raw}")
                if m:
                    raise DataDirError(f"{t.loc(key)}: text contains the reserved symbol {m.group()!r}")
                for part, where in ((key, "utterance id"), (e.raw, "transcript")):
                    ch = _non_printable(part)
                    if ch is not None:
                        what = unicodedata.name(ch, "unassigned" if unicodedata.category(ch) == "Cn" else "control")
                        raise DataDirError(
                            f"{t.loc(key)}: non-printable character U+{ord(ch):04X} ({what}) in the {where}; "
                            "Kaldi rejects text with characters that are neither printable nor whitespace"
                        )
            elif name == "utt2num_frames":
                (n,) = _expect_fields(t, key, 1, "2 fields '<utt> <frames>'")
                x = _num(t, key, n, "frame count")
                if not (x > 0 and x.is_integer()):
                    raise DataDirError(f"{t.loc(key)}: frame count {n} is not a positive integer")
            elif name == "utt2warp":
                (w,) = _expect_fields(t, key, 1, "2 fields '<utt> <warp factor>'")
                if not 0.5 < _num(t, key, w, "warp factor") < 1.5:
                    raise DataDirError(f"{t.loc(key)}: warp factor {w} is not in (0.5, 1.5)")
            else:  # utt2* extra
                _expect_fields(t, key, None, "'<utt> <value>'", at_least=1)


def _load_tables(path: Path, *, strict: bool) -> dict[str, _Table]:
    if not path.is_dir():
        raise DataDirError(f"{path}: no such data directory")
    # spk2utt is derived from utt2spk: only a strict read checks it; fixing/lenient reading rebuilds it.
    names = [n for n in _CORE_FILES if (path / n).is_file() and (strict or n != "spk2utt")]
    names += sorted(p.name for p in path.iterdir() if p.is_file() and p.name.startswith("utt2") and p.name not in _NOT_EXTRA)
    for required in ("utt2spk", "wav.scp"):
        if required not in names:
            raise DataDirError(f"{path}: no {required} file")
    if strict and "spk2utt" not in names:
        raise DataDirError(f"{path}: no spk2utt file (create it with `speechssl data fix`)")
    tables = {n: _read_table(path / n, strict=strict) for n in names}
    _parse_tables(tables)
    return tables


# --------------------------------------------------------------------------------------------------------------
# Cross-file consistency


def _same_keys(t: _Table, ref_keys: list[str], ref: _Table, what: str) -> None:
    """``t`` must hold exactly ``ref_keys`` (in the same sorted order, which strict reading already ensured)."""
    ref_set = set(ref_keys)
    extra = [k for k in t.order if k not in ref_set]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DataDirError(f"{t.loc(extra[0])}: {what} {extra[0]!r} is not in {ref.name}{more}")
    missing = [k for k in ref_keys if k not in t.entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataDirError(f"{t.path}: {what} {missing[0]!r} is missing (it is in {ref.loc(missing[0]) if missing[0] in ref.entries else ref.name}){more}")


def _check_speaker_order(u2s: _Table) -> None:
    """Kaldi requires utt2spk to be sorted by speaker too (``sort -k2`` is a no-op): speakers must prefix utts."""
    prev: tuple[bytes, bytes] | None = None
    prev_key = ""
    for utt in u2s.order:
        spk = u2s.entries[utt].fields[0]
        cur = (spk.encode("utf-8"), utt.encode("utf-8"))
        if prev is not None and cur < prev:
            raise DataDirError(
                f"{u2s.loc(utt)}: utterance {utt!r} of speaker {spk!r} sorts after {prev_key!r} of speaker "
                f"{u2s.entries[prev_key].fields[0]!r}: utt2spk must be sorted by speaker as well as by utterance "
                "(make speaker ids prefixes of utterance ids)"
            )
        prev, prev_key = cur, utt


def _check_spk2utt(s2u: _Table, u2s: _Table) -> None:
    """spk2utt must expand (``spk2utt_to_utt2spk.pl``) to exactly the lines of utt2spk."""
    seen: dict[str, str] = {}
    expected = iter(u2s.order)
    for spk in s2u.order:
        for utt in s2u.entries[spk].fields:
            if utt in seen:
                raise DataDirError(f"{s2u.loc(spk)}: utterance {utt!r} listed twice (also under speaker {seen[utt]!r})")
            seen[utt] = spk
            if utt not in u2s.entries:
                raise DataDirError(f"{s2u.loc(spk)}: utterance {utt!r} of speaker {spk!r} is not in utt2spk")
            true_spk = u2s.entries[utt].fields[0]
            if true_spk != spk:
                raise DataDirError(
                    f"{s2u.loc(spk)}: utterance {utt!r} listed under speaker {spk!r} but {u2s.loc(utt)} says {true_spk!r}"
                )
            want = next(expected, None)
            if want != utt:
                where = f" ({u2s.loc(want)}, speaker {u2s.entries[want].fields[0]!r})" if want is not None else ""
                raise DataDirError(
                    f"{s2u.loc(spk)}: spk2utt does not expand to utt2spk: expected utterance {want!r}{where} "
                    f"but found {utt!r} (rebuild spk2utt with `speechssl data fix`)"
                )
    missing = [u for u in u2s.order if u not in seen]
    if missing:
        raise DataDirError(f"{u2s.loc(missing[0])}: utterance {missing[0]!r} is missing from spk2utt")


def _cross_check(tables: dict[str, _Table], path: Path) -> None:
    u2s = tables["utt2spk"]
    utts = u2s.order
    _check_speaker_order(u2s)
    if "spk2utt" in tables:
        _check_spk2utt(tables["spk2utt"], u2s)
    wav = tables["wav.scp"]
    if "text" in tables:
        _same_keys(tables["text"], utts, u2s, "utterance")
    if "segments" in tables:
        seg = tables["segments"]
        _same_keys(seg, utts, u2s, "utterance")
        used: set[str] = set()
        for utt in seg.order:
            rec = seg.entries[utt].fields[0]
            if rec not in wav.entries:
                raise DataDirError(f"{seg.loc(utt)}: recording {rec!r} of utterance {utt!r} is not in wav.scp")
            used.add(rec)
        unused = [r for r in wav.order if r not in used]
        if unused:
            raise DataDirError(f"{wav.loc(unused[0])}: recording {unused[0]!r} is not used by any segment")
        recs = wav.order
    else:
        _same_keys(wav, utts, u2s, "utterance")
        recs = utts
    if "utt2dur" in tables:
        _same_keys(tables["utt2dur"], utts, u2s, "utterance")
    if "reco2dur" in tables:
        _same_keys(tables["reco2dur"], recs, wav, "recording")
    for name, t in tables.items():
        if name.startswith("utt2") and name not in _NOT_EXTRA:
            _same_keys(t, utts, u2s, "utterance")


# --------------------------------------------------------------------------------------------------------------
# Public API


def _to_datadir(tables: dict[str, _Table]) -> DataDir:
    def simple(name: str) -> dict[str, str] | None:
        t = tables.get(name)
        return None if t is None else {k: t.entries[k].raw for k in t.order}

    def floats(name: str) -> dict[str, float] | None:
        t = tables.get(name)
        return None if t is None else {k: float(t.entries[k].fields[0]) for k in t.order}

    seg = tables.get("segments")
    segments = None
    if seg is not None:
        segments = {}
        for k in seg.order:
            rec, s, e = seg.entries[k].fields
            segments[k] = (rec, float(s), float(e))
    return DataDir(
        wav_scp=simple("wav.scp") or {},
        utt2spk={k: tables["utt2spk"].entries[k].fields[0] for k in tables["utt2spk"].order},
        text=simple("text"),
        segments=segments,
        utt2dur=floats("utt2dur"),
        extra={n: simple(n) for n in tables if n.startswith("utt2") and n not in _NOT_EXTRA},  # type: ignore[misc]
        reco2dur=floats("reco2dur"),
    )


def read_data_dir(path: str | os.PathLike, validate: bool = True) -> DataDir:
    """Read a data dir. With ``validate`` (default) every Kaldi check must pass; without it, unsorted files and
    duplicate ids are tolerated (first occurrence wins) but malformed lines are still errors."""
    path = Path(path)
    tables = _load_tables(path, strict=validate)
    if validate:
        _cross_check(tables, path)
    return _to_datadir(tables)


def validate_data_dir(path: str | os.PathLike) -> None:
    """Raise `DataDirError` (naming file:line) unless ``path`` passes all checks (see the module docstring)."""
    path = Path(path)
    _cross_check(_load_tables(path, strict=True), path)


_ANY_WHITESPACE = re.compile(r"\s")


def _check_token(where: str, value: str, what: str) -> None:
    if not value or _ANY_WHITESPACE.search(value):
        raise DataDirError(f"{where}: {what} {value!r} is empty or contains whitespace")


def _check_value(where: str, value: str, what: str, *, allow_empty: bool = False) -> None:
    if (not value and not allow_empty) or (value and (value != value.strip(" \t") or _BAD_WHITESPACE.search(value))):
        raise DataDirError(f"{where}: {what} {value!r} is empty, has leading/trailing blanks or a newline/CR")


def _render(dd: DataDir) -> dict[str, list[tuple[str, str]]]:
    """The (key, rest-of-line) pairs of every file ``dd`` writes, in file order."""
    utts = dd.utt_ids()
    out: dict[str, list[tuple[str, str]]] = {}
    out["wav.scp"] = [(r, dd.wav_scp[r]) for r in dd.rec_ids()]
    out["utt2spk"] = [(u, dd.utt2spk[u]) for u in utts]
    out["spk2utt"] = [(s, " ".join(us)) for s, us in dd.spk2utt().items()]
    if dd.text is not None:
        out["text"] = [(u, dd.text[u]) for u in c_sorted(dd.text)]
    if dd.segments is not None:
        out["segments"] = [
            (u, f"{r} {format_seconds(s)} {format_seconds(e)}") for u, (r, s, e) in ((u, dd.segments[u]) for u in c_sorted(dd.segments))
        ]
    if dd.utt2dur is not None:
        out["utt2dur"] = [(u, format_seconds(dd.utt2dur[u])) for u in c_sorted(dd.utt2dur)]
    if dd.reco2dur is not None:
        out["reco2dur"] = [(r, format_seconds(dd.reco2dur[r])) for r in c_sorted(dd.reco2dur)]
    for name in sorted(dd.extra):
        if not re.fullmatch(r"utt2[A-Za-z0-9_.\-]+", name) or name in _NOT_EXTRA:
            raise DataDirError(f"extra file name {name!r} must look like 'utt2<something>' and not be utt2spk/utt2dur")
        out[name] = [(u, dd.extra[name][u]) for u in c_sorted(dd.extra[name])]
    return out


def _tables_from_datadir(dd: DataDir, where: Path, rendered: dict[str, list[tuple[str, str]]] | None = None) -> dict[str, _Table]:
    """Build the tables ``dd`` would write (line numbers as they would be), checking ids and values on the way."""
    tables: dict[str, _Table] = {}
    for name, rows in (rendered if rendered is not None else _render(dd)).items():
        path = where / name
        entries: dict[str, _Entry] = {}
        order: list[str] = []
        for i, (key, rest) in enumerate(rows, start=1):
            loc = f"{path}:{i}"
            _check_token(loc, key, "id")
            if name in ("utt2spk",):
                _check_token(loc, rest, "speaker id")
            elif name == "text":
                _check_value(loc, rest, "transcript", allow_empty=True)
            elif name == "segments":
                _check_token(loc, dd.segments[key][0], "recording id")  # type: ignore[index]
            else:
                _check_value(loc, rest, "value")
            entries[key] = _Entry(i, _FIELD_SEP.split(rest) if rest else [], rest)
            order.append(key)
        tables[name] = _Table(path, entries, order)
    if not tables["utt2spk"].order:
        raise DataDirError(f"{where}: no utterances to write")
    _parse_tables(tables)
    return tables


def _write_lines(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for key, rest in rows:
            f.write(f"{key} {rest}\n" if rest else f"{key}\n")
        f.flush()
        os.fsync(f.fileno())


def _managed(name: str) -> bool:
    return name in _CORE_FILES or name.startswith("utt2")


def write_data_dir(dd: DataDir, path: str | os.PathLike) -> None:
    """Validate ``dd`` and write it (sorted LC_ALL=C, spk2utt derived) to ``path``.

    Files are written into a temporary sibling directory first; a new ``path`` is created by one rename. If
    ``path`` already exists, each Kaldi file is replaced by rename and Kaldi files ``dd`` does not have
    (segments, utt2dur, utt2* ...) are removed so they cannot go stale; other files (lhotse manifests,
    alignments) are left alone. Nothing is touched if validation fails.
    """
    path = Path(path)
    rows = _render(dd)
    _cross_check(_tables_from_datadir(dd, path, rows), path)
    if path.exists() and not path.is_dir():
        raise DataDirError(f"{path}: exists and is not a directory")
    if not path.exists():
        with atomic_dir(path) as tmp:
            for name, r in rows.items():
                _write_lines(tmp / name, r)
        return
    with contextlib.ExitStack() as stack:  # every file written to its temp first; all renamed once all are done
        for name, r in rows.items():
            _write_lines(stack.enter_context(atomic_path(path / name)), r)
    for p in path.iterdir():
        if p.is_file() and _managed(p.name) and p.name not in rows:
            log.info("%s: removing %s, which the new data dir does not have", path, p.name)
            p.unlink()
    stale = [m for m in _LHOTSE_MANIFESTS if (path / m).exists()]
    if stale:
        log.warning("%s: lhotse manifests %s may now be stale; rerun `speechssl data to-lhotse`", path, ", ".join(stale))


def subset_data_dir(
    src: str | os.PathLike, out: str | os.PathLike, *, utt_list: str | os.PathLike | None = None, first: int | None = None
) -> int:
    """Write the utterances listed in ``utt_list`` (one id per line, first field) or the ``first`` N to ``out``.

    Returns the number of utterances written. Unknown ids in the list are an error naming the line.
    """
    if (utt_list is None) == (first is None):
        raise ValueError("give exactly one of utt_list or first")
    dd = read_data_dir(src)
    if first is not None:
        if first <= 0:
            raise UserError(f"--first must be positive, got {first}")
        keep = dd.utt_ids()[:first]
    else:
        keep = []
        lp = Path(utt_list)  # type: ignore[arg-type]
        for lineno, key, _ in _read_lines(lp):
            if key not in dd.utt2spk:
                raise DataDirError(f"{lp}:{lineno}: utterance {key!r} is not in {src}")
            keep.append(key)
    write_data_dir(dd.subset(keep), out)
    return len(keep)


def fix_data_dir(path: str | os.PathLike) -> dict:
    """Repair a data dir in place, like Kaldi's ``utils/fix_data_dir.sh``.

    Sorts every file (LC_ALL=C), drops duplicate ids (keeping the first), keeps only utterances present in every
    utterance-keyed file (utt2spk, text, segments or wav.scp, utt2dur, utt2*) whose recording exists, drops
    unused recordings, rebuilds spk2utt from utt2spk. The original files are copied to ``path/.backup/``.
    Malformed lines are not guessed at: they raise `DataDirError`. Returns a report::

        {"utterances_before": int, "utterances_kept": int, "dropped": {file: n_utts_missing_there},
         "recordings_dropped": int, "duplicates_removed": {file: n}, "resorted": [file, ...]}
    """
    path = Path(path)
    tables = _load_tables(path, strict=False)
    u2s = tables["utt2spk"]
    utt_files = [n for n in tables if n in ("text", "segments", "utt2dur") or (n.startswith("utt2") and n not in _NOT_EXTRA)]
    if "segments" not in tables:
        utt_files.append("wav.scp")
    keep = set(u2s.order)
    dropped: dict[str, int] = {}
    for n in utt_files:
        missing = keep - tables[n].entries.keys()
        if missing:
            dropped[n] = len(missing)
            log.info("%s: dropping %d utterances not in %s, e.g. %r", path, len(missing), n, c_sorted(missing)[0])
        keep -= missing
    if "segments" in tables:
        seg = tables["segments"]
        no_rec = {u for u in keep if seg.entries[u].fields[0] not in tables["wav.scp"].entries}
        if no_rec:
            dropped["wav.scp"] = len(no_rec)
            log.info("%s: dropping %d utterances whose recording is not in wav.scp", path, len(no_rec))
        keep -= no_rec
    if not keep:
        raise DataDirError(f"{path}: no utterances remain after fixing (no utterance is in every file)")
    full = _to_datadir(tables)
    fixed = full.subset(keep)
    recs_before = len(full.wav_scp)
    if fixed.reco2dur is not None and set(fixed.reco2dur) != set(fixed.wav_scp):
        log.info("%s: reco2dur does not cover every recording; dropping it", path)
        fixed = replace(fixed, reco2dur=None)
    backup = path / ".backup"
    backup.mkdir(exist_ok=True)
    for p in path.iterdir():
        if p.is_file() and _managed(p.name):
            shutil.copy2(p, backup / p.name)
    write_data_dir(fixed, path)
    report = {
        "utterances_before": len(u2s.order),
        "utterances_kept": len(fixed),
        "dropped": dropped,
        "recordings_dropped": recs_before - len(fixed.wav_scp),
        "duplicates_removed": {n: t.duplicates for n, t in tables.items() if t.duplicates},
        "resorted": [n for n, t in tables.items() if t.unsorted],
    }
    log.info("%s: kept %d of %d utterances (backup in %s)", path, report["utterances_kept"], report["utterances_before"], backup)
    return report


def load_utterance(utt: Utterance, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio of one utterance (its segment of the recording), float32 mono at ``sample_rate``."""
    return load_audio(utt.source, utt_id=utt.utt_id, start=utt.start, end=utt.end, sample_rate=sample_rate)
