"""Featurizers: the learned interface between a frozen upstream's layers and a task head.

Input is always the stacked hidden states ``[L, B, T, D]`` of the selected layers (every layer of one upstream has
the same width); output ``[B, T, D_out]``.

* :class:`WeightedSum` — s3prl's ``Featurizer``: ``softmax(w) . layers`` with ``w`` initialised to zeros (equal
  weights), and s3prl's ``layer_norm`` option: ``F.layer_norm`` without affine parameters on each layer (over the
  feature axis) before the sum.
* :class:`HierarchicalConv` — the convolutional interface of Shih & Harwath, "Interface Design for Self-Supervised
  Speech Models" (Interspeech 2024): a stack of ``Conv1d(D, D, kernel=2, stride=2)`` over the *layer* axis (an odd
  count is padded with one zero layer), GELU between levels, until one layer remains: depth ``ceil(log2(L))``.
  Our reading of the paper's figure; kernel 2 / stride 2 is what makes the depth grow with ``log2(L)``.

:func:`save_layer_weights` writes the learned weights (JSON + a bar-chart PNG) next to a task's results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.errors import UserError
from speechssl.fileio import atomic_path, atomic_write_text

__all__ = ["WeightedSum", "HierarchicalConv", "build_featurizer", "conv_depth", "save_layer_weights", "KINDS"]

KINDS = ("weighted_sum", "conv")


class WeightedSum(nn.Module):
    """``sum_l softmax(w)_l * h_l`` over ``L`` layers (s3prl semantics: ``w`` starts at zero = equal weights)."""

    def __init__(self, num_layers: int, dim: int, *, layer_norm: bool = False):
        super().__init__()
        self.num_layers, self.dim, self.out_dim, self.layer_norm = num_layers, dim, dim, layer_norm
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, layers: Tensor) -> Tensor:
        """``layers``: ``[L, B, T, D]`` -> ``[B, T, D]``."""
        _check(layers, self.num_layers, self.dim)
        if self.layer_norm:
            layers = F.layer_norm(layers, (layers.shape[-1],))
        w = torch.softmax(self.weights, dim=0)
        return torch.einsum("l,lbtd->btd", w, layers)

    def layer_weights(self) -> list[float]:
        """The normalised weights (softmax), one per layer."""
        return [float(x) for x in torch.softmax(self.weights.detach().float(), dim=0)]


def conv_depth(num_layers: int) -> int:
    """Levels of :class:`HierarchicalConv` for ``num_layers`` layers: ``ceil(log2(L))`` (0 for one layer)."""
    return max(0, math.ceil(math.log2(num_layers))) if num_layers > 1 else 0


class HierarchicalConv(nn.Module):
    """Hierarchical convolution over the layer axis: ``L`` layers -> 1 in ``ceil(log2(L))`` levels of
    ``Conv1d(D, D, 2, stride=2)`` (odd counts padded with a zero layer), GELU between levels."""

    def __init__(self, num_layers: int, dim: int, *, layer_norm: bool = False):
        super().__init__()
        self.num_layers, self.dim, self.out_dim, self.layer_norm = num_layers, dim, dim, layer_norm
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel_size=2, stride=2) for _ in range(conv_depth(num_layers)))

    @property
    def depth(self) -> int:
        return len(self.convs)

    def forward(self, layers: Tensor) -> Tensor:
        """``layers``: ``[L, B, T, D]`` -> ``[B, T, D]``."""
        _check(layers, self.num_layers, self.dim)
        if self.layer_norm:
            layers = F.layer_norm(layers, (layers.shape[-1],))
        L, B, T, D = layers.shape
        x = layers.permute(1, 2, 3, 0).reshape(B * T, D, L)  # one sequence of L "time steps" per frame
        for i, conv in enumerate(self.convs):
            if x.shape[-1] % 2:
                x = F.pad(x, (0, 1))
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.gelu(x)
        assert x.shape[-1] == 1, x.shape
        return x.reshape(B, T, D)

    def layer_weights(self) -> None:
        return None


def _check(layers: Tensor, num_layers: int, dim: int) -> None:
    if layers.dim() != 4 or layers.shape[0] != num_layers or layers.shape[-1] != dim:
        raise ValueError(f"expected layers [L={num_layers}, B, T, D={dim}], got {tuple(layers.shape)}")


def build_featurizer(kind: str, num_layers: int, dim: int, *, layer_norm: bool = False) -> nn.Module:
    """``kind``: ``weighted_sum`` | ``conv`` (see the module docstring)."""
    if kind == "weighted_sum":
        return WeightedSum(num_layers, dim, layer_norm=layer_norm)
    if kind == "conv":
        return HierarchicalConv(num_layers, dim, layer_norm=layer_norm)
    raise UserError(f"featurizer.kind {kind!r}: choose from {', '.join(KINDS)}")


def save_layer_weights(featurizer: nn.Module, layers: Sequence[int], out_dir: str | Path, *,
                       title: str = "") -> dict[str, Any]:
    """``OUT/layer_weights.json`` (``{"kind", "layers", "weights" | null, "title"}``) and, for a weighted sum,
    ``OUT/layer_weights.png`` (a bar per layer). Returns the JSON dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = featurizer.layer_weights() if hasattr(featurizer, "layer_weights") else None
    kind = "weighted_sum" if isinstance(featurizer, WeightedSum) else "conv"
    info = {"kind": kind, "layers": [int(x) for x in layers], "weights": weights, "title": title}
    atomic_write_text(out_dir / "layer_weights.json", json.dumps(info, indent=1) + "\n")
    if weights is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(3.0, 0.4 * len(weights) + 1.5), 2.6))
        ax.bar([str(x) for x in layers], weights, color="tab:blue")
        ax.axhline(1.0 / len(weights), color="grey", ls="--", lw=0.8, label="equal")
        ax.set_xlabel("layer")
        ax.set_ylabel("softmax weight")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(out_dir / "layer_weights.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    return info
