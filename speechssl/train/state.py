"""Training state on disk without pickle: tensors in safetensors, everything else in plain JSON.

A training-state "bundle" is two files, ``NAME.safetensors`` + ``NAME.json``. Any nested structure of dicts
(string or int keys), lists, tuples, scalars, ``None``, tensors and numpy arrays round-trips:
tensors go to the safetensors file under a generated key and the JSON holds a reference to it.
That covers ``optimizer.state_dict()``, RNG states (python, numpy, torch, CUDA) and sampler positions.

Checkpoint layout (one directory per saved step)::

    EXP/checkpoints/step-00001000/
        model.safetensors, config.json      speechssl.models.checkpoint.save_model
        train_state.safetensors/.json       optimizer, step, epoch, sampler position, best metric, counters
        rng.safetensors/.json               RNG states of every rank (gathered to rank 0)
        collapse_watch.json                 update-0 effective ranks of the collapse watch (train/collapse.py;
                                            absent when the watch is off)
        COMPLETE                            written last; a directory without it is ignored

The whole directory is one call of ``save_model`` (train/checkpoints.py adds the other files through its
``add_files``): assembled in a temp directory beside it and renamed when complete, so a crash mid-save leaves
either the old set of checkpoints or the new one, never a half-written "latest".

Run identity (:func:`open_run`, shared by pretraining, fine-tuning and SUPERB heads): ``RUN_DIR/run.json`` records
the options and input fingerprints that define a run's result. A rerun into a directory holding a run needs
``--resume`` (same defining options: all but :data:`MAY_CHANGE_ON_RESUME`) or ``--overwrite`` (deletes it first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save

from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_write_bytes, atomic_write_text, check_writable_dir

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "save_bundle",
    "load_bundle",
    "get_rng_state",
    "set_rng_state",
    "preserved_rng",
    "seed_all",
    "derived_seed",
    "checkpoint_dirs",
    "find_latest_checkpoint",
    "mark_complete",
    "is_complete",
    "prune_checkpoints",
    "step_dir_name",
    "RUN_FILE",
    "MAY_CHANGE_ON_RESUME",
    "flatten",
    "dir_fingerprint",
    "open_run",
]


# ---------------------------------------------------------------------------------------------- encoding
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        arr = np.ascontiguousarray(obj)
        # safetensors has no unsigned 32/64-bit types in every torch build: store widened, restore the dtype.
        store = arr.astype(np.int64) if arr.dtype in (np.uint32, np.uint64, np.uint16) else arr
        tensors[key] = torch.from_numpy(store.copy())
        return {"__ndarray__": key, "dtype": str(arr.dtype)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, path)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}  # nan, inf, -inf: JSON has no literal for them
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            if any(k.startswith("__") and k.endswith("__") for k in obj):
                return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"cannot store {path}: dict key {k!r} of type {type(k).__name__}")
            items.append([k, _encode(v, tensors, f"{path}.{k}")])
        return {"__dict__": items}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    raise TypeError(f"cannot store {path} of type {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_bundle(directory: str | Path, name: str, obj: Any) -> None:
    """Write ``obj`` as ``directory/name.safetensors`` + ``directory/name.json`` (atomically, each file)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(obj, tensors, name)
    atomic_write_bytes(directory / f"{name}.safetensors", save(tensors))
    atomic_write_text(directory / f"{name}.json", json.dumps({"format": "speechssl-state-1", "data": meta}, indent=1))


def load_bundle(directory: str | Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    directory = Path(directory)
    jpath, tpath = directory / f"{name}.json", directory / f"{name}.safetensors"
    for p in (jpath, tpath):
        if not p.is_file():
            raise MissingInputError(f"training state file missing: {p}")
    # the models room's readers: a damaged file is one CheckpointError line naming it and what to do
    from speechssl.models.checkpoint import CheckpointError, read_json, read_safetensors

    advice = f"re-copy it, or delete {directory} to resume from an earlier checkpoint"
    header = read_json(jpath, advice=advice)
    if header.get("format") != "speechssl-state-1" or "data" not in header:
        raise CheckpointError(f"{jpath}: unknown training state format {header.get('format')!r}; {advice}")
    tensors = read_safetensors(tpath, device=map_location, advice=advice)
    try:
        return _decode(header["data"], tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # the JSON names tensors the file lacks, ...
        raise CheckpointError(f"{jpath}: does not match {tpath.name} ({type(e).__name__}: {e}); {advice}") from None


# ---------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    """Python, numpy, torch CPU and (when present) CUDA RNG states of this process."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())


def seed_all(seed: int) -> None:
    """Seed the python, numpy and torch RNGs from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a hash of ``parts`` (e.g. seed, update, attempt, micro-batch index)."""
    h = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@contextmanager
def preserved_rng(seed: int) -> Iterator[None]:
    """Run a block with every RNG seeded from ``seed`` and restore the previous states afterwards.

    Validation uses it: masks are the same at every validation (comparable numbers), and validating
    does not move the training RNG (resume stays exact whatever the validation schedule).
    """
    saved = get_rng_state()
    seed_all(seed)
    try:
        yield
    finally:
        set_rng_state(saved)


# ---------------------------------------------------------------------------------------------- checkpoints
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def mark_complete(ckpt_dir: str | Path, info: dict) -> None:
    atomic_write_text(Path(ckpt_dir) / COMPLETE, json.dumps(info, indent=1) + "\n")


def is_complete(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def checkpoint_dirs(root: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the step checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete_only):
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete step checkpoint under ``root`` (incomplete ones are ignored), or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete step checkpoints, and stale temp dirs (of a save that
    crashed: ``save_model``'s ``.step-N.tmp-*`` / ``.step-N.old-*``, or ``.tmp-step-N`` of older versions)."""
    root = Path(root)
    removed = []
    if keep_last > 0:
        for _, p in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for pattern in (".step-*.tmp-*", ".step-*.old-*", ".tmp-step-*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------- run identity
RUN_FILE = "run.json"

# The options that may change when a run is resumed, per kind of run (dotted config keys; the one list, documented in
# the README's "Runs and resume"). Every other option defines the run's result: resuming with another value is
# refused. Pretraining and fine-tuning may extend or cut their budgets (the learning-rate schedule is then computed
# for the new optim.max_steps from the current update on, as fairseq does) and change how often they log, validate
# and save. A SUPERB head's result is its best dev evaluation within optim.max_steps, evaluated every
# optim.eval_every steps: both define it, so neither may change; only logging, saving and where features come from.
MAY_CHANGE_ON_RESUME: dict[str, tuple[str, ...]] = {
    "pretrain": ("optim.max_steps", "optim.max_minutes", "log_every", "valid_every", "progress", "device",
                 "data.num_workers", "ckpt.every_steps", "ckpt.keep_last", "ckpt.trust_pickle"),
    "finetune": ("optim.max_steps", "optim.max_minutes", "log_every", "valid_every", "progress", "device",
                 "data.num_workers", "ckpt.every_steps", "ckpt.keep_last", "trust_pickle"),
    "superb": ("optim.log_every", "optim.save_every", "cache", "cache_dir", "device", "progress", "tensorboard",
               "extract_max_duration"),
}
# every kind: where the run is (a moved directory is the same run)
_NEVER_COMPARED = ("exp_dir", "out")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists and empty dicts are values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dir_fingerprint(path: str | Path) -> str:
    """SHA-1 of a data or label directory's top-level files (names and contents; hidden files skipped), or of a file:
    what a run read from it. A regenerated directory with other contents gets another fingerprint; a copy does not."""
    path = Path(path)
    h = hashlib.sha1()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()
                                                 and not p.name.startswith(".")) if path.is_dir() else []
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest() if files else "missing"


def _show_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _holds_run(run_dir: Path, markers: tuple[str, ...]) -> bool:
    """Whether a run wrote something there that a resume would reuse (``markers``: checkpoints, results); a run
    record alone is a run that failed before it trained, which nothing can mix with."""
    return any(any(run_dir.glob(m)) for m in markers)


def _read_record(rec: Path, ways: str) -> dict:
    try:
        old = json.loads(rec.read_text())
        if not isinstance(old.get("options"), dict):
            raise ValueError("no options")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{rec}: unreadable run record ({e}); {ways}") from e
    return old


def open_run(run_dir: str | Path, kind: str, options: dict, *, resume: bool, overwrite: bool = False,
             inputs: dict[str, str] | None = None, markers: tuple[str, ...] = (), flag: str = "--out") -> bool:
    """Claim ``run_dir`` for a run of ``kind`` defined by ``options`` (a config tree) and ``inputs`` (name ->
    fingerprint of what it reads: data, labels, checkpoints); returns whether an earlier run is continued.

    ``RUN_DIR/run.json`` records both. A directory that holds a run (one of ``markers`` exists: what a resume would
    reuse, e.g. checkpoints) is continued only with ``resume`` and the same defining options (all but
    ``MAY_CHANGE_ON_RESUME[kind]``; a run made before run.json existed cannot be checked and is continued with a
    warning); ``overwrite`` deletes it first. Anything else is one :class:`UserError` line naming the option, its old
    and new values and the ways out. A directory without markers is a new run (its run.json is replaced). Call it
    before the run writes anything."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise UserError(f"{run_dir}: --resume continues the run there and --overwrite deletes it; choose one")
    mutable = set(MAY_CHANGE_ON_RESUME[kind]) | set(_NEVER_COMPARED)
    new = {k: v for k, v in flatten(json.loads(json.dumps(options))).items() if k not in mutable}
    new.update({f"input {k}": v for k, v in (inputs or {}).items()})
    record = {"format": "speechssl-run-1", "kind": kind, "options": new,
              "may_change_on_resume": list(MAY_CHANGE_ON_RESUME[kind])}
    rec = run_dir / RUN_FILE
    check_writable_dir(run_dir, flag)  # a file in the way, a read-only parent: one line before any work
    held = run_dir.is_dir() and _holds_run(run_dir, markers)
    ways = f"another {flag} for a new run, or --overwrite to delete this one and start over"
    old = _read_record(rec, ways) if rec.is_file() else None
    if old is not None and old.get("kind") != kind and not overwrite:
        raise UserError(f"{run_dir} holds a {old.get('kind')} run, not a {kind} run; {ways}")
    held = held or (old is not None and old.get("kind") != kind)  # --overwrite of another kind's run deletes it
    if held and overwrite:
        log.warning("%s: --overwrite: deleting the run there", run_dir)
        shutil.rmtree(run_dir)
        held = False
    elif held and not resume:
        raise UserError(f"{run_dir} holds a {kind} run already: --resume continues it (with its options), or "
                        f"{ways}")
    if held and old is not None:
        old_opts = old["options"]
        diff = [k for k in sorted(set(old_opts) | set(new)) if old_opts.get(k, "<unset>") != new.get(k, "<unset>")]
        if diff:
            k = diff[0]
            what, shown = k, _show_value
            if k.startswith("input "):  # a fingerprint: its first 12 hex digits say enough
                what, shown = k[len("input "):] + " (its contents changed)", lambda v: str(v)[:12]
            more = f" (and {len(diff) - 1} more: {', '.join(diff[1:4])}{', ...' if len(diff) > 4 else ''})" \
                if len(diff) > 1 else ""
            raise UserError(f"{run_dir}: --resume with {what} = {shown(new.get(k, '<unset>'))}, but the run was "
                            f"made with {shown(old_opts.get(k, '<unset>'))}{more}; resume with the run's "
                            f"options, or {ways}. May change on resume: {', '.join(MAY_CHANGE_ON_RESUME[kind])}")
        return True
    if held:  # a run made before run.json: nothing to compare with
        log.warning("%s: a run without %s (made by an older speechssl); resuming it with these options, which cannot "
                    "be checked against the ones it was made with", run_dir, RUN_FILE)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(rec, json.dumps(record, indent=1) + "\n")
    return held
