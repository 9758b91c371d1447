"""Run identity (train/state.py: open_run): a run directory records the options that define its result; a rerun
without --resume, a resume with another defining option or other inputs, and a resume of another kind of run are
refused in one line naming the option, its old and new values and the ways out; --overwrite starts over."""

from __future__ import annotations

import json

import pytest

from speechssl.cli import build_parser, main
from speechssl.errors import UserError
from speechssl.train.state import MAY_CHANGE_ON_RESUME, RUN_FILE, dir_fingerprint, flatten, open_run

OPTS = {"seed": 3, "optim": {"lr": 1e-3, "max_steps": 20}, "data": {"train": "d", "num_workers": 2}, "log_every": 5}


def _open(run, opts=OPTS, **kw):
    kw.setdefault("resume", False)
    return open_run(run, "pretrain", opts, markers=("checkpoints/step-*",), **kw)


def _with(**changes):
    opts = json.loads(json.dumps(OPTS))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = opts
        for p in path:
            node = node[p]
        node[last] = value
    return opts


def _held(run):
    """A run that has written a checkpoint."""
    assert _open(run) is False
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    return run


def test_a_new_run_records_its_defining_options(tmp_path):
    run = tmp_path / "exp"
    assert _open(run) is False
    rec = json.loads((run / RUN_FILE).read_text())
    assert rec["kind"] == "pretrain"
    assert rec["options"] == {"seed": 3, "optim.lr": 1e-3, "data.train": "d"}  # budgets, logging, workers left out
    assert rec["may_change_on_resume"] == list(MAY_CHANGE_ON_RESUME["pretrain"])
    # a run that failed before its first checkpoint holds nothing to mix with: a new one may take its place
    assert _open(run, _with(seed=8)) is False
    assert json.loads((run / RUN_FILE).read_text())["options"]["seed"] == 8
    assert _open(run, resume=True) is False


def test_rerun_without_resume_is_refused(tmp_path):
    run = _held(tmp_path / "exp")
    with pytest.raises(UserError) as e:
        _open(run)
    msg = str(e.value)
    assert "\n" not in msg and str(run) in msg and "--resume" in msg and "--overwrite" in msg


@pytest.mark.parametrize("change, named", [
    ({"seed": 4}, "seed = 4, but the run was made with 3"),
    ({"optim__lr": 0.01}, "optim.lr = 0.01, but the run was made with 0.001"),
    ({"data__train": "other"}, "data.train = other, but the run was made with d"),
])
def test_resume_with_another_defining_option_is_refused(tmp_path, change, named):
    run = _held(tmp_path / "exp")
    with pytest.raises(UserError) as e:
        _open(run, _with(**change), resume=True)
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "another --out" in msg and "--overwrite" in msg
    assert "May change on resume: optim.max_steps" in msg


def test_resume_may_change_budgets_logging_and_workers(tmp_path):
    run = _held(tmp_path / "exp")
    assert _open(run, _with(optim__max_steps=40, log_every=1, data__num_workers=0), resume=True) is True


def test_a_new_option_or_a_dropped_one_is_a_change(tmp_path):
    run = _held(tmp_path / "exp")
    with pytest.raises(UserError, match="optim.power = 2, but the run was made with <unset>"):
        _open(run, _with(optim__power=2), resume=True)


def test_inputs_whose_contents_changed_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wav.scp").write_text("u1 /a.wav\n")
    run = tmp_path / "exp"
    open_run(run, "pretrain", OPTS, resume=False, inputs={"data.train": dir_fingerprint(data)})
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    assert open_run(run, "pretrain", OPTS, resume=True, inputs={"data.train": dir_fingerprint(data)},
                    markers=("checkpoints/step-*",))
    (data / "wav.scp").write_text("u1 /b.wav\n")
    with pytest.raises(UserError, match=r"--resume with data.train \(its contents changed\)"):
        open_run(run, "pretrain", OPTS, resume=True, inputs={"data.train": dir_fingerprint(data)},
                 markers=("checkpoints/step-*",))


def test_overwrite_deletes_the_old_run(tmp_path):
    run = _held(tmp_path / "exp")
    (run / "train.log").write_text("old\n")
    assert _open(run, _with(seed=9), overwrite=True) is False
    assert sorted(p.name for p in run.iterdir()) == [RUN_FILE]
    assert json.loads((run / RUN_FILE).read_text())["options"]["seed"] == 9
    with pytest.raises(UserError, match="choose one"):
        _open(run, resume=True, overwrite=True)


def test_run_of_another_kind_is_refused(tmp_path):
    run = _held(tmp_path / "exp")
    with pytest.raises(UserError, match="holds a pretrain run, not a superb run"):
        open_run(run, "superb", OPTS, resume=True)


def test_a_run_from_before_run_json_resumes_only_with_resume(tmp_path, caplog):
    run = tmp_path / "exp"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    with pytest.raises(UserError, match="holds a pretrain run already"):
        _open(run)
    assert _open(run, resume=True) is True
    assert "cannot be checked" in caplog.text
    assert (run / RUN_FILE).is_file()   # recorded now: the next resume is checked


def test_a_directory_with_other_files_is_not_a_run(tmp_path):
    run = tmp_path / "exp"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    assert _open(run) is False
    assert (run / "notes.txt").read_text() == "mine\n"


def test_bad_run_dirs_are_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _open(f)
    run = _held(tmp_path / "exp")
    (run / RUN_FILE).write_text("{not json")
    with pytest.raises(UserError, match="unreadable run record"):
        _open(run, resume=True)


def test_flatten_and_dir_fingerprint(tmp_path):
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    d = tmp_path / "d"
    d.mkdir()
    (d / "text").write_text("u1 hello\n")
    fp = dir_fingerprint(d)
    (d / ".hidden").write_text("ignored")
    assert dir_fingerprint(d) == fp
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "text").write_text("u1 hello\n")
    assert dir_fingerprint(copy) == fp   # a copy is the same data
    (d / "text").write_text("u1 hellO\n")
    assert dir_fingerprint(d) != fp
    assert dir_fingerprint(tmp_path / "absent") == "missing"


def test_overrides_anywhere_on_the_command_line(tmp_path, capsys):
    ns = build_parser().parse_known_args(["pretrain", "optim.lr=1", "--resume", "auto", "seed=7"])
    assert ns[0].overrides == ["optim.lr=1"] and ns[1] == ["seed=7"]   # what argparse alone does
    assert main(["pretrain", "optim.lr=0.5", "--print-config", f"exp_dir={tmp_path}", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "seed: 7" in out and f"exp_dir: {tmp_path}" in out
    assert main(["superb", "--task", "ks", "head.dropout=0.3", "--print-config", "optim.lr=0.25"]) == 0
    out = capsys.readouterr().out
    assert "dropout: 0.3" in out and "lr: 0.25" in out
    with pytest.raises(SystemExit):  # anything else left over is still argparse's error
        main(["pretrain", "--print-config", "--no-such-option"])
