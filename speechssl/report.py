"""``EXP/report.md``: what a recipe's experiment directory shows, in plots and tables, each figure beside its baselines.

    write_report("egs/mini_synth/hubert/exp", superb_dirs=["egs/mini_synth/superb/exp"])   # -> Path of report.md
    speechssl report egs/mini_synth/hubert/exp --superb egs/mini_synth/superb/exp           # the same, as a verb

Where it sits (DESIGN.md "Dependency direction"): floor 8, between ``train`` / ``superb`` (floor 7) and ``cli``
(now floor 9). It reads the files the stages wrote and nothing else: JSON, YAML, ``train.log`` and TensorBoard
event files (``tensorboard.backend.event_processing.event_accumulator``). It imports no training code; the one
room it imports is ``superb.table``, for :func:`~speechssl.superb.table.results_table` (the one SUPERB table
builder), and only when a SUPERB run is given.

What it finds in ``EXP`` (every stage's output is optional; a section without input says so in one line):

* **pretraining runs**: every subdirectory with a ``config.yaml`` and a ``train.log`` or ``tensorboard/``
  (``hubert_iter1``, ``hubert_iter2``, ...). Per run: the effective batch, updates and training time (from
  ``train.log`` and ``config.yaml``), the best checkpoint (``best/config.json``), and one PNG of training curves
  from the TensorBoard scalars: train and valid loss, masked-frame accuracy per target set, each layer's effective
  rank (``collapse/rank_L*``) as a fraction of its update-0 value (``collapse_watch.json``), the learning rate;
* **PNMI by layer**: every ``RUN/layers/layers.json`` (``speechssl units layers``): one plot of every iteration's
  PNMI by layer beside the untrained model of the same config and the spectral units, one table with each row's
  best layer as a ratio to the untrained model's best;
* **label quality**: every ``*/quality.json`` (``speechssl units quality``; the k-means sets) in one table with
  their ``quality.png``; a k-means set of a hidden layer (``kmeans_iter1_L3_k100``) gets that layer's row of the
  ``units layers`` report and the untrained model's row at the same layer beside it;
* **SUPERB** (``superb_dirs``: roots holding ``<upstream>/<task>/results.json``): the table of ``speechssl superb
  table`` and one plot of the learned layer weights per upstream (a line per task);
* **fine-tuning** (``asr_dirs``: roots holding ``<run>/decode_test/scores.json``, ``egs/mini_synth/asr/exp``): PER /
  CER / WER per initialisation x labelled subset x tuning, the untrained model's rows marked as the baseline.

A malformed input file is a :class:`~speechssl.errors.UserError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import logging
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_path, atomic_write_text

__all__ = ["write_report"]

log = logging.getLogger(__name__)

RANK_FLOOR = 0.1  # the collapse watch's warning floor (speechssl.train.collapse.RANK_FLOOR; not imported: no training
                  # code here). Drawn on the rank plot.


# ============================================================================================== reading files
def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable {what} ({_short(e)}); rerun the stage that writes it or delete "
                        f"it") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable config ({_short(e)}); it is written by `speechssl pretrain`") \
            from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a YAML mapping (the run's merged config), got {type(obj).__name__}")
    return obj


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _get(obj: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``tb_dir``: ``{tag: [(step, value), ...]}`` sorted by step; a step
    logged twice (a run resumed from an earlier checkpoint) keeps its latest value."""
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing import event_accumulator as ea

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):  # one file per (re)start, in name (= time) order
        try:
            acc = ea.EventAccumulator(str(f), size_guidance={ea.SCALARS: 0})
            acc.Reload()
            tags = acc.Tags().get(ea.SCALARS, [])
            events = {t: acc.Scalars(t) for t in tags}
        except Exception as e:  # the event reader's errors have no common base class
            raise UserError(f"{f}: not a readable TensorBoard event file ({_short(e)})") from None
        for tag, evs in events.items():
            by_step = dict(out.get(tag, []))
            for ev in sorted(evs, key=lambda ev: ev.wall_time):
                by_step[int(ev.step)] = float(ev.value)
            out[tag] = sorted(by_step.items())
    return out


# ============================================================================================== pretraining runs
@dataclass
class _Run:
    name: str
    path: Path
    config: dict[str, Any]
    scalars: dict[str, list[tuple[int, float]]]
    log: dict[str, Any]
    collapse_ref: dict[int, float] | None
    best: dict[str, Any] | None
    curves_png: Path | None = None


_EFF = re.compile(r"effective batch: world (\d+) x max_duration ([\d.eE+-]+) s x accum (\d+) = ([\d.eE+-]+) s of "
                  r"audio per update.*?; ([\d.]+)M parameters; device (\S+); bf16 (\w+)")
_STOP = re.compile(r"stopped at update (\d+) \((\w+)\) after ([\d.]+) min of training")
_SPENT = re.compile(r"already spent \(([\d.]+) min\)")
_LABELS = re.compile(r"speechssl\.train\.data: labels (\S+): k=(\d+)")


def _parse_train_log(path: Path) -> dict[str, Any]:
    """The last effective-batch line, the last stop line and the number of (re)starts of ``train.log``."""
    out: dict[str, Any] = {"starts": 0}
    if not path.is_file():
        return out
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"{path}: cannot read the training log ({_short(e)})") from None
    labels: list[tuple[str, int]] = []
    for line in text.splitlines():
        if m := _EFF.search(line):
            out["starts"] += 1
            out.update(world=int(m[1]), max_duration=float(m[2]), accum=int(m[3]), batch_s=float(m[4]),
                       params_m=float(m[5]), device=m[6], bf16=m[7] == "True")
        elif m := _STOP.search(line):
            out.update(stop_update=int(m[1]), stop_reason=m[2], minutes=float(m[3]))
        elif m := _LABELS.search(line):
            if (m[1], int(m[2])) not in labels:
                labels.append((m[1], int(m[2])))
        elif m := _SPENT.search(line):
            out["minutes"] = float(m[1])
    out["labels"] = labels
    return out


def _find_runs(exp: Path) -> list[Path]:
    return sorted((d for d in exp.iterdir() if d.is_dir() and (d / "config.yaml").is_file()
                   and ((d / "train.log").is_file() or (d / "tensorboard").is_dir())), key=_natural_key)


def _load_run(d: Path) -> _Run:
    cfg = _read_yaml(d / "config.yaml")
    ref = None
    cw = d / "collapse_watch.json"
    if cw.is_file():
        obj = _read_json(cw, "collapse watch reference")
        try:
            ref = {int(e["layer"]): float(e["rank"]) for e in obj["layers"]}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{cw}: not a collapse watch reference (no layers[].layer/rank: {_short(e)})") from None
    best = None
    bc = d / "best" / "config.json"
    if bc.is_file():
        extra = _read_json(bc, "checkpoint config").get("extra")
        best = extra if isinstance(extra, dict) else None
    return _Run(name=d.name, path=d, config=cfg, scalars=_scalars(d / "tensorboard"),
                log=_parse_train_log(d / "train.log"), collapse_ref=ref, best=best)


def _target_sets(scalars: dict[str, Any], prefix: str) -> list[str]:
    """``["0", "1"]`` for ``{prefix}/acc_m_0``, ``{prefix}/acc_m_1``."""
    sets = {t[len(prefix) + 7:] for t in scalars if t.startswith(f"{prefix}/acc_m_")}
    return sorted(sets, key=lambda s: int(s) if s.isdigit() else s)


def _collapse_layers(scalars: dict[str, Any]) -> list[int]:
    return sorted(int(t[len("collapse/rank_L"):]) for t in scalars if re.fullmatch(r"collapse/rank_L\d+", t))


def _set_names(run: _Run) -> list[str]:
    """Short names of the run's target sets, in head order (``labels_iter1_mfcc``): from train.log, else the
    config's ``data.train_labels``."""
    roots = [p for p, _ in run.log.get("labels", [])] or [str(x) for x in _get(run.config, "data.train_labels", [])]
    train_name = Path(str(_get(run.config, "data.train", "train"))).name
    names = []
    for p in roots:
        q = Path(p)
        name = q.parent.name if q.name in (train_name, "train") and q.parent.name else q.name
        names.append(name[len("labels_"):] if name.startswith("labels_") and len(name) > 7 else name)
    return names


def _chance_classes(config: dict[str, Any]) -> list[int]:
    """The class counts that set chance accuracy: the units per target set, or wav2vec 2.0's K distractors + 1."""
    if _get(config, "model.objective") == "wav2vec2":
        return [int(_get(config, "model.num_negatives", 100)) + 1]
    return _get(config, "model.num_classes") or []


def _plot_curves(run: _Run, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = run.scalars
    names = _set_names(run)
    fig = Figure(figsize=(11.0, 7.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)

    def line(ax, tag, *args, **kw):
        pts = s.get(tag)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], *args, **kw)

    ax = axes[0][0]
    line(ax, "train/loss", "-", color="C0", label="train")
    line(ax, "valid/loss", "o-", color="C3", markersize=4, label="valid")
    ax.set_title("loss (sum over target sets, masked + unmasked terms)", fontsize=9)
    ax.set_ylabel("loss")

    ax = axes[0][1]
    for i, t in enumerate(_target_sets(s, "train") or _target_sets(s, "valid")):
        nm = names[int(t)] if t.isdigit() and int(t) < len(names) else f"set {t}"
        line(ax, f"train/acc_m_{t}", "-", color=f"C{i}", alpha=0.6, label=f"train, {nm}")
        line(ax, f"valid/acc_m_{t}", "o-", color=f"C{i}", markersize=4, label=f"valid, {nm}")
    k = _chance_classes(run.config)
    if k:
        ax.axhline(1.0 / max(k), color="0.5", ls=":", lw=1, label=f"chance (1/{max(k)})")
    ax.set_title("masked-frame accuracy (" + ("picking the positive among the distractors"
                 if _get(run.config, "model.objective") == "wav2vec2" else "predicting the unit of a masked frame")
                 + ")", fontsize=9)
    ax.set_ylabel("accuracy")

    ax = axes[1][0]
    layers = _collapse_layers(s)
    ref = run.collapse_ref or {}
    rel = bool(ref) and all(i in ref and ref[i] > 0 for i in layers)
    cmap = _colormap(len(layers))
    for j, i in enumerate(layers):
        pts = s[f"collapse/rank_L{i}"]
        if rel:
            pts = [(0, ref[i])] + [p for p in pts if p[0] != 0]
            ys = [v / ref[i] for _, v in pts]
        else:
            ys = [v for _, v in pts]
        ax.plot([p[0] for p in pts], ys, ".-", color=cmap[j], label=f"L{i}")
    if rel:
        ax.axhline(RANK_FLOOR, color="C3", ls="--", lw=1, label=f"collapse warning ({RANK_FLOOR:g})")
        ax.set_ylim(0, max(1.05, ax.get_ylim()[1]))
        ax.set_title("effective rank per layer / its update-0 value (collapse watch)", fontsize=9)
        ax.set_ylabel("rank / update-0 rank")
    else:
        ax.set_title("effective rank per layer (collapse watch; no update-0 reference)", fontsize=9)
        ax.set_ylabel("effective rank")
    if not layers:
        ax.text(0.5, 0.5, "no collapse/rank_L* scalars\n(collapse_watch_frames=0?)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="0.4")

    ax = axes[1][1]
    line(ax, "train/lr", "-", color="C4")
    ax.set_title("learning rate", fontsize=9)
    ax.set_ylabel("lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))

    for ax in (axes[0][0], axes[0][1], axes[1][0], axes[1][1]):
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", ncol=2 if ax is axes[1][0] and len(layers) > 6 else 1)
    fig.suptitle(f"{run.name}: training curves", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def _colormap(n: int) -> list[Any]:
    from matplotlib import colormaps

    cm = colormaps["viridis"]
    return [cm(0.9 * j / max(n - 1, 1)) for j in range(n)]


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _last(pts: list[tuple[int, float]] | None) -> tuple[int, float] | None:
    return pts[-1] if pts else None


def _runs_section(runs: list[_Run], rel) -> list[str]:
    md = ["## Pretraining", ""]
    if not runs:
        return md + ["No pretraining run found (no `*/config.yaml` with a `train.log` or `tensorboard/` in the exp "
                     "dir).", ""]
    md += ["| run | updates (stopped by) | training time | effective batch | peak lr / warmup updates | device, bf16 | "
           "target sets (k) | best checkpoint |",
           "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lg, c = r.log, r.config
        upd = lg.get("stop_update")
        max_steps = _get(c, "optim.max_steps")
        if upd is None:  # no stop line: the run is going on or was killed; the last logged update
            pts = r.scalars.get("train/loss")
            upd_s = f"{pts[-1][0]} of {max_steps} (no stop line in train.log: running or killed)" if pts else "–"
        else:
            upd_s = f"{upd} of {max_steps} ({lg.get('stop_reason')})"
        budget = _get(c, "optim.max_minutes")
        t = f"{lg['minutes']:.1f} min" if "minutes" in lg else "–"
        if budget is not None:
            t += f" (budget {budget:g})"
        if "batch_s" in lg:
            eff = f"{lg['batch_s']:g} s of audio ({lg['world']} × {lg['max_duration']:g} s × accum {lg['accum']})"
        else:
            eff = (f"{_get(c, 'data.max_duration')} s × accum {_get(c, 'optim.accum_grad')} per process "
                   "(world size not in train.log)")
        lr = f"{_get(c, 'optim.lr')} / {_get(c, 'optim.warmup_steps')}"
        dev = f"{lg['device']}, {'bf16' if lg['bf16'] else 'fp32'}" if "device" in lg else \
            f"{_get(c, 'device')}, bf16 {_get(c, 'optim.bf16')}"
        ks = _get(c, "model.num_classes") or []
        names = _set_names(r)
        sets = ", ".join(f"{n} ({k})" for n, k in zip(names, ks)) or "–"
        obj = str(_get(c, "model.objective", "hubert"))
        if obj == "bestrq":
            sets = "random-projection codes (" + ", ".join(str(k) for k in ks) + ")"
        elif obj == "wav2vec2":
            sets = (f"Gumbel quantizer ({_get(c, 'model.num_codevector_groups')} × "
                    f"{_get(c, 'model.num_codevectors_per_group')} codes, contrastive)")
        if r.best:
            crit = r.best.get("best_by", "")
            best = f"update {r.best.get('step')} (valid {crit or 'metric'} {_fmt(r.best.get('metric'))})"
        else:
            best = "–"
        md.append(f"| {r.name} | {upd_s} | {t} | {eff} | {lr} | {dev} | {sets} | {best} |")
    md.append("")
    for r in runs:
        md += [f"### {r.name}", ""]
        if r.curves_png is not None:
            md += [f"![training curves of {r.name}]({rel(r.curves_png)})", ""]
        else:
            md += [f"No TensorBoard scalars in `{rel(r.path / 'tensorboard')}`: no curves.", ""]
            continue
        s = r.scalars
        names = _set_names(r)
        rows = [("loss", "train/loss", "valid/loss")]
        for t in _target_sets(s, "valid") or _target_sets(s, "train"):
            nm = names[int(t)] if t.isdigit() and int(t) < len(names) else f"set {t}"
            rows.append((f"masked accuracy, {nm}", f"train/acc_m_{t}", f"valid/acc_m_{t}"))
            rows.append((f"unmasked accuracy, {nm}", f"train/acc_u_{t}", f"valid/acc_u_{t}"))
        k = _chance_classes(r.config)
        found = [(label, _last(s.get(tt)), _last(s.get(vt))) for label, tt, vt in rows]
        found = [f for f in found if f[1] is not None or f[2] is not None]
        t_step = max((f[1][0] for f in found if f[1]), default=None)
        v_step = max((f[2][0] for f in found if f[2]), default=None)

        def cell(pt, step):
            if pt is None:
                return "–"
            return _fmt(pt[1]) + ("" if pt[0] == step else f" (update {pt[0]})")

        md += [f"| last value | train (update {t_step}) | valid (update {v_step}) | chance |", "|---|---|---|---|"]
        for label, tl, vl in found:
            chance = f"{1 / max(k):.3f}" if "accuracy" in label and k else "–"
            md.append(f"| {label} | {cell(tl, t_step)} | {cell(vl, v_step)} | {chance} |")
        md += ["", f"Train: mean over the last log window ({_get(r.config, 'log_every', '?')} updates); valid: the "
               "whole dev set, same masks at every validation. Chance: 1/k (wav2vec 2.0: 1/(K+1), its K "
               "distractors and the positive).", ""]
        layers = _collapse_layers(s)
        if layers:
            ref = r.collapse_ref or {}
            md += ["Collapse watch (effective rank of each layer on a fixed dev sample; a layer below "
                   f"{RANK_FLOOR:g} of its update-0 rank is collapsing):", "",
                   "| layer | " + " | ".join(f"L{i}" for i in layers) + " |",
                   "|---|" + "---|" * len(layers)]
            md.append("| rank at update 0 | " + " | ".join(_fmt(ref.get(i), 1) for i in layers) + " |")
            lastv = {i: _last(s[f"collapse/rank_L{i}"]) for i in layers}
            step = max(v[0] for v in lastv.values())
            md.append(f"| rank at update {step} | " + " | ".join(_fmt(lastv[i][1], 1) for i in layers) + " |")
            md.append("| ratio | " + " | ".join(
                _fmt(lastv[i][1] / ref[i], 2) if ref.get(i) else "–" for i in layers) + " |")
            low = [f"L{i}" for i in layers if ref.get(i) and lastv[i][1] < RANK_FLOOR * ref[i]]
            init = _get(r.config, "ckpt.init_from")
            if init:
                md += ["", f"This run started from `{init}` (`ckpt.init_from`): its update-0 ranks are that "
                       "model's."]
            md += ["", f"**Collapsed layers: {', '.join(low)}.**" if low else
                   ("No layer below the collapse floor." if ref else "No update-0 reference "
                    "(`collapse_watch.json` missing): ranks are absolute."), ""]
        else:
            md += ["No collapse-watch scalars (`collapse/rank_L*`) in this run.", ""]
    return md


# ============================================================================================== PNMI by layer
@dataclass
class _Layers:
    run: str
    path: Path
    data: dict[str, Any]


def _load_layers(path: Path, run: str) -> _Layers:
    d = _read_json(path, "per-layer report (`speechssl units layers`)")
    try:
        for r in d["layers"]:
            int(r["layer"]), float(r["pnmi"]), float(r["phone_purity"]), float(r["cluster_purity"])
        rnd = d.get("random_init")
        if rnd:
            for r in rnd["layers"]:
                int(r["layer"]), float(r["pnmi"])
        sp = _spectral(d)
        if sp:
            float(sp["pnmi"])
        int(d["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a `speechssl units layers` report (missing or bad {_short(e)}); rerun that "
                        "stage") from None
    return _Layers(run=run, path=path, data=d)


def _spectral(d: dict[str, Any]) -> dict[str, Any] | None:
    """The spectral-units entry of a layers.json (``mfcc`` in the current format; ``spectral`` accepted too)."""
    return d.get("spectral") or d.get("mfcc")


def _spectral_label(sp: dict[str, Any]) -> str:
    kind = sp.get("kind") or "spectral"
    rate = sp.get("frame_rate")
    return f"{kind} units" + (f" ({rate:g} Hz)" if isinstance(rate, (int, float)) else "")


def _plot_pnmi(reports: list[_Layers], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    seen_rnd: list[list[float]] = []
    seen_sp: list[tuple[str, float]] = []
    all_x: set[int] = set()
    runs_h: list[Any] = []
    base_h: list[Any] = []
    spec_h: list[Any] = []
    for i, rep in enumerate(reports):
        rows = rep.data["layers"]
        xs = [int(r["layer"]) for r in rows]
        all_x.update(xs)
        ys = [float(r["pnmi"]) for r in rows]
        b = max(range(len(ys)), key=ys.__getitem__)
        ratio = rep.data.get("best_ratio_to_random_best")
        runs_h += ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{rep.run} (best L{xs[b]}: {ys[b]:.3f}"
                          + (f", {ratio:.2f}× the untrained best)" if ratio else ")"))
        ax.annotate(f"{ys[b]:.3f}", (xs[b], ys[b]), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7, color=f"C{i}")
        rnd = rep.data.get("random_init")
        if rnd:
            rys = [float(r["pnmi"]) for r in rnd["layers"]]
            if not any(len(o) == len(rys) and all(abs(a - b) < 1e-9 for a, b in zip(o, rys)) for o in seen_rnd):
                lbl = "untrained model (same config)" if not seen_rnd else f"untrained model ({rep.run}'s config)"
                base_h += ax.plot([int(r["layer"]) for r in rnd["layers"]], rys, "s--", color="0.45",
                                  markersize=4, label=lbl)
                seen_rnd.append(rys)
        sp = _spectral(rep.data)
        if sp:
            key = (_spectral_label(sp), float(sp["pnmi"]))
            if all(abs(key[1] - o[1]) > 1e-9 or key[0] != o[0] for o in seen_sp):
                spec_h.append(ax.axhline(key[1], color=["C3", "C5", "C6"][len(seen_sp) % 3], ls="-.", lw=1.2,
                                         label=f"{key[0]}: {key[1]:.3f}"))
                seen_sp.append(key)
    ax.margins(y=0.15)
    ax.set_xticks(sorted(all_x))
    ax.set_xlabel("hidden layer (0 = transformer input)")
    ax.set_ylabel("PNMI (higher: units carry more phone information)")
    k = reports[0].data.get("k")
    ax.set_title(f"PNMI of k-means units (k={k}) of every layer, beside the baselines", fontsize=10)
    ax.grid(alpha=0.3)
    handles = spec_h + base_h + runs_h  # baselines first, as in the table
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)


_SPECTRAL_COL = -1  # the table column of the spectral units (no layer)


def _layers_section(reports: list[_Layers], png: Path | None, rel) -> list[str]:
    md = ["## What each layer learned (PNMI by layer)", ""]
    if not reports:
        return md + ["No per-layer report found (`RUN/layers/layers.json` from `speechssl units layers`; the recipe "
                     "writes it only with phone alignments).", ""]
    if png is not None:
        md += [f"![PNMI by layer]({rel(png)})", ""]
    layers = sorted({int(r["layer"]) for rep in reports for r in rep.data["layers"]})
    head = "| PNMI | spectral units | " + " | ".join(f"L{x}" for x in layers) + " | best / untrained best |"
    md += [head, "|---|" + "---|" * (len(layers) + 2)]
    rows: list[tuple[str, dict[int, float], str]] = []
    seen_sp: list[tuple[str, float]] = []
    seen_rnd: list[dict[int, float]] = []
    trained: list[tuple[str, dict[int, float], str]] = []
    for rep in reports:
        d = rep.data
        rnd = d.get("random_init")
        rbest = float(rnd["best_pnmi"]) if rnd and "best_pnmi" in rnd else (
            max(float(r["pnmi"]) for r in rnd["layers"]) if rnd else None)
        sp = _spectral(d)
        if sp:
            key = (_spectral_label(sp), float(sp["pnmi"]))
            if key not in seen_sp:
                seen_sp.append(key)
                ratio = f"{key[1] / rbest:.2f}×" if rbest else "–"
                rows.append((f"{key[0]}, k={d['k']} (spectral baseline)", {_SPECTRAL_COL: key[1]}, ratio))
        if rnd:
            vals = {int(r["layer"]): float(r["pnmi"]) for r in rnd["layers"]}
            if vals not in seen_rnd:
                seen_rnd.append(vals)
                seed = "" if rnd.get("seed") is None else f", seed {rnd['seed']}"
                rows.append((f"untrained model ({rep.run}'s config, random init{seed})", vals, "1.00×"))
        vals = {int(r["layer"]): float(r["pnmi"]) for r in d["layers"]}
        ratio = d.get("best_ratio_to_random_best")
        if ratio is None and rbest:
            ratio = max(vals.values()) / rbest
        trained.append((rep.run, vals, f"{ratio:.2f}×" if ratio is not None else "– (no untrained baseline)"))
    for name, vals, ratio in rows + trained:
        best = max(vals, key=vals.get) if len(vals) > 1 else None
        cells = []
        for x in [_SPECTRAL_COL] + layers:
            v = vals.get(x)
            cells.append("" if v is None else f"**{v:.3f}**" if x == best else f"{v:.3f}")
        md.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    d0 = reports[0].data
    md += ["", f"Each row: k-means (k={d0.get('k')}) fitted on a sample of that model's layer, scored against the "
           f"phone alignments on {d0.get('utterances')} utterances of `{d0.get('data')}`; the untrained model and the "
           "spectral units use the same utterances, sample and k. Bold: best layer. Ratio: a row's best PNMI over "
           "the untrained model's best. Each feature is scored at its own frame rate."]
    if any(not rep.data.get("random_init") for rep in reports):
        md.append("Rows without an untrained baseline were made with `--no-baseline`: they cannot show learning.")
    md += ["", "Per-run plots: " + ", ".join(f"[{rep.run}]({rel(rep.path.with_name('layers.png'))})"
                                             for rep in reports if rep.path.with_name("layers.png").is_file()), ""]
    return md


# ============================================================================================== label quality
def _label_section(exp: Path, reports: list[_Layers], rel) -> list[str]:
    md = ["## Label quality (k-means units against the phone alignments)", ""]
    qdirs = sorted((q.parent for q in exp.glob("*/quality.json")), key=_natural_key)
    kdirs = sorted((d for d in exp.iterdir() if d.is_dir() and (d / "kmeans.json").is_file()
                    and d not in qdirs), key=_natural_key)
    if not qdirs and not kdirs:
        return md + ["No k-means set found (`*/kmeans.json`, `*/quality.json`).", ""]
    head = ["| unit set | features | k | frames scored | PNMI | phone purity | cluster purity | P(phone \\| unit) |",
            "|---|---|---|---|---|---|---|---|"]
    rows: list[str] = []
    for d in qdirs:  # sets with their own quality report: the iteration-1 (spectral) sets in the recipe
        km = _read_json(d / "kmeans.json", "k-means model description") if (d / "kmeans.json").is_file() else {}
        q = d / "quality.json"
        obj = _read_json(q, "label quality report (`speechssl units quality`)")
        try:
            vals = [float(obj[key]) for key in ("pnmi", "phone_purity", "cluster_purity")]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{q}: not a `speechssl units quality` report (missing or bad {_short(e)})") from None
        png = d / "quality.png"
        link = f"[quality.png]({rel(png)})" if png.is_file() else "–"
        rows.append(f"| {d.name} | {_features_name(km)} | {obj.get('k', km.get('k', '–'))} | "
                    f"{obj.get('num_frames', '–')} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[2]:.3f} | {link} |")
    by_run = {rep.run: rep for rep in reports}
    notes: list[str] = []
    without: list[str] = []
    for d in kdirs:  # sets without one: a hidden layer's (kmeans_iter1_L3_k100) is read off its per-layer report
        km = _read_json(d / "kmeans.json", "k-means model description")
        m = re.fullmatch(r"kmeans_(.+)_L(\d+)_k(\d+)", d.name)
        rep = (by_run.get(f"hubert_{m[1]}") or by_run.get(m[1])) if m else None
        row = rrow = None
        if rep is not None:
            layer = int(m[2])
            row = next((r for r in rep.data["layers"] if int(r["layer"]) == layer), None)
            rrow = next((r for r in (rep.data.get("random_init") or {}).get("layers", [])
                         if int(r["layer"]) == layer), None)
        if row is None:
            without.append(d.name)
            continue
        mark = "¹²³⁴⁵⁶⁷⁸⁹"[len(notes) % 9]
        rows.append(f"| {d.name} {mark} | {rep.run} layer {layer} | {rep.data['k']} | {row.get('num_frames', '–')} | "
                    f"{float(row['pnmi']):.3f} | {float(row['phone_purity']):.3f} | "
                    f"{float(row['cluster_purity']):.3f} | – |")
        if rrow is not None:
            rows.append(f"| ↳ baseline: untrained model, layer {layer} {mark} | random init, {rep.run}'s config | "
                        f"{rep.data['k']} | {rrow.get('num_frames', '–')} | {float(rrow['pnmi']):.3f} | "
                        f"{float(rrow['phone_purity']):.3f} | {float(rrow['cluster_purity']):.3f} | – |")
        notes.append(f"{mark} No `quality.json` for `{d.name}` (the {km.get('k', '?')}-means of {rep.run}'s layer "
                     f"{layer}, the next iteration's targets): the row is that layer in `{rel(rep.path)}` (same k, "
                     f"its own k-means fit on {rep.data.get('utterances', '?')} utterances), with the untrained "
                     "model's same layer below it.")
    if rows:
        md += head + rows + [""]
        md.append("Spectral sets (fbank, MFCC) are the baseline the hidden-layer units are read against (same k). "
                  "Frames are counted at each feature's own rate (spectral 100 Hz, model layers 50 Hz in the recipes).")
        md += [""] + notes if notes else []
        md.append("")
    if without:
        md += [f"No quality report for {', '.join(f'`{w}`' for w in without)} (no `quality.json`, and no "
               "per-layer report of the layer it was fitted on): label quality needs phone alignments "
               "(`--alignments CTM`)."]
        md.append("")
    return md


def _features_name(km: dict[str, Any]) -> str:
    meta = km.get("feature_meta") or km.get("features") or {}
    kind = meta.get("kind")
    if not kind:
        return f"`{km['feats_dir']}`" if km.get("feats_dir") else "–"
    cmvn = _get(meta, "source.options.cmvn")
    name = f"{kind}+CMVN({cmvn})" if cmvn else str(kind)
    if meta.get("dim"):
        name += f", {meta['dim']}-d"
    return name


# ============================================================================================== SUPERB
def _superb_files(dirs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if not d.exists():
            raise MissingInputError(f"--superb {d}: no such directory (a SUPERB exp root holding "
                                    "<upstream>/<task>/results.json)")
        found = [d] if d.is_file() else sorted(d.rglob("results.json"))
        files += [f for f in found if f not in files]
    return files


def _superb_section(dirs: Sequence[Path], out_dir: Path, rel) -> tuple[list[str], list[Path]]:
    md = ["## SUPERB (frozen upstream, learned layer weights, task heads)", ""]
    if not dirs:
        return md + ["No SUPERB run found (none given: `speechssl report EXP --superb DIR`).", ""], []
    files = _superb_files(dirs)
    if not files:
        return md + [f"No SUPERB run found (no `results.json` under {', '.join(f'`{d}`' for d in dirs)}).", ""], []
    from speechssl.superb.table import results_table, row_labels

    md += [results_table([glob.escape(str(f)) for f in files]).rstrip("\n"), ""]   # checks every file, one line
    results = [(f, _read_json(f, "SUPERB result (`speechssl superb`)")) for f in files]
    labels = row_labels([r for _, r in results])  # the table's row labels: two models never share one
    has_spec = any(x.split(":")[0] in ("fbank", "mfcc") for x in labels)
    has_rnd = any(x.startswith("random:") for x in labels)
    missing = [m for m, ok in (("a spectral upstream (fbank / mfcc)", has_spec),
                               ("an untrained model (random:CKPT)", has_rnd)) if not ok]
    md += [f"{len(results)} runs from {', '.join(f'`{rel(d)}`' for d in dirs)}; test split, percent unless marked. "
           "Rows: the baselines first (spectral features, then the untrained model of the same config)."]
    if missing:
        md.append(f"**Baseline missing from this table: {' and '.join(missing)}** — without it these figures do "
                  "not show what pretraining added.")
    md.append("")
    # layer weights: one plot per upstream, a line per task
    weights: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for (f, r), label in zip(results, labels):
        lw_file = f.parent / "layer_weights.json"
        if lw_file.is_file():
            lw = _read_json(lw_file, "layer weights (`speechssl superb`)")
            w, layers = lw.get("weights"), lw.get("layers")
        else:
            w, layers = r.get("layer_weights"), r.get("layers")
        if not isinstance(w, list) or len(w) < 2:
            continue
        if not isinstance(layers, list) or len(layers) != len(w):
            layers = list(range(len(w)))
        try:
            weights.setdefault(label, {})[r["task"]] = ([int(x) for x in layers], [float(x) for x in w])
        except (TypeError, ValueError):
            raise UserError(f"{lw_file if lw_file.is_file() else f}: layer weights are not numbers") from None
    pngs: list[Path] = []
    if weights:
        png = out_dir / "superb_layer_weights.png"
        _plot_weights(weights, png)
        pngs.append(png)
        md += [f"![SUPERB layer weights]({rel(png)})", "",
               "Learned softmax weight of each layer in the weighted sum, per upstream and task (the dashed line: "
               "equal weights). Upstreams with one layer (spectral features) have none.", ""]
    else:
        md += ["No learned layer weights (one-layer upstreams or a conv featurizer only).", ""]
    return md, pngs


def _plot_weights(weights: dict[str, dict[str, tuple[list[int], list[float]]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ups = sorted(weights, key=lambda u: (0 if u.startswith("random:") else 1, u))
    n = len(ups)
    cols = min(n, 2)
    rows_n = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 3.2 * rows_n))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows_n, cols, squeeze=False)
    tasks = sorted({t for u in ups for t in weights[u]})
    for j, u in enumerate(ups):
        ax = axes[j // cols][j % cols]
        nl = 0
        for t, (xs, ws) in sorted(weights[u].items()):
            ax.plot(xs, ws, "o-", color=f"C{tasks.index(t) % 10}", markersize=3, label=t.upper())
            nl = max(nl, len(ws))
        if nl:
            ax.axhline(1.0 / nl, color="0.5", ls="--", lw=0.8)
        ax.set_title(u + (" (untrained baseline)" if u.startswith("random:") else ""), fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("softmax weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    for j in range(n, rows_n * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle("SUPERB: learned layer weights (dashed: equal weights)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


# ============================================================================================== header
def _git_commit(where: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        extra = " + uncommitted changes" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return f"`{head.stdout.strip()}`{extra}"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def _machine() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and val.strip():
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    amx = "yes" if "amx_tile" in flags else "no" if flags else "unknown"
    bf16 = "yes" if "avx512_bf16" in flags else "no" if flags else "unknown"
    return f"{model}, {cores} cores available, AMX {amx}, AVX512-BF16 {bf16} ({platform.system()} {platform.release()})"


# ============================================================================================== entry point
def _asr_section(dirs: Sequence[Path], rel) -> list[str]:
    """The fine-tuning table: one row per (initialisation, labelled subset, what was tuned), PER of the phone-unit run,
    CER / WER of the char-unit run, from every ``RUN/decode_test/scores.json`` under ``dirs`` (``speechssl finetune``
    + ``speechssl decode``), with the run's ``best/config.json`` and ``config.yaml``."""
    md = ["## Fine-tuning (CTC on the pretrained encoder, test split)", ""]
    if not dirs:
        return md + ["No fine-tuning run given (`speechssl report EXP --asr DIR`).", ""]
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    found = 0
    for d in dirs:
        if not d.is_dir():
            raise MissingInputError(f"--asr {d}: no such directory (a fine-tuning exp root: RUN/decode_test/...)")
        for f in sorted(d.glob("*/decode_test/scores.json"), key=_natural_key):
            run = f.parent.parent
            scores = _read_json(f, "decoding scores (`speechssl decode`)")
            cfg = _read_yaml(run / "config.yaml")
            best = _read_json(run / "best" / "config.json", "fine-tuned checkpoint")
            extra = best.get("extra", {}) if isinstance(best, dict) else {}
            init = str(_get(cfg, "init", ""))
            if init.startswith("random:"):
                label = f"untrained ({Path(init[7:]).parent.name} config)"
            else:
                label = Path(init).parent.name if Path(init).name == "best" else Path(init).name
            split = Path(str(_get(cfg, "data.train", "?"))).name
            tune = str(_get(cfg, "tune.mode", "full"))
            row = rows.setdefault((label, split, tune), {"baseline": init.startswith("random:")})
            for k in ("per", "cer", "wer"):
                if isinstance(scores.get(k), (int, float)):
                    row[k] = 100 * float(scores[k])
            params = extra.get("params") or {}
            if params.get("total"):
                row["frac"] = 100 * params["trained"] / params["total"]
            row.setdefault("steps", []).append(str(extra.get("step", "?")))
            row.setdefault("decoders", set()).add(str(scores.get("decoder", "?")) + (
                " + LM" if scores.get("lm") else ""))
            found += 1
    if not found:
        return md + [f"No decoded fine-tuning run under {', '.join(f'`{rel(d)}`' for d in dirs)}.", ""]
    order = sorted(rows, key=lambda k: (k[1] != "train_10min", k[1], k[2] != "full", not rows[k]["baseline"], k[0]))
    md += ["| initialisation | labelled | tuned | trained params | PER % | CER % | WER % | best update |",
           "|---|---|---|---|---|---|---|---|"]
    for key in order:
        r = rows[key]
        label = f"{key[0]} (baseline)" if r["baseline"] else key[0]
        frac = f"{r['frac']:.1f}%" if "frac" in r else "—"
        cells = [f"{r[k]:.1f}" if k in r else "—" for k in ("per", "cer", "wer")]
        md.append(f"| {label} | {key[1]} | {key[2]} | {frac} | {' | '.join(cells)} | {'/'.join(r['steps'])} |")
    decoders = sorted({x for r in rows.values() for x in r["decoders"]})
    md += ["", f"{found} runs from {', '.join(f'`{rel(d)}`' for d in dirs)}. PER: phone-unit runs, greedy decoding; "
           f"CER / WER: char-unit runs (decoders: {', '.join(decoders)}). The baseline rows fine-tune the untrained "
           "model of the same config (its frontend is fbank: the spectral features learned from the labels alone) "
           "with the same recipe and steps; the best update is picked by validation error on dev.", ""]
    return md


# ============================================================================================== objectives
_OBJECTIVE_NAMES = {"hubert": "HuBERT", "wav2vec2": "wav2vec 2.0", "bestrq": "BEST-RQ"}
_OBJECTIVE_TASKS = [("pr", "per", "SUPERB PR PER % ↓"), ("ks", "accuracy", "SUPERB KS acc % ↑"),
                    ("sid", "accuracy", "SUPERB SID acc % ↑")]


def _objectives_section(runs: list[_Run], reports: list[_Layers], superb_files: list[Path],
                        asr_dirs: Sequence[Path]) -> list[str]:
    """One row per pretraining objective of the exp (HuBERT: its last iteration, timed over all its iterations)
    beside the untrained model and fbank: best-layer PNMI, SUPERB PR / KS / SID, the PER fine-tuned on 10 minutes,
    training time. Shown when the exp holds a run of an objective other than HuBERT (``make compare``)."""
    by_obj: dict[str, list[_Run]] = {}
    for r in runs:
        by_obj.setdefault(str(_get(r.config, "model.objective", "hubert")), []).append(r)
    if set(by_obj) <= {"hubert"}:
        return []
    md = ["## Objectives (same model, data and evaluation)", ""]
    layers = {rep.run: rep.data for rep in reports}
    superb: dict[str, dict[str, float]] = {}  # upstream dir name (= run name), "fbank", "random" -> task -> value
    for f in superb_files:
        r = _read_json(f, "SUPERB result (`speechssl superb`)")
        label = str(r.get("upstream_label", ""))
        name = "fbank" if label.split(":")[0] in ("fbank", "mfcc") else "random" if label.startswith("random:") \
            else f.parent.parent.name
        metric = {t: k for t, k, _ in _OBJECTIVE_TASKS}.get(r.get("task"))
        test = r.get("test") or {}
        if metric and isinstance(test.get(metric), (int, float)):
            superb.setdefault(name, {})[r["task"]] = 100 * float(test[metric])
    per: dict[str, float] = {}  # run name or "random" -> PER % of the full fine-tuning on the 10-minute subset
    for d in asr_dirs:
        for f in sorted(d.glob("*/decode_test/scores.json"), key=_natural_key) if d.is_dir() else []:
            cfg = _read_yaml(f.parent.parent / "config.yaml")
            scores = _read_json(f, "decoding scores (`speechssl decode`)")
            if (Path(str(_get(cfg, "data.train", ""))).name != "train_10min" or str(_get(cfg, "tune.mode", "full"))
                    != "full" or not isinstance(scores.get("per"), (int, float))):
                continue
            init = str(_get(cfg, "init", ""))
            per["random" if init.startswith("random:") else Path(init).parent.name] = 100 * float(scores["per"])

    def pnmi_cell(d: dict[str, Any] | None) -> str:
        if not d:
            return "–"
        best = max(d["layers"], key=lambda x: float(x["pnmi"]))
        rnd = d.get("random_init")
        rbest = max(float(x["pnmi"]) for x in rnd["layers"]) if rnd else None
        ratio = f", {float(best['pnmi']) / rbest:.2f}×" if rbest else ""
        return f"{float(best['pnmi']):.3f} (L{best['layer']}{ratio})"

    def row(name: str, key: str, pnmi: str, minutes: str) -> str:
        cells = [f"{superb[key][t]:.1f}" if t in superb.get(key, {}) else "–" for t, _, _ in _OBJECTIVE_TASKS]
        ft = f"{per[key]:.1f}" if key in per else "–"
        return f"| {name} | {minutes} | {pnmi} | " + " | ".join(cells) + f" | {ft} |"

    any_layers = next(iter(layers.values()), None)
    sp = _spectral(any_layers) if any_layers else None
    rnd = any_layers.get("random_init") if any_layers else None
    md += ["| objective (run) | training | best-layer PNMI (layer, × untrained) | "
           + " | ".join(h for _, _, h in _OBJECTIVE_TASKS) + " | fine-tuned PER % (10 min) ↓ |",
           "|---|---|---|" + "---|" * len(_OBJECTIVE_TASKS) + "---|"]
    md.append(row("fbank (spectral baseline)", "fbank",
                  f"{float(sp['pnmi']):.3f} ({_spectral_label(sp)})" if sp else "–", "none"))
    md.append(row("untrained model, same config (baseline)", "random",
                  f"{max(float(x['pnmi']) for x in rnd['layers']):.3f} (1.00×)" if rnd else "–", "none"))
    for obj in sorted(by_obj, key=lambda o: list(_OBJECTIVE_NAMES).index(o) if o in _OBJECTIVE_NAMES else 9):
        rs = by_obj[obj]
        last = rs[-1]
        mins = [r.log["minutes"] for r in rs if "minutes" in r.log]
        upd = sum(int(r.log.get("stop_update") or 0) for r in rs)
        minutes = (f"{sum(mins):.1f} min, {upd} updates" + (f" ({len(rs)} runs)" if len(rs) > 1 else "")
                   if mins else "–")
        md.append(row(f"{_OBJECTIVE_NAMES.get(obj, obj)} ({last.name})", last.name, pnmi_cell(layers.get(last.name)),
                      minutes))
    md += ["", "PNMI: k-means of the best layer against the phone alignments (section above); SUPERB: test split of "
           "the frozen-upstream tasks; fine-tuned PER: CTC on the 10-minute subset, greedy, test split (section "
           "below). Training: wall-clock minutes of pretraining (HuBERT: its iterations together, not counting its "
           "k-means and label stages). A dash: that stage was not run for the row.", ""]
    return md


def write_report(exp_dir: str | os.PathLike, superb_dirs: Iterable[str | os.PathLike] = (),
                 out: str | os.PathLike | None = None, asr_dirs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``EXP/report.md`` (or ``out``) and its PNGs in ``<out's dir>/<out's stem>/`` (``EXP/report/``);
    returns the path of the markdown. Reads the exp dir's stage outputs and the SUPERB runs under
    ``superb_dirs`` (see the module docstring); a section without input says so."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise MissingInputError(f"{exp}: no such experiment directory (the recipe's exp dir, e.g. "
                                "egs/mini_synth/hubert/exp)")
    md_path = Path(out) if out is not None else exp / "report.md"
    fig_dir = md_path.parent / md_path.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    sdirs = [Path(s) for s in superb_dirs]
    adirs = [Path(s) for s in asr_dirs]

    def rel(p: Path) -> str:
        return Path(os.path.relpath(Path(p).resolve(), md_path.parent.resolve())).as_posix()

    # read everything first: a malformed file fails before anything is written
    runs = [_load_run(d) for d in _find_runs(exp)]
    layer_reports = [_load_layers(d / "layers" / "layers.json", d.name) for d in
                     sorted((d for d in exp.iterdir() if (d / "layers" / "layers.json").is_file()), key=_natural_key)]
    label_md = _label_section(exp, layer_reports, rel)

    written: list[Path] = []
    for r in runs:
        if r.scalars:
            r.curves_png = fig_dir / f"train_{r.name}.png"
            _plot_curves(r, r.curves_png)
            written.append(r.curves_png)
    pnmi_png = None
    if layer_reports:
        pnmi_png = fig_dir / "pnmi_by_layer.png"
        _plot_pnmi(layer_reports, pnmi_png)
        written.append(pnmi_png)
    asr_md = _asr_section(adirs, rel)
    superb_md, superb_pngs = _superb_section(sdirs, fig_dir, rel)
    written += superb_pngs
    for stale in fig_dir.glob("*.png"):  # figures of sections that are gone (a re-run without SUPERB)
        if stale not in written:
            stale.unlink()

    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cmd = f"speechssl report {exp.resolve()}" + "".join(f" --superb {s.resolve()}" for s in sdirs) + "".join(
        f" --asr {s.resolve()}" for s in adirs) + (
        f" --out {md_path.resolve()}" if out is not None else "")
    md = [f"# Experiment report: `{exp.resolve().name}`", "",
          f"- generated: {now}, by `{cmd}` (rerun it to refresh)",
          f"- experiment: `{exp.resolve()}`",
          f"- code: speechssl at {_git_commit(Path(__file__).resolve().parent)}",
          f"- machine (where this report was made): {_machine()}",
          "", "Every quality figure below stands beside its baselines: an untrained model of the same config and "
          "spectral features (MFCC / fbank units, fbank SUPERB).", ""]
    md += _runs_section(runs, rel)
    md += _layers_section(layer_reports, pnmi_png, rel)
    md += label_md
    md += superb_md
    md += asr_md
    md += _objectives_section(runs, layer_reports, _superb_files(sdirs) if sdirs else [], adirs)
    atomic_write_text(md_path, "\n".join(md).rstrip("\n") + "\n")
    log.debug("wrote %s and %d figure(s) in %s", md_path, len(written), fig_dir)
    return md_path
