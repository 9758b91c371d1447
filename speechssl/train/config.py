"""Configuration of a pretraining run: typed dataclasses, read from YAML with dotted overrides
(``speechssl.config.load_config(PretrainConfig, "conf/pretrain_iter1.yaml", ["optim.lr=1e-3"])``).

Sections: ``model`` (:class:`speechssl.models.config.HubertConfig`), ``data``, ``optim``, ``ckpt``; the top level
holds the experiment dir, seed, device, logging and validation cadence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from speechssl.errors import UserError
from speechssl.models.config import HubertConfig

__all__ = ["DataConfig", "OptimConfig", "CheckpointConfig", "PretrainConfig", "split_batch"]


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
            raise UserError("need max_duration > 0, crop_min >= 0, crop_max > 0")
        if self.crop_max < self.crop_min:
            raise UserError(f"crop_max {self.crop_max} < crop_min {self.crop_min}")
        if self.num_buckets < 1 or self.num_workers < 0:
            raise UserError("need num_buckets >= 1 and num_workers >= 0")


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
    # seconds of audio per update over all processes (the paper's Base: 32 GPUs x 87.5 s = 2800). When set, the
    # trainer derives accum_grad and data.max_duration from the world size: accum_grad = ceil(batch_seconds /
    # (world x data.max_duration)), data.max_duration = batch_seconds / (world x accum_grad), so the update is the
    # same on 8 GPUs or 64 (data.max_duration is then the most one process holds per micro-batch)
    batch_seconds: float | None = None
    bf16: bool | None = None  # None: on where supported (CUDA bf16, CPU with AMX / AVX512-BF16)
    max_bad_steps: int = 20  # non-finite gradient steps are skipped; abort after this many

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.warmup_steps < 0 or self.accum_grad < 1:
            raise UserError("need max_steps >= 1, warmup_steps >= 0, accum_grad >= 1")
        if self.lr <= 0 or self.clip_norm < 0 or self.max_bad_steps < 0:
            raise UserError("need lr > 0, clip_norm >= 0, max_bad_steps >= 0")
        if self.batch_seconds is not None and not self.batch_seconds > 0:
            raise UserError(f"optim.batch_seconds must be > 0 seconds (or null), got {self.batch_seconds}")
        if self.batch_seconds is not None and self.accum_grad != 1:
            raise UserError(f"optim.batch_seconds={self.batch_seconds:g} derives optim.accum_grad from the number of "
                            f"processes; leave accum_grad at 1 (got {self.accum_grad}) or set batch_seconds=null")


@dataclass
class CheckpointConfig:
    every_steps: int = 5000
    keep_last: int = 3  # step checkpoints kept (the best model is kept separately in EXP/best)
    best_by: Literal["acc", "loss"] = "acc"  # valid masked accuracy (mean over label sets) or valid loss
    # checkpoint whose encoder initialises a new run (the head starts fresh): a speechssl or transformers
    # HuBERT / wav2vec 2.0 directory, or a fairseq / s3prl .pt (with trust_pickle); model.* must match its
    # architecture (train/checkpoints.py: init_encoder)
    init_from: str | None = None
    trust_pickle: bool = False  # let init_from unpickle a fairseq / s3prl .pt (`speechssl pretrain --trust-pickle`)

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise UserError("need every_steps >= 1 and keep_last >= 1")


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
            raise UserError("need log_every >= 1 and valid_every >= 1")
        if self.collapse_watch_frames < 0:
            raise UserError(f"collapse_watch_frames must be >= 0 (0: off), got {self.collapse_watch_frames}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")


def split_batch(batch_seconds: float, world: int, max_duration: float) -> tuple[int, float]:
    """``(accum_grad, max_duration)`` that make ``world x max_duration x accum_grad == batch_seconds`` with the
    fewest micro-batches whose ``max_duration`` stays within the given one (``optim.batch_seconds``)."""
    accum = max(1, math.ceil(batch_seconds / (world * max_duration) - 1e-9))
    return accum, batch_seconds / (world * accum)
