"""IEMOCAP for SUPERB ER: the 4-class protocol, 5 folds by held-out session.

Input, the released layout (``IEMOCAP_full_release/``)::

    CORPUS/Session<k>/dialog/EmoEvaluation/<dialog>.txt         k = 1..5
        "[<start> - <end>]<TAB><turn><TAB><emotion><TAB>[<v>, <a>, <d>]"   one summary line per turn
        (the lines around it -- the "%" header, "C-E1: ..." evaluator lines -- are not read)
    CORPUS/Session<k>/sentences/wav/<dialog>/<turn>.wav

Output: one data dir ``OUT/all`` with ``utt2emo`` (neu, hap, ang, sad: ``exc`` is merged into ``hap``, every other
label -- fru sur fea dis oth xxx -- dropped, as SUPERB/s3prl) and ``utt2session`` (1..5). Fold k tests on session k
and trains on the other four (`fold_utterances`); SUPERB reports the mean accuracy over the five folds.
Speaker = ``Ses0<k><F|M>``, the speaker of the turn (the letter of its last part: ``Ses01F_impro01_M003`` is
spoken by Ses01M); utterance id = ``<speaker>-<turn>``. lhotse has no IEMOCAP recipe.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from pathlib import Path

from speechssl.data.kaldi import DataDir, c_sorted
from speechssl.superb.corpora.common import (
    corpus_parser,
    CorpusError,
    check_listed_audio,
    durations,
    need_dir,
    fresh_output,
    output_tree,
    read_lines,
    run_main,
    visible,
    write_split,
    write_summary,
)

__all__ = ["EMOTIONS", "LABEL_MAP", "SESSIONS", "prepare_iemocap", "fold_utterances", "main"]

log = logging.getLogger(__name__)

EMOTIONS = ("neu", "hap", "ang", "sad")
LABEL_MAP = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
ALL_LABELS = frozenset(LABEL_MAP) | {"fru", "sur", "fea", "dis", "oth", "xxx"}
SESSIONS = (1, 2, 3, 4, 5)
_SUMMARY = re.compile(r"\[\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s*\]\s+(\S+)\s+(\S+)\s+\[[^\]]*\]")
_TURN_SPEAKER = re.compile(r"([FM])[0-9A-Za-z]*")


def _read_evaluation(path: Path, session: int, wav_dir: Path) -> tuple[dict[str, tuple[str, str, Path, str]], Counter]:
    """utt -> (speaker, 4-class label, wav, "file:line") of one EmoEvaluation file, and the counts of all labels."""
    dialog = path.stem
    out: dict[str, tuple[str, str, Path, str]] = {}
    labels: Counter = Counter()
    for lineno, line in read_lines(path):
        if not line.startswith("["):
            continue
        where = f"{path}:{lineno}"
        m = _SUMMARY.fullmatch(line.strip())
        if m is None:
            raise CorpusError(f"{where}: expected '[<start> - <end>]<TAB><turn><TAB><emotion><TAB>[v, a, d]', got {line.strip()!r}")
        _, _, turn, emo = m.groups()
        if not turn.startswith(dialog + "_") or not turn.startswith(f"Ses0{session}"):
            raise CorpusError(f"{where}: turn {turn!r} does not belong to dialog {dialog} of Session{session}")
        g = _TURN_SPEAKER.fullmatch(turn[len(dialog) + 1:])
        if g is None:
            raise CorpusError(f"{where}: turn {turn!r} does not end in _F... or _M... (the speaker of the turn)")
        if emo not in ALL_LABELS:
            raise CorpusError(f"{where}: emotion {emo!r} is not an IEMOCAP label ({' '.join(sorted(ALL_LABELS))})")
        labels[emo] += 1
        if emo not in LABEL_MAP:
            continue
        speaker = f"Ses0{session}{g.group(1)}"
        utt = f"{speaker}-{turn}"
        if utt in out:
            raise CorpusError(f"{where}: turn {turn} listed twice (also at {out[utt][3]})")
        out[utt] = (speaker, LABEL_MAP[emo], check_listed_audio(wav_dir / dialog / f"{turn}.wav", where), where)
    return out, labels


def fold_utterances(utt2session: dict[str, str], fold: int) -> tuple[list[str], list[str]]:
    """(train, test) utterance ids of fold ``fold`` (1..5): test = session ``fold``, train = the other sessions."""
    if str(fold) not in {str(s) for s in SESSIONS}:
        raise CorpusError(f"fold must be one of {SESSIONS}, got {fold}")
    test = c_sorted(u for u, s in utt2session.items() if s == str(fold))
    train = c_sorted(u for u, s in utt2session.items() if s != str(fold))
    return train, test


def prepare_iemocap(corpus_dir: str | Path, out_dir: str | Path, *, with_durations: bool = True) -> dict:
    """Write ``out_dir/all`` (utt2emo, utt2session); see the module docstring. Returns the summary."""
    fresh_output(out_dir)
    corpus = need_dir(corpus_dir, "IEMOCAP_full_release directory")
    utts: dict[str, tuple[str, str, Path, str]] = {}
    sessions: dict[str, str] = {}
    all_labels: Counter = Counter()
    for k in SESSIONS:
        eval_dir = need_dir(corpus / f"Session{k}" / "dialog" / "EmoEvaluation", f"IEMOCAP Session{k} EmoEvaluation folder")
        wav_dir = need_dir(corpus / f"Session{k}" / "sentences" / "wav", f"IEMOCAP Session{k} sentence wav folder")
        files = visible(eval_dir.glob("*.txt"))  # the tarball carries ._* resource forks
        if not files:
            raise CorpusError(f"{eval_dir}: no <dialog>.txt evaluation files")
        for path in files:
            found, labels = _read_evaluation(path, k, wav_dir)
            all_labels += labels
            utts.update(found)
            sessions.update({u: str(k) for u in found})
    durs = None
    if with_durations:
        durs = durations({u: str(x[2]) for u, x in utts.items()}, {u: x[3] for u, x in utts.items()})
    dd = DataDir(
        wav_scp={u: str(x[2]) for u, x in utts.items()},
        utt2spk={u: x[0] for u, x in utts.items()},
        utt2dur=durs,
        extra={"utt2emo": {u: x[1] for u, x in utts.items()}, "utt2session": sessions},
    )
    kept = Counter(x[1] for x in utts.values())
    log.info("kept %d turns (%s); dropped %d with other labels", len(utts),
             ", ".join(f"{e} {kept[e]}" for e in EMOTIONS), sum(all_labels.values()) - len(utts))
    with output_tree(out_dir) as tmp:
        write_split(tmp, "all", dd)
        counts = {"kept": {e: kept[e] for e in EMOTIONS}, "source_labels": dict(sorted(all_labels.items())),
                  "sessions": {str(k): sum(1 for s in sessions.values() if s == str(k)) for k in SESSIONS}}
        return write_summary(tmp, "iemocap", {"corpus_dir": corpus, "durations": with_durations}, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("iemocap", __doc__, "IEMOCAP_full_release directory", durations=True)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_iemocap(a.corpus, a.out, with_durations=not a.no_durations), argv)


if __name__ == "__main__":
    raise SystemExit(main())
