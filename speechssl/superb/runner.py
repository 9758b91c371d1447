"""Train and evaluate one SUPERB task on one upstream: ``speechssl superb --task T --upstream U --data DIR --out EXP``.

For each learning rate of the sweep (``--lr-sweep``; default: the task config's ``optim.lr``) a featurizer + head
is trained from the same seed on the training split for ``optim.max_steps`` steps, evaluated on dev every
``optim.eval_every`` steps (the best dev checkpoint is kept); the learning rate whose best dev score wins is then
evaluated on test. ER runs this per fold (held-out session) and reports the mean.

Layout of ``EXP`` (ER: ``EXP/fold_<session>/lr_<lr>/``)::

    EXP/results.json              the run: test + dev metrics, chosen lr, sweep, config, timings (written last)
    EXP/layer_weights.{json,png}  the chosen head's learned layer weights
    EXP/lr_<lr>/ckpt-<step>/      resumable: model.safetensors (featurizer.* + head.*), state.safetensors
                                  (optimizer tensors, RNG), state.json (step, epoch, batch position, optimizer
                                  scalars, task vocabularies, dev history); the newest one is kept
    EXP/lr_<lr>/best/             model.safetensors + state.json of the best dev evaluation
    EXP/lr_<lr>/result.json       that lr's dev history and best (marks it finished)
    EXP/lr_<lr>/tensorboard/      with --tensorboard

Batches hold at most ``optim.max_duration`` seconds of padded audio, drawn from ``optim.num_buckets`` duration
buckets (shuffled per epoch from ``seed + epoch``), never a fixed utterance count. Resume (``--resume``) restores
weights, optimizer, RNG and the sampler position: the losses after a resume equal the uninterrupted run's.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from speechssl.config import to_dict
from speechssl.data.kaldi import DataDir, read_data_dir
from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_dir, atomic_write_text
from speechssl.progress import progress_bar
from speechssl.superb.cache import (FeatureSource, LiveFeatures, PooledFeatures, _pad_stack, build_cache,
                                    utterance_durations)
from speechssl.superb.config import SuperbConfig, load_superb_config
from speechssl.superb.featurizer import build_featurizer, save_layer_weights
from speechssl.superb.tasks import Example, Split, Task, er_folds, make_task
from speechssl.upstream import parse_layers
from speechssl.superb.upstreams import SPECTRAL, load_upstream, upstream_fingerprint, upstream_label

__all__ = ["run_superb", "train_head", "duration_batches", "resolve_splits", "results_table", "HeadTrainer"]

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


# ------------------------------------------------------------------------------------------------ batching
def duration_batches(durations: Sequence[float], max_duration: float, *, num_buckets: int = 10, seed: int = 0,
                     epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Indices in batches of at most ``max_duration`` seconds of padded audio (longest x count; an utterance
    longer than that is a batch of its own). ``shuffle``: utterances sorted by duration are cut into
    ``num_buckets`` equal buckets, shuffled within each, batched, and the batches shuffled (``seed + epoch``);
    otherwise sorted by duration (evaluation)."""
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        buckets = [list(b) for b in np.array_split(np.array(order, dtype=np.int64), max(1, num_buckets)) if len(b)]
        groups = [list(rng.permutation(b)) for b in buckets]
    else:
        groups = [order]
    batches: list[list[int]] = []
    for g in groups:
        cur: list[int] = []
        longest = 0.0
        for i in g:
            i = int(i)
            d = max(longest, durations[i])
            if cur and d * (len(cur) + 1) > max_duration:
                batches.append(cur)
                cur, d = [], durations[i]
            cur.append(i)
            longest = d
        if cur:
            batches.append(cur)
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[int(i)] for i in perm]
    return batches


# ------------------------------------------------------------------------------------------------ checkpoints
def _optim_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _model_tensors(featurizer: nn.Module, head: nn.Module) -> dict[str, Tensor]:
    out = {f"featurizer.{k}": v.detach().cpu().contiguous() for k, v in featurizer.state_dict().items()}
    out.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    return out


def _load_model_tensors(featurizer: nn.Module, head: nn.Module, path: Path) -> None:
    t = load_file(str(path))
    featurizer.load_state_dict({k[len("featurizer."):]: v for k, v in t.items() if k.startswith("featurizer.")})
    head.load_state_dict({k[len("head."):]: v for k, v in t.items() if k.startswith("head.")})


def _ckpts(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("ckpt-*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ------------------------------------------------------------------------------------------------ training
@dataclass
class HeadTrainer:
    """Trains one featurizer + head at one learning rate (see the module docstring)."""

    task: Task
    cfg: SuperbConfig
    train: Split
    dev: Split
    sources: dict[str, FeatureSource]   # split name -> features
    lr: float
    run_dir: Path
    seed: int = 0
    progress: bool = True
    tensorboard: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        src = self.sources["train"]
        torch.manual_seed(self.seed)
        self.featurizer = build_featurizer(self.cfg.featurizer.kind, len(src.layers), src.dim,
                                           layer_norm=self.cfg.featurizer.layer_norm)
        self.head = self.task.build_head(self.featurizer.out_dim)
        self.featurizer.to(self.device)
        self.head.to(self.device)
        params = list(self.featurizer.parameters()) + list(self.head.parameters())
        o = self.cfg.optim
        cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        self.opt = cls(params, lr=self.lr, weight_decay=o.weight_decay)
        self.step = self.epoch = self.pos = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.losses: list[float] = []   # every training loss of this process (tests compare them)
        self.result: dict[str, Any] = {}

    # -- features
    def features(self, split: str, exs: Sequence[Example]) -> tuple[Tensor, Tensor]:
        layers, lens = self.sources[split].get([e.utt for e in exs])
        return self.featurizer(layers.to(self.device, non_blocking=True)), lens.to(self.device)

    def eval_batches(self, split: Split) -> Iterator[tuple[list[Example], Tensor, Tensor]]:
        durs = [e.duration for e in split.examples]
        for idx in duration_batches(durs, self.cfg.optim.eval_max_duration, shuffle=False):
            exs = [split.examples[i] for i in idx]
            x, lens = self.features(split.name, exs)
            yield exs, x, lens

    @torch.no_grad()
    def evaluate(self, split: Split) -> dict[str, float]:
        self.featurizer.eval()
        self.head.eval()
        try:
            return self.task.evaluate(self.head, self.eval_batches(split), split)
        finally:
            self.featurizer.train()
            self.head.train()

    # -- checkpoints
    def _state_json(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "lr": self.lr, "seed": self.seed,
                "task": self.cfg.task, "task_state": self.task.state(), "history": self.history,
                "best": self.best, "config": to_dict(self.cfg)}

    def save(self) -> Path:
        tensors, meta = _optim_to_flat(self.opt)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.device(self.device).type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        out = self.run_dir / f"ckpt-{self.step}"
        if out.exists():
            shutil.rmtree(out)
        with atomic_dir(out) as tmp:
            save_file(_model_tensors(self.featurizer, self.head), str(tmp / "model.safetensors"))
            save_file(tensors, str(tmp / "state.safetensors"))
            state = self._state_json()
            state["optimizer"] = meta
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        for old in _ckpts(self.run_dir):
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        return out

    def load(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        if state["lr"] != self.lr or state["task"] != self.cfg.task:
            raise UserError(f"{ckpt}: a checkpoint of task {state['task']} at lr {state['lr']}, not "
                            f"{self.cfg.task} at {self.lr}; use another --out")
        self.task.load_state(state["task_state"])
        _load_model_tensors(self.featurizer, self.head, ckpt / "model.safetensors")
        t = load_file(str(ckpt / "state.safetensors"))
        _optim_from_flat(self.opt, t, state["optimizer"])
        torch.set_rng_state(t["rng.torch"])
        if "rng.cuda" in t and torch.device(self.device).type == "cuda":
            torch.cuda.set_rng_state(t["rng.cuda"], self.device)
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.history, self.best = state["history"], state["best"]

    def save_best(self, dev: dict[str, float]) -> None:
        out = self.run_dir / "best"
        tmp_old = self.run_dir / ".best.old"
        shutil.rmtree(tmp_old, ignore_errors=True)
        if out.exists():
            out.rename(tmp_old)
        with atomic_dir(out) as tmp:
            save_file(_model_tensors(self.featurizer, self.head), str(tmp / "model.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "dev": dev, "lr": self.lr,
                                                        "task_state": self.task.state()}, indent=1) + "\n")
        shutil.rmtree(tmp_old, ignore_errors=True)

    def load_best(self) -> None:
        _load_model_tensors(self.featurizer, self.head, self.run_dir / "best" / "model.safetensors")

    # -- the loop
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.task.higher_is_better else a < b

    def run(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``optim.max_steps`` (or, for tests, only until step ``stop_after``); returns the lr's result."""
        o = self.cfg.optim
        self.run_dir.mkdir(parents=True, exist_ok=True)
        done = self.run_dir / "result.json"
        if resume and done.is_file():
            return json.loads(done.read_text())
        ckpts = _ckpts(self.run_dir)
        if ckpts and not resume:
            raise UserError(f"{self.run_dir}: already holds checkpoints; pass --resume to continue, or another --out")
        if ckpts:
            self.load(ckpts[-1])
            log.info("%s: resumed at step %d", self.run_dir, self.step)
        writer = None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        durs = [e.duration for e in self.train.examples]
        params = list(self.featurizer.parameters()) + list(self.head.parameters())
        last = min(o.max_steps, stop_after) if stop_after is not None else o.max_steps
        bar = progress_bar(total=o.max_steps, initial=self.step, desc=f"{self.cfg.task} lr={self.lr:g}", unit="step",
                           disable=not self.progress, dynamic_ncols=True, leave=False)
        self.featurizer.train()
        self.head.train()
        t0 = time.time()
        while self.step < last:
            batches = duration_batches(durs, o.max_duration, num_buckets=o.num_buckets, seed=self.seed,
                                       epoch=self.epoch)
            while self.pos < len(batches) and self.step < last:
                exs = [self.train.examples[i] for i in batches[self.pos]]
                x, lens = self.features("train", exs)
                loss = self.task.loss(self.head, x, lens, [e.target for e in exs])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)) if o.grad_clip > 0 else 0.0
                if math.isfinite(gnorm):
                    self.opt.step()
                self.pos += 1
                self.step += 1
                value = float(loss.detach())
                self.losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
                if writer is not None and self.step % o.log_every == 0:
                    writer.add_scalar("train/loss", value, self.step)
                if self.step % o.eval_every == 0 or self.step == o.max_steps:
                    dev = self.evaluate(self.dev)
                    self.history.append({"step": self.step, **dev})
                    if writer is not None:
                        for k, v in dev.items():
                            writer.add_scalar(f"dev/{k}", v, self.step)
                    main = dev[self.task.metric]
                    if self.best is None or self._better(main, self.best["dev"][self.task.metric]):
                        self.best = {"step": self.step, "dev": dev}
                        self.save_best(dev)
                    log.info("%s step %d: dev %s", self.run_dir, self.step,
                             " ".join(f"{k}={v:.4f}" for k, v in dev.items()))
                if self.step % o.save_every == 0 or self.step == o.max_steps:
                    self.save()
            if self.pos >= len(batches):
                self.epoch += 1
                self.pos = 0
        bar.close()
        if writer is not None:
            writer.close()
        result = {"lr": self.lr, "best": self.best, "history": self.history, "steps": self.step,
                  "train_seconds": round(time.time() - t0, 2)}
        if self.step >= o.max_steps:
            atomic_write_text(done, json.dumps(result, indent=1) + "\n")
        return result


def train_head(task: Task, cfg: SuperbConfig, train: Split, dev: Split, sources: dict[str, FeatureSource], lr: float,
               run_dir: Path, *, seed: int = 0, resume: bool = False, progress: bool = True,
               tensorboard: bool = False, device: str = "cpu") -> HeadTrainer:
    """Train one lr to the end (or pick up its finished result); returns the trainer (best head not loaded).
    ``task`` must be fitted on ``train`` already (its vocabularies size the head)."""
    trainer = HeadTrainer(task, cfg, train, dev, sources, lr, run_dir, seed=seed, progress=progress,
                          tensorboard=tensorboard, device=device)
    trainer.result = trainer.run(resume=resume)
    return trainer


# ------------------------------------------------------------------------------------------------ data
def resolve_splits(data: str | Path | None = None, train: str | Path | None = None, dev: str | Path | None = None,
                   test: str | Path | None = None, *, task: str = "") -> dict[str, Path]:
    """``--data DIR`` -> DIR/train, DIR/dev, DIR/test; ``--train/--dev/--test`` override each. ER takes one
    data dir (``--data DIR`` itself when it holds ``wav.scp``, else DIR/train+dev+test are used together)."""
    given = {"train": train, "dev": dev, "test": test}
    out: dict[str, Path] = {}
    for name in SPLITS:
        if given[name] is not None:
            out[name] = Path(given[name])  # type: ignore[arg-type]
        elif data is not None:
            out[name] = Path(data) / name
    if task == "er" and data is not None and (Path(data) / "wav.scp").is_file():
        return {"all": Path(data)}
    for name, p in out.items():
        if not p.is_dir():
            raise MissingInputError(f"{p}: no such data dir ({name} split); give --data DIR with train/dev/test "
                                    "or --train/--dev/--test")
    missing = [n for n in SPLITS if n not in out]
    if missing and task != "er":
        raise UserError(f"no {'/'.join(missing)} split: give --data DIR (with train/dev/test) or --{missing[0]} DIR")
    return out


def _er_fold_splits(task: Task, cfg: SuperbConfig, dirs: dict[str, Path], dds: dict[str, DataDir],
                    durs: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, Split]]]:
    """Per fold (held-out session): train / dev (``dev_frac`` of the other sessions' utterances, deterministic)
    / test (the held-out session). Splits keep the data dir they come from for feature lookup."""
    pooled: list[tuple[str, Example]] = []   # (source split key, example)
    sessions: dict[str, str] = {}
    for key, dd in dds.items():
        s = task.make_split(key, dirs[key], dd, durs[key])
        sess = dd.extra.get("utt2session")
        if sess is None:
            raise MissingInputError(f"{dirs[key] / 'utt2session'}: no such file; task er needs utterance -> session "
                                    "for its folds")
        for ex in s.examples:
            pooled.append((key, ex))
            sessions[ex.utt] = sess[ex.utt].strip()
    first = next(iter(dds))
    folds = er_folds(DataDir(wav_scp={}, utt2spk={}, extra={"utt2session": sessions}), dirs[first], cfg.folds)
    out = []
    for held in folds:
        rest = [(k, e) for k, e in pooled if sessions[e.utt] != held]
        rng = np.random.default_rng(0)
        dev_mask = rng.random(len(rest)) < cfg.dev_frac
        mk = lambda name, items: Split(name, dirs[first], dds[first], [e for _, e in items])  # noqa: E731
        splits = {"train": mk("train", [r for r, m in zip(rest, dev_mask) if not m]),
                  "dev": mk("dev", [r for r, m in zip(rest, dev_mask) if m]),
                  "test": mk("test", [(k, e) for k, e in pooled if sessions[e.utt] == held])}
        out.append((held, splits))
    return out


class _Union:
    """Feature source over several per-dir sources (ER pools its data dirs)."""

    def __init__(self, sources: list[Any]):
        self.parts = sources
        self.layers, self.dim, self.frame_rate = sources[0].layers, sources[0].dim, sources[0].frame_rate

    def get(self, utt_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        if len(self.parts) == 1:
            return self.parts[0].get(utt_ids)
        per: dict[str, np.ndarray] = {}
        for src in self.parts:
            mine = [u for u in utt_ids if u in src and u not in per]
            if mine:
                x, lens = src.get(mine)
                per.update({u: x[:, b, : int(lens[b])].numpy() for b, u in enumerate(mine)})
        return _pad_stack([per[u] for u in utt_ids])


# ------------------------------------------------------------------------------------------------ one run
def pools_first(task: Task, cfg: SuperbConfig) -> bool:
    """Whether the head may train on per-utterance means (:class:`speechssl.superb.cache.PooledFeatures`): a
    mean-pool head behind a featurizer that is linear in the frames (weighted sum, no per-layer norm)."""
    return task.pools_first and cfg.featurizer.kind == "weighted_sum" and not cfg.featurizer.layer_norm


def run_superb(task: str, upstream: str, out: str | Path, *, data: str | Path | None = None,
               train: str | Path | None = None, dev: str | Path | None = None, test: str | Path | None = None,
               conf: str | Path | None = None, overrides: Sequence[str] = (), lr_sweep: Sequence[float] | None = None,
               max_steps: int | None = None, seed: int = 0, cache: str = "disk", cache_dir: str | Path | None = None,
               resume: bool = False, device: str = "cpu", dev_trials: str | Path | None = None,
               test_trials: str | Path | None = None, progress: bool = True, tensorboard: bool = False,
               extract_max_duration: float | None = None) -> dict[str, Any]:
    """One task on one upstream, the lr picked on dev, reported on test; writes ``OUT/results.json`` (returned)."""
    t_start = time.time()
    overrides = list(overrides)
    if max_steps is not None:
        overrides.append(f"optim.max_steps={max_steps}")
    cfg = load_superb_config(task, conf, overrides)
    if cache not in ("disk", "none"):
        raise UserError(f"--cache {cache!r}: choose disk or none")
    out = Path(out)
    if (out / "results.json").is_file() and not resume:
        raise UserError(f"{out}/results.json exists: this run is finished (--resume reuses it; or another --out)")
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    dirs = resolve_splits(data, train, dev, test, task=task)
    dds = {k: read_data_dir(p) for k, p in dirs.items()}
    durs = {k: utterance_durations(dd) for k, dd in dds.items()}
    t_obj = make_task(cfg)
    if task == "asv":
        if dev_trials:
            t_obj.trials_paths["dev"] = Path(dev_trials)   # type: ignore[attr-defined]
        if test_trials:
            t_obj.trials_paths["test"] = Path(test_trials)  # type: ignore[attr-defined]

    # features: one source per data dir (the cache covers the whole dir, shared by every task on it)
    fp = upstream_fingerprint(upstream)
    up = load_upstream(upstream, device=device)
    layers = parse_layers(cfg.featurizer.layers, up.num_layers, up.source)
    t_cache = time.time()
    sources: dict[str, Any] = {}
    root = Path(cache_dir) if cache_dir else out.parent / "feature_cache"
    for key, dd in dds.items():
        if cache == "disk":
            sources[key] = build_cache(upstream, dirs[key], layers, root, upstream=up, device=device,
                                       max_duration=extract_max_duration, progress=progress)
        else:
            sources[key] = LiveFeatures(up, dd, layers)
    cache_seconds = time.time() - t_cache
    pooled = pools_first(t_obj, cfg)
    if pooled:
        log.info("superb %s: mean-pool head behind a linear featurizer: trained on per-utterance layer means", task)

    sweep = list(lr_sweep) if lr_sweep else [cfg.optim.lr]
    if task == "er":
        folds = _er_fold_splits(t_obj, cfg, dirs, dds, durs)
        src = _Union(list(sources.values()))
        if pooled:
            src = PooledFeatures(src)
        fold_results = []
        for held, splits in folds:
            r = _sweep(t_obj, cfg, splits, {"train": src, "dev": src, "test": src}, sweep, out / f"fold_{held}", seed,
                       resume, progress, tensorboard, device)
            r["session"] = held
            fold_results.append(r)
        test_metrics = {k: float(np.mean([f["test"][k] for f in fold_results])) for k in fold_results[0]["test"]}
        dev_metrics = {k: float(np.mean([f["dev"][k] for f in fold_results])) for k in fold_results[0]["dev"]}
        chosen = {"lr": [f["lr"] for f in fold_results], "folds": fold_results,
                  "layer_weights": fold_results[0]["layer_weights"]}
        data_info = {k: {"path": str(dirs[k]), "utterances": len(dds[k])} for k in dirs}
    else:
        if pooled:
            sources = {k: PooledFeatures(v) for k, v in sources.items()}
        splits = {}
        for name in SPLITS:
            splits[name] = t_obj.make_split(name, dirs[name], dds[name], durs[name])
        r = _sweep(t_obj, cfg, splits, sources, sweep, out, seed, resume, progress, tensorboard, device)
        test_metrics, dev_metrics = r["test"], r["dev"]
        chosen = r
        data_info = {k: {"path": str(dirs[k]), "utterances": len(splits[k].examples), "skipped": splits[k].skipped}
                     for k in SPLITS}
    result = {
        "task": task, "metric": t_obj.metric, "higher_is_better": t_obj.higher_is_better,
        "upstream": upstream, "upstream_label": upstream_label(upstream), "upstream_sha1": fp["sha1"],
        "test": test_metrics, "dev": dev_metrics, "lr": chosen["lr"], "sweep": chosen.get("sweep"),
        "folds": chosen.get("folds"), "layers": layers, "layer_weights": chosen.get("layer_weights"),
        "seed": seed, "cache": cache, "pooled_means": pooled, "data": data_info, "config": to_dict(cfg),
        "timing": {"features_s": round(cache_seconds, 2), "total_s": round(time.time() - t_start, 2)},
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    log.info("superb %s %s: test %s (lr %s)", task, upstream_label(upstream),
             " ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()), chosen["lr"])
    return result


def _sweep(task: Task, cfg: SuperbConfig, splits: dict[str, Split], sources: dict[str, Any], sweep: Sequence[float],
           out: Path, seed: int, resume: bool, progress: bool, tensorboard: bool, device: str) -> dict[str, Any]:
    """Train every lr, pick the best dev score, evaluate its best head on test."""
    task.fit(splits["train"])
    for name in ("dev", "test"):
        task.check(splits[name])
    trainers = []
    for lr in sweep:
        tr = train_head(task, cfg, splits["train"], splits["dev"], sources, lr, out / f"lr_{lr:g}", seed=seed,
                        resume=resume, progress=progress, tensorboard=tensorboard, device=device)
        trainers.append(tr)
    scored = [(tr, tr.result["best"]["dev"][task.metric]) for tr in trainers if tr.result["best"]]
    if not scored:
        raise RuntimeError("no learning rate produced a dev evaluation")
    pick = scored[0]
    for cand in scored[1:]:
        if (cand[1] > pick[1]) if task.higher_is_better else (cand[1] < pick[1]):
            pick = cand
    best_tr = pick[0]
    best_tr.load_best()
    test = best_tr.evaluate(splits["test"])
    lw = save_layer_weights(best_tr.featurizer, best_tr.sources["train"].layers, out,
                            title=f"{cfg.task} lr={best_tr.lr:g}")
    return {"lr": best_tr.lr, "test": test, "dev": best_tr.result["best"]["dev"],
            "best_step": best_tr.result["best"]["step"],
            "sweep": [{"lr": tr.lr, "dev": tr.result["best"]["dev"] if tr.result["best"] else None,
                       "best_step": tr.result["best"]["step"] if tr.result["best"] else None,
                       "train_seconds": tr.result.get("train_seconds")} for tr in trainers],
            "layer_weights": lw["weights"]}


# ------------------------------------------------------------------------------------------------ table
# (task, test metric, header); every figure in percent except minDCF. ASR's CER beside its WER: on a small
# corpus the WER of a briefly trained head stays near 100 % while the CER already ranks the upstreams.
_COLUMNS = [("pr", "per", "PR PER% ↓"), ("asr", "wer", "ASR WER% ↓"), ("asr", "cer", "ASR CER% ↓"),
            ("ks", "accuracy", "KS acc% ↑"), ("sid", "accuracy", "SID acc% ↑"), ("asv", "eer", "ASV EER% ↓"),
            ("er", "accuracy", "ER acc% ↑"), ("ic", "accuracy", "IC acc% ↑"), ("asv", "min_dcf", "ASV minDCF ↓")]


def results_table(patterns: Sequence[str]) -> str:
    """One markdown table (rows: spectral baselines, random-init models, then the other upstreams in first-seen
    order; columns: the tasks present) from ``results.json``
    files found by ``patterns`` (globs of result files or of run dirs). Figures in percent; a later file for the
    same (upstream, task) replaces an earlier one. A matched directory without a ``results.json`` is searched
    below for them."""
    files: list[Path] = []
    for pat in patterns:
        for match in sorted(glob.glob(str(pat), recursive=True)):
            p = Path(match)
            found = [p] if p.is_file() else [p / "results.json"] if (p / "results.json").is_file() \
                else sorted(p.rglob("results.json"))   # a dir of runs (EXP/<upstream>/<task>/results.json)
            files += [f for f in found if f not in files]
    if not files:
        raise UserError(f"no results.json found by {' '.join(patterns)}")
    cells: dict[tuple[str, str, str], float] = {}
    rows: list[str] = []
    for f in files:
        r = json.loads(f.read_text())
        label = r["upstream_label"]
        if label not in rows:
            rows.append(label)
        for key, value in r["test"].items():
            cells[(label, r["task"], key)] = value
    rows.sort(key=lambda r: 0 if r in SPECTRAL else 1 if r.startswith("random:") else 2)  # baselines first (stable)
    cols = [c for c in _COLUMNS if any((row, c[0], c[1]) in cells for row in rows)]
    lines = ["| " + " | ".join(["upstream"] + [c[2] for c in cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in rows:
        vals = ["–" if (row, t, k) not in cells else f"{cells[(row, t, k)]:.3f}" if k == "min_dcf"
                else f"{100 * cells[(row, t, k)]:.1f}" for t, k, _ in cols]
        lines.append("| " + " | ".join([row] + vals) + " |")
    return "\n".join(lines) + "\n"
