"""SUPERB slot filling (SF): CTC over characters and slot tags, as s3prl's ``downstream/ctc`` on Audio SNIPS
(``snips.yaml``, text mode ``character-slot``); slot-type F1 and slot-value CER.

**Data.** ``utt2slots`` in the data dir: the transcript with each slot value between an opening and a closing
tag, each tag one whitespace-separated token (``<type>`` / ``</type>``, type = letters, digits, ``_ . -``)::

    spk07-sf00012 PLAY <artist> THE BEATLES </artist> IN THE <room> KITCHEN </room>

Slots do not nest; every slot holds at least one word; ``-`` alone = the utterance is not in the task. A bad line
(unbalanced tag, a closing tag that does not close the open slot, an empty slot) is a one-line error naming
``utt2slots:LINE``. ``text`` (the same words without tags) is not read by the task.

**Tokens** (s3prl ``downstream/ctc/text.py``, ``CharacterTextSlotEncoder.encode``): the characters of the words with
``|`` between words; a slot's characters are preceded by ``B-<type>`` and followed by ``E-<type>``, two vocabulary
entries per slot type seen in training::

    P L A Y | B-artist T H E | B E A T L E S E-artist | I N | T H E | B-room K I T C H E N E-room

**Decoding** (greedy CTC) and **metrics** follow s3prl ``downstream/ctc/metric.py`` (= ``s3prl/metric/
slot_filling.py``), whose ``parse`` finds the slots of a decoded string with ``B-(\\S+) (.+?) E-\\1``: each ``B-t`` is
paired with the nearest following ``E-t`` that leaves a non-empty value between them (other tags inside are
dropped from the value), scanning left to right without overlap; unpaired tags are ignored. Here the pairing runs
on the token list, so a type only pairs with exactly its own closing tag (s3prl's regex also accepts ``E-t2`` when
``t`` is a prefix of ``t2``) and a value never holds tag text (s3prl keeps ``E-t X`` as the value of ``B-t | E-t X
E-t``, and cuts a letter glued after an inner closing tag). References go through the same function.

* ``slot_f1`` = s3prl ``slot_type_f1``: per utterance, F1 of the *set* of slot types in the hypothesis vs the
  reference (1 when both have none, 0 when only one has none), averaged over utterances.
* ``slot_cer`` = s3prl ``slot_value_cer``: for every reference slot (type t, value v), the hypothesis value of type t
  with the lowest CER against v (the first of equals; ``""`` when the hypothesis has no slot of type t); then the
  corpus-level CER of all these pairs (summed character edits / summed reference characters, spaces included).
* ``wer`` / ``cer``: of the words without tags (:func:`speechssl.superb.metrics.wer` / ``cer``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from speechssl.data.kaldi import DataDir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb import metrics
from speechssl.superb.config import SuperbConfig
from speechssl.superb.heads import BiLSTM
from speechssl.superb.tasks import SpeechRecognition

__all__ = ["SlotFilling", "SlotFormatError", "parse_slots", "format_slots", "slot_tokens", "parse_tokens",
           "slot_type_f1", "slot_value_cer", "LABEL_FILE"]

LABEL_FILE = "utt2slots"
_TAG = re.compile(r"<(/?)([A-Za-z0-9_.\-]+)>")
Span = tuple[str | None, str]          # (slot type or None outside slots, the words)
Slots = list[tuple[str, str]]          # (slot type, value) in order


class SlotFormatError(UserError):
    """A slot-tagged transcript that does not parse."""


def parse_slots(line: str) -> list[Span]:
    """``"PLAY <artist> THE BEATLES </artist>"`` -> ``[(None, "PLAY"), ("artist", "THE BEATLES")]``."""
    spans: list[Span] = []
    words: list[str] = []
    open_type: str | None = None
    for tok in line.split():
        m = _TAG.fullmatch(tok)
        if m is None:
            words.append(tok)
            continue
        closing, name = bool(m.group(1)), m.group(2)
        if not closing:
            if open_type is not None:
                raise SlotFormatError(f"<{name}> opens inside slot <{open_type}> (slots do not nest; close it first)")
            if words:
                spans.append((None, " ".join(words)))
            words, open_type = [], name
        elif open_type is None:
            raise SlotFormatError(f"closing tag </{name}> without an open slot")
        elif name != open_type:
            raise SlotFormatError(f"closing tag </{name}> does not close the open slot <{open_type}>")
        elif not words:
            raise SlotFormatError(f"slot <{name}> is empty")
        else:
            spans.append((name, " ".join(words)))
            words, open_type = [], None
    if open_type is not None:
        raise SlotFormatError(f"slot <{open_type}> is never closed (unbalanced tag)")
    if words:
        spans.append((None, " ".join(words)))
    if not spans:
        raise SlotFormatError("no words")
    return spans


def format_slots(spans: list[Span]) -> str:
    """The inverse of :func:`parse_slots` (single blanks)."""
    return " ".join(w if t is None else f"<{t}> {w} </{t}>" for t, w in spans)


def slot_tokens(spans: list[Span]) -> list[str]:
    """CTC targets: characters, ``|`` between words, ``B-type`` / ``E-type`` around a slot's characters."""
    out: list[str] = []
    for i, (t, words) in enumerate(spans):
        if i:
            out.append("|")
        if t is not None:
            out.append(f"B-{t}")
        out += list(words.replace(" ", "|"))
        if t is not None:
            out.append(f"E-{t}")
    return out


def _words(toks: list[str]) -> str:
    return " ".join("".join(t for t in toks if len(t) == 1).replace("|", " ").split())


def parse_tokens(toks: list[str]) -> tuple[str, Slots]:
    """(words without tags, slots) of a token sequence, paired as s3prl's ``parse`` (module docstring)."""
    slots: Slots = []
    i = 0
    while i < len(toks):
        if toks[i].startswith("B-"):
            t = toks[i][2:]
            j = next((k for k in range(i + 1, len(toks)) if toks[k] == f"E-{t}" and _words(toks[i + 1:k])), None)
            if j is not None:
                slots.append((t, _words(toks[i + 1:j])))
                i = j + 1
                continue
        i += 1
    return _words(toks), slots


def _by_type(slots: Slots) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t, v in slots:
        out.setdefault(t, []).append(v)
    return out


def slot_type_f1(refs: list[Slots], hyps: list[Slots]) -> float:
    """s3prl ``slot_type_f1``: the mean over utterances of the F1 of hypothesis vs reference slot-type sets."""
    metrics._check_pairs("slot_type_f1", refs, hyps)
    total = 0.0
    for r, h in zip(refs, hyps):
        rt, ht = set(_by_type(r)), set(_by_type(h))
        if not rt or not ht:
            total += float(not rt and not ht)
            continue
        p, rec = len(rt & ht) / len(ht), len(rt & ht) / len(rt)
        total += 2 * p * rec / (p + rec) if p + rec > 0 else 0.0
    return total / len(refs)


def slot_value_cer(refs: list[Slots], hyps: list[Slots]) -> float:
    """s3prl ``slot_value_cer``: each reference value against the closest hypothesis value of its type."""
    metrics._check_pairs("slot_value_cer", refs, hyps)
    edits = chars = 0
    for r, h in zip(refs, hyps):
        hyp = _by_type(h)
        for t, v in r:
            edits += min((metrics.edit_distance(v, c) for c in hyp.get(t, [])), default=len(v))
            chars += len(v)
    if chars == 0:
        raise UserError("slot_value_cer: the references hold no slot, so the slot-value CER is undefined")
    return edits / chars


def _line_of(path: Path, utt: str) -> str:
    """``path:LINE`` of the line of ``utt`` (looked up only to report an error)."""
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.split(maxsplit=1)[:1] == [utt]:
                return f"{path}:{n}"
    except OSError:
        pass
    return f"{path}: utterance {utt}"


class SlotFilling(SpeechRecognition):
    """SUPERB SF: the ASR task's BiLSTM + character CTC, with ``B-type``/``E-type`` tokens (module docstring)."""

    name, metric, higher_is_better = "sf", "slot_f1", True

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        if cfg.head.units != "char":
            raise UserError(f"task sf: head.units {cfg.head.units!r}: SF is CTC over characters and slot tags "
                            "(SUPERB's character-slot); set head.units=char")

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, list[Span]]:
        table = dd.extra.get(LABEL_FILE)
        if table is None:
            raise MissingInputError(f"{path / LABEL_FILE}: no such file; task sf needs the slot-tagged transcripts "
                                    "('utt WORDS <type> value words </type> ...')")
        out = {}
        for utt, value in table.items():
            if value.strip() == "-":
                continue
            try:
                out[utt] = parse_slots(value)
            except SlotFormatError as e:
                raise SlotFormatError(f"{_line_of(path / LABEL_FILE, utt)}: {e}") from None
        return out

    def tokens(self, label: list[Span]) -> list[str]:
        return slot_tokens(label)

    def build_head(self, in_dim: int):
        """The ASR BiLSTM; ``head.downsample: 0`` concatenates frames down to at most 50 Hz for the upstream at
        hand (``self.frame_rate``: fbank 100 Hz -> pairs, HuBERT 50 Hz -> none), so every head runs at 50 Hz."""
        h = self.cfg.head
        k = h.downsample if h.downsample > 0 else max(1, math.ceil(self.frame_rate / 50.0 - 1e-6))
        return BiLSTM(in_dim, len(self.vocab), proj_dim=h.proj_dim, hidden=h.hidden, num_layers=h.num_layers,
                      dropout=h.dropout, downsample=k)

    def evaluate(self, head, batches, split) -> dict[str, float]:
        refs, hyps = [], []
        for exs, x, lens in batches:
            hyps += [parse_tokens(t) for t in self.decode(head, x, lens)]
            refs += [parse_tokens(self.tokens(ex.target)) for ex in exs]
        out = {"slot_f1": slot_type_f1([r[1] for r in refs], [h[1] for h in hyps])}
        if any(r[1] for r in refs):
            out["slot_cer"] = slot_value_cer([r[1] for r in refs], [h[1] for h in hyps])
        out["wer"] = metrics.wer([r[0] for r in refs], [h[0] for h in hyps])
        out["cer"] = metrics.cer([r[0] for r in refs], [h[0] for h in hyps])
        return out
