#!/usr/bin/env python3
"""Query-by-example data for mini_synth (SUPERB QbE): spoken terms alone (queries) and read sentences that contain
them (documents), rendered with the hubert recipe's espeak renderer.

    python egs/mini_synth/superb/local/make_qbe.py --corpus ../hubert/data --out exp/data/qbe \
        [--seed 0] [--terms 30] [--docs-per-term 3] [--fillers 40] [--term-words 2]

Output (the whole tree appears by one rename when everything is written)::

    OUT/{dev,test}/         one Kaldi data dir per split holding queries and documents: wav.scp utt2spk spk2utt
                            text utt2dur utt2role (query|doc) and qbe_truth ("query_utt doc_utt start end" per
                            occurrence, seconds in the document): the format of speechssl.superb.qbe
    OUT/wav/<split>/*.wav   16 kHz 16-bit mono
    OUT/qbe.json            summary: terms per split, counts, seconds, seed

Design. A term is an adjective (5+ letters) and a noun (6+ letters) of the corpus grammar ("golden lantern", about
a second of speech; QUESST's own example is "white horse"); each split has its own ``--terms`` terms and no word
occurs in two terms of either split. A query is its term spoken by one of the corpus' held-apart voices
(``test_spk``: never heard in pretraining), cut to its speech +-50 ms. A document is a read sentence of at most 8
words from the split's own text pool of the corpus grammar, spoken by one of the 40 main voices:
``--docs-per-term`` per term with one noun replaced by the term, and ``--fillers`` with no word of any term of the
split. So every query is matched across voices (accent, pitch, rate, channel), where learned features should beat
spectral ones. Queries and documents go through the corpus' realism transforms (noise with the corpus' babble
bank, reverberation, band limitation, speed, prosody) as its corpus.json options say.

Where the term lies in a document: the renderer returns phone segments; the term's phones are those espeak gives
for the term alone in the document's voice; the document is kept only if that phone string occurs exactly once
among its non-silence phones (else another sentence is drawn), and the occurrence runs from its first phone's start
to its last phone's end. Everything is a function of --seed (every utterance has its own generator).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

_HUBERT_LOCAL = Path(__file__).resolve().parents[2] / "hubert" / "local"
if str(_HUBERT_LOCAL) not in sys.path:
    sys.path.insert(0, str(_HUBERT_LOCAL))

import grammar  # noqa: E402
from espeak import synthesize  # noqa: E402
from grammar import Prompt  # noqa: E402
from make_corpus import _draw_read, write_wav  # noqa: E402
from phoneset import SIL, to_phone  # noqa: E402
from render import SR, RenderOptions, Speaker, make_babble_bank, render  # noqa: E402

from speechssl.data.kaldi import DataDir, write_data_dir  # noqa: E402
from speechssl.errors import UserError  # noqa: E402
from speechssl.fileio import atomic_dir, atomic_write_text  # noqa: E402

log = logging.getLogger("make_qbe")

SPLITS = ("dev", "test")
MIN_LETTERS = 6          # terms: nouns of at least this many letters (two or three syllables)
QUERY_MARGIN = 0.05      # seconds kept around a query's word
MAX_WORDS = 8            # documents: read sentences of at most this many words (about 2.5 s)
MAX_TRIES = 50


def _terms(seed: int, n: int, words: int) -> dict[str, list[str]]:
    """``n`` distinct terms per split: nouns of MIN_LETTERS letters or more, with ``words`` = 2 an adjective of five
    or more before each; no word is shared by two terms (of any split) nor contained in another."""
    rng = np.random.default_rng([seed, 31])
    pools = [sorted(w for w in grammar.NOUNS if len(w) >= MIN_LETTERS and w not in grammar.ADJECTIVES)]
    if words == 2:
        pools.insert(0, sorted(w for w in grammar.ADJECTIVES if len(w) >= 5 and w not in grammar.NOUNS))
    picked: list[list[str]] = []
    for pool in pools:
        order = [pool[int(i)] for i in rng.permutation(len(pool))]
        picked.append([])
        for w in order:
            if not any(w in p or p in w for p in picked[-1]):
                picked[-1].append(w)
    need = n * len(SPLITS)
    if any(len(p) < need for p in picked):
        raise UserError(f"--terms {n}: only {min(len(p) for p in picked)} usable words for {len(SPLITS)} splits")
    terms = [" ".join(ws) for ws in zip(*(p[:need] for p in picked))]
    return {s: terms[i * n:(i + 1) * n] for i, s in enumerate(SPLITS)}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _article(m: re.Match) -> str:
    """``a`` / ``an`` by the next word's first letter (the corpus grammar's rule)."""
    return m.group(1) + ("n " if m.string[m.end()].lower() in "aeiou" else " ")


def _sentence(rng: np.random.Generator, split: str, terms: list[str], term: str | None) -> Prompt:
    """A read sentence of the split's pool without any of ``terms``; with ``term``: one noun replaced by it."""
    nouns = set(grammar.NOUNS)
    for _ in range(1000):
        p = _draw_read(rng, split)
        words = _words(p.speak)
        if len(words) > MAX_WORDS or any(w in words for t in terms for w in t.split()):
            continue
        if term is None:
            return p
        slots = [w for w in words if w in nouns]
        if not slots:
            continue
        speak = re.sub(rf"\b{slots[0]}\b", term, p.speak, count=1, flags=re.IGNORECASE)
        speak = re.sub(r"\b([Aa])n? (?=[A-Za-z])", _article, speak)
        return Prompt("read", speak, grammar.transcript(speak))
    raise UserError(f"no sentence of the {split} pool fits (terms {terms})")


def _phones(text: str, speaker: Speaker) -> list[str]:
    syn = synthesize(text, speaker.espeak_voice())
    return [p for p in (to_phone(m, speaker.voice) for _, m in syn.phones) if p != SIL]


def _locate(segments: list[tuple[int, int, str]], phones: list[str]) -> tuple[int, int] | None:
    """(start, end) samples of the one occurrence of ``phones`` among the non-silence segments, else None."""
    speech = [s for s in segments if s[2] != SIL]
    seq = [s[2] for s in speech]
    hits = [i for i in range(len(seq) - len(phones) + 1) if seq[i:i + len(phones)] == phones]
    if len(hits) != 1:
        return None
    return speech[hits[0]][0], speech[hits[0] + len(phones) - 1][1]


def _query(term: str, speaker: Speaker, opts: RenderOptions, rng: np.random.Generator, bank) -> np.ndarray:
    """The term spoken alone, cut to its speech +-QUERY_MARGIN seconds."""
    out = render(Prompt("read", term, grammar.transcript(term)), speaker, opts, rng, bank)
    speech = [s for s in out.segments if s[2] != SIL]
    a = max(0, speech[0][0] - int(QUERY_MARGIN * SR))
    b = min(len(out.audio), speech[-1][1] + int(QUERY_MARGIN * SR))
    return out.audio[a:b]


def _split(split: str, s_i: int, terms: list[str], main: list[Speaker], held: list[Speaker], opts: RenderOptions,
           bank, seed: int, docs_per_term: int, fillers: int, root: Path, final: Path) -> dict:
    """Render one split into ``root/wav/<split>`` and write its data dir ``root/<split>``."""
    rng = np.random.default_rng([seed, 37, s_i])
    wav_dir = root / "wav" / split
    wav_dir.mkdir(parents=True)
    wav_scp, utt2spk, text, utt2dur, role = {}, {}, {}, {}, {}
    truth: list[tuple[str, str, float, float]] = []

    def add(utt: str, spk: Speaker, audio: np.ndarray, words: str, kind: str) -> None:
        write_wav(wav_dir / f"{utt}.wav", audio)
        wav_scp[utt] = str(final / "wav" / split / f"{utt}.wav")
        utt2spk[utt], text[utt], utt2dur[utt], role[utt] = spk.spk_id, words, len(audio) / SR, kind

    queries = {}
    for k, term in enumerate(terms):
        spk = held[k % len(held)]
        utt = f"{spk.spk_id}-qbe{split}-q{k:03d}"
        add(utt, spk, _query(term, spk, opts, np.random.default_rng([seed, 41, s_i, k]), bank), term.upper(), "query")
        queries[term] = utt
    plan = [t for t in terms for _ in range(docs_per_term)] + [None] * fillers
    order = rng.permutation(len(plan))
    cycle: list[Speaker] = []
    for j, idx in enumerate(order):
        term = plan[int(idx)]
        if not cycle:
            cycle = [main[int(i)] for i in rng.permutation(len(main))]
        spk = cycle.pop()
        utt = f"{spk.spk_id}-qbe{split}-d{j:03d}"
        for attempt in range(MAX_TRIES):
            urng = np.random.default_rng([seed, 43, s_i, j, attempt])
            prompt = _sentence(urng, split, terms, term)
            out = render(prompt, spk, opts, urng, bank)
            span = _locate(out.segments, _phones(term, spk)) if term else None
            if term is None or span is not None:
                break
        else:
            raise UserError(f"{split}: no sentence with {term!r} whose phones could be located for {spk.spk_id}")
        add(utt, spk, out.audio, prompt.words, "doc")
        if span is not None:
            truth.append((queries[term], utt, span[0] / SR, span[1] / SR))
    dd = DataDir(wav_scp=wav_scp, utt2spk=utt2spk, text=text, utt2dur=utt2dur, extra={"utt2role": role})
    write_data_dir(dd, root / split)
    lines = [f"{q} {d} {a:.4f} {b:.4f}\n" for q, d, a, b in sorted(truth)]
    atomic_write_text(root / split / "qbe_truth", "".join(lines))
    return {"terms": terms, "queries": len(queries), "documents": len(plan), "occurrences": len(truth),
            "seconds": round(sum(utt2dur.values()), 2),
            "query_speakers": sorted({utt2spk[u] for u in queries.values()})}


def make_qbe(corpus: str | Path, out: str | Path, *, seed: int = 0, terms: int = 30, docs_per_term: int = 3,
             fillers: int = 40, term_words: int = 2) -> dict:
    """Write ``out/{dev,test}`` (see the module docstring); returns the summary written to ``out/qbe.json``."""
    t0 = time.time()
    corpus, final = Path(corpus), Path(out).absolute()
    info_path = corpus / "corpus.json"
    if not info_path.is_file():
        raise UserError(f"{info_path}: no such file; build the corpus first (egs/mini_synth/hubert/run.sh)")
    if final.exists():
        raise UserError(f"{final}: already exists; remove it or choose another --out")
    if terms < 1 or docs_per_term < 1 or fillers < 0:
        raise UserError("--terms and --docs-per-term must be >= 1, --fillers >= 0")
    info = json.loads(info_path.read_text())
    speakers = {k: Speaker(**v) for k, v in info["speakers"].items()}
    held = [speakers[s] for s in info["splits"]["test_spk"]["speakers"]]
    main = [s for k, s in sorted(speakers.items()) if s not in held]
    opts = RenderOptions(clean=bool(info["options"]["clean"]))
    bank = None
    if not opts.clean:  # the corpus' own babble bank (make_corpus._init_worker, full-size corpus)
        rng = np.random.default_rng([info["seed"], 3])
        bank = make_babble_bank(main, [[_draw_read(rng, "train") for _ in range(5)] for _ in range(8)], info["seed"])
    chosen = _terms(seed, terms, term_words)
    with atomic_dir(final) as tmp:
        splits = {s: _split(s, i, chosen[s], main, held, opts, bank, seed, docs_per_term, fillers, tmp, final)
                  for i, s in enumerate(SPLITS)}
        summary = {"seed": seed, "corpus": str(corpus), "splits": splits, "render_options": asdict(opts),
                   "seconds": round(time.time() - t0, 1)}
        atomic_write_text(tmp / "qbe.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="the mini_synth corpus (egs/mini_synth/hubert/data)")
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--terms", type=int, default=30, help="query terms per split (one query each)")
    ap.add_argument("--docs-per-term", type=int, default=3, help="documents containing each term")
    ap.add_argument("--fillers", type=int, default=40, help="documents per split without any term")
    ap.add_argument("--term-words", type=int, choices=(1, 2), default=2, help="words per term: 2 = adjective noun, "
                                                                              "1 = the noun alone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [make_qbe] %(message)s")
    try:
        s = make_qbe(args.corpus, args.out, seed=args.seed, terms=args.terms, docs_per_term=args.docs_per_term,
                     fillers=args.fillers, term_words=args.term_words)
    except UserError as e:
        print(f"make_qbe.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: " + ", ".join(f"{k} {v['queries']} queries x {v['documents']} documents "
                                      f"({v['occurrences']} occurrences, {v['seconds']} s)"
                                      for k, v in s["splits"].items()) + f"; {s['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
