"""Model checkpoints without pickle: ``model.safetensors`` + ``config.json``, written atomically.

``config.json`` layout::

    {"format": "speechssl-hubert", "version": 1,
     "model_class": "HubertPretrainModel" | "Wav2Vec2PretrainModel" | "BestRQPretrainModel" | "HubertModel"
                    | "CTCModel",
     "model": {...HubertConfig.to_dict()...}, "extra": {...caller metadata: step, label sets, ...},
     "ctc": {...CTCHeadConfig.to_dict()...}                     (CTCModel only),
     "partial": {"base": PATH, "base_sha1": SHA1, "keys": [...]}  (only the tensors that were trained)}

A *partial* checkpoint (parameter-efficient fine-tuning: adapters or LoRA on a frozen base) holds only the trained
tensors; ``partial`` names the frozen base checkpoint and the SHA-1 of its weights, so that loading it against other
weights is an error instead of a silently different model. Rebuilding it (base + trained tensors) is the fine-tuning
room's business (``speechssl.train.finetune.load_finetuned``); :func:`load_weights` reads the trained tensors.

One writer, one reader: :func:`save_model` is the only function that writes a checkpoint directory (the trainer
adds its own files to the same atomic write through ``add_files``, and makes ``EXP/best`` with ``weights_from``),
:func:`load_weights` the only one that reads ``model.safetensors`` (into a given model, keys checked strictly; the
encoder alone with ``encoder_only``); :func:`load_model` is ``read_config`` + build + ``load_weights``.

Every checkpoint file is opened here: :func:`read_safetensors` (weights, and the trainer's state bundles) and
:func:`read_json` (``config.json`` and the JSON files of transformers directories); :func:`checkpoint_dir`
checks a path given as a checkpoint directory. A file that cannot be read (truncated, garbage, empty, not JSON),
a ``config.json`` that does not describe the weights beside it, and a weights file given where its directory is
expected are each one :class:`CheckpointError` line naming the file and what to do, never a library's exception.

transformers directories (reading and ``export_hf``) are :mod:`speechssl.models.hf`'s business; it writes through
:func:`_write_dir_atomic` and reads through :func:`read_safetensors` / :func:`read_json` too.
Training state (optimizer, scheduler, RNG) is the trainer's business and lives in separate files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_dir

from .config import HubertConfig
from .ctc import CTCHeadConfig, CTCModel
from .hubert import HubertModel
from .pretrain import PRETRAIN_CLASSES, PRETRAIN_MODELS, build_pretrain_model

__all__ = ["save_model", "load_model", "load_weights", "read_config", "CheckpointError", "read_safetensors",
           "read_json", "checkpoint_dir", "REDO"]

FORMAT = "speechssl-hubert"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read as asked; the message names the directory and the problem."""


REDO = "re-copy or re-export the checkpoint"  # what to do about a damaged checkpoint file


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def read_safetensors(path, *, device: str | torch.device = "cpu", advice: str = REDO) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path`` (on ``device``): the one place a ``.safetensors`` file is opened
    (model weights, transformers weights, the trainer's state bundles).

    An empty, truncated or garbage file is one :class:`CheckpointError` line: ``PATH: corrupt or truncated
    safetensors file (what safetensors says); ADVICE`` (``advice``: what to do, by default :data:`REDO`)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a safetensors file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; {advice}")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not a safetensors file; {advice}")
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # not our CheckpointError (a ValueError)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {_one_line(e)}); "
                              f"{advice}") from None


def read_json(path, *, advice: str = REDO) -> dict[str, Any]:
    """The JSON object in file ``path`` (a checkpoint's ``config.json``, a transformers directory's JSON files).

    A missing file is a :class:`~speechssl.errors.MissingInputError`; an unreadable one, one that is not JSON, or
    JSON that is not an object is one :class:`CheckpointError` line naming the file, ending in ``advice``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {_one_line(e)}); {advice}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)}); {advice}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; {advice}")
    return data


def checkpoint_dir(path) -> Path:
    """``path`` as a checkpoint directory; a checkpoint's own file given instead (its ``model.safetensors`` or
    another ``.safetensors`` file, its ``config.json``) is one :class:`CheckpointError` line naming the directory
    to give. Whether the directory exists and what it holds is the reader's to say."""
    path = Path(path)
    if path.is_file() and (path.suffix == ".safetensors" or path.name == CONFIG):
        what = "a safetensors file" if path.suffix == ".safetensors" else f"a checkpoint's {CONFIG}"
        where = (f"{path.parent}, with {CONFIG}" if (path.parent / CONFIG).is_file()
                 else f"a directory with {CONFIG} and {WEIGHTS}; {path.parent} has no {CONFIG}")
        raise CheckpointError(f"{path} is {what}; give the checkpoint directory that holds it ({where})")
    return path


def _write_dir_atomic(out_dir: Path, files: dict[str, Any], add_files: Callable[[Path], None] | None = None) -> None:
    """Write ``files`` (name -> dict of tensors for .safetensors, a file to hard-link or copy, or a JSON-able object)
    into a temp directory beside ``out_dir``, let ``add_files(temp_dir)`` add more, then rename it into place
    (:func:`speechssl.fileio.atomic_dir`; an existing ``out_dir`` is replaced)."""
    with atomic_dir(out_dir, replace=True) as tmp:
        for name, content in files.items():
            path = tmp / name
            if isinstance(content, Path):
                _link_or_copy(content, path)
            elif name.endswith(".safetensors"):
                save_file(content, str(path), metadata={"format": "pt"})
            else:
                path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if add_files is not None:
            add_files(tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no second copy of the bytes), or a copy where the filesystem has no links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous CPU copies; safetensors refuses shared storage, which no parameter here has
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(
    model: nn.Module,
    config: HubertConfig,
    out_dir,
    extra: dict | None = None,
    *,
    weights_from=None,
    add_files: Callable[[Path], None] | None = None,
    partial: dict | None = None,
) -> None:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` atomically: the one checkpoint writer.

    ``model`` is a pretraining model (``models/pretrain.py``), a :class:`CTCModel` or a :class:`HubertModel` (a
    DDP/compiled wrapper is unwrapped);
    ``extra`` is JSON-able metadata stored under ``"extra"`` (step, label sets, k-means hash, ...).
    ``weights_from``: a checkpoint directory already holding exactly these weights (same model class and
    config): its ``model.safetensors`` is hard-linked (copied where links fail) instead of serialised again.
    ``add_files(temp_dir)``: writes further files into the directory before it is renamed into place, so they
    appear together with the model or not at all (the trainer's training state and completion marker).
    ``partial``: ``{"base": path, "base_sha1": sha1, "keys": [names]}``: write only those tensors (a model tuned
    with adapters or LoRA on a frozen base; see the module docstring).
    """
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, (HubertModel, CTCModel, *PRETRAIN_CLASSES)):
        raise TypeError(f"save_model expects a HubertModel, a pretraining model or a CTCModel, got {type(model).__name__}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "model": config.to_dict(),
        "extra": extra or {},
    }
    if isinstance(model, CTCModel):
        meta["ctc"] = model.head_config.to_dict()
    if partial is not None:
        meta["partial"] = {"base": str(partial["base"]), "base_sha1": partial["base_sha1"],
                           "keys": sorted(partial["keys"])}
    json.dumps(meta)  # fail before writing anything if extra is not plain JSON
    weights: Any
    if weights_from is None:
        weights = _state_dict(model)
        if partial is not None:
            missing = sorted(set(partial["keys"]) - set(weights))
            if missing:
                raise KeyError(f"save_model: partial keys not in the model: {missing[:5]}")
            weights = {k: weights[k] for k in meta["partial"]["keys"]}
    else:
        _, src = read_config(weights_from)
        if (src.get("model_class"), _plain(src["model"]), src.get("ctc"), src.get("partial")) != (
                meta["model_class"], _plain(meta["model"]), meta.get("ctc"), meta.get("partial")):
            raise CheckpointError(f"{weights_from}: holds another model ({src.get('model_class')}, other config) "
                                  f"than the one to save; weights_from must hold these very weights")
        weights = Path(weights_from) / WEIGHTS
    _write_dir_atomic(Path(out_dir), {WEIGHTS: weights, CONFIG: meta}, add_files)


def read_config(ckpt_dir) -> tuple[HubertConfig, dict]:
    """``(HubertConfig, full config.json dict)`` of a checkpoint written by :func:`save_model`; anything else
    (no such directory, a file, no or a broken ``config.json``, another format) is one :class:`CheckpointError`
    line naming the path."""
    ckpt_dir = checkpoint_dir(ckpt_dir)
    path = ckpt_dir / CONFIG
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory (one holding {CONFIG} and {WEIGHTS})")
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {CONFIG} (not a speechssl checkpoint directory)")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                              "(a transformers directory? load it through speechssl.upstream)")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no 'model' settings (the encoder's config); {REDO}")
    try:
        return HubertConfig.from_dict(model), meta
    except (TypeError, ValueError) as e:  # unknown keys, values out of range (UserError is a ValueError)
        raise CheckpointError(f"{path}: 'model' settings unusable ({_one_line(e)}); {REDO}") from None


def load_model(ckpt_dir, *, pretrain_head: bool = True) -> nn.Module:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` with strict key checking.

    ``pretrain_head=True`` returns the checkpoint's own model class: a pretraining model (its objective's) or a
    :class:`CTCModel` (a fine-tuned one; a partial one needs its base: ``speechssl.train.finetune.load_finetuned``);
    ``False`` returns the bare :class:`HubertModel` (from any kind of checkpoint). Returned in eval mode.
    """
    config, meta = read_config(ckpt_dir)
    model: nn.Module
    if not pretrain_head:
        model = HubertModel(config)
    elif meta.get("model_class") == "CTCModel":
        try:
            head = CTCHeadConfig.from_dict(meta["ctc"])
        except (KeyError, TypeError, ValueError) as e:  # UserError is a ValueError
            what = "no 'ctc' settings" if isinstance(e, KeyError) else f"'ctc' settings unusable ({_one_line(e)})"
            raise CheckpointError(f"{Path(ckpt_dir) / CONFIG}: {what}; {REDO}") from None
        model = CTCModel(config, head)
    else:
        model = build_pretrain_model(config)
    load_weights(model, ckpt_dir, encoder_only=not pretrain_head)
    return model.eval()


def load_weights(model: nn.Module, ckpt_dir, *, encoder_only: bool = False, config: HubertConfig | None = None) -> dict:
    """Load a checkpoint's ``model.safetensors`` into ``model`` with strict key and shape checking: the one reader.

    ``encoder_only=False``: every tensor of ``model`` comes from the file and the file has no other.
    ``encoder_only=True``: only the encoder (``model.hubert`` of a pretraining model or CTC model, or a bare
    :class:`HubertModel`) is loaded, from the encoder of either kind of checkpoint; a head is left as it is.
    ``config``: when given, ``config.json``'s model settings must equal it (the trainer's resume).
    Returns the ``config.json`` dict; the train/eval mode of ``model`` is unchanged.
    """
    ckpt_dir = Path(ckpt_dir)
    saved_config, meta = read_config(ckpt_dir)
    if config is not None:
        mine, saved = _plain(config.to_dict()), _plain(saved_config.to_dict())
        diff = sorted(k for k in mine if mine[k] != saved.get(k))
        if diff:
            raise CheckpointError(f"{ckpt_dir}: model config differs from the checkpoint's in {diff}")
    weights = ckpt_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS}; {REDO}")
    state = read_safetensors(weights)
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    # a model built from this very config.json: a mismatch is the checkpoint's own (config and weights disagree)
    own = _plain(getattr(getattr(model, "config", None), "to_dict", dict)()) == _plain(saved_config.to_dict())
    hint = f"{CONFIG} and {WEIGHTS} describe different models; {REDO}" if own else ""
    saved_class = meta.get("model_class")
    # the encoder under "hubert."
    saved_head = saved_class in ("CTCModel", *(c.__name__ for c in PRETRAIN_MODELS.values()))
    if "partial" in meta:
        if encoder_only or not isinstance(model, CTCModel):
            raise CheckpointError(f"{ckpt_dir}: holds only the tensors tuned on the frozen base "
                                  f"{meta['partial']['base']}; load it with speechssl.train.finetune.load_finetuned")
        _load_strict(model, state, weights, encoder_only, subset=True, hint=hint)
        return meta
    if encoder_only:
        model = model.hubert if isinstance(model, (CTCModel, *PRETRAIN_CLASSES)) else model
        if saved_head:
            state = {k[len("hubert."):]: v for k, v in state.items() if k.startswith("hubert.")}
    elif isinstance(model, (CTCModel, *PRETRAIN_CLASSES)) and saved_class != type(model).__name__:
        raise CheckpointError(f"{ckpt_dir}: holds a {saved_class}, not a {type(model).__name__}; load its encoder "
                              "alone (load_model: pretrain_head=False; load_weights: encoder_only=True)")
    _load_strict(model, state, weights, encoder_only, hint=hint)
    return meta


def _plain(obj: Any) -> Any:
    """JSON types only (tuples become lists), so that configs compare by value."""
    return json.loads(json.dumps(obj))


_SHOWN = 5  # names listed per kind of mismatch


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source, encoder_only: bool, *,
                 subset: bool = False, hint: str = "") -> None:
    """Every tensor of ``model`` from ``state`` and no other (``subset``: ``state`` holds some of the model's
    tensors, the others are kept), shapes equal; a :class:`CheckpointError` listing what does not match (the first
    few of each kind, and how many more), then ``hint`` (what to do)."""
    expected = model.state_dict()
    missing = [] if subset else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        what = (("encoder parameters missing", "unexpected encoder parameters", "encoder shape mismatches")
                if encoder_only else ("missing keys", "unexpected keys", "shape mismatches"))
        parts = [f"{label} {found[:_SHOWN]}" + (f" (+{len(found) - _SHOWN} more)" if len(found) > _SHOWN else "")
                 for label, found in zip(what, (missing, unexpected, shapes)) if found]
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts)
                              + (f"; {hint}" if hint else ""))
    model.load_state_dict(state, strict=not subset)
