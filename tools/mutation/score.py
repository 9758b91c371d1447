"""Mutation scores per module from mutmut 3's results (run in the directory that holds ``mutants/``).

    python tools/mutation/score.py prepare            # drop test paths this tree lacks from [tool.mutmut]
    python tools/mutation/score.py globs              # the mutant-name globs of targets.txt, one a line
    python tools/mutation/score.py report [--json F]  # per-module killed / survived / ... and the score

Score = killed (timeouts count as killed) / (mutants run), as mutmut's own badge counts it; mutants whose
function no selected test calls are "no tests" and count as survivors here (a test gap, not a free pass).
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault",
          -9: "segfault", None: "not checked"}


def targets() -> list[tuple[str, str]]:
    out = []
    for line in (HERE / "targets.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            label, glob = line.split("\t")
            out.append((label, glob))
    return out


def prepare() -> None:
    """Keep in pytest_add_cli_args_test_selection only the test files that exist here (an older revision has no
    tests/test_properties.py): rewrites that list of ./pyproject.toml in place (run it in the scratch copy)."""
    path = Path("pyproject.toml")
    text = path.read_text(encoding="utf-8")
    m = re.search(r"pytest_add_cli_args_test_selection = \[(.*?)\n\]", text, re.S)
    assert m, "no pytest_add_cli_args_test_selection in [tool.mutmut]"
    keep, dropped = [], []
    for item in re.findall(r'"([^"]+)"', m.group(1)):
        (keep if Path(item.split("::")[0]).exists() else dropped).append(item)
    if dropped:
        print(f"[mutation] not in this tree, left out of the test selection: {' '.join(dropped)}")
    body = "".join(f'\n  "{k}",' for k in keep)
    path.write_text(text[: m.start(1)] + body + text[m.end(1):], encoding="utf-8")


def results() -> dict[str, str]:
    out = {}
    for meta in Path("mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text(encoding="utf-8"))
        for key, code in data.get("exit_code_by_key", {}).items():
            out[key] = STATUS.get(code, "suspicious")
    return out


def report(json_path: str | None) -> int:
    res = results()
    per: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    seen = set()
    for label, glob in targets():
        for key, status in sorted(res.items()):
            if key in seen or not fnmatch.fnmatch(key, glob):
                continue
            seen.add(key)
            status = "killed" if status == "timeout" else status
            per[label][status] += 1
            if status not in ("killed", "not checked"):
                survivors[label].append(f"{key} ({status})")
    table = {}
    print(f"{'module':16s} {'mutants':>8s} {'killed':>7s} {'survived':>9s} {'no tests':>9s} {'other':>6s} {'score':>7s}")
    total = Counter()
    for label in dict.fromkeys(lbl for lbl, _ in targets()):
        c = per[label]
        n = sum(c.values())
        if c["not checked"] == n:  # not run this time (--only)
            continue
        other = n - c["killed"] - c["survived"] - c["no tests"]
        score = c["killed"] / n if n else float("nan")
        total.update(c)
        table[label] = {**c, "mutants": n, "score": score, "survivors": survivors[label]}
        print(f"{label:16s} {n:8d} {c['killed']:7d} {c['survived']:9d} {c['no tests']:9d} {other:6d} {score:7.1%}")
    total.pop("not checked", None)
    n = sum(total.values())
    print(f"{'all':16s} {n:8d} {total['killed']:7d} {total['survived']:9d} {total['no tests']:9d} "
          f"{n - total['killed'] - total['survived'] - total['no tests']:6d} {total['killed'] / max(n, 1):7.1%}")
    for label, names in survivors.items():
        for name in names:
            print(f"  not killed [{label}]: {name}")
    if json_path:
        Path(json_path).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "report"
    if cmd == "prepare":
        prepare()
    elif cmd == "globs":
        print("\n".join(g for _, g in targets()))
    elif cmd == "report":
        j = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
        sys.exit(report(j))
    else:
        sys.exit(f"usage: {sys.argv[0]} prepare|globs|report [--json FILE]")
