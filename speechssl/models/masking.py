"""Span masking with the semantics of fairseq's ``compute_mask_indices`` (``mask_type="static"``,
``no_overlap=False``, ``require_same_masks=True``), as HuBERT pretraining calls it (``min_masks=2``).

Per utterance, on its own valid length ``sz`` (frames that are not padding):

* ``num_mask = max(min_masks, int(mask_prob * sz / mask_length + u))``, ``u ~ U[0, 1)`` (probabilistic rounding):
  ``mask_prob`` is the fraction of frames that *start* a span, scaled by ``1 / mask_length``;
* ``num_mask`` distinct span starts drawn uniformly from ``[0, sz - mask_length]`` (shrunk when the utterance is
  too short for that many spans), each span ``mask_length`` frames, cut at ``sz``; spans may overlap, so at
  ``mask_prob=0.8, mask_length=10`` about 57% of frames end up masked (``1 - (1 - 0.08)^10`` ~ 0.57 at large T);
* ``require_same_masks``: every row then keeps a random subset of its masked frames so that all rows of the
  batch have as many masked frames as the row with fewest (fairseq's default; it makes ``x[mask]`` rectangular).

Padded frames are never masked. Randomness comes from ``generator`` (a CPU ``torch.Generator``) or torch's
global RNG, so a seeded trainer gets reproducible masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_mask_indices", "pretraining_mask"]


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: Tensor | None,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
    *,
    require_same_masks: bool = True,
) -> Tensor:
    """Boolean mask ``[B, T]`` (True = replace this frame by the mask embedding), on the CPU.

    ``padding_mask``: ``[B, T]`` bool, True on *padded* frames (fairseq's convention), or None.
    """
    batch, frames = shape
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    if padding_mask is None:
        lengths = [frames] * batch
    else:
        lengths = (~padding_mask.bool()).sum(-1).cpu().tolist()

    def rand() -> float:
        return float(torch.rand((), generator=generator))

    chosen: list[Tensor] = []
    for sz in lengths:
        if sz <= 0:
            chosen.append(torch.zeros(0, dtype=torch.long))
            continue
        num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rand()))
        span = mask_length
        if sz - span <= num_mask:  # too short for num_mask distinct starts in [0, sz - span]
            span = sz - num_mask - 1
        num_starts = max(sz - span, 1)
        num_mask = min(num_mask, num_starts)
        starts = torch.randperm(num_starts, generator=generator)[:num_mask]
        idx = (starts[:, None] + torch.arange(mask_length)[None, :]).reshape(-1)
        chosen.append(torch.unique(idx[idx < sz]))

    keep = min(len(c) for c in chosen) if chosen else 0
    for row, idx in enumerate(chosen):
        if require_same_masks and len(idx) > keep:
            idx = idx[torch.randperm(len(idx), generator=generator)[:keep]]
        mask[row, idx] = True
    return mask


def pretraining_mask(config, frame_lens: Tensor, num_frames: int, generator: torch.Generator | None = None) -> Tensor:
    """The span mask ``[B, T]`` every pretraining objective draws: :func:`compute_mask_indices` with ``config``'s
    ``mask_prob``, ``mask_length`` and ``mask_min_masks`` on rows of ``frame_lens`` valid frames."""
    padding = torch.arange(num_frames).view(1, -1) >= frame_lens.cpu().view(-1, 1)
    return compute_mask_indices((len(frame_lens), num_frames), padding, config.mask_prob, config.mask_length,
                                min_masks=config.mask_min_masks, generator=generator)
