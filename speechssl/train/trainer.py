"""HuBERT masked-unit pretraining: one process or ``torchrun`` DDP, exact resume, bf16, budgets.

Read top to bottom: the config dataclasses, then :class:`Trainer` (setup, the step, validation, checkpoints),
then :func:`pretrain`, which the CLI calls.

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
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from speechssl.fileio import atomic_write_text, fsync_dir
from speechssl.config import to_dict, to_yaml
from speechssl.models.config import HubertConfig
from speechssl.train import state as st
from speechssl.train.collapse import CollapseWatch
from speechssl.train.data import (
    PretrainDataset,
    ResumableBatchSampler,
    check_cuts_and_labels,
    collate_identity,
    load_cuts,
    load_label_sets,
)
from speechssl.train.schedule import lr_at

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "OptimConfig",
    "CheckpointConfig",
    "PretrainConfig",
    "Trainer",
    "pretrain",
    "bf16_supported",
    "TrainingAborted",
]


# ============================================================================================== config
@dataclass
class DataConfig:
    train: str = ""  # data dir (cuts.jsonl.gz, or Kaldi files converted into EXP/data/train)
    dev: str | None = None  # data dir for validation (optional)
    train_labels: list[str] = field(default_factory=list)  # one label dir per label set (text.km + meta.json)
    dev_labels: list[str] = field(default_factory=list)
    max_duration: float = 87.5  # seconds of (cropped) audio per micro-batch per process
    valid_max_duration: float | None = None  # default: max_duration
    crop_min: float = 2.0  # utterances shorter than this are skipped (fairseq min_sample_size 32000)
    crop_max: float = 15.625  # crop to at most this many seconds (fairseq max_sample_size 250000)
    pad_audio: bool = False  # False: crop a batch to its shortest utterance (fairseq); True: pad to longest
    num_buckets: int = 30
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_duration <= 0 or self.crop_min < 0 or (self.crop_max is not None and self.crop_max <= 0):
            raise ValueError("need max_duration > 0, crop_min >= 0, crop_max > 0")
        if self.crop_max < self.crop_min:
            raise ValueError(f"crop_max {self.crop_max} < crop_min {self.crop_min}")
        if self.num_buckets < 1 or self.num_workers < 0:
            raise ValueError("need num_buckets >= 1 and num_workers >= 0")


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01  # decoupled (AdamW), as fairseq's Adam applies it
    warmup_steps: int = 32000
    max_steps: int = 400000
    end_lr: float = 0.0
    power: float = 1.0  # polynomial decay power (1: linear)
    max_minutes: float | None = None  # wall-clock budget for training (summed over resumes); stop at whichever first
    clip_norm: float = 10.0  # 0: no clipping (the norm is still logged)
    accum_grad: int = 1
    bf16: bool | None = None  # None: on where supported (CUDA bf16, CPU with AMX / AVX512-BF16)
    max_bad_steps: int = 20  # non-finite gradient steps are skipped; abort after this many

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.warmup_steps < 0 or self.accum_grad < 1:
            raise ValueError("need max_steps >= 1, warmup_steps >= 0, accum_grad >= 1")
        if self.lr <= 0 or self.clip_norm < 0 or self.max_bad_steps < 0:
            raise ValueError("need lr > 0, clip_norm >= 0, max_bad_steps >= 0")


@dataclass
class CheckpointConfig:
    every_steps: int = 5000
    keep_last: int = 3  # step checkpoints kept (the best model is kept separately in EXP/best)
    best_by: Literal["acc", "loss"] = "acc"  # valid masked accuracy (mean over label sets) or valid loss
    init_from: str | None = None  # checkpoint dir whose encoder (hubert.*) initialises a new run; the head starts fresh

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ValueError("need every_steps >= 1 and keep_last >= 1")


@dataclass
class PretrainConfig:
    exp_dir: str = "exp/hubert"
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 100
    valid_every: int = 5000
    progress: bool = True  # tqdm bar on rank 0
    collapse_watch_frames: int = 4096  # dev frames for the per-layer effective rank at every validation; 0: off
    model: HubertConfig = field(default_factory=HubertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.valid_every < 1:
            raise ValueError("need log_every >= 1 and valid_every >= 1")
        if self.collapse_watch_frames < 0:
            raise ValueError(f"collapse_watch_frames must be >= 0 (0: off), got {self.collapse_watch_frames}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


class TrainingAborted(RuntimeError):
    """Training stopped on an unrecoverable condition (too many non-finite steps)."""


# ============================================================================================== helpers
def bf16_supported(device: torch.device) -> bool:
    """CUDA with bf16, or a CPU with AMX / AVX512-BF16 (where bf16 matmuls are fast, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
            return True
    except Exception:  # pragma: no cover - older torch
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:  # pragma: no cover - not Linux
        pass
    return False


def _derived_seed(*parts: int) -> int:
    h = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available")
    if world <= 1:
        return _Dist(), torch.device("cuda" if use_cuda else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        here = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, initialized_here=here), device


def _barrier(d: _Dist) -> None:
    if d.enabled:
        dist.barrier()


def _all_reduce(t: torch.Tensor, d: _Dist, op=None) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _model_num_frames(model: nn.Module):
    """``num_samples -> frames`` of the encoder (a picklable callable)."""
    enc = getattr(model, "hubert", model)
    return _NumFrames(enc)


class _NumFrames:
    def __init__(self, encoder: nn.Module):
        self.encoder = encoder

    def __call__(self, n: int) -> int:
        with torch.no_grad():
            return int(self.encoder.num_frames(torch.tensor([int(n)]))[0])


# ============================================================================================== trainer
class Trainer:
    """Owns the model, optimizer, data and checkpoints of one pretraining run.

    ``model`` may be given (tests, custom heads); it must follow the ``HubertPretrainModel`` contract:
    ``forward(wavs, wav_lens, labels) -> {"loss": scalar, "logs": {name: float}}`` and ``.hubert`` with
    ``frame_rate``, ``downsample_rate`` and ``num_frames(num_samples)``.
    """

    def __init__(self, cfg: PretrainConfig, *, resume: str | None = None, model: nn.Module | None = None):
        self.cfg = cfg
        self.exp = Path(cfg.exp_dir)
        self.ckpt_root = self.exp / "checkpoints"
        self.dist, self.device = _init_distributed(cfg.device)
        d = self.dist
        if d.is_main:
            self.exp.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            self._add_file_log()
        _barrier(d)
        o = cfg.optim
        self.bf16 = bf16_supported(self.device) if o.bf16 is None else bool(o.bf16)
        if self.bf16 and self.device.type == "cpu" and not bf16_supported(self.device):
            log.warning("optim.bf16=true on a CPU without AMX/AVX512-BF16: bf16 is emulated and slow")

        # ---- model (same init on every rank; DDP also broadcasts rank 0's parameters)
        _seed_all(cfg.seed)
        if model is None:
            from speechssl.models.hubert import HubertPretrainModel

            if len(cfg.model.num_classes) != len(cfg.data.train_labels):
                raise ValueError(
                    f"model.num_classes {cfg.model.num_classes} has {len(cfg.model.num_classes)} entries but "
                    f"data.train_labels lists {len(cfg.data.train_labels)} label dir(s)"
                )
            model = HubertPretrainModel(cfg.model)
        self.model = model.to(self.device)
        self.encoder = getattr(self.model, "hubert", self.model)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
            # one fused kernel instead of a Python loop over parameters: 6 ms vs 32 ms per update for the tiny
            # model on 2 CPU cores (the loop was ~20% of a Base-shaped CPU step)
            fused=self.device.type in ("cpu", "cuda"),
        )

        # ---- training state
        self.step = 0  # optimizer updates done
        self.bad_steps = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.elapsed_s = 0.0  # training wall-clock, summed over resumes
        self._stop_signal: int | None = None

        # ---- data
        self._setup_data()

        # ---- resume / init
        resume_dir = self._resolve_resume(resume)
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
        elif cfg.ckpt.init_from:
            self._init_from(cfg.ckpt.init_from)

        # ---- collapse watch (rank 0 only, no collective): update-0 reference, see train/collapse.py
        self.collapse_watch: CollapseWatch | None = None
        if d.is_main and cfg.collapse_watch_frames > 0 and self.dev_loader is not None:
            self.collapse_watch = CollapseWatch.from_batches(
                self.dev_loader, self.encoder.num_frames, max_frames=cfg.collapse_watch_frames,
                source=str(cfg.data.dev),
            )
            self.collapse_watch.start(self.encoder, self.exp, resumed_from=resume_dir)

        self.ddp_model: nn.Module = self.model
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            mc = getattr(cfg, "model", None)
            find_unused = bool(mc is not None and (mc.layerdrop > 0 or mc.feature_grad_mult == 0))
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused,
            )
        if d.is_main:
            atomic_write_text(self.exp / "config.yaml", to_yaml(cfg))
            eff = d.world * cfg.data.max_duration * o.accum_grad
            nparams = sum(p.numel() for p in self.model.parameters())
            log.info(
                "effective batch: world %d x max_duration %g s x accum %d = %g s of audio per update "
                "(paper Base: 32 x 87.5 s = 2800 s); %.2fM parameters; device %s; bf16 %s",
                d.world, cfg.data.max_duration, o.accum_grad, eff, nparams / 1e6, self.device, self.bf16,
            )

    # ------------------------------------------------------------------------------------------ setup
    def _add_file_log(self) -> None:
        path = (self.exp / "train.log").resolve()
        root = logging.getLogger()
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
            h = logging.FileHandler(path)
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(h)
            self._log_handler = h
            if root.level > logging.INFO or root.level == logging.NOTSET:
                root.setLevel(logging.INFO)

    def _setup_data(self) -> None:
        cfg, d = self.cfg, self.dist
        dc = cfg.data
        if not dc.train:
            raise ValueError("data.train is not set (a data dir with cuts.jsonl.gz or Kaldi files)")
        if not dc.train_labels:
            raise ValueError("data.train_labels is empty (one label dir per label set)")
        frame_rate = float(self.encoder.frame_rate)
        ds_rate = int(self.encoder.downsample_rate)
        num_frames = _model_num_frames(self.model)

        def cuts_of(data_dir: str, name: str):
            if d.is_main:
                load_cuts(data_dir, self.exp / "data" / name)  # builds manifests once (rank 0)
            _barrier(d)
            return load_cuts(data_dir, self.exp / "data" / name)

        train_cuts = cuts_of(dc.train, "train")
        self.train_labels = load_label_sets(dc.train_labels)
        keep, hours = check_cuts_and_labels(train_cuts, self.train_labels, min_duration=dc.crop_min, where=dc.train)
        self.train_hours = hours
        self.sampler = ResumableBatchSampler(
            train_cuts, max_duration=dc.max_duration, crop_max=dc.crop_max, num_buckets=dc.num_buckets,
            seed=cfg.seed, shuffle=True, drop_last=True, world_size=d.world, rank=d.rank, keep_ids=set(keep),
        )
        self.train_set = PretrainDataset(
            self.train_labels, frame_rate=frame_rate, downsample_rate=ds_rate, num_frames=num_frames,
            crop_max=dc.crop_max, seed=cfg.seed, pad_audio=dc.pad_audio, random_crop=True,
        )
        self.train_loader = self._loader(self.train_set, self.sampler)
        log.info("train: %s, %d utterances, %.2f h", dc.train, len(keep), hours)

        self.dev_loader = None
        if dc.dev:
            dev_labels_dirs = dc.dev_labels
            if len(dev_labels_dirs) != len(dc.train_labels):
                raise ValueError(
                    f"data.dev_labels lists {len(dev_labels_dirs)} label dir(s), data.train_labels "
                    f"{len(dc.train_labels)}: give one dev label dir per label set"
                )
            dev_cuts = cuts_of(dc.dev, "dev")
            dev_labels = load_label_sets(dev_labels_dirs)
            for tr, dv in zip(self.train_labels, dev_labels):
                if tr.k != dv.k or tr.label_rate != dv.label_rate:
                    raise ValueError(
                        f"dev labels {dv.label_dir} (k={dv.k}, {dv.label_rate} Hz) do not match train labels "
                        f"{tr.label_dir} (k={tr.k}, {tr.label_rate} Hz)"
                    )
            dkeep, dhours = check_cuts_and_labels(dev_cuts, dev_labels, min_duration=dc.crop_min, where=dc.dev)
            self.dev_sampler = ResumableBatchSampler(
                dev_cuts, max_duration=dc.valid_max_duration or dc.max_duration, crop_max=dc.crop_max,
                num_buckets=min(dc.num_buckets, 10), seed=cfg.seed, shuffle=False, drop_last=False,
                world_size=d.world, rank=d.rank, keep_ids=set(dkeep),
            )
            dev_set = PretrainDataset(
                dev_labels, frame_rate=frame_rate, downsample_rate=ds_rate, num_frames=num_frames,
                crop_max=dc.crop_max, seed=cfg.seed, pad_audio=dc.pad_audio, random_crop=True,
            )
            self.dev_loader = self._loader(dev_set, self.dev_sampler)
            log.info("dev: %s, %d utterances, %.2f h", dc.dev, len(dkeep), dhours)
        for ls in self.train_labels:
            log.info("labels %s: k=%d at %g Hz (model %g Hz)", ls.label_dir, ls.k, ls.label_rate, frame_rate)

    def _loader(self, dataset, sampler):
        nw = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            dataset, sampler=sampler, batch_size=None, collate_fn=collate_identity, num_workers=nw,
            worker_init_fn=_worker_init if nw > 0 else None, prefetch_factor=2 if nw > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------------------------------------ batches
    def _train_batches(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, starting at the sampler's saved position."""
        while True:
            start_skip = self.sampler.batches_done
            got = False
            for batch in self.train_loader:
                got = True
                yield batch
            if not got and start_skip == 0:
                raise RuntimeError(
                    f"{self.cfg.data.train}: an epoch produced no full batch. Batches are dropped when a duration "
                    f"bucket runs out before reaching data.max_duration={self.cfg.data.max_duration} s (lhotse "
                    f"drop_last), so a small corpus needs fewer buckets: lower data.num_buckets "
                    f"(now {self.cfg.data.num_buckets}) or data.max_duration; {self.dist.world} process(es)"
                )
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        nb = self.device.type == "cuda"
        return (
            batch["wavs"].to(self.device, non_blocking=nb),
            batch["wav_lens"].to(self.device, non_blocking=nb),
            [lb.to(self.device, non_blocking=nb) for lb in batch["labels"]],
        )

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg, o, d = self.cfg, self.cfg.optim, self.dist
        writer = None
        if d.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.exp / "tensorboard"))
        self._install_signal_handlers()
        bar = None
        if d.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=o.max_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0)
        batches = self._train_batches()
        window: dict[str, float] = {}
        window_n = 0
        window_audio = 0.0
        window_t0 = time.monotonic()
        last_saved = self.step if self._resumed else -1
        stop_reason = "max_steps"
        t_prev = time.monotonic()
        if o.max_minutes is not None and self.elapsed_s >= o.max_minutes * 60.0:
            # budget spent by the runs this one resumes (elapsed_s is restored identically on every rank)
            if d.is_main:
                log.info("optim.max_minutes=%g already spent (%.1f min); nothing to do", o.max_minutes,
                         self.elapsed_s / 60)
            stop_reason = "max_minutes"
            o_steps = self.step  # skip the loop
        else:
            o_steps = o.max_steps
        try:
            while self.step < o_steps:
                lr = lr_at(self.step + 1, peak_lr=o.lr, warmup_steps=o.warmup_steps, max_steps=o.max_steps,
                           end_lr=o.end_lr, power=o.power)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.model.train()
                logs, audio_s, ids = self._accumulate(batches)
                params = [p for p in self.model.parameters() if p.grad is not None]
                max_norm = o.clip_norm if o.clip_norm > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
                gnorm_f = float(gnorm)
                if not math.isfinite(gnorm_f):
                    self.bad_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    log.warning(
                        "update %d: non-finite gradient norm (%s); step skipped (%d of at most %d). Batch "
                        "utterances on rank %d: %s", self.step + 1, gnorm_f, self.bad_steps, o.max_bad_steps,
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
                else:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    for k, v in logs.items():
                        window[k] = window.get(k, 0.0) + v
                    window["grad_norm"] = window.get("grad_norm", 0.0) + gnorm_f
                    window_n += 1
                    window_audio += audio_s
                    if bar is not None:
                        bar.update(1)
                now = time.monotonic()
                self.elapsed_s += now - t_prev
                t_prev = now

                # ---- collective decisions: time budget, signals
                over_budget = o.max_minutes is not None and self.elapsed_s >= o.max_minutes * 60.0
                flag = torch.tensor([1.0 if over_budget else 0.0, 1.0 if self._stop_signal else 0.0])
                flag = _all_reduce(flag, d, dist.ReduceOp.MAX if d.enabled else None)
                stop = None
                if flag[1] > 0:
                    stop = "signal"
                elif flag[0] > 0:
                    stop = "max_minutes"

                is_last = stop is not None or self.step >= o.max_steps
                if window_n and (self.step % cfg.log_every == 0 or is_last):
                    stats = self._reduce_window(window, window_n, window_audio, time.monotonic() - window_t0)
                    stats["lr"] = lr
                    self._log_train(stats, writer, bar)
                    window, window_n, window_audio, window_t0 = {}, 0, 0.0, time.monotonic()
                did_valid = None
                if self.dev_loader is not None and self.step > 0 and (self.step % cfg.valid_every == 0 or is_last):
                    if self.step != getattr(self, "_last_valid_step", None):
                        did_valid = self.validate(writer)
                if self.step > 0 and (self.step % cfg.ckpt.every_steps == 0 or is_last) and self.step != last_saved:
                    self.save_checkpoint(valid=did_valid)
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
            self._restore_signal_handlers()
        if d.is_main:
            log.info("stopped at update %d (%s) after %.1f min of training", self.step, stop_reason, self.elapsed_s / 60)
        return {
            "step": self.step, "stop_reason": stop_reason, "bad_steps": self.bad_steps,
            "best_metric": self.best_metric, "best_step": self.best_step, "elapsed_s": self.elapsed_s,
        }

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
        for micro in range(o.accum_grad):
            batch = next(batches)
            self.sampler.mark_consumed(batch["epoch"], batch["index"])
            # dropout and masks from (seed, update, attempt, global micro-batch index): see module docstring
            _seed_all(_derived_seed(self.cfg.seed, self.step, self.bad_steps, micro * d.world + d.rank))
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
            n = _all_reduce(torch.tensor([total_size], dtype=torch.float64), d)
            scale = d.world / max(float(n[0]), 1.0)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        return {k: v / o.accum_grad for k, v in sums.items()}, audio, ids

    def _reduce_window(self, window: dict[str, float], n: int, audio: float, seconds: float) -> dict[str, float]:
        keys = sorted(window)
        t = torch.tensor([window[k] / n for k in keys] + [audio], dtype=torch.float64)
        t = _all_reduce(t, self.dist)
        vals = (t[:-1] / self.dist.world).tolist()
        stats = dict(zip(keys, vals))
        stats["audio_sec_per_sec"] = float(t[-1]) / max(seconds, 1e-9)
        return stats

    def _log_train(self, stats: dict[str, float], writer, bar) -> None:
        if not self.dist.is_main:
            return
        for k, v in stats.items():
            writer.add_scalar(f"train/{k}", v, self.step)
        acc = [v for k, v in stats.items() if k.startswith("acc_m")]
        short = {"loss": f"{stats.get('loss', float('nan')):.3f}", "lr": f"{stats['lr']:.2e}",
                 "aps": f"{stats['audio_sec_per_sec']:.0f}"}
        if acc:
            short["acc_m"] = f"{sum(acc) / len(acc):.3f}"
        if bar is not None:
            bar.set_postfix(short, refresh=False)
        log.info("update %d: %s", self.step, " ".join(f"{k}={_fmt(v)}" for k, v in stats.items()))

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, writer=None) -> dict[str, float]:
        """Loss and accuracies on the dev set, weighted by utterances; same masks every time (fixed seed).
        On rank 0, also the collapse watch (``rank_L{i}``, ``std_L{i}``; see ``train/collapse.py``)."""
        self._last_valid_step = self.step
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0.0
        with st.preserved_rng(_derived_seed(self.cfg.seed, 0xDE5)):
            for batch in self.dev_loader:
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
        keys = sorted(sums)
        if self.dist.enabled:
            # ranks may see different key sets only if one had no batch; agree on rank 0's keys
            obj = [keys]
            dist.broadcast_object_list(obj, src=0)
            keys = obj[0]
        t = torch.tensor([sums.get(k, 0.0) for k in keys] + [count], dtype=torch.float64)
        t = _all_reduce(t, self.dist)
        n = max(float(t[-1]), 1.0)
        stats = {k: float(v) / n for k, v in zip(keys, t[:-1].tolist())}
        if self.dist.is_main:
            if writer is not None:
                for k, v in stats.items():
                    writer.add_scalar(f"valid/{k}", v, self.step)
            log.info("valid at update %d (%d utts): %s", self.step, int(n),
                     " ".join(f"{k}={_fmt(v)}" for k, v in stats.items()))
            if self.collapse_watch is not None:  # rank 0 only: rank_L{i}, std_L{i} join rank 0's stats
                stats.update(self.collapse_watch.check(self.encoder, self.step, writer))
        return stats

    def _metric(self, valid: dict[str, float]) -> tuple[float, bool]:
        """(value, higher_is_better) of the best-checkpoint criterion."""
        acc = [v for k, v in valid.items() if k.startswith("acc_m")]
        if self.cfg.ckpt.best_by == "acc" and acc:
            return sum(acc) / len(acc), True
        return valid["loss"], False

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, valid: dict[str, float] | None = None) -> Path:
        """Write EXP/checkpoints/step-N (all ranks call; rank 0 writes), update EXP/best, prune old ones."""
        from speechssl.models.checkpoint import save_model

        d = self.dist
        name = st.step_dir_name(self.step)
        final = self.ckpt_root / name
        tmp = self.ckpt_root / f".tmp-{name}"
        rng = get_rng_all(d)
        improved = False
        if valid is not None:
            value, higher = self._metric(valid)
            if self.best_metric is None or (value > self.best_metric if higher else value < self.best_metric):
                self.best_metric, self.best_step, improved = value, self.step, True
        elif self.dev_loader is None:
            improved = True  # no dev set: "best" is the latest model
        if d.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            extra = {"step": self.step, "epoch": self.sampler.epoch, "kind": "hubert_pretrain",
                     "labels": [ls.meta for ls in self.train_labels]}
            save_model(self.model, self.cfg.model, tmp, extra=extra)
            st.save_bundle(tmp, "train_state", self._train_state())
            st.save_bundle(tmp, "rng", {"ranks": rng})
            if self.collapse_watch is not None:
                self.collapse_watch.save(tmp)  # the update-0 reference travels with the checkpoint
            st.mark_complete(tmp, {"step": self.step, "world_size": d.world, "time": time.time()})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.ckpt_root)
            st.prune_checkpoints(self.ckpt_root, self.cfg.ckpt.keep_last)
            if improved:
                self._update_best(final, valid)
            log.info("saved %s%s", final, " (new best)" if improved and valid is not None else "")
        _barrier(d)
        return final

    def _update_best(self, ckpt: Path, valid: dict[str, float] | None) -> None:
        """EXP/best = the current model (save_model replaces the directory atomically); ``extra`` in its
        config.json records the step, the criterion and the validation numbers."""
        from speechssl.models.checkpoint import save_model

        extra = {"step": self.step, "checkpoint": str(ckpt), "best_by": self.cfg.ckpt.best_by,
                 "metric": self.best_metric, "valid": valid, "kind": "hubert_pretrain",
                 "labels": [ls.meta for ls in self.train_labels]}
        save_model(self.model, self.cfg.model, self.exp / "best", extra=json.loads(json.dumps(extra)))

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

    def _resolve_resume(self, resume: str | None) -> Path | None:
        self._resumed = False
        if resume is None or resume == "":
            return None
        if resume == "auto":
            latest = st.find_latest_checkpoint(self.ckpt_root)
            if latest is None:
                if self.dist.is_main:
                    log.info("--resume auto: no complete checkpoint in %s; starting from scratch", self.ckpt_root)
                return None
            return latest
        p = Path(resume)
        if not p.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
        if not st.is_complete(p):
            raise ValueError(f"--resume {resume}: checkpoint is incomplete (no {st.COMPLETE} marker); "
                             "it was interrupted while being written")
        return p

    def _load_checkpoint(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        d = self.dist
        cfg_json = ckpt / "config.json"
        saved_model_cfg = json.loads(cfg_json.read_text()) if cfg_json.is_file() else None
        if saved_model_cfg is not None:
            saved_model_cfg = saved_model_cfg.get("model", saved_model_cfg)
            mine = to_dict(self.cfg.model)
            diff = sorted(k for k in mine if k in saved_model_cfg and _norm(saved_model_cfg[k]) != _norm(mine[k]))
            if diff:
                raise ValueError(
                    f"{ckpt}: model config differs from the checkpoint's in {diff}; resume with the same model.* "
                    "settings (or start a new exp_dir and use ckpt.init_from)"
                )
        weights = load_file(str(ckpt / "model.safetensors"), device="cpu")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"{ckpt}/model.safetensors: missing {missing[:5]}, unexpected {unexpected[:5]} parameters")
        ts = st.load_bundle(ckpt, "train_state")
        self.optimizer.load_state_dict(ts["optimizer"])
        self.step = int(ts["step"])
        self.bad_steps = int(ts["bad_steps"])
        self.best_metric = ts["best_metric"]
        self.best_step = ts["best_step"]
        self.elapsed_s = float(ts["elapsed_s"])
        sampler_state = dict(ts["sampler"])
        old_world = int(ts["world_size"])
        if old_world != d.world:
            # lhotse hands every rank one batch in turn: old_world * done batches of the stream are consumed.
            done = int(sampler_state["batches_done"])
            sampler_state["batches_done"] = old_world * done // d.world
            log.warning("resuming with %d process(es) instead of %d: the data order differs from the "
                        "uninterrupted run (continuing at batch %d of epoch %d)", d.world, old_world,
                        sampler_state["batches_done"], sampler_state["epoch"])
        if (old_world * int(ts["accum_grad"]) * float(ts["max_duration"])
                != d.world * self.cfg.optim.accum_grad * self.cfg.data.max_duration):
            log.warning("the effective batch changed on resume (was %d x %g s x %d)", old_world,
                        float(ts["max_duration"]), int(ts["accum_grad"]))
        self.sampler.load_state_dict(sampler_state)
        rng = st.load_bundle(ckpt, "rng")["ranks"]
        if d.rank < len(rng):
            st.set_rng_state(rng[d.rank])
        self._resumed = True
        if d.is_main:
            log.info("resumed from %s at update %d (epoch %d, batch %d)", ckpt, self.step,
                     self.sampler.epoch, self.sampler.batches_done)

    def _init_from(self, path: str) -> None:
        """Encoder weights (``hubert.*``) of an earlier checkpoint for a new run; they must match exactly.

        The head (``final_proj``, label embeddings) is never copied: the next iteration's labels are a new unit
        inventory (unit 7 of the MFCC k-means has nothing to do with unit 7 of a hidden-layer k-means), so the
        old embeddings would only be a misleading start. Continuing with the same labels is ``--resume``.
        """
        from safetensors.torch import load_file

        f = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
        if not f.is_file():
            raise FileNotFoundError(f"ckpt.init_from: {f} not found")
        weights = load_file(str(f), device="cpu")
        own = self.model.state_dict()
        load = {}
        for name, t in weights.items():
            if not name.startswith("hubert."):
                continue
            if name not in own:
                raise ValueError(f"ckpt.init_from {f}: parameter {name} does not exist in this model")
            if own[name].shape != t.shape:
                raise ValueError(f"ckpt.init_from {f}: {name} has shape {tuple(t.shape)}, the model "
                                 f"{tuple(own[name].shape)}; model.* must match the encoder you start from")
            load[name] = t
        missing_enc = [n for n in own if n.startswith("hubert.") and n not in load]
        if missing_enc:
            raise ValueError(f"ckpt.init_from {f}: encoder parameters missing: {missing_enc[:5]}")
        self.model.load_state_dict(load, strict=False)
        if self.dist.is_main:
            log.info("initialised the encoder from %s (%d tensors; the head starts fresh)", f, len(load))

    # ------------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._stop_signal = signum
            log.warning("signal %d: saving a checkpoint and stopping after this update", signum)

        for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if s is not None:
                self._old_handlers[s] = signal.signal(s, handler)

    def _restore_signal_handlers(self) -> None:
        for s, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(s, h)

    def close(self) -> None:
        h = getattr(self, "_log_handler", None)
        if h is not None:
            logging.getLogger().removeHandler(h)
            h.close()
        if self.dist.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))


def get_rng_all(d: _Dist) -> list[dict]:
    """RNG states of every rank, gathered to every rank (rank order)."""
    mine = st.get_rng_state()
    if not d.enabled:
        return [mine]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


# ============================================================================================== entry point
def pretrain(cfg: PretrainConfig, resume: str | None = None, *, model: nn.Module | None = None) -> dict:
    """Run (or resume) pretraining; returns a summary dict (step, stop_reason, best metric, ...)."""
    trainer = Trainer(cfg, resume=resume, model=model)
    try:
        return trainer.train()
    finally:
        trainer.close()
