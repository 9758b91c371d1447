"""The HuBERT / wav2vec 2.0 transformer encoder, with transformers' ``HubertModel`` parameter names.

(WavLM's encoder, :mod:`speechssl.models.wavlm`, subclasses :class:`Encoder` and :class:`EncoderLayer`.)

``feature_projection.{layer_norm, projection}`` (no ``layer_norm`` with ``feat_proj_layer_norm=False``),
``encoder.pos_conv_embed.conv`` (weight norm, parametrization keys ``parametrizations.weight.original0/1`` as
transformers 5.x stores them), ``encoder.layer_norm``,
``encoder.layers.N.{attention.{q,k,v,out}_proj, layer_norm, feed_forward.{intermediate,output}_dense,
final_layer_norm}``.

Two layouts (``do_stable_layer_norm``):

* post-LN (Base): ``x = LN(x + pos_conv(x))`` before the layers; each layer
  ``x = LN(x + Attn(x)); x = LN'(x + FFN(x))``.
* pre-LN (Large): ``x = x + pos_conv(x)``; each layer ``x = x + Attn(LN(x)); x = x + FFN(LN'(x))``;
  ``encoder.layer_norm`` after the last layer.

Hidden states follow s3prl's HuBERT convention (the upstream contract): the input of every layer plus the
encoder output, ``num_hidden_layers + 1`` tensors. They equal transformers' ``output_hidden_states`` except
the last one for pre-LN models, where transformers 5.x returns the last layer's output *before* the final
LayerNorm and we (and s3prl) return the encoder output *after* it (= transformers' ``last_hidden_state``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .config import HubertConfig

__all__ = ["FeatureProjection", "PositionalConvEmbedding", "Attention", "FeedForward", "EncoderLayer", "Encoder"]


class FeatureProjection(nn.Module):
    """LayerNorm over frontend channels -> Linear to ``hidden_size`` -> dropout (fairseq ``layer_norm`` +
    ``post_extract_proj`` + ``dropout_input``). ``feat_proj_layer_norm=False`` (transformers' HuBERT option):
    no LayerNorm (and no ``layer_norm`` parameters)."""

    def __init__(self, in_dim: int, config: HubertConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=config.layer_norm_eps) if config.feat_proj_layer_norm else None
        self.projection = nn.Linear(in_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: Tensor) -> Tensor:
        if self.layer_norm is not None:
            features = self.layer_norm(features)
        return self.dropout(self.projection(features))


class PositionalConvEmbedding(nn.Module):
    """Grouped Conv1d over time (kernel ``num_conv_pos_embeddings``), weight norm over dim 2, "same" length
    (one trailing frame dropped for an even kernel), GELU."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        kernel, dim = config.num_conv_pos_embeddings, config.hidden_size
        conv = nn.Conv1d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=config.num_conv_pos_embedding_groups)
        # fairseq's init: std = sqrt(4 / (kernel * dim)) (dropout 0 term), zero bias, then weight norm over dim 2
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.num_pad_remove = 1 if kernel % 2 == 0 else 0
        self.activation = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, T, D]
        y = self.conv(x.transpose(1, 2))
        if self.num_pad_remove:
            y = y[:, :, : -self.num_pad_remove]
        return self.activation(y).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` with a key padding mask."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """``x`` [B, T, D]; ``attn_mask`` [B, 1, 1, T] bool, True where a key may be attended to, or a float bias
        broadcastable to [B, heads, T, T] added to the scaled scores (WavLM; -inf on padded keys)."""
        batch, frames, dim = x.shape
        shape = (batch, frames, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # a bias in the scores' dtype (bf16 under autocast)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, dim))


class FeedForward(nn.Module):
    def __init__(self, config: HubertConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU()
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.intermediate_dropout(self.intermediate_act_fn(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    """One transformer layer; ``pre_ln`` selects the pre-LN (stable layer norm) ordering.

    ``forward(x, attn_mask, position_bias=None) -> (x, position_bias)``: ``position_bias`` is state handed from
    layer to layer (WavLM's relative position bias, see :mod:`speechssl.models.wavlm`); this layer passes it on
    untouched (None for HuBERT / wav2vec 2.0).
    """

    def __init__(self, config: HubertConfig, attention: nn.Module | None = None):
        super().__init__()
        self.pre_ln = config.do_stable_layer_norm
        self.attention = Attention(config) if attention is None else attention
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def attend(self, x: Tensor, attn_mask: Tensor | None, position_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Self-attention of (the normalised, for pre-LN) ``x``; returns ``(output, position_bias)``."""
        return self.attention(x, attn_mask), position_bias

    def forward(self, x: Tensor, attn_mask: Tensor | None,
                position_bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self.pre_ln:
            a, position_bias = self.attend(self.layer_norm(x), attn_mask, position_bias)
            x = x + self.dropout(a)
            return x + self.feed_forward(self.final_layer_norm(x)), position_bias
        a, position_bias = self.attend(x, attn_mask, position_bias)
        x = self.layer_norm(x + self.dropout(a))
        return self.final_layer_norm(x + self.feed_forward(x)), position_bias


class Encoder(nn.Module):
    """Positional conv embedding + ``num_hidden_layers`` layers, with LayerDrop in training.

    Subclasses change the layers through :meth:`make_layer` and keep the first ``first_droppable`` layers out of
    LayerDrop (WavLM: layer 0 computes the position bias every later layer uses)."""

    first_droppable = 0

    def __init__(self, config: HubertConfig):
        super().__init__()
        self.pre_ln = config.do_stable_layer_norm
        self.layerdrop = config.layerdrop
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([self.make_layer(config, i) for i in range(config.num_hidden_layers)])

    def make_layer(self, config: HubertConfig, index: int) -> nn.Module:
        """Layer ``index`` of the stack."""
        return EncoderLayer(config)

    def forward(self, x: Tensor, valid: Tensor | None = None, num_layers: int | None = None) -> list[Tensor]:
        """``x`` [B, T, D] projected (and masked) features; ``valid`` [B, T] bool (True = real frame).

        Returns the input of each of the first ``num_layers`` layers (default: all) plus one more tensor: the
        encoder output when all layers ran (after ``encoder.layer_norm`` for pre-LN), else the input of layer
        ``num_layers``. Padded frames are zeroed before the positional conv and never attended to.
        """
        attn_mask = None
        if valid is not None:
            x = x * valid.unsqueeze(-1).to(x.dtype)
            if not bool(valid.all()):
                attn_mask = valid[:, None, None, :]
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        x = self.dropout(x)

        run = len(self.layers) if num_layers is None else min(num_layers, len(self.layers))
        hidden_states = []
        position_bias = None
        for i, layer in enumerate(self.layers[:run]):
            hidden_states.append(x)
            if (self.training and self.layerdrop > 0.0 and i >= self.first_droppable
                    and float(torch.rand([])) < self.layerdrop):
                continue
            x, position_bias = layer(x, attn_mask, position_bias)
        if self.pre_ln and run == len(self.layers):
            x = self.layer_norm(x)
        hidden_states.append(x)
        return hidden_states
