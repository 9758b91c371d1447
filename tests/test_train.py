"""The HuBERT pretraining trainer: exact resume, DDP equivalence, label alignment, budgets, bad steps."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechssl.audio import save_audio
from speechssl.config import ConfigError, load_config
from speechssl.errors import UserError
from speechssl.models.config import hubert_tiny
from speechssl.models.hubert import HubertPretrainModel
from speechssl.train import state as st
from speechssl.train.data import PretrainDataset, load_label_sets
from speechssl.train.schedule import lr_at
from speechssl.train.trainer import PretrainConfig, Trainer, TrainingAborted, pretrain
from speechssl.units.labels import LabelError, write_labels

SR = 16000
K = 8
MFCC_FRAMING = {"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": True}


def n_labels(num_samples: int) -> int:
    return 1 + (num_samples - 400) // 160


def make_corpus(root: Path, n_utts: int = 12, *, seed: int = 0, durations=None, ramp: bool = False) -> tuple[Path, Path]:
    """A Kaldi data dir with lhotse manifests and a 100 Hz label dir (label j = j mod K: position-coded)."""
    from speechssl.data.lhotse_io import data_dir_to_lhotse

    rng = np.random.default_rng(seed)
    data, wavdir, labdir = root / "data", root / "wav", root / "labels"
    data.mkdir(parents=True)
    wavdir.mkdir()
    wav_scp, utt2spk, labels = [], [], {}
    for i in range(n_utts):
        utt = f"spk{i % 3}-utt{i:03d}"
        dur = durations[i] if durations is not None else float(rng.uniform(1.2, 2.6))
        n = int(dur * SR)
        if ramp:
            assert n < 32768
            wav = ((np.arange(n) - 16000) / 32768.0).astype(np.float32)  # exact in 16-bit PCM: index readable back
        else:
            t = np.arange(n) / SR
            wav = (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(n))
            wav = wav.astype(np.float32)
        path = wavdir / f"{utt}.wav"
        save_audio(path, wav)
        wav_scp.append(f"{utt} {path}")
        utt2spk.append(f"{utt} spk{i % 3}")
        labels[utt] = np.arange(n_labels(n)) % K
    (data / "wav.scp").write_text("\n".join(sorted(wav_scp)) + "\n")
    (data / "utt2spk").write_text("\n".join(sorted(utt2spk)) + "\n")
    spk2utt = {}
    for line in sorted(utt2spk):
        u, s = line.split()
        spk2utt.setdefault(s, []).append(u)
    (data / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))
    data_dir_to_lhotse(data, data, progress=False)
    write_labels(labdir, labels, {"label_rate": 100.0, "k": K, "framing": MFCC_FRAMING})
    return data, labdir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_cfg(exp: Path, data: Path, labels: Path, *overrides: str, dev: bool = False) -> PretrainConfig:
    model = dict(
        conv_layers=[[32, 3, 2]], hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, final_dim=16, num_classes=[K], num_mel_bins=40,
        mask_length=4,
    )
    base = [
        f"exp_dir={exp}", f"data.train={data}", f"data.train_labels=[{labels}]",
        "data.max_duration=4.0", "data.crop_min=1.0", "data.crop_max=1.5", "data.num_buckets=2",
        "data.num_workers=0", "optim.lr=1e-3", "optim.warmup_steps=5", "optim.max_steps=20",
        "optim.bf16=false", "ckpt.every_steps=10", "ckpt.keep_last=5", "log_every=5", "valid_every=10",
        "progress=false", "device=cpu", "seed=3",
    ]
    if dev:
        base += [f"data.dev={data}", f"data.dev_labels=[{labels}]"]
    # the model section starts from the CPU-sized builder, shrunk further for tests
    tiny = json.dumps(hubert_tiny(**model).to_dict())
    return load_config(PretrainConfig, None, [f"model={tiny}"] + base + list(overrides))


def params_of(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ schedule / state
def test_lr_schedule_values():
    kw = dict(peak_lr=1.0, warmup_steps=4, max_steps=12)
    assert [lr_at(u, **kw) for u in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(8, **kw) == pytest.approx(0.5)  # halfway through the decay
    assert lr_at(11, **kw) == pytest.approx(0.125)
    assert lr_at(12, **kw) == 0.0 and lr_at(50, **kw) == 0.0
    assert lr_at(8, peak_lr=1.0, warmup_steps=4, max_steps=12, power=2.0) == pytest.approx(0.25)
    assert lr_at(1, peak_lr=2.0, warmup_steps=0, max_steps=10, end_lr=0.5) == pytest.approx(0.5 + 1.5 * 0.9)
    with pytest.raises(ValueError):
        lr_at(0, **kw)


def test_state_bundle_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    obj = {"optimizer": opt.state_dict(), "rng": st.get_rng_state(), "best": float("nan"), "inf": float("-inf"),
           "t": (1, "a"), "none": None, "__weird__": 1, "ints": {3: "x"}}
    st.save_bundle(tmp_path, "s", obj)
    text = (tmp_path / "s.json").read_text()
    json.loads(text)  # plain JSON
    back = st.load_bundle(tmp_path, "s")
    assert math.isnan(back["best"]) and back["inf"] == float("-inf")
    assert back["t"] == (1, "a") and back["ints"] == {3: "x"} and back["__weird__"] == 1
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(back["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["betas"] == (0.9, 0.98)
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    # RNG states restore exactly
    st.set_rng_state(back["rng"])
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    st.set_rng_state(back["rng"])
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(TypeError, match="without pickle"):
        st.save_bundle(tmp_path, "bad", {"x": object()})


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    for step, done in ((10, True), (20, True), (30, False)):
        d = tmp_path / st.step_dir_name(step)
        d.mkdir()
        if done:
            st.mark_complete(d, {"step": step})
    assert st.find_latest_checkpoint(tmp_path).name == st.step_dir_name(20)
    st.prune_checkpoints(tmp_path, keep_last=1)
    assert [s for s, _ in st.checkpoint_dirs(tmp_path)] == [20]


# ------------------------------------------------------------------------------------------------ data
def test_crops_are_on_the_frame_grid_with_aligned_labels(tmp_path):
    data, labdir = make_corpus(tmp_path, n_utts=3, durations=[1.0, 1.95, 1.6], ramp=True)
    model = HubertPretrainModel(hubert_tiny(conv_layers=[(32, 3, 2)], hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64, num_conv_pos_embeddings=8,
                                            num_conv_pos_embedding_groups=4, num_classes=[K], num_mel_bins=40))
    from lhotse import CutSet

    cuts = CutSet.from_file(data / "cuts.jsonl.gz")
    ds = PretrainDataset(load_label_sets([labdir]), frame_rate=50.0, downsample_rate=320,
                         num_frames=lambda n: int(model.hubert.num_frames(torch.tensor([n]))[0]),
                         crop_max=1.5, seed=7)
    offsets = set()
    for epoch in range(4):
        b = ds[(epoch, 0, cuts)]
        # crop to the shortest utterance (1.0 s), a whole number of frames
        assert b["wavs"].shape == (3, 16000) and b["wav_lens"].tolist() == [16000] * 3
        T = int(model.hubert.num_frames(torch.tensor([16000]))[0])
        assert b["labels"][0].shape == (3, T)
        for i in range(3):
            # the ramp tells which sample the crop starts at
            start = int(round(float(b["wavs"][i, 0]) * 32768)) + 16000
            assert start % 320 == 0
            offsets.add((b["ids"][i], start))
            f0 = start // 320
            expected = (2 * (f0 + np.arange(T))) % K  # 100 Hz labels, every second one, from frame f0
            assert b["labels"][0][i].tolist() == expected.tolist()
    assert len({o for o in offsets if o[1] > 0}) > 1  # crops do move between epochs
    # crop offsets depend on (seed, epoch, utt) only: the same item twice gives the same batch
    assert torch.equal(ds[(2, 0, cuts)]["wavs"], ds[(2, 0, cuts)]["wavs"])


def test_label_length_mismatch_names_the_utterance(tmp_path):
    data, labdir = make_corpus(tmp_path, n_utts=4)
    labels = {}
    for line in (labdir / "text.km").read_text().splitlines():
        u, *units = line.split()
        labels[u] = [int(x) for x in units]
    bad = sorted(labels)[2]
    labels[bad] = labels[bad][: len(labels[bad]) // 2]
    write_labels(labdir, labels, {"label_rate": 100.0, "k": K, "framing": MFCC_FRAMING})
    cfg = tiny_cfg(tmp_path / "exp", data, labdir)
    with pytest.raises(LabelError, match=rf"utt {bad}: \d+ labels"):
        Trainer(cfg)
    # 100 Hz labels cannot be strided onto a 30 Hz model
    with pytest.raises(LabelError, match="not a whole multiple"):
        PretrainDataset(load_label_sets([labdir]), frame_rate=30.0, downsample_rate=533, num_frames=len,
                        crop_max=1.0, seed=0)


# ------------------------------------------------------------------------------------------------ training
def test_exact_resume_is_bit_identical(tmp_path, corpus):
    data, labdir = corpus
    # straight: 20 updates, checkpoints at 10 and 20 (epochs are ~5 batches: several epoch boundaries)
    a = pretrain(tiny_cfg(tmp_path / "a", data, labdir, "data.num_workers=1"))
    assert a["step"] == 20 and a["stop_reason"] == "max_steps"
    # resumed: a fresh process-state starting from the step-10 checkpoint of an identical run
    b_exp = tmp_path / "b"
    (b_exp / "checkpoints").mkdir(parents=True)
    src = tmp_path / "a" / "checkpoints" / st.step_dir_name(10)
    shutil.copytree(src, b_exp / "checkpoints" / src.name)
    torch.manual_seed(12345)  # disturb the global RNGs: resume must restore / re-derive them
    np.random.seed(999)
    ts = st.load_bundle(src, "train_state")
    assert ts["step"] == 10 and ts["sampler"]["epoch"] >= 1  # the first half crossed an epoch boundary
    b = pretrain(tiny_cfg(b_exp, data, labdir), resume="auto")
    assert b["step"] == 20
    pa = params_of(tmp_path / "a" / "checkpoints" / st.step_dir_name(20))
    pb = params_of(b_exp / "checkpoints" / st.step_dir_name(20))
    assert pa.keys() == pb.keys()
    changed = [k for k in pa if not torch.equal(pa[k], params_of(src)[k])]
    assert changed, "the second half did not train"
    diff = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not diff, f"parameters differ after resume: {diff[:5]}"
    sa = st.load_bundle(tmp_path / "a" / "checkpoints" / st.step_dir_name(20), "train_state")
    sb = st.load_bundle(b_exp / "checkpoints" / st.step_dir_name(20), "train_state")
    assert sa["sampler"] == sb["sampler"]
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    # the model with dropout really is stochastic: another seed gives other parameters
    assert tiny_cfg(b_exp, data, labdir).model.hidden_dropout > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_accumulation(tmp_path, corpus):
    data, labdir = corpus
    # one bucket: the batch stream is the same whatever the world size; rank r of 2 takes batches r, r+2, ...
    common = ["data.num_buckets=1", "optim.max_steps=4", "ckpt.every_steps=4", "valid_every=100"]
    one = tiny_cfg(tmp_path / "one", data, labdir, *common, "optim.accum_grad=2")
    pretrain(one)
    two = tiny_cfg(tmp_path / "two", data, labdir, *common, "optim.accum_grad=1")
    conf = tmp_path / "two.yaml"
    from speechssl.config import to_yaml

    conf.write_text(to_yaml(two))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "speechssl", "pretrain", "--config", str(conf)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "effective batch: world 2 x max_duration 4 s x accum 1 = 8 s" in out.stderr
    p1 = params_of(tmp_path / "one" / "checkpoints" / st.step_dir_name(4))
    p2 = params_of(tmp_path / "two" / "checkpoints" / st.step_dir_name(4))
    init = HubertPretrainModel(one.model)  # parameters moved far more than the tolerance
    moved = max(float((p1[k] - v).abs().max()) for k, v in init.state_dict().items() if k in p1)
    assert moved > 1e-3
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    ts = st.load_bundle(tmp_path / "two" / "checkpoints" / st.step_dir_name(4), "train_state")
    assert ts["world_size"] == 2 and len(st.load_bundle(tmp_path / "two" / "checkpoints" / st.step_dir_name(4), "rng")["ranks"]) == 2


class _NaNAt(HubertPretrainModel):
    """The tiny model, with a non-finite loss on chosen forward calls."""

    def __init__(self, config, bad_calls):
        super().__init__(config)
        self.calls = 0
        self.bad_calls = set(bad_calls)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.calls += 1
        if self.training and self.calls in self.bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_steps_are_skipped_counted_and_abort(tmp_path, corpus):
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path / "e1", data, labdir, "optim.max_steps=6", "ckpt.every_steps=100", "optim.max_bad_steps=3")
    trainer = Trainer(cfg, model=_NaNAt(cfg.model, bad_calls={2, 4}))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.train()
    trainer.close()
    assert summary["step"] == 6 and summary["bad_steps"] == 2  # 8 forward calls for 6 updates
    assert trainer.model.calls == 8
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ts = st.load_bundle(tmp_path / "e1" / "checkpoints" / st.step_dir_name(6), "train_state")
    assert ts["bad_steps"] == 2

    cfg = tiny_cfg(tmp_path / "e2", data, labdir, "optim.max_steps=10", "optim.max_bad_steps=2")
    trainer = Trainer(cfg, model=_NaNAt(cfg.model, bad_calls={1, 2, 3, 4}))
    with pytest.raises(TrainingAborted, match=r"3 non-finite steps \(optim.max_bad_steps=2\)"):
        trainer.train()
    trainer.close()
    assert trainer.step == 0


def test_max_minutes_stops_before_max_steps(tmp_path, corpus):
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path / "t", data, labdir, "optim.max_steps=1000", "optim.max_minutes=1e-6",
                   "ckpt.every_steps=500", dev=True)
    summary = pretrain(cfg)
    assert summary["stop_reason"] == "max_minutes"
    assert 0 < summary["step"] < 1000  # stopped by the budget after at least one update
    # the stop saves a checkpoint and the validated best model
    latest = st.find_latest_checkpoint(tmp_path / "t" / "checkpoints")
    assert latest is not None and latest.name == st.step_dir_name(summary["step"])
    best = json.loads((tmp_path / "t" / "best" / "config.json").read_text())
    assert best["extra"]["step"] == summary["step"] and "acc_m_0" in best["extra"]["valid"]
    # a resume with the budget spent stops again at once, without training
    again = pretrain(cfg, resume="auto")
    assert again["step"] == summary["step"]


def test_validation_best_and_tensorboard(tmp_path, corpus):
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path / "v", data, labdir, "optim.max_steps=6", "valid_every=3", "ckpt.every_steps=3",
                   "ckpt.keep_last=1", dev=True)
    trainer = Trainer(cfg)
    v1 = trainer.validate()
    v2 = trainer.validate()
    assert v1 == v2  # fixed masks: validation numbers are comparable across steps
    assert {"loss", "acc_m_0", "acc_u_0", "mask_frac"} <= set(v1)
    trainer.train()
    trainer.close()
    ckpts = st.checkpoint_dirs(tmp_path / "v" / "checkpoints")
    assert [s for s, _ in ckpts] == [6]  # keep_last=1
    best = json.loads((tmp_path / "v" / "best" / "config.json").read_text())
    assert best["extra"]["step"] in (3, 6) and best["extra"]["best_by"] == "acc"
    assert list((tmp_path / "v" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "v" / "config.yaml").is_file() and "update 6" in (tmp_path / "v" / "train.log").read_text()


@pytest.mark.parametrize("prev_k", [K, K + 5])
def test_init_from_copies_the_encoder_not_the_head(tmp_path, corpus, prev_k):
    data, labdir = corpus
    from speechssl.models.checkpoint import save_model

    cfg_k = tiny_cfg(tmp_path / "x", data, labdir).model
    torch.manual_seed(123)
    other = HubertPretrainModel(type(cfg_k).from_dict({**cfg_k.to_dict(), "num_classes": [prev_k]}))
    save_model(other, other.config, tmp_path / "prev")
    cfg = tiny_cfg(tmp_path / "i", data, labdir, f"ckpt.init_from={tmp_path / 'prev'}")
    trainer = Trainer(cfg)
    sd = trainer.model.state_dict()
    for k, v in other.state_dict().items():
        if k.startswith("hubert."):
            assert torch.equal(sd[k], v), k
        elif sd[k].shape == v.shape:  # the head is the new run's own initialisation, not the previous iteration's
            assert not torch.equal(sd[k], v), k
    assert sd["label_embeddings"].shape[0] == K
    trainer.close()

    bad = tmp_path / "bad"
    small = HubertPretrainModel(type(cfg_k).from_dict({**cfg_k.to_dict(), "num_hidden_layers": 1}))
    save_model(small, small.config, bad)
    with pytest.raises(ValueError, match="model.num_hidden_layers 2 vs checkpoint 1"):
        Trainer(tiny_cfg(tmp_path / "j", data, labdir, f"ckpt.init_from={bad}"))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_print_config_and_override_errors(tmp_path, capsys):
    from speechssl.cli import main

    conf = tmp_path / "c.yaml"
    conf.write_text("optim:\n  lr: 0.002\ndata:\n  max_duration: 30\n")
    assert main(["pretrain", "--config", str(conf), "--print-config", "optim.accum_grad=4",
                 "model.num_hidden_layers=3"]) == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    assert merged["optim"]["lr"] == 0.002 and merged["optim"]["accum_grad"] == 4
    assert merged["data"]["max_duration"] == 30.0 and merged["model"]["num_hidden_layers"] == 3
    assert load_config(PretrainConfig, None, []).optim.betas == (0.9, 0.98)

    assert main(["pretrain", "--print-config", "optim.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "did you mean 'optim.lr'" in err
    assert main(["pretrain", "--print-config", "optim.accum_grad=two"]) == 1
    assert "'optim.accum_grad'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="accum_grad >= 1"):
        load_config(PretrainConfig, None, ["optim.accum_grad=0"])


def test_paper_and_recipe_configs_load():
    root = Path(__file__).resolve().parents[1]
    confs = sorted((root / "egs").glob("*/hubert/conf/*.yaml"))
    names = {p.name for p in confs}
    assert {"hubert_base_iter1.yaml", "hubert_base_iter2.yaml", "hubert_large.yaml",
            "pretrain_iter1.yaml", "pretrain_iter2.yaml"} <= names
    for p in confs:
        cfg = load_config(PretrainConfig, p)
        assert cfg.optim.max_steps > 0
    base = load_config(PretrainConfig, root / "egs/librispeech/hubert/conf/hubert_base_iter1.yaml")
    assert (base.optim.lr, base.optim.warmup_steps, base.optim.max_steps, base.optim.clip_norm) == (5e-4, 32000, 250000, 10.0)
    assert base.model.num_classes == [100] and base.model.hidden_size == 768
    large = load_config(PretrainConfig, root / "egs/librispeech/hubert/conf/hubert_large.yaml")
    assert (large.optim.lr, large.optim.clip_norm, large.model.num_hidden_layers) == (1.5e-3, 1.0, 24)


def test_bf16_autocast_step_runs(tmp_path, corpus):
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path / "bf", data, labdir, "optim.bf16=true", "optim.max_steps=2", "ckpt.every_steps=2")
    trainer = Trainer(cfg)
    assert trainer.bf16
    summary = trainer.train()
    trainer.close()
    assert summary["step"] == 2 and summary["bad_steps"] == 0
    # fp32 master weights: parameters stay float32 under bf16 autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------------------ runs never mix
def test_used_exp_dir_is_refused_a_resume_is_checked_and_overwrite_starts_clean(tmp_path, corpus):
    data, labdir = corpus
    exp = tmp_path / "exp"
    pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=10"))
    with pytest.raises(UserError, match="holds a pretrain run already: --resume continues it"):
        pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=10"))
    with pytest.raises(UserError, match="seed = 4, but the run was made with 3"):
        pretrain(tiny_cfg(exp, data, labdir, "seed=4", "optim.max_steps=10"), resume="auto")
    with pytest.raises(UserError, match="model.hidden_dropout = 0.2"):
        pretrain(tiny_cfg(exp, data, labdir, "model.hidden_dropout=0.2"), resume="auto")
    # the same label dir with other contents (a k-means rerun into it)
    other = tmp_path / "labels"
    shutil.copytree(labdir, other)
    pretrain(tiny_cfg(tmp_path / "exp2", data, other, "optim.max_steps=5"))
    (other / "meta.json").write_text((other / "meta.json").read_text().replace("}", ', "rerun": 1}', 1))
    with pytest.raises(UserError, match=r"--resume with data.train_labels\[0\] \(its contents changed\)"):
        pretrain(tiny_cfg(tmp_path / "exp2", data, other, "optim.max_steps=5"), resume="auto")
    # budgets may change: 2 more updates
    assert pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=12", "log_every=1"), resume="auto")["step"] == 12
    # --overwrite: the old run's checkpoints are gone, so a later --resume auto cannot pick them
    pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=5", "ckpt.every_steps=5", "seed=4"), overwrite=True)
    assert [p.name for p in (exp / "checkpoints").iterdir()] == [st.step_dir_name(5)]


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, corpus):
    """``speechssl pretrain`` killed -9 after its first checkpoint, resumed with the same options: the final weights
    and validation equal an uninterrupted run's, bit for bit; another defining option is refused."""
    from killing import cli, kill_when

    from speechssl.config import to_yaml

    data, labdir = corpus
    conf = tmp_path / "conf.yaml"
    conf.write_text(to_yaml(tiny_cfg(tmp_path / "unused", data, labdir, "optim.max_steps=40", "ckpt.every_steps=5",
                                     "valid_every=5", "ckpt.keep_last=1", dev=True)))
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = cli(["pretrain", "--config", str(conf), f"exp_dir={full}"])
    assert r.returncode == 0, r.stderr[-2000:]
    kill_when(["pretrain", "--config", str(conf), f"exp_dir={cut}"], cut / "checkpoints", "step-*/COMPLETE")
    r = cli(["pretrain", "--config", str(conf), "--resume", "auto", f"exp_dir={cut}", "optim.lr=0.01"])
    assert r.returncode == 1 and "optim.lr = 0.01, but the run was made with 0.001" in r.stderr.splitlines()[-1]
    r = cli(["pretrain", "--config", str(conf), "--resume", "auto", f"exp_dir={cut}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    last = st.step_dir_name(40)
    pa, pb = params_of(full / "checkpoints" / last), params_of(cut / "checkpoints" / last)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    ea, eb = (json.loads((d / "best" / "config.json").read_text())["extra"] for d in (full, cut))
    assert (ea["step"], ea["valid"]) == (eb["step"], eb["valid"])


def test_a_run_that_cannot_start_leaves_no_log_handler(tmp_path, corpus):
    """Trainer.__init__ failing after EXP/train.log is opened (here: ckpt.init_from that does not exist) removes its
    handler from the root logger: a long-lived process (a notebook, the test suite) does not log into dead runs."""
    import logging

    data, labdir = corpus
    before = list(logging.getLogger().handlers)
    with pytest.raises(UserError):
        pretrain(tiny_cfg(tmp_path / "exp", data, labdir, f"ckpt.init_from={tmp_path / 'nowhere'}"))
    assert (tmp_path / "exp" / "train.log").is_file()
    assert logging.getLogger().handlers == before
