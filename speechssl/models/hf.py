"""transformers directories in and out, without importing transformers: HuBERT, wav2vec 2.0 and WavLM encoders.

A transformers directory holds ``config.json`` (``model_type`` "hubert" | "wav2vec2" | "wavlm" and that model's
config fields), the weights (``model.safetensors``, else ``pytorch_model.bin``; either may be sharded with an
``*.index.json``) and, from a processor, ``preprocessor_config.json`` (``do_normalize``: per-utterance waveform
normalisation, our ``normalize_waveform``). The encoders are ours (:class:`~speechssl.models.hubert.HubertModel`
with ``config.model_type``), whose parameter names are transformers' base-model names, so reading is a key check
and writing is a copy:

* :func:`read_hf_config`: ``config.json`` (+ ``preprocessor_config.json``) -> :class:`HubertConfig`. Missing keys
  take transformers' defaults; options our modules do not implement (``conv_pos_batch_norm``, an activation
  other than GELU, adapters, ``layer_norm_eps`` != 1e-5, ...) are refused with a :class:`UserError` naming the
  file and key, never approximated.
* :func:`read_hf_state_dict`: the weights under our names: the base-model prefix of ``*ForCTC`` /
  ``*ForPreTraining`` / ``*ForSequenceClassification`` ... directories (``hubert.``, ``wav2vec2.``, ``wavlm.``)
  stripped and their heads (``lm_head``, ``quantizer``, ``project_q``, ``projector``, ...) dropped with a log
  line; weight norm stored as ``weight_g/weight_v`` (transformers 4.x) renamed to
  ``parametrizations.weight.original0/1``. ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``.
* :func:`load_hf_dir`: both, strict key and shape check, eval mode. ``masked_spec_embed`` is the one tensor a
  directory may lack (transformers omits it when ``mask_time_prob`` and ``mask_feature_prob`` are 0; only
  pretraining uses it): the model keeps its initial value.
* :func:`export_hf` / :func:`hf_config_dict`: write a directory ``transformers.AutoModel.from_pretrained`` loads
  as ``HubertModel`` / ``Wav2Vec2Model`` / ``WavLMModel`` (waveform-CNN frontend only), atomically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from speechssl.errors import MissingInputError, UserError

from .checkpoint import FORMAT, _load_strict, _state_dict, _write_dir_atomic, load_model
from .config import MODEL_TYPES, HubertConfig
from .hubert import HubertModel, HubertPretrainModel

__all__ = ["read_hf_config", "read_hf_state_dict", "load_hf_dir", "hf_config_dict", "export_hf", "ARCHITECTURES"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
ARCHITECTURES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel"}
BASE_PREFIXES = ("hubert.", "wav2vec2.", "wavlm.")  # base_model_prefix of the *For... models
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_NORM_OLD = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}

# transformers 5.x defaults of the config fields we read (identical for the three model types unless listed)
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout": 0.1, "activation_dropout": 0.1, "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0, "layerdrop": 0.1, "layer_norm_eps": 1e-5, "feat_extract_norm": "group",
    "feat_extract_activation": "gelu", "conv_dim": [512] * 7, "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_bias": False, "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": False,
    "feat_proj_layer_norm": True, "conv_pos_batch_norm": False,  # hubert
    "num_buckets": 320, "max_bucket_distance": 800,  # wavlm
    "add_adapter": False, "adapter_attn_dim": None,
}
# keys copied unchanged into HubertConfig
_COPIED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "feat_extract_norm",
           "conv_bias", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm",
           "layer_norm_eps", "hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout",
           "layerdrop")


# ----------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file (expected a transformers model directory)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def _unsupported(cfg: dict[str, Any], model_type: str) -> list[str]:
    """``key=value (why)`` for every option of ``cfg`` our modules do not implement."""
    get = lambda key: cfg.get(key, _DEFAULTS[key])  # noqa: E731
    found = []
    for key in ("hidden_act", "feat_extract_activation"):
        if get(key) != "gelu":
            found.append(f"{key}={get(key)!r} (only 'gelu' is implemented)")
    if model_type == "hubert" and get("conv_pos_batch_norm"):
        found.append("conv_pos_batch_norm=true (batch norm instead of weight norm in the positional conv is not "
                     "implemented)")
    if model_type != "hubert" and get("add_adapter"):
        found.append("add_adapter=true (the adapter after the encoder is not implemented)")
    if model_type != "wavlm" and get("adapter_attn_dim") is not None:
        found.append(f"adapter_attn_dim={get('adapter_attn_dim')} (attention adapters are not implemented)")
    if get("layer_norm_eps") != 1e-5:
        found.append(f"layer_norm_eps={get('layer_norm_eps')} (transformers' CNN norms use 1e-5 whatever this "
                     "says; ours follow layer_norm_eps, so only 1e-5 gives the same model)")
    dims, kernels, strides = get("conv_dim"), get("conv_kernel"), get("conv_stride")
    if not (isinstance(dims, list) and isinstance(kernels, list) and isinstance(strides, list)
            and len(dims) == len(kernels) == len(strides)):
        found.append(f"conv_dim/conv_kernel/conv_stride={dims}/{kernels}/{strides} (need lists of equal length)")
    elif cfg.get("num_feat_extract_layers", len(dims)) != len(dims):
        found.append(f"num_feat_extract_layers={cfg['num_feat_extract_layers']} (conv_dim has {len(dims)} layers)")
    return found


def read_hf_config(path: str | os.PathLike) -> HubertConfig:
    """The :class:`HubertConfig` of transformers directory ``path`` (its ``config.json``; ``do_normalize`` of its
    ``preprocessor_config.json`` when there is one, else no waveform normalisation).

    Raises :class:`UserError` naming the file and key for an unknown ``model_type`` or an option our modules do
    not implement. Pretraining-head fields keep our defaults (transformers has no HuBERT head).
    """
    path = Path(path)
    file = path / CONFIG
    cfg = _read_json(file)
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{file}: model_type {model_type!r} is not supported; a transformers directory of one of "
                        f"{list(MODEL_TYPES)} (HubertModel, Wav2Vec2Model, WavLMModel or a *For... model of them)")
    bad = _unsupported(cfg, model_type)
    if bad:
        raise UserError(f"{file}: unsupported {model_type} option(s): {'; '.join(bad)}")
    get = lambda key: cfg.get(key, _DEFAULTS[key])  # noqa: E731
    normalize = False
    if (path / PREPROCESSOR).is_file():
        normalize = bool(_read_json(path / PREPROCESSOR).get("do_normalize", True))  # Wav2Vec2FeatureExtractor default
    fields: dict[str, Any] = {key: get(key) for key in _COPIED}
    fields.update(
        frontend="cnn",
        normalize_waveform=normalize,
        feature_grad_mult=1.0,
        model_type=model_type,
        feat_proj_layer_norm=bool(get("feat_proj_layer_norm")) if model_type == "hubert" else True,
        num_buckets=get("num_buckets"),
        max_bucket_distance=get("max_bucket_distance"),
    )
    try:
        fields["conv_layers"] = [(int(d), int(k), int(s))
                                 for d, k, s in zip(get("conv_dim"), get("conv_kernel"), get("conv_stride"))]
        return HubertConfig(**fields)
    except (TypeError, ValueError) as e:  # UserError is a ValueError
        raise UserError(f"{file}: {e}") from None


def _load_weight_file(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors: not a plain state dict of tensors
        raise UserError(f"{file}: cannot be read as a state dict of tensors with torch.load(weights_only=True) "
                        f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{file}: holds no plain state dict of tensors")
    return state


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a directory: ``model.safetensors`` first, then ``pytorch_model.bin``; sharded
    checkpoints through their ``*.index.json``."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no weight_map")
            return [path / shard for shard in sorted(set(weight_map.values()))]
    raise MissingInputError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded *.index.json)")


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The encoder weights of transformers directory ``path`` under our parameter names (see the module doc)."""
    path = Path(path)
    files = _weight_files(path)
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(_load_weight_file(file))
    prefixes = sorted({p for p in BASE_PREFIXES if any(k.startswith(p) for k in state)})
    if len(prefixes) > 1:
        raise UserError(f"{files[0]}: weights of several base models ({', '.join(prefixes)}...); expected one")
    if prefixes:
        prefix = prefixes[0]
        heads = sorted({k.split(".")[0] for k in state if not k.startswith(prefix)})
        if heads:
            log.info("%s: ignoring head weights %s (only the encoder %s* is loaded)", path, heads, prefix)
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    renamed = {}
    for key, value in state.items():
        for old, new in WEIGHT_NORM_OLD.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        renamed[key] = value
    return renamed


def load_hf_dir(path: str | os.PathLike) -> HubertModel:
    """A :class:`HubertModel` (HuBERT, wav2vec 2.0 or WavLM encoder) with the weights of transformers directory
    ``path``, in eval mode. Keys and shapes are checked strictly (:class:`~speechssl.models.checkpoint.
    CheckpointError` listing the missing, unexpected and mis-shaped ones); ``masked_spec_embed`` may be absent."""
    path = Path(path)
    config = read_hf_config(path)
    state = read_hf_state_dict(path)
    model = HubertModel(config)
    if "masked_spec_embed" not in state:
        log.info("%s: no masked_spec_embed (mask_time_prob = 0 in transformers); keeping a random one "
                 "(used by pretraining only)", path)
        state["masked_spec_embed"] = model.masked_spec_embed.detach().clone()
    _load_strict(model, state, _weight_files(path)[0], encoder_only=False)
    return model.eval()


# ----------------------------------------------------------------------------------------------- writing
def hf_config_dict(config: HubertConfig) -> dict[str, Any]:
    """transformers config fields (``HubertConfig`` / ``Wav2Vec2Config`` / ``WavLMConfig`` by
    ``config.model_type``) of an encoder built from ``config``; waveform-CNN frontend only."""
    if config.frontend != "cnn":
        raise UserError(
            f"cannot export a {config.frontend!r}-frontend model to transformers: its models only have the waveform "
            "CNN frontend. Use speechssl checkpoints (speechssl.upstream.load) for fbank models."
        )
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout": config.hidden_dropout,
        "activation_dropout": config.activation_dropout,
        "attention_dropout": config.attention_dropout,
        "feat_proj_dropout": config.feat_proj_dropout,
        "layerdrop": config.layerdrop,
        "layer_norm_eps": config.layer_norm_eps,
        "initializer_range": 0.02,
        "feat_extract_norm": config.feat_extract_norm,
        "feat_extract_activation": "gelu",
        "num_feat_extract_layers": len(config.conv_layers),
        "conv_dim": [d for d, _, _ in config.conv_layers],
        "conv_kernel": [k for _, k, _ in config.conv_layers],
        "conv_stride": [s for _, _, s in config.conv_layers],
        "conv_bias": config.conv_bias,
        "num_conv_pos_embeddings": config.num_conv_pos_embeddings,
        "num_conv_pos_embedding_groups": config.num_conv_pos_embedding_groups,
        "do_stable_layer_norm": config.do_stable_layer_norm,
        # fine-tuning SpecAugment defaults of transformers (not our pretraining mask_prob); mask_time_prob > 0
        # keeps masked_spec_embed in transformers' model
        "apply_spec_augment": True,
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
        "mask_feature_prob": 0.0,
        "mask_feature_length": 10,
        "vocab_size": 32,
        "dtype": "float32",
    }
    if config.model_type == "hubert":
        out.update(feat_proj_layer_norm=config.feat_proj_layer_norm, conv_pos_batch_norm=False)
    else:
        out.update(add_adapter=False)
    if config.model_type == "wavlm":
        out.update(num_buckets=config.num_buckets, max_bucket_distance=config.max_bucket_distance)
    return out


def _encoder_of(model_or_dir) -> HubertModel:
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        if _read_json(path / CONFIG).get("format") == FORMAT:
            return load_model(path, pretrain_head=False)
        return load_hf_dir(path)
    model = getattr(model_or_dir, "module", model_or_dir)
    model = getattr(model, "_orig_mod", model)
    model = model.hubert if isinstance(model, HubertPretrainModel) else model
    if not isinstance(model, HubertModel):
        raise TypeError(f"export_hf expects a HubertModel, HubertPretrainModel or checkpoint dir, got {type(model)}")
    return model


def _refuse_tuning_modules(model: nn.Module) -> None:
    """transformers has no adapters and no LoRA: their tensors would be dropped on load, leaving the base model."""
    from .peft import Adapter, LoRALinear

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model has LoRA weights: fold them into the base first (speechssl.models.peft.merge_lora); "
                        "transformers would drop them silently")
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise UserError("the model has bottleneck adapters, which transformers models lack; an adapters model is "
                        "saved only as a speechssl checkpoint (speechssl decode reads it)")


def export_hf(model_or_dir, out_dir) -> None:
    """Write a transformers directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) that
    ``transformers.AutoModel.from_pretrained(out_dir)`` loads as ``HubertModel``, ``Wav2Vec2Model`` or
    ``WavLMModel`` (by ``config.model_type``), atomically (an existing ``out_dir`` is replaced).

    ``model_or_dir``: a :class:`HubertModel`, a :class:`HubertPretrainModel` (its head is dropped: transformers has
    none), a speechssl checkpoint directory or a transformers directory. The fbank frontend is a :class:`UserError`.
    """
    model = _encoder_of(model_or_dir)
    _refuse_tuning_modules(model)
    config = model.config
    hf_config = hf_config_dict(config)
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": config.normalize_waveform,
        "return_attention_mask": config.feat_extract_norm == "layer",
    }
    weights: dict[str, Tensor] = _state_dict(model)
    _write_dir_atomic(Path(out_dir), {"model.safetensors": weights, CONFIG: hf_config, PREPROCESSOR: preprocessor})
