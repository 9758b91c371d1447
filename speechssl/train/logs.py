"""What a pretraining run reports: ``EXP/train.log``, windows of per-update statistics, TensorBoard and tqdm."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from speechssl.train.distributed import Dist, all_reduce

log = logging.getLogger(__name__)

__all__ = ["add_file_log", "Window", "DataWaitWatch", "log_train", "fmt"]


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
    """Per-update logs summed between two train log lines.

    ``add_time(wait_s, update_s)`` (every update, skipped ones too): seconds spent waiting for the next batch and
    the update's wall time (the trainer's step timer, without validation and checkpoints); ``reduce`` turns them
    into ``data_wait``, the fraction of update time spent waiting for data, over all ranks.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.audio = 0.0
        self.wait = 0.0
        self.busy = 0.0
        self.t0 = time.monotonic()

    def add(self, logs: dict[str, float], grad_norm: float, audio_s: float) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm
        self.n += 1
        self.audio += audio_s

    def add_time(self, wait_s: float, update_s: float) -> None:
        self.wait += wait_s
        self.busy += update_s

    def reduce(self, d: Dist) -> dict[str, float]:
        """Means over the window and the ranks, ``audio_sec_per_sec`` of all ranks and ``data_wait`` (waiting
        for data / update time, summed over the ranks) when update times were added (a collective)."""
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] / self.n for k in keys] + [self.wait, self.busy, self.audio],
                         dtype=torch.float64)
        t = all_reduce(t, d)
        stats = dict(zip(keys, (t[:-3] / d.world).tolist()))
        stats["audio_sec_per_sec"] = float(t[-1]) / max(time.monotonic() - self.t0, 1e-9)
        if float(t[-2]) > 0:
            stats["data_wait"] = min(float(t[-3]) / float(t[-2]), 1.0)
        return stats


class DataWaitWatch:
    """Rank 0: warn when training waits on its data loader, at most once per ``every`` train log lines.

    ``check(stats, step)`` after each train log line: a ``data_wait`` above ``threshold`` logs a warning naming
    ``data.num_workers`` and its value; the first log line of a run is exempt (it includes starting the loader
    workers and filling the sampler's buckets).
    """

    def __init__(self, num_workers: int, *, threshold: float = 0.2, every: int = 20) -> None:
        self.num_workers = num_workers
        self.threshold = threshold
        self.every = every
        self.lines = 0
        self.last_warned: int | None = None  # index of the log line that last warned

    def check(self, stats: dict[str, float], step: int) -> bool:
        """True if it warned."""
        self.lines += 1
        wait = stats.get("data_wait")
        if wait is None or wait <= self.threshold or self.lines == 1:
            return False
        if self.last_warned is not None and self.lines - self.last_warned < self.every:
            return False
        self.last_warned = self.lines
        nw = self.num_workers
        now = f"now {nw}" if nw > 0 else "now 0: batches are read in the training process itself"
        log.warning(
            "update %d: training waited for data %.0f%% of the time since the last log line (data_wait=%.2f > %g): "
            "the loader does not keep up; raise data.num_workers (%s; tools/bench/loader.py measures what one "
            "worker delivers). Next warning in %d log lines at the earliest",
            step, 100 * wait, wait, self.threshold, now, self.every,
        )
        return True


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
