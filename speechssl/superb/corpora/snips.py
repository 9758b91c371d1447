"""Audio SNIPS for SUPERB SF (slot filling): SNIPS NLU utterances synthesised with 16 Amazon Polly voices (Lai et
al., "Semi-supervised spoken language understanding via self-supervised speech and language model pretraining",
ICASSP 2021; the aws-lex-noisy-spoken-language-understanding release), as s3prl's
``preprocess/snips_prepare_data.sh`` lays it out and ``downstream/ctc/snips.yaml`` (= ``problem/asr/superb_sf.py``)
reads it.

Input, the prepared layout::

    CORPUS/all.iob.snips.txt          "<uid> BOS W1 ... Wn EOS<TAB>O T1 ... Tn <intent>" per line, words upper
                                      case, Ti the slot type of word i (no B-/I- prefix; O = no slot), the last
                                      field the intent (in EOS's place); uid = <Speaker>-snips-<split>-<n>
    CORPUS/{train,valid,test}/<uid>.wav   16 kHz mono, every voice's rendering of that split's utterances

s3prl's speaker split (SUPERB): train = Ivy Joanna Joey Justin Kendra Kimberly Matthew Salli (8 x 13,084 =
104,672 utterances), dev = valid/ of Aditi Amy Geraint Nicole (2,800), test = test/ of Brian Emma Raveena
Russell (2,800). A wav of another speaker is not used; a wav without a transcript line is skipped and counted
(s3prl does the same).

Output: ``OUT/{train,dev,test}`` with ``text`` (the words) and ``utt2slots`` (the words with consecutive words of
one slot type between ``<type>`` and ``</type>``: :mod:`speechssl.superb.slots`), speaker = the uid's prefix,
utterance id = uid. As s3prl's ``CharacterTextSlotEncoder`` / ``SuperbSF``: a word made of punctuation only
(``?!.,;-–…``) is dropped with its tag, ``&`` becomes ``AND``.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from speechssl.superb.corpora.common import (
    labelled_data_dir,
    CorpusError,
    corpus_parser,
    fresh_output,
    need_dir,
    need_file,
    output_tree,
    read_lines,
    run_main,
    visible,
    write_split,
    write_summary,
)

__all__ = ["SPEAKERS", "parse_iob_line", "prepare_snips", "main"]

log = logging.getLogger(__name__)

# split -> (directory of the released tree, the voices SUPERB takes from it)
SPEAKERS = {
    "train": ("train", ("Ivy", "Joanna", "Joey", "Justin", "Kendra", "Kimberly", "Matthew", "Salli")),
    "dev": ("valid", ("Aditi", "Amy", "Geraint", "Nicole")),
    "test": ("test", ("Brian", "Emma", "Raveena", "Russell")),
}
TRANSCRIPTS = "all.iob.snips.txt"
_PUNCT = set("?!.,;-–…")
_TYPE = re.compile(r"[A-Za-z0-9_.\-]+")


def parse_iob_line(line: str, where: str) -> tuple[str, str, str, str]:
    """(uid, text, slot-tagged text, intent) of one ``all.iob.snips.txt`` line; ``where`` = "file:line"."""
    parts = line.split("\t")
    if len(parts) != 2:
        raise CorpusError(f"{where}: expected '<uid> BOS words EOS<TAB>O tags <intent>' (one tab), got "
                          f"{len(parts) - 1} tabs")
    left, right = parts[0].split(), parts[1].split()
    if len(left) < 3 or left[1] != "BOS" or left[-1] != "EOS":
        raise CorpusError(f"{where}: the text must read '<uid> BOS words EOS'")
    words, tags = left[2:-1], right[1:-1]
    if len(right) < 2 or right[0] != "O" or len(tags) != len(words):
        raise CorpusError(f"{where}: {len(words)} words but {len(right)} tag fields; expected 'O', one tag per "
                          "word, then the intent")
    out_words: list[str] = []
    tagged: list[str] = []
    open_type = None
    for w, t in zip(words, tags):
        if all(c in _PUNCT for c in w):
            continue
        if t != "O" and not _TYPE.fullmatch(t):
            raise CorpusError(f"{where}: slot type {t!r} is not a token of letters, digits, '_', '.', '-'")
        w = "AND" if w == "&" else w
        if t != open_type:
            if open_type not in (None, "O"):
                tagged.append(f"</{open_type}>")
            if t != "O":
                tagged.append(f"<{t}>")
            open_type = t
        tagged.append(w)
        out_words.append(w)
    if open_type not in (None, "O"):
        tagged.append(f"</{open_type}>")
    if not out_words:
        raise CorpusError(f"{where}: no words")
    return left[0], " ".join(out_words), " ".join(tagged), right[-1]


def _read_transcripts(path: Path) -> dict[str, tuple[int, str]]:
    """uid -> (line number, line); parsed only for the utterances used."""
    out: dict[str, tuple[int, str]] = {}
    for n, line in read_lines(path):
        uid = line.split(None, 1)[0]
        if uid in out:
            raise CorpusError(f"{path}:{n}: utterance {uid} listed twice (also at line {out[uid][0]})")
        out[uid] = (n, line)
    if not out:
        raise CorpusError(f"{path}: no transcript lines")
    return out


def prepare_snips(corpus_dir: str | Path, out_dir: str | Path, *, with_durations: bool = True) -> dict:
    """Write ``out_dir/{train,dev,test}`` with ``text`` and ``utt2slots``; see the module docstring."""
    fresh_output(out_dir)
    corpus = need_dir(corpus_dir, "Audio SNIPS directory (s3prl's SNIPS/)")
    trans_path = need_file(corpus / TRANSCRIPTS, "SNIPS transcripts with slot tags")
    trans = _read_transcripts(trans_path)
    splits, counts = {}, {}
    for split, (folder, voices) in SPEAKERS.items():
        wav_dir = need_dir(corpus / folder, f"SNIPS {folder} audio")
        rows, unlabelled = {}, 0
        for wav in visible(wav_dir.rglob("*.wav")):
            uid = wav.stem
            if uid.split("-", 1)[0] not in voices:
                continue
            if uid not in trans:
                unlabelled += 1
                continue
            n, line = trans[uid]
            where = f"{trans_path}:{n}"
            _, text, tagged, intent = parse_iob_line(line, where)
            if uid in rows:
                raise CorpusError(f"{wav}: utterance {uid} found twice under {wav_dir} (also {rows[uid][1]})")
            rows[uid] = (uid.split("-", 1)[0], wav, text, tagged, where)
        if not rows:
            raise CorpusError(f"{wav_dir}: no wav of the voices {', '.join(voices)} with a line in {trans_path}")
        if unlabelled:
            log.warning("%s: %d wav files of %s without a transcript line skipped", wav_dir, unlabelled, split)
        splits[split] = rows
        counts[split] = {"utterances": len(rows), "speakers": len({r[0] for r in rows.values()}),
                         "unlabelled_wavs": unlabelled}
    with output_tree(out_dir) as tmp:
        for split, rows in splits.items():
            dd = labelled_data_dir(rows, "utt2slots", with_durations=with_durations, desc=f"{split} durations")
            write_split(tmp, split, dd)
        return write_summary(tmp, "snips", {"corpus_dir": corpus, "durations": with_durations}, counts)


def _parser() -> argparse.ArgumentParser:
    return corpus_parser("snips", __doc__, "Audio SNIPS directory (all.iob.snips.txt, train/ valid/ test/)",
                         durations=True)


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_snips(a.corpus, a.out, with_durations=not a.no_durations), argv)


if __name__ == "__main__":
    raise SystemExit(main())
