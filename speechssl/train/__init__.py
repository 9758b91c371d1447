"""Masked-unit pretraining: config dataclasses, the trainer, data pipeline, checkpoint state.

    from speechssl.config import load_config
    from speechssl.train import PretrainConfig, pretrain
    pretrain(load_config(PretrainConfig, "conf/pretrain_iter1.yaml", ["optim.max_steps=1000"]), resume="auto")
"""

from speechssl.train.collapse import CollapseWatch, mean_std, rankme
from speechssl.train.trainer import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    Trainer,
    TrainingAborted,
    bf16_supported,
    pretrain,
)

__all__ = [
    "CheckpointConfig",
    "CollapseWatch",
    "DataConfig",
    "OptimConfig",
    "PretrainConfig",
    "Trainer",
    "TrainingAborted",
    "bf16_supported",
    "mean_std",
    "pretrain",
    "rankme",
]
