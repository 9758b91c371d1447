"""`speechssl superb table` rows: one per upstream's weights (``upstream_sha1``), never two models in one row.

Two checkpoints that share a directory name (``expA/hubert/best``, ``expB/hubert/best``: both labelled ``hubert``)
are two rows with distinct labels; the same checkpoint on several tasks is one row; ``speechssl report`` shows the
same table.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from speechssl.cli import main
from speechssl.errors import UserError
from speechssl.report import _superb_section
from speechssl.superb.table import results_table, row_labels
from speechssl.superb.upstreams import upstream_label


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def write_result(root: Path, run: str, upstream: str, task: str, metric: str, value: float, weights: str | None,
                 label: str | None = None) -> Path:
    """``root/run/results.json`` as ``speechssl superb`` writes it (``weights``: what the SHA-1 is of; None: a
    result of an older speechssl, without ``upstream_sha1``)."""
    out = root / run
    out.mkdir(parents=True)
    r = {"task": task, "metric": metric, "upstream": upstream, "upstream_label": label or upstream_label(upstream),
         "test": {metric: value}}
    if weights is not None:
        r["upstream_sha1"] = sha1(weights)
    (out / "results.json").write_text(json.dumps(r))
    return out / "results.json"


def table_rows(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_two_checkpoints_with_one_label_are_two_rows_told_apart_by_their_directories(tmp_path):
    write_result(tmp_path, "a_pr", "expA/hubert/best", "pr", "per", 0.30, "weights A")
    write_result(tmp_path, "b_pr", "expB/hubert/best", "pr", "per", 0.40, "weights B")
    write_result(tmp_path, "a_ks", "expA/hubert/best", "ks", "accuracy", 0.90, "weights A")
    table = results_table([str(tmp_path / "*")])
    rows = table_rows(table)
    assert list(rows) == ["expA/hubert", "expB/hubert"], table
    assert table.splitlines()[0] == "| upstream | PR PER% ↓ | KS acc% ↑ |"
    assert rows["expA/hubert"] == ["30.0", "90.0"] and rows["expB/hubert"] == ["40.0", "–"], table


def test_the_same_checkpoint_on_two_tasks_is_one_row(tmp_path):
    write_result(tmp_path, "1_pr", "exp/hubert_iter2/best", "pr", "per", 0.25, "weights")
    write_result(tmp_path, "2_sid", "exp/hubert_iter2/best", "sid", "accuracy", 0.5, "weights")
    write_result(tmp_path, "3_asv", "exp/hubert_iter2/best", "asv", "eer", 0.1, "weights")
    rows = table_rows(results_table([str(tmp_path / "*")]))
    assert rows == {"hubert_iter2": ["25.0", "50.0", "10.0"]}
    # the same weights run again from a copy under another name: a row of its own, under that name
    write_result(tmp_path, "4_pr", "copy/final", "pr", "per", 0.25, "weights")
    rows = table_rows(results_table([str(tmp_path / "*")]))
    assert rows == {"hubert_iter2": ["25.0", "50.0", "10.0"], "final": ["25.0", "–", "–"]}


def test_one_path_holding_other_weights_is_told_apart_by_the_sha1(tmp_path):
    """The same checkpoint path evaluated before and after it was overwritten: the SHA-1 is all that differs."""
    write_result(tmp_path, "1_old", "exp/hubert/best", "pr", "per", 0.5, "before")
    write_result(tmp_path, "2_new", "exp/hubert/best", "ks", "accuracy", 0.8, "after")
    rows = table_rows(results_table([str(tmp_path / "*")]))
    assert list(rows) == [f"hubert ({sha1('before')[:7]})", f"hubert ({sha1('after')[:7]})"]
    assert rows[f"hubert ({sha1('before')[:7]})"] == ["50.0", "–"]


def test_labels_of_random_init_and_nested_runs(tmp_path):
    results = [
        {"upstream": "random:runs/expA/hubert/best", "upstream_label": "random:hubert", "upstream_sha1": sha1("rA")},
        {"upstream": "random:runs/expB/hubert/best", "upstream_label": "random:hubert", "upstream_sha1": sha1("rB")},
        # the nearest parent that differs is two levels up: 1/exp/hubert vs 2/exp/hubert
        {"upstream": "1/exp/hubert", "upstream_label": "hubert", "upstream_sha1": sha1("1")},
        {"upstream": "2/exp/hubert", "upstream_label": "hubert", "upstream_sha1": sha1("2")},
        {"upstream": "fbank", "upstream_label": "fbank", "upstream_sha1": sha1("fbank")},
        {"upstream": "1/exp/hubert", "upstream_label": "hubert", "upstream_sha1": sha1("1")},
    ]
    assert row_labels(results) == ["random:expA/hubert", "random:expB/hubert", "1/hubert", "2/hubert", "fbank",
                                   "1/hubert"]
    # parents that part only some of them (x, x, y): the SHA-1 for all three
    three = [{"upstream": f"{d}/{i}/hubert", "upstream_label": "hubert", "upstream_sha1": sha1(f"{d}{i}")}
             for d, i in (("x", 1), ("x", 2), ("y", 1))]
    assert row_labels(three) == [f"hubert ({sha1(w)[:7]})" for w in ("x1", "x2", "y1")]


def test_results_without_sha1_keep_one_row_per_label(tmp_path):
    """Files of an older speechssl (no upstream_sha1) go by their label, as before."""
    write_result(tmp_path, "pr", "exp/hubert/best", "pr", "per", 0.5, None)
    write_result(tmp_path, "ks", "exp/hubert/best", "ks", "accuracy", 0.5, None)
    write_result(tmp_path, "fb", "fbank", "pr", "per", 0.7, None)
    assert table_rows(results_table([str(tmp_path / "*")])) == {"fbank": ["70.0", "–"], "hubert": ["50.0", "50.0"]}


def test_cli_and_report_show_the_distinct_rows(tmp_path, capsys):
    root = tmp_path / "superb"
    write_result(root, "expA_hubert/pr", "expA/hubert/best", "pr", "per", 0.30, "weights A")
    write_result(root, "expB_hubert/pr", "expB/hubert/best", "pr", "per", 0.40, "weights B")
    write_result(root, "fbank/pr", "fbank", "pr", "per", 0.60, "fbank options")
    capsys.readouterr()
    assert main(["superb", "table", str(root / "*" / "*")]) == 0
    printed = table_rows(capsys.readouterr().out)
    assert printed == {"fbank": ["60.0"], "expA/hubert": ["30.0"], "expB/hubert": ["40.0"]}
    md, _ = _superb_section([root], tmp_path / "fig", lambda p: p)
    assert table_rows("\n".join(line for line in md if line.startswith("|"))) == printed


def test_a_foreign_sha1_is_one_line(tmp_path):
    f = write_result(tmp_path, "pr", "exp/hubert/best", "pr", "per", 0.5, "w")
    r = json.loads(f.read_text())
    r["upstream_sha1"] = 42
    f.write_text(json.dumps(r))
    with pytest.raises(UserError, match=r"pr/results.json: not a `speechssl superb` result"):
        results_table([str(tmp_path / "*")])
