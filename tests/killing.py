"""Kill -9 a CLI run mid-way: for the resume tests of every trainer (pretraining, fine-tuning, SUPERB heads)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    """``python -m speechssl ARGS`` with one thread (the same numerics as the other runs of a test)."""
    return subprocess.run([sys.executable, "-m", "speechssl", *args], env=_env(), capture_output=True, text=True, **kw)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def kill_when(args: list[str], root: Path, pattern: str, *, timeout: float = 600) -> None:
    """Start ``speechssl ARGS`` and SIGKILL it as soon as a path matching ``root.glob(pattern)`` exists (e.g. the
    first checkpoint's ``COMPLETE``). Fails when the run ends first: the kill must land mid-run."""
    proc = subprocess.Popen([sys.executable, "-m", "speechssl", *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout  # a hang guard, not a speed check
        while not any(root.glob(pattern)):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before {root}/{pattern} appeared: "
                            f"{proc.stderr.read()[-2000:]}")
            if time.time() > deadline:
                pytest.fail(f"no {root}/{pattern} in {timeout:.0f} s: hung")
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
