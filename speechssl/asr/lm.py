"""Word n-gram language models as ARPA files: a small builder (interpolated modified Kneser-Ney) and a reader.

    from speechssl.asr.lm import build_arpa, build_arpa_from_text
    build_arpa(["THE CAT SAT", "THE DOG RAN"], "lm.arpa", order=3)
    build_arpa_from_text("data/train/text", "exp/lm/3gram.arpa")      # Kaldi `text`: uttid words...

KenLM's ``lmplz`` is not on the package registry, so the ARPA files the beam decoder reads are built here, in pure
Python, from transcript-sized corpora (a few million words at most: every n-gram count is held in a dict). For the
800M-word LibriSpeech LM corpus build with KenLM's ``lmplz`` instead; the decoder reads any ARPA or KenLM binary.

Smoothing is interpolated modified Kneser-Ney (Chen & Goodman 1998, what ``lmplz`` does): the highest order counts
n-grams, the lower orders count distinct left contexts (n-grams starting with ``<s>`` keep their counts, nothing can
precede ``<s>``), each order has three discounts D1, D2, D3+ estimated from its count-of-counts, and the unigrams
are interpolated with the uniform distribution over the vocabulary (so ``<unk>`` gets a small probability). KN
suits the job because the lower orders of a decoder's LM are used exactly when backing off, where "how many contexts
does this word follow" predicts better than its frequency. Tiny corpora (a demo's few hundred sentences) break the
modified-KN estimates: with no n-gram seen exactly 3 or 4 times the formulas divide by zero or give discounts
outside (0, k), and ``lmplz`` stops there (BadDiscountException). Here such an order falls back to a single
discount D = n1 / (n1 + 2 n2) (Ney's estimate, the original interpolated KN), and to D = 0.5 when even that is
undefined; ``NgramModel.estimate`` records what each order used. Every context's distribution sums to 1 over the
vocabulary without ``<s>`` in all cases (tests/test_beam.py checks it against the ARPA back-off semantics).

ARPA layout: log10 probabilities, ``<s>`` with -99 (never predicted), back-off weights (the interpolation weight
gamma(h) of context h, so an n-gram absent from the file gets gamma(h) * p(w | shorter h)) on the n-grams that are
contexts of a longer one.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_path

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_SPECIAL = (BOS, EOS)


class AsrError(UserError):
    """Bad input to decoding or LM building; the message names the file or option and says what to do."""


@dataclass
class NgramModel:
    """An n-gram LM in memory: probabilities and back-off weights (natural numbers, not logs) per order.

    ``prob[n][ngram]`` is P(w | h) for each n-gram (h, w) of order n kept in the model (``<s>`` has 0);
    ``backoff[n][h]`` is the interpolation weight gamma(h) of the n-gram h as a context of order n+1 (the ARPA
    back-off weight of h).
    ``discounts[n-1]`` are order n's (D1, D2, D3+) and ``estimate[n-1]`` says how they were obtained:
    "modified" (Chen & Goodman), "single" (n1/(n1+2 n2), tiny corpus) or "constant" (0.5, tinier still).
    """

    order: int
    prob: list[dict[tuple[str, ...], float]]
    backoff: list[dict[tuple[str, ...], float]]
    sentences: int
    words: int
    discounts: list[tuple[float, float, float]] = field(default_factory=list)
    estimate: list[str] = field(default_factory=list)


def _discounts(counts: Iterable[int]) -> tuple[tuple[float, float, float], str]:
    """Modified-KN discounts (D1, D2, D3+) from the count-of-counts of one order, with the tiny-corpus fallbacks."""
    t = [0] * 5
    for c in counts:
        if c <= 4:
            t[c] += 1
    t1, t2, t3, t4 = t[1:]
    if t1 > 0 and t2 > 0 and t3 > 0 and t4 > 0:
        y = t1 / (t1 + 2 * t2)
        d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
        if 0 < d[0] < 1 and 0 < d[1] < 2 and 0 < d[2] < 3:
            return d, "modified"
    if t1 > 0 and t2 > 0:
        y = t1 / (t1 + 2 * t2)
        if 0 < y < 1:
            return (y, y, y), "single"
    return (0.5, 0.5, 0.5), "constant"


def _sentence_tokens(sentence: str, where: str) -> list[str]:
    words = sentence.split()
    for w in words:
        if w in _SPECIAL:
            raise AsrError(f"{where}: the word {w!r} is reserved for sentence boundaries in an n-gram LM; "
                           "remove it from the text")
    return words


def kneser_ney(sentences: Iterable[str], order: int = 3) -> NgramModel:
    """Interpolated modified Kneser-Ney ``order``-gram model of whitespace-split ``sentences`` (see the module doc).

    Words are taken as they are (case included: spell them as the acoustic vocabulary does). An empty sentence
    counts as ``<s> </s>``.
    """
    if not isinstance(order, int) or isinstance(order, bool) or order < 2:
        raise AsrError(f"build_arpa: order must be an integer >= 2 (KenLM reads no unigram-only model), got {order!r}")
    raw: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]   # raw[n][ngram]
    n_sent = n_words = 0
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise AsrError(f"build_arpa: sentence {i} is a {type(sentence).__name__}, expected a string of words")
        words = _sentence_tokens(sentence, f"build_arpa: sentence {i}")
        toks = [BOS, *words, EOS]
        n_sent += 1
        n_words += len(words)
        for n in range(1, order + 1):
            for j in range(len(toks) - n + 1):
                raw[n][tuple(toks[j:j + n])] += 1
    if n_sent == 0:
        raise AsrError("build_arpa: no sentences; give at least one transcript")

    # Adjusted counts: raw at the top order and for n-grams starting with <s>, distinct left contexts otherwise.
    adj: list[dict[tuple[str, ...], int]] = [{} for _ in range(order + 1)]
    adj[order] = dict(raw[order])
    for n in range(order - 1, 0, -1):
        left: dict[tuple[str, ...], int] = defaultdict(int)
        for g in raw[n + 1]:
            left[g[1:]] += 1
        adj[n] = {g: (c if g[0] == BOS else left[g]) for g, c in raw[n].items()}
    # <s> is a context only: it is never predicted, so it takes no part in the unigram distribution.
    adj[1].pop((BOS,), None)
    adj[1].setdefault((UNK,), 0)
    vocab_size = len(adj[1])

    model = NgramModel(order=order, prob=[{} for _ in range(order + 1)], backoff=[{} for _ in range(order + 1)],
                       sentences=n_sent, words=n_words)
    prob, bow = model.prob, model.backoff
    for n in range(1, order + 1):
        (d1, d2, d3), how = _discounts(c for c in adj[n].values() if c > 0)
        model.discounts.append((d1, d2, d3))
        model.estimate.append(how)
        disc = (0.0, d1, d2, d3)
        total: dict[tuple[str, ...], float] = defaultdict(float)     # context -> sum of adjusted counts
        held: dict[tuple[str, ...], float] = defaultdict(float)      # context -> discount mass taken out
        for g, c in adj[n].items():
            total[g[:-1]] += c
            held[g[:-1]] += disc[min(c, 3)]
        gamma = {h: held[h] / total[h] for h in total}
        for g, c in adj[n].items():
            h = g[:-1]
            lower = 1.0 / vocab_size if n == 1 else prob[n - 1][g[1:]]
            prob[n][g] = (c - disc[min(c, 3)]) / total[h] + gamma[h] * lower
        if n > 1:
            bow[n - 1] = gamma
    prob[1][(BOS,)] = 0.0
    return model


def write_arpa(model: NgramModel, out_path: str | os.PathLike) -> Path:
    """Write ``model`` as an ARPA file, atomically (temp file, fsync, rename)."""
    out = Path(out_path)
    order, prob, bow = model.order, model.prob, model.backoff
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n\\data\\\n")
        for n in range(1, order + 1):
            f.write(f"ngram {n}={len(prob[n])}\n")
        for n in range(1, order + 1):
            f.write(f"\n\\{n}-grams:\n")
            for g in sorted(prob[n]):
                p = prob[n][g]
                line = ("-99" if p <= 0 else f"{math.log10(p):.7f}") + "\t" + " ".join(g)
                if n < order and g in bow[n]:
                    b = bow[n][g]
                    line += f"\t{math.log10(b):.7f}" if b > 0 else "\t-99"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    return out


def build_arpa(sentences: Iterable[str], out_path: str | os.PathLike, order: int = 3) -> Path:
    """Build an interpolated modified Kneser-Ney ``order``-gram LM of ``sentences`` and write it as ARPA.

    Returns ``out_path``. Words are whitespace-split and kept as they are (case included). Logs the counts and the
    discounts used per order.
    """
    model = kneser_ney(sentences, order=order)
    out = write_arpa(model, out_path)
    log.info("%s: %d-gram LM of %d sentences, %d words; n-grams %s; discounts %s (%s)", out, order,
             model.sentences, model.words, [len(model.prob[n]) for n in range(1, order + 1)],
             [tuple(round(x, 3) for x in d) for d in model.discounts], model.estimate)
    return out


def read_kaldi_text(path: str | os.PathLike) -> list[str]:
    """The transcripts of a Kaldi ``text`` file (``uttid word word ...`` per line), in file order, ids dropped.

    An utterance id alone on its line is an empty transcript; a blank line is an error naming the line.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"{p}: no such Kaldi text file (lines 'uttid word word ...')")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split(maxsplit=1)
            if not parts:
                raise AsrError(f"{p}:{lineno}: blank line; a Kaldi text file has 'uttid word word ...' on every line")
            text = parts[1] if len(parts) > 1 else ""
            _sentence_tokens(text, f"{p}:{lineno}")
            out.append(text)
    return out


def build_arpa_from_text(text_path: str | os.PathLike, out_path: str | os.PathLike, order: int = 3) -> Path:
    """`build_arpa` over the transcripts of a Kaldi ``text`` file (what ``speechssl`` verbs would call)."""
    return build_arpa(read_kaldi_text(text_path), out_path, order=order)


@dataclass
class Arpa:
    """An ARPA file read into dicts: ``logprob[n][ngram]`` and ``backoff[n][ngram]`` (log10, n = 1..order)."""

    order: int
    logprob: list[dict[tuple[str, ...], float]]
    backoff: list[dict[tuple[str, ...], float]]

    @property
    def words(self) -> list[str]:
        """The unigram vocabulary in file order, ``<s>``, ``</s>`` and ``<unk>`` included."""
        return [g[0] for g in self.logprob[1]]


def read_arpa(path: str | os.PathLike) -> Arpa:
    """Read an ARPA file (the \\data\\ header, then each order's section); errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"{p}: no such ARPA LM file")
    counts: dict[int, int] = {}
    logprob: list[dict] = [{}]
    backoff: list[dict] = [{}]
    section = None   # "data", n (an order), or "end"
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            if s == "\\data\\":
                section = "data"
                continue
            if s == "\\end\\":
                section = "end"
                break
            if s.startswith("\\") and s.endswith("-grams:"):
                try:
                    section = int(s[1:-len("-grams:")])
                except ValueError:
                    raise AsrError(f"{p}:{lineno}: bad section header {s!r}") from None
                while len(logprob) <= section:
                    logprob.append({})
                    backoff.append({})
                continue
            if section == "data":
                if not s.startswith("ngram ") or "=" not in s:
                    raise AsrError(f"{p}:{lineno}: expected 'ngram N=COUNT' in the \\data\\ section, got {s!r}")
                n, c = s[len("ngram "):].split("=")
                counts[int(n)] = int(c)
            elif isinstance(section, int):
                parts = s.split()
                n = section
                if len(parts) not in (n + 1, n + 2):
                    raise AsrError(f"{p}:{lineno}: expected 'logprob w1..w{n} [backoff]', got {s!r}")
                g = tuple(parts[1:n + 1])
                logprob[n][g] = float(parts[0])
                if len(parts) == n + 2:
                    backoff[n][g] = float(parts[-1])
            else:
                raise AsrError(f"{p}:{lineno}: text before the \\data\\ header: {s!r}; is this an ARPA file?")
    if section != "end":
        raise AsrError(f"{p}: no \\end\\ line; the ARPA file is truncated")
    order = max(counts) if counts else 0
    for n in range(1, order + 1):
        got = len(logprob[n]) if n < len(logprob) else 0
        if got != counts.get(n):
            raise AsrError(f"{p}: the header says ngram {n}={counts.get(n)} but the file has {got} {n}-grams")
    return Arpa(order=order, logprob=logprob[:order + 1], backoff=backoff[:order + 1])


def arpa_words(path: str | os.PathLike) -> list[str]:
    """The unigram vocabulary of an ARPA file (``<s>``, ``</s>``, ``<unk>`` left out), reading only its 1-grams.

    For a KenLM binary (or anything that is not ARPA text) this is an error saying to pass a lexicon file.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"{p}: no such LM file (ARPA text or KenLM binary)")
    words: list[str] = []
    section = None
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                s = line.strip()
                if section is None:
                    if not s:
                        continue
                    if s != "\\data\\":
                        raise AsrError(f"{p}: not an ARPA file (first line {s[:40]!r}), so its words cannot be read "
                                       "for lexicon='auto'; pass a lexicon file (WORD t1 t2 ... per line)")
                    section = "data"
                elif s == "\\1-grams:":
                    section = 1
                elif section == 1:
                    if not s:
                        continue
                    if s.startswith("\\"):
                        break
                    parts = s.split()
                    if len(parts) < 2:
                        raise AsrError(f"{p}:{lineno}: expected 'logprob word [backoff]', got {s!r}")
                    if parts[1] not in (BOS, EOS, UNK):
                        words.append(parts[1])
    except UnicodeDecodeError:
        raise AsrError(f"{p}: not an ARPA text file (a KenLM binary?), so its words cannot be read for "
                       "lexicon='auto'; pass a lexicon file (WORD t1 t2 ... per line)") from None
    if section != 1:
        raise AsrError(f"{p}: no \\1-grams: section; is this an ARPA file?")
    return words
