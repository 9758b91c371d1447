"""The collapse watch: RankMe and mean std, quiet on a healthy run, a warning naming the layer on a collapsed one."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from speechssl.config import ConfigError
from speechssl.train import CollapseWatch, Trainer, mean_std, pretrain, rankme
from speechssl.train.collapse import RANK_FLOOR
from speechssl.train import collapse as collapse_mod
from speechssl.train import state as st
from test_train import make_corpus, params_of, tiny_cfg

WARN = "collapse watch: layer"  # the start of the collapse warning


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _reference_rankme(x: torch.Tensor) -> float:
    """The paper's formula with a plain SVD, to check the Gram-matrix shortcut against."""
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def _collapse_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith(WARN)]


# ------------------------------------------------------------------------------------------------ measures
def test_rankme_of_known_matrices():
    g = torch.Generator().manual_seed(0)
    D = 32
    # isotropic: orthonormal columns give exactly D, Gaussian frames nearly D
    assert rankme(torch.eye(D)) == pytest.approx(D, rel=1e-5)
    iso = torch.randn(4096, D, generator=g)
    assert 0.97 * D < rankme(iso) <= D
    # rank 1 (every frame on one line, also the same vector everywhere) and rank k
    u, v = torch.randn(500, 1, generator=g), torch.randn(1, D, generator=g)
    assert rankme(u @ v) == pytest.approx(1.0, abs=1e-3)
    assert rankme(torch.ones(500, D) * 3.0) == pytest.approx(1.0, abs=1e-3)
    low = torch.randn(500, 4, generator=g) @ torch.randn(4, D, generator=g)
    assert 3.5 < rankme(low) <= 4.0 + 1e-6  # 4 Gaussian directions: close to, never above, rank 4 (3.909 here)
    # scale invariance, and the Gram shortcut (N > 2D, D > 2N) agrees with a plain SVD (N ~ D)
    for x in (iso, low, iso[:40], iso[:10], iso.T):
        assert rankme(x * 1e3) == pytest.approx(rankme(x), rel=1e-5)  # float32 rounding of x * 1e3
        assert rankme(x) == pytest.approx(_reference_rankme(x), rel=1e-6)
    # degenerate inputs
    assert rankme(torch.zeros(10, D)) == 1.0
    assert math.isnan(rankme(torch.full((10, D), float("nan"))))
    with pytest.raises(ValueError, match="frames, dim"):
        rankme(torch.zeros(3, 4, 5))


def test_mean_std():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 16, generator=g)
    assert mean_std(x) == pytest.approx(1.0, abs=0.02)
    assert mean_std(3.0 * x + 5.0) == pytest.approx(3.0 * mean_std(x), rel=1e-9)  # scale, not offset
    assert mean_std(torch.ones(50, 16) * 7.0) == 0.0
    assert mean_std(torch.tensor([[0.0, 1.0], [2.0, 1.0]])) == pytest.approx(0.5)  # population std: (1 + 0) / 2


# ------------------------------------------------------------------------------------------------ the sample
def test_sample_is_fixed_capped_and_moves_no_rng(tmp_path, corpus):
    data, labdir = corpus
    with pytest.raises(ConfigError, match="collapse_watch_frames"):
        tiny_cfg(tmp_path / "bad", data, labdir, "collapse_watch_frames=-1", dev=True)
    # off: no watch, no file, no stats
    trainer = Trainer(tiny_cfg(tmp_path / "off", data, labdir, "collapse_watch_frames=0", dev=True))
    assert trainer.collapse_watch is None
    assert not any(k.startswith("rank_L") for k in trainer.validate())
    trainer.close()
    assert not (tmp_path / "off" / "collapse_watch.json").exists()
    # no dev set: nothing to watch
    trainer = Trainer(tiny_cfg(tmp_path / "nodev", data, labdir))
    assert trainer.collapse_watch is None
    trainer.close()

    trainer = Trainer(tiny_cfg(tmp_path / "cap", data, labdir, "collapse_watch_frames=100", dev=True))
    watch = trainer.collapse_watch
    assert watch is not None and watch.num_frames == 100
    utts = watch.sample_definition()["utterances"]
    assert sum(n for _, n in utts) == 100 and len(utts) >= 2  # the last utterance is cut
    ref = json.loads((tmp_path / "cap" / "collapse_watch.json").read_text())
    assert ref["frames"] == 100 and ref["max_frames"] == 100 and ref["sample"]["utterances"] == utts
    # measuring: deterministic, no RNG consumed, the encoder's mode restored
    trainer.model.train()
    rng = st.get_rng_state()
    m1 = watch.measure(trainer.encoder)
    after = st.get_rng_state()
    assert torch.equal(rng["torch"], after["torch"]) and rng["python"] == after["python"]
    assert trainer.encoder.training
    trainer.model.eval()
    assert watch.measure(trainer.encoder) == m1 and not trainer.encoder.training
    trainer.model.train()
    # the same dev set gives the same sample: a second watch on the same loader measures the same frames
    again = CollapseWatch.from_batches(trainer.dev_loader, trainer.encoder.num_frames, max_frames=100)
    assert again.sample_definition()["utterances"] == utts and again.measure(trainer.encoder) == m1
    v1, v2 = trainer.validate(), trainer.validate()
    assert v1 == v2 and v1["rank_L0"] == m1[0]["rank"] and v1["std_L2"] == m1[2]["std"]
    trainer.close()


# ------------------------------------------------------------------------------------------------ training
def test_healthy_run_stays_quiet_and_records_update_0(tmp_path, corpus, caplog):
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path / "h", data, labdir, "optim.max_steps=20", "valid_every=10", dev=True)
    with caplog.at_level(logging.INFO):
        pretrain(cfg)
    assert not _collapse_warnings(caplog)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("collapse watch at update")]
    assert [ln.split(":")[0] for ln in lines] == ["collapse watch at update 10", "collapse watch at update 20"]
    assert all(f"L{i} rank=" in lines[0] for i in range(3))  # one entry per layer

    exp = tmp_path / "h"
    ref = json.loads((exp / "collapse_watch.json").read_text())
    assert ref["update"] == 0 and 0 < ref["frames"] <= 4096 and ref["max_frames"] == 4096
    assert [e["layer"] for e in ref["layers"]] == [0, 1, 2]  # num_hidden_layers + 1 hidden states
    hidden = cfg.model.hidden_size
    assert all(1.0 < e["rank"] <= hidden and e["std"] > 0 for e in ref["layers"])
    assert sum(n for _, n in ref["sample"]["utterances"]) == ref["frames"]
    # the reference travels with every checkpoint
    for step, ckpt in st.checkpoint_dirs(exp / "checkpoints"):
        assert json.loads((ckpt / "collapse_watch.json").read_text()) == ref, step
    # the values join the validation stats (rank 0) and TensorBoard
    best = json.loads((exp / "best" / "config.json").read_text())
    assert {"rank_L0", "std_L0", "rank_L2"} <= set(best["extra"]["valid"])
    assert best["extra"]["best_by"] == "acc" and best["extra"]["metric"] == best["extra"]["valid"]["acc_m_0"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(exp / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {f"collapse/{k}_L{i}" for k in ("rank", "std") for i in range(3)} <= tags
    assert [e.step for e in ea.Scalars("collapse/rank_L1")] == [10, 20]
    assert "collapse watch at update 20: L0 rank=" in (exp / "train.log").read_text()

    # watching changes nothing in training: the same run with the watch off ends with the same parameters
    pretrain(tiny_cfg(tmp_path / "off", data, labdir, "optim.max_steps=20", "valid_every=10",
                      "collapse_watch_frames=0", dev=True))
    on, off = params_of(exp / "checkpoints" / st.step_dir_name(20)), params_of(tmp_path / "off" / "checkpoints"
                                                                                / st.step_dir_name(20))
    assert all(torch.equal(on[k], off[k]) for k in on)


def _collapse_layers(trainer: Trainer) -> None:
    """Drive the model to collapse on purpose: every transformer layer maps all frames to one vector, as the
    collapsed runs of issue 16 did (effective rank ~1-2); the encoder input (L0) is left alone."""
    for layer in trainer.model.hubert.encoder.layers:
        layer.register_forward_hook(_constant)


def _constant(mod, args, out):
    # layers return (hidden states, position bias); only the hidden states collapse
    return (torch.ones_like(out[0]),) + tuple(out[1:])


def test_collapsed_run_fires_a_warning_naming_the_layer(tmp_path, corpus, caplog):
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path / "c", data, labdir, "optim.max_steps=6", "valid_every=3", "ckpt.every_steps=3", dev=True)
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg)  # update-0 reference measured here, on the healthy model
        healthy = trainer.validate()
        assert not _collapse_warnings(caplog)
        _collapse_layers(trainer)
        trainer.train()
        trainer.close()
    ref = {e["layer"]: e["rank"] for e in json.loads((tmp_path / "c" / "collapse_watch.json").read_text())["layers"]}
    assert healthy["rank_L0"] == pytest.approx(ref[0])
    warnings = _collapse_warnings(caplog)
    # at updates 3 and 6, every layer after L0: "collapse watch: layer 1 effective rank 1.0 fell below 0.1 of ..."
    collapsed = [i for i in ref if i > 0]
    assert len(warnings) == 2 * len(collapsed)
    named = {(r.args[0], r.args[4]) for r in warnings}
    assert named == {(i, step) for i in collapsed for step in (3, 6)}
    for r in warnings:
        layer, rank, floor, rank0 = r.args[:4]
        assert floor == RANK_FLOOR and rank < RANK_FLOOR * rank0 and rank0 == ref[layer]
        assert r.getMessage().startswith(f"collapse watch: layer {layer} effective rank ")
        assert f"fell below {RANK_FLOOR:g} of its update-0 value" in r.getMessage()
    assert "WARNING" in (tmp_path / "c" / "train.log").read_text()

    # only the last layer collapses: the warning names that layer and no other
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = Trainer(tiny_cfg(tmp_path / "c2", data, labdir, dev=True))
        trainer.model.hubert.encoder.layers[-1].register_forward_hook(_constant)
        stats = trainer.validate()
        trainer.close()
    last = cfg.model.num_hidden_layers
    assert [r.args[0] for r in _collapse_warnings(caplog)] == [last]
    assert stats[f"rank_L{last}"] < RANK_FLOOR * stats["rank_L0"]


def test_resume_reads_the_update_0_values_instead_of_measuring(tmp_path, corpus, caplog, monkeypatch):
    data, labdir = corpus
    exp = tmp_path / "r"
    pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=10", "valid_every=10", dev=True))
    ref_text = (exp / "collapse_watch.json").read_text()
    ref = {e["layer"]: {"rank": e["rank"], "std": e["std"]} for e in json.loads(ref_text)["layers"]}

    calls = []
    measure = CollapseWatch.measure

    def counting(self, encoder):
        calls.append(1)
        return measure(self, encoder)

    monkeypatch.setattr(collapse_mod.CollapseWatch, "measure", counting)
    cfg = tiny_cfg(exp, data, labdir, "optim.max_steps=20", "valid_every=10", dev=True)
    trainer = Trainer(cfg, resume="auto")
    assert trainer.step == 10 and not calls  # not re-measured at update 10
    assert trainer.collapse_watch.reference == ref  # exactly the first run's update-0 values
    now = trainer.collapse_watch.measure(trainer.encoder)
    assert now != ref  # (re-measuring would have given other numbers: the model trained)
    trainer.train()
    trainer.close()
    assert (exp / "collapse_watch.json").read_text() == ref_text
    ckpt20 = exp / "checkpoints" / st.step_dir_name(20)
    assert (ckpt20 / "collapse_watch.json").read_text() == ref_text

    # the exp dir's file lost: read from the checkpoint's copy and written back
    (exp / "collapse_watch.json").unlink()
    calls.clear()
    trainer = Trainer(cfg, resume="auto")
    assert not calls and trainer.collapse_watch.reference == ref
    trainer.close()
    assert json.loads((exp / "collapse_watch.json").read_text())["layers"] == json.loads(ref_text)["layers"]

    # no reference anywhere: a warning, values still logged, no collapse warning possible
    (exp / "collapse_watch.json").unlink()
    (ckpt20 / "collapse_watch.json").unlink()
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg, resume="auto")
        assert trainer.collapse_watch.reference is None
        _collapse_layers(trainer)
        stats = trainer.validate()
        trainer.close()
    assert "rank_L0" in stats and not _collapse_warnings(caplog)
    assert any("no update-0 reference" in r.getMessage() for r in caplog.records)
