"""The LibriSpeech HuBERT recipe (egs/librispeech/hubert/run.sh) on a fake LibriSpeech tree built here: the whole
chain with --tiny true (data prep through lhotse, MFCC units, iteration 1, iteration-2 units streamed from a
hidden layer with only the k-means sample dumped, iteration 2, the report); the launcher of recipes/hubert.sh (two
torchrun "nodes" on localhost against one process with the same effective batch); and a SIGTERM, as a preemption
sends it, followed by a re-run that resumes.

Runs in copies of the recipe so the repository stays clean.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fake_librispeech import DEFAULT_LAYOUT, make_fake_librispeech
from test_recipe import job_copy

ROOT = Path(__file__).resolve().parents[1]
TINY_STEPS = 8  # conf/tiny_iter*.yaml: optim.max_steps


def _env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                OMP_NUM_THREADS="1", SPEECHSSL_PROGRESS="0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _utts(part_layout: tuple[int, int, int]) -> int:
    spk, chap, utt = part_layout
    return spk * chap * utt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    top = tmp_path_factory.mktemp("librispeech")
    corpus = make_fake_librispeech(top / "corpus" / "LibriSpeech")
    job = job_copy(top, "egs/librispeech/hubert")
    # --ngpu 2: every parallel stage (features, the hidden-layer sample, labels, pretraining) through torchrun, two
    # processes on the CPU (gloo), as on a GPU node
    proc = subprocess.run(["bash", "run.sh", "--corpus", str(corpus), "--tiny", "true", "--ngpu", "2",
                           "--master-port", str(_free_port())], cwd=job, env=_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return job, proc


def test_data_prep_joins_the_parts_into_train_960_and_dev(tiny_run):
    job, _ = tiny_run
    data = job / "data_tiny"
    n_train = sum(_utts(DEFAULT_LAYOUT[p]) for p in ("train-clean-100", "train-clean-360", "train-other-500"))
    n_dev = sum(_utts(DEFAULT_LAYOUT[p]) for p in ("dev-clean", "dev-other"))
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = (data / split / "wav.scp").read_text().splitlines()
        assert len(lines) == n, split
        for name in ("text", "utt2spk", "spk2utt", "utt2dur", "recordings.jsonl.gz", "supervisions.jsonl.gz",
                     "cuts.jsonl.gz"):
            assert (data / split / name).is_file(), (split, name)
    assert not (data / "test").exists()  # --test-part '' skips the split
    # every train part is there (one utterance id of each part's first speaker)
    train_ids = {line.split()[0] for line in (data / "train" / "text").read_text().splitlines()}
    assert {u.split("-")[0] for u in train_ids} == {str(s) for s in range(101, 108)}


def test_chain_runs_through_iteration_2_and_the_report(tiny_run):
    job, proc = tiny_run
    exp, dump = job / "exp_tiny", job / "dump_tiny"
    for d in ["dump_tiny/mfcc/train", "dump_tiny/mfcc/dev", "exp_tiny/kmeans_mfcc_k20",
              "dump_tiny/labels_iter1_mfcc/train", "exp_tiny/hubert_iter1", "dump_tiny/labels_iter2/train",
              "dump_tiny/labels_iter2/dev", "exp_tiny/hubert_iter2"]:
        assert (job / d / ".done").is_file(), d
    # iteration 2 learns k=20 units of the middle layer (no alignments: ceil(2 / 2) = 1) at 50 Hz
    meta = json.loads((dump / "labels_iter2" / "train" / "meta.json").read_text())
    assert meta["label_rate"] == 50.0 and meta["k"] == 20 and meta["features"]["kind"] == "hubert_l1"
    cfg = json.loads((exp / "hubert_iter2" / "best" / "config.json").read_text())
    assert cfg["model"]["num_classes"] == [20]
    n_train = len((job / "data_tiny" / "train" / "wav.scp").read_text().splitlines())
    labelled = (dump / "labels_iter2" / "train" / "text.km").read_text().splitlines()
    assert len(labelled) == n_train
    # only the k-means sample of the hidden layer was dumped: about half the train utterances (--tiny: 0.5)
    hidden = sorted(p.name for p in dump.iterdir() if p.name.startswith("hidden_"))
    assert hidden == ["hidden_iter1_L1_sample"], hidden
    from speechssl.features.store import FeatureReader

    sample = FeatureReader(dump / "hidden_iter1_L1_sample" / "layer_1")
    assert 0 < len(sample) < n_train
    # the effective batch of conf/tiny_iter1.yaml (optim.batch_seconds=16) on two processes: 2 x 8 s x 1
    log1 = (exp / "hubert_iter1" / "train.log").read_text()
    assert "world 2 x max_duration 8 s x accum 1 = 16 s" in log1
    assert "torchrun: 1 node(s) x 2 process(es)" in proc.stdout
    # the report closes the recipe
    report = (exp / "report.md").read_text()
    assert "hubert_iter1" in report and "hubert_iter2" in report
    assert list((exp / "report").glob("*.png"))
    assert "report: " in proc.stdout


def _hubert_sh(job: Path, exp: str, *opts: str, stage: int = 6, train_opts: str = "") -> list[str]:
    """recipes/hubert.sh as run.sh --tiny true calls it, for one stage, into EXP (data and units shared)."""
    return ["bash", "../../../recipes/hubert.sh", "--stage", str(stage), "--stop-stage", str(stage),
            "--data", "data_tiny", "--train-set", "train", "--dev-set", "dev", "--dump", "dump_tiny", "--exp", exp,
            "--feats1", "mfcc", "--k1", "20", "--iter1-conf", "conf/tiny_iter1.yaml", "--iter1-opts", train_opts,
            "--alignments", "none", "--report", "false", *opts]


def _params(exp: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(exp / "hubert_iter1" / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_two_torchrun_nodes_equal_one_process_with_the_same_effective_batch(tiny_run):
    """Two 'nodes' on localhost (c10d rendezvous, gloo, one process each), each started as a user would start the
    recipe on a node (--nnodes 2 --node-rank R), against one process: optim.batch_seconds=16 gives 2 x 8 s x 1 and
    1 x 8 s x 2. One duration bucket, so the batch stream does not depend on the world size."""
    job, _ = tiny_run
    opts = "data.num_buckets=1 device=cpu"
    one = subprocess.run(_hubert_sh(job, "exp_one", train_opts=opts), cwd=job, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    port = str(_free_port())
    nodes = [subprocess.Popen(_hubert_sh(job, "exp_two", "--ngpu", "1", "--nnodes", "2", "--node-rank", str(r),
                                         "--master-addr", "127.0.0.1", "--master-port", port, train_opts=opts),
                              cwd=job, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (1, 0)]  # the second node starts first: it waits for the head at the rendezvous
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    log2 = (job / "exp_two" / "hubert_iter1" / "train.log").read_text()
    assert "world 2 x max_duration 8 s x accum 1 = 16 s" in log2
    assert "world 1 x max_duration 8 s x accum 2 = 16 s" in (job / "exp_one" / "hubert_iter1" / "train.log").read_text()
    assert (job / "exp_two" / "hubert_iter1" / ".done").is_file()
    p1, p2 = _params(job / "exp_one", TINY_STEPS), _params(job / "exp_two", TINY_STEPS)
    assert p1.keys() == p2.keys()
    diff = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    assert diff <= 1e-6, diff
    half = _params(job / "exp_one", TINY_STEPS // 2)  # the parameters moved far more than the tolerance meanwhile
    assert max(float((p1[k] - half[k]).abs().max()) for k in p1) > 1e-4  # 100x the tolerance


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll ``path`` until it contains ``text`` (a hang guard, not a timing assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        assert proc.poll() is None, f"the run ended before {text!r} appeared in {path}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_sigterm_stops_a_launched_run_and_a_rerun_resumes_it(tiny_run):
    """SIGTERM to the recipe (what SLURM sends a job step before preemption) reaches the torchrun-launched training
    processes, which save a checkpoint and stop; the stage stays unfinished; running the same command again resumes
    from that checkpoint and finishes."""
    job, _ = tiny_run
    steps = 40
    opts = f"optim.max_steps={steps} ckpt.every_steps=1000 log_every=1 valid_every=1000 device=cpu"
    cmd = _hubert_sh(job, "exp_sig", "--ngpu", "2", "--master-port", str(_free_port()), train_opts=opts)
    run = subprocess.Popen(cmd, cwd=job, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = job / "exp_sig" / "hubert_iter1" / "train.log"
    _wait_for(log, "update 3:", run)
    run.send_signal(signal.SIGTERM)
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 143, out[-3000:]
    assert "stopped by a signal" in out
    assert not (job / "exp_sig" / "hubert_iter1" / ".done").exists()
    text = log.read_text()
    assert "saving a checkpoint and stopping" in text
    saved = sorted((job / "exp_sig" / "hubert_iter1" / "checkpoints").glob("step-*"))
    assert saved, "no checkpoint after SIGTERM:\n" + out[-4000:]
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 3 <= stopped_at < steps
    assert f"valid at update {stopped_at} " not in text  # saved at once: no validation in the grace period
    again = subprocess.run(cmd[:], cwd=job, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    text = log.read_text()
    assert f"at update {stopped_at} (epoch" in text  # "resumed from ... at update N (epoch E, batch B)"
    assert (job / "exp_sig" / "hubert_iter1" / ".done").is_file()
    assert (job / "exp_sig" / "hubert_iter1" / "checkpoints" / f"step-{steps:08d}").is_dir()
