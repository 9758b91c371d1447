"""What a pretraining run reports: ``EXP/train.log``, windows of per-update statistics, TensorBoard and tqdm."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from speechssl.train.distributed import Dist, all_reduce

log = logging.getLogger(__name__)

__all__ = ["add_file_log", "Window", "log_train", "fmt"]


def add_file_log(path: Path) -> logging.Handler | None:
    """``path`` (EXP/train.log) for the root logger, once per file; the handler to remove on close, or None."""
    path = Path(path).resolve()
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        return None
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return h


class Window:
    """Per-update logs summed between two train log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.audio = 0.0
        self.t0 = time.monotonic()

    def add(self, logs: dict[str, float], grad_norm: float, audio_s: float) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm
        self.n += 1
        self.audio += audio_s

    def reduce(self, d: Dist) -> dict[str, float]:
        """Means over the window and the ranks, plus ``audio_sec_per_sec`` of all ranks (a collective)."""
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] / self.n for k in keys] + [self.audio], dtype=torch.float64)
        t = all_reduce(t, d)
        stats = dict(zip(keys, (t[:-1] / d.world).tolist()))
        stats["audio_sec_per_sec"] = float(t[-1]) / max(time.monotonic() - self.t0, 1e-9)
        return stats


def log_train(stats: dict[str, float], step: int, writer, bar) -> None:
    """Rank 0: ``train/*`` scalars, the progress bar's postfix and an ``update N: ...`` log line."""
    for k, v in stats.items():
        writer.add_scalar(f"train/{k}", v, step)
    acc = [v for k, v in stats.items() if k.startswith("acc_m")]
    short = {"loss": f"{stats.get('loss', float('nan')):.3f}", "lr": f"{stats['lr']:.2e}",
             "aps": f"{stats['audio_sec_per_sec']:.0f}"}
    if acc:
        short["acc_m"] = f"{sum(acc) / len(acc):.3f}"
    if bar is not None:
        bar.set_postfix(short, refresh=False)
    log.info("update %d: %s", step, " ".join(f"{k}={fmt(v)}" for k, v in stats.items()))


def fmt(v: float) -> str:
    return f"{v:.4g}"
