"""One tiny end-to-end run of the mini_synth HuBERT recipe: corpus -> fbank (CMVN) -> k-means -> labels -> quality ->
iteration 1 -> per-layer units -> iteration-2 labels from the best layer -> iteration 2 -> per-layer units.

Runs in a copy of the recipe so the repository stays clean; two training updates per iteration.
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


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    top = tmp_path_factory.mktemp("recipe")
    shutil.copytree(ROOT / "recipes", top / "recipes")
    shutil.copytree(ROOT / "tools", top / "tools", ignore=shutil.ignore_patterns("bench"))
    job = top / "egs" / "mini_synth" / "hubert"
    shutil.copytree(ROOT / "egs" / "mini_synth" / "hubert", job,
                    ignore=shutil.ignore_patterns("data*", "dump*", "exp*", "__pycache__"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    train_opts = "optim.max_steps=2 data.num_buckets=2 valid_every=2 log_every=1 progress=false"
    proc = subprocess.run(
        ["bash", "run.sh", "--tiny", "true", "--iter1-opts", train_opts, "--iter2-opts", train_opts],
        cwd=job, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return job, proc


def test_every_stage_left_its_output(recipe_run):
    job, _ = recipe_run
    for d in ["dump_tiny/fbank_cmvn-meanvar/train", "dump_tiny/fbank_cmvn-meanvar/dev", "exp_tiny/kmeans_fbank_cmvn-meanvar_k100",
              "dump_tiny/labels_iter1/train", "exp_tiny/hubert_iter1", "exp_tiny/hubert_iter1/layers",
              "dump_tiny/labels_iter2/train", "exp_tiny/hubert_iter2", "exp_tiny/hubert_iter2/layers"]:
        assert (job / d / ".done").is_file(), d
    quality = json.loads((job / "exp_tiny/kmeans_fbank_cmvn-meanvar_k100/quality.json").read_text())
    assert 0.0 < quality["pnmi"] < 1.0
    layers = json.loads((job / "exp_tiny/hubert_iter1/layers/layers.json").read_text())
    assert layers["best_layer"] == max(layers["layers"], key=lambda r: r["pnmi"])["layer"]
    # iteration-2 labels come from the best layer at the model's 50 Hz frame rate
    meta = json.loads((job / "dump_tiny/labels_iter2/train/meta.json").read_text())
    assert meta["label_rate"] == 50.0
    assert meta["features"]["kind"] == f"hubert_l{layers['best_layer']}"
    cfg = json.loads((job / "exp_tiny/hubert_iter2/best/config.json").read_text())
    assert cfg["model"]["num_classes"] == [100]


def test_rerun_skips_finished_stages(recipe_run):
    job, _ = recipe_run
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "run.sh", "--tiny", "true", "--stage", "2", "--stop-stage", "6"], cwd=job,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage 2: fbank" not in proc.stdout and "stage 6: HuBERT" not in proc.stdout
