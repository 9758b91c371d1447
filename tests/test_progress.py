"""Progress output: tqdm on a terminal, a few plain lines (no carriage returns) in a log (speechssl/progress.py)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tqdm import tqdm

from speechssl.errors import UserError
from speechssl.progress import LineProgress, progress_bar, progress_interval

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("SPEECHSSL_PROGRESS", raising=False)
    monkeypatch.delenv("SPEECHSSL_PROGRESS_INTERVAL", raising=False)


def lines_of(err: str) -> list[str]:
    """The lines of a log, which must hold no carriage return and no terminal escape."""
    assert "\r" not in err and "\x1b" not in err, repr(err[:300])
    assert "\n\n" not in err and not err.startswith("\n"), repr(err[:300])  # no bare newlines either
    return err.splitlines()


def counts(lines: list[str], desc: str) -> list[str]:
    return [re.match(rf"{re.escape(desc)}: ([^ ]+)", line).group(1) for line in lines]


def test_many_updates_write_one_line_without_carriage_returns(capsys, monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "3600")  # no periodic line, however slow the machine
    bar = progress_bar(total=10_000, desc="work", unit="utt")
    assert isinstance(bar, LineProgress)
    for i in range(10_000):
        bar.update(1)
        bar.set_postfix(loss=f"{i % 7:.3f}", refresh=i % 2 == 0)  # both forms the library uses
    bar.close()
    bar.close()  # a second close writes nothing
    lines = lines_of(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("work: 10000/10000 utt (100%), ")
    assert "elapsed " in lines[0] and "eta" not in lines[0]
    assert lines[0].endswith(", loss=3.000")  # the last postfix (9999 % 7 == 3)


def test_default_interval_is_a_minute():
    assert progress_interval() == 60.0


def test_interval_lines_carry_the_counts(capsys, monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "0.01")
    with progress_bar(total=5, desc="step", unit="step") as bar:
        for _ in range(5):
            time.sleep(0.03)  # longer than the interval: every update is due a line
            bar.update(1)
            bar.set_postfix(loss="1.0", refresh=False)
    lines = lines_of(capsys.readouterr().err)
    assert counts(lines, "step") == ["1/5", "2/5", "3/5", "4/5", "5/5", "5/5"]  # five periodic, one final
    assert "(20%)" in lines[0] and "eta " in lines[0] and lines[1].endswith(", loss=1.0")  # postfix set after update
    assert "(100%)" in lines[-1] and "eta" not in lines[-1]
    assert all(re.search(r", [\d.]+ step/s, elapsed \d\d:\d\d", line) for line in lines), lines


def test_iteration_and_rate_only_then_final(capsys, monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "0.01")
    seen = []
    for x in progress_bar(iter(range(4)), desc="files", unit="file"):  # no len(): no total
        time.sleep(0.03)
        seen.append(x)
    assert seen == [0, 1, 2, 3]
    lines = lines_of(capsys.readouterr().err)
    assert lines, "at least the final line"
    assert lines[-1].startswith("files: 4 file, ") and "%" not in lines[-1]


def test_final_line_only_when_interval_is_zero(capsys, monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "0")
    bar = progress_bar(total=3, desc="x", initial=1)
    for _ in range(2):
        time.sleep(0.02)
        bar.update()
    assert capsys.readouterr().err == ""  # nothing before close
    bar.close()
    assert counts(lines_of(capsys.readouterr().err), "x") == ["3/3"]


def test_floats_and_unit_scale(capsys, monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "3600")
    with progress_bar(total=12.5, unit="s", desc="extract") as bar:
        bar.update(1.25)
        bar.update(2.5)
    with progress_bar(total=6570, unit="frame", unit_scale=True, desc="sampling") as bar:
        bar.update(6570)
    lines = lines_of(capsys.readouterr().err)
    assert lines[0].startswith("extract: 3.8/12.5 s (30%), ")
    assert lines[1].startswith("sampling: 6.57k/6.57k frame (100%), ") and " frame/s, " in lines[1]


def test_disable_and_env_silence(capsys, monkeypatch):
    assert list(progress_bar(range(3), disable=True)) == [0, 1, 2]
    with progress_bar(total=3, disable=True) as bar:
        bar.update(3)
        bar.set_postfix(a=1)
    monkeypatch.setenv("SPEECHSSL_PROGRESS", "0")
    assert list(progress_bar(range(3), desc="quiet")) == [0, 1, 2]
    bar = progress_bar(total=2)
    bar.update(2)
    bar.close()
    assert capsys.readouterr().err == ""


def test_nested_and_leave_false(capsys, monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "0.001")
    for _ in progress_bar(range(2), desc="outer"):
        for _ in progress_bar(range(3), desc="inner", leave=False, position=1):
            time.sleep(0.002)
    lines = lines_of(capsys.readouterr().err)
    assert [line for line in lines if line.startswith("outer: 2/2 ")], lines
    assert len([line for line in lines if line.startswith("inner: 3/3 ")]) >= 2, lines  # a final line each


def test_terminal_gets_plain_tqdm(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress_bar(total=3, desc="t")
    assert type(bar) is tqdm
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()  # tqdm's redraws, as before
    monkeypatch.setenv("SPEECHSSL_PROGRESS", "lines")  # forced lines on a terminal
    bar = progress_bar(total=3, desc="t")
    assert isinstance(bar, LineProgress)
    bar.close()


def test_bad_interval_is_a_user_error(monkeypatch):
    monkeypatch.setenv("SPEECHSSL_PROGRESS_INTERVAL", "soon")
    with pytest.raises(UserError, match="SPEECHSSL_PROGRESS_INTERVAL"):
        progress_bar(total=1)


def test_no_direct_tqdm_in_the_library():
    """Every bar goes through progress_bar: a bare tqdm(...) writes carriage-return frames into logs."""
    offenders = []
    for path in [*(REPO / "speechssl").rglob("*.py"), *(REPO / "egs").rglob("*.py")]:
        if path.name == "progress.py":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from tqdm|import tqdm)", text, re.M):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_features_dump_log_has_no_carriage_returns(tmp_path):
    """A real verb with stderr to a pipe: its bar is a final line per shard."""
    from speechssl.audio import save_audio
    from speechssl.data.kaldi import DataDir, write_data_dir

    rng = np.random.default_rng(0)
    scp = {}
    for i in range(6):
        utt = f"spk{i % 2}-utt{i:02d}"
        path = tmp_path / f"{utt}.wav"
        save_audio(path, (0.1 * rng.standard_normal(8000 + 800 * i)).astype(np.float32))
        scp[utt] = str(path)
    write_data_dir(DataDir(wav_scp=scp, utt2spk={u: u.split("-")[0] for u in scp}), tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHSSL_PROGRESS")}
    env["OMP_NUM_THREADS"] = "1"  # the child's threads, as the in-process tests' (tests/conftest.py)
    out = subprocess.run([sys.executable, "-m", "speechssl", "features", "dump", "--data", str(tmp_path / "data"),
                          "--kind", "mfcc", "--nshard", "2", "--out", str(tmp_path / "mfcc")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = lines_of(out.stderr)
    bars = [line for line in lines if line.startswith("features shard")]
    assert [b.split(",")[0] for b in bars] == ["features shard 0/2: 3/3 utt (100%)",
                                               "features shard 1/2: 3/3 utt (100%)"], lines
