"""Speech Commands v0.01 for SUPERB KS: the 12-class protocol.

Input, the released layouts (``speech_commands_v0.01.tar.gz`` and, optionally, ``speech_commands_test_set_v0.01
.tar.gz``, each extracted into its own directory)::

    CORPUS/<word>/<speaker>_nohash_<n>.wav      30 word folders, 1 s clips
    CORPUS/_background_noise_/*.wav             6 noise recordings of about a minute
    CORPUS/validation_list.txt                  "<word>/<speaker>_nohash_<n>.wav" per line
    CORPUS/testing_list.txt
    TEST_SET/<class>/*.wav                      the 12 class folders (yes ... go, _unknown_, _silence_)

Output (``utt2kw``: one of yes no up down left right on off stop go _unknown_ _silence_)::

    OUT/train   every word clip in neither list
    OUT/dev     validation_list.txt
    OUT/test    testing_list.txt
    OUT/test_official   the separate test-set tree (SUPERB's KS test split), when given

A word outside the ten keywords is ``_unknown_``. ``_silence_`` utterances are consecutive, non-overlapping 1 s
slices (``segments``) of each ``_background_noise_`` recording; slice i goes to train if i % 10 < 8, to dev if
i % 10 == 8 and to test if i % 10 == 9, so every split has every noise type and no audio is shared. s3prl instead
adds the whole noise files to both train and dev and crops a random second on every read; its class-balanced
sampling (every class drawn equally often) is the training loop's job here too. Speaker = the hash before
``_nohash_`` (``<noise file stem>`` for silence slices); utterance id = ``<speaker>-<folder>-<n>``.

Why not lhotse's ``prepare_speechcommands``: it logs and skips listed clips that are missing, keeps each noise
file whole (one in dev, the rest in train), has no 12-class mapping and expects its own folder names. The
splits are the official lists, which the corpus's hash rule (``which_set`` in its README, used by s3prl) produced.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from speechssl.data.kaldi import DataDir
from speechssl.superb.corpora.common import (
    corpus_parser,
    CorpusError,
    check_listed_audio,
    durations,
    floor_slices,
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

__all__ = ["KEYWORDS", "UNKNOWN", "SILENCE", "CLASSES", "prepare_speech_commands", "main"]

log = logging.getLogger(__name__)

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
CLASSES = KEYWORDS + (UNKNOWN, SILENCE)
BACKGROUND = "_background_noise_"
_CLIP = re.compile(r"(.+?)_nohash_(\d+)\.wav")
SLICE_SECONDS = 1.0


@dataclass
class _Utt:
    speaker: str
    label: str
    rec: str  # recording id (== utt id for whole clips)
    path: Path
    start: float = 0.0
    end: float | None = None  # None: the whole clip
    where: str = ""


def _clip_utt(path: Path, folder: str, label: str, where: str) -> tuple[str, _Utt]:
    m = _CLIP.fullmatch(path.name)
    if m is None:
        raise CorpusError(f"{where}: clip name {path.name!r} is not <speaker>_nohash_<n>.wav")
    utt = f"{m.group(1)}-{folder}-{m.group(2)}"
    return utt, _Utt(m.group(1), label, utt, path, where=where)


def _word_label(word: str) -> str:
    return word if word in KEYWORDS else UNKNOWN


def _read_list(corpus: Path, name: str, words: set[str]) -> dict[str, str]:
    """relative clip path -> "file:line" of one split list; each line must name an existing word clip."""
    path = need_file(corpus / name, f"Speech Commands split list {name}")
    out: dict[str, str] = {}
    for lineno, line in read_lines(path):
        where = f"{path}:{lineno}"
        parts = line.strip().split("/")
        if len(parts) != 2 or parts[0] not in words or not parts[1].endswith(".wav"):
            raise CorpusError(f"{where}: expected '<word>/<speaker>_nohash_<n>.wav' with one of the word folders, got {line.strip()!r}")
        if line.strip() in out:
            raise CorpusError(f"{where}: {line.strip()} listed twice (also at {out[line.strip()]})")
        check_listed_audio(corpus / parts[0] / parts[1], where)
        out[line.strip()] = where
    return out


def _silence_slices(corpus: Path) -> dict[str, dict[str, _Utt]]:
    """split -> utt -> 1 s slice of a background-noise recording (slice i: train i%10<8, dev 8, test 9)."""
    noise_dir = need_dir(corpus / BACKGROUND, "Speech Commands background noise folder")
    files = [p for p in visible(noise_dir.iterdir()) if p.suffix == ".wav"]
    if not files:
        raise CorpusError(f"{noise_dir}: no .wav noise recordings; the _silence_ class is cut from them")
    durs = durations({p.stem: str(p) for p in files}, {p.stem: str(p) for p in files})
    out: dict[str, dict[str, _Utt]] = {"train": {}, "dev": {}, "test": {}}
    for p in files:
        n = floor_slices(durs[p.stem], SLICE_SECONDS)
        if n == 0:
            log.warning("%s: shorter than %g s, no silence slices from it", p, SLICE_SECONDS)
        for i in range(n):
            split = "train" if i % 10 < 8 else ("dev" if i % 10 == 8 else "test")
            utt = f"{p.stem}-{SILENCE}-{i:04d}"
            out[split][utt] = _Utt(p.stem, SILENCE, p.stem, p, i * SLICE_SECONDS, (i + 1) * SLICE_SECONDS, str(p))
    return out


def _data_dir(utts: dict[str, _Utt], *, desc: str) -> DataDir:
    """Kaldi dir of whole clips and slices (``segments`` whenever some utterance is a slice)."""
    whole = {u: x for u, x in utts.items() if x.end is None}
    durs = durations({u: str(x.path) for u, x in whole.items()}, {u: x.where for u, x in whole.items()}, desc=desc)
    sliced = any(x.end is not None for x in utts.values())
    segments = None
    if sliced:
        segments = {u: (x.rec, x.start, x.end if x.end is not None else durs[u]) for u, x in utts.items()}
    return DataDir(
        wav_scp={x.rec: str(x.path) for x in utts.values()},
        utt2spk={u: x.speaker for u, x in utts.items()},
        segments=segments,
        utt2dur={u: (x.end - x.start) if x.end is not None else durs[u] for u, x in utts.items()},
        extra={"utt2kw": {u: x.label for u, x in utts.items()}},
    )


def _test_set(test_dir: Path) -> dict[str, _Utt]:
    """The official test-set tree: the folder is the class; clips <speaker>_nohash_<n>.wav (others: speaker = class)."""
    folders = [p for p in visible(test_dir.iterdir()) if p.is_dir()]
    if not folders:
        raise CorpusError(f"{test_dir}: no class folders; expected the 12 folders of speech_commands_test_set_v0.01")
    utts: dict[str, _Utt] = {}
    for folder in folders:
        if folder.name not in CLASSES:
            raise CorpusError(f"{folder}: not one of the 12 classes ({' '.join(CLASSES)}); is this the v0.01 test set?")
        for p in visible(folder.glob("*.wav")):
            if _CLIP.fullmatch(p.name):
                utt, x = _clip_utt(p, folder.name, folder.name, str(p))
            else:  # _silence_ clips are numbered, not per speaker
                spk = folder.name.strip("_")
                utt, x = f"{spk}-{folder.name}-{p.stem}", _Utt(spk, folder.name, "", p, where=str(p))
                x.rec = utt
            utts[utt] = x
    if not utts:
        raise CorpusError(f"{test_dir}: the class folders hold no .wav clips")
    return utts


def prepare_speech_commands(corpus_dir: str | Path, out_dir: str | Path, *, test_set_dir: str | Path | None = None) -> dict:
    """Write ``out_dir/{train,dev,test}`` (and ``test_official`` from ``test_set_dir``); see the module docstring."""
    fresh_output(out_dir)
    corpus = need_dir(corpus_dir, "Speech Commands v0.01 directory")
    test_dir = need_dir(test_set_dir, "Speech Commands v0.01 test-set directory") if test_set_dir is not None else None
    words = {p.name for p in visible(corpus.iterdir()) if p.is_dir() and p.name != BACKGROUND}
    missing = [w for w in KEYWORDS if w not in words]
    if missing:
        raise CorpusError(f"{corpus}: keyword folder {missing[0]!r} missing; is this speech_commands_v0.01 extracted?")
    lists = {"dev": _read_list(corpus, "validation_list.txt", words), "test": _read_list(corpus, "testing_list.txt", words)}
    both = lists["dev"].keys() & lists["test"].keys()
    if both:
        clip = min(both)
        raise CorpusError(f"{lists['test'][clip]}: {clip} is also in the validation list ({lists['dev'][clip]})")
    splits: dict[str, dict[str, _Utt]] = {"train": {}, "dev": {}, "test": {}}
    for word in sorted(words):
        for p in visible((corpus / word).glob("*.wav")):
            rel = f"{word}/{p.name}"
            split = "dev" if rel in lists["dev"] else "test" if rel in lists["test"] else "train"
            utt, x = _clip_utt(p, word, _word_label(word), lists[split][rel] if split != "train" else str(p))
            splits[split][utt] = x
    for split, slices in _silence_slices(corpus).items():
        splits[split].update(slices)
    if test_dir is not None:
        splits["test_official"] = _test_set(test_dir)
    counts: dict[str, dict[str, int]] = {}
    with output_tree(out_dir) as tmp:
        for split, utts in splits.items():
            if not utts:
                raise CorpusError(f"{corpus}: split {split} would be empty")
            write_split(tmp, split, _data_dir(utts, desc=f"{split} durations"))
            counts[split] = {"utterances": len(utts), **{c: sum(1 for x in utts.values() if x.label == c) for c in CLASSES}}
        options = {"corpus_dir": corpus, "test_set_dir": test_dir}
        return write_summary(tmp, "speech_commands_v0.01", options, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("speech_commands", __doc__, "extracted speech_commands_v0.01.tar.gz")
    p.add_argument("--test-set", default=None, help="extracted speech_commands_test_set_v0.01.tar.gz (SUPERB's test)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_speech_commands(a.corpus, a.out, test_set_dir=a.test_set), argv)


if __name__ == "__main__":
    raise SystemExit(main())
