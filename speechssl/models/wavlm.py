"""WavLM's encoder: the wav2vec 2.0 encoder plus a gated relative position bias in every attention layer.

Parameter names are transformers' ``WavLMModel`` names: as :mod:`speechssl.models.transformer`, plus per layer
``encoder.layers.N.attention.{gru_rel_pos_const [1, H, 1, 1], gru_rel_pos_linear (head_dim -> 8)}`` and, in
layer 0 only, ``encoder.layers.0.attention.rel_attn_embed`` (``num_buckets`` x heads).

The bias (WavLM paper, Sec. 3.2; transformers ``WavLMAttention``):

* layer 0 buckets every key-minus-query offset ``r`` (T5 style: half the buckets per direction, the first
  ``num_buckets // 4`` exact, the rest logarithmic up to ``max_bucket_distance``) and looks the buckets up in
  ``rel_attn_embed``: ``position_bias`` ``[H, T, T]``, handed unchanged to every later layer;
* each layer gates it per query frame and head from its own attention input ``x`` split into heads
  ``x_h`` [B, H, T, head_dim]: ``(a, b) = sigmoid(sum of 4-chunks of gru_rel_pos_linear(x_h))``,
  ``gate = a * (b * gru_rel_pos_const - 1) + 2``, and adds ``gate * position_bias`` to the scaled attention
  scores (``F.scaled_dot_product_attention`` with a float ``attn_mask``; padded keys get -inf).

Both layouts of the shared encoder apply (Base: post-LN; Large: stable layer norm). LayerDrop never drops
layer 0, which computes the bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import HubertConfig
from .transformer import Attention, Encoder, EncoderLayer

__all__ = ["relative_position_buckets", "GatedRelativePositionAttention", "WavLMEncoderLayer", "WavLMEncoder"]


def relative_position_buckets(offsets: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket of every relative offset (key - query): ``[0, num_buckets // 2)`` for offsets <= 0 and
    ``[num_buckets // 2, num_buckets)`` for offsets > 0; within a direction, distances below ``num_buckets // 4``
    have a bucket each, larger ones share logarithmically wider buckets, all past ``max_distance`` the last one.
    (The float32 arithmetic of transformers' ``_relative_positions_bucket``, so buckets agree at the edges.)"""
    half = num_buckets // 2
    buckets = (offsets > 0).long() * half
    distance = offsets.abs()
    max_exact = half // 2
    # clamp: distance 0 is an exact bucket, its log would be -inf (never selected, but not a valid long)
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + log_ratio * (half - max_exact)).long().clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class GatedRelativePositionAttention(Attention):
    """WavLM self-attention: :class:`~speechssl.models.transformer.Attention` with the gated relative position
    bias added to its scores. ``has_relative_position_bias``: this layer owns ``rel_attn_embed`` (layer 0)."""

    def __init__(self, config: HubertConfig, has_relative_position_bias: bool):
        super().__init__(config)
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_bucket_distance
        self.gru_rel_pos_const = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))
        self.gru_rel_pos_linear = nn.Linear(self.head_dim, 8)
        if has_relative_position_bias:
            self.rel_attn_embed = nn.Embedding(self.num_buckets, self.num_heads)

    def compute_bias(self, frames: int) -> Tensor:
        """``[H, T, T]`` bias of every (query, key) pair from its offset's bucket (layer 0 only)."""
        if not hasattr(self, "rel_attn_embed"):
            raise RuntimeError("only the first WavLM layer has rel_attn_embed; later layers take its position_bias")
        pos = torch.arange(frames, device=self.rel_attn_embed.weight.device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.rel_attn_embed(buckets).permute(2, 0, 1)

    def gate(self, x: Tensor) -> Tensor:
        """``[B, H, T, 1]`` gate of the bias per query frame and head, from the attention input ``x`` [B, T, D]."""
        batch, frames, _ = x.shape
        heads = x.view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2)
        proj = self.gru_rel_pos_linear(heads).view(batch, self.num_heads, frames, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
        return gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0

    def forward(self, x: Tensor, attn_mask: Tensor | None,
                position_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x`` [B, T, D]; ``attn_mask`` [B, 1, 1, T] bool (True = key may be attended to) or None;
        ``position_bias`` [H, T, T] from layer 0 (None in layer 0, which computes it). Returns
        ``(output [B, T, D], position_bias)``."""
        if position_bias is None:
            position_bias = self.compute_bias(x.shape[1])
        bias = self.gate(x) * position_bias
        if attn_mask is not None:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        return super().forward(x, bias), position_bias


class WavLMEncoderLayer(EncoderLayer):
    """:class:`~speechssl.models.transformer.EncoderLayer` with :class:`GatedRelativePositionAttention`."""

    def __init__(self, config: HubertConfig, has_relative_position_bias: bool):
        super().__init__(config, attention=GatedRelativePositionAttention(config, has_relative_position_bias))

    def attend(self, x: Tensor, attn_mask: Tensor | None, position_bias: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.attention(x, attn_mask, position_bias)


class WavLMEncoder(Encoder):
    """:class:`~speechssl.models.transformer.Encoder` of :class:`WavLMEncoderLayer` (layer 0 owns the bucket
    embedding; LayerDrop spares it)."""

    first_droppable = 1

    def make_layer(self, config: HubertConfig, index: int) -> nn.Module:
        return WavLMEncoderLayer(config, has_relative_position_bias=index == 0)
