"""fairseq and s3prl pickle checkpoints in, s3prl's "converted" HuBERT checkpoint out (floor 4).

Reading (:func:`load_pickle`, opt-in: only for files the caller trusts, since unpickling can run arbitrary code)
gives a :class:`~speechssl.models.hubert.HubertModel` in eval mode from

* a fairseq checkpoint as ``checkpoint_utils.save_state`` writes it: ``cfg`` (an omegaconf ``DictConfig`` with
  ``model`` / ``task`` sections; older files: an argparse ``args``) + ``model`` (the state dict) + ``task_state``
  (label dictionaries). HuBERT and wav2vec 2.0 pretraining checkpoints, and their CTC fine-tuned
  (``w2v_encoder.w2v_model.*``) versions, whose encoder is taken (the CTC projection is dropped);
* an s3prl converted checkpoint (``s3prl/upstream/hubert/convert.py``): ``task_cfg``, ``model_cfg``,
  ``model_weight``, ``dictionaries_symbols``; the wav2vec 2.0 converter writes the same without
  ``dictionaries_symbols``.

fairseq and omegaconf need not be installed: their classes are unpickled as inert stand-ins whose pickled state
is read back as plain dicts / lists (omegaconf ``${section.key}`` interpolations resolved). The pretraining heads
(HuBERT ``final_proj`` / ``label_embs_concat``, wav2vec 2.0 ``quantizer`` / ``project_q`` / ``final_proj``) are
dropped; every other tensor must match the encoder built from the checkpoint's config, key for key and shape for
shape (else :class:`~speechssl.models.checkpoint.CheckpointError` listing what is missing / unexpected).

Writing (:func:`export_s3prl`): s3prl's converted HuBERT format, loadable by s3prl's own
``load_converted_model`` (whose ``torch.load`` keeps its default ``weights_only=True``: the file holds only dicts,
lists, strings, numbers and tensors). Waveform-CNN HuBERT only.

Names (ours = transformers' -> fairseq's): ``feature_extractor.conv_layers.N.conv`` -> ``...N.0``, its norm ->
``...N.2`` (GroupNorm) / ``...N.2.1`` (LayerNorm), ``feature_projection.layer_norm`` -> ``layer_norm``,
``feature_projection.projection`` -> ``post_extract_proj`` (fairseq has none when the CNN's width equals the
encoder's: an identity then), ``masked_spec_embed`` -> ``mask_emb``, positional conv weight norm ->
``encoder.pos_conv.0.weight_g`` / ``weight_v``, ``attention`` -> ``self_attn``, the attention ``layer_norm`` ->
``self_attn_layer_norm``, ``feed_forward.intermediate_dense`` / ``output_dense`` -> ``fc1`` / ``fc2``;
``final_layer_norm``, ``encoder.layer_norm`` unchanged; head ``label_embeddings`` -> ``label_embs_concat``.
"""

from __future__ import annotations

import argparse
import ast
import enum
import functools
import os
import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.fileio import atomic_path

from .checkpoint import CheckpointError, load_model, read_config
from .config import HubertConfig
from .hubert import HubertModel, HubertPretrainModel

__all__ = ["load_pickle", "read_pickle", "export_s3prl", "check_exportable", "to_fairseq_state", "from_fairseq_state",
           "fairseq_name", "config_from_fairseq", "config_to_fairseq", "parse_conv_layers", "format_conv_layers"]

SAMPLE_RATE = 16000
FINETUNED_PREFIX = "w2v_encoder.w2v_model."  # fairseq HubertCtc / Wav2VecCtc: the pretrained model inside
S3PRL_KEYS = ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols")
# tensors of the pretraining heads, not of the encoder: dropped on reading
_HEAD_PREFIXES = ("final_proj.", "label_embs_concat", "target_glu.", "quantizer.", "project_q.", "project_inp.",
                  "input_quantizer.")
_ARCHS = {"hubert": "hubert", "hubert_ctc": "hubert", "wav2vec2": "wav2vec2", "wav2vec_ctc": "wav2vec2"}


# -------------------------------------------------------------------------------------- conv_feature_layers
_MAX_CONV_LAYERS = 64
def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string (``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``) as a list
    of ``(dim, kernel, stride)``, without ``eval``: the expression is parsed (``ast``) and only lists of integer
    3-tuples, ``+`` of lists and ``*`` of a list by an integer are accepted; anything else raises ``ValueError``."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            items = tuple(value(e) for e in node.elts)
            if len(items) != 3 or not all(isinstance(v, int) for v in items):
                raise ValueError(f"a conv layer must be (dim, kernel, stride), got {ast.unparse(node)}")
            return items
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
                return left + right
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, list):
                left, right = right, left
            if isinstance(node.op, ast.Mult) and isinstance(left, list) and isinstance(right, int):
                if not 0 <= right <= _MAX_CONV_LAYERS:
                    raise ValueError(f"repeat count {right} out of range")
                return left * right
        raise ValueError(f"unsupported expression {ast.unparse(node)!r}")

    try:
        tree = ast.parse(str(spec).strip(), mode="eval")
        layers = value(tree.body)
    except (SyntaxError, ValueError, RecursionError) as e:
        raise ValueError(f"conv_feature_layers {spec!r}: not a list of (dim, kernel, stride) tuples ({e})") from None
    if (not isinstance(layers, list) or not 0 < len(layers) <= _MAX_CONV_LAYERS
            or not all(isinstance(t, tuple) for t in layers)):
        raise ValueError(f"conv_feature_layers {spec!r}: not a list of 1 to {_MAX_CONV_LAYERS} (dim, kernel, stride) "
                         "tuples")
    return layers


def format_conv_layers(layers) -> str:
    """Inverse of :func:`parse_conv_layers` in fairseq's style: runs of equal layers as ``[(d,k,s)] * n``."""
    parts: list[str] = []
    runs: list[list] = []
    for layer in [tuple(int(v) for v in layer) for layer in layers]:
        if runs and runs[-1][0] == layer:
            runs[-1][1] += 1
        else:
            runs.append([layer, 1])
    for (d, k, s), n in runs:
        parts.append(f"[({d},{k},{s})]" + (f" * {n}" if n > 1 else ""))
    return " + ".join(parts)


# -------------------------------------------------------------------------------------- unpickling
class _Stub:
    """Stand-in for a class of fairseq / omegaconf / hydra (or of any module that cannot be imported): keeps the
    arguments and the state pickle hands it, does nothing else."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_stub_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in {type(self).__module__}.{type(self).__qualname__}>"


@functools.lru_cache(maxsize=None)
def _stub_class(module: str, name: str) -> type:
    return type(name.split(".")[-1], (_Stub,), {"__module__": module, "__qualname__": name})


_STUB_PACKAGES = ("fairseq", "omegaconf", "hydra")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in _STUB_PACKAGES:
            return _stub_class(module, name)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _stub_class(module, name)


_PICKLE_MODULE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="speechssl_fairseq_pickle")


def read_pickle(path) -> Any:
    """The object a ``torch.save`` checkpoint file holds, unpickled (the caller trusts the file) on the CPU, with
    fairseq / omegaconf / hydra classes (and those of modules that are not installed) as inert stand-ins."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated file, not a torch file at all, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())}); re-copy or re-download it") from None


def _plain(obj: Any) -> Any:
    """Configs as plain Python: omegaconf containers / nodes (stand-ins) -> dicts, lists and values, argparse
    Namespaces -> dicts, enum members -> their values, other stand-ins -> their pickled state."""
    if isinstance(obj, _Stub):
        state = obj.__dict__.get("_stub_state")
        args = obj.__dict__.get("_stub_args", ())
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]  # (dict state, slot state)
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return _plain(state["_content"])
            if "_val" in state:  # omegaconf value node
                return _plain(state["_val"])
            return {k: _plain(v) for k, v in state.items() if k not in ("_parent", "_metadata")}
        if state is None and len(args) == 1:  # an enum member: EnumClass(value)
            return _plain(args[0])
        return None
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, type):
        return None
    return obj


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _resolve(cfg: Any, root: Any, depth: int = 0) -> Any:
    """omegaconf node interpolations (``"${task.label_rate}"``) replaced by the value they point to in ``root``;
    one that points nowhere is left as it is."""
    if isinstance(cfg, dict):
        return {k: _resolve(v, root, depth) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_resolve(v, root, depth) for v in cfg]
    if isinstance(cfg, str) and depth < 10:
        m = _INTERPOLATION.fullmatch(cfg.strip())
        if m:
            node: Any = root
            for key in m.group(1).split("."):
                if not isinstance(node, dict) or key not in node:
                    return cfg
                node = node[key]
            return _resolve(node, root, depth + 1)
    return cfg


# -------------------------------------------------------------------------------------- configs
_FAIRSEQ_DEFAULTS: dict[str, Any] = {  # fairseq HubertConfig / Wav2Vec2Config defaults of the fields read here
    "extractor_mode": "default", "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1,
    "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "final_dim": 0, "untie_final_proj": False, "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", "conv_bias": False,
    "logit_temp": 0.1, "feature_grad_mult": 1.0, "mask_length": 10, "mask_prob": 0.65, "conv_pos": 128,
    "conv_pos_groups": 16, "pos_conv_depth": 1,
}


def config_from_fairseq(model_cfg: dict, task_cfg: dict | None = None, *, model_type: str = "hubert",
                        num_classes: list[int] | None = None, criterion: dict | None = None,
                        source: str = "checkpoint") -> HubertConfig:
    """Our :class:`HubertConfig` (``model_type`` "hubert" or "wav2vec2") of a fairseq HuBERT / wav2vec 2.0 model
    config (fairseq's field names; absent fields take fairseq's defaults), its task config (``normalize``) and,
    for HuBERT, its criterion (``pred_masked_weight``, ``pred_nomask_weight``, ``loss_weights[0]`` = feature
    penalty). ``num_classes``: sizes of the label dictionaries (fairseq's include its 4 special symbols). What
    our encoder cannot represent (another activation, conformer layers, a deeper positional conv) raises
    ``CheckpointError`` naming ``source``."""
    c = {**_FAIRSEQ_DEFAULTS, **{k: v for k, v in model_cfg.items() if v is not None}}
    task_cfg = task_cfg or {}
    unsupported = []
    if c["activation_fn"] != "gelu":
        unsupported.append(f"activation_fn={c['activation_fn']!r} (GELU only)")
    if c["layer_type"] != "transformer":
        unsupported.append(f"layer_type={c['layer_type']!r} (transformer layers only)")
    if int(c["pos_conv_depth"]) != 1:
        unsupported.append(f"pos_conv_depth={c['pos_conv_depth']} (one positional conv only)")
    if c["extractor_mode"] not in ("default", "layer_norm"):
        unsupported.append(f"extractor_mode={c['extractor_mode']!r}")
    try:
        conv_layers = parse_conv_layers(c["conv_feature_layers"])
    except ValueError as e:
        unsupported.append(str(e))
    if unsupported:
        raise CheckpointError(f"{source}: a {model_type} model speechssl cannot represent: " + "; ".join(unsupported))
    embed = int(c["encoder_embed_dim"])
    fields: dict[str, Any] = dict(
        frontend="cnn", conv_layers=conv_layers,
        feat_extract_norm="layer" if c["extractor_mode"] == "layer_norm" else "group",
        conv_bias=bool(c["conv_bias"]), feature_grad_mult=float(c["feature_grad_mult"]),
        normalize_waveform=bool(task_cfg.get("normalize", False)),
        hidden_size=embed, num_hidden_layers=int(c["encoder_layers"]),
        num_attention_heads=int(c["encoder_attention_heads"]), intermediate_size=int(c["encoder_ffn_embed_dim"]),
        do_stable_layer_norm=bool(c["layer_norm_first"]), num_conv_pos_embeddings=int(c["conv_pos"]),
        num_conv_pos_embedding_groups=int(c["conv_pos_groups"]), layer_norm_eps=1e-5,
        hidden_dropout=float(c["dropout"]), attention_dropout=float(c["attention_dropout"]),
        activation_dropout=float(c["activation_dropout"]), feat_proj_dropout=float(c["dropout_input"]),
        layerdrop=float(c["encoder_layerdrop"]),
        final_dim=int(c["final_dim"]) if int(c["final_dim"]) > 0 else embed,
        untie_final_proj=bool(c["untie_final_proj"]), logit_temp=float(c["logit_temp"]),
        mask_prob=float(c["mask_prob"]), mask_length=int(c["mask_length"]),
    )
    if num_classes:
        fields["num_classes"] = [int(k) for k in num_classes]
    criterion = criterion or {}
    if model_type == "hubert":
        for key in ("pred_masked_weight", "pred_nomask_weight"):  # same names in fairseq's hubert criterion
            if criterion.get(key) is not None:
                fields[key] = float(criterion[key])
        weights = criterion.get("loss_weights")
        if isinstance(weights, list) and weights and weights[0] is not None:
            fields["feature_penalty_weight"] = float(weights[0])
    fields["model_type"] = model_type
    try:
        return HubertConfig(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: config not usable: {e}") from None


def config_to_fairseq(config: HubertConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, task_cfg)``: fairseq's HuBERT model and pretraining-task configs of ``config`` (plain dicts,
    fairseq's field names, ``_name`` as fairseq's hydra configs carry it). Labels are at the model's frame rate.
    ``config`` must be exportable (:func:`check_exportable`)."""
    check_exportable(config)
    label_rate = float(config.frame_rate)
    model_cfg = {
        "_name": "hubert", "label_rate": label_rate,
        "extractor_mode": "layer_norm" if config.feat_extract_norm == "layer" else "default",
        "encoder_layers": config.num_hidden_layers, "encoder_embed_dim": config.hidden_size,
        "encoder_ffn_embed_dim": config.intermediate_size, "encoder_attention_heads": config.num_attention_heads,
        "activation_fn": "gelu", "layer_type": "transformer",
        "dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout,
        "activation_dropout": config.activation_dropout, "encoder_layerdrop": config.layerdrop,
        "dropout_input": config.feat_proj_dropout, "dropout_features": config.feat_proj_dropout,
        "final_dim": config.final_dim, "untie_final_proj": config.untie_final_proj,
        "layer_norm_first": config.do_stable_layer_norm,
        "conv_feature_layers": format_conv_layers(config.conv_layers), "conv_bias": config.conv_bias,
        "logit_temp": config.logit_temp, "target_glu": False, "feature_grad_mult": config.feature_grad_mult,
        "mask_length": config.mask_length, "mask_prob": config.mask_prob, "mask_selection": "static",
        "mask_other": 0.0, "no_mask_overlap": False, "mask_min_space": 1,
        "mask_channel_length": 10, "mask_channel_prob": 0.0, "mask_channel_selection": "static",
        "mask_channel_other": 0.0, "no_mask_channel_overlap": False, "mask_channel_min_space": 1,
        "conv_pos": config.num_conv_pos_embeddings, "conv_pos_groups": config.num_conv_pos_embedding_groups,
        "skip_masked": False, "skip_nomask": False, "checkpoint_activations": False,
        "required_seq_len_multiple": 2,
    }
    task_cfg = {
        "_name": "hubert_pretraining", "label_rate": label_rate, "sample_rate": SAMPLE_RATE,
        "normalize": config.normalize_waveform, "enable_padding": False, "max_keep_size": None,
        "max_sample_size": None, "min_sample_size": None, "random_crop": True, "pad_audio": False,
    }
    return model_cfg, task_cfg


def check_exportable(config: HubertConfig) -> None:
    """``CheckpointError`` with the reason when fairseq's HuBERT cannot hold a model of ``config``."""
    problems = []
    if config.frontend != "cnn":
        problems.append(f"the {config.frontend!r} frontend (fairseq's HuBERT has the waveform CNN only)")
    if config.model_type != "hubert":
        problems.append(f"model_type {config.model_type!r} (s3prl's converted format written here is HuBERT's)")
    if not config.feat_proj_layer_norm:
        problems.append("feat_proj_layer_norm=False (fairseq always normalises the CNN output)")
    if config.layer_norm_eps != 1e-5:
        problems.append(f"layer_norm_eps={config.layer_norm_eps:g} (fairseq's LayerNorms use 1e-5)")
    if problems:
        raise CheckpointError("cannot write this model as a fairseq / s3prl HuBERT checkpoint: " + "; ".join(problems))


# -------------------------------------------------------------------------------------- parameter names
_LAYER = r"encoder\.layers\.(\d+)\."
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), r) for p, r in [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.0.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"post_extract_proj.\1"),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (_LAYER + r"attention\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.\2_proj.\3"),
    (_LAYER + r"layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_LAYER + r"feed_forward\.intermediate_dense\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
    (_LAYER + r"feed_forward\.output_dense\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
    (_LAYER + r"final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"final_proj\.(weight|bias)", r"final_proj.\1"),
    (r"label_embeddings", "label_embs_concat"),
]]
_CONV_NORM = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)")
# torch.nn.utils.parametrizations.weight_norm names, as a checkpoint saved by newer code may carry them
_NEW_WEIGHT_NORM = (("parametrizations.weight.original0", "weight_g"),
                    ("parametrizations.weight.original1", "weight_v"))


def fairseq_name(name: str, feat_extract_norm: str = "group") -> str:
    """fairseq's name of one of our parameter names (a :class:`HubertModel`'s, or a :class:`HubertPretrainModel`'s
    with its ``hubert.`` prefix, ``final_proj``, ``label_embeddings``). An unknown name is an internal error."""
    name = name[len("hubert."):] if name.startswith("hubert.") else name
    m = _CONV_NORM.fullmatch(name)
    if m:  # fairseq: Sequential(conv, dropout, norm, GELU); its LayerNorm inside TransposeLast's Sequential
        norm = "2.1" if feat_extract_norm == "layer" else "2"
        return f"feature_extractor.conv_layers.{m.group(1)}.{norm}.{m.group(2)}"
    for pattern, replacement in _RULES:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name)
    raise RuntimeError(f"no fairseq name for parameter {name!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def to_fairseq_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of a :class:`HubertModel` (encoder) or :class:`HubertPretrainModel` (encoder + head) under
    fairseq's HuBERT names: ``fairseq HubertModel.load_state_dict(..., strict=True)`` takes it (a bare encoder:
    fairseq's head tensors are absent). Tensors are detached CPU copies. A model fairseq's HuBERT cannot hold
    raises ``CheckpointError`` (:func:`check_exportable`).

    fairseq has no ``post_extract_proj`` when the CNN's width equals ``hidden_size``; ours must then be the
    identity (else ``CheckpointError``) and is left out."""
    model = _unwrap(model)
    if not isinstance(model, (HubertModel, HubertPretrainModel)):
        raise TypeError(f"expected a HubertModel or HubertPretrainModel, got {type(model).__name__}")
    config = model.config
    check_exportable(config)
    encoder = model.hubert if isinstance(model, HubertPretrainModel) else model
    prefix = "hubert." if isinstance(model, HubertPretrainModel) else ""
    state = {fairseq_name(k, config.feat_extract_norm): v.detach().to("cpu").clone()
             for k, v in model.state_dict().items()}
    if encoder.feature_extractor.output_dim == config.hidden_size:
        proj = encoder.feature_projection.projection
        if not (torch.equal(proj.weight, torch.eye(config.hidden_size, dtype=proj.weight.dtype,
                                                   device=proj.weight.device))
                and not proj.bias.detach().any()):
            raise CheckpointError(f"the CNN width equals hidden_size ({config.hidden_size}): fairseq has no feature "
                                  f"projection then, but {prefix}feature_projection.projection is not the identity")
        del state["post_extract_proj.weight"], state["post_extract_proj.bias"]
    return state


def from_fairseq_state(state: dict[str, Tensor], model: HubertModel, *, source: str = "checkpoint") -> None:
    """Load fairseq-named encoder tensors into ``model`` (a :class:`HubertModel`), strictly: pretraining-head
    tensors are dropped, anything else missing, unexpected or mis-shaped raises ``CheckpointError`` naming
    ``source`` and the keys. A missing ``post_extract_proj`` (fairseq omits it when the CNN's width equals the
    encoder's) becomes the identity."""
    config = model.config
    theirs: dict[str, Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor) or k.startswith(_HEAD_PREFIXES):
            continue
        for new, old in _NEW_WEIGHT_NORM:
            k = k.replace(new, old)
        theirs[k] = v
    ours = model.state_dict()
    wanted = {fairseq_name(k, config.feat_extract_norm): k for k in ours}
    loaded: dict[str, Tensor] = {}
    if model.feature_extractor.output_dim == config.hidden_size and "post_extract_proj.weight" not in theirs:
        for suffix in ("weight", "bias"):
            key = wanted.pop(f"post_extract_proj.{suffix}")
            eye = torch.eye(config.hidden_size) if suffix == "weight" else torch.zeros(config.hidden_size)
            loaded[key] = eye.to(ours[key].dtype)
    missing = sorted(set(wanted) - set(theirs))
    unexpected = sorted(set(theirs) - set(wanted))
    shapes = [f"{k}: file {tuple(theirs[k].shape)} vs model {tuple(ours[wanted[k]].shape)}"
              for k in sorted(set(theirs) & set(wanted)) if theirs[k].shape != ours[wanted[k]].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {_short(found)}" for label, found in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if found]
        raise CheckpointError(f"{source}: weights do not match the encoder of its config: " + "; ".join(parts))
    loaded.update({wanted[k]: theirs[k] for k in wanted})
    model.load_state_dict(loaded, strict=True)


def _short(items: list[str], limit: int = 8) -> str:
    return str(items) if len(items) <= limit else f"{items[:limit]} (+{len(items) - limit} more)"


# -------------------------------------------------------------------------------------- reading
def load_pickle(path) -> HubertModel:
    """A fairseq or s3prl pickle checkpoint as a :class:`HubertModel` in eval mode (see the module docstring).

    The caller has decided to trust the file: it is unpickled (``torch.load(..., weights_only=False)``). A file
    of another layout raises ``CheckpointError`` naming it and the keys found."""
    path = Path(path)
    obj = read_pickle(path)
    model_cfg, task_cfg, state, arch, num_classes, criterion = _parse(obj, path)
    config = config_from_fairseq(model_cfg, task_cfg, model_type=arch, num_classes=num_classes,
                                 criterion=criterion, source=str(path))
    model = HubertModel(config)
    from_fairseq_state(state, model, source=str(path))
    return model.eval()


def _parse(obj: Any, path: Path) -> tuple[dict, dict, dict, str, list[int] | None, dict | None]:
    """(model_cfg, task_cfg, state dict, arch, label dictionary sizes, criterion cfg) of a checkpoint object."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict (fairseq or s3prl)")
    keys = sorted(map(str, obj))
    if {"task_cfg", "model_cfg", "model_weight"} <= set(obj):  # s3prl converted
        root = {"model": _plain(obj["model_cfg"]) or {}, "task": _plain(obj["task_cfg"]) or {}}
        root = _resolve(root, root)
        symbols = _plain(obj.get("dictionaries_symbols"))
        state = obj["model_weight"]
        arch = "hubert" if "dictionaries_symbols" in obj or "label_embs_concat" in state else "wav2vec2"
        num_classes = [len(s) for s in symbols] if symbols and all(isinstance(s, list) for s in symbols) else None
        arch = _arch(root["model"], state, path, default=arch)
        return root["model"], root["task"], state, arch, num_classes, None
    if isinstance(obj.get("model"), dict) and ("cfg" in obj or "args" in obj):  # fairseq save_state
        cfg = _plain(obj.get("cfg"))
        if not cfg:
            args = _plain(obj.get("args")) or {}
            cfg = {"model": args, "task": args, "criterion": args}
        cfg = _resolve(cfg, cfg)
        model_cfg, task_cfg = cfg.get("model") or {}, cfg.get("task") or {}
        state = obj["model"]
        finetuned = any(str(k).startswith(FINETUNED_PREFIX) for k in state)
        if finetuned:  # CTC fine-tuned: the pretrained model inside
            inner = model_cfg.get("w2v_args")
            if not isinstance(inner, dict) or not inner:
                raise CheckpointError(f"{path}: a fine-tuned checkpoint without w2v_args (the pretrained model's "
                                      "config); load the pretrained checkpoint instead")
            inner = _resolve(inner, inner)
            if "model" not in inner:  # an argparse-era w2v_args: one flat namespace
                inner = {"model": inner, "task": inner}
            normalize = task_cfg.get("normalize", (inner.get("task") or {}).get("normalize", False))
            model_cfg = inner["model"]
            task_cfg = {**(inner.get("task") or {}), "normalize": normalize}
            state = {k[len(FINETUNED_PREFIX):]: v for k, v in state.items() if str(k).startswith(FINETUNED_PREFIX)}
            criterion = None
        else:
            criterion = cfg.get("criterion") if isinstance(cfg.get("criterion"), dict) else None
        # the pretraining task's label dictionaries (a fine-tuned checkpoint's are its CTC targets': not ours)
        task_state = {} if finetuned else _plain(obj.get("task_state")) or {}
        dictionaries = task_state.get("dictionaries") or []
        num_classes = [len(d["symbols"]) for d in dictionaries
                       if isinstance(d, dict) and isinstance(d.get("symbols"), list)] or None
        arch = _arch(model_cfg, state, path, default="hubert")
        return model_cfg, task_cfg, state, arch, num_classes, criterion
    raise CheckpointError(
        f"{path}: not a fairseq or s3prl checkpoint (keys found: {_short(keys)}); expected fairseq's 'cfg' (or "
        f"'args') + 'model', or s3prl's converted {list(S3PRL_KEYS)}")


def _arch(model_cfg: dict, state: dict, path: Path, default: str) -> str:
    """'hubert' or 'wav2vec2': the config's ``_name`` (or ``arch``), else what the state dict's head says."""
    name = model_cfg.get("_name") or model_cfg.get("arch")
    if name:
        for known, arch in _ARCHS.items():
            if str(name) == known or str(name).startswith(known + "_"):
                return arch
        raise CheckpointError(f"{path}: a fairseq {name!r} model; speechssl reads HuBERT and wav2vec 2.0 "
                              "checkpoints only")
    if "label_embs_concat" in state:
        return "hubert"
    if any(str(k).startswith(("quantizer.", "project_q.")) for k in state):
        return "wav2vec2"
    return default


# -------------------------------------------------------------------------------------- writing
def export_s3prl(model_or_dir, out_pt) -> None:
    """Write s3prl's converted HuBERT checkpoint ``out_pt`` (``torch.save`` of ``task_cfg``, ``model_cfg``,
    ``model_weight``, ``dictionaries_symbols``; atomically), what s3prl's ``hubert_local`` upstream loads.

    ``model_or_dir``: a :class:`HubertModel`, a :class:`HubertPretrainModel` or a speechssl checkpoint directory
    (its pretraining head kept if it has one). With a head, ``dictionaries_symbols`` are the unit ids
    ``"0"..."k-1"`` of each label set (no fairseq special symbols: the head predicts exactly our ``k`` units);
    a bare encoder gets ``[None]`` (s3prl's "no dictionary" case) and a zero ``final_proj``, which s3prl builds
    and no upstream uses. Waveform-CNN HuBERT only: anything else raises ``CheckpointError`` with the reason."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        _, meta = read_config(model_or_dir)
        model = load_model(model_or_dir, pretrain_head=meta.get("model_class") == "HubertPretrainModel")
    else:
        model = _unwrap(model_or_dir)
    if not isinstance(model, (HubertModel, HubertPretrainModel)):
        raise TypeError(f"export_s3prl expects a HubertModel, HubertPretrainModel or checkpoint dir, got {type(model)}")
    config = model.config
    model_cfg, task_cfg = config_to_fairseq(config)
    state = to_fairseq_state(model)
    if isinstance(model, HubertPretrainModel):
        symbols: list = [[str(i) for i in range(k)] for k in config.num_classes]
    else:
        symbols = [None]
        state["final_proj.weight"] = torch.zeros(config.final_dim, config.hidden_size)
        state["final_proj.bias"] = torch.zeros(config.final_dim)
    payload = {"task_cfg": task_cfg, "model_cfg": model_cfg, "model_weight": state, "dictionaries_symbols": symbols}
    with atomic_path(out_pt) as tmp:
        torch.save(payload, tmp)
