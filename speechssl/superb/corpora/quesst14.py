"""QUESST 2014 (MediaEval "Query by Example Search on Speech") for SUPERB query-by-example (QbE).

Input, the released layout (``quesst14Database/``)::

    CORPUS/Audio/quesst14_NNNNN.wav               the documents searched (8 kHz; resampled when read)
    CORPUS/dev_queries/quesst14_dev_NNNN.wav      dev queries
    CORPUS/eval_queries/quesst14_eval_NNNN.wav    eval queries
    CORPUS/scoring/language_key_{utterances,dev,eval}.lst
                                                  "quesst14Database/<dir>/<name>.wav <language>" per file
    CORPUS/scoring/groundtruth_quesst14_{dev,eval}/   the NIST STD files of the scorer:
        *.ecf.xml    the documents of the trials  (<excerpt audio_filename="..."/>)
        *.tlist.xml  the queries                  (<term termid="quesst14_dev_0001">)
        *.rttm       the occurrences              ("LEXEME <doc> <chnl> <tbeg> <tdur> <query> ..."; other types skipped)

Output: ``OUT/{dev,test}`` (test = eval), each one data dir with the split's queries and every document of its ECF,
in the format of :mod:`speechssl.superb.qbe`: ``utt2role`` (query|doc), ``qbe_truth`` ("query doc start end" per
RTTM occurrence), plus ``utt2lang``. Utterance id = file stem; QUESST has no speaker labels, so each utterance is
its own speaker. ``--languages``: SUPERB evaluates the English subset (``nnenglish``, s3prl's
``quesst14_dtw/dataset.py``), the default; ``all`` keeps the six languages. Occurrences whose query or document is
of another language are dropped; a query, document or occurrence the other files do not know is an error naming
``file:line``.
"""

from __future__ import annotations

import argparse
import logging
import xml.parsers.expat
from pathlib import Path, PurePosixPath

from speechssl.data.kaldi import DataDir
from speechssl.fileio import atomic_write_text
from speechssl.superb.corpora.common import (
    CorpusError,
    check_listed_audio,
    corpus_parser,
    durations,
    fresh_output,
    need_dir,
    need_file,
    output_tree,
    read_lines,
    run_main,
    write_split,
    write_summary,
)

__all__ = ["SPLITS", "LANGUAGES", "prepare_quesst14", "read_language_key", "read_xml_elements", "read_rttm", "main"]

log = logging.getLogger(__name__)

SPLITS = {"dev": "dev", "test": "eval"}          # our split -> QUESST's name
LANGUAGES = ("albanian", "basque", "czech", "nnenglish", "romanian", "slovak")


def read_language_key(corpus: Path, path: Path) -> dict[str, tuple[Path, str, str]]:
    """id -> (audio, language, "file:line") of a ``language_key_*.lst``; the audio must exist."""
    out: dict[str, tuple[Path, str, str]] = {}
    for n, line in read_lines(path):
        where, f = f"{path}:{n}", line.split()
        if len(f) != 2:
            raise CorpusError(f"{where}: expected '<path>.wav <language>', got {line.strip()!r}")
        rel = PurePosixPath(f[0])
        if len(rel.parts) < 2 or rel.suffix.lower() != ".wav":
            raise CorpusError(f"{where}: expected 'quesst14Database/<dir>/<name>.wav', got {f[0]!r}")
        if rel.stem in out:
            raise CorpusError(f"{where}: {rel.stem} listed twice (also at {out[rel.stem][2]})")
        out[rel.stem] = (check_listed_audio(corpus.joinpath(*rel.parts[1:]), where), f[1], where)
    if not out:
        raise CorpusError(f"{path}: empty; expected one '<path>.wav <language>' line per file")
    return out


def read_xml_elements(path: Path, tag: str, attr: str) -> list[tuple[int, str]]:
    """(line, value of ``attr``) of every ``<tag>`` element of an XML file; malformed XML or an element without the
    attribute is an error naming ``file:line``."""
    parser = xml.parsers.expat.ParserCreate()
    out: list[tuple[int, str]] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        if name == tag:
            if not attrs.get(attr, "").strip():
                raise CorpusError(f"{path}:{parser.CurrentLineNumber}: <{tag}> without {attr}=")
            out.append((parser.CurrentLineNumber, attrs[attr].strip()))

    parser.StartElementHandler = start
    try:
        parser.Parse(path.read_bytes(), True)
    except xml.parsers.expat.ExpatError as e:
        raise CorpusError(f"{path}:{e.lineno}: not well-formed XML ({xml.parsers.expat.ErrorString(e.code)})") from e
    if not out:
        raise CorpusError(f"{path}: no <{tag} {attr}=...> element")
    return out


def read_rttm(path: Path, queries: set[str], docs: set[str]) -> list[tuple[str, str, float, float, str]]:
    """(query, doc, start, end, "file:line") of the LEXEME lines; the query must be in the term list and the
    document in the ECF."""
    out = []
    for n, line in read_lines(path):
        f, where = line.split(), f"{path}:{n}"
        if f[0] != "LEXEME":
            continue
        if len(f) < 6:
            raise CorpusError(f"{where}: expected 'LEXEME <doc> <channel> <tbeg> <tdur> <query> ...', got {line!r}")
        try:
            start, dur = float(f[3]), float(f[4])
        except ValueError:
            raise CorpusError(f"{where}: tbeg and tdur must be seconds, got {f[3]!r} {f[4]!r}") from None
        if start < 0 or dur <= 0:
            raise CorpusError(f"{where}: need tbeg >= 0 and tdur > 0, got {f[3]} {f[4]}")
        doc, query = PurePosixPath(f[1]).stem, f[5]
        if query not in queries:
            raise CorpusError(f"{where}: query {query} is not in the term list (tlist.xml) of {path.parent}")
        if doc not in docs:
            raise CorpusError(f"{where}: document {doc} is not in the ECF (ecf.xml) of {path.parent}")
        out.append((query, doc, start, start + dur, where))
    return out


def _one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise CorpusError(f"{folder}: expected one {pattern} ({what}), found {len(found)}"
                          + (f": {', '.join(p.name for p in found)}" if found else ""))
    return found[0]


def prepare_quesst14(corpus_dir: str | Path, out_dir: str | Path, *, languages: str = "nnenglish",
                     with_durations: bool = True) -> dict:
    """Write ``out_dir/{dev,test}`` for task qbe; see the module docstring."""
    fresh_output(out_dir)
    keep = set(LANGUAGES) if languages == "all" else set(languages.split(","))
    if not keep <= set(LANGUAGES):
        raise CorpusError(f"--languages {languages}: choose 'all' or some of {', '.join(LANGUAGES)}")
    corpus = need_dir(corpus_dir, "quesst14Database directory")
    scoring = need_dir(corpus / "scoring", "QUESST 2014 scoring directory")
    docs_key = read_language_key(corpus, need_file(scoring / "language_key_utterances.lst", "document language key"))
    splits = {}
    for split, name in SPLITS.items():
        key = read_language_key(corpus, need_file(scoring / f"language_key_{name}.lst", f"{name} query language key"))
        truth_dir = need_dir(scoring / f"groundtruth_quesst14_{name}", f"{name} ground truth")
        tlist, ecf = _one(truth_dir, "*.tlist.xml", "term list"), _one(truth_dir, "*.ecf.xml", "documents")
        queries = {}
        for n, q in read_xml_elements(tlist, "term", "termid"):
            if q not in key:
                raise CorpusError(f"{tlist}:{n}: query {q} is not in {scoring / f'language_key_{name}.lst'}")
            queries[q] = key[q]
        docs = {}
        for n, a in read_xml_elements(ecf, "excerpt", "audio_filename"):
            d = PurePosixPath(a).stem
            if d not in docs_key:
                raise CorpusError(f"{ecf}:{n}: document {a} is not in {scoring / 'language_key_utterances.lst'}")
            docs[d] = docs_key[d]
        truth = read_rttm(_one(truth_dir, "*.rttm", "occurrences"), set(queries), set(docs))
        rows = {u: (r, role) for role, table in (("query", queries), ("doc", docs)) for u, r in table.items()
                if r[1] in keep}
        if not any(role == "query" for _, role in rows.values()):
            raise CorpusError(f"{tlist}: no query of language {languages} (--languages)")
        splits[split] = (rows, [t for t in truth if t[0] in rows and t[1] in rows])
    counts = {}
    with output_tree(out_dir) as tmp:
        for split, (rows, truth) in splits.items():
            durs = None
            if with_durations:
                durs = durations({u: str(r[0]) for u, (r, _) in rows.items()}, {u: r[2] for u, (r, _) in rows.items()},
                                 desc=f"{split} durations")
            dd = DataDir(wav_scp={u: str(r[0]) for u, (r, _) in rows.items()}, utt2spk={u: u for u in rows},
                         utt2dur=durs, extra={"utt2role": {u: role for u, (_, role) in rows.items()},
                                              "utt2lang": {u: r[1] for u, (r, _) in rows.items()}})
            write_split(tmp, split, dd)
            lines = sorted(f"{q} {d} {a:.3f} {b:.3f}\n" for q, d, a, b, _ in truth)
            atomic_write_text(tmp / split / "qbe_truth", "".join(lines))
            n_q = sum(role == "query" for _, role in rows.values())
            counts[split] = {"queries": n_q, "documents": len(rows) - n_q, "occurrences": len(truth),
                             "queries_with_occurrences": len({t[0] for t in truth})}
        return write_summary(tmp, "quesst14", {"corpus_dir": corpus, "languages": languages,
                                               "durations": with_durations}, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("quesst14", __doc__, "quesst14Database directory", durations=True)
    p.add_argument("--languages", default="nnenglish",
                   help=f"comma-separated languages to keep ({', '.join(LANGUAGES)}) or 'all' (default: nnenglish, "
                        "SUPERB's English subset)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_quesst14(a.corpus, a.out, languages=a.languages,
                                                        with_durations=not a.no_durations), argv)


if __name__ == "__main__":
    raise SystemExit(main())
