"""HuBERT models: frontends, transformer encoder (also wav2vec 2.0 and WavLM), masked-unit pretraining head,
checkpoint IO, transformers directories in and out (no transformers import).

Floor 4: imports torch and, for the fbank frontend, ``speechssl.features`` only.
"""

from .checkpoint import load_model, save_model
from .config import HubertConfig, hubert_base, hubert_large, hubert_tiny, hubert_xlarge
from .hf import export_hf, load_hf_dir
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
    "load_hf_dir",
    "load_model",
    "save_model",
]
