"""CTC tasks: phoneme recognition (PR: frame-wise linear) and speech recognition (ASR: BiLSTM), over phones,
characters (``|`` between words) or sentencepiece units; greedy decoding.

===== ======================================================================================================
task  labels
===== ======================================================================================================
pr    ``utt2phones`` ("utt p1 p2 ..."), else ``phones.ctm`` (``sil``/``sp``/``spn`` dropped; its spans checked
      against the audio as ``units quality`` checks them); utterances without phones (silence clips) are left out
asr   ``text`` -> characters, ``|`` between words (or sentencepiece units); empty transcripts left out
===== ======================================================================================================
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.data.kaldi import DataDir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb import metrics
from speechssl.superb.config import SuperbConfig
from speechssl.superb.heads import BiLSTM, FrameLinear
from speechssl.superb.tasks.base import Split, Task

__all__ = ["SILENCE_PHONES", "CTCTask", "PhoneRecognition", "SpeechRecognition"]

SILENCE_PHONES = frozenset({"sil", "SIL", "sp", "spn", "<eps>"})


class CTCTask(Task):
    higher_is_better = False

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self.vocab: list[str] = []   # index 0 = blank

    def tokens(self, label: Any) -> list[str]:
        raise NotImplementedError

    def fit(self, train: Split) -> None:
        units = sorted({t for ex in train.examples for t in self.tokens(ex.target)})
        self.vocab = ["<blank>"] + units

    def state(self) -> dict[str, Any]:
        return {"vocab": self.vocab}

    def load_state(self, state: dict[str, Any]) -> None:
        self.vocab = list(state["vocab"])

    def loss(self, head: nn.Module, x: Tensor, lens: Tensor, targets: list[Any]) -> Tensor:
        index = {t: i for i, t in enumerate(self.vocab)}
        seqs = [[index[t] for t in self.tokens(y)] for y in targets]
        logits, out_lens = head(x, lens)
        lp = logits.log_softmax(-1).transpose(0, 1)   # [T, B, V]
        flat = torch.tensor([i for s in seqs for i in s], dtype=torch.long, device=lp.device)
        tlens = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=lp.device)
        return F.ctc_loss(lp, flat, out_lens.to(lp.device), tlens, blank=0, reduction="mean", zero_infinity=True)

    def decode(self, head: nn.Module, x: Tensor, lens: Tensor) -> list[list[str]]:
        logits, out_lens = head(x, lens)
        lp = logits.log_softmax(-1)
        return [[self.vocab[i] for i in metrics.ctc_greedy_decode(lp[b, : int(out_lens[b])], blank=0)]
                for b in range(lp.shape[0])]


class PhoneRecognition(CTCTask):
    name, metric = "pr", "per"

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self._durations: dict[str, float] | None = None  # of the split being made: phones.ctm spans are checked

    def make_split(self, name: str, path: Path, dd: DataDir, durations: dict[str, float]) -> Split:
        self._durations = durations
        try:
            return super().make_split(name, path, dd, durations)
        finally:
            self._durations = None

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, list[str]]:
        if "utt2phones" in dd.extra:
            raw = {u: v.split() for u, v in dd.extra["utt2phones"].items()}
        else:
            ctm = path / "phones.ctm"
            if not ctm.is_file():
                raise MissingInputError(f"{ctm}: no such file; task pr needs utt2phones or phones.ctm in {path}")
            from speechssl.data.durations import durations_of
            from speechssl.units.alignments import check_alignment_span, read_alignments

            ali = read_alignments(ctm)
            durations = self._durations if self._durations is not None else durations_of(dd)
            raw = {}
            for u in dd.utt_ids():
                if u not in ali:
                    raise UserError(f"{ctm}: no phones for utterance {u} (every utterance of {path} needs an "
                                    "alignment; subset the data dir or add it)")
                # phones of other audio (another recording, another sample rate) would score a PER above 100 %
                check_alignment_span(ali[u], durations[u], f"its audio ({path}) lasts {durations[u]:.2f} s")
                raw[u] = ali[u].phones
        return {u: [p for p in ph if p not in SILENCE_PHONES] for u, ph in raw.items()
                if any(p not in SILENCE_PHONES for p in ph)}

    def tokens(self, label: list[str]) -> list[str]:
        return label

    def build_head(self, in_dim: int) -> nn.Module:
        return FrameLinear(in_dim, len(self.vocab), proj_dim=self.cfg.head.proj_dim)

    def evaluate(self, head, batches, split):
        refs, hyps = [], []
        for exs, x, lens in batches:
            hyps += self.decode(head, x, lens)
            refs += [ex.target for ex in exs]
        return {"per": metrics.per(refs, hyps)}


class SpeechRecognition(CTCTask):
    name, metric = "asr", "wer"

    def __init__(self, cfg: SuperbConfig):
        super().__init__(cfg)
        self._spm = None
        self._spm_proto: bytes | None = None

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, str]:
        if dd.text is None:
            raise MissingInputError(f"{path / 'text'}: no such file; task asr needs transcripts")
        return {u: " ".join(t.split()) for u, t in dd.text.items() if t.strip()}

    def tokens(self, label: str) -> list[str]:
        if self.cfg.head.units == "bpe":
            return self._sp().encode(label, out_type=str)
        return list(label.replace(" ", "|"))

    def fit(self, train: Split) -> None:
        if self.cfg.head.units == "bpe":
            import sentencepiece as spm

            model = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter([ex.target for ex in train.examples]),
                                           model_writer=model, vocab_size=self.cfg.head.bpe_vocab,
                                           model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                           hard_vocab_limit=False, minloglevel=2)
            self._spm_proto, self._spm = model.getvalue(), None
        super().fit(train)

    def _sp(self):
        if self._spm is None:
            import sentencepiece as spm

            self._spm = spm.SentencePieceProcessor(model_proto=self._spm_proto)
        return self._spm

    def state(self) -> dict[str, Any]:
        out = super().state()
        if self._spm_proto is not None:
            out["spm_model"] = base64.b64encode(self._spm_proto).decode()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if "spm_model" in state:
            self._spm_proto, self._spm = base64.b64decode(state["spm_model"]), None

    def detok(self, toks: list[str]) -> str:
        if self.cfg.head.units == "bpe":
            return self._sp().decode_pieces(toks)
        return " ".join("".join(toks).replace("|", " ").split())

    def build_head(self, in_dim: int) -> nn.Module:
        h = self.cfg.head
        return BiLSTM(in_dim, len(self.vocab), proj_dim=h.proj_dim, hidden=h.hidden, num_layers=h.num_layers,
                      dropout=h.dropout, downsample=h.downsample)

    def evaluate(self, head, batches, split):
        refs, hyps = [], []
        for exs, x, lens in batches:
            hyps += [self.detok(t) for t in self.decode(head, x, lens)]
            refs += [ex.target for ex in exs]
        return {"wer": metrics.wer(refs, hyps), "cer": metrics.cer(refs, hyps)}
