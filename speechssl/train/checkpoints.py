"""Checkpoints of a pretraining run: save a step, update ``EXP/best``, find and read a resume point, ``init_from``.

Model files go through the models room only: :func:`speechssl.models.checkpoint.save_model` writes the whole step
directory in one atomic rename (model + ``config.json``, plus the trainer's state bundles, the collapse watch's
reference and the ``COMPLETE`` marker through its ``add_files``; layout in ``train/state.py``), and ``EXP/best`` with
its weights hard-linked from that step (written once). :func:`speechssl.models.checkpoint.load_weights` reads
them back with strict key and shape checks: the whole model and the same model config on resume, the encoder
alone for ``ckpt.init_from``. The training state (``train_state``, ``rng`` bundles) is the trainer's own.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechssl.errors import MissingInputError, UserError
from speechssl.models.checkpoint import CheckpointError, checkpoint_dir, load_weights, save_model
from speechssl.models.config import HubertConfig
from speechssl.train import state as st

log = logging.getLogger(__name__)

__all__ = ["save_step", "save_best", "resolve_resume", "load_step", "init_encoder", "check_init_config",
           "sampler_state_for"]


def save_step(ckpt_root: Path, model: nn.Module, model_cfg: HubertConfig, *, step: int, extra: dict,
              train_state: dict, rng: list[dict], collapse_watch: Any, world_size: int, keep_last: int,
              partial: dict | None = None) -> Path:
    """Write ``ckpt_root/step-N`` (one atomic directory, ``COMPLETE`` last) and prune all but ``keep_last``."""
    final = Path(ckpt_root) / st.step_dir_name(step)

    def add_state(tmp: Path) -> None:
        st.save_bundle(tmp, "train_state", train_state)
        st.save_bundle(tmp, "rng", {"ranks": rng})
        if collapse_watch is not None:
            collapse_watch.save(tmp)  # the update-0 reference travels with the checkpoint
        st.mark_complete(tmp, {"step": step, "world_size": world_size, "time": time.time()})

    save_model(model, model_cfg, final, extra=extra, add_files=add_state, partial=partial)
    st.prune_checkpoints(ckpt_root, keep_last)
    return final


def save_best(best_dir: Path, step_dir: Path, model: nn.Module, model_cfg: HubertConfig, extra: dict,
              partial: dict | None = None) -> None:
    """``EXP/best`` = the model just saved in ``step_dir`` (its weights linked, not written again); ``extra`` in
    its ``config.json`` records the step, the criterion and the validation numbers."""
    save_model(model, model_cfg, best_dir, extra=json.loads(json.dumps(extra)), weights_from=step_dir,
               partial=partial)


def resolve_resume(resume: str | None, ckpt_root: Path, *, announce: bool) -> Path | None:
    """The checkpoint dir ``--resume`` names: ``auto`` = the newest complete one under ``ckpt_root`` (None if there
    is none), a path = that dir, which must be complete; None or "" = no resume."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        latest = st.find_latest_checkpoint(ckpt_root)
        if latest is None and announce:
            log.info("--resume auto: no complete checkpoint in %s; starting from scratch", ckpt_root)
        return latest
    p = Path(resume)
    if not p.is_dir():
        raise MissingInputError(f"--resume {resume}: no such checkpoint directory")
    if not st.is_complete(p):
        raise UserError(f"--resume {resume}: checkpoint is incomplete (no {st.COMPLETE} marker); "
                         "it was interrupted while being written")
    return p


def load_step(ckpt: Path, model: nn.Module, model_cfg: HubertConfig) -> tuple[dict, list[dict]]:
    """Weights of ``ckpt`` into ``model`` (strict; the model config must be the checkpoint's); returns the
    training state and the RNG states of the saving ranks."""
    try:
        load_weights(model, ckpt, config=model_cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; resume with the same model.* settings (or start a new exp_dir and use "
                              "ckpt.init_from)") from e
    return st.load_bundle(ckpt, "train_state"), st.load_bundle(ckpt, "rng")["ranks"]


# HubertConfig fields a continued run may set as it likes (everything else is the encoder's architecture and must
# equal the checkpoint's): the pretraining head, which starts fresh, and the masking / loss settings of the new
# run; regularisation, which changes training, not the function the weights compute.
INIT_HEAD_FIELDS = ("final_dim", "num_classes", "untie_final_proj", "logit_temp", "mask_prob", "mask_length",
                    "mask_min_masks", "pred_masked_weight", "pred_nomask_weight", "feature_penalty_weight")
INIT_REGULARISATION_FIELDS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout",
                              "layerdrop", "feature_grad_mult")


def init_encoder(model: nn.Module, path: str, *, trust_pickle: bool = False) -> None:
    """Initialise the encoder of a new run (``model.hubert`` of a :class:`HubertPretrainModel`, or a bare
    :class:`HubertModel`) from ``path`` (``ckpt.init_from``): anything :func:`speechssl.upstream.load` reads.

    * a speechssl checkpoint directory (a pretraining step, ``EXP/best``, or a bare encoder);
    * a local transformers ``HubertModel`` / ``Wav2Vec2Model`` directory (or a ``*For...`` model of them: their
      heads are dropped);
    * a fairseq or s3prl ``.pt`` pickle: only with ``trust_pickle=True`` (``speechssl pretrain --trust-pickle``,
      config ``ckpt.trust_pickle``), since unpickling can run arbitrary code; refused otherwise.

    The run's ``model.*`` is checked against the checkpoint's encoder config before any weight of ``model`` is
    touched: a difference in an architectural field is one :class:`CheckpointError` line naming each field with
    both values. Fields that may differ, as a user continuing pretraining legitimately changes them (and whose
    checkpoint values are ignored): the pretraining head and its loss (``final_dim``, ``num_classes``,
    ``untie_final_proj``, ``logit_temp``, ``mask_prob``, ``mask_length``, ``mask_min_masks``, ``pred_*_weight``,
    ``feature_penalty_weight``) and regularisation (``hidden_dropout``, ``attention_dropout``,
    ``activation_dropout``, ``feat_proj_dropout``, ``layerdrop``, ``feature_grad_mult``). Every other field must
    match, ``num_mel_bins`` only for the fbank frontend. A wav2vec 2.0 encoder is HuBERT's architecture (the same
    parameters and forward; its feature projection always has the LayerNorm, so ``model.feat_proj_layer_norm``
    must be true) and initialises a HuBERT run; a WavLM encoder (gated relative position bias) does not.

    Every encoder tensor is copied exactly, ``masked_spec_embed`` included (a transformers directory without one,
    saved with ``mask_time_prob=0``, gives a fresh one). The head (``final_proj``, label embeddings) is never
    copied: the next iteration's labels are a new unit inventory (unit 7 of the MFCC k-means has nothing to do
    with unit 7 of a hidden-layer k-means), so old embeddings would only be a misleading start, and a transformers
    or fairseq checkpoint has none of ours. Continuing with the same labels and head is ``--resume``.

    The global RNG is left as it was (building the source model draws from it inside ``fork_rng``), so a run
    initialised from a checkpoint sees the same masks, dropout and data order as a random-init run of the same seed.
    """
    from speechssl import upstream

    encoder = getattr(model, "module", model)
    encoder = getattr(encoder, "_orig_mod", encoder)
    encoder = getattr(encoder, "hubert", encoder)
    where = f"ckpt.init_from {path}"
    try:
        checkpoint_dir(path)  # a checkpoint's own model.safetensors / config.json: one line naming its directory
    except CheckpointError as e:
        raise CheckpointError(f"ckpt.init_from: {e}") from e
    if Path(path).is_file() and not trust_pickle:
        raise UserError(f"{where}: a pickle checkpoint (fairseq / s3prl); unpickling can run arbitrary code, so it is "
                        "refused by default. If you trust its source: speechssl pretrain --trust-pickle (config: "
                        "ckpt.trust_pickle=true)")
    try:
        with torch.random.fork_rng(devices=[]):
            source = upstream.load(path, trust_pickle=trust_pickle).model
    except UserError as e:  # the reader's one line (it names the path), said to be about ckpt.init_from
        try:
            prefixed = type(e)(f"ckpt.init_from: {e}")
        except TypeError:  # an error type with another constructor
            prefixed = UserError(f"ckpt.init_from: {e}")
        raise prefixed from e
    check_init_config(encoder.config, source.config, where)
    with torch.no_grad():
        try:
            encoder.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as e:  # configs that agree build the same tensors: a bug, not the user's
            raise RuntimeError(f"{where}: equal encoder configs but different tensors: {e}") from e
    if source.config.model_type != encoder.config.model_type:
        log.info("%s: a %s encoder (the same architecture as HuBERT's) initialises this %s run", where,
                 source.config.model_type, encoder.config.model_type)


def check_init_config(run: HubertConfig, ckpt: HubertConfig, where: str) -> None:
    """One :class:`CheckpointError` line when the encoder of ``ckpt`` cannot initialise a run of ``run``: each
    differing architectural field (see :func:`init_encoder`) as ``model.FIELD RUN vs checkpoint CKPT``."""
    if ckpt.model_type == "wavlm" and run.model_type != "wavlm":
        raise CheckpointError(f"{where}: a WavLM encoder (gated relative position bias in every attention layer) "
                              f"cannot initialise a {run.model_type} run; start from a HuBERT or wav2vec 2.0 "
                              "checkpoint")
    skip = set(INIT_HEAD_FIELDS) | set(INIT_REGULARISATION_FIELDS) | {"model_type", "num_buckets",
                                                                       "max_bucket_distance"}
    if run.model_type == "wavlm":
        skip -= {"model_type", "num_buckets", "max_bucket_distance"}
    if run.frontend != "fbank" or ckpt.frontend != "fbank":
        skip.add("num_mel_bins")
    mine, theirs = run.to_dict(), ckpt.to_dict()
    diff = [f"model.{k} {_show(mine[k])} vs checkpoint {_show(theirs[k])}"
            for k in mine if k not in skip and mine[k] != theirs[k]]
    if diff:
        raise CheckpointError(f"{where}: " + "; ".join(diff) + " (the encoder's architecture must match the "
                              "checkpoint's; set these model.* fields to the checkpoint's values)")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, bool, str)) or value is None else str(value)


def sampler_state_for(ts: dict, world: int, accum_grad: int, max_duration: float) -> dict:
    """The saved sampler position, for ``world`` processes (lhotse hands every rank one batch in turn, so
    ``old_world * done`` batches of the stream were consumed); warns when the effective batch changed."""
    state = dict(ts["sampler"])
    old_world = int(ts["world_size"])
    if old_world != world:
        state["batches_done"] = old_world * int(state["batches_done"]) // world
        log.warning("resuming with %d process(es) instead of %d: the data order differs from the "
                    "uninterrupted run (continuing at batch %d of epoch %d)", world, old_world,
                    state["batches_done"], state["epoch"])
    if old_world * int(ts["accum_grad"]) * float(ts["max_duration"]) != world * accum_grad * max_duration:
        log.warning("the effective batch changed on resume (was %d x %g s x %d)", old_world,
                    float(ts["max_duration"]), int(ts["accum_grad"]))
    return state
