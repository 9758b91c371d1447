"""HuBERT models: frontends, transformer encoder, masked-unit pretraining head, checkpoint IO.

Floor 4: imports torch and, for the fbank frontend, ``speechssl.features`` only.
"""

from .checkpoint import export_hf, load_model, save_model
from .config import HubertConfig, hubert_base, hubert_large, hubert_tiny, hubert_xlarge
from .hubert import HubertModel, HubertPretrainModel
from .masking import compute_mask_indices

__all__ = [
    "HubertConfig",
    "HubertModel",
    "HubertPretrainModel",
    "compute_mask_indices",
    "export_hf",
    "hubert_base",
    "hubert_large",
    "hubert_tiny",
    "hubert_xlarge",
    "load_model",
    "save_model",
]
