"""The SUPERB results table: one markdown table (rows: upstreams, columns: tasks) from ``results.json`` files.

A row is one upstream's weights: results are keyed by ``upstream_sha1`` (the SHA-1 of the checkpoint's weights, or
of a spectral baseline's options) with their label, so the same checkpoint evaluated on several tasks is one row,
and two different checkpoints are two rows even when they share a directory name (``expA/hubert/best`` and
``expB/hubert/best`` are both labelled ``hubert``). Rows whose labels collide are told apart (:func:`row_labels`):
by the nearest parent directory of their checkpoint paths that differs (``expA/hubert``, ``expB/hubert``), else by
the first 7 hex digits of their SHA-1 (``hubert (3f2a9c1)``: the same path holding other weights). The same
weights run under two labels (a copy of the checkpoint elsewhere) are two rows, each under its own label. A
``results.json`` without ``upstream_sha1`` (written before it was recorded) is keyed by its label alone.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

from speechssl.errors import UserError
from speechssl.superb.upstreams import SPECTRAL

__all__ = ["COLUMNS", "results_table", "row_labels"]

# (task, test metric, header); every figure in percent except minDCF and the TWVs (QbE's MTWV is a value in
# (-inf, 1], reported as is). ASR's CER beside its WER: on a small corpus the WER of a briefly trained head stays
# near 100 % while the CER already ranks the upstreams.
COLUMNS = [("pr", "per", "PR PER% ↓"), ("asr", "wer", "ASR WER% ↓"), ("asr", "cer", "ASR CER% ↓"),
           ("ks", "accuracy", "KS acc% ↑"), ("qbe", "mtwv", "QbE MTWV ↑"), ("sid", "accuracy", "SID acc% ↑"),
           ("asv", "eer", "ASV EER% ↓"), ("sd", "der", "SD DER% ↓"), ("er", "accuracy", "ER acc% ↑"),
           ("ic", "accuracy", "IC acc% ↑"), ("sf", "slot_f1", "SF F1% ↑"), ("sf", "slot_cer", "SF CER% ↓"),
           ("asv", "min_dcf", "ASV minDCF ↓")]
_RAW = {"min_dcf", "mtwv"}   # printed as values, not percentages


def results_table(patterns: Sequence[str]) -> str:
    """One markdown table (rows: spectral baselines, random-init models, then the other upstreams in first-seen
    order; columns: the tasks present) from ``results.json`` files found by ``patterns`` (globs of result files
    or of run dirs). Figures in percent except minDCF and MTWV; a later file for the same (upstream, task)
    replaces an earlier one. A matched directory without a ``results.json`` is searched below for them. A row is
    one upstream's weights (``upstream_sha1``; see the module docstring), its label distinct from every other."""
    files: list[Path] = []
    for pat in patterns:
        for match in sorted(glob.glob(str(pat), recursive=True)):
            p = Path(match)
            found = [p] if p.is_file() else [p / "results.json"] if (p / "results.json").is_file() \
                else sorted(p.rglob("results.json"))   # a dir of runs (EXP/<upstream>/<task>/results.json)
            files += [f for f in found if f not in files]
    if not files:
        raise UserError(f"no results.json found by {' '.join(patterns)}")
    results = [_read_result(f) for f in files]
    labels = row_labels(results)
    cells: dict[tuple[str, str, str], float] = {}
    rows: list[str] = []
    base: dict[str, str] = {}  # row label -> the upstream's own label (what says it is a baseline)
    for r, label in zip(results, labels):
        if label not in rows:
            rows.append(label)
            base[label] = r["upstream_label"]
        for key, value in r["test"].items():
            cells[(label, r["task"], key)] = value
    rows.sort(key=lambda row: 0 if base[row] in SPECTRAL else 1 if base[row].startswith("random:") else 2)  # stable
    cols = [c for c in COLUMNS if any((row, c[0], c[1]) in cells for row in rows)]
    lines = ["| " + " | ".join(["upstream"] + [c[2] for c in cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in rows:
        vals = ["–" if (row, t, k) not in cells else f"{cells[(row, t, k)]:.3f}" if k in _RAW
                else f"{100 * cells[(row, t, k)]:.1f}" for t, k, _ in cols]
        lines.append("| " + " | ".join([row] + vals) + " |")
    return "\n".join(lines) + "\n"


def _read_result(f: Path) -> dict:
    """A ``results.json`` of ``speechssl superb``; anything else is one line naming the file."""
    try:
        r = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: unreadable ({type(e).__name__}: {e}); rerun that task or delete the file") from None
    if not (isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("upstream_label"), str)
            and isinstance(r.get("test"), dict)
            and all(isinstance(v, (int, float)) for v in r["test"].values())
            and isinstance(r.get("upstream_sha1", ""), str) and isinstance(r.get("upstream", ""), str)):
        raise UserError(f"{f}: not a `speechssl superb` result (needs task, upstream_label and numeric test "
                        "metrics); rerun that task or delete the file")
    return r


def _row_key(r: dict) -> tuple[str, str]:
    """What makes a row: the weights' SHA-1 under a label; a result without one (an older speechssl) goes by its
    label alone."""
    return r["upstream_label"], r.get("upstream_sha1") or ""


def row_labels(results: Sequence[dict]) -> list[str]:
    """The table row label of each ``results.json`` dict: the same for results of the same upstream (SHA-1 and
    label), and different for different upstreams. A row's label is its upstream's ``upstream_label``, unless
    another upstream (another SHA-1) has that label too: then every upstream of that label is prefixed with the nearest
    parent directory of its checkpoint path (``upstream``) that tells them apart (``expA/hubert``,
    ``random:expB/hubert``), or, where the paths do not (the same path held other weights, or no path is
    recorded), suffixed with the first 7 hex digits of its SHA-1 (``hubert (3f2a9c1)``)."""
    first: dict[tuple[str, str], dict] = {}
    for r in results:
        first.setdefault(_row_key(r), r)
    label = {key: r["upstream_label"] for key, r in first.items()}
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in first:
        groups.setdefault(label[key], []).append(key)
    for name, keys in groups.items():
        if len(keys) > 1:
            label.update(_told_apart(name, [first[k] for k in keys], keys))
    taken: dict[str, int] = {}
    for key in first:
        taken[label[key]] = taken.get(label[key], 0) + 1
    for key in first:  # a prefixed label equal to another upstream's own: the SHA-1 tells them apart
        if taken[label[key]] > 1:
            label[key] = f"{label[key]} ({_short(first[key], key)})"
    return [label[_row_key(r)] for r in results]


def _short(r: dict, key: tuple[str, str]) -> str:
    sha1 = r.get("upstream_sha1")
    return sha1[:7] if sha1 else "no SHA-1"


def _told_apart(name: str, results: list[dict], keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Labels for upstreams that share label ``name`` (see :func:`row_labels`)."""
    prefix = "random:" if name.startswith("random:") else ""
    ups = [r.get("upstream") or "" for r in results]
    paths = [Path(u[len(prefix):].rstrip("/")).parts if u.startswith(prefix) and u else () for u in ups]
    if all(paths) and len(set(paths)) == len(paths):
        # going up from the components each label already shows (its name; parent/best; parent/step-N)
        above = [p[: len(p) - _shown_depth(p)] for p in paths]
        for up in range(1, max(len(a) for a in above) + 1):
            comps = [a[-up] if up <= len(a) else "" for a in above]
            if len(set(comps)) == len(comps) and all(comps):
                return {k: f"{prefix}{c}/{name[len(prefix):]}" for k, c in zip(keys, comps)}
            if len(set(comps)) > 1:
                break  # they part here, but not each from every other: the SHA-1 says it shorter
    return {k: f"{name} ({_short(r, k)})" for k, r in zip(keys, results)}


def _shown_depth(parts: tuple[str, ...]) -> int:
    """How many trailing path components :func:`speechssl.superb.upstreams.upstream_label` shows or implies."""
    return 2 if parts[-1] == "best" or parts[-1].startswith("step-") else 1
