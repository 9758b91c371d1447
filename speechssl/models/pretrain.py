"""The pretraining objectives: one model class each, one switch (``model.objective``), one trainer.

=========  =================================  ===================================  ==================================
objective  class                              targets                              loss
=========  =================================  ===================================  ==================================
hubert     :class:`HubertPretrainModel`       k-means units (label dirs)           masked (+ unmasked) unit CE
wav2vec2   :class:`Wav2Vec2PretrainModel`     a learned Gumbel product quantizer   contrastive (K distractors) +
                                              of the frontend features             diversity + feature penalty
bestrq     :class:`BestRQPretrainModel`       a frozen random-projection quantizer masked code CE
                                              of stacked normalised fbank
=========  =================================  ===================================  ==================================

Every class holds its encoder as ``.hubert`` (a :class:`HubertModel`: the frontend, masking, encoder and upstream
are shared) and follows the trainer's contract: ``forward(wavs, wav_lens, labels) -> {"loss", "sample_size", "mask",
"logs"}`` (``labels`` empty for wav2vec2 and bestrq) and ``collapse_warnings(valid_stats) -> [lines]`` (the
objective's own collapse signs, beside the RankMe watch of ``train/collapse.py``).
"""

from __future__ import annotations

from torch import nn

from .bestrq import BestRQPretrainModel
from .config import HubertConfig
from .hubert import HubertPretrainModel
from .wav2vec2 import Wav2Vec2PretrainModel

__all__ = ["PRETRAIN_MODELS", "PRETRAIN_CLASSES", "build_pretrain_model", "uses_labels"]

PRETRAIN_MODELS: dict[str, type[nn.Module]] = {
    "hubert": HubertPretrainModel,
    "wav2vec2": Wav2Vec2PretrainModel,
    "bestrq": BestRQPretrainModel,
}
PRETRAIN_CLASSES = tuple(PRETRAIN_MODELS.values())


def build_pretrain_model(config: HubertConfig) -> nn.Module:
    """The pretraining model of ``config.objective``, freshly initialised."""
    return PRETRAIN_MODELS[config.objective](config)


def uses_labels(config: HubertConfig) -> bool:
    """Whether the objective reads unit label dirs (HuBERT) or makes its own targets (wav2vec 2.0, BEST-RQ)."""
    return config.objective == "hubert"
