"""VoxCeleb1 for SUPERB SID (1,251-speaker identification) and ASV (verification on a trial list).

Input, the released layout (the dev and test zips extracted, their ``wav/`` trees side by side or merged) and the
two protocol files from the VoxCeleb site::

    CORPUS/wav/id10001/1zcIwhmdeo4/00001.wav     (or CORPUS/vox1_dev_wav/wav/..., CORPUS/vox1_test_wav/wav/...,
                                                  CORPUS/dev/wav/..., CORPUS/test/wav/..., or --wav-root DIR)
    CORPUS/iden_split.txt      "<1|2|3> id10003/na8-QEFmj44/00003.wav"  (1 train, 2 dev, 3 test; every utterance)
    CORPUS/veri_test2.txt      "<1|0> <enroll wav> <test wav>"           (or veri_test.txt; 1 = same speaker)

Output::

    OUT/sid/{train,dev,test}   iden_split.txt's three sets (closed set: the same 1,251 speakers in each)
    OUT/asv/train              every iden_split utterance whose speaker is in no trial (the 1,211 dev speakers)
    OUT/asv/test               every utterance the trials name (the 40 test speakers), plus
    OUT/asv/test/trials        "<enroll utt> <test utt> target|nontarget" in the trial file's order

Utterance id = ``<speaker>-<video>-<n>`` (Kaldi's and lhotse's), speaker = the ``idNNNNN`` folder.
Why not lhotse's ``prepare_voxceleb``: it splits by the speaker metadata csv rather than iden_split.txt and
downloads the trial list from the network while preparing; both protocol files are read here instead.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from speechssl.data.kaldi import DataDir
from speechssl.fileio import atomic_write_text
from speechssl.superb.corpora.common import (
    corpus_parser,
    CorpusError,
    check_listed_audio,
    durations,
    need_dir,
    need_file,
    fresh_output,
    output_tree,
    read_lines,
    run_main,
    visible,
    write_split,
    write_summary,
)

__all__ = ["WAV_ROOTS", "SID_SPLITS", "prepare_voxceleb1", "read_trials", "main"]

log = logging.getLogger(__name__)

WAV_ROOTS = ("wav", "vox1_dev_wav/wav", "vox1_test_wav/wav", "dev/wav", "test/wav")
SID_SPLITS = {"1": "train", "2": "dev", "3": "test"}
TRIAL_FILES = ("veri_test2.txt", "veri_test.txt")
_REL = re.compile(r"(id\d+)/([^/\s]+)/(\d+)\.wav")


@dataclass(frozen=True)
class _Utt:
    utt_id: str
    speaker: str
    path: Path
    where: str


class _Resolver:
    """Finds ``idNNNNN/<video>/<n>.wav`` under the first wav root that has the speaker's folder."""

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.speaker_root: dict[str, Path] = {}
        for root in reversed(roots):  # the first root wins
            for d in visible(root.iterdir()):
                if d.is_dir():
                    self.speaker_root[d.name] = root

    def utt(self, rel: str, where: str) -> _Utt:
        m = _REL.fullmatch(rel)
        if m is None:
            raise CorpusError(f"{where}: {rel!r} is not a VoxCeleb1 path 'idNNNNN/<video>/<n>.wav'")
        spk, video, n = m.groups()
        root = self.speaker_root.get(spk)
        if root is None:
            raise CorpusError(f"{where}: lists audio of speaker {spk}, whose folder is in none of the wav roots "
                              f"({', '.join(map(str, self.roots))}); extract both VoxCeleb1 zips or pass --wav-root")
        return _Utt(f"{spk}-{video}-{n}", spk, check_listed_audio(root / rel, where), where)


def _read_iden_split(path: Path, resolver: _Resolver) -> dict[str, dict[str, _Utt]]:
    splits: dict[str, dict[str, _Utt]] = {name: {} for name in SID_SPLITS.values()}
    seen: dict[str, str] = {}
    for lineno, line in read_lines(path):
        where = f"{path}:{lineno}"
        fields = line.split()
        if len(fields) != 2 or fields[0] not in SID_SPLITS:
            raise CorpusError(f"{where}: expected '<1|2|3> idNNNNN/<video>/<n>.wav', got {line.strip()!r}")
        u = resolver.utt(fields[1], where)
        if u.utt_id in seen:
            raise CorpusError(f"{where}: {fields[1]} listed twice (also at {seen[u.utt_id]})")
        seen[u.utt_id] = where
        splits[SID_SPLITS[fields[0]]][u.utt_id] = u
    return splits


def read_trials(path: Path, resolver: _Resolver) -> tuple[list[tuple[str, str, str]], dict[str, _Utt]]:
    """(enroll utt, test utt, "target"|"nontarget") per line, and every utterance the trials name."""
    trials: list[tuple[str, str, str]] = []
    utts: dict[str, _Utt] = {}
    for lineno, line in read_lines(path):
        where = f"{path}:{lineno}"
        fields = line.split()
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise CorpusError(f"{where}: expected '<1|0> <enroll wav> <test wav>', got {line.strip()!r}")
        a, b = resolver.utt(fields[1], where), resolver.utt(fields[2], where)
        target = fields[0] == "1"
        if target != (a.speaker == b.speaker):
            raise CorpusError(f"{where}: label {fields[0]} but the speakers are {a.speaker} and {b.speaker}; "
                              "1 must mean the same speaker")
        utts.setdefault(a.utt_id, a)
        utts.setdefault(b.utt_id, b)
        trials.append((a.utt_id, b.utt_id, "target" if target else "nontarget"))
    if not trials:
        raise CorpusError(f"{path}: no trials")
    return trials, utts


def _data_dir(utts: dict[str, _Utt], with_durations: bool, desc: str) -> DataDir:
    durs = None
    if with_durations:
        durs = durations({u: str(x.path) for u, x in utts.items()}, {u: x.where for u, x in utts.items()}, desc=desc)
    return DataDir(wav_scp={u: str(x.path) for u, x in utts.items()}, utt2spk={u: x.speaker for u, x in utts.items()},
                   utt2dur=durs)


def _wav_roots(corpus: Path, extra: list[str] | None) -> list[Path]:
    roots = [need_dir(r, "--wav-root") for r in (extra or [])] + [corpus / r for r in WAV_ROOTS if (corpus / r).is_dir()]
    if not roots:
        raise CorpusError(f"{corpus}: none of {', '.join(WAV_ROOTS)} is a directory; where are the extracted wavs? (--wav-root)")
    return roots


def _trials_file(corpus: Path, trials: str | Path | None) -> Path:
    if trials is not None:
        return need_file(trials, "VoxCeleb1 trial list")
    for name in TRIAL_FILES:
        if (corpus / name).is_file():
            return corpus / name
    raise CorpusError(f"{corpus}: neither {' nor '.join(TRIAL_FILES)} found; download the trial list (egs/superb/README.md), "
                      "pass --trials FILE, or --no-asv")


def prepare_voxceleb1(
    corpus_dir: str | Path,
    out_dir: str | Path,
    *,
    iden_split: str | Path | None = None,
    trials: str | Path | None = None,
    asv: bool = True,
    wav_roots: list[str] | None = None,
    with_durations: bool = True,
) -> dict:
    """Write ``out_dir/sid/{train,dev,test}`` and (``asv``) ``out_dir/asv/{train,test}`` + ``asv/test/trials``."""
    fresh_output(out_dir)
    corpus = need_dir(corpus_dir, "VoxCeleb1 directory")
    resolver = _Resolver(_wav_roots(corpus, wav_roots))
    iden = need_file(iden_split if iden_split is not None else corpus / "iden_split.txt", "VoxCeleb1 iden_split.txt")
    sid = _read_iden_split(iden, resolver)
    counts: dict[str, dict[str, int]] = {}
    trial_list: list[tuple[str, str, str]] = []
    trial_path = None
    if asv:
        trial_path = _trials_file(corpus, trials)
        trial_list, test_utts = read_trials(trial_path, resolver)
        test_speakers = {u.speaker for u in test_utts.values()}
        asv_train = {k: u for split in sid.values() for k, u in split.items() if u.speaker not in test_speakers}
        if not asv_train:
            raise CorpusError(f"{iden}: every speaker also appears in {trial_path}; no speakers are left to train ASV on")
    with output_tree(out_dir) as tmp:
        for split, utts in sid.items():
            if not utts:
                raise CorpusError(f"{iden}: no utterances of split {split}")
            write_split(tmp / "sid", split, _data_dir(utts, with_durations, f"sid/{split} durations"))
        counts["sid"] = {s: len(u) for s, u in sid.items()}
        if asv:
            write_split(tmp / "asv", "train", _data_dir(asv_train, with_durations, "asv/train durations"))
            write_split(tmp / "asv", "test", _data_dir(test_utts, with_durations, "asv/test durations"))
            atomic_write_text(tmp / "asv" / "test" / "trials", "".join(f"{a} {b} {t}\n" for a, b, t in trial_list))
            n_target = sum(t == "target" for _, _, t in trial_list)
            counts["asv"] = {"train": len(asv_train), "test": len(test_utts), "trials": len(trial_list),
                             "target_trials": n_target, "train_speakers": len({u.speaker for u in asv_train.values()}),
                             "test_speakers": len(test_speakers)}
        options = {"corpus_dir": corpus, "iden_split": iden, "trials": trial_path, "asv": asv,
                   "wav_roots": [str(r) for r in resolver.roots], "durations": with_durations}
        return write_summary(tmp, "voxceleb1", options, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("voxceleb1", __doc__, "VoxCeleb1 directory (wav trees + protocol files)", durations=True)
    p.add_argument("--iden-split", default=None, help="default CORPUS/iden_split.txt")
    p.add_argument("--trials", default=None, help="default CORPUS/veri_test2.txt, else CORPUS/veri_test.txt")
    p.add_argument("--no-asv", action="store_true", help="SID only: no trial list needed")
    p.add_argument("--wav-root", action="append", default=None, help="a directory of idNNNNN folders (repeatable; searched first)")
    return p


def main(argv: list[str] | None = None) -> int:
    def run(a: argparse.Namespace) -> None:
        prepare_voxceleb1(a.corpus, a.out, iden_split=a.iden_split, trials=a.trials, asv=not a.no_asv,
                          wav_roots=a.wav_root, with_durations=not a.no_durations)

    return run_main(_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
