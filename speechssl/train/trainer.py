"""HuBERT masked-unit pretraining: one process or ``torchrun`` DDP, exact resume, bf16, budgets.

Read top to bottom: :class:`Trainer` (set-up, the loop, one update, validation, checkpoints), then
:func:`pretrain`, which the CLI calls. The rest lives beside it: ``train/config.py`` (the config dataclasses),
``train/distributed.py`` (process group, collectives, signals), ``train/data.py`` (loaders, resumable sampler),
``train/checkpoints.py`` (save, resume, ``init_from`` through ``speechssl.models.checkpoint``), ``train/state.py``
(training-state files, RNG).

Design points (where this differs from fairseq):

* **Randomness is a function of position.** Before every micro-batch the python/numpy/torch RNGs are seeded
  from ``(seed, update, attempt, global micro-batch index)`` with the global index ``micro * world + rank``.
  Dropout and masks therefore do not depend on how the run was split into processes or interrupted: a
  resumed run is bit-identical on CPU, and 2 GPUs x B equals 1 GPU x accumulation 2 x B up to summation order.
  (RNG states are still saved with each checkpoint and restored.)
* **Data position is what was consumed**, not what the DataLoader prefetched (see ``train/data.py``), and crops
  are hashed from (seed, epoch, utterance id), so a resume continues with exactly the next batch.
* **Checkpoints are directories** completed by a marker and renamed into place; no pickle anywhere;
  ``--resume auto`` takes the newest complete one.
* **Collective decisions** (stop on time budget or SIGTERM/SIGUSR1, skip a non-finite step) are taken on
  all-reduced values, so ranks never disagree and hang.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from speechssl.config import to_dict, to_yaml
from speechssl.errors import UserError
from speechssl.fileio import atomic_write_text
from speechssl.train import checkpoints as ck
from speechssl.train import state as st
from speechssl.train.collapse import CollapseWatch
from speechssl.train.config import CheckpointConfig, DataConfig, OptimConfig, PretrainConfig, split_batch
from speechssl.train.data import batch_wavs, build_pretrain_data, start_loader
from speechssl.train.distributed import (
    StopSignals,
    all_reduce,
    barrier,
    bf16_supported,
    broadcast_from_main,
    gather_rng,
    init_distributed,
)
from speechssl.train.logs import DataWaitWatch, Window, add_file_log, fmt, log_train
from speechssl.train.schedule import lr_at

log = logging.getLogger(__name__)

# the config classes and bf16_supported are re-exported: ``from speechssl.train.trainer import PretrainConfig`` works
__all__ = ["DataConfig", "OptimConfig", "CheckpointConfig", "PretrainConfig", "Trainer", "pretrain", "bf16_supported",
           "TrainingAborted"]


class TrainingAborted(RuntimeError):
    """Training stopped on an unrecoverable condition (too many non-finite steps)."""


class Trainer:
    """Owns the model, optimizer, data and checkpoints of one training run: pretraining here (every objective of
    ``models/pretrain.py``: HuBERT, wav2vec 2.0, BEST-RQ), CTC fine-tuning
    in :class:`speechssl.train.finetune.FinetuneTrainer`, which overrides the hooks below and nothing of the loop.

    ``model`` may be given (tests, custom heads); it must follow the pretraining models' contract:
    ``forward(wavs, wav_lens, labels) -> {"loss": scalar, "logs": {name: float}}`` (optionally ``"sample_size"``)
    and ``.hubert`` with ``frame_rate``, ``downsample_rate`` and ``num_frames(num_samples)``. A model with a
    ``num_updates`` attribute gets the number of updates done before every forward (fine-tuning's freeze schedule).

    Hooks (one method each): :meth:`build_model`, :meth:`init_weights` (a fresh run's start), :meth:`build_data`,
    :meth:`lr_at`, :meth:`validate`, :meth:`_metric` (the best-checkpoint criterion), :meth:`checkpoint_extra`.
    """

    kind = "hubert_pretrain"  # "kind" in every checkpoint's config.json extra
    run_kind = "pretrain"  # the run record's kind (train/state.py: open_run, MAY_CHANGE_ON_RESUME)
    run_flag = "exp_dir"  # how the user names the run dir (in error lines)

    def __init__(self, cfg: PretrainConfig, *, resume: str | None = None, model: nn.Module | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.exp = Path(cfg.exp_dir)
        self.ckpt_root = self.exp / "checkpoints"
        self.dist, self.device = init_distributed(cfg.device)
        d = self.dist
        self._log_handler: logging.Handler | None = None
        self._open_run(resume, overwrite)
        if d.is_main:
            self.exp.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            self._log_handler = add_file_log(self.exp / "train.log")
        barrier(d)
        try:
            self._setup(cfg, resume, model)
        except BaseException:  # a run that cannot start leaves no handler on the root logger (nor a process group)
            self.close()
            raise

    def _setup(self, cfg: PretrainConfig, resume: str | None, model: nn.Module | None) -> None:
        """Model, optimizer, data, resume or init, collapse watch, DDP wrapper (``__init__``'s body)."""
        d = self.dist
        o = cfg.optim
        if o.batch_seconds is not None:  # the paper's update whatever the number of processes (train/config.py)
            o.accum_grad, cfg.data.max_duration = split_batch(o.batch_seconds, d.world, cfg.data.max_duration)
        self.bf16 = bf16_supported(self.device) if o.bf16 is None else bool(o.bf16)
        if self.bf16 and self.device.type == "cpu" and not bf16_supported(self.device):
            log.warning("optim.bf16=true on a CPU without AMX/AVX512-BF16: bf16 is emulated and slow")

        # ---- model (same init on every rank; DDP also broadcasts rank 0's parameters)
        st.seed_all(cfg.seed)
        if model is None:
            model = self.build_model()
        self.model = model.to(self.device)
        self.encoder = getattr(self.model, "hubert", self.model)
        self.optimizer = torch.optim.AdamW(
            self.optimizer_groups(),
            lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
            # one fused kernel instead of a Python loop over parameters: 6 ms vs 32 ms per update for the tiny
            # model on 2 CPU cores (the loop was ~20% of a Base-shaped CPU step)
            fused=self.device.type in ("cpu", "cuda"),
        )

        # ---- training state (what train_state.json records; restored on resume)
        self.step = 0  # optimizer updates done
        self.bad_steps = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.elapsed_s = 0.0  # training wall-clock, summed over resumes
        self._last_valid_step: int | None = None  # the update validate() last ran at

        # ---- data
        self.data = data = self.build_data()
        self.sampler, self.dev_loader = data.sampler, data.dev_loader

        # ---- resume / init
        resume_dir = ck.resolve_resume(resume, self.ckpt_root, announce=d.is_main)
        self._resumed = resume_dir is not None
        if resume_dir is not None:
            self._restore(resume_dir)
        else:
            self.init_weights()

        # ---- collapse watch (rank 0 only, no collective): update-0 reference, see train/collapse.py
        self.collapse_watch: CollapseWatch | None = None
        if d.is_main and getattr(cfg, "collapse_watch_frames", 0) > 0 and self.dev_loader is not None:
            self.collapse_watch = CollapseWatch.from_batches(
                self.dev_loader, self.encoder.num_frames, max_frames=cfg.collapse_watch_frames,
                source=str(cfg.data.dev),
            )
            self.collapse_watch.start(self.encoder, self.exp, resumed_from=resume_dir)

        self.ddp_model: nn.Module = self.model
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters(),
            )
        if d.is_main:
            atomic_write_text(self.exp / "config.yaml", to_yaml(cfg))
            eff = d.world * cfg.data.max_duration * o.accum_grad
            nparams = sum(p.numel() for p in self.model.parameters())
            log.info(
                "effective batch: world %d x max_duration %g s x accum %d = %g s of audio per update%s "
                "(paper Base: 32 x 87.5 s = 2800 s); %.2fM parameters; device %s; bf16 %s",
                d.world, cfg.data.max_duration, o.accum_grad, eff,
                "" if o.batch_seconds is None else f" (optim.batch_seconds={o.batch_seconds:g})",
                nparams / 1e6, self.device, self.bf16,
            )

    def _open_run(self, resume: str | None, overwrite: bool) -> None:
        """Claim EXP for this run (train/state.py: open_run) before anything is written: rank 0 checks and records;
        every rank raises its one line, so none is left waiting."""
        error = None
        if self.dist.is_main:
            try:
                st.open_run(self.exp, self.run_kind, to_dict(self.cfg), resume=bool(resume), overwrite=overwrite,
                            inputs=self.run_inputs(), markers=("checkpoints/step-*", "best"), flag=self.run_flag)
            except UserError as e:
                error = str(e)
        error = broadcast_from_main(error, self.dist)
        if error is not None:
            self.dist.close()
            raise UserError(error)

    # ------------------------------------------------------------------------------------------ hooks
    def run_inputs(self) -> dict[str, str]:
        """Fingerprints of what the run reads (recorded in EXP/run.json; a resume must read the same): the data dirs,
        the label dirs, the ``ckpt.init_from`` checkpoint."""
        c = self.cfg
        out = {"data.train": st.dir_fingerprint(c.data.train)}
        if c.data.dev:
            out["data.dev"] = st.dir_fingerprint(c.data.dev)
        for key in ("train_labels", "dev_labels"):
            for i, p in enumerate(getattr(c.data, key)):
                out[f"data.{key}[{i}]"] = st.dir_fingerprint(p)
        if c.ckpt.init_from:
            out["ckpt.init_from"] = checkpoint_fingerprint(c.ckpt.init_from)
        return out

    def build_model(self) -> nn.Module:
        """The model of a fresh run: ``cfg.model.objective``'s pretraining model (``models/pretrain.py``)."""
        from speechssl.models.pretrain import build_pretrain_model, uses_labels

        cfg = self.cfg
        if uses_labels(cfg.model) and len(cfg.model.num_classes) != len(cfg.data.train_labels):
            raise UserError(
                f"model.num_classes {cfg.model.num_classes} has {len(cfg.model.num_classes)} entries but "
                f"data.train_labels lists {len(cfg.data.train_labels)} label dir(s)"
            )
        return build_pretrain_model(cfg.model)

    def build_data(self):
        """Train sampler and batches, dev loader (``train/data.py``'s ``PretrainData`` contract)."""
        data = build_pretrain_data(self.cfg, self.dist, self.encoder, self.exp, self.device)
        self.train_labels = data.train_labels
        return data

    def init_weights(self) -> None:
        """A fresh (not resumed) run's start: the encoder of ``ckpt.init_from`` when set, the head fresh."""
        src = self.cfg.ckpt.init_from
        if src:
            ck.init_encoder(self.model, src, trust_pickle=self.cfg.ckpt.trust_pickle)
            if self.dist.is_main:
                log.info("initialised the encoder from %s (the head starts fresh)", src)

    def optimizer_groups(self) -> list[dict]:
        """AdamW parameter groups; a group's ``lr_scale`` multiplies the schedule's learning rate."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def find_unused_parameters(self) -> bool:
        """DDP must look for parameters without gradient (LayerDrop, a frozen frontend)."""
        mc = self.cfg.model
        return mc.layerdrop > 0 or mc.feature_grad_mult == 0

    def lr_at(self, update: int) -> float:
        """Learning rate of update ``update`` (1-based): warm-up then polynomial decay (``train/schedule.py``)."""
        o = self.cfg.optim
        return lr_at(update, peak_lr=o.lr, warmup_steps=o.warmup_steps, max_steps=o.max_steps, end_lr=o.end_lr,
                     power=o.power)

    def checkpoint_extra(self) -> dict:
        """What every checkpoint's ``config.json`` records beside the model (``extra``)."""
        return {"kind": self.kind, "labels": [ls.meta for ls in self.train_labels]}

    def _model_config(self):
        """The config saved with the model: the model's own (fine-tuning: the checkpoint's encoder with its
        overrides), else ``cfg.model``."""
        config = getattr(self.model, "config", None)
        return config if config is not None else self.cfg.model

    def save_options(self) -> dict:
        """Keyword arguments for ``save_model`` (fine-tuning: ``partial`` for adapters / LoRA)."""
        return {}

    # ------------------------------------------------------------------------------------------ batches
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """float32 waveforms (int16 ones are copied as int16, then scaled on the device: ``batch_wavs``), lengths,
        labels."""
        nb = self.device.type == "cuda"
        return (
            batch_wavs(batch, self.device, non_blocking=nb),
            batch["wav_lens"].to(self.device, non_blocking=nb),
            [lb.to(self.device, non_blocking=nb) for lb in batch["labels"]],
        )

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Update until ``optim.max_steps``, the time budget or a signal; log, validate and save on schedule."""
        cfg, o, d = self.cfg, self.cfg.optim, self.dist
        writer = bar = None
        if d.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.exp / "tensorboard"))
            if cfg.progress:
                from speechssl.progress import progress_bar

                bar = progress_bar(total=o.max_steps, initial=self.step, desc="train", unit="step",
                                   dynamic_ncols=True, mininterval=1.0)
        batches = self.data.train_batches()
        window = Window()
        wait_watch = DataWaitWatch(cfg.data.num_workers) if d.is_main else None  # warns when data_wait > 0.2
        last_saved = self.step if self._resumed else -1
        stop_reason, end = "max_steps", o.max_steps
        if o.max_minutes is not None and self.elapsed_s >= o.max_minutes * 60.0:
            # budget spent by the runs this one resumes (elapsed_s is restored identically on every rank)
            if d.is_main:
                log.info("optim.max_minutes=%g already spent (%.1f min); nothing to do", o.max_minutes,
                         self.elapsed_s / 60)
            stop_reason, end = "max_minutes", self.step  # skip the loop
        t_prev = time.monotonic()
        try:
            with StopSignals() as signals:
                while self.step < end:
                    lr = self.lr_at(self.step + 1)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                    self.model.train()
                    logs, audio_s, ids = self._accumulate(batches)
                    params = [p for p in self.model.parameters() if p.grad is not None]
                    max_norm = o.clip_norm if o.clip_norm > 0 else float("inf")
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
                    if math.isfinite(gnorm):
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.step += 1
                        window.add(logs, gnorm, audio_s)
                        if bar is not None:
                            bar.update(1)
                    else:
                        self._skip_step(gnorm, ids, writer)
                    now = time.monotonic()
                    self.elapsed_s += now - t_prev
                    window.add_time(self.data_wait_s, now - t_prev)  # -> data_wait: waiting for batches / update time

                    # ---- collective decisions: signals, time budget
                    over_budget = o.max_minutes is not None and self.elapsed_s >= o.max_minutes * 60.0
                    flag = torch.tensor([1.0 if over_budget else 0.0, 1.0 if signals.received else 0.0])
                    flag = all_reduce(flag, d, dist.ReduceOp.MAX if d.enabled else None)
                    stop = "signal" if flag[1] > 0 else "max_minutes" if flag[0] > 0 else None

                    is_last = stop is not None or self.step >= o.max_steps
                    if window.n and (self.step % cfg.log_every == 0 or is_last):
                        stats = window.reduce(d) | {"lr": lr}  # a collective: every rank
                        if d.is_main:
                            log_train(stats, self.step, writer, bar)
                            wait_watch.check(stats, self.step)
                        window = Window()
                    valid = None
                    # a signal (preemption: torchrun and SLURM give ~30 s) saves at once; the resumed run validates
                    if (self.dev_loader is not None and self.step > 0 and self.step != self._last_valid_step
                            and (self.step % cfg.valid_every == 0 or (is_last and stop != "signal"))):
                        valid = self.validate(writer)
                    if self.step > 0 and self.step != last_saved and (self.step % cfg.ckpt.every_steps == 0 or is_last):
                        self.save_checkpoint(valid=valid)
                        last_saved = self.step
                    t_prev = time.monotonic()  # validation / checkpoint time is not training time
                    if stop is not None:
                        stop_reason = stop
                        break
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if d.is_main:
            log.info("stopped at update %d (%s) after %.1f min of training", self.step, stop_reason, self.elapsed_s / 60)
        return {
            "step": self.step, "stop_reason": stop_reason, "bad_steps": self.bad_steps,
            "best_metric": self.best_metric, "best_step": self.best_step, "elapsed_s": self.elapsed_s,
        }

    def _skip_step(self, gnorm: float, ids: list[str], writer) -> None:
        """A non-finite gradient norm: drop the gradients, count it, abort after ``optim.max_bad_steps``."""
        o, d = self.cfg.optim, self.dist
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        log.warning(
            "update %d: non-finite gradient norm (%s); step skipped (%d of at most %d). Batch "
            "utterances on rank %d: %s", self.step + 1, gnorm, self.bad_steps, o.max_bad_steps,
            d.rank, " ".join(ids[:20]) + (" ..." if len(ids) > 20 else ""),
        )
        if writer is not None:
            writer.add_scalar("train/bad_steps", self.bad_steps, self.step)
        if self.bad_steps > o.max_bad_steps:
            raise TrainingAborted(
                f"{self.bad_steps} non-finite steps (optim.max_bad_steps={o.max_bad_steps}); last batch "
                f"on rank {d.rank}: {' '.join(ids[:20])}. Lower optim.lr, check the data, or resume "
                f"from an earlier checkpoint in {self.ckpt_root}"
            )

    def _accumulate(self, batches: Iterator[dict]) -> tuple[dict[str, float], float, list[str]]:
        """Forward/backward ``accum_grad`` micro-batches; gradients are all-reduced on the last one only.

        Normalisation as fairseq's HuBERT criterion: when the model reports ``sample_size`` (target frames of
        its loss), each micro-batch contributes ``loss * sample_size`` and the summed gradient is divided by
        the total sample size over all micro-batches and ranks (one scalar all-reduce per update), so every
        target frame of the effective batch weighs the same, however it is split across GPUs and micro-steps.
        Without ``sample_size``, micro-batch losses are averaged.
        """
        o, d = self.cfg.optim, self.dist
        sums: dict[str, float] = {}
        audio = 0.0
        ids: list[str] = []
        total_size = 0.0
        by_frames = None
        self.data_wait_s = 0.0  # seconds this update waited for its batches (the train loop logs data_wait)
        if hasattr(self.model, "num_updates"):
            self.model.num_updates = self.step  # fine-tuning's freeze schedule (models/ctc.py)
        for micro in range(o.accum_grad):
            t_wait = time.monotonic()
            batch = next(batches)
            self.data_wait_s += time.monotonic() - t_wait
            self.sampler.mark_consumed(batch["epoch"], batch["index"])
            # dropout and masks from (seed, update, attempt, global micro-batch index): see module docstring
            st.seed_all(st.derived_seed(self.cfg.seed, self.step, self.bad_steps, micro * d.world + d.rank))
            wavs, lens, labels = self._to_device(batch)
            sync = micro == o.accum_grad - 1 or not d.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with self._autocast():
                    out = self.ddp_model(wavs, lens, labels)
                loss = out["loss"].float()
                size = out.get("sample_size")
                if by_frames is None:
                    by_frames = size is not None
                if by_frames:
                    total_size += float(size)
                    (loss * float(size)).backward()
                else:
                    (loss / o.accum_grad).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in out.get("logs", {}).items():
                if k != "loss":
                    sums[k] = sums.get(k, 0.0) + float(v)
            audio += batch["audio_seconds"]
            ids = batch["ids"]
        if by_frames:
            # DDP averaged the gradients over ranks: undo that and divide by the global target-frame count.
            n = all_reduce(torch.tensor([total_size], dtype=torch.float64), d)
            scale = d.world / max(float(n[0]), 1.0)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        return {k: v / o.accum_grad for k, v in sums.items()}, audio, ids

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, writer=None) -> dict[str, float]:
        """Loss and accuracies on the dev set, weighted by utterances; same masks every time (fixed seed).
        On rank 0, also the collapse watch (``rank_L{i}``, ``std_L{i}``; see ``train/collapse.py``)."""
        self._last_valid_step = self.step
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0.0
        with st.preserved_rng(st.derived_seed(self.cfg.seed, 0xDE5)):
            for batch in start_loader(self.dev_loader):
                wavs, lens, labels = self._to_device(batch)
                with self._autocast():
                    out = self.model(wavs, lens, labels)
                b = float(len(batch["ids"]))
                sums["loss"] = sums.get("loss", 0.0) + float(out["loss"]) * b
                for k, v in out.get("logs", {}).items():
                    if k != "loss":
                        sums[k] = sums.get(k, 0.0) + float(v) * b
                count += b
        self.model.train()
        # ranks may see different key sets only if one had no batch; agree on rank 0's keys
        keys = broadcast_from_main(sorted(sums), self.dist)
        t = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64)
        t = all_reduce(t, self.dist)
        n = max(float(t[-1]), 1.0)
        stats = {k: float(v) / n for k, v in zip(keys, t[:-1].tolist())}
        self._log_valid(stats, int(n), writer)
        if self.dist.is_main:
            if self.collapse_watch is not None:  # rank 0 only: rank_L{i}, std_L{i} join rank 0's stats
                stats.update(self.collapse_watch.check(self.encoder, self.step, writer))
            # the objective's own signs (wav2vec 2.0: codebook perplexity; BEST-RQ: target entropy)
            for line in getattr(self.model, "collapse_warnings", lambda _: [])(stats):
                log.warning("collapse watch at update %d: %s", self.step, line)
        return stats

    def _log_valid(self, stats: dict[str, float], utts: int, writer) -> None:
        """Rank 0: validation numbers to TensorBoard (``valid/*``) and the log."""
        if self.dist.is_main:
            if writer is not None:
                for k, v in stats.items():
                    writer.add_scalar(f"valid/{k}", v, self.step)
            log.info("valid at update %d (%d utts): %s", self.step, utts,
                     " ".join(f"{k}={fmt(v)}" for k, v in stats.items()))

    def _metric(self, valid: dict[str, float]) -> tuple[float, bool]:
        """(value, higher_is_better) of the best-checkpoint criterion."""
        acc = [v for k, v in valid.items() if k.startswith("acc_m")]
        if self.cfg.ckpt.best_by == "acc" and acc:
            return sum(acc) / len(acc), True
        return valid["loss"], False

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, valid: dict[str, float] | None = None) -> Path:
        """Write EXP/checkpoints/step-N (all ranks call; rank 0 writes), update EXP/best, prune old ones."""
        d = self.dist
        rng = gather_rng(d)
        improved = self.dev_loader is None  # no dev set: "best" is the latest model
        if valid is not None:
            value, higher = self._metric(valid)
            if self.best_metric is None or (value > self.best_metric if higher else value < self.best_metric):
                self.best_metric, self.best_step, improved = value, self.step, True
        final = self.ckpt_root / st.step_dir_name(self.step)
        if d.is_main:
            model_cfg = self._model_config()
            common = self.checkpoint_extra()
            extra = {"step": self.step, "epoch": self.sampler.epoch, **common}
            ck.save_step(self.ckpt_root, self.model, model_cfg, step=self.step, extra=extra,
                         train_state=self._train_state(), rng=rng, collapse_watch=self.collapse_watch,
                         world_size=d.world, keep_last=self.cfg.ckpt.keep_last, **self.save_options())
            if improved:
                ck.save_best(self.exp / "best", final, self.model, model_cfg, extra={
                    "step": self.step, "checkpoint": str(final), "best_by": self.cfg.ckpt.best_by,
                    "metric": self.best_metric, "valid": valid, **common}, **self.save_options())
            log.info("saved %s%s", final, " (new best)" if improved and valid is not None else "")
        barrier(d)
        return final

    def _train_state(self) -> dict:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "bad_steps": self.bad_steps,
            "elapsed_s": self.elapsed_s,
            "world_size": self.dist.world,
            "accum_grad": self.cfg.optim.accum_grad,
            "max_duration": self.cfg.data.max_duration,
            "seed": self.cfg.seed,
            "config": to_dict(self.cfg),
        }

    def _restore(self, ckpt: Path) -> None:
        """Model weights, optimizer, counters, sampler position and RNG of a step checkpoint (inverse of
        :meth:`_train_state`)."""
        d = self.dist
        ts, rng = ck.load_step(ckpt, self.model, self._model_config())
        self.optimizer.load_state_dict(ts["optimizer"])
        self.step, self.bad_steps = int(ts["step"]), int(ts["bad_steps"])
        self.best_metric, self.best_step = ts["best_metric"], ts["best_step"]
        self.elapsed_s = float(ts["elapsed_s"])
        self.sampler.load_state_dict(ck.sampler_state_for(ts, d.world, self.cfg.optim.accum_grad,
                                                          self.cfg.data.max_duration))
        if d.rank < len(rng):
            st.set_rng_state(rng[d.rank])
        if d.is_main:
            log.info("resumed from %s at update %d (epoch %d, batch %d)", ckpt, self.step,
                     self.sampler.epoch, self.sampler.batches_done)

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self.dist.close()


# ============================================================================================== entry point
def checkpoint_fingerprint(spec: str) -> str:
    """What names a checkpoint a run starts from (:func:`speechssl.upstream.checkpoint_sha1`: its weights, or
    ``random:CKPT``'s config); "missing" when there is none (the loader says so in its own words)."""
    from speechssl.upstream import checkpoint_sha1

    try:
        return checkpoint_sha1(spec)
    except (OSError, UserError):
        return "missing"


def pretrain(cfg: PretrainConfig, resume: str | None = None, *, model: nn.Module | None = None,
             overwrite: bool = False) -> dict:
    """Run (or resume) pretraining; returns a summary dict (step, stop_reason, best metric, ...). EXP must be new,
    or hold this run (``resume``, same defining options), or be deleted first (``overwrite``)."""
    trainer = Trainer(cfg, resume=resume, model=model, overwrite=overwrite)
    try:
        return trainer.train()
    finally:
        trainer.close()
