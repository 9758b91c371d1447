"""Learning-rate schedule: linear warmup, then polynomial decay to ``end_lr`` at ``max_steps`` (fairseq's
``polynomial_decay``; power 1 is HuBERT's linear decay).

The schedule is a pure function of the update number, so it has no state to save: a resumed run at step
``n`` gets exactly the learning rate the uninterrupted run had.
"""

from __future__ import annotations

__all__ = ["lr_at"]


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
