"""CTC beam-search decoding, with an optional KenLM n-gram LM, on flashlight-text's decoders.

    from speechssl.asr import BeamDecoder
    dec = BeamDecoder(vocab, lm="exp/lm/3gram.arpa", lm_weight=2.0, word_score=0.0)   # lexicon from the LM's words
    tokens = dec.decode(log_probs)                  # [T, V] log-probabilities -> ["T", "H", "E", "|", "C", ...]
    batch = dec.decode_batch(log_probs, lens)       # [B, T, V] + valid frames per utterance

The search is flashlight-text's (the C++ decoder that torchaudio's ``ctc_decoder`` wraps, KenLM built into its
wheel). pyctcdecode does the same in Python but its LM needs the ``kenlm`` module, and ``kenlm`` is sdist-only (it
compiles C++ at install time); flashlight-text installs from a binary wheel and loads ARPA or KenLM binary files
itself. It is an optional dependency (``pip install 'speechssl[asr]'``, installed by tools/install.sh); importing
speechssl never needs it, and building a decoder without it is a one-line error saying how to install it.

Modes, chosen from the arguments:

- ``lm`` given, ``word_delim`` set, ``lexicon="auto"`` (default): lexicon decoding. The lexicon is the LM's
  unigram words, each spelled with the vocabulary's characters (``HELLO`` -> ``H E L L O``; the word delimiter is
  the silence between words, not part of a spelling); words with a character outside the vocabulary are skipped
  with a warning. Only lexicon words come out (unless ``unk_score`` > -inf).
- ``lexicon=FILE`` (``WORD t1 t2 ...`` per line, a trailing delimiter dropped): lexicon decoding with those
  spellings, with the LM if given, else with no LM (closed vocabulary).
- no ``lm`` (or ``lexicon=None``): lexicon-free beam search over tokens. Without an LM the score of a hypothesis
  is its path's summed log-probability; with ``log_add=False`` (default, Viterbi) the best path is the frame-wise
  argmax for every beam, so the output equals greedy decoding (tests/test_beam.py checks it), and with
  ``log_add=True`` paths of the same prefix are summed (CTC prefix search), which can find a more probable token
  sequence than greedy. ``lexicon=None`` with an ``lm`` scores tokens with it (an LM whose words are the units,
  e.g. a phone n-gram LM built with `build_arpa` over phone sequences).

Phone units have no word delimiter (``word_delim=None``): they decode lexicon-free. Scores: acoustic scores are the
natural-log probabilities given; KenLM's are log10, multiplied by ``lm_weight``; ``word_score`` is added per word,
``sil_score`` per delimiter frame. Tune ``lm_weight`` / ``word_score`` on a dev set (wav2vec 2.0 used about 2 and
-1 with a 4-gram LM).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speechssl.asr.lm import UNK, AsrError, arpa_words
from speechssl.errors import MissingInputError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'speechssl[asr]' (or: pip install flashlight-text)"


class MissingDependencyError(AsrError, ImportError):
    """An optional package speechssl needs for this call is not installed; the message says how to install it."""


def _flashlight():
    """flashlight-text's decoder module, its KenLM class and its Dictionary, imported on first use."""
    try:
        from flashlight.lib.text import decoder as fl
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary
    except ImportError as e:
        raise MissingDependencyError(f"CTC beam search needs flashlight-text ({e}); {INSTALL_HINT}") from None
    return fl, KenLM, Dictionary


@dataclass(frozen=True)
class Hypothesis:
    """One decoding result: ``tokens`` as greedy decoding returns them (blanks dropped, repeats merged, the word
    delimiter between words), ``words`` (the lexicon's words, or the tokens joined and split at the delimiter, or
    the tokens themselves without one), and the search's scores (total, acoustic, LM before ``lm_weight``)."""

    tokens: list[str]
    words: list[str]
    score: float
    am_score: float
    lm_score: float


def _load_lexicon(path: Path, vocab_index: dict[str, int], word_delim: str | None) -> dict[str, list[list[str]]]:
    if not path.is_file():
        raise MissingInputError(f"{path}: no such lexicon file (WORD t1 t2 ... per line)")
    lex: dict[str, list[list[str]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            word, spelling = parts[0], parts[1:]
            if word_delim is not None and spelling and spelling[-1] == word_delim:
                spelling = spelling[:-1]
            if not spelling:
                raise AsrError(f"{path}:{lineno}: the word {word!r} has no spelling; write 'WORD t1 t2 ...'")
            bad = [t for t in spelling if t not in vocab_index]
            if bad:
                raise AsrError(f"{path}:{lineno}: {word!r} is spelled with {bad[0]!r}, which is not in the "
                               "vocabulary; fix the lexicon or the vocabulary")
            lex.setdefault(word, []).append(spelling)
    if not lex:
        raise AsrError(f"{path}: the lexicon is empty")
    return lex


class BeamDecoder:
    """CTC beam search over ``vocab`` (index = model output column), optionally with a KenLM n-gram ``lm``.

    ``blank`` is the blank's index or its name in ``vocab``. ``word_delim`` is the token between words ("|" for
    wav2vec 2.0 letter dictionaries; None for phones). ``lm`` is an ARPA or KenLM binary file; ``lexicon`` is
    "auto" (the LM's words spelled with the vocabulary's characters), a lexicon file, or None (lexicon-free; see the
    module doc). ``beam`` hypotheses are kept per frame, within ``beam_threshold`` of the best; ``beam_size_token``
    (default: all) tokens are tried per frame.
    """

    def __init__(self, vocab: Sequence[str], *, blank: int | str = 0, word_delim: str | None = "|",
                 lm: str | os.PathLike | None = None, lexicon: str | os.PathLike | None = "auto", beam: int = 50,
                 beam_size_token: int | None = None, beam_threshold: float = 25.0, lm_weight: float = 2.0,
                 word_score: float = 0.0, unk_score: float = -math.inf, sil_score: float = 0.0,
                 log_add: bool = False):
        self.vocab = [str(t) for t in vocab]
        n = len(self.vocab)
        if n < 2:
            raise AsrError(f"BeamDecoder: the vocabulary needs a blank and at least one unit, got {self.vocab}")
        index: dict[str, int] = {}
        for i, t in enumerate(self.vocab):
            if t in index:
                raise AsrError(f"BeamDecoder: the vocabulary lists {t!r} twice (indices {index[t]} and {i})")
            index[t] = i
        if isinstance(blank, str):
            if blank not in index:
                raise AsrError(f"BeamDecoder: the blank {blank!r} is not in the vocabulary ({self.vocab[:5]}...); "
                               "pass blank=INDEX or add it")
            blank = index[blank]
        if isinstance(blank, bool) or not isinstance(blank, int) or not 0 <= blank < n:
            raise AsrError(f"BeamDecoder: blank index {blank!r} is outside the vocabulary of {n} tokens")
        if word_delim is not None and word_delim not in index:
            raise AsrError(f"BeamDecoder: the word delimiter {word_delim!r} is not in the vocabulary; pass "
                           "word_delim=None for units without one (phones)")
        if word_delim is not None and index[word_delim] == blank:
            raise AsrError(f"BeamDecoder: vocab[{blank}] is the word delimiter {word_delim!r}, not a blank; "
                           "give the blank's index")
        if beam < 1 or (beam_size_token is not None and beam_size_token < 1) or not beam_threshold > 0:
            raise AsrError(f"BeamDecoder: beam ({beam}), beam_size_token ({beam_size_token}) must be >= 1 and "
                           f"beam_threshold ({beam_threshold}) > 0")
        for name, v in (("lm_weight", lm_weight), ("word_score", word_score), ("sil_score", sil_score)):
            if not math.isfinite(v):
                raise AsrError(f"BeamDecoder: {name} must be finite, got {v}")
        self.blank, self.word_delim = blank, word_delim
        lm_path = Path(lm) if lm is not None else None
        if lm_path is not None and not lm_path.is_file():
            raise MissingInputError(f"{lm_path}: no such LM file (ARPA or KenLM binary); build one with "
                                    "speechssl.asr.build_arpa_from_text(TEXT, OUT)")

        if lexicon == "auto":
            lex_spec = "auto" if lm_path is not None else None
        else:
            lex_spec = Path(lexicon) if lexicon is not None else None
        if lex_spec is not None and word_delim is None:
            raise AsrError("BeamDecoder: a lexicon (and a word LM) needs a word delimiter between words; units "
                           "without one (phones) decode lexicon-free: pass lexicon=None")

        fl, KenLM, Dictionary = _flashlight()
        tok_beam = n if beam_size_token is None else min(beam_size_token, n)
        self.lexicon: dict[str, list[list[str]]] | None = None
        self.lm_path = lm_path
        if lex_spec is None:
            # flashlight starts every hypothesis on the silence token, so a delimiter as silence would make leading
            # delimiters part of the start state (a prefix search would merge "|A" with "A"): lexicon-free search
            # gives the blank that role, which is exact CTC, and the delimiter is a token like any other.
            if sil_score != 0:
                raise AsrError("BeamDecoder: sil_score applies to lexicon decoding (the delimiter between words); "
                               "lexicon-free search scores the delimiter as a token: leave sil_score at 0")
            self.mode = "lexicon-free"
            self._lm = self._load_kenlm(KenLM, Dictionary, lm_path, self.vocab) if lm_path else fl.ZeroLM()
            opts = fl.LexiconFreeDecoderOptions(
                beam_size=beam, beam_size_token=tok_beam, beam_threshold=beam_threshold, lm_weight=lm_weight,
                sil_score=sil_score, log_add=log_add, criterion_type=fl.CriterionType.CTC)
            self._decoder = fl.LexiconFreeDecoder(opts, self._lm, blank, blank, [])
            self._words: list[str] = []
            return

        self.mode = "lexicon"
        if lex_spec == "auto":
            lex = self._spell(arpa_words(lm_path), lm_path)
        else:
            lex = _load_lexicon(lex_spec, index, word_delim)
        for word, spellings in lex.items():
            for sp in spellings:
                if self.vocab[blank] in sp or word_delim in sp:
                    raise AsrError(f"BeamDecoder: {word!r} is spelled with the blank or the word delimiter "
                                   f"({' '.join(sp)}); check the blank index and the lexicon")
        self.lexicon = lex
        self._words = [w for w in lex if w != UNK] + [UNK]
        word_dict = Dictionary(self._words)
        self._lm = self._load_kenlm(KenLM, Dictionary, lm_path, self._words) if lm_path else fl.ZeroLM()
        sil = index[word_delim]
        trie = fl.Trie(n, sil)
        start = self._lm.start(False)
        for word, spellings in lex.items():
            wi = word_dict.get_index(word)
            _, score = self._lm.score(start, wi)
            for sp in spellings:
                trie.insert([index[t] for t in sp], wi, score)
        trie.smear(fl.SmearingMode.MAX)
        self._trie = trie   # the decoder keeps a shared pointer, this keeps the Python object alive too
        opts = fl.LexiconDecoderOptions(
            beam_size=beam, beam_size_token=tok_beam, beam_threshold=beam_threshold, lm_weight=lm_weight,
            word_score=word_score, unk_score=unk_score, sil_score=sil_score, log_add=log_add,
            criterion_type=fl.CriterionType.CTC)
        self._decoder = fl.LexiconDecoder(opts, trie, self._lm, sil, blank, word_dict.get_index(UNK), [], False)

    @staticmethod
    def _load_kenlm(KenLM, Dictionary, path: Path, entries: list[str]):
        try:
            return KenLM(str(path), Dictionary(entries))
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise AsrError(f"{path}: KenLM cannot load this LM: {detail[-200:]}") from None

    def _spell(self, words: list[str], lm_path: Path) -> dict[str, list[list[str]]]:
        """Spell each LM word with the vocabulary's characters; skip (and warn about) those that cannot be."""
        # the blank is left in: a word spelled with it is an error below (the blank index points at a letter)
        chars = {t for t in self.vocab if t != self.word_delim and len(t) == 1}
        lex: dict[str, list[list[str]]] = {}
        skipped: list[str] = []
        for w in words:
            if all(c in chars for c in w):
                lex[w] = [list(w)]
            else:
                skipped.append(w)
        if skipped:
            log.warning("%s: %d of %d LM words use characters outside the vocabulary and are left out of the "
                        "lexicon (e.g. %s)", lm_path, len(skipped), len(words), ", ".join(skipped[:5]))
        if not lex:
            example = next((c for c in words[0] if c not in chars), "") if words else ""
            raise AsrError(f"{lm_path}: none of its {len(words)} words can be spelled with the vocabulary's "
                           f"characters (e.g. {words[:1]} uses {example!r}); check case and the vocabulary")
        return lex

    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.shape[-1] != len(self.vocab):
            raise AsrError(f"BeamDecoder: {what} has {x.shape[-1]} columns but the vocabulary has "
                           f"{len(self.vocab)} tokens; give the vocabulary the model was trained with")
        if not x.is_floating_point():
            raise AsrError(f"BeamDecoder: {what} must be float log-probabilities, got {x.dtype}")
        x = x.detach().to("cpu", torch.float32).contiguous()
        if torch.isnan(x).any():
            raise AsrError(f"BeamDecoder: {what} contains NaN")
        return x

    def _tokens(self, path: Sequence[int], word_ids: Sequence[int] = ()) -> list[str]:
        """Frame path (CTC alignment) -> token sequence: merge repeats, drop blanks (what greedy decoding does).

        ``word_ids`` (lexicon decoding: the word ending at each frame, or -1) puts the delimiter between two words
        the decoder split without one on the path, so the tokens split at the delimiter into the decoder's words.
        """
        out, prev, pending = [], None, False
        delim = self.word_delim
        for i, k in enumerate(path):
            if k != prev and k != self.blank:
                tok = self.vocab[k]
                if tok == delim:
                    pending = False
                elif pending:
                    out.append(delim)
                    pending = False
                out.append(tok)
            prev = k
            if i < len(word_ids) and word_ids[i] >= 0:
                pending = True
        return out

    def _words_of(self, tokens: list[str], word_ids: Sequence[int]) -> list[str]:
        if self.mode == "lexicon":
            return [self._words[i] for i in word_ids if i >= 0]
        if self.word_delim is None:
            return list(tokens)
        return [w for w in "".join(t if t != self.word_delim else " " for t in tokens).split()]

    def _search(self, x: torch.Tensor, nbest: int) -> list[Hypothesis]:
        T, V = x.shape
        if T == 0:
            return [Hypothesis([], [], 0.0, 0.0, 0.0)]
        results = self._decoder.decode(x.data_ptr(), T, V)
        out = []
        for r in results[:nbest]:
            path, word_ids = list(r.tokens)[1:-1], list(r.words)[1:-1]   # drop the start and the end state
            tokens = self._tokens(path, word_ids if self.mode == "lexicon" else ())
            out.append(Hypothesis(tokens, self._words_of(tokens, word_ids), float(r.score),
                                  float(r.emittingModelScore), float(r.lmScore)))
        if not out:
            raise AsrError("BeamDecoder: no hypothesis survived the search (every lexicon path pruned); raise "
                           "beam / beam_threshold, or allow unknown words with unk_score > -inf")
        return out

    def nbest(self, log_probs: torch.Tensor, n: int = 1) -> list[Hypothesis]:
        """The ``n`` best hypotheses for one utterance's ``[T, V]`` log-probabilities, best first."""
        x = self._check(log_probs, "log_probs")
        if x.dim() != 2:
            raise AsrError(f"BeamDecoder: expected [T, V] log-probabilities of one utterance, got {tuple(x.shape)}")
        return self._search(x, n)

    def decode(self, log_probs: torch.Tensor) -> list[str]:
        """The best token sequence for one utterance's ``[T, V]`` log-probabilities (valid frames only)."""
        return self.nbest(log_probs, 1)[0].tokens

    def decode_batch(self, log_probs: torch.Tensor, lens: torch.Tensor | Sequence[int] | None = None
                     ) -> list[list[str]]:
        """Best token sequences for ``[B, T, V]`` log-probabilities, utterance b using its first ``lens[b]`` frames."""
        x = self._check(log_probs, "log_probs")
        if x.dim() != 3:
            raise AsrError(f"BeamDecoder: expected [B, T, V] log-probabilities, got {tuple(x.shape)}")
        B, T, _ = x.shape
        lens = [T] * B if lens is None else [int(v) for v in torch.as_tensor(lens).reshape(-1).tolist()]
        if len(lens) != B:
            raise AsrError(f"BeamDecoder: {len(lens)} lengths for a batch of {B}")
        for b, t in enumerate(lens):
            if not 0 <= t <= T:
                raise AsrError(f"BeamDecoder: lens[{b}] = {t} is outside 0..{T} frames")
        return [self._search(x[b, :t], 1)[0].tokens for b, t in enumerate(lens)]
