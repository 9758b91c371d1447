"""Does pretraining learn? The shipped mini_synth iteration-1 config, shrunk to a test budget, trained on a small
mini_synth corpus: its best layer must be more phonetic than an untrained model of the same config (same sample,
same k), and its dev masked accuracy must beat always predicting the most frequent unit.

Two losses: the shipped one (masked and unmasked frames, ``pred_nomask_weight=1``) and the paper's masked-only one,
the harder case: at this scale the unmasked loss alone keeps the fbank frontend informative even under the
feature penalty, while the masked-only loss collapses with it (issue 16). ``test_the_collapse_is_caught`` runs the
masked-only loss with ``model.feature_penalty_weight=10``, which the config refuses since that fix: every layer
falls below the untrained model, which is what the first test would report had the fix been reverted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import faiss
import pytest
import torch

from speechssl.cli import main as cli
from speechssl.config import load_config
from speechssl.train.trainer import PretrainConfig, pretrain
from speechssl.units.labels import read_labels
from speechssl.units.layers import evaluate_layers

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "egs" / "mini_synth" / "hubert"
K = 50
THREADS = 2  # torch and faiss, in the fixture's k-means and in every training and evaluation, whatever ran before
pytestmark = pytest.mark.threads(THREADS)  # the tests (tests/conftest.py); the module fixture pins its own, below


@contextlib.contextmanager
def pinned_threads(n: int = THREADS):
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


# The shipped config with only size and budget changed: what makes it learn or collapse (lr schedule shape, masking,
# loss weights, feature penalty, frontend) comes from the YAML.
SHRINK = [
    "model.num_hidden_layers=3", "model.hidden_size=128", "model.intermediate_size=512", "model.num_attention_heads=4",
    "model.final_dim=128", "model.conv_layers=[[128,3,2]]", f"model.num_classes=[{K}]",
    "data.max_duration=16.0", "data.crop_max=3.0", "data.num_workers=0", "data.num_buckets=4",
    "optim.max_steps=240", "optim.warmup_steps=30", "optim.bf16=false", "optim.max_minutes=null",
    "valid_every=240", "log_every=60", "ckpt.every_steps=240", "progress=false", "device=cpu", "seed=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~7 minutes of mini_synth speech (augmented, 40 voices), fbank k-means units at 100 Hz."""
    with pinned_threads():
        return _make_corpus(tmp_path_factory.mktemp("learning"))


def _make_corpus(top: Path) -> Path:
    data = top / "data"
    subprocess.run([sys.executable, str(RECIPE / "local" / "make_corpus.py"), "--out", str(data), "--hours", "0.12",
                    "--nj", "2", "--seed", "3"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    for s in ("train", "dev"):
        assert cli(["features", "dump", "--data", str(data / s), "--kind", "fbank", "--cmvn", "meanvar",
                    "--out", str(top / "fbank" / s)]) == 0
    assert cli(["kmeans", "fit", "--feats", str(top / "fbank" / "train"), "--k", str(K), "--sample-frac", "0.5",
                "--out", str(top / "km")]) == 0
    for s in ("train", "dev"):
        assert cli(["kmeans", "label", "--feats", str(top / "fbank" / s), "--km", str(top / "km"),
                    "--out", str(top / "labels" / s)]) == 0
    return top


def train(top: Path, name: str, *overrides: str) -> dict:
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (THREADS, THREADS)
    cfg = load_config(PretrainConfig, str(RECIPE / "conf" / "pretrain_iter1.yaml"), [
        f"exp_dir={top / name}", f"data.train={top / 'data' / 'train'}", f"data.dev={top / 'data' / 'dev'}",
        f"data.train_labels=[{top / 'labels' / 'train'}]", f"data.dev_labels=[{top / 'labels' / 'dev'}]",
        *SHRINK, *overrides])
    summary = pretrain(cfg)
    assert summary["step"] == 240
    best = top / name / "best"
    valid = json.loads((best / "config.json").read_text())["extra"]["valid"]
    layers = evaluate_layers(best, top / "data" / "train", top / "data" / "train" / "phones.ctm", k=K,
                             max_utts=120, seed=0, progress=False, report=lambda s: None)
    return {"valid": valid, "layers": layers}


def majority_rate(label_dir: Path) -> float:
    """Share of the most frequent unit among the frames the model predicts (every second 100 Hz label)."""
    counts: Counter = Counter()
    for units in read_labels(label_dir)[0].values():
        counts.update(units[::2].tolist())
    return max(counts.values()) / sum(counts.values())


# Best-layer PNMI over the untrained model's, measured (issue 29) with this corpus and config at training seeds
# 1, 2, 3 (seed 1 also at 1 thread: bit-identical to 2, and so are the k-means units at 1 and 2 threads):
#   shipped      1.137  1.154  1.152
#   masked_only  1.097  1.069  1.069
# and by models that learned nothing: untrained ones of seeds 1-5 score 0.957, 1.009, 0.998, 0.997, 1.003, the
# collapsed one of test_the_collapse_is_caught 0.902. Each bound sits near the middle of its gap, well above any of
# those and well below the trained values (the old 1.02 was 0.01 above an untrained model's 1.009). Dev masked
# accuracy over the majority rate: 3.18, 2.92/3.42 (masked_only/shipped, seed 2); the collapsed model 2.30.
MIN_RATIO = {"shipped": 1.07, "masked_only": 1.04}


@pytest.mark.parametrize("loss", ["shipped", "masked_only"])
def test_pretraining_beats_the_untrained_model(corpus, loss):
    run = train(corpus, loss, *(["model.pred_nomask_weight=0.0"] if loss == "masked_only" else []))
    layers = run["layers"]
    best = max(r["pnmi"] for r in layers["layers"])
    random_best = layers["random_init"]["best_pnmi"]
    assert best > MIN_RATIO[loss] * random_best, (best / random_best, best, random_best, layers["layers"])
    acc, majority = run["valid"]["acc_m_0"], majority_rate(corpus / "labels" / "dev")
    assert acc > 1.5 * majority, (acc, majority)


def test_the_collapse_is_caught(corpus, monkeypatch):
    """The same run with fairseq's feature penalty on the fbank frontend (refused by the config since issue 16;
    let through here as before the fix) collapses, and the assertions of the test above catch it."""
    from speechssl.models.config import HubertConfig

    check = HubertConfig.__post_init__

    def lenient(self):  # the pre-fix behaviour: no objection to the penalty with the fbank frontend
        weight, self.feature_penalty_weight = self.feature_penalty_weight, 0.0
        check(self)
        self.feature_penalty_weight = weight

    monkeypatch.setattr(HubertConfig, "__post_init__", lenient)
    run = train(corpus, "penalty", "model.pred_nomask_weight=0.0", "model.feature_penalty_weight=10.0")
    layers = run["layers"]
    best, random_best = max(r["pnmi"] for r in layers["layers"]), layers["random_init"]["best_pnmi"]
    assert best < random_best, (best / random_best, best, random_best)  # measured 0.902
