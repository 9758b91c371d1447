"""BEST-RQ pretraining (:class:`BestRQPretrainModel`; Chiu et al. 2022, "Self-supervised learning with random-projection
quantizer for speech recognition"): masked prediction of the codes of a frozen random-projection quantizer.

Targets (no k-means, no iterations, nothing learned)::

    wavs ──80-d Kaldi fbank, per-utterance mean/variance normalised──► stack s frames (s = model frame step / 10 ms)
         ──x P_i (frozen, Xavier normal [s·80, d])──► L2-normalise ──nearest of C_i (frozen, N(0, 1) rows,
         L2-normalised, [V_i, d]) by cosine──► code_i [B, T]          for each codebook i (``num_classes`` = [V_1, ...])

Model frame ``t`` stacks fbank frames ``[t·s, t·s + s)``; a frame whose stack runs past the utterance has no target.
The fbank is normalised per utterance over its own frames, so a row's targets do not depend on the batch (padding).
``P_i`` and ``C_i`` are buffers drawn from ``quantizer_seed`` and saved in every checkpoint.

Masking (the paper's, SpeechBrain's recipe): masked frames are filled with noise ``N(0, bestrq_mask_noise_std²)`` at
the input and there is no mask embedding. With the fbank frontend the noise replaces the normalised fbank frames the
masked model frames stack (what the targets read); with the waveform CNN it replaces the CNN's output frames.
The head is one linear softmax per codebook over the encoder output; the loss is the masked-prediction cross-entropy
shared with HuBERT (:func:`speechssl.models.hubert.masked_prediction_loss`: ``pred_masked_weight``,
``pred_nomask_weight``). Logged beside it: ``target_entropy_i``, the entropy (bits) of the batch's codes, which the
collapse watch compares with its ceiling ``log2(min(V_i, frames))``: a quantizer whose codes carry no information
(unnormalised or constant input) makes a task with nothing to learn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.errors import UserError
from speechssl.features.kaldi import fbank
from .config import HubertConfig
from .frontend import FbankFeatureExtractor, lengths_to_mask
from .hubert import LABEL_PAD, HubertModel, masked_prediction_loss, refuse_labels
from .masking import pretraining_mask

__all__ = ["BestRQPretrainModel", "RandomProjectionQuantizer", "ENTROPY_FLOOR"]

FBANK_SHIFT = 160  # samples per 10 ms fbank frame
ENTROPY_FLOOR = 0.5  # the collapse watch warns below this fraction of the codes' attainable entropy


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projections ``[n, in_dim, d]`` and L2-normalised codebooks ``V_i x d`` (buffers, no gradient),
    drawn from ``seed`` alone. ``forward(x [N, in_dim]) -> codes [N, n]`` (int64)."""

    def __init__(self, in_dim: int, dim: int, sizes: list[int], seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        std = math.sqrt(2.0 / (in_dim + dim))  # Xavier normal
        self.register_buffer("projections", torch.randn(len(sizes), in_dim, dim, generator=g) * std)
        for i, v in enumerate(sizes):
            self.register_buffer(f"codebook_{i}", F.normalize(torch.randn(v, dim, generator=g), dim=-1))
        self.sizes = list(sizes)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        codes = []
        for i in range(len(self.sizes)):
            z = F.normalize(x @ self.projections[i], dim=-1)
            codes.append((z @ getattr(self, f"codebook_{i}").t()).argmax(-1))
        return torch.stack(codes, dim=-1)


class BestRQPretrainModel(nn.Module):
    """BEST-RQ: ``.hubert`` (the encoder), ``quantizer`` (frozen), ``head`` (Linear to ``sum(num_classes)``).

    ``forward(wavs, wav_lens, labels=None, mask=None, generator=None)``: ``labels`` must be empty (the quantizer makes
    the targets); returns the trainer's ``{"loss", "sample_size", "mask", "logs"}``."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        if config.objective != "bestrq":
            raise UserError(f"BestRQPretrainModel needs model.objective=bestrq, got {config.objective!r}")
        self.config = config
        self.hubert = HubertModel(config)
        self.stack = config.downsample_rate // FBANK_SHIFT
        self.quantizer = RandomProjectionQuantizer(self.stack * config.num_mel_bins, config.bestrq_codebook_dim,
                                                   config.num_classes, config.quantizer_seed)
        self.head = nn.Linear(config.hidden_size, sum(config.num_classes))
        # no mask embedding (masked frames are noise): frozen, so DDP waits for no gradient of it
        self.hubert.masked_spec_embed.requires_grad_(False)

    def logits(self, x: Tensor) -> list[Tensor]:
        return list(self.head(x).float().split(self.config.num_classes, dim=-1))

    def _fbank(self, wavs: Tensor, wav_lens: Tensor) -> tuple[Tensor, Tensor]:
        front = self.hubert.feature_extractor
        if isinstance(front, FbankFeatureExtractor):
            return front.fbank(wavs, wav_lens)
        with torch.no_grad(), torch.autocast(wavs.device.type, enabled=False):
            feats = fbank(wavs.float(), num_mel_bins=self.config.num_mel_bins, lengths=wav_lens, cmvn="meanvar")
        n = torch.where(wav_lens < 400, 0, 1 + (wav_lens - 400).clamp(min=0) // FBANK_SHIFT)
        return feats, n

    def targets(self, feats: Tensor, fbank_lens: Tensor, num_frames: int) -> list[Tensor]:
        """Codes ``[B, T]`` per codebook of model frames ``t < num_frames`` from the normalised fbank (``LABEL_PAD``
        where the stack of frame t runs past the row's fbank frames)."""
        B, Tf, C = feats.shape
        s = self.stack
        need = num_frames * s
        x = F.pad(feats, (0, 0, 0, max(need - Tf, 0)))[:, :need].reshape(B, num_frames, s * C)
        complete = (torch.arange(num_frames, device=feats.device).view(1, -1) + 1) * s <= fbank_lens.view(-1, 1)
        codes = self.quantizer(x.reshape(B * num_frames, -1)).view(B, num_frames, -1)
        return [torch.where(complete, codes[..., i], LABEL_PAD) for i in range(codes.shape[-1])]

    def compute_mask(self, frame_lens: Tensor, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
        return pretraining_mask(self.config, frame_lens, num_frames, generator)

    def _noise(self, like: Tensor, where: Tensor) -> Tensor:
        noise = torch.randn(like.shape, dtype=like.dtype, device=like.device) * self.config.bestrq_mask_noise_std
        return torch.where(where.unsqueeze(-1), noise, like)

    def forward(self, wavs: Tensor, wav_lens: Tensor | None, labels: list[Tensor] | None = None,
                mask: Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        refuse_labels(labels, "bestrq")
        enc = self.hubert
        wavs, wav_lens = enc.prepare_waveforms(wavs, wav_lens)
        front = enc.feature_extractor
        frame_lens = enc.num_frames(wav_lens).to(wavs.device)
        T = int(frame_lens.max()) if len(frame_lens) else 0
        valid = lengths_to_mask(frame_lens, T)
        if mask is None:
            mask = self.compute_mask(frame_lens, T, generator)
        mask = mask.to(wavs.device) & valid

        feats, fbank_lens = self._fbank(wavs, wav_lens)
        targets = self.targets(feats, fbank_lens, T)
        if isinstance(front, FbankFeatureExtractor):  # noise on the fbank frames the masked frames stack
            fmask = mask.repeat_interleave(self.stack, dim=1)[:, : feats.shape[1]]
            fmask = F.pad(fmask, (0, feats.shape[1] - fmask.shape[1]))
            features = front.encode(self._noise(feats, fmask), fbank_lens)
        else:  # the waveform CNN: noise on its output frames
            features, _ = front(wavs, wav_lens)
            features = self._noise(features, mask)
        x = enc.feature_projection(features)
        out = enc.encoder(x, valid)[-1]
        loss, sample_size, logs = masked_prediction_loss(self.logits, out, mask, valid, targets, cfg)

        num_valid = int(valid.sum())
        for i, (t, v) in enumerate(zip(targets, cfg.num_classes)):
            has = t[valid]
            has = has[has != LABEL_PAD]
            p = torch.bincount(has, minlength=v).float() / max(len(has), 1)
            logs[f"target_entropy_{i}"] = max(0.0, float(-(p[p > 0] * p[p > 0].log2()).sum()))  # not -0.0
            logs[f"target_entropy_max_{i}"] = math.log2(max(min(v, len(has)), 1))
        logs.update(
            loss=float(loss.detach()),
            mask_frac=float(mask.sum()) / max(num_valid, 1),
            num_frames=float(num_valid),
            sample_size=float(sample_size),
        )
        return {"loss": loss, "sample_size": sample_size, "mask": mask, "logs": logs}

    def collapse_warnings(self, stats: dict[str, float]) -> list[str]:
        """Targets without information: a codebook's dev target entropy below ``ENTROPY_FLOOR`` of its ceiling."""
        out = []
        for i, v in enumerate(self.config.num_classes):
            h, top = stats.get(f"target_entropy_{i}"), stats.get(f"target_entropy_max_{i}")
            if h is not None and top and h < ENTROPY_FLOOR * top:
                out.append(f"BEST-RQ codebook {i}: target entropy {h:.2f} bits, below {ENTROPY_FLOOR:.0%} of the "
                           f"{top:.2f} bits {v} codes could carry on these frames: the random quantizer maps most "
                           "frames to a few codes (constant or unnormalised input?), so the targets carry little to "
                           "predict")
        return out
