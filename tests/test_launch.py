"""Launching at scale: the effective batch kept by optim.batch_seconds whatever the number of processes, and the
barrier that makes a sharded verb's torchrun launch return on every node at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from speechssl.config import ConfigError, load_config
from speechssl.train.config import PretrainConfig, split_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("world, cap, accum, per_process", [
    (32, 87.5, 1, 87.5),     # the paper's 32 GPUs
    (8, 87.5, 4, 87.5),      # one node of 8
    (1, 87.5, 32, 87.5),     # one GPU
    (12, 87.5, 3, 2800 / 36),  # no whole number of 87.5 s micro-batches: smaller ones, same update
    (64, 87.5, 1, 43.75),    # more GPUs than the paper: half-size micro-batches
])
def test_split_batch_keeps_the_papers_update(world, cap, accum, per_process):
    a, d = split_batch(2800.0, world, cap)
    assert (a, d) == (accum, pytest.approx(per_process))
    assert d <= cap + 1e-9 and world * a * d == pytest.approx(2800.0)


def test_batch_seconds_options_are_checked():
    cfg = load_config(PretrainConfig, ROOT / "egs/librispeech/hubert/conf/hubert_base_iter1.yaml", [])
    assert cfg.optim.batch_seconds == 2800 and cfg.optim.accum_grad == 1
    assert load_config(PretrainConfig, ROOT / "egs/librispeech/hubert/conf/hubert_large.yaml", []).optim.batch_seconds == 7200
    with pytest.raises(ConfigError, match="batch_seconds must be > 0"):
        load_config(PretrainConfig, None, ["optim.batch_seconds=0"])
    with pytest.raises(ConfigError, match="leave accum_grad at 1"):
        load_config(PretrainConfig, None, ["optim.batch_seconds=2800", "optim.accum_grad=4"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("barrier", [True, False])
def test_sharded_verbs_wait_for_every_rank_under_torchrun(tmp_path, barrier):
    """Rank 1 finishes its work late; after wait_for_all_ranks rank 0 sees it (and without the barrier it does not,
    which is what made a fast node's launch return before the slow node's shards were written)."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from speechssl.sharding import wait_for_all_ranks
        out = Path({str(tmp_path)!r})
        if os.environ["RANK"] == "1":
            time.sleep(3)
            (out / "rank1.done").write_text("x")
        if {barrier}:
            wait_for_all_ranks()
        if os.environ["RANK"] == "0":
            (out / "rank0.saw").write_text(str((out / "rank1.done").exists()))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "rank0.saw").read_text() == str(barrier)


def test_wait_for_all_ranks_is_a_no_op_outside_torchrun(monkeypatch):
    from speechssl.sharding import wait_for_all_ranks

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    wait_for_all_ranks()  # returns at once, no process group
    monkeypatch.setenv("WORLD_SIZE", "1")
    wait_for_all_ranks()
