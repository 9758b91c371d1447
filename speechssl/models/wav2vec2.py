"""wav2vec 2.0 pretraining (:class:`Wav2Vec2PretrainModel`): contrastive prediction of quantized frontend features.

Data flow (fairseq ``Wav2Vec2Model.forward`` / transformers ``Wav2Vec2ForPreTraining.forward``)::

    wavs ──frontend──► features [B, T, C] ──LayerNorm──► normed ──Linear, dropout──► x ──mask──► encoder ──► c
    normed ──dropout_features──► Gumbel product quantizer (G groups x V codes) ──project_q──► q [B, T, D]
    c ──project_hid──► p [B, T, D]
    logits of a masked frame t: cos(p_t, [q_t, q_n1 .. q_nK]) / temperature   (K distractors: other masked frames
                                                                                of the same utterance, never padding)

Loss (normalised by the number of masked frames, the trainer's ``sample_size``)::

    Σ_masked CE(logits, 0) / M + diversity_loss_weight * (G·V - perplexity) / (G·V) + feature_penalty_weight * mean(f²)

``perplexity`` is the summed per-group perplexity of the codebook distribution averaged over masked frames (the soft
softmax in training, the chosen codes in eval: transformers' ``codevector_perplexity``). A distractor equal to the
positive (the same codes: a low-use codebook) gets logit -inf (``neg_is_pos``). The Gumbel temperature anneals
``max(start * decay ** updates, end)`` (fairseq ``latent_temp`` = (2, 0.5, 0.999995)); the trainer sets
``num_updates`` before every forward, so a resumed run anneals from where it stopped.

Parameter names are transformers' ``Wav2Vec2ForPreTraining`` names with the encoder under ``hubert.`` (as every
model of this toolkit; ``speechssl.models.hf.export_hf`` writes it under ``wav2vec2.``): ``quantizer.codevectors``
[1, G·V, codevector_dim / G], ``quantizer.weight_proj``, ``project_q``, ``project_hid``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.errors import UserError
from .config import HubertConfig
from .frontend import lengths_to_mask
from .hubert import HubertModel, refuse_labels
from .masking import pretraining_mask

__all__ = ["Wav2Vec2PretrainModel", "GumbelVectorQuantizer", "sample_negatives", "gumbel_temperature",
           "PERPLEXITY_FLOOR"]

PERPLEXITY_FLOOR = 0.1  # the collapse watch warns when the codebook perplexity is below this fraction of G·V


def gumbel_temperature(schedule: list[float], num_updates: int) -> float:
    """fairseq's ``latent_temp`` schedule: ``max(start * decay ** num_updates, end)``."""
    start, end, decay = schedule
    return max(start * decay ** num_updates, end)


def perplexity(probs: Tensor, mask: Tensor | None) -> Tensor:
    """Summed over groups: ``exp(entropy)`` of the mean code distribution over the frames of ``mask``.
    ``probs`` [N, G, V]; ``mask`` [N] bool (None: every frame). transformers' ``_compute_perplexity``."""
    if mask is not None:
        probs = torch.where(mask.view(-1, 1, 1), probs, torch.zeros_like(probs))
        marginal = probs.sum(0) / mask.sum()
    else:
        marginal = probs.mean(0)
    return torch.exp(-torch.sum(marginal * torch.log(marginal + 1e-7), dim=-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """G groups of V learned codevectors; each frame picks one per group (straight-through Gumbel-softmax in
    training, argmax in eval) and the picks are concatenated. ``forward(x [B, T, C], mask [B, T])`` ->
    ``(quantized [B, T, codevector_dim], soft perplexity, codes [B, T, G])``: ``codes`` are the picks the quantized
    vectors are made of (the Gumbel samples in training, not the argmax)."""

    def __init__(self, in_dim: int, config: HubertConfig):
        super().__init__()
        self.num_groups = config.num_codevector_groups
        self.num_vars = config.num_codevectors_per_group
        self.codevectors = nn.Parameter(
            torch.empty(1, self.num_groups * self.num_vars, config.codevector_dim // self.num_groups).uniform_())
        self.weight_proj = nn.Linear(in_dim, self.num_groups * self.num_vars)
        with torch.no_grad():  # fairseq and transformers: N(0, 1) weights, zero bias
            self.weight_proj.weight.normal_(mean=0.0, std=1.0)
            self.weight_proj.bias.zero_()
        self.temperature = 2.0

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        G, V = self.num_groups, self.num_vars
        logits = self.weight_proj(x).view(B * T * G, V)
        flat_mask = None if mask is None else mask.reshape(-1)
        codes = logits.argmax(-1).view(B, T, G)
        if self.training:
            probs = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=True).type_as(logits)
            codes = probs.argmax(-1).view(B, T, G)  # the sampled picks, which make the quantized vectors
            ppl = perplexity(torch.softmax(logits.view(B * T, G, V).float(), dim=-1), flat_mask)
        else:
            probs = torch.zeros_like(logits).scatter_(-1, codes.view(-1, 1), 1.0)
            ppl = perplexity(probs.view(B * T, G, V), flat_mask)
        # Σ_v p[n, g, v] · codevector[g, v] as one batched matmul per group (transformers broadcasts a [N, G·V, d]
        # product first: 0.5 GB for a 32 s batch of the mini_synth model, and 8x slower on the CPU)
        book = self.codevectors.view(G, V, -1)
        quantized = torch.bmm(probs.view(B * T, G, V).transpose(0, 1), book.to(probs.dtype))  # [G, N, d]
        return quantized.transpose(0, 1).reshape(B, T, -1), ppl, codes


def sample_negatives(mask: Tensor, num_negatives: int, generator: torch.Generator | None = None) -> Tensor:
    """Distractor indices ``[B, T, K]`` into the flattened ``[B * T]`` frames: for every masked frame, K frames
    drawn uniformly from the *other* masked frames of its own row (so never padding, never itself; transformers'
    ``_sample_negative_indices``). Rows with fewer than 2 masked frames, and unmasked frames, get index -1."""
    B, T = mask.shape
    out = torch.full((B, T, num_negatives), -1, dtype=torch.long)
    mask = mask.cpu()
    for b in range(B):
        pos = torch.nonzero(mask[b]).view(-1)
        n = len(pos)
        if n < 2:
            continue
        draw = torch.randint(0, n - 1, (n, num_negatives), generator=generator)
        draw += (draw >= torch.arange(n).view(-1, 1)).long()  # skip the frame itself, uniform over the others
        out[b, pos] = pos[draw] + b * T
    return out


class Wav2Vec2PretrainModel(nn.Module):
    """wav2vec 2.0 pretraining: ``.hubert`` (the encoder, a :class:`HubertModel` of ``model_type`` "wav2vec2"),
    ``quantizer``, ``project_q``, ``project_hid``; the module docstring has the loss.

    ``forward(wavs, wav_lens, labels=None, mask=None, negatives=None, generator=None)``: ``labels`` must be empty
    (the targets come from the model itself); ``mask`` [B, T] and ``negatives`` [B, T, K] (flattened indices, as
    transformers' ``sampled_negative_indices``) are drawn when not given."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        if config.objective != "wav2vec2" or config.model_type != "wav2vec2":
            raise UserError(f"Wav2Vec2PretrainModel needs model.objective=wav2vec2 and model.model_type=wav2vec2, got "
                            f"{config.objective!r} and {config.model_type!r}")
        self.config = config
        self.hubert = HubertModel(config)
        in_dim = self.hubert.feature_extractor.output_dim
        self.quantizer = GumbelVectorQuantizer(in_dim, config)
        self.project_q = nn.Linear(config.codevector_dim, config.proj_codevector_dim)
        self.project_hid = nn.Linear(config.hidden_size, config.proj_codevector_dim)
        self.dropout_features = nn.Dropout(config.feat_quantizer_dropout)
        self.num_updates = 0  # set by the trainer before every forward: the Gumbel temperature's schedule

    @property
    def temperature(self) -> float:
        return gumbel_temperature(self.config.gumbel_temperature, self.num_updates)

    def compute_mask(self, frame_lens: Tensor, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
        return pretraining_mask(self.config, frame_lens, num_frames, generator)

    def forward(self, wavs: Tensor, wav_lens: Tensor | None, labels: list[Tensor] | None = None,
                mask: Tensor | None = None, negatives: Tensor | None = None,
                generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        refuse_labels(labels, "wav2vec2")
        enc = self.hubert
        features, frame_lens = enc.extract_features(wavs, wav_lens)
        B, T, _ = features.shape
        valid = lengths_to_mask(frame_lens, T)
        vf = features.float()[valid]
        feature_pen = vf.pow(2).mean() if vf.numel() else vf.sum()

        fp = enc.feature_projection
        normed = fp.layer_norm(features)
        x = fp.dropout(fp.projection(normed))
        if mask is None:
            mask = self.compute_mask(frame_lens, T, generator)
        mask = mask.to(x.device) & valid
        x = torch.where(mask.unsqueeze(-1), enc.masked_spec_embed.to(x.dtype), x)
        c = enc.encoder(x, valid)[-1]
        pred = self.project_hid(c)

        self.quantizer.temperature = self.temperature
        q, prob_ppl, codes = self.quantizer(self.dropout_features(normed), mask)
        q = self.project_q(q.to(self.project_q.weight.dtype))

        if negatives is None:
            negatives = sample_negatives(mask, cfg.num_negatives, generator)
        negatives = negatives.to(x.device).long()
        has = mask & (negatives[..., 0] >= 0)  # masked frames with distractors
        where = torch.nonzero(has.reshape(-1)).view(-1, 1)  # [M, 1] flat index of each positive
        idx = torch.cat([where, negatives[has]], dim=1)  # [M, 1 + K]: the positive, then the distractors
        # cosine of every masked prediction with every quantized frame of the batch, one matmul, then the M x (1 + K)
        # wanted entries gathered (not the [M, 1 + K, D] gather of transformers and fairseq: 2.5x the update time)
        p_n = F.normalize(pred[has].float(), dim=-1, eps=1e-8)
        q_n = F.normalize(q.reshape(B * T, -1).float(), dim=-1, eps=1e-8)
        logits = (p_n @ q_n.t()).gather(1, idx) / cfg.contrastive_logits_temperature
        # a distractor with the positive's codes is the positive (fairseq's and transformers' neg_is_pos compare the
        # quantized vectors bit for bit, which the straight-through Gumbel output can miss by one rounding)
        flat_codes = codes.reshape(B * T, -1)
        neg_is_pos = (flat_codes[idx[:, 1:]] == flat_codes[where]).all(-1)
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg_is_pos, float("-inf"))], dim=1)
        M = int(has.sum())
        ce = F.cross_entropy(logits, logits.new_zeros(M, dtype=torch.long), reduction="sum")

        num_codes = cfg.num_codevector_groups * cfg.num_codevectors_per_group
        diversity = (num_codes - prob_ppl) / num_codes
        loss = (ce / max(M, 1) + cfg.diversity_loss_weight * diversity
                + cfg.feature_penalty_weight * feature_pen.float())

        with torch.no_grad():
            G, V = cfg.num_codevector_groups, cfg.num_codevectors_per_group
            hard = F.one_hot(codes.view(B * T, G), V).float()
            code_ppl = perplexity(hard, mask.view(-1)) if bool(mask.any()) else hard.new_zeros(())
            correct = int((logits.argmax(-1) == 0).sum()) if M else 0
        num_valid = int(valid.sum())
        logs = {
            "loss": float(loss.detach()),
            "loss_m_0": float(ce.detach()) / max(M, 1),
            "acc_m_0": correct / max(M, 1),
            "count_m_0": float(M),
            "diversity_loss": float(diversity.detach()),
            "prob_perplexity": float(prob_ppl.detach()),
            "code_perplexity": float(code_ppl),
            "temp": self.quantizer.temperature,
            "feature_pen": float(feature_pen.detach()),
            "mask_frac": float(mask.sum()) / max(num_valid, 1),
            "num_frames": float(num_valid),
            "sample_size": float(M),
        }
        return {"loss": loss, "sample_size": M, "mask": mask, "logs": logs}

    def collapse_warnings(self, stats: dict[str, float]) -> list[str]:
        """Codebook collapse: the codes used on dev (``code_perplexity``, summed over groups) below
        ``PERPLEXITY_FLOOR`` of the G·V codevectors."""
        cfg = self.config
        total = cfg.num_codevector_groups * cfg.num_codevectors_per_group
        ppl = stats.get("code_perplexity")
        if ppl is None or ppl >= PERPLEXITY_FLOOR * total:
            return []
        return [f"codebook collapse: code perplexity {ppl:.1f} of {total} codevectors (G={cfg.num_codevector_groups} "
                f"x V={cfg.num_codevectors_per_group}), below {PERPLEXITY_FLOOR:.0%}: few codes carry every target, "
                f"so the contrastive task gets easy and the encoder stops learning; check "
                f"model.diversity_loss_weight (now {cfg.diversity_loss_weight:g}; fairseq 0.1) and "
                f"model.gumbel_temperature (now {cfg.gumbel_temperature})"]
