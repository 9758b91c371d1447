"""What every corpus preparer shares: reading list files line by line, resolving the audio they list, durations,
the atomic output tree, and the ``python -m`` entry point.

A preparer reads a corpus in its released layout and writes ``OUT/<split>/`` Kaldi data dirs (through
`speechssl.data.write_data_dir`, so every Kaldi check runs before anything is written) plus ``OUT/prepare.json``
(options and counts). The whole ``OUT`` tree appears by one rename when everything succeeded
(`speechssl.fileio.atomic_dir`); an existing ``OUT`` is never touched. Problems in the corpus raise one-line
`CorpusError` / `MissingInputError` naming the file and line (or the utterance) and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from speechssl.audio import AudioError, audio_info
from speechssl.data.kaldi import DataDir, c_sorted, write_data_dir
from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_dir, atomic_write_text, check_writable_dir, os_error_line
from speechssl.progress import progress_bar

__all__ = [
    "CorpusError",
    "visible",
    "need_file",
    "need_dir",
    "read_lines",
    "check_listed_audio",
    "durations",
    "floor_slices",
    "check_num_jobs",
    "fresh_output",
    "output_tree",
    "write_split",
    "labelled_data_dir",
    "write_summary",
    "token",
    "run_main",
]

log = logging.getLogger(__name__)


class CorpusError(UserError):
    """A corpus file that does not look like the released corpus: the message names ``file:line`` and the fix."""


def visible(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without hidden entries (``.DS_Store``, macOS ``._*`` resource forks), sorted."""
    return sorted(p for p in paths if not p.name.startswith("."))


def need_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; `MissingInputError` naming ``what`` if it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"{p}: {what} not found ({'a directory' if p.is_dir() else 'no such file'})")
    return p


def need_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; `MissingInputError` naming ``what`` if it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise MissingInputError(f"{p}: {what} not found (no such directory)")
    return p


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end-of-line and trailing blanks) for every non-blank line of a text file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror or e}") from e
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        try:
            line = bline.decode("utf-8").rstrip()
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{bline[e.start]:02x}); is this the right file?") from e
        if line.strip():
            yield lineno, line


def check_listed_audio(audio: Path, where: str) -> Path:
    """``audio`` if it is a file, else a `CorpusError` naming the list line ``where`` (``file:line``) that names it."""
    if not audio.is_file():
        raise CorpusError(f"{where}: lists audio {audio}, which does not exist; restore the file or remove the line")
    return audio


def durations(sources: Mapping[str, str], where: Mapping[str, str], *, desc: str = "durations") -> dict[str, float]:
    """Seconds of each key's audio from its header; an unreadable file is an error naming the list line ``where[key]``."""
    out: dict[str, float] = {}
    for key in progress_bar(c_sorted(sources), desc=desc, unit="file", mininterval=2.0,
                            disable=len(sources) < 2000):
        try:
            out[key] = audio_info(sources[key]).duration
        except AudioError as e:
            raise CorpusError(f"{where[key]}: {e}") from e
    return out


def floor_slices(total: float, length: float) -> int:
    """How many whole ``length``-second slices fit in ``total`` seconds (tolerating float error at the end)."""
    return int(math.floor(total / length + 1e-9))


def check_num_jobs(num_jobs: int) -> None:
    """``--nj`` (threads reading audio headers) in range, before any work."""
    if not isinstance(num_jobs, int) or num_jobs < 1:
        raise UserError(f"--nj must be >= 1 (threads reading audio headers), got {num_jobs}")


def fresh_output(out: str | os.PathLike) -> Path:
    """``out`` as a Path if nothing is there yet and it can be created (checked before the corpus is read, so a rerun
    or a file in the way or a read-only directory fails at once)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another --out (a preparation is never merged)")
    return check_writable_dir(out, "--out")


@contextlib.contextmanager
def output_tree(out: str | os.PathLike) -> Iterator[Path]:
    """A temp dir that becomes ``out`` by one rename if the block succeeds; ``out`` must not exist yet."""
    out = fresh_output(out)
    with atomic_dir(out) as tmp:
        yield tmp
    log.info("wrote %s", out)


def write_split(root: Path, name: str, dd: DataDir) -> int:
    """Write one split's data dir as ``root/name``; returns its number of utterances."""
    write_data_dir(dd, root / name)
    log.info("%s: %d utterances, %d speakers", name, len(dd), len(set(dd.utt2spk.values())))
    return len(dd)


def labelled_data_dir(rows: Mapping[str, tuple], label_file: str, *, with_durations: bool, desc: str) -> DataDir:
    """The data dir of rows ``utt -> (speaker, wav path, text, label, where)`` (``where``: the list line naming the
    utterance), its labels in ``label_file`` (``utt2intent``, ``utt2slots``, ...), ``utt2dur`` from the headers."""
    durs = None
    if with_durations:
        durs = durations({u: str(r[1]) for u, r in rows.items()}, {u: r[4] for u, r in rows.items()}, desc=desc)
    return DataDir(wav_scp={u: str(r[1]) for u, r in rows.items()}, utt2spk={u: r[0] for u, r in rows.items()},
                   text={u: r[2] for u, r in rows.items()}, utt2dur=durs,
                   extra={label_file: {u: r[3] for u, r in rows.items()}})


def write_summary(root: Path, corpus: str, options: dict, counts: dict) -> dict:
    """``root/prepare.json``: which corpus, the options it was prepared with, and the counts per split."""
    summary = {"corpus": corpus, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
               "counts": counts}
    atomic_write_text(root / "prepare.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def token(value: str) -> str:
    """A label value as one whitespace-free token: inner blanks become ``_`` (FSC's ``change language``)."""
    return "_".join(value.split())


def corpus_parser(name: str, doc: str | None, corpus_help: str, *, durations: bool = False) -> argparse.ArgumentParser:
    """The ``NAME prepare`` parser every corpus shares: ``--corpus``, ``--out`` and, with ``durations``,
    ``--no-durations``; the description is the module docstring's first paragraph."""
    p = argparse.ArgumentParser(prog=f"speechssl superb prepare {name}", description=(doc or "").split("\n\n")[0])
    p.add_argument("--corpus", required=True, help=corpus_help)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    if durations:
        p.add_argument("--no-durations", action="store_true", help="skip reading every wav header for utt2dur")
    return p


def run_main(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], object],
             argv: list[str] | None = None) -> int:
    """Parse, run, and print a `UserError` (or an ``OSError`` about a path) as one line (exit 1), as the ``speechssl``
    command line does."""
    parser = build_parser()
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks for errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except Exception as e:
        # a UserError, or an OSError about a path (permission, a file in the way, a full disk): one line
        line = str(e) if isinstance(e, UserError) else os_error_line(e)
        if line is None or args.verbose:
            raise
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
        return 1
    return 0
