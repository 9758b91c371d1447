"""transformers directories in and out, without importing transformers: HuBERT, wav2vec 2.0 and WavLM encoders.

A transformers directory holds ``config.json`` (``model_type`` "hubert" | "wav2vec2" | "wavlm" and that model's
config fields), the weights (``model.safetensors``, else ``pytorch_model.bin``; either may be sharded with an
``*.index.json``) and, from a processor, ``preprocessor_config.json`` (transformers 5: ``processor_config.json``'s
``feature_extractor``; ``do_normalize``: per-utterance waveform normalisation, our ``normalize_waveform``).
The encoders are ours (:class:`~speechssl.models.hubert.HubertModel` with ``config.model_type``), whose parameter
names are transformers' base-model names, so reading is a key check and writing is a copy:

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
  as ``HubertModel`` / ``Wav2Vec2Model`` / ``WavLMModel`` (waveform-CNN frontend only), atomically; a wav2vec 2.0
  pretraining model (:class:`~speechssl.models.wav2vec2.Wav2Vec2PretrainModel`) goes with its quantizer and
  projections as ``Wav2Vec2ForPreTraining``.
* :func:`export_hf_ctc` / :func:`load_hf_ctc`: fine-tuned CTC models (:class:`~speechssl.models.ctc.CTCModel`) as
  ``HubertForCTC`` / ``Wav2Vec2ForCTC`` / ``WavLMForCTC`` directories with a ``Wav2Vec2Processor`` (``vocab.json``,
  ``tokenizer_config.json``: the blank is ``<pad>`` = ``pad_token_id`` 0; ``|`` the word delimiter of character
  units, phones through ``Wav2Vec2PhonemeCTCTokenizer`` without phonemizer), and back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.errors import MissingInputError, UserError

from .checkpoint import (FORMAT, REDO, _load_strict, _state_dict, _write_dir_atomic, checkpoint_dir, load_model,
                         read_json, read_safetensors)
from .config import MODEL_TYPES, HubertConfig
from .ctc import CTCHeadConfig, CTCModel
from .hubert import HubertModel
from .pretrain import PRETRAIN_CLASSES
from .wav2vec2 import Wav2Vec2PretrainModel

__all__ = ["read_hf_config", "read_hf_state_dict", "load_hf_dir", "hf_config_dict", "export_hf", "ARCHITECTURES",
           "export_hf_ctc", "load_hf_ctc", "CTC_ARCHITECTURES"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
PROCESSOR = "processor_config.json"  # transformers 5 Processor.save_pretrained: {"feature_extractor": {...}, ...}
ARCHITECTURES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel"}
PRETRAINING_ARCHITECTURE = "Wav2Vec2ForPreTraining"  # export_hf of a Wav2Vec2PretrainModel
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
    """A JSON object file of a transformers directory (:func:`speechssl.models.checkpoint.read_json`: one line
    naming the file when it is missing, unreadable or not a JSON object)."""
    if not path.exists():
        raise MissingInputError(f"{path}: no such file (expected a transformers model directory)")
    return read_json(path)


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
    ``preprocessor_config.json`` when there is one, else of the ``feature_extractor`` of its
    ``processor_config.json`` (transformers 5 processors), else no waveform normalisation).

    Raises :class:`UserError` naming the file and key for an unknown ``model_type`` or an option our modules do
    not implement. Pretraining-head fields keep our defaults (transformers has no HuBERT head).
    """
    path = checkpoint_dir(path)
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
    elif (path / PROCESSOR).is_file():  # transformers 5 saves a processor's feature extractor here
        extractor = _read_json(path / PROCESSOR).get("feature_extractor")
        if isinstance(extractor, dict):
            normalize = bool(extractor.get("do_normalize", True))
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
        return read_safetensors(file)  # a corrupt file: one CheckpointError line naming it
    if not file.is_file():
        raise MissingInputError(f"{file}: no such file (a weight file the directory names)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors: not a plain state dict of tensors
        raise UserError(f"{file}: cannot be read as a state dict of tensors with torch.load(weights_only=True) "
                        f"({type(e).__name__}: {' '.join(str(e).split())}); {REDO}") from None
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
    state, heads, prefix = _split_base(state, files[0])
    if heads:
        log.info("%s: ignoring head weights %s (only the encoder %s* is loaded)", path,
                 sorted({k.split(".")[0] for k in heads}), prefix)
    return state


def _split_base(state: dict[str, Tensor], source: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """``(encoder weights under our names, head weights as stored, base prefix)`` of a transformers state dict: the
    base-model prefix (``hubert.`` / ``wav2vec2.`` / ``wavlm.``) stripped, old weight-norm names renamed. A state
    dict without a base prefix is a bare encoder (no head, prefix "")."""
    prefixes = sorted({p for p in BASE_PREFIXES if any(k.startswith(p) for k in state)})
    if len(prefixes) > 1:
        raise UserError(f"{source}: weights of several base models ({', '.join(prefixes)}...); expected one")
    heads: dict[str, Tensor] = {}
    prefix = ""
    if prefixes:
        prefix = prefixes[0]
        heads = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    renamed = {}
    for key, value in state.items():
        for old, new in WEIGHT_NORM_OLD.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        renamed[key] = value
    return renamed, heads, prefix


_MISMATCH = f"{CONFIG} and the weights describe different models; {REDO}"  # a model built from the config.json


def load_hf_dir(path: str | os.PathLike) -> HubertModel:
    """A :class:`HubertModel` (HuBERT, wav2vec 2.0 or WavLM encoder) with the weights of transformers directory
    ``path``, in eval mode. Keys and shapes are checked strictly (:class:`~speechssl.models.checkpoint.
    CheckpointError` listing the missing, unexpected and mis-shaped ones); ``masked_spec_embed`` may be absent."""
    path = checkpoint_dir(path)
    config = read_hf_config(path)
    state = read_hf_state_dict(path)
    model = HubertModel(config)
    if "masked_spec_embed" not in state:
        log.info("%s: no masked_spec_embed (mask_time_prob = 0 in transformers); keeping a random one "
                 "(used by pretraining only)", path)
        state["masked_spec_embed"] = model.masked_spec_embed.detach().clone()
    _load_strict(model, state, _weight_files(path)[0], encoder_only=False, hint=_MISMATCH)
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
        path = checkpoint_dir(model_or_dir)
        if _read_json(path / CONFIG).get("format") == FORMAT:
            return load_model(path, pretrain_head=False)
        return load_hf_dir(path)
    model = getattr(model_or_dir, "module", model_or_dir)
    model = getattr(model, "_orig_mod", model)
    model = model.hubert if isinstance(model, PRETRAIN_CLASSES) else model
    if not isinstance(model, HubertModel):
        raise TypeError(f"export_hf expects a HubertModel, a pretraining model or checkpoint dir, got {type(model)}")
    return model


def _wav2vec2_pretraining_of(model_or_dir) -> Wav2Vec2PretrainModel | None:
    """The :class:`Wav2Vec2PretrainModel` given, or read from a speechssl checkpoint directory of that class; None
    for anything else."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = checkpoint_dir(model_or_dir)
        meta = _read_json(path / CONFIG)
        if meta.get("format") == FORMAT and meta.get("model_class") == Wav2Vec2PretrainModel.__name__:
            return load_model(path)
        return None
    model = getattr(model_or_dir, "module", model_or_dir)
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, Wav2Vec2PretrainModel) else None


def _refuse_tuning_modules(model: nn.Module) -> None:
    """transformers has no adapters and no LoRA: their tensors would be dropped on load, leaving the base model."""
    from .peft import Adapter, LoRALinear

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model has LoRA weights: fold them into the base first (speechssl.models.peft.merge_lora); "
                        "transformers would drop them silently")
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise UserError("the model has bottleneck adapters, which transformers models lack; an adapters model is "
                        "saved only as a speechssl checkpoint (speechssl decode reads it)")


def _preprocessor_dict(config: HubertConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` of transformers' ``Wav2Vec2FeatureExtractor`` for an encoder built from
    ``config`` (``do_normalize`` = ``normalize_waveform``; an attention mask only for the layer-norm CNN, as
    transformers' own checkpoints: the group-norm CNN is fed zero-padded batches without one)."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": config.normalize_waveform,
        "return_attention_mask": config.feat_extract_norm == "layer",
    }


def export_hf(model_or_dir, out_dir) -> None:
    """Write a transformers directory (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) that
    ``transformers.AutoModel.from_pretrained(out_dir)`` loads as ``HubertModel``, ``Wav2Vec2Model`` or
    ``WavLMModel`` (by ``config.model_type``), atomically (an existing ``out_dir`` is replaced).

    ``model_or_dir``: a :class:`HubertModel`, a pretraining model (``models/pretrain.py``), a speechssl checkpoint
    directory or a transformers directory. The fbank frontend is a :class:`UserError`.

    A :class:`~speechssl.models.wav2vec2.Wav2Vec2PretrainModel` (or a checkpoint directory of one) is written whole,
    as transformers' ``Wav2Vec2ForPreTraining`` (``from_pretrained`` loads it with no missing or unexpected key;
    ``AutoModel`` still gives its ``Wav2Vec2Model``): the encoder under ``wav2vec2.``, then ``quantizer.*``,
    ``project_q.*``, ``project_hid.*`` (the same names as ours), and in ``config.json`` the quantizer and loss
    settings (``num_codevector_groups``, ``num_codevectors_per_group``, ``codevector_dim``, ``proj_codevector_dim``,
    ``num_negatives``, ``contrastive_logits_temperature``, ``diversity_loss_weight``, ``feat_quantizer_dropout``)
    and our pretraining mask as ``mask_time_prob`` / ``mask_time_length`` / ``mask_time_min_masks``. The Gumbel
    temperature is no config field there (``set_gumbel_temperature``). Every other pretraining model drops its head
    (transformers has none for it) and is written as its encoder.
    """
    pretraining = _wav2vec2_pretraining_of(model_or_dir)
    model = pretraining if pretraining is not None else _encoder_of(model_or_dir)
    _refuse_tuning_modules(model)
    config = model.config
    hf_config = hf_config_dict(config)
    preprocessor = _preprocessor_dict(config)
    weights: dict[str, Tensor] = _state_dict(model)
    if pretraining is not None:
        hf_config.update(
            architectures=[PRETRAINING_ARCHITECTURE],
            num_codevector_groups=config.num_codevector_groups,
            num_codevectors_per_group=config.num_codevectors_per_group,
            codevector_dim=config.codevector_dim,
            proj_codevector_dim=config.proj_codevector_dim,
            num_negatives=config.num_negatives,
            contrastive_logits_temperature=config.contrastive_logits_temperature,
            diversity_loss_weight=config.diversity_loss_weight,
            feat_quantizer_dropout=config.feat_quantizer_dropout,
            mask_time_prob=config.mask_prob,
            mask_time_length=config.mask_length,
            mask_time_min_masks=config.mask_min_masks,
        )
        heads = ("quantizer.", "project_q.", "project_hid.")
        renamed = {}
        for key, value in weights.items():
            if key.startswith("hubert."):
                key = "wav2vec2." + key[len("hubert."):]
            elif not key.startswith(heads):
                raise UserError(f"export_hf: parameter {key} belongs to neither the encoder nor the quantizer and "
                                "projections of Wav2Vec2ForPreTraining")
            renamed[key] = value
        weights = renamed
    _write_dir_atomic(Path(out_dir), {"model.safetensors": weights, CONFIG: hf_config, PREPROCESSOR: preprocessor})


# ----------------------------------------------------------------------------------------------- *ForCTC
CTC_ARCHITECTURES = {"hubert": "HubertForCTC", "wav2vec2": "Wav2Vec2ForCTC", "wavlm": "WavLMForCTC"}
CTC_PREFIXES = {"hubert": "hubert.", "wav2vec2": "wav2vec2.", "wavlm": "wavlm."}
VOCAB = "vocab.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
PAD = "<pad>"  # transformers' name of the CTC blank (pad_token_id)
CHAR_TOKENIZER = "Wav2Vec2CTCTokenizer"
PHONE_TOKENIZER = "Wav2Vec2PhonemeCTCTokenizer"
_SPM_SPACE = "\u2581"  # sentencepiece's word-start mark


def _ctc_of(model) -> CTCModel:
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, CTCModel):
        raise TypeError(f"export_hf_ctc expects a CTCModel, got {type(model).__name__}")
    return model


def _check_vocab(vocab: list[str], word_delim: str | None, size: int) -> None:
    if len(vocab) != size:
        raise UserError(f"the vocabulary has {len(vocab)} tokens but the model's lm_head has {size} outputs")
    seen: set[str] = set()
    dups = sorted({t for t in vocab if t in seen or seen.add(t)} | ({PAD} & set(vocab[1:])))
    if dups:
        raise UserError(f"vocabulary token(s) {dups[:5]} appear twice (or as {PAD!r}, the name transformers gives the "
                        "blank); vocab.json maps each token to one id")
    if word_delim is not None and word_delim not in vocab[1:]:
        raise UserError(f"word delimiter {word_delim!r} is not in the vocabulary")
    if word_delim is None:
        bad = [t for t in vocab[1:] if _SPM_SPACE in t or not t or any(c.isspace() for c in t)]
        if bad:
            raise UserError(f"token(s) {bad[:5]} cannot be exported: without a word delimiter the tokens are written "
                            f"for transformers' {PHONE_TOKENIZER}, which separates tokens by spaces (phones); "
                            "sentencepiece pieces (bpe units) have no transformers CTC tokenizer")


def export_hf_ctc(model: CTCModel, vocab: list[str], word_delim: str | None, out_dir) -> None:
    """Write a fine-tuned :class:`CTCModel` as a transformers directory, atomically (an existing ``out_dir`` is
    replaced): ``transformers.AutoModelForCTC.from_pretrained(out_dir)`` loads it as ``HubertForCTC`` /
    ``Wav2Vec2ForCTC`` / ``WavLMForCTC`` (by ``config.model_type``) and ``AutoProcessor.from_pretrained(out_dir)``
    as a ``Wav2Vec2Processor`` (feature extractor + CTC tokenizer).

    ``vocab``: the token of every ``lm_head`` output, by id; id 0 is the CTC blank, written as ``<pad>``
    (transformers' ``pad_token_id`` = 0 is its CTC blank). ``word_delim``: the word-delimiter token of character
    units (``|``): the tokenizer is ``Wav2Vec2CTCTokenizer`` (tokens joined, the delimiter becomes a space).
    ``None`` (phones): ``Wav2Vec2PhonemeCTCTokenizer`` with ``do_phonemize`` false, which decodes to tokens
    separated by spaces and encodes space-separated phone strings. Sentencepiece pieces (bpe units) are refused:
    neither tokenizer decodes them.

    No ``<unk>`` / ``<s>`` / ``</s>``: the exported vocabulary is exactly the model's (``len(tokenizer)`` =
    ``vocab_size``); transformers' CTC tokenizers need none of them to decode, and encoding a character outside
    the vocabulary gives ``None`` (as it does for any vocabulary without ``<unk>``) instead of a label the model
    cannot emit.

    Files: ``config.json`` (:func:`hf_config_dict` + ``architectures``, ``vocab_size``, ``pad_token_id`` 0,
    ``ctc_loss_reduction`` "sum" and ``ctc_zero_infinity`` (our loss is the summed CTC loss with zero_infinity,
    divided by the number of utterances), ``final_dropout`` and the fine-tuning masks of the head config
    (``mask_time_*``; ``mask_channel_*`` as ``mask_feature_*``)); ``model.safetensors`` (the encoder under
    ``hubert.`` / ``wav2vec2.`` / ``wavlm.``, then ``lm_head.*``; ``masked_spec_embed`` left out when both mask
    probabilities are 0, as transformers then has none); ``vocab.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``preprocessor_config.json`` (as :func:`export_hf`).

    A LoRA model is exported merged (:func:`~speechssl.models.peft.merge_lora` on a copy: ``model`` is not
    changed); an adapters model and the fbank frontend are :class:`UserError`; the blank must be id 0.
    """
    model = _ctc_of(model)
    config, head = model.config, model.head_config
    hf_config = hf_config_dict(config)  # refuses the fbank frontend before anything is copied
    if head.blank != 0:
        raise UserError(f"the CTC blank is id {head.blank}; transformers' CTC blank is pad_token_id, written as 0 "
                        "here: only blank = 0 can be exported")
    vocab = list(vocab)
    _check_vocab(vocab, word_delim, model.lm_head.out_features)
    from .peft import Adapter, LoRALinear, merge_lora

    if not any(isinstance(m, Adapter) for m in model.modules()) and any(
            isinstance(m, LoRALinear) for m in model.modules()):
        import copy

        model = copy.deepcopy(model)
        merged = merge_lora(model)
        log.info("export_hf_ctc: merged LoRA into %d Linear(s) of a copy of the model", len(merged))
    _refuse_tuning_modules(model)

    arch = CTC_ARCHITECTURES[config.model_type]
    hf_config.update(
        architectures=[arch],
        vocab_size=len(vocab),
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        ctc_loss_reduction="sum",
        ctc_zero_infinity=True,
        final_dropout=head.final_dropout,
        use_weighted_layer_sum=False,
        mask_time_prob=head.mask_time_prob,
        mask_time_length=head.mask_time_length,
        mask_time_min_masks=2,
        mask_feature_prob=head.mask_channel_prob,
        mask_feature_length=head.mask_channel_length,
        mask_feature_min_masks=0,
    )
    prefix = CTC_PREFIXES[config.model_type]
    weights: dict[str, Tensor] = {}
    for key, value in _state_dict(model).items():
        if key.startswith("hubert."):
            key = prefix + key[len("hubert."):]
        elif not key.startswith("lm_head."):
            raise UserError(f"export_hf_ctc: parameter {key} belongs to neither the encoder nor lm_head")
        weights[key] = value
    if head.mask_time_prob == 0 and head.mask_channel_prob == 0:
        weights.pop(prefix + "masked_spec_embed", None)  # transformers builds none without masking

    tokens = [PAD] + vocab[1:]
    special = {"pad_token": PAD}
    tokenizer: dict[str, Any] = {
        "pad_token": PAD, "unk_token": None, "bos_token": None, "eos_token": None, "do_lower_case": False,
        "clean_up_tokenization_spaces": False, "processor_class": "Wav2Vec2Processor",
    }
    if word_delim is not None:
        tokenizer.update(tokenizer_class=CHAR_TOKENIZER, word_delimiter_token=word_delim,
                         replace_word_delimiter_char=" ")
        special["word_delimiter_token"] = word_delim
    else:
        tokenizer.update(tokenizer_class=PHONE_TOKENIZER, do_phonemize=False, phone_delimiter_token=" ",
                         word_delimiter_token=None)
    preprocessor = {**_preprocessor_dict(config), "processor_class": "Wav2Vec2Processor"}
    _write_dir_atomic(Path(out_dir), {
        "model.safetensors": weights, CONFIG: hf_config, PREPROCESSOR: preprocessor,
        VOCAB: {t: i for i, t in enumerate(tokens)}, TOKENIZER_CONFIG: tokenizer, SPECIAL_TOKENS: special,
    })


def _token_content(value: Any) -> Any:
    """A special token of ``tokenizer_config.json``: a string, or transformers' serialised ``AddedToken``."""
    return value.get("content") if isinstance(value, dict) else value


def _read_ctc_vocab(path: Path, size: int) -> tuple[list[str], str | None]:
    """``(token of every id 0..size-1, word delimiter or None)`` from ``vocab.json`` (+ added tokens)."""
    file = path / VOCAB
    raw = _read_json(file)
    tok_cfg = _read_json(path / TOKENIZER_CONFIG) if (path / TOKENIZER_CONFIG).is_file() else {}
    target = tok_cfg.get("target_lang")
    if any(isinstance(v, dict) for v in raw.values()):
        if target not in raw:
            raise UserError(f"{file}: a multi-lingual vocabulary (one per language); transformers' target_lang "
                            f"{target!r} names none of {sorted(raw)[:5]}: not supported")
        raw = raw[target]
    by_id: dict[int, str] = {}
    for token, index in raw.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise UserError(f"{file}: token {token!r} has id {index!r}; expected a non-negative integer")
        if index in by_id:
            raise UserError(f"{file}: tokens {by_id[index]!r} and {token!r} share id {index}")
        by_id[index] = token
    # tokens added to the tokenizer (added_tokens.json of transformers 4, added_tokens_decoder of 5) fill ids that
    # vocab.json lacks; vocab.json wins where both name an id
    added = [(t, i) for t, i in (_read_json(path / ADDED_TOKENS) if (path / ADDED_TOKENS).is_file() else {}).items()]
    decoder = tok_cfg.get("added_tokens_decoder")
    added += [(_token_content(v), k) for k, v in (decoder.items() if isinstance(decoder, dict) else ())]
    for token, index in added:
        if isinstance(index, str) and index.isdigit():
            index = int(index)
        if isinstance(index, int) and not isinstance(index, bool) and index not in by_id and isinstance(token, str):
            by_id[index] = token
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise UserError(f"{file}: no token for id(s) {missing[:5]} of the model's {size} outputs (config.json "
                        "vocab_size); decoding needs a token for every output")
    beyond = sorted(i for i in by_id if i >= size)
    if beyond:
        log.info("%s: ignoring %d token(s) with ids >= vocab_size %d (the model cannot emit them)", file,
                 len(beyond), size)
    vocab = [by_id[i] for i in range(size)]
    pad = _token_content(tok_cfg.get("pad_token", PAD))
    if pad is not None and pad != vocab[0]:
        raise UserError(f"{path / TOKENIZER_CONFIG}: pad_token {pad!r} is not token 0 ({vocab[0]!r} in {file}); "
                        "transformers' CTC blank is the pad token with pad_token_id 0")
    cls = tok_cfg.get("tokenizer_class", CHAR_TOKENIZER)
    if cls == PHONE_TOKENIZER:
        return vocab, None  # tokens separated by spaces (phones)
    if cls != CHAR_TOKENIZER:
        log.info("%s: tokenizer_class %r; decoding as %s does (tokens joined, the word delimiter a space)",
                 path / TOKENIZER_CONFIG, cls, CHAR_TOKENIZER)
    delim = _token_content(tok_cfg.get("word_delimiter_token", "|"))
    if delim is None or delim not in vocab[1:]:
        log.info("%s: no word delimiter token in the vocabulary; the tokens are read as phones (space-separated)",
                 file)
        return vocab, None
    return vocab, delim


def load_hf_ctc(path: str | os.PathLike) -> tuple[CTCModel, list[str], str | None]:
    """A transformers ``HubertForCTC`` / ``Wav2Vec2ForCTC`` / ``WavLMForCTC`` directory as ``(CTCModel in eval
    mode, vocab: the token of every output id (id 0 the blank, as the directory names it, usually ``<pad>``),
    word_delim)``. ``model.logits(wavs)`` equals transformers' logits.

    ``word_delim``: ``word_delimiter_token`` of ``tokenizer_config.json`` (default ``|``) for
    ``Wav2Vec2CTCTokenizer``; ``None`` for ``Wav2Vec2PhonemeCTCTokenizer`` directories (phones: tokens separated by
    spaces) or when the vocabulary has no such token. The blank must be ``pad_token_id`` = 0 (else a
    :class:`UserError`); keys are checked strictly (encoder + ``lm_head``; ``masked_spec_embed`` may be absent).
    The head config takes ``final_dropout`` and the ``mask_time_*`` / ``mask_feature_*`` settings of
    ``config.json``; ``freeze_updates`` is 0 (the head is trained already).
    """
    path = checkpoint_dir(path)
    config = read_hf_config(path)
    file = path / CONFIG
    cfg = _read_json(file)
    pad = cfg.get("pad_token_id", 0)
    if pad != 0:
        raise UserError(f"{file}: pad_token_id is {pad!r}; transformers uses the pad token as the CTC blank and "
                        "speechssl's CTC models need it at id 0")
    size = cfg.get("vocab_size", 32)
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise UserError(f"{file}: vocab_size {size!r}; expected an integer >= 2")
    if cfg.get("use_weighted_layer_sum"):
        raise UserError(f"{file}: use_weighted_layer_sum=true is not implemented for CTC models")
    try:
        head = CTCHeadConfig(
            vocab_size=size, blank=0, final_dropout=float(cfg.get("final_dropout", 0.1)),
            mask_time_prob=float(cfg.get("mask_time_prob", 0.05)),
            mask_time_length=int(cfg.get("mask_time_length", 10)),
            mask_channel_prob=float(cfg.get("mask_feature_prob", 0.0)),
            mask_channel_length=int(cfg.get("mask_feature_length", 10)), freeze_updates=0)
    except (TypeError, ValueError) as e:
        raise UserError(f"{file}: {e}") from None
    vocab, delim = _read_ctc_vocab(path, size)
    files = _weight_files(path)
    raw: dict[str, Tensor] = {}
    for weight_file in files:
        raw.update(_load_weight_file(weight_file))
    encoder, heads, prefix = _split_base(raw, files[0])
    if not prefix or "lm_head.weight" not in heads:
        raise UserError(f"{files[0]}: no {CTC_PREFIXES[config.model_type]}* encoder with an lm_head.*: not a "
                        f"{CTC_ARCHITECTURES[config.model_type]} directory (export a fine-tuned model, or load a bare "
                        "encoder with speechssl.upstream.load)")
    model = CTCModel(config, head)
    if "masked_spec_embed" not in encoder:
        encoder["masked_spec_embed"] = model.hubert.masked_spec_embed.detach().clone()
    state = {"hubert." + k: v for k, v in encoder.items()}
    state.update(heads)
    _load_strict(model, state, files[0], encoder_only=False, hint=_MISMATCH)
    return model.eval(), vocab, delim
