"""Train one featurizer + head at one learning rate on frozen features, with the pretraining trainer's run state.

Layout of a run dir (``EXP/lr_<lr>/``, ER: ``EXP/fold_<session>/lr_<lr>/``)::

    step-<N>/                 resumable, the newest one kept; written as one directory (fileio.atomic_dir):
        model.safetensors/.json      featurizer.* + head.* (a train/state.py bundle)
        train_state.safetensors/.json optimizer state, step, epoch, batch position, task vocabularies,
                                     dev history, best, config
        rng.safetensors/.json        python, numpy, torch (and CUDA) RNG states
        COMPLETE                     written last (train/state.py: a directory without it is ignored)
    best/                     model bundle + best.json of the best dev evaluation (replaced atomically)
    result.json               that lr's dev history and best (marks it finished)
    tensorboard/              with --tensorboard

Batches hold at most ``optim.max_duration`` seconds of padded audio, drawn from ``optim.num_buckets`` duration
buckets (shuffled per epoch from ``seed + epoch``: :func:`speechssl.data.batching.duration_batches`), never a fixed
utterance count. Resume restores weights, optimizer, every RNG and the sampler position: the losses after a resume
equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from speechssl.config import to_dict
from speechssl.data.batching import duration_batches
from speechssl.fileio import atomic_dir, atomic_write_text
from speechssl.progress import progress_bar
from speechssl.superb.config import SuperbConfig
from speechssl.superb.featurizer import build_featurizer
from speechssl.superb.tasks import Example, Split, Task
from speechssl.train import state as st

__all__ = ["HeadTrainer", "train_head"]

log = logging.getLogger(__name__)


class HeadTrainer:
    """Trains one featurizer + head at one learning rate (see the module docstring). ``sources`` maps the split
    names ``train`` / ``dev`` (and ``test`` to evaluate it) to feature sources."""

    def __init__(self, task: Task, cfg: SuperbConfig, train: Split, dev: Split, sources: dict[str, Any], lr: float,
                 run_dir: Path, *, seed: int = 0, progress: bool = True, tensorboard: bool = False,
                 device: str = "cpu", inputs: dict[str, str] | None = None):
        self.task, self.cfg, self.train, self.dev, self.sources = task, cfg, train, dev, sources
        self.inputs = inputs or {}  # fingerprints of the upstream and data (the run record's inputs)
        self.lr, self.run_dir, self.seed = lr, Path(run_dir), seed
        self.progress, self.tensorboard, self.device = progress, tensorboard, device
        src = sources["train"]
        torch.manual_seed(seed)
        self.featurizer = build_featurizer(cfg.featurizer.kind, len(src.layers), src.dim,
                                           layer_norm=cfg.featurizer.layer_norm).to(device)
        self.head = task.build_head(self.featurizer.out_dim).to(device)
        o = cfg.optim
        cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        self.opt = cls(self.params(), lr=lr, weight_decay=o.weight_decay)
        self.step = self.epoch = self.pos = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.losses: list[float] = []   # every training loss of this process (tests compare them)
        self.result: dict[str, Any] = {}

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.featurizer.parameters()) + list(self.head.parameters())

    # -- features
    def features(self, split: str, exs: Sequence[Example]) -> tuple[Tensor, Tensor]:
        layers, lens = self.sources[split].get([e.utt for e in exs])
        return self.featurizer(layers.to(self.device, non_blocking=True)), lens.to(self.device)

    def eval_batches(self, split: Split) -> Iterator[tuple[list[Example], Tensor, Tensor]]:
        durs = [e.duration for e in split.examples]
        for idx in duration_batches(durs, self.cfg.optim.eval_max_duration, shuffle=False):
            exs = [split.examples[i] for i in idx]
            x, lens = self.features(split.name, exs)
            yield exs, x, lens

    @torch.no_grad()
    def evaluate(self, split: Split) -> dict[str, float]:
        self.featurizer.eval()
        self.head.eval()
        try:
            return self.task.evaluate(self.head, self.eval_batches(split), split)
        finally:
            self.featurizer.train()
            self.head.train()

    # -- run state
    def _weights(self) -> dict[str, Any]:
        return {"featurizer": self.featurizer.state_dict(), "head": self.head.state_dict()}

    def _load_weights(self, directory: Path) -> None:
        w = st.load_bundle(directory, "model", map_location=self.device)
        self.featurizer.load_state_dict(w["featurizer"])
        self.head.load_state_dict(w["head"])

    def save(self) -> Path:
        """``step-N``: weights, optimizer, position, RNG, in one atomic directory; older steps pruned."""
        out = self.run_dir / st.step_dir_name(self.step)
        state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "lr": self.lr, "seed": self.seed,
                 "task": self.cfg.task, "task_state": self.task.state(), "history": self.history, "best": self.best,
                 "config": to_dict(self.cfg), "optimizer": self.opt.state_dict()}
        with atomic_dir(out, replace=True) as tmp:
            st.save_bundle(tmp, "model", self._weights())
            st.save_bundle(tmp, "train_state", state)
            st.save_bundle(tmp, "rng", st.get_rng_state())
            st.mark_complete(tmp, {"step": self.step, "time": time.time()})
        st.prune_checkpoints(self.run_dir, keep_last=1)
        return out

    def load(self, ckpt: Path) -> None:
        state = st.load_bundle(ckpt, "train_state")
        self.task.load_state(state["task_state"])
        self._load_weights(ckpt)
        self.opt.load_state_dict(state["optimizer"])
        st.set_rng_state(st.load_bundle(ckpt, "rng"))
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.history, self.best = state["history"], state["best"]

    def save_best(self, dev: dict[str, float]) -> None:
        with atomic_dir(self.run_dir / "best", replace=True) as tmp:
            st.save_bundle(tmp, "model", self._weights())
            atomic_write_text(tmp / "best.json", json.dumps({"step": self.step, "dev": dev, "lr": self.lr,
                                                             "task_state": self.task.state()}, indent=1) + "\n")

    def load_best(self) -> None:
        self._load_weights(self.run_dir / "best")

    # -- the loop
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.task.higher_is_better else a < b

    def _validate(self, writer: Any) -> None:
        dev = self.evaluate(self.dev)
        self.history.append({"step": self.step, **dev})
        if writer is not None:
            for k, v in dev.items():
                writer.add_scalar(f"dev/{k}", v, self.step)
        if self.best is None or self._better(dev[self.task.metric], self.best["dev"][self.task.metric]):
            self.best = {"step": self.step, "dev": dev}
            self.save_best(dev)
        log.info("%s step %d: dev %s", self.run_dir, self.step, " ".join(f"{k}={v:.4f}" for k, v in dev.items()))

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``optim.max_steps`` (or, for tests, only until step ``stop_after``); returns the lr's result."""
        o = self.cfg.optim
        done = self.run_dir / "result.json"
        options = {**to_dict(self.cfg), "task": self.cfg.task, "lr": self.lr, "seed": self.seed}
        if st.open_run(self.run_dir, "superb", options, resume=resume, inputs=self.inputs,
                       markers=("step-*", "best", "result.json")) and done.is_file():
            return json.loads(done.read_text())
        latest = st.find_latest_checkpoint(self.run_dir)
        if latest is not None:
            self.load(latest)
            log.info("%s: resumed at step %d", self.run_dir, self.step)
        writer = None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        durs = [e.duration for e in self.train.examples]
        params = self.params()
        last = min(o.max_steps, stop_after) if stop_after is not None else o.max_steps
        bar = progress_bar(total=o.max_steps, initial=self.step, desc=f"{self.cfg.task} lr={self.lr:g}", unit="step",
                           disable=not self.progress, dynamic_ncols=True, leave=False)
        self.featurizer.train()
        self.head.train()
        t0 = time.time()
        while self.step < last:
            batches = duration_batches(durs, o.max_duration, num_buckets=o.num_buckets, seed=self.seed,
                                       epoch=self.epoch)
            while self.pos < len(batches) and self.step < last:
                exs = [self.train.examples[i] for i in batches[self.pos]]
                x, lens = self.features("train", exs)
                loss = self.task.loss(self.head, x, lens, [e.target for e in exs])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)) if o.grad_clip > 0 else 0.0
                if math.isfinite(gnorm):
                    self.opt.step()
                self.pos += 1
                self.step += 1
                value = float(loss.detach())
                self.losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
                if writer is not None and self.step % o.log_every == 0:
                    writer.add_scalar("train/loss", value, self.step)
                if self.step % o.eval_every == 0 or self.step == o.max_steps:
                    self._validate(writer)
                if self.step % o.save_every == 0 or self.step == o.max_steps:
                    self.save()
            if self.pos >= len(batches):
                self.epoch += 1
                self.pos = 0
        bar.close()
        if writer is not None:
            writer.close()
        result = {"lr": self.lr, "best": self.best, "history": self.history, "steps": self.step,
                  "train_seconds": round(time.time() - t0, 2)}
        if self.step >= o.max_steps:
            atomic_write_text(done, json.dumps(result, indent=1) + "\n")
        return result


def train_head(task: Task, cfg: SuperbConfig, train: Split, dev: Split, sources: dict[str, Any], lr: float,
               run_dir: Path, *, seed: int = 0, resume: bool = False, progress: bool = True,
               tensorboard: bool = False, device: str = "cpu", inputs: dict[str, str] | None = None) -> HeadTrainer:
    """Train one lr to the end (or pick up its finished result); returns the trainer (best head not loaded).
    ``task`` must be fitted on ``train`` already (its vocabularies size the head)."""
    trainer = HeadTrainer(task, cfg, train, dev, sources, lr, run_dir, seed=seed, progress=progress,
                          tensorboard=tensorboard, device=device, inputs=inputs)
    trainer.result = trainer.run(resume=resume)
    return trainer
