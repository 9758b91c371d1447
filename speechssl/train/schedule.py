"""Learning-rate schedules: pretraining's linear warmup, then polynomial decay to ``end_lr`` at ``max_steps`` (fairseq's
``polynomial_decay``; power 1 is HuBERT's linear decay), and fine-tuning's tri-stage schedule (:func:`tri_stage_lr`).

Each schedule is a pure function of the update number, so it has no state to save: a resumed run at step
``n`` gets exactly the learning rate the uninterrupted run had.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "tri_stage_lr"]


def lr_at(
    update: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    max_steps: int,
    end_lr: float = 0.0,
    power: float = 1.0,
) -> float:
    """Learning rate for update number ``update`` (1-based: the first optimizer step is update 1).

    * ``update <= warmup_steps``: ``peak_lr * update / warmup_steps`` (the first update is not wasted at 0),
    * then ``end_lr + (peak_lr - end_lr) * (1 - (update - warmup) / (max_steps - warmup)) ** power``,
    * ``end_lr`` from ``max_steps`` on.
    """
    if update < 1:
        raise ValueError(f"update numbers start at 1, got {update}")
    if warmup_steps < 0 or max_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1 (got {warmup_steps}, {max_steps})")
    if warmup_steps > 0 and update <= warmup_steps:
        return peak_lr * update / warmup_steps
    if update >= max_steps:
        return end_lr
    frac = (update - warmup_steps) / max(1, max_steps - warmup_steps)
    return end_lr + (peak_lr - end_lr) * (1.0 - frac) ** power


def tri_stage_lr(
    update: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    hold_steps: int,
    decay_steps: int,
    init_lr_scale: float = 0.01,
    final_lr_scale: float = 0.05,
) -> float:
    """fairseq's ``tri_stage`` schedule (wav2vec 2.0 / HuBERT fine-tuning), for update number ``update`` (1-based).

    * warm-up: linear from ``init_lr_scale * peak_lr`` to ``peak_lr`` over ``warmup_steps`` updates,
    * hold: ``peak_lr`` for ``hold_steps`` updates,
    * decay: exponential, ``peak_lr * exp(-k * s)`` with ``k = -ln(final_lr_scale) / decay_steps`` for the ``s``-th
      update of the stage, reaching ``final_lr_scale * peak_lr`` at its end,
    * then ``final_lr_scale * peak_lr`` for ever.

    fairseq counts the updates done (0 at the first step); the first update here is update 1, so update ``n`` gets
    fairseq's value at ``num_updates = n - 1`` (the first update runs at ``init_lr_scale * peak_lr``, as fairseq's).
    """
    if update < 1:
        raise ValueError(f"update numbers start at 1, got {update}")
    if min(warmup_steps, hold_steps, decay_steps) < 0 or not 0 < final_lr_scale <= 1 or init_lr_scale < 0:
        raise ValueError("need warmup/hold/decay steps >= 0, 0 < final_lr_scale <= 1 and init_lr_scale >= 0")
    n = update - 1
    if n < warmup_steps:
        init = init_lr_scale * peak_lr
        return init + (peak_lr - init) * n / warmup_steps
    n -= warmup_steps
    if n < hold_steps:
        return peak_lr
    n -= hold_steps
    if n <= decay_steps and decay_steps > 0:
        return peak_lr * math.exp(math.log(final_lr_scale) * n / decay_steps)
    return final_lr_scale * peak_lr
