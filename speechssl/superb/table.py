"""The SUPERB results table: one markdown table (rows: upstreams, columns: tasks) from ``results.json`` files."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

from speechssl.errors import UserError
from speechssl.superb.upstreams import SPECTRAL

__all__ = ["COLUMNS", "results_table"]

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
    replaces an earlier one. A matched directory without a ``results.json`` is searched below for them."""
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
        try:
            r = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{f}: unreadable ({type(e).__name__}: {e}); rerun that task or delete the file") from None
        if not (isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("upstream_label"), str)
                and isinstance(r.get("test"), dict)
                and all(isinstance(v, (int, float)) for v in r["test"].values())):
            raise UserError(f"{f}: not a `speechssl superb` result (needs task, upstream_label and numeric test "
                            "metrics); rerun that task or delete the file")
        label = r["upstream_label"]
        if label not in rows:
            rows.append(label)
        for key, value in r["test"].items():
            cells[(label, r["task"], key)] = value
    rows.sort(key=lambda r: 0 if r in SPECTRAL else 1 if r.startswith("random:") else 2)  # baselines first (stable)
    cols = [c for c in COLUMNS if any((row, c[0], c[1]) in cells for row in rows)]
    lines = ["| " + " | ".join(["upstream"] + [c[2] for c in cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in rows:
        vals = ["–" if (row, t, k) not in cells else f"{cells[(row, t, k)]:.3f}" if k in _RAW
                else f"{100 * cells[(row, t, k)]:.1f}" for t, k, _ in cols]
        lines.append("| " + " | ".join([row] + vals) + " |")
    return "\n".join(lines) + "\n"
