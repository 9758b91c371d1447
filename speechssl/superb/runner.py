"""Train and evaluate one SUPERB task on one upstream: ``speechssl superb --task T --upstream U --data DIR --out EXP``.

The run, in order:

1. the task config (:mod:`~speechssl.superb.config`), the task object (:mod:`~speechssl.superb.tasks`) and its
   run options (ASV trials);
2. the data dirs, read once (:mod:`~speechssl.superb.splits`);
3. the upstream, resolved once (:func:`~speechssl.superb.upstreams.resolve_upstream`: spec, weights SHA-1, module,
   layers), and one feature source per data dir (:mod:`~speechssl.superb.cache`);
4. the task's folds (one pass; ER: each session held out in turn): for each, every learning rate of the sweep
   (``--lr-sweep``; default the config's ``optim.lr``) trains a featurizer + head from the same seed
   (:mod:`~speechssl.superb.trainer`), the lr with the best dev score is evaluated on test; a task without
   training (QbE) scores the frozen features instead;
5. ``EXP/results.json`` (test + dev metrics, chosen lr, sweep, config, timings), written last.

Layout of ``EXP``: ``results.json``, ``layer_weights.{json,png}`` (the chosen head's), ``lr_<lr>/`` (one
:class:`~speechssl.superb.trainer.HeadTrainer` run dir each; ER: under ``fold_<session>/``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from speechssl.config import to_dict
from speechssl.errors import UserError
from speechssl.fileio import atomic_write_text
from speechssl.superb.cache import LiveFeatures, PooledFeatures, UnionFeatures, build_cache
from speechssl.superb.config import SuperbConfig, load_superb_config
from speechssl.superb.featurizer import save_layer_weights
from speechssl.superb.splits import read_splits, resolve_splits
from speechssl.superb.table import results_table
from speechssl.superb.tasks import Fold, SplitData, Task, make_task
from speechssl.superb.trainer import HeadTrainer, train_head
from speechssl.superb.upstreams import ResolvedUpstream, resolve_upstream, upstream_fingerprint
from speechssl.train import state as st

__all__ = ["run_superb", "pools_first", "results_table", "HeadTrainer"]

log = logging.getLogger(__name__)


def pools_first(task: Task, cfg: SuperbConfig) -> bool:
    """Whether the head may train on per-utterance means (:class:`speechssl.superb.cache.PooledFeatures`): a
    mean-pool head behind a featurizer that is linear in the frames (weighted sum, no per-layer norm)."""
    return task.pools_first and cfg.featurizer.kind == "weighted_sum" and not cfg.featurizer.layer_norm


def _sources(up: ResolvedUpstream, data: dict[str, SplitData], cache: str, root: Path, device: str,
             max_duration: float | None, progress: bool, pooled: bool) -> dict[str, Any]:
    """One feature source per data dir (the cache covers the whole dir, shared by every task on it), and ``"*"``:
    all of them together."""
    out: dict[str, Any] = {}
    for key, d in data.items():
        if cache == "disk":
            out[key] = build_cache(up, d.path, cache_root=root, dd=d.dd, durations=d.durations, device=device,
                                   max_duration=max_duration, progress=progress)
        else:
            out[key] = LiveFeatures(up.module, d.dd, up.layers)
    out["*"] = UnionFeatures(list(out.values()))
    return {k: PooledFeatures(v) for k, v in out.items()} if pooled else out


def run_superb(task: str, upstream: str, out: str | Path, *, data: str | Path | None = None,
               train: str | Path | None = None, dev: str | Path | None = None, test: str | Path | None = None,
               conf: str | Path | None = None, overrides: Sequence[str] = (), lr_sweep: Sequence[float] | None = None,
               max_steps: int | None = None, seed: int = 0, cache: str = "disk", cache_dir: str | Path | None = None,
               resume: bool = False, device: str = "cpu", dev_trials: str | Path | None = None,
               test_trials: str | Path | None = None, progress: bool = True, tensorboard: bool = False,
               extract_max_duration: float | None = None, overwrite: bool = False) -> dict[str, Any]:
    """One task on one upstream, the lr picked on dev, reported on test; writes ``OUT/results.json`` (returned).

    ``OUT`` must be new, or hold this very run (``resume``: same task, upstream weights, data, seed, sweep and
    config; :func:`speechssl.train.state.open_run`), or be deleted first (``overwrite``)."""
    t_start = time.time()
    overrides = list(overrides)
    if max_steps is not None:
        overrides.append(f"optim.max_steps={max_steps}")
    cfg = load_superb_config(task, conf, overrides)
    if cache not in ("disk", "none"):
        raise UserError(f"--cache {cache!r}: choose disk or none")
    out = Path(out)
    t_obj = make_task(cfg)
    if t_obj.trains and cfg.optim.max_steps < 1:
        raise UserError(f"--max-steps (optim.max_steps) must be >= 1 for task {task} (it trains a head), got "
                        f"{cfg.optim.max_steps}")
    t_obj.configure(dev_trials=dev_trials, test_trials=test_trials)
    data = read_splits(resolve_splits(t_obj, data, train, dev, test))
    sweep = list(lr_sweep) if lr_sweep else [cfg.optim.lr]
    inputs = {"upstream": upstream_fingerprint(upstream)["sha1"],
              **{f"data {k}": st.dir_fingerprint(d.path) for k, d in data.items()},
              **{f"{k} trials": st.dir_fingerprint(p) for k, p in (("dev", dev_trials), ("test", test_trials)) if p}}
    options = {**to_dict(cfg), "task": task, "seed": seed, "lr_sweep": sweep, "cache": cache,
               "cache_dir": str(cache_dir), "device": device, "progress": progress, "tensorboard": tensorboard,
               "extract_max_duration": extract_max_duration}
    if st.open_run(out, "superb", options, resume=resume, overwrite=overwrite, inputs=inputs,
                   markers=("results.json", "lr_*", "fold_*")) and (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    folds = t_obj.folds(data)  # reads every split's labels
    for fold in folds if t_obj.trains else ():  # label sets checked before any feature is extracted
        t_obj.fit(fold.splits["train"])
        for name in ("dev", "test"):
            t_obj.check(fold.splits[name])
    up = resolve_upstream(upstream, cfg.featurizer.layers, device=device)
    t_obj.frame_rate = up.frame_rate
    pooled = pools_first(t_obj, cfg) and t_obj.trains
    if pooled:
        log.info("superb %s: mean-pool head behind a linear featurizer: trained on per-utterance layer means", task)
    t_cache = time.time()
    root = Path(cache_dir) if cache_dir else out.parent / "feature_cache"
    sources = _sources(up, data, cache, root, device, extract_max_duration, progress, pooled)
    cache_seconds = time.time() - t_cache

    results = []
    for fold in folds:
        fold_sources = {name: sources[key] for name, key in fold.sources.items()}
        if t_obj.trains:
            r = _sweep(t_obj, cfg, fold, fold_sources, sweep, out / f"fold_{fold.name}" if fold.name else out, seed,
                       resume, progress, tensorboard, device, inputs)
        else:
            r = t_obj.score(fold_sources, fold.splits)
        if fold.name:
            r[t_obj.fold_key] = fold.name
        results.append(r)
    if len(results) == 1:
        chosen = results[0]
        test_metrics, dev_metrics = chosen["test"], chosen["dev"]
    else:   # folds: the mean of each metric
        test_metrics = {k: float(np.mean([f["test"][k] for f in results])) for k in results[0]["test"]}
        dev_metrics = {k: float(np.mean([f["dev"][k] for f in results])) for k in results[0]["dev"]}
        chosen = {"lr": [f.get("lr") for f in results], "folds": results,
                  "layer_weights": results[0].get("layer_weights")}
    splits = folds[0].splits
    data_info = {k: {"path": str(d.path), "utterances": len(d.dd)} for k, d in data.items()}
    if len(folds) == 1:
        data_info = {k: {"path": str(s.path), "utterances": len(s.examples), "skipped": s.skipped}
                     for k, s in splits.items()}
    extra = {k: v for k, v in chosen.items() if k not in ("test", "dev", "lr", "sweep", "folds", "layer_weights",
                                                           "best_step")}
    result = {
        "task": task, "metric": t_obj.metric, "higher_is_better": t_obj.higher_is_better,
        "upstream": upstream, "upstream_label": up.label, "upstream_sha1": up.sha1,
        "test": test_metrics, "dev": dev_metrics, "lr": chosen.get("lr"), "sweep": chosen.get("sweep"),
        "folds": chosen.get("folds"), "layers": up.layers, "layer_weights": chosen.get("layer_weights"),
        "seed": seed, "cache": cache, "pooled_means": pooled, "data": data_info, "config": to_dict(cfg),
        "timing": {"features_s": round(cache_seconds, 2), "total_s": round(time.time() - t_start, 2)}, **extra,
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    log.info("superb %s %s: test %s (lr %s)", task, up.label,
             " ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()), result["lr"])
    return result


def _sweep(task: Task, cfg: SuperbConfig, fold: Fold, sources: dict[str, Any], sweep: Sequence[float], out: Path,
           seed: int, resume: bool, progress: bool, tensorboard: bool, device: str,
           inputs: dict[str, str]) -> dict[str, Any]:
    """Train every lr, pick the best dev score, evaluate its best head on test."""
    splits = fold.splits
    task.fit(splits["train"])  # this fold's vocabularies (its labels were checked before the features)
    trainers = [train_head(task, cfg, splits["train"], splits["dev"], sources, lr, out / f"lr_{lr:g}", seed=seed,
                           resume=resume, progress=progress, tensorboard=tensorboard, device=device, inputs=inputs)
                for lr in sweep]
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
