"""Libri-light's limited-supervision fine-tuning sets (10 min, 1 h, 10 h of labelled LibriSpeech) as a data dir.

Input, the released layout (``librispeech_finetuning/`` of Libri-light's ``librispeech_finetuning.tgz``)::

    ROOT/1h/<fold>/{clean,other}/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt    fold = 0..5, ten minutes each
    ROOT/1h/<fold>/{clean,other}/<speaker>/<chapter>/<speaker>-<chapter>-<nnnn>.flac
    ROOT/9h/{clean,other}/<speaker>/<chapter>/...                                     the same form

Every ``{clean,other}`` folder is a LibriSpeech part in miniature, so it is read by the LibriSpeech preparer
(`speechssl.superb.corpora.librispeech`): its transcript reader checks every line and that the flac it lists
exists, and its part writer builds the data dir through lhotse (durations from the headers) and writes the lhotse
manifests beside the Kaldi files. What this module adds is the split -> folders map and the checks that only
make sense across folders: a flac that no transcript lists (LibriSpeech's reader starts from the transcripts,
so it would be dropped in silence) and an utterance id that two folders both claim.

=============  ====================================================  ===============================================
split          folders                                               what papers call it
=============  ====================================================  ===============================================
``10min``      ``1h/0/{clean,other}``                                Libri-light 10 min (fold 0)
``10min:K``    ``1h/K/{clean,other}``, K = 0..5                      one 10-minute fold (papers average the six)
``1h``         ``1h/{0..5}/{clean,other}``                           Libri-light 1 h
``10h``        ``1h/{0..5}/{clean,other}`` and ``9h/{clean,other}``  Libri-light 10 h
=============  ====================================================  ===============================================

Output: ``OUT/`` is one data dir (``wav.scp text utt2spk spk2utt utt2dur reco2dur`` and lhotse
``recordings/supervisions/cuts.jsonl.gz``) with LibriSpeech's utterance ids (``<speaker>-<chapter>-<nnnn>``) and
speaker = the reader id, plus ``prepare.json`` (split, folders, counts). It appears by one rename when everything
succeeded; an existing ``OUT`` is never touched. Nothing is downloaded.

Run it as ``speechssl data librilight-limited --root DIR/librispeech_finetuning --split 1h --out DIR`` or
``speechssl superb prepare librilight --corpus DIR/librispeech_finetuning --split 1h --out DIR``.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from speechssl.data.kaldi import read_data_dir
from speechssl.superb.corpora.common import (
    CorpusError,
    corpus_parser,
    check_num_jobs,
    fresh_output,
    need_dir,
    output_tree,
    run_main,
    write_summary,
)
from speechssl.superb.corpora.librispeech import prepare_part, read_transcripts

__all__ = ["FOLDS", "SPLITS", "split_folders", "check_folders", "prepare_librilight_limited", "main"]

log = logging.getLogger(__name__)

FOLDS = 6  # 1h/0 .. 1h/5, ten minutes each
SPLITS = ("10min", "1h", "10h")  # plus "10min:K" for one fold
_SUBSETS = ("clean", "other")
_FOLD_SPLIT = re.compile(r"10min:(\d+)")


def split_folders(split: str) -> list[str]:
    """The folders (relative to ``librispeech_finetuning/``) that make ``split``, e.g. ``["1h/0/clean", "1h/0/other"]``
    for ``10min``; a `CorpusError` for any other name than ``10min``, ``10min:K`` (K = 0..5), ``1h``, ``10h``."""
    m = _FOLD_SPLIT.fullmatch(split)
    if split == "10min" or m is not None:
        fold = 0 if m is None else int(m.group(1))
        if not 0 <= fold < FOLDS:
            raise CorpusError(f"split {split!r}: Libri-light has ten-minute folds 0..{FOLDS - 1} only")
        folds = [f"1h/{fold}"]
    elif split == "1h":
        folds = [f"1h/{k}" for k in range(FOLDS)]
    elif split == "10h":
        folds = [f"1h/{k}" for k in range(FOLDS)] + ["9h"]
    else:
        raise CorpusError(f"unknown Libri-light split {split!r}; choose 10min, 10min:K (K = 0..{FOLDS - 1}), 1h or 10h")
    return [f"{fold}/{sub}" for fold in folds for sub in _SUBSETS]


def check_folders(root: Path, folders: list[str]) -> int:
    """Read every folder's transcripts (LibriSpeech's reader: malformed line, missing flac) and check what only
    the whole split can show: every flac has a transcript line, and no utterance id is in two folders.
    Returns the number of utterances."""
    seen: dict[str, str] = {}  # utt -> "file:line" of its transcript line
    for name in folders:
        folder = need_dir(root / name, f"Libri-light folder {name!r}")
        listed: set[str] = set()
        for t in read_transcripts(folder):
            if t.utt_id in seen:
                raise CorpusError(f"{t.where}: utterance {t.utt_id} listed twice (also at {seen[t.utt_id]}); "
                                  "is a fold copied into another?")
            seen[t.utt_id] = t.where
            listed.add(t.utt_id)
        for flac in sorted(folder.glob("*/*/*.flac")):
            if flac.name.startswith("."):  # macOS resource forks (._*.flac) are no audio
                continue
            utt = flac.name[: -len(".flac")]
            if utt not in listed:
                trans = flac.parent / f"{flac.parent.parent.name}-{flac.parent.name}.trans.txt"
                raise CorpusError(f"{flac}: utterance {utt} has no transcript line in {trans}; restore the line "
                                  "or remove the file")
    return len(seen)


def prepare_librilight_limited(root: str | Path, out_dir: str | Path, split: str = "10min", *,
                               num_jobs: int = 1) -> dict:
    """Write the Libri-light fine-tuning ``split`` (``10min``, ``10min:K``, ``1h``, ``10h``) found under ``root``
    (the ``librispeech_finetuning/`` directory) as one data dir ``out_dir`` with lhotse manifests.

    Every problem in the tree (missing root or folder, malformed transcript line, a listed utterance without its
    flac, a flac without a transcript line, an utterance id in two folders) raises a one-line `CorpusError` /
    `MissingInputError` naming the file and utterance before anything is written. ``num_jobs``: threads reading
    audio headers. Returns the summary written to ``out_dir/prepare.json``: options and counts (``utterances``,
    ``speakers``, ``seconds``, ``minutes``).
    """
    check_num_jobs(num_jobs)
    fresh_output(out_dir)
    folders = split_folders(split)
    root = need_dir(root, "Libri-light librispeech_finetuning directory")
    n_utts = check_folders(root, folders)
    with output_tree(out_dir) as tmp:
        n = prepare_part(root, ",".join(folders), tmp, None, "error", num_jobs, manifests=True)
        if n != n_utts:  # check_folders read the same transcripts: this would be the LibriSpeech writer disagreeing
            raise RuntimeError(f"{root} {split}: wrote {n} utterances, the transcripts list {n_utts}")
        dd = read_data_dir(tmp)
        seconds = sum(dd.utt2dur.values())  # type: ignore[union-attr]
        counts = {"utterances": len(dd), "speakers": len(set(dd.utt2spk.values())), "seconds": round(seconds, 3),
                  "minutes": round(seconds / 60, 3)}
        summary = write_summary(tmp, "librilight", {"root": root, "split": split, "folders": folders}, counts)
    log.info("Libri-light %s: %d utterances, %d speakers, %.2f minutes", split, counts["utterances"],
             counts["speakers"], counts["minutes"])
    return summary


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("librilight", __doc__, "the librispeech_finetuning/ directory of Libri-light")
    p.add_argument("--split", default="10min", help="10min, 10min:K (K = 0..5), 1h or 10h (default 10min)")
    p.add_argument("--nj", type=int, default=1, help="threads reading audio headers (lhotse)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_librilight_limited(a.corpus, a.out, a.split, num_jobs=a.nj), argv)


if __name__ == "__main__":
    raise SystemExit(main())
