"""SUPERB run settings: typed dataclasses with SUPERB's per-task defaults (s3prl ``downstream/*/config.yaml``).

``default_config(task)`` gives the published protocol's head and optimiser for ``task``; a YAML file
(``egs/*/superb/conf/<task>.yaml``) and dotted ``key=value`` overrides change it (:func:`load_superb_config`).
s3prl counts batches in utterances; here a step takes ``optim.max_duration`` seconds of padded audio, set to
s3prl's batch size times the corpus' typical utterance length (LibriSpeech ~12.3 s, Speech Commands 1 s,
VoxCeleb1 ~8 s, IEMOCAP ~4.5 s, FSC ~2.3 s).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from speechssl.config import apply_override, from_dict, read_yaml, to_dict
from speechssl.errors import UserError

__all__ = ["TASKS", "TASK_HELP", "FeaturizerConfig", "HeadConfig", "OptimConfig", "SuperbConfig", "default_config",
           "load_superb_config"]

TASK_HELP = {
    "pr": "phoneme recognition: frame-wise linear + CTC over phones (utt2phones, or phones.ctm without sil); PER",
    "asr": "speech recognition: 2-layer BiLSTM + CTC over characters (text; '|' = word boundary); greedy; WER",
    "ks": "keyword spotting: mean-pool + linear over utt2kw classes ('-' = not in the task); accuracy",
    "sid": "speaker identification: mean-pool + linear over utt2spk speakers; accuracy",
    "asv": "speaker verification: x-vector + AM-softmax on train utt2spk; cosine scores on a trials file; EER, minDCF",
    "er": "emotion recognition: mean-pool + linear over utt2emo, 5 folds by utt2session; accuracy",
    "ic": "intent classification: mean-pool + 3 linear heads over utt2intent 'action object location'; accuracy "
          "(all three right)",
    "qbe": "query-by-example spoken term detection: subsequence DTW (cosine) of each query in each document per "
           "layer, no training; the layer picked on dev; MTWV (and ATWV) with QUESST 2014's costs",
    "sd": "speaker diarization: LSTM + linear per frame, permutation-invariant BCE over the speakers of rttm; DER",
    "sf": "slot filling: BiLSTM + CTC over characters and B-/E- slot tags (utt2slots: the transcript with "
          "<type> ... </type>); slot-type F1, slot-value CER",
}
TASKS = tuple(TASK_HELP)


@dataclass
class FeaturizerConfig:
    kind: Literal["weighted_sum", "conv"] = "weighted_sum"   # conv: hierarchical conv over layers (Shih & Harwath)
    layer_norm: bool = False                                  # s3prl `layer_norm`: F.layer_norm per layer first
    layers: str = "all"                                       # "all" or "0,3,6"


@dataclass
class HeadConfig:
    proj_dim: int = 256          # linear projector before every head (s3prl project_dim / projector_dim); 0: none
    hidden: int = 1024           # asr: LSTM units per direction
    num_layers: int = 2          # asr: BiLSTM layers
    dropout: float = 0.2         # asr: between and after the LSTMs
    downsample: int = 1          # asr, sf: concatenate k consecutive frames before the LSTMs (s3prl sample_rate);
                                 # sf: 0 = to 50 Hz whatever the upstream's rate (fbank in pairs)
    tdnn: list[list[int]] = field(default_factory=lambda: [[512, 5, 1], [512, 3, 2], [512, 3, 3], [512, 1, 1],
                                                           [1500, 1, 1]])  # asv: (channels, kernel, dilation)
    emb_dim: int = 512           # asv: x-vector size
    am_s: float = 30.0           # asv: AM-softmax scale
    am_m: float = 0.4            # asv: AM-softmax margin
    median_filter: float = 0.0   # sd: seconds of median filter over each speaker's 0/1 activity before scoring
                                 # (s3prl score.sh: 11 frames at 10 ms); 0: none
    units: Literal["char", "bpe"] = "char"   # asr: output units (bpe: sentencepiece unigram on the train text)
    bpe_vocab: int = 300         # asr: sentencepiece vocabulary size


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4             # --lr-sweep overrides it with each value in turn
    weight_decay: float = 0.0
    max_steps: int = 200000
    max_duration: float = 400.0  # seconds of padded audio per step
    eval_max_duration: float = 400.0
    num_buckets: int = 10        # duration buckets of the training sampler
    grad_clip: float = 1.0
    eval_every: int = 1000       # dev evaluation (and best-head selection) every N steps, and at the end
    save_every: int = 1000       # resumable checkpoint every N steps, and at the end
    log_every: int = 100

    def __post_init__(self) -> None:
        bad = [f"optim.{k} must be {rule}, got {getattr(self, k)!r}" for k, ok, rule in (
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_steps", self.max_steps >= 0, ">= 0"), ("max_duration", self.max_duration > 0, "> 0 seconds"),
            ("eval_max_duration", self.eval_max_duration > 0, "> 0 seconds"),
            ("num_buckets", self.num_buckets >= 1, ">= 1"), ("grad_clip", self.grad_clip >= 0, ">= 0 (0: off)"),
            ("eval_every", self.eval_every >= 1, ">= 1 step"), ("save_every", self.save_every >= 1, ">= 1 step"),
            ("log_every", self.log_every >= 1, ">= 1 step")) if not ok]
        if bad:
            raise UserError("; ".join(bad))


@dataclass
class SuperbConfig:
    task: str = "pr"
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    folds: int = 5               # er: sessions held out in turn (folds = first N sessions, C-sorted)
    dev_frac: float = 0.2        # er: share of the training sessions' utterances held out as dev (s3prl: 0.2)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"task {self.task!r}: choose from {', '.join(TASKS)}")
        if self.folds < 1 or not 0 < self.dev_frac < 1:
            raise UserError(f"need folds >= 1 and 0 < dev_frac < 1, got folds={self.folds} dev_frac={self.dev_frac}")


# SUPERB (s3prl) defaults per task: (optim overrides, head overrides)
_DEFAULTS: dict[str, tuple[dict, dict]] = {
    "pr": ({"lr": 1e-2, "max_steps": 100000, "max_duration": 400.0}, {"proj_dim": 256}),       # batch 16 x accum 2
    "asr": ({"lr": 1e-4, "max_steps": 200000, "max_duration": 400.0}, {"proj_dim": 1024}),     # batch 32
    "ks": ({"lr": 1e-4, "max_steps": 200000, "max_duration": 32.0}, {"proj_dim": 256}),        # batch 32 x 1 s
    "sid": ({"lr": 1e-4, "max_steps": 200000, "max_duration": 256.0}, {"proj_dim": 256}),      # batch 8 x accum 4
    "asv": ({"optimizer": "adamw", "lr": 1e-4, "max_steps": 200000, "max_duration": 400.0}, {"proj_dim": 512}),
    "er": ({"lr": 1e-4, "max_steps": 30000, "max_duration": 144.0}, {"proj_dim": 256}),        # batch 4 x accum 8
    "ic": ({"lr": 1e-4, "max_steps": 200000, "max_duration": 75.0}, {"proj_dim": 256}),        # batch 32
    "qbe": ({"max_steps": 0}, {}),                                                             # no training
    "sd": ({"lr": 1e-4, "max_steps": 30000, "max_duration": 640.0, "eval_every": 500, "save_every": 500},
           {"proj_dim": 0, "hidden": 512, "num_layers": 1}),   # 8 chunks of 20 s x accum 4; LSTM 512, no projector
    "sf": ({"lr": 1e-4, "max_steps": 200000, "max_duration": 100.0}, {"proj_dim": 1024}),     # batch 32 x ~3 s
}


def default_config(task: str) -> SuperbConfig:
    """SUPERB's protocol for ``task`` (see ``_DEFAULTS`` and REFERENCE.md)."""
    cfg = SuperbConfig(task=task)
    optim, head = _DEFAULTS[task]
    cfg.optim = dataclasses.replace(cfg.optim, **optim)
    cfg.head = dataclasses.replace(cfg.head, **head)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_superb_config(task: str, path: str | Path | None = None,
                       overrides: list[str] | tuple[str, ...] = ()) -> SuperbConfig:
    """``default_config(task)``, then the YAML file (any subset of the keys), then ``key=value`` overrides."""
    if task not in TASKS:
        raise UserError(f"task {task!r}: choose from {', '.join(TASKS)}")
    data = to_dict(default_config(task))
    if path is not None:
        over = read_yaml(path) or {}
        if over.get("task", task) != task:
            raise UserError(f"{path}: task {over['task']!r} does not match --task {task}")
        data = _merge(data, over)
    cfg = from_dict(SuperbConfig, data, _source=str(path) if path else None)
    for ov in overrides:
        apply_override(cfg, ov)
    return from_dict(SuperbConfig, to_dict(cfg), _source="merged config")
