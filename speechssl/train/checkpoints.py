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

from torch import nn

from speechssl.errors import MissingInputError, UserError
from speechssl.models.checkpoint import CheckpointError, load_weights, save_model
from speechssl.models.config import HubertConfig
from speechssl.train import state as st

log = logging.getLogger(__name__)

__all__ = ["save_step", "save_best", "resolve_resume", "load_step", "init_encoder", "sampler_state_for"]


def save_step(ckpt_root: Path, model: nn.Module, model_cfg: HubertConfig, *, step: int, extra: dict,
              train_state: dict, rng: list[dict], collapse_watch: Any, world_size: int, keep_last: int) -> Path:
    """Write ``ckpt_root/step-N`` (one atomic directory, ``COMPLETE`` last) and prune all but ``keep_last``."""
    final = Path(ckpt_root) / st.step_dir_name(step)

    def add_state(tmp: Path) -> None:
        st.save_bundle(tmp, "train_state", train_state)
        st.save_bundle(tmp, "rng", {"ranks": rng})
        if collapse_watch is not None:
            collapse_watch.save(tmp)  # the update-0 reference travels with the checkpoint
        st.mark_complete(tmp, {"step": step, "world_size": world_size, "time": time.time()})

    save_model(model, model_cfg, final, extra=extra, add_files=add_state)
    st.prune_checkpoints(ckpt_root, keep_last)
    return final


def save_best(best_dir: Path, step_dir: Path, model: nn.Module, model_cfg: HubertConfig, extra: dict) -> None:
    """``EXP/best`` = the model just saved in ``step_dir`` (its weights linked, not written again); ``extra`` in
    its ``config.json`` records the step, the criterion and the validation numbers."""
    save_model(model, model_cfg, best_dir, extra=json.loads(json.dumps(extra)), weights_from=step_dir)


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


def init_encoder(model: nn.Module, path: str) -> None:
    """Encoder weights of an earlier checkpoint for a new run; every encoder tensor must match exactly.

    The head (``final_proj``, label embeddings) is never copied: the next iteration's labels are a new unit
    inventory (unit 7 of the MFCC k-means has nothing to do with unit 7 of a hidden-layer k-means), so the
    old embeddings would only be a misleading start. Continuing with the same labels is ``--resume``.
    """
    try:
        load_weights(model, path, encoder_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"ckpt.init_from: {e}; model.* must match the encoder you start from") from e


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
