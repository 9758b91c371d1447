"""Output units of CTC fine-tuning: characters with a word delimiter, phones, or sentencepiece BPE.

A :class:`Tokenizer` is plain JSON (``to_dict`` / ``from_dict``), stored in every fine-tuned checkpoint's
``config.json`` (``extra.tokenizer``), so decoding needs nothing but the checkpoint.

* ``char``: fairseq's letter dictionary (``ltr``): the transcript's characters, a space becoming the word delimiter
  ``|`` (``HELLO WORLD`` -> ``H E L L O | W O R L D |``: fairseq and transformers end every word with ``|``; we do
  not add a trailing one, which CTC would have to emit for nothing). Index 0 is the blank (``<blank>``; exported
  to transformers as ``<pad>``, its ``pad_token_id`` = CTC blank).
* ``phone``: one token per phone of ``utt2phones`` (``uttid ph1 ph2 ...``) or of the data dir's ``phones.ctm``,
  silences (``sil``, ``sp``, ``spn``, ...) dropped, as SUPERB's phone recognition does. Scored as PER.
* ``bpe:N``: a sentencepiece unigram model of N pieces trained on the training transcripts (its model proto
  travels base64-encoded in the tokenizer's JSON).

Targets are read for a whole data dir by :func:`read_targets`, which names the file and utterance of every problem
(no text, a character the vocabulary lacks).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechssl.errors import MissingInputError, UserError

__all__ = ["Tokenizer", "read_transcripts", "build_tokenizer", "SILENCE_PHONES", "BLANK", "WORD_DELIM"]

BLANK = "<blank>"
WORD_DELIM = "|"
SILENCE_PHONES = frozenset({"sil", "SIL", "sp", "spn", "<eps>"})


@dataclass
class Tokenizer:
    units: str  # "char" | "phone" | "bpe"
    vocab: list[str]  # index 0 = blank
    spm_model: str | None = None  # base64 sentencepiece model proto (bpe)
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    _spm: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.vocab or self.vocab[0] != BLANK:
            raise UserError(f"tokenizer vocabulary must start with the blank {BLANK!r}")
        self._index = {t: i for i, t in enumerate(self.vocab)}

    def __getstate__(self) -> dict:  # to a loader worker: no sentencepiece object
        return {**self.__dict__, "_spm": None}

    @property
    def metric(self) -> str:
        """The error rate this unit is judged by: ``per`` for phones, ``wer`` otherwise."""
        return "per" if self.units == "phone" else "wer"

    @property
    def word_delim(self) -> str | None:
        return WORD_DELIM if self.units == "char" else None

    def _sp(self):
        if self._spm is None:
            import sentencepiece as spm

            self._spm = spm.SentencePieceProcessor(model_proto=base64.b64decode(self.spm_model))
        return self._spm

    def tokens(self, label: str) -> list[str]:
        """Token strings of one transcript (``label``: words, or space-separated phones for ``phone``)."""
        if self.units == "phone":
            return [p for p in label.split() if p not in SILENCE_PHONES]
        if self.units == "bpe":
            return self._sp().encode(label, out_type=str)
        return list(WORD_DELIM.join(label.split()))

    def encode(self, label: str, *, where: str = "") -> list[int]:
        """Token ids; a token outside the vocabulary is a one-line error naming ``where`` (file and utterance)."""
        toks = self.tokens(label)
        missing = sorted({t for t in toks if t not in self._index})
        if missing:
            raise UserError(f"{where}: {', '.join(repr(t) for t in missing[:5])} not in the {self.units} vocabulary of "
                            f"{len(self.vocab) - 1} units (built from the training transcripts): normalise the text "
                            "the same way, or fine-tune with these units in the training set")
        return [self._index[t] for t in toks]

    def detok(self, tokens: list[str]) -> str:
        """The text of a decoded token sequence: words for char / bpe, space-separated phones for phone."""
        if self.units == "bpe":
            return self._sp().decode_pieces(list(tokens))
        if self.units == "phone":
            return " ".join(tokens)
        return " ".join("".join(tokens).replace(WORD_DELIM, " ").split())

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "vocab": list(self.vocab), "spm_model": self.spm_model}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Tokenizer":
        return cls(units=d["units"], vocab=list(d["vocab"]), spm_model=d.get("spm_model"))


def read_transcripts(data_dir: str | Path, units: str) -> tuple[dict[str, str], Path]:
    """``{utt: transcript}`` of every utterance of a data dir that has one, and the file it came from: ``text``
    (char, bpe), or for phones ``utt2phones`` (else the phones of ``phones.ctm``). The data dir is read with the
    Kaldi checks (a malformed or non-UTF-8 line is an error naming file and line)."""
    from speechssl.data.kaldi import read_data_dir

    d = Path(data_dir)
    dd = read_data_dir(d)
    if units == "phone":
        if "utt2phones" in dd.extra:
            return dict(dd.extra["utt2phones"]), d / "utt2phones"
        ctm = d / "phones.ctm"
        if not ctm.is_file():
            raise MissingInputError(f"{d}: units phone need utt2phones or phones.ctm in the data dir")
        from speechssl.data.durations import durations_of
        from speechssl.units.alignments import check_alignment_span, read_alignments

        ali = read_alignments(ctm)
        durations = durations_of(dd)
        for u in dd.utt_ids():  # phones of other audio (another recording, another sample rate): one line
            if u in ali:
                check_alignment_span(ali[u], durations[u], f"its audio ({d}) lasts {durations[u]:.2f} s")
        return {u: " ".join(a.phones) for u, a in ali.items()}, ctm
    if dd.text is None:
        raise MissingInputError(f"{d / 'text'}: no such file; units {units} need transcripts")
    return dict(dd.text), d / "text"


def build_tokenizer(spec: str, transcripts: list[str]) -> Tokenizer:
    """The vocabulary of ``spec`` (``char`` | ``phone`` | ``bpe:N``) from the training transcripts."""
    if spec in ("char", "phone"):
        probe = Tokenizer(spec, [BLANK])
        units = sorted({t for line in transcripts for t in probe.tokens(line)})
        if spec == "char" and WORD_DELIM in units:
            units.remove(WORD_DELIM)
        head = [WORD_DELIM] if spec == "char" else []
        return Tokenizer(spec, [BLANK] + head + units)
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"--units {spec}: expected bpe:N with N the number of pieces, e.g. bpe:100") from None
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(transcripts), model_writer=model, vocab_size=size,
                                       model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                       unk_id=0, hard_vocab_limit=False, minloglevel=2)
        proto = base64.b64encode(model.getvalue()).decode()
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        return Tokenizer("bpe", [BLANK] + pieces, spm_model=proto)
    raise UserError(f"--units {spec!r}: expected char, phone or bpe:N")
