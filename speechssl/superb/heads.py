"""SUPERB task heads (what is trained on top of the featurizer's ``[B, T, D]`` output).

Shapes follow s3prl's downstream experts: a linear projector (``proj_dim``, s3prl's ``project_dim`` /
``projector_dim``; 0 = none) in front of every head, then

* :class:`FrameLinear` — frame-wise linear classifier (PR: CTC over phones);
* :class:`BiLSTM` — optional frame concatenation, ``num_layers`` bidirectional LSTMs + linear (ASR: CTC over
  characters);
* :class:`MeanPoolLinear` — masked mean over time + one linear layer per output (KS, SID, ER: one output; IC:
  action / object / location);
* :class:`XVector` + :class:`AMSoftmax` — TDNN x-vector (dilated 1-D convs, ReLU, statistics pooling) giving an
  embedding trained with additive-margin softmax (ASV; scored by cosine).

Every ``forward(x, lens)`` takes frame lengths and ignores padded frames.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrameLinear", "BiLSTM", "MeanPoolLinear", "XVector", "AMSoftmax", "length_mask", "masked_mean"]


def length_mask(lens: Tensor, max_len: int) -> Tensor:
    """``[B, T]`` bool, True on valid frames."""
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def masked_mean(x: Tensor, lens: Tensor) -> Tensor:
    """Mean over the valid frames of ``x`` ``[B, T, D]`` -> ``[B, D]``."""
    m = length_mask(lens, x.shape[1]).unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / lens.clamp(min=1).unsqueeze(-1).to(x.dtype)


def _projector(in_dim: int, proj_dim: int) -> tuple[nn.Module, int]:
    if proj_dim and proj_dim > 0:
        return nn.Linear(in_dim, proj_dim), proj_dim
    return nn.Identity(), in_dim


class FrameLinear(nn.Module):
    """``[B, T, D] -> [B, T, num_classes]`` logits: projector then a linear layer per frame."""

    def __init__(self, in_dim: int, num_classes: int, *, proj_dim: int = 256):
        super().__init__()
        self.proj, d = _projector(in_dim, proj_dim)
        self.out = nn.Linear(d, num_classes)

    def forward(self, x: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.out(self.proj(x)), lens


def reverse_padded(x: Tensor, lens: Tensor) -> Tensor:
    """Reverse each row of ``x`` ``[B, T, D]`` within its first ``lens[b]`` frames (padding stays at the end)."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    idx = torch.where(t < lens[:, None], lens[:, None] - 1 - t, t)
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))


class BiLSTM(nn.Module):
    """Projector, ``num_layers`` bidirectional LSTM layers of ``hidden`` units per direction, linear output.

    Each direction is a unidirectional ``nn.LSTM`` on the padded batch; the backward one reads every row reversed
    within its length, so padding never enters a valid frame's state (what ``pack_padded_sequence`` gives, whose
    backward pass is ~4x slower on CPU). ``downsample`` k > 1: k consecutive frames concatenated first (s3prl's
    ``sample_style: concat``), so the LSTMs run at 1/k of the frame rate."""

    def __init__(self, in_dim: int, num_classes: int, *, proj_dim: int = 1024, hidden: int = 1024,
                 num_layers: int = 2, dropout: float = 0.2, downsample: int = 1):
        super().__init__()
        self.downsample = max(1, int(downsample))
        self.proj, d = _projector(in_dim * self.downsample, proj_dim)
        self.fwd = nn.ModuleList()
        self.bwd = nn.ModuleList()
        for i in range(num_layers):
            self.fwd.append(nn.LSTM(d if i == 0 else 2 * hidden, hidden, batch_first=True))
            self.bwd.append(nn.LSTM(d if i == 0 else 2 * hidden, hidden, batch_first=True))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        if self.downsample > 1:  # s3prl's sample_style "concat": k consecutive frames side by side
            k = self.downsample
            B, T, D = x.shape
            x = nn.functional.pad(x, (0, 0, 0, (-T) % k)).reshape(B, -1, k * D)
            lens = (lens + k - 1) // k
        x = self.proj(x)
        mask = length_mask(lens, x.shape[1])[:, :, None].to(x.dtype)
        for i, (f, b) in enumerate(zip(self.fwd, self.bwd)):
            if i > 0:
                x = self.drop(x)
            yf, _ = f(x)
            yb, _ = b(reverse_padded(x, lens))
            x = torch.cat([yf, reverse_padded(yb, lens)], dim=-1) * mask
        return self.out(self.drop(x)), lens


class MeanPoolLinear(nn.Module):
    """Projector, masked mean over time, then one linear layer per entry of ``num_classes``; returns a list of
    ``[B, C_i]`` logits."""

    def __init__(self, in_dim: int, num_classes: Sequence[int], *, proj_dim: int = 256):
        super().__init__()
        self.proj, d = _projector(in_dim, proj_dim)
        self.outs = nn.ModuleList(nn.Linear(d, int(c)) for c in num_classes)

    def forward(self, x: Tensor, lens: Tensor) -> list[Tensor]:
        pooled = masked_mean(self.proj(x), lens)
        return [out(pooled) for out in self.outs]


class XVector(nn.Module):
    """TDNN x-vector: projector, dilated Conv1d layers (``tdnn``: ``(channels, kernel, dilation)`` each, ReLU,
    same-length padding, padded frames zeroed), statistics pooling (mean and standard deviation over valid frames),
    linear to an ``emb_dim`` embedding. s3prl sv_voxceleb1: 512-5-1, 512-3-2, 512-3-3, 512-1-1, 1500-1-1, emb 512.

    Where s3prl's ``XVector`` + ``SP`` + ``UtteranceExtractor`` differ (tests/test_superb_s3prl.py checks each):
    its TDNNs are valid convolutions (14 frames lost per utterance; ours pad, and agree on the frames it keeps);
    its standard deviation is the unbiased one (ours: population, floored); its embedding is Linear + ReLU (trained
    through a second Linear + ReLU), ours one Linear, trained and scored."""

    def __init__(self, in_dim: int, *, proj_dim: int = 512,
                 tdnn: Sequence[Sequence[int]] = ((512, 5, 1), (512, 3, 2), (512, 3, 3), (512, 1, 1), (1500, 1, 1)),
                 emb_dim: int = 512):
        super().__init__()
        self.proj, d = _projector(in_dim, proj_dim)
        convs = []
        for c, k, dil in tdnn:
            convs.append(nn.Conv1d(d, int(c), int(k), dilation=int(dil), padding=int(dil) * (int(k) - 1) // 2))
            d = int(c)
        self.tdnn = nn.ModuleList(convs)
        self.emb = nn.Linear(2 * d, emb_dim)
        self.emb_dim = emb_dim

    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        mask = length_mask(lens, x.shape[1])[:, None, :].to(x.dtype)  # [B, 1, T]
        h = self.proj(x).transpose(1, 2) * mask
        for conv in self.tdnn:
            h = F.relu(conv(h)) * mask
        n = lens.clamp(min=1)[:, None].to(x.dtype)
        mean = h.sum(-1) / n
        var = ((h - mean[..., None]) ** 2 * mask).sum(-1) / n
        return self.emb(torch.cat([mean, var.clamp(min=1e-5).sqrt()], dim=-1))


class AMSoftmax(nn.Module):
    """Additive-margin softmax loss (Wang et al. 2018): ``CE(s * (cos(x, W_c) - m * [c == y]))``."""

    def __init__(self, emb_dim: int, num_classes: int, *, s: float = 30.0, m: float = 0.4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, emb_dim) * 0.01)
        self.s, self.m = s, m

    def cosine(self, emb: Tensor) -> Tensor:
        return F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(emb)
        margin = F.one_hot(labels, cos.shape[-1]).to(cos.dtype) * self.m
        return F.cross_entropy(self.s * (cos - margin), labels)
