"""HuBERT: the encoder (:class:`HubertModel`) and masked-unit pretraining (:class:`HubertPretrainModel`).

Data flow (fairseq ``HubertModel.forward`` / transformers ``HubertModel.forward``)::

    wavs [B, S] ──frontend──► features [B, T, C]          (feature penalty = mean features² on valid frames)
                ──feature_projection (LN, Linear, dropout)──► x [B, T, D]
                ──mask: x[mask] = masked_spec_embed──►     (pretraining only)
                ──encoder──► hidden states (input of every layer + output)
                ──final_proj, cosine vs label_embeddings / logit_temp──► logits [N, k] per label set

Parameter names of :class:`HubertModel` are transformers' ``HubertModel`` names (``Wav2Vec2Model`` /
``WavLMModel`` names for ``model_type`` "wav2vec2" / "wavlm": the same encoder, WavLM's with
:class:`~speechssl.models.wavlm.WavLMEncoder`), so ``speechssl.models.hf.export_hf`` writes them unchanged and
``speechssl.models.hf.load_hf_dir`` reads transformers directories.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.errors import UserError
from .config import HubertConfig
from .frontend import build_frontend, lengths_to_mask
from .masking import pretraining_mask
from .transformer import Encoder, FeatureProjection
from .wavlm import WavLMEncoder

__all__ = ["HubertModel", "HubertPretrainModel", "LABEL_PAD", "masked_prediction_loss", "refuse_labels"]

LABEL_PAD = -100  # label value of frames that carry no target (padding, unknown)


class HubertModel(nn.Module):
    """The HuBERT encoder: frontend -> feature projection -> (mask) -> transformer. With ``config.model_type``
    "wav2vec2" or "wavlm", the wav2vec 2.0 or WavLM encoder (same interface).

    ``forward(wavs, wav_lens, mask=None)`` -> ``(hidden_states, frame_lens)``: ``num_hidden_layers + 1`` tensors
    ``[B, T, hidden_size]`` (input of every layer + encoder output, s3prl's convention) and valid frames per row.
    Dropout and LayerDrop follow ``self.training``.
    """

    def __init__(self, config: HubertConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = build_frontend(config)
        self.feature_projection = FeatureProjection(self.feature_extractor.output_dim, config)
        self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        self.encoder = WavLMEncoder(config) if config.model_type == "wavlm" else Encoder(config)
        self.frame_rate = config.frame_rate
        self.downsample_rate = config.downsample_rate
        self.encoder.apply(_init_bert_params)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def num_frames(self, num_samples: Tensor | int) -> Tensor:
        """Encoder frames produced from ``num_samples`` waveform samples (exact, element-wise)."""
        return self.feature_extractor.num_frames(torch.as_tensor(num_samples))

    def extract_features(self, wavs: Tensor, wav_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Frontend output ``[B, T, C]`` (before the projection) and frame lengths ``[B]``.

        Samples past ``wav_lens`` are zeroed first; with ``normalize_waveform`` each row is normalised to zero
        mean and unit variance over its own valid samples (fairseq ``task.normalize``, Large/X-Large).
        """
        wavs, wav_lens = self.prepare_waveforms(wavs, wav_lens)
        features, frame_lens = self.feature_extractor(wavs, wav_lens)
        return features, frame_lens.to(wavs.device)

    def prepare_waveforms(self, wavs: Tensor, wav_lens: Tensor | None) -> tuple[Tensor, Tensor]:
        """float32 waveforms with the samples past ``wav_lens`` zeroed (and each row normalised with
        ``normalize_waveform``), and the lengths as int64 on their device: what the frontend reads."""
        if wavs.dim() != 2:
            raise ValueError(f"expected waveforms [B, S], got shape {tuple(wavs.shape)}")
        if wav_lens is None:
            wav_lens = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long, device=wavs.device)
        wav_lens = wav_lens.to(wavs.device).long()
        valid = lengths_to_mask(wav_lens, wavs.shape[1])
        wavs = wavs.float() * valid
        if self.config.normalize_waveform:
            count = wav_lens.clamp(min=1).unsqueeze(1).to(wavs.dtype)
            mean = wavs.sum(1, keepdim=True) / count
            var = (((wavs - mean) * valid) ** 2).sum(1, keepdim=True) / count
            wavs = (wavs - mean) / torch.sqrt(var + 1e-5) * valid
        return wavs, wav_lens

    def forward(self, wavs: Tensor, wav_lens: Tensor | None = None, mask: Tensor | None = None,
                num_layers: int | None = None) -> tuple[list[Tensor], Tensor]:
        """``mask`` [B, T] bool: frames to replace by ``masked_spec_embed``. ``num_layers``: stop after that many
        layers (returns ``num_layers + 1`` tensors, equal to the first ones of a full run)."""
        features, frame_lens = self.extract_features(wavs, wav_lens)
        x = self.feature_projection(features)
        if mask is not None:
            x = torch.where(mask.to(x.device).unsqueeze(-1), self.masked_spec_embed.to(x.dtype), x)
        valid = lengths_to_mask(frame_lens, x.shape[1])
        return self.encoder(x, valid, num_layers=num_layers), frame_lens

    @property
    def hidden_sizes(self) -> list[int]:
        return [self.config.hidden_size] * (self.config.num_hidden_layers + 1)


class HubertPretrainModel(nn.Module):
    """HuBERT masked-unit prediction: ``.hubert`` (:class:`HubertModel`) + ``final_proj`` + ``label_embeddings``.

    * ``final_proj``: Linear(hidden_size, final_dim * n_sets) when ``untie_final_proj`` (fairseq pretraining
      configs: one ``final_dim`` chunk per label set), else Linear(hidden_size, final_dim) shared by all sets.
    * ``label_embeddings``: one ``[sum(num_classes), final_dim]`` tensor (fairseq ``label_embs_concat``), uniform
      init, split per label set.
    * logits: ``cos(final_proj(x), label_embedding[c]) / logit_temp`` for every unit ``c`` (fairseq's
      ``compute_nce`` with all other units as negatives is exactly this softmax over all units).
    * loss (fairseq ``hubert`` criterion, normalised by its ``sample_size``)::

          (pred_masked_weight * Σ_sets Σ_masked CE + pred_nomask_weight * Σ_sets Σ_unmasked CE) / sample_size
          + feature_penalty_weight * mean(features²)

      ``sample_size`` = number of masked target frames (if ``pred_masked_weight > 0``) + unmasked target
      frames (if ``pred_nomask_weight > 0``), counted on the first label set. Padded frames and frames labelled
      ``-100`` carry no loss. The feature penalty averages over valid (non-padded) frames.
    """

    def __init__(self, config: HubertConfig):
        super().__init__()
        if config.objective != "hubert" or config.model_type != "hubert":
            raise UserError(f"model.objective={config.objective!r}, model.model_type={config.model_type!r}: HuBERT's "
                            "masked-unit prediction pretrains a 'hubert' encoder (wav2vec 2.0: model.objective=wav2vec2 "
                            "model.model_type=wav2vec2; BEST-RQ: model.objective=bestrq; build the model of any "
                            "objective with speechssl.models.pretrain.build_pretrain_model)")
        self.config = config
        self.hubert = HubertModel(config)
        num_sets = len(config.num_classes)
        proj_dim = config.final_dim * (num_sets if config.untie_final_proj else 1)
        self.final_proj = nn.Linear(config.hidden_size, proj_dim)
        self.label_embeddings = nn.Parameter(torch.empty(sum(config.num_classes), config.final_dim).uniform_())

    def compute_mask(self, frame_lens: Tensor, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
        """HuBERT span mask ``[B, T]`` for the given frame lengths (see :mod:`speechssl.models.masking`)."""
        return pretraining_mask(self.config, frame_lens, num_frames, generator)

    def logits(self, x: Tensor) -> list[Tensor]:
        """``x`` [N, hidden] encoder outputs -> per label set ``[N, k_i]`` float32 logits."""
        proj = self.final_proj(x)
        chunks = (proj.chunk(len(self.config.num_classes), dim=-1) if self.config.untie_final_proj
                  else [proj] * len(self.config.num_classes))
        embs = self.label_embeddings.split(self.config.num_classes, dim=0)
        # cosine similarity as a matmul of unit vectors (fairseq broadcasts torch.cosine_similarity over
        # [N, k, final_dim], which costs k times the memory); float32 as fairseq does
        return [
            F.normalize(p.float(), dim=-1, eps=1e-8) @ F.normalize(e.float(), dim=-1, eps=1e-8).t()
            / self.config.logit_temp
            for p, e in zip(chunks, embs)
        ]

    def _align_labels(self, labels: list[Tensor], num_frames: int, device: torch.device) -> list[Tensor]:
        if len(labels) != len(self.config.num_classes):
            raise UserError(f"got {len(labels)} label sets, the model has {len(self.config.num_classes)} "
                             f"(num_classes={self.config.num_classes})")
        out = []
        for i, lab in enumerate(labels):
            lab = lab.to(device).long()
            diff = lab.shape[1] - num_frames
            if abs(diff) > 1:
                raise UserError(
                    f"label set {i}: {lab.shape[1]} labels for {num_frames} model frames (more than 1 frame apart); "
                    f"labels must be at the model frame rate ({self.hubert.frame_rate:g} Hz): subsample them first"
                )
            if diff > 0:
                lab = lab[:, :num_frames]
            elif diff < 0:
                lab = F.pad(lab, (0, -diff), value=LABEL_PAD)
            bad = (lab != LABEL_PAD) & ((lab < 0) | (lab >= self.config.num_classes[i]))
            if bool(bad.any()):
                raise UserError(f"label set {i}: values outside [0, {self.config.num_classes[i]}) "
                                 f"(and not {LABEL_PAD}): {lab[bad][:5].tolist()}")
            out.append(lab)
        return out

    def forward(self, wavs: Tensor, wav_lens: Tensor | None, labels: list[Tensor], mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> dict:
        """Masked-unit prediction loss. ``labels``: list over label sets of ``[B, T_label]`` LongTensors at the
        model frame rate, padded with -100; ``T_label`` may differ from the model's ``T`` by at most 1.
        ``mask``: optional precomputed ``[B, T]`` mask, else drawn with :meth:`compute_mask` (also in eval, as
        fairseq's validation loss).

        Returns ``{"loss": scalar tensor, "sample_size": int, "mask": [B, T] bool, "logs": {name: float}}``.
        """
        cfg = self.config
        features, frame_lens = self.hubert.extract_features(wavs, wav_lens)
        batch, frames, _ = features.shape
        valid = lengths_to_mask(frame_lens, frames)
        labels = self._align_labels(labels, frames, features.device)

        vf = features.float()[valid]
        feature_pen = vf.pow(2).mean() if vf.numel() else vf.sum()

        x = self.hubert.feature_projection(features)
        if mask is None:
            mask = self.compute_mask(frame_lens, frames, generator)
        mask = mask.to(x.device) & valid
        x = torch.where(mask.unsqueeze(-1), self.hubert.masked_spec_embed.to(x.dtype), x)
        out = self.hubert.encoder(x, valid)[-1]

        loss, sample_size, logs = masked_prediction_loss(self.logits, out, mask, valid, labels, cfg)
        loss = loss + cfg.feature_penalty_weight * feature_pen.float()
        num_valid = int(valid.sum())
        logs.update(
            loss=float(loss.detach()),
            feature_pen=float(feature_pen.detach()),
            mask_frac=float(mask.sum()) / max(num_valid, 1),
            num_frames=float(num_valid),
            sample_size=float(sample_size),
        )
        return {"loss": loss, "sample_size": sample_size, "mask": mask, "logs": logs}

    def collapse_warnings(self, stats: dict[str, float]) -> list[str]:
        """The objective's own collapse signs in validation ``stats`` (HuBERT: none beyond the RankMe watch)."""
        return []


def refuse_labels(labels: list[Tensor] | None, objective: str) -> None:
    """wav2vec 2.0 and BEST-RQ make their own targets: a label set given to them is a one-line error."""
    if labels:
        raise UserError(f"model.objective={objective} makes its own targets; got {len(labels)} label set(s) "
                        "(leave data.train_labels / data.dev_labels empty)")


def masked_prediction_loss(logits_fn, out: Tensor, mask: Tensor, valid: Tensor, labels: list[Tensor],
                           cfg: HubertConfig) -> tuple[Tensor, int, dict[str, float]]:
    """Cross-entropy of predicted units (HuBERT's k-means units, BEST-RQ's codes), fairseq's ``hubert`` criterion::

        (pred_masked_weight * Σ_sets Σ_masked CE + pred_nomask_weight * Σ_sets Σ_unmasked CE) / sample_size

    ``logits_fn(x [N, hidden]) -> [N, k_i]`` per label set; ``out`` [B, T, hidden] encoder output; ``labels`` per set
    [B, T] (``LABEL_PAD``: no target). ``sample_size`` counts the target frames of the weighted kinds on the first
    set. Returns ``(loss, sample_size, logs)`` with ``loss_{m,u}_i``, ``acc_{m,u}_i`` and ``count_{m,u}_i``."""
    weights = {"m": cfg.pred_masked_weight, "u": cfg.pred_nomask_weight}
    selections = {"m": mask, "u": valid & ~mask}
    loss = out.new_zeros((), dtype=torch.float32)
    sample_size = 0
    logs: dict[str, float] = {}
    for kind in ("m", "u"):
        sel = selections[kind]
        need_grad = weights[kind] > 0
        with torch.set_grad_enabled(need_grad and torch.is_grad_enabled()):
            logit_list = logits_fn(out[sel])
        for i, (logit, lab) in enumerate(zip(logit_list, labels)):
            target = lab[sel]
            has = target != LABEL_PAD
            ce = F.cross_entropy(logit[has].float(), target[has], reduction="sum")
            n = int(has.sum())
            if i == 0 and need_grad:
                sample_size += n
            if need_grad:
                loss = loss + weights[kind] * ce
            logs[f"loss_{kind}_{i}"] = float(ce.detach()) / max(n, 1)
            correct = (logit[has].argmax(-1) == target[has]).sum() if n else 0
            logs[f"acc_{kind}_{i}"] = float(correct) / max(n, 1)
            logs[f"count_{kind}_{i}"] = float(n)
    return loss / max(sample_size, 1), sample_size, logs


@torch.no_grad()
def _init_bert_params(module: nn.Module) -> None:
    """fairseq's ``init_bert_params`` for the transformer encoder: Linear N(0, 0.02) with zero bias, Embedding
    N(0, 0.02) (WavLM's ``rel_attn_embed``; HuBERT's encoder has none). (Everything else keeps PyTorch's default
    init, as in fairseq: the feature projection, ``final_proj``, LayerNorms; the waveform CNN is Kaiming-normal and
    the positional conv has its own init.)"""
    if isinstance(module, nn.Linear):
        module.weight.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(mean=0.0, std=0.02)
