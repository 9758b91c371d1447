"""One tiny end-to-end run of the mini_synth HuBERT recipe: corpus -> fbank (CMVN) -> k-means -> labels -> quality ->
iteration 1 -> per-layer units -> iteration-2 labels from the best layer -> iteration 2 -> per-layer units;
then the same corpus without alignments (stages 5, 7, 10 skipped, iteration-2 units from the middle layer).

Runs in copies of the recipe so the repository stays clean; two training updates per iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


TRAIN_OPTS = "optim.max_steps=2 data.num_buckets=2 valid_every=2 log_every=1 progress=false"


def job_copy(top: Path, job_dir: str = "egs/mini_synth/hubert") -> Path:
    """A copy of a recipe job (and recipes/, tools/) under ``top``, without its data, dump and exp dirs."""
    shutil.copytree(ROOT / "recipes", top / "recipes")
    shutil.copytree(ROOT / "tools", top / "tools", ignore=shutil.ignore_patterns("bench"))
    job = top / job_dir
    shutil.copytree(ROOT / job_dir, job, ignore=shutil.ignore_patterns("data*", "dump*", "exp*", "__pycache__"))
    return job


def _run_recipe(job: Path, *opts: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", "run.sh", "--tiny", "true", "--iter1-opts", TRAIN_OPTS, "--iter2-opts", TRAIN_OPTS, *opts],
        cwd=job, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    job = job_copy(tmp_path_factory.mktemp("recipe"))
    return job, _run_recipe(job)


@pytest.fixture(scope="module")
def recipe_run_no_alignments(tmp_path_factory, recipe_run):
    """Stages 1-10 on a copy of the same generated corpus with the alignments switched off."""
    job = job_copy(tmp_path_factory.mktemp("recipe_noali"))
    shutil.copytree(recipe_run[0] / "data_tiny", job / "data_tiny")
    return job, _run_recipe(job, "--alignments", "none")


def test_every_stage_left_its_output(recipe_run):
    job, _ = recipe_run
    for d in ["dump_tiny/fbank_cmvn-meanvar/train", "dump_tiny/fbank_cmvn-meanvar/dev", "exp_tiny/kmeans_fbank_cmvn-meanvar_k100",
              "dump_tiny/mfcc/train", "dump_tiny/mfcc/dev", "exp_tiny/kmeans_mfcc_k100",
              "dump_tiny/labels_iter1_fbank_cmvn-meanvar/train", "dump_tiny/labels_iter1_mfcc/dev", "exp_tiny/hubert_iter1", "exp_tiny/hubert_iter1/layers",
              "dump_tiny/labels_iter2/train", "exp_tiny/hubert_iter2", "exp_tiny/hubert_iter2/layers"]:
        assert (job / d / ".done").is_file(), d
    for km in ("kmeans_fbank_cmvn-meanvar_k100", "kmeans_mfcc_k100"):  # one quality report per target set
        quality = json.loads((job / "exp_tiny" / km / "quality.json").read_text())
        assert 0.0 < quality["pnmi"] < 1.0
    # iteration 1 learns both target sets (the cluster ensemble); iteration 2 the one hidden-layer set
    cfg1 = json.loads((job / "exp_tiny/hubert_iter1/best/config.json").read_text())
    assert cfg1["model"]["num_classes"] == [100, 100]
    assert [lab["features"]["kind"] for lab in cfg1["extra"]["labels"]] == ["fbank", "mfcc"]
    layers = json.loads((job / "exp_tiny/hubert_iter1/layers/layers.json").read_text())
    assert layers["best_layer"] == max(layers["layers"], key=lambda r: r["pnmi"])["layer"]
    # iteration-2 labels come from the best layer at the model's 50 Hz frame rate
    meta = json.loads((job / "dump_tiny/labels_iter2/train/meta.json").read_text())
    assert meta["label_rate"] == 50.0
    assert meta["features"]["kind"] == f"hubert_l{layers['best_layer']}"
    cfg = json.loads((job / "exp_tiny/hubert_iter2/best/config.json").read_text())
    assert cfg["model"]["num_classes"] == [100]


def test_only_the_kmeans_sample_is_dumped_and_every_set_labelled_once(recipe_run):
    job, proc = recipe_run
    # the hidden layer is written for the k-means sample of train only (--hidden-sample-frac 0.5 for --tiny) ...
    assert proc.stdout.count("of iteration 1 for a 0.5 sample of train -> dump_tiny/hidden_iter1_L") == 1, proc.stdout
    hidden = [p.name for p in (job / "dump_tiny").iterdir() if p.name.startswith("hidden_")]
    assert len(hidden) == 1 and hidden[0].endswith("_sample"), hidden
    n_train = len((job / "data_tiny/train/wav.scp").read_text().splitlines())
    from speechssl.features.store import FeatureReader

    layer = json.loads((job / "dump_tiny/labels_iter2/train/meta.json").read_text())["features"]["kind"][len("hubert_l"):]
    assert 0 < len(FeatureReader(job / "dump_tiny" / hidden[0] / f"layer_{layer}")) < n_train
    # ... and every utterance of train and dev is labelled by one streaming pass each
    for s in ("train", "dev"):
        assert proc.stdout.count(f"streamed) for {s} -> dump_tiny/labels_iter2/{s}") == 1, proc.stdout
    assert len((job / "dump_tiny/labels_iter2/train/text.km").read_text().splitlines()) == n_train
    assert "units best-layer: layer" in proc.stderr and "best PNMI" in proc.stderr


def test_recipe_runs_without_alignments(recipe_run_no_alignments):
    job, proc = recipe_run_no_alignments
    assert "stage 0" not in proc.stdout  # the corpus was reused
    for d in ["dump_tiny/fbank_cmvn-meanvar/train", "exp_tiny/kmeans_fbank_cmvn-meanvar_k100", "dump_tiny/labels_iter1_mfcc/dev",
              "exp_tiny/hubert_iter1", "dump_tiny/labels_iter2/train", "dump_tiny/labels_iter2/dev",
              "exp_tiny/hubert_iter2"]:
        assert (job / d / ".done").is_file(), d
    # no label-quality reports without alignments: stages 5, 7 and 10 skipped, saying so
    assert not (job / "exp_tiny/kmeans_fbank_cmvn-meanvar_k100/quality.json").exists()
    assert not (job / "exp_tiny/hubert_iter1/layers").exists() and not (job / "exp_tiny/hubert_iter2/layers").exists()
    for st in (5, 7, 10):
        assert f"stage {st}: no alignments" in proc.stdout
    # iteration-2 units from the fallback: the middle transformer layer of the iteration-1 model
    depth = json.loads((job / "exp_tiny/hubert_iter1/best/config.json").read_text())["model"]["num_hidden_layers"]
    layer = (depth + 1) // 2
    assert "paper-depth rule" in proc.stderr and "Traceback" not in proc.stderr
    for s in ("train", "dev"):
        meta = json.loads((job / f"dump_tiny/labels_iter2/{s}/meta.json").read_text())
        assert meta["features"]["kind"] == f"hubert_l{layer}" and meta["label_rate"] == 50.0
    assert (job / f"exp_tiny/kmeans_iter1_L{layer}_k100/.done").is_file()
    assert (job / "exp_tiny/hubert_iter2/best/config.json").is_file()


def test_rerun_skips_finished_stages(recipe_run):
    job, _ = recipe_run
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "run.sh", "--tiny", "true", "--stage", "2", "--stop-stage", "6"], cwd=job,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage 2: fbank" not in proc.stdout and "stage 6: HuBERT" not in proc.stdout


def _superb_copy(top: Path) -> Path:
    job = top / "egs" / "mini_synth" / "superb"
    shutil.copytree(ROOT / "egs" / "mini_synth" / "superb", job, ignore=shutil.ignore_patterns("exp*"))
    return job


def test_superb_recipe_runs_four_upstreams_in_two_lanes(recipe_run):
    """egs/mini_synth/superb on the tiny recipe's checkpoints: fbank, random init, iterations 1 and 2 in two lanes,
    every results.json and one table (PR and ASV: frame-level and the test_spk trials); a lane that fails makes the stage fail."""
    hubert, _ = recipe_run
    job = _superb_copy(hubert.parents[2])  # beside the hubert job, so ../../../tools resolves
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    common = ["--hubert", str(hubert), "--data", str(hubert / "data_tiny"),
              "--ckpt1", str(hubert / "exp_tiny/hubert_iter1/best"), "--ckpt2", str(hubert / "exp_tiny/hubert_iter2/best"),
              "--train-every", "1", "--nj", "2",
              "--superb-opts", "--max-steps 2 --no-progress optim.eval_every=2 optim.save_every=2"]
    proc = subprocess.run(["bash", "run.sh", *common, "--tasks", "pr asv"], cwd=job, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 lanes x " in proc.stdout
    names = ["fbank", "random_hubert_iter1", "hubert_iter1", "hubert_iter2"]
    for name in names:
        for task in ("pr", "asv"):
            res = json.loads((job / "exp" / name / task / "results.json").read_text())
            assert res["task"] == task and res["test"], (name, task)
    rows = [ln for ln in (job / "exp/table.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["fbank", "random:hubert_iter1", "hubert_iter1", "hubert_iter2"]

    # one lane fails (a checkpoint that does not exist), the other finishes its upstream: the stage exits non-zero
    proc = subprocess.run(["bash", "run.sh", *common, "--stop-stage", "1", "--exp", "exp_fail", "--tasks", "sid",
                           "--upstreams", f"fbank {hubert}/exp_tiny/nowhere/best"],
                          cwd=job, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "stage 1 failed" in proc.stdout
    assert (job / "exp_fail/fbank/sid/results.json").is_file()
