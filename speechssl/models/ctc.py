"""CTC fine-tuning model: the pretrained encoder plus a linear CTC head (fairseq ``hubert_ctc`` / ``wav2vec_ctc``,
transformers ``HubertForCTC`` / ``Wav2Vec2ForCTC``).

Data flow (fairseq ``HubertEncoder.forward`` of ``hubert_asr.py``)::

    wavs ──frontend (no gradient while feature_grad_mult = 0: the CNN frozen)──► features
         ──feature_projection──► x [B, T, D]
         ──time mask (masked_spec_embed on mask_time_prob of the frames, spans of mask_time_length)
           + channel mask (zeros on mask_channel_prob of the D channels, spans of mask_channel_length)──►
         ──transformer (no gradient during the first freeze_updates updates)──► h [B, T, D]
         ──dropout(final_dropout)──► lm_head (Linear D -> vocab)──► logits [B, T, V]

Parameter names are transformers' ``HubertForCTC`` names: ``hubert.*`` (the :class:`HubertModel`) and ``lm_head``,
so :func:`speechssl.models.hf.export_hf_ctc` writes them under ``hubert.`` / ``wav2vec2.`` / ``wavlm.`` unchanged.

Freezing as fairseq does it: the model counts nothing itself; the trainer sets :attr:`CTCModel.num_updates` (updates
done) before every forward, and while ``num_updates < freeze_updates`` the whole encoder runs under
``torch.no_grad()``, so only ``lm_head`` receives gradients (and Adam leaves the others untouched: their ``.grad``
stays None). The blank is index ``blank`` (0) of the vocabulary; transformers calls it ``pad_token_id``.

Loss (fairseq ``ctc`` criterion with ``sentence_avg: true`` and ``zero_infinity: true``, as ``base_10h.yaml``): the
summed CTC loss over the batch divided by ``sample_size`` = the number of utterances. The trainer sums
``loss x sample_size`` over micro-batches and processes and divides by the global count, so every utterance of an
update weighs the same however the update is split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.errors import UserError
from .config import HubertConfig, dataclass_from_dict
from .frontend import lengths_to_mask
from .hubert import LABEL_PAD, HubertModel
from .masking import compute_mask_indices

__all__ = ["CTCHeadConfig", "CTCModel", "channel_mask"]


@dataclass
class CTCHeadConfig:
    """What the CTC model adds to the encoder's :class:`HubertConfig`: the vocabulary size, the masking and the
    freeze schedule of fine-tuning (fairseq ``hubert_ctc`` field names in brackets; defaults = ``base_10h.yaml``)."""

    vocab_size: int = 32
    blank: int = 0
    final_dropout: float = 0.0  # dropout before lm_head (final_dropout)
    mask_time_prob: float = 0.75  # (mask_prob)
    mask_time_length: int = 10  # (mask_length)
    mask_channel_prob: float = 0.5  # (mask_channel_prob)
    mask_channel_length: int = 64  # (mask_channel_length)
    freeze_updates: int = 10000  # the encoder gets no gradient during the first N updates (freeze_finetune_updates)

    def __post_init__(self) -> None:
        problems = []
        if self.vocab_size < 2 or not 0 <= self.blank < self.vocab_size:
            problems.append(f"need vocab_size >= 2 and 0 <= blank < vocab_size, got {self.vocab_size}, {self.blank}")
        for name in ("final_dropout", "mask_time_prob", "mask_channel_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_time_length < 1 or self.mask_channel_length < 1 or self.freeze_updates < 0:
            problems.append("need mask_time_length >= 1, mask_channel_length >= 1 and freeze_updates >= 0")
        if problems:
            raise UserError("invalid CTC head config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CTCHeadConfig":
        """Inverse of :meth:`to_dict`; an unknown key is an error that names it."""
        return dataclass_from_dict(cls, data)


def channel_mask(batch: int, channels: int, prob: float, length: int,
                 generator: torch.Generator | None = None) -> Tensor:
    """``[B, C]`` bool: channel spans to zero (fairseq ``mask_channel_selection: static``: ``compute_mask_indices``
    over the channel axis, one draw per utterance, the same channels on every frame)."""
    return compute_mask_indices((batch, channels), None, prob, length, min_masks=0, generator=generator)


class CTCModel(nn.Module):
    """``hubert`` (:class:`HubertModel`) + ``lm_head``; ``forward(wavs, wav_lens, labels)`` follows the trainer's
    model contract (``{"loss", "sample_size", "logs"}``); :meth:`logits` is inference (no masking, eval mode)."""

    def __init__(self, config: HubertConfig, head: CTCHeadConfig):
        super().__init__()
        self.config = config
        self.head_config = head
        self.hubert = HubertModel(config)
        self.dropout = nn.Dropout(head.final_dropout)
        self.lm_head = nn.Linear(config.hidden_size, head.vocab_size)
        self.num_updates = 0  # set by the trainer before each forward (the freeze schedule)

    @property
    def frozen(self) -> bool:
        """True while the encoder is frozen (only ``lm_head`` learns): ``num_updates < freeze_updates``."""
        return self.num_updates < self.head_config.freeze_updates

    def encode(self, wavs: Tensor, wav_lens: Tensor | None, *, apply_mask: bool) -> tuple[Tensor, Tensor]:
        """Last hidden state ``[B, T, D]`` and frame lengths; time and channel masks when ``apply_mask``."""
        enc, h = self.hubert, self.head_config
        features, frame_lens = enc.extract_features(wavs, wav_lens)
        x = enc.feature_projection(features)
        valid = lengths_to_mask(frame_lens, x.shape[1])
        if apply_mask and h.mask_time_prob > 0:
            padding = ~valid.cpu()
            tmask = compute_mask_indices(tuple(valid.shape), padding, h.mask_time_prob, h.mask_time_length,
                                         min_masks=2).to(x.device) & valid
            x = torch.where(tmask.unsqueeze(-1), enc.masked_spec_embed.to(x.dtype), x)
        if apply_mask and h.mask_channel_prob > 0:
            cmask = channel_mask(x.shape[0], x.shape[2], h.mask_channel_prob, h.mask_channel_length).to(x.device)
            x = x.masked_fill(cmask.unsqueeze(1), 0.0)
        return enc.encoder(x, valid)[-1], frame_lens

    def logits(self, wavs: Tensor, wav_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(logits [B, T, V] float32, frame_lens [B])`` without masking (call in eval mode for inference)."""
        h, frame_lens = self.encode(wavs, wav_lens, apply_mask=False)
        return self.lm_head(self.dropout(h)).float(), frame_lens

    def forward(self, wavs: Tensor, wav_lens: Tensor | None, labels: list[Tensor]) -> dict:
        """CTC loss. ``labels[0]``: ``[B, L]`` token ids padded with -100 (the blank never appears in a target)."""
        targets = labels[0].to(wavs.device).long()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (self.training and self.frozen)):
            h, frame_lens = self.encode(wavs, wav_lens, apply_mask=self.training)
        logits = self.lm_head(self.dropout(h)).float()
        lp = logits.log_softmax(-1).transpose(0, 1)  # [T, B, V]
        has = targets != LABEL_PAD
        tlens = has.sum(1)
        flat = targets[has]
        if bool((flat == self.head_config.blank).any()) or bool((flat < 0).any()) or bool(
                (flat >= self.head_config.vocab_size).any()):
            raise UserError(f"CTC targets must lie in [0, {self.head_config.vocab_size}) without the blank "
                            f"{self.head_config.blank}")
        loss = F.ctc_loss(lp, flat, frame_lens.to(lp.device), tlens, blank=self.head_config.blank,
                          reduction="none", zero_infinity=True)
        batch = int(targets.shape[0])
        infinite = int((loss == 0).logical_and(tlens > 0).sum())  # zero_infinity turned them to 0
        total = loss.sum()
        logs = {
            "loss": float(total.detach()) / max(batch, 1),
            "ntokens": float(tlens.sum()),
            "frames": float(frame_lens.sum()),
            "zero_inf": float(infinite),
            "frozen": float(self.frozen),
        }
        return {"loss": total / max(batch, 1), "sample_size": batch, "logs": logs, "logits": logits.detach(),
                "frame_lens": frame_lens}
