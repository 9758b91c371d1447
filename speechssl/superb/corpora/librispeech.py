"""LibriSpeech for SUPERB PR (phones) and ASR (characters/words).

Input, the released layout (``LibriSpeech/`` of the openslr tarballs)::

    CORPUS/<part>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   "<utt> WORD WORD ..." per line
    CORPUS/<part>/<speaker>/<chapter>/<utt>.flac                      utt = <speaker>-<chapter>-<nnnn>

Output: ``OUT/{train,dev,test}/`` (default parts train-clean-100, dev-clean, test-clean, as SUPERB) with
``wav.scp text utt2spk spk2utt utt2dur reco2dur`` and, given ``--lexicon``, ``utt2phones`` ("utt p1 p2 ...",
stress digits removed: 39 ARPAbet phones with CMUdict / librispeech-lexicon.txt). Speaker = the reader id.

The transcripts are read here first (a malformed line or a listed utterance without its flac is an error naming
``file:line``; lhotse's recipe would only log and skip it), then lhotse's ``prepare_librispeech`` builds the
recordings (durations from the headers) and supervisions, which become the Kaldi dirs through
`speechssl.data.lhotse_io.lhotse_to_data_dir` (phones as the supervisions' ``custom["phones"]``).
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from speechssl.superb.corpora.common import (
    corpus_parser,
    CorpusError,
    check_listed_audio,
    need_dir,
    need_file,
    check_num_jobs,
    fresh_output,
    output_tree,
    read_lines,
    run_main,
    write_summary,
)

__all__ = ["DEFAULT_PARTS", "Transcript", "read_lexicon", "read_transcripts", "prepare_librispeech", "prepare_part", "main"]

log = logging.getLogger(__name__)

DEFAULT_PARTS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
_UTT = re.compile(r"(\d+)-(\d+)-(\d+)")
_STRESS = re.compile(r"\d+$")
_ALTERNATE = re.compile(r"\(\d+\)$")  # CMUdict's second pronunciation: WORD(1)


@dataclass(frozen=True)
class Transcript:
    utt_id: str
    words: list[str]
    flac: Path
    where: str  # "file:line"


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_lexicon(path: str | Path) -> dict[str, list[str]]:
    """WORD -> phones of its first pronunciation, from a CMUdict / librispeech-lexicon.txt style file.

    Lines are ``WORD PH1 PH2 ...`` (any blanks); ``;;;`` comment lines and ``# ...`` line tails are skipped;
    ``WORD(1)`` marks an alternate pronunciation (ignored: the first one listed wins, as for repeated words).
    Words are upper-cased (LibriSpeech transcripts are); stress digits are removed (``AH0`` -> ``AH``).
    """
    path = need_file(path, "lexicon")
    lex: dict[str, list[str]] = {}
    for lineno, line in read_lines(path):
        if line.startswith(";;;"):
            continue
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise CorpusError(f"{path}:{lineno}: word {fields[0]!r} has no phones; expected 'WORD PH1 PH2 ...'")
        if _is_number(fields[1]):
            raise CorpusError(f"{path}:{lineno}: second field {fields[1]!r} is a number: this looks like a lexiconp.txt "
                              "(with pronunciation probabilities); give the plain lexicon 'WORD PH1 PH2 ...'")
        phones = [_STRESS.sub("", p) for p in fields[1:]]
        if any(not p for p in phones):
            raise CorpusError(f"{path}:{lineno}: a phone of {fields[0]!r} is only digits: {' '.join(fields[1:])!r}")
        lex.setdefault(_ALTERNATE.sub("", fields[0]).upper(), phones)
    if not lex:
        raise CorpusError(f"{path}: no pronunciations in the lexicon")
    return lex


def read_transcripts(part_dir: Path) -> list[Transcript]:
    """Every utterance of ``part_dir/*/*/*.trans.txt`` with its flac, checked against the directory it sits in."""
    files = sorted(part_dir.glob("*/*/*.trans.txt"))
    if not files:
        raise CorpusError(f"{part_dir}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files; is this a LibriSpeech part?")
    out: list[Transcript] = []
    seen: dict[str, str] = {}
    for trans in files:
        spk, chap = trans.parent.parent.name, trans.parent.name
        if trans.name != f"{spk}-{chap}.trans.txt":
            raise CorpusError(f"{trans}: expected the name {spk}-{chap}.trans.txt in {trans.parent}")
        for lineno, line in read_lines(trans):
            where = f"{trans}:{lineno}"
            fields = line.split()
            m = _UTT.fullmatch(fields[0])
            if m is None or (m.group(1), m.group(2)) != (spk, chap):
                raise CorpusError(f"{where}: utterance id {fields[0]!r} is not {spk}-{chap}-NNNN; expected '<utt> WORD WORD ...'")
            if len(fields) < 2:
                raise CorpusError(f"{where}: utterance {fields[0]} has no transcript")
            if fields[0] in seen:
                raise CorpusError(f"{where}: utterance {fields[0]} listed twice (also at {seen[fields[0]]})")
            seen[fields[0]] = where
            flac = check_listed_audio(trans.parent / f"{fields[0]}.flac", where)
            out.append(Transcript(fields[0], fields[1:], flac, where))
    return out


def _phones(transcripts: list[Transcript], lexicon: dict[str, list[str]], oov: str) -> dict[str, str]:
    """utt -> "p1 p2 ..."; an OOV word is an error naming the utterance and word, or (``oov="skip"``) drops it."""
    out: dict[str, str] = {}
    skipped: list[str] = []
    for t in transcripts:
        missing = next((w for w in t.words if w.upper() not in lexicon), None)
        if missing is not None:
            if oov == "skip":
                skipped.append(t.utt_id)
                continue
            raise CorpusError(f"{t.where}: utterance {t.utt_id}: word {missing!r} is not in the lexicon; add it "
                              "(e.g. with a G2P) or pass --oov skip to drop such utterances")
        out[t.utt_id] = " ".join(p for w in t.words for p in lexicon[w.upper()])
    if skipped:
        log.warning("dropped %d utterances with words missing from the lexicon (--oov skip), e.g. %s", len(skipped), skipped[0])
    return out


def prepare_part(corpus: Path, part: str, out: Path, lexicon: dict[str, list[str]] | None, oov: str, num_jobs: int,
                  manifests: bool = False) -> int:
    """One split from ``part``: a LibriSpeech part name, or several joined by commas (``train-clean-100,
    train-clean-360,train-other-500`` is train-960)."""
    from lhotse import CutSet, RecordingSet, SupervisionSet
    from lhotse.recipes import prepare_librispeech as lhotse_prepare_librispeech
    from lhotse.utils import fastcopy

    from speechssl.data.lhotse_io import data_dir_to_lhotse, lhotse_to_data_dir

    names = [p for p in part.split(",") if p]
    if not names or len(set(names)) != len(names):
        raise CorpusError(f"LibriSpeech parts {part!r}: give one part or several distinct ones, comma-separated")
    transcripts = [t for name in names for t in read_transcripts(need_dir(corpus / name, f"LibriSpeech part {name!r}"))]
    phones = _phones(transcripts, lexicon, oov) if lexicon is not None else None
    found = lhotse_prepare_librispeech(corpus, dataset_parts=names, output_dir=None, num_jobs=num_jobs)
    recs = RecordingSet.from_recordings(r for name in names for r in found[name]["recordings"])
    sups = SupervisionSet.from_segments(s for name in names for s in found[name]["supervisions"])
    want = {t.utt_id for t in transcripts}
    got = {s.id for s in sups}
    if got != want:  # read_transcripts checked every line, so this is lhotse disagreeing with us
        raise RuntimeError(f"{corpus}/{part}: lhotse found {len(got)} utterances, the transcripts list {len(want)}")
    if phones is not None:
        sups = SupervisionSet.from_segments(
            fastcopy(s, custom={**(s.custom or {}), "phones": phones[s.id]}) for s in sups if s.id in phones
        )
        recs = RecordingSet.from_recordings(r for r in recs if r.id in phones)
    dd = lhotse_to_data_dir(CutSet.from_manifests(recordings=recs, supervisions=sups), out)
    if manifests:  # the same utterances as lhotse manifests beside the Kaldi files (what the trainer reads)
        data_dir_to_lhotse(out, out, progress=False)
    return len(dd)


def prepare_librispeech(
    corpus_dir: str | Path,
    out_dir: str | Path,
    *,
    parts: dict[str, str] | None = None,
    lexicon: str | Path | None = None,
    oov: str = "error",
    num_jobs: int = 1,
    manifests: bool = False,
) -> dict:
    """Write ``out_dir/<split>`` for each ``split -> LibriSpeech part(s)`` of ``parts`` (default `DEFAULT_PARTS`;
    several parts comma-separated make one split, e.g. train-960; an empty value skips the split).

    With ``lexicon`` every split also gets ``utt2phones``; ``oov`` is ``"error"`` or ``"skip"`` (drop the
    utterance from that split). ``manifests``: lhotse ``recordings/supervisions/cuts.jsonl.gz`` beside the Kaldi
    files. Returns the summary written to ``out_dir/prepare.json``.
    """
    if oov not in ("error", "skip"):
        raise CorpusError(f"--oov must be 'error' or 'skip', got {oov!r}")
    check_num_jobs(num_jobs)
    fresh_output(out_dir)
    corpus = need_dir(corpus_dir, "LibriSpeech corpus directory")
    parts = {split: part for split, part in (DEFAULT_PARTS if parts is None else parts).items() if part}
    lex = read_lexicon(lexicon) if lexicon is not None else None
    counts: dict[str, int] = {}
    with output_tree(out_dir) as tmp:
        for split, part in parts.items():
            counts[split] = prepare_part(corpus, part, tmp / split, lex, oov, num_jobs, manifests)
        options = {"corpus_dir": corpus, "parts": parts, "lexicon": lexicon, "oov": oov, "manifests": manifests}
        return write_summary(tmp, "librispeech", options, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("librispeech", __doc__, "the LibriSpeech/ directory holding the parts")
    p.add_argument("--lexicon", default=None, help="CMUdict / librispeech-lexicon.txt; writes utt2phones (PR)")
    p.add_argument("--oov", choices=("error", "skip"), default="error", help="a transcript word missing from the lexicon")
    for split, part in DEFAULT_PARTS.items():
        p.add_argument(f"--{split}-part", default=part,
                       help=f"LibriSpeech part(s) for {split}, comma-separated ('' skips it; default {part})")
    p.add_argument("--nj", type=int, default=1, help="threads reading audio headers (lhotse)")
    p.add_argument("--manifests", action="store_true", help="lhotse manifests beside each split's Kaldi files")
    return p


def main(argv: list[str] | None = None) -> int:
    def run(a: argparse.Namespace) -> None:
        parts = {s: getattr(a, f"{s}_part") for s in DEFAULT_PARTS}
        prepare_librispeech(a.corpus, a.out, parts=parts, lexicon=a.lexicon, oov=a.oov, num_jobs=a.nj,
                            manifests=a.manifests)

    return run_main(_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
