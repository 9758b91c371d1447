"""Fluent Speech Commands for SUPERB IC: (action, object, location) intents.

Input, the released layout (``fluent_speech_commands_dataset/``)::

    CORPUS/data/{train,valid,test}_data.csv    ",path,speakerId,transcription,action,object,location" header,
                                               then one row per clip (the first column is a row index)
    CORPUS/wavs/speakers/<speakerId>/<uuid>.wav

Output: ``OUT/{train,dev,test}`` (dev = valid) with ``text`` (the transcription, blanks collapsed) and
``utt2intent`` = "<action> <object> <location>", each slot one token (inner blanks become ``_``: FSC's
``change language`` -> ``change_language``, as mini_synth writes it). Speaker = ``speakerId``; utterance id =
``<speakerId>-<wav stem>``. Why not lhotse's ``prepare_slu``: it needs pandas, drops ``speakerId`` (no utt2spk)
and numbers the supervisions by row, so the CSVs are read here with the csv module.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from speechssl.superb.corpora.common import (
    labelled_data_dir,
    corpus_parser,
    CorpusError,
    check_listed_audio,
    need_dir,
    need_file,
    fresh_output,
    output_tree,
    run_main,
    token,
    write_split,
    write_summary,
)

__all__ = ["SPLITS", "COLUMNS", "prepare_fluent_speech_commands", "main"]

log = logging.getLogger(__name__)

SPLITS = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}
COLUMNS = ("path", "speakerId", "transcription", "action", "object", "location")


def _read_csv(corpus: Path, path: Path) -> dict[str, tuple[str, Path, str, str, str]]:
    """utt -> (speaker, wav, text, intent, "file:line") for one split CSV."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 ({e.reason}); is this the FSC CSV?") from e
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise CorpusError(f"{path}: empty file; expected the header ',{','.join(COLUMNS)}'")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CorpusError(f"{path}:1: header lacks column {missing[0]!r}; expected ',{','.join(COLUMNS)}'")
    col = {c: header.index(c) for c in COLUMNS}
    out: dict[str, tuple[str, Path, str, str, str]] = {}
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row or not any(f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise CorpusError(f"{where}: {len(row)} fields, the header has {len(header)}")
        f = {c: row[i].strip() for c, i in col.items()}
        empty = next((c for c in COLUMNS if c != "transcription" and not f[c]), None)
        if empty is not None:
            raise CorpusError(f"{where}: empty {empty!r}")
        if len(f["speakerId"].split()) != 1:
            raise CorpusError(f"{where}: speakerId {f['speakerId']!r} contains blanks")
        wav = check_listed_audio(corpus / f["path"], where)
        utt = f"{f['speakerId']}-{token(wav.stem)}"
        if utt in out:
            raise CorpusError(f"{where}: {f['path']} of speaker {f['speakerId']} listed twice (also at {out[utt][4]})")
        intent = " ".join(token(f[c]) for c in ("action", "object", "location"))
        out[utt] = (f["speakerId"], wav, " ".join(f["transcription"].split()), intent, where)
    if not out:
        raise CorpusError(f"{path}: no rows after the header")
    return out


def prepare_fluent_speech_commands(corpus_dir: str | Path, out_dir: str | Path, *, with_durations: bool = True) -> dict:
    """Write ``out_dir/{train,dev,test}`` with ``text`` and ``utt2intent``; see the module docstring."""
    fresh_output(out_dir)
    corpus = need_dir(corpus_dir, "fluent_speech_commands_dataset directory")
    splits = {s: _read_csv(corpus, need_file(corpus / "data" / name, f"FSC {s} list")) for s, name in SPLITS.items()}
    counts: dict[str, dict[str, int]] = {}
    with output_tree(out_dir) as tmp:
        for split, rows in splits.items():
            dd = labelled_data_dir(rows, "utt2intent", with_durations=with_durations, desc=f"{split} durations")
            write_split(tmp, split, dd)
            counts[split] = {"utterances": len(rows), "speakers": len({r[0] for r in rows.values()}),
                             "intents": len({r[3] for r in rows.values()})}
        return write_summary(tmp, "fluent_speech_commands", {"corpus_dir": corpus, "durations": with_durations}, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("fluent_speech_commands", __doc__, "fluent_speech_commands_dataset directory", durations=True)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_fluent_speech_commands(a.corpus, a.out, with_durations=not a.no_durations), argv)


if __name__ == "__main__":
    raise SystemExit(main())
