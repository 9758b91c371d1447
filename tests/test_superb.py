"""speechssl.superb: featurizers, feature cache, every task on a tiny synthetic corpus, exact resume, the CLI.

The corpus is built here: 4 speakers x 12 short utterances of two "words" (a speaker-specific pitch, each phone of
the transcript a segment of its own formant, so every label is in the audio), with every label file the tasks
read. Upstreams: ``fbank`` and a 2-layer tiny HuBERT checkpoint (random weights: the cache / resume / shape tests
need numbers, not quality).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from speechssl.audio import save_audio
from speechssl.data.kaldi import read_data_dir
from speechssl.errors import UserError
from speechssl.models import HubertModel, hubert_tiny, save_model
from speechssl.superb.cache import LiveFeatures, PooledFeatures, build_cache
from speechssl.superb.config import TASKS, load_superb_config
from speechssl.superb.featurizer import HierarchicalConv, WeightedSum, conv_depth, save_layer_weights
from speechssl.superb.runner import HeadTrainer, pools_first, results_table, run_superb
from speechssl.superb.tasks import make_task, make_trials

WORDS = ["YES", "NO", "UP", "DOWN"]
PHONES = {"YES": "y eh s", "NO": "n ow", "UP": "ah p", "DOWN": "d aw n"}
FORMANTS = {p: 500 + 400 * k for k, p in enumerate(sorted({p for ph in PHONES.values() for p in ph.split()}))}
F0 = {0: 100, 1: 140, 2: 180, 3: 220, 4: 120, 5: 160, 6: 200}   # spk4-6 (ASV's unseen test speakers): in between
EMOS = ["ang", "hap", "neu", "sad"]
INTENTS = ["activate lights kitchen", "deactivate lights kitchen", "activate music none", "increase volume none"]


def _write(path, rows):
    path.write_text("".join(f"{k} {v}\n" for k, v in sorted(rows.items())))


def _make_split(root, name, spks, n_per_spk, seed):
    rng = np.random.default_rng(seed)
    d = root / name
    (d / "wav").mkdir(parents=True)
    rows = {k: {} for k in ("wav.scp", "utt2spk", "text", "utt2dur", "utt2phones", "utt2kw", "utt2intent",
                            "utt2emo", "utt2session", "utt2slots", "utt2role")}
    rttm = []
    for s in spks:
        f0 = F0[s]
        for i in range(n_per_spk):
            utt = f"spk{s}-{name}-{i:03d}"
            w = i % 4
            dur = 0.4 + 0.1 * (i % 3)
            t = np.arange(int(dur * 16000)) / 16000
            # each phone of the transcript a segment of its own formant, in order (what a frame-level head reads);
            # the first word takes a random 30-70 % of the utterance (so the word boundary, where sd's turns change,
            # is in the audio, not at a fixed time), each word's phones share it equally
            ph1, ph2 = PHONES[WORDS[w]].split(), PHONES[WORDS[(w + 1) % 4]].split()
            b = int(rng.uniform(0.3, 0.7) * len(t))
            starts = np.r_[np.linspace(0, b, len(ph1) + 1)[:-1], np.linspace(b, len(t), len(ph2) + 1)].astype(int)
            seg = np.searchsorted(starts[1:-1], np.arange(len(t)), side="right")
            formant = np.array([FORMANTS[p] for p in ph1 + ph2])[seg]
            wav = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * formant * t)) \
                + 0.01 * rng.standard_normal(len(t))
            save_audio(d / "wav" / f"{utt}.wav", wav.astype(np.float32))
            rows["wav.scp"][utt] = str(d / "wav" / f"{utt}.wav")
            rows["utt2spk"][utt] = f"spk{s}"
            rows["text"][utt] = WORDS[w] + " " + WORDS[(w + 1) % 4]
            rows["utt2dur"][utt] = f"{len(t) / 16000:g}"
            rows["utt2phones"][utt] = PHONES[WORDS[w]] + " " + PHONES[WORDS[(w + 1) % 4]]
            rows["utt2kw"][utt] = WORDS[w].lower() if i % 6 != 5 else "-"
            rows["utt2intent"][utt] = INTENTS[w] if i % 6 != 4 else "- - -"
            rows["utt2emo"][utt] = EMOS[w]
            rows["utt2session"][utt] = f"Ses0{(i // 4) % 2 + 1}"
            # sf: the first word is a slot; qbe: the first utterance of speakers 0 and 2 a query, found in the
            # documents with its words (the other speakers' first utterance); sd: two "speakers" in every utterance,
            # the first over the first word, the second from the first word's last phone (overlapping it) to the
            # end, who is first alternating
            rows["utt2slots"][utt] = f"<first> {WORDS[w]} </first> {WORDS[(w + 1) % 4]}"
            rows["utt2role"][utt] = "query" if i == 0 and s % 2 == 0 else "doc"
            first, second = ("A", "B") if i % 2 else ("B", "A")
            overlap, end = starts[len(ph1) - 1] / 16000, len(t) / 16000
            rttm.append(f"SPEAKER {utt} 1 0.000 {b / 16000:.3f} <NA> <NA> {first} <NA> <NA>\n")
            rttm.append(f"SPEAKER {utt} 1 {overlap:.3f} {end - overlap:.3f} <NA> <NA> {second} <NA> <NA>\n")
    for f, r in rows.items():
        _write(d / f, r)
    (d / "rttm").write_text("".join(rttm))
    queries = [u for u, r in rows["utt2role"].items() if r == "query"]
    (d / "qbe_truth").write_text("".join(
        f"{q} {u} 0 {rows['utt2dur'][u]}\n" for q in sorted(queries) for u in sorted(rows["text"])
        if rows["utt2role"][u] == "doc" and f" {rows['text'][q]} " in f" {rows['text'][u]} "))
    spk2utt = {}
    for u, s in rows["utt2spk"].items():
        spk2utt.setdefault(s, []).append(u)
    _write(d / "spk2utt", {s: " ".join(sorted(us)) for s, us in spk2utt.items()})
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("superb_corpus")
    _make_split(root, "train", [0, 1, 2, 3], 12, 0)
    _make_split(root, "dev", [0, 1, 2, 3], 4, 1)
    _make_split(root, "test", [0, 1, 2, 3], 4, 2)
    spk = _make_split(root, "test_spk", [4, 5, 6], 4, 3)
    trials = make_trials(read_data_dir(spk), per_utt=2, seed=0)
    (root / "trials").write_text("".join(f"{a} {b} {'target' if y else 'nontarget'}\n" for a, b, y in trials))
    dev_trials = make_trials(read_data_dir(root / "dev"), per_utt=2, seed=0)
    (root / "dev" / "trials").write_text("".join(f"{a} {b} {'target' if y else 'nontarget'}\n"
                                                 for a, b, y in dev_trials))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("superb_ckpt") / "hubert"
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      conv_layers=[(32, 3, 2)], num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    save_model(HubertModel(cfg), cfg, path)
    return path


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One feature cache for the learning runs (keyed by upstream and data: shared safely)."""
    return tmp_path_factory.mktemp("learn_cache")


# ------------------------------------------------------------------------------------------------ featurizers
def test_equal_weight_featurizer_is_the_mean_of_layers():
    layers = torch.randn(5, 2, 7, 16)
    ws = WeightedSum(5, 16)
    torch.testing.assert_close(ws(layers), layers.mean(0))
    ln = WeightedSum(5, 16, layer_norm=True)
    ref = torch.stack([torch.nn.functional.layer_norm(x, (16,)) for x in layers]).mean(0)
    torch.testing.assert_close(ln(layers), ref)
    with torch.no_grad():
        ws.weights.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]))  # softmax -> one layer
    torch.testing.assert_close(ws(layers), layers[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_layers,depth", [(7, 3), (13, 4), (25, 5), (1, 0), (2, 1)])
def test_conv_interface_shapes_and_depth(num_layers, depth):
    conv = HierarchicalConv(num_layers, 8)
    assert conv_depth(num_layers) == depth == conv.depth == math.ceil(math.log2(num_layers))
    assert conv(torch.randn(num_layers, 3, 5, 8)).shape == (3, 5, 8)
    with pytest.raises(ValueError):
        conv(torch.randn(num_layers + 1, 3, 5, 8))


def test_bilstm_equals_packed_bidirectional_lstm():
    """The head's two unidirectional LSTMs (backward one on per-row reversed input) = torch's packed BiLSTM."""
    from torch import nn

    from speechssl.superb.heads import BiLSTM

    torch.manual_seed(0)
    m = BiLSTM(8, 5, proj_dim=0, hidden=6, num_layers=1, dropout=0.0)
    ref = nn.LSTM(8, 6, bidirectional=True, batch_first=True)
    with torch.no_grad():
        for n in ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]:
            getattr(ref, n).copy_(getattr(m.fwd[0], n))
            getattr(ref, n + "_reverse").copy_(getattr(m.bwd[0], n))
    x, lens = torch.randn(3, 7, 8), torch.tensor([7, 4, 2])
    packed = nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
    y, _ = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=7)
    torch.testing.assert_close(m(x, lens)[0], m.out(y), atol=1e-6, rtol=1e-5)
    down = BiLSTM(8, 5, proj_dim=4, hidden=6, num_layers=2, downsample=2)
    out, out_lens = down(x, lens)
    assert out.shape == (3, 4, 5) and out_lens.tolist() == [4, 2, 1]


def test_layer_weights_saved(tmp_path):
    ws = WeightedSum(3, 4)
    info = save_layer_weights(ws, [0, 1, 2], tmp_path, title="x")
    assert json.loads((tmp_path / "layer_weights.json").read_text())["weights"] == pytest.approx([1 / 3] * 3)
    assert info["kind"] == "weighted_sum" and (tmp_path / "layer_weights.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ cache
def test_cached_and_uncached_give_same_features_and_first_loss(corpus, ckpt, tmp_path):
    from speechssl.superb.upstreams import resolve_upstream

    dd = read_data_dir(corpus / "train")
    resolved = resolve_upstream(str(ckpt))
    up = resolved.module
    cached = build_cache(resolved, corpus / "train", cache_root=tmp_path / "cache", progress=False)
    assert cached.layers == [0, 1, 2] and (cached.cache_dir / "cache.json").is_file()
    again = build_cache(str(ckpt), corpus / "train", "all", tmp_path / "cache", progress=False)  # found, reused
    assert again.cache_dir == cached.cache_dir
    live = LiveFeatures(up, dd, cached.layers)
    ids = dd.utt_ids()[:5]
    (xc, lc), (xl, ll) = cached.get(ids), live.get(ids)
    assert torch.equal(lc, ll)
    torch.testing.assert_close(xc, xl, atol=2e-2, rtol=1e-2)   # float16 storage
    torch.testing.assert_close(xc, xl.half().float(), atol=2e-3, rtol=0)

    cfg = load_superb_config("sid", None, ["optim.max_steps=2", "optim.max_duration=4", "optim.eval_every=100"])
    task = make_task(cfg)
    splits = {n: task.make_split(n, corpus / n, read_data_dir(corpus / n), read_data_dir(corpus / n).utt2dur)
              for n in ("train", "dev")}
    task.fit(splits["train"])
    losses = []
    for src in (cached, LiveFeatures(up, dd, cached.layers, round_fp16=True)):
        tr = HeadTrainer(task, cfg, splits["train"], splits["dev"], {"train": src, "dev": src}, 1e-3,
                         tmp_path / f"run{len(losses)}", progress=False)
        tr.run(stop_after=1)
        losses.append(tr.losses[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("task", ["sid", "ic"])
def test_pooled_means_train_the_same_head(task, corpus, ckpt, tmp_path):
    """Mean-pool heads behind the weighted sum train on per-utterance layer means: the same losses and weights as
    on every frame (the head is linear up to the mean), not merely a similar model."""
    cfg = load_superb_config(task, None, _SMALL + ["optim.max_steps=5", "optim.eval_every=5", "optim.save_every=5"])
    assert pools_first(make_task(cfg), cfg)
    assert not pools_first(make_task(cfg), load_superb_config(task, None, ["featurizer.layer_norm=true"]))
    assert not pools_first(make_task(load_superb_config("pr")), load_superb_config("pr"))
    src = {n: build_cache(str(ckpt), corpus / n, "all", tmp_path / "cache", progress=False) for n in ("train", "dev")}
    runs = []
    for sources in (src, {n: PooledFeatures(s) for n, s in src.items()}):
        t = make_task(cfg)
        splits = {n: t.make_split(n, corpus / n, read_data_dir(corpus / n), read_data_dir(corpus / n).utt2dur)
                  for n in ("train", "dev")}
        t.fit(splits["train"])
        tr = HeadTrainer(t, cfg, splits["train"], splits["dev"], sources, 1e-2, tmp_path / f"run{len(runs)}", seed=1,
                         progress=False)
        tr.run()
        runs.append(tr)
    full, pooled = runs
    assert len(full.losses) == 5
    np.testing.assert_allclose(pooled.losses, full.losses, rtol=1e-5)
    for a, b in zip(list(full.featurizer.parameters()) + list(full.head.parameters()),
                    list(pooled.featurizer.parameters()) + list(pooled.head.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert pooled.evaluate(pooled.dev) == full.evaluate(full.dev)
    ids = read_data_dir(corpus / "dev").utt_ids()[:2]
    (x, lens), (frames, n) = PooledFeatures(src["dev"]).get(ids), src["dev"].get(ids)
    assert x.shape[2] == 1 and lens.tolist() == [1, 1]
    torch.testing.assert_close(x[:, 1, 0], frames[:, 1, : int(n[1])].mean(1))


def test_cache_resumes_unfinished_shards(corpus, tmp_path):
    dd = read_data_dir(corpus / "train")
    c = build_cache("fbank", corpus / "train", "all", tmp_path / "c", shard_utts=16, progress=False)
    (c.cache_dir / "cache.json").unlink()
    (c.cache_dir / "layer_0" / "shard.1.done").unlink()
    before = (c.cache_dir / "layer_0" / "shard.0.bin").stat().st_mtime_ns
    c2 = build_cache("fbank", corpus / "train", "all", tmp_path / "c", shard_utts=16, progress=False)
    assert (c2.cache_dir / "layer_0" / "shard.0.bin").stat().st_mtime_ns == before   # finished shard kept
    assert len(c2.readers[0]) == len(dd)


# ------------------------------------------------------------------------------------------------ tasks
_SMALL = ["optim.max_duration=6", "optim.eval_every=4", "optim.save_every=4", "head.proj_dim=16"]
_TASK_OVERRIDES = {
    "pr": [], "asr": ["head.hidden=16", "head.num_layers=1", "head.proj_dim=16"], "ks": [], "sid": [],
    "asv": ["head.tdnn=[[16,3,1],[32,1,1]]", "head.emb_dim=8"], "er": ["folds=2"], "ic": [],
    "qbe": [], "sd": ["head.hidden=8"], "sf": ["head.hidden=16", "head.num_layers=1", "head.proj_dim=16"],
}
_METRICS = {"pr": "per", "asr": "wer", "ks": "accuracy", "sid": "accuracy", "asv": "eer", "er": "accuracy",
            "ic": "accuracy", "qbe": "mtwv", "sd": "der", "sf": "slot_f1"}


# Every task trained until it has learned the corpus, and the bound it must pass: (upstream, steps, lr sweep,
# overrides on top of _SMALL + _TASK_OVERRIDES, the metric checked, "<" or ">", the bound). Mean-pooled heads read
# fbank without CMVN (per-utterance CMVN gives every utterance the same mean: chance, test_sid_learns_...), the LSTM
# heads fbank with it (raw log-mel trains them far slower). Each bound lies between what the trained head reaches
# (seeds 0-2 while tuning: "learned") and what the same head trained blind to its input reaches (zeros for
# features, test_a_blind_head_does_not_pass_the_bound; seeds 0-2: "blind").
_LONG = ["optim.eval_every=10", "optim.save_every=50"]
_LSTM = ["head.hidden=48", "head.proj_dim=48", "head.dropout=0"] + _LONG
_LEARN = {   # trailing comments: the test metric over seeds 0, 1, 2 while tuning (learned | blind)
    "pr": ("fbank:nocmvn", 60, [1e-2, 3e-2], _LONG, "per", "<", 0.5),            # 0.00 0.09 0.21 | 1.00 x3
    "asr": ("fbank", 150, [1e-2], _LSTM, "cer", "<", 0.3),                        # 0.07 0.00 0.02 | 1.00 x3
    "ks": ("fbank:nocmvn", 40, [1e-2, 3e-2], _LONG, "accuracy", ">", 0.75),       # 1.00 x3 | 0.25 x3
    "sid": ("fbank:nocmvn", 40, [1e-2, 3e-2], _LONG, "accuracy", ">", 0.75),      # 1.00 x3 | 0.25 x3
    "asv": ("fbank:nocmvn", 32, [1e-3, 1e-2], [], "eer", "<", 0.25),              # 0.00 x3 | 0.44 0.51 0.47
    "er": ("fbank:nocmvn", 60, [1e-2, 3e-2], _LONG, "accuracy", ">", 0.5),        # 0.86 0.81 0.89 | 0.25 x3
    "ic": ("fbank:nocmvn", 40, [1e-2, 3e-2], _LONG, "accuracy", ">", 0.75),       # 1.00 0.94 1.00 | 0.25 x3
    "qbe": ("fbank:nocmvn", 1, None, [], "mtwv", ">", 0.75),                      # 1.00 x3 | 0.00 (random scores)
    "sd": ("fbank", 40, [1e-3, 1e-2], _LONG, "der", "<", 0.3),                    # 0.12 0.15 0.12 | 0.44 0.42 0.44
    "sf": ("fbank", 150, [1e-2], _LSTM, "slot_cer", "<", 0.4),                    # 0.20 0.07 0.00 | 1.00 x3
}


def _run_task(task, corpus, out, cache_dir, seed=0):
    upstream, steps, sweep, extra, _, _, _ = _LEARN[task]
    kw = {"data": corpus}
    if task == "asv":   # unseen speakers (pitches between the training ones), scored on trials
        kw = {"train": corpus / "train", "dev": corpus / "dev", "test": corpus / "test_spk",
              "test_trials": corpus / "trials"}
    elif task == "er":
        kw = {"data": corpus / "train"}
    return run_superb(task, upstream, out, overrides=_SMALL + _TASK_OVERRIDES[task] + extra,
                      max_steps=steps if sweep else None, lr_sweep=sweep, cache_dir=cache_dir, seed=seed,
                      progress=False, **kw)


def _passes(task, r):
    *_, metric, direction, bound = _LEARN[task]
    value = r["test"][metric]
    return (value < bound if direction == "<" else value > bound), value


@pytest.mark.parametrize("task", TASKS)
def test_every_task_learns(task, corpus, feature_cache, tmp_path):
    """Each task's head beats chance by a margin (see _LEARN) on the held-out split, and the run's record is whole.

    Chance here: accuracy 0.25 (4 balanced classes; IC: 4 intents), EER 0.5, PER / CER 1 for an empty output,
    DER 0.41 for one speaker active throughout the test utterances (0.62 for both), MTWV 0 for no detection.
    SF's metric, slot-type F1, is 1 for any output that tags a slot (the corpus has one slot type): the slot
    values' CER is what shows learning."""
    r = _run_task(task, corpus, tmp_path / task, feature_cache)
    assert r["metric"] == _METRICS[task]
    ok, value = _passes(task, r)
    assert ok, f"{task}: test {_LEARN[task][4]} {value:.3f}, bound {_LEARN[task][5]} {_LEARN[task][6]}"
    sweep = _LEARN[task][2]
    if task == "qbe":   # nothing trained: no lr, the layer picked on dev
        assert r["lr"] is None and r["layer"] in r["layers"] and not list((tmp_path / task).glob("lr_*"))
    else:
        assert r["lr"] in (sweep if task != "er" else [[a, b] for a in sweep for b in sweep])
    saved = json.loads((tmp_path / task / "results.json").read_text())
    assert saved["test"] == r["test"] and saved["upstream_label"] == _LEARN[task][0]
    if task == "asv":
        assert "min_dcf" in r["test"]
    if task == "er":
        assert len(r["folds"]) == 2 and {f["session"] for f in r["folds"]} == {"Ses01", "Ses02"}


def _blind(monkeypatch):
    """Every head sees zeros where its features were (the frame count kept): whatever it learns comes from the
    labels' own statistics and the lengths, not from the audio. QbE (no head): scores that ignore the audio."""
    from speechssl.superb import qbe

    features = HeadTrainer.features

    def blind(self, split, exs):
        x, lens = features(self, split, exs)
        return torch.zeros_like(x), lens

    monkeypatch.setattr(HeadTrainer, "features", blind)
    monkeypatch.setattr(qbe, "qbe_scores", lambda queries, docs: np.random.default_rng(0).standard_normal(
        (len(queries), len(docs))))


@pytest.mark.parametrize("task", TASKS)
def test_a_blind_head_does_not_pass_the_bound(task, corpus, feature_cache, tmp_path, monkeypatch):
    """The negative control of test_every_task_learns: the same run with a head blind to its input (_blind) stays
    on the wrong side of the bound, so passing it takes reading the audio."""
    _blind(monkeypatch)
    r = _run_task(task, corpus, tmp_path / task, feature_cache)
    ok, value = _passes(task, r)
    assert not ok, f"{task}: a blind head reached {_LEARN[task][4]} {value:.3f} (bound {_LEARN[task][6]})"


def test_run_without_cache_matches_cached_run(corpus, tmp_path, monkeypatch):
    """--cache none (the upstream every step) trains on the cache's numbers up to its float16 storage.

    Live features rounded to float16 (as the cache stores them) give the cached run exactly: every training loss,
    the dev history, the test metrics. Unrounded (what --cache none does), each feature differs from the cache by
    at most half a float16 ulp (relative 2^-11, test_cached_and_uncached_...), which moves the first loss by
    ~1e-5 relative and, as the weights drift apart, the 8th by ~2e-4 (measured: 9e-6 and 1.6e-4; asserted with ~5x
    headroom); no dev prediction is that close to a tie, so the dev history and the test accuracy are the same."""
    from functools import partial

    from speechssl.superb import runner

    losses = {}
    run = HeadTrainer.run

    def recording(self, **kw):   # the per-step training losses of each run (not in results.json)
        out = run(self, **kw)
        losses[self.run_dir.parent.name] = list(self.losses)
        return out

    monkeypatch.setattr(HeadTrainer, "run", recording)
    kw = dict(data=corpus, overrides=_SMALL, max_steps=8, lr_sweep=[1e-2], progress=False)
    disk = run_superb("ks", "fbank:nocmvn", tmp_path / "disk", cache_dir=tmp_path / "c", **kw)
    live = run_superb("ks", "fbank:nocmvn", tmp_path / "live", cache="none", **kw)
    assert live["cache"] == "none" and not (tmp_path / "feature_cache").exists()
    with monkeypatch.context() as m:
        m.setattr(runner, "LiveFeatures", partial(runner.LiveFeatures, round_fp16=True))
        rounded = run_superb("ks", "fbank:nocmvn", tmp_path / "rounded", cache="none", **kw)
    history = {n: json.loads((tmp_path / n / "lr_0.01" / "result.json").read_text())["history"]
               for n in ("disk", "live", "rounded")}
    assert len(losses["disk"]) == 8 and losses["rounded"] == losses["disk"]            # bit-exact
    assert history["rounded"] == history["disk"] and rounded["test"] == disk["test"]
    assert rounded["sweep"][0]["best_step"] == disk["sweep"][0]["best_step"]
    rel = np.abs(np.array(losses["live"]) - losses["disk"]) / np.abs(losses["disk"])
    assert 0 < rel[0] <= 5e-5 and rel.max() <= 1e-3, rel
    assert history["live"] == history["disk"] and live["test"] == disk["test"]
    assert live["sweep"][0]["best_step"] == disk["sweep"][0]["best_step"]


@pytest.mark.parametrize("blind", [False, True])
def test_asr_with_sentencepiece_units(blind, corpus, feature_cache, tmp_path, monkeypatch):
    """ASR on sentencepiece units learns the corpus (test WER < 0.5; seeds 0-2 while tuning: 0.00 0.03 0.03), which
    a head blind to its input does not (_blind: it learns the units' prior, WER 0.75), and the saved sentencepiece
    model tokenises and detokenises exactly."""
    if blind:
        _blind(monkeypatch)
    r = run_superb("asr", "fbank", tmp_path / "bpe", data=corpus, max_steps=150, lr_sweep=[1e-2], progress=False,
                   overrides=_SMALL + _TASK_OVERRIDES["asr"] + _LSTM + ["head.units=bpe", "head.bpe_vocab=16"],
                   cache_dir=feature_cache)
    assert (r["test"]["wer"] < 0.5) is not blind, r["test"]
    from speechssl.train.state import load_bundle

    state = load_bundle(next((tmp_path / "bpe").glob("lr_*/step-*")), "train_state")["task_state"]
    assert "spm_model" in state
    task = make_task(load_superb_config("asr", None, ["head.units=bpe"]))
    task.load_state(state)   # the saved sentencepiece model tokenises and detokenises exactly
    for text in ["YES NO", "DOWN YES", "UP DOWN"]:
        toks = task.tokens(text)
        assert toks and set(toks) <= set(state["vocab"]) and task.detok(toks) == text


def test_sid_learns_speakers_with_enough_steps(corpus, tmp_path):
    """A metric that can fail: 4 speakers with distinct pitch are separable from mean-pooled raw fbank; with
    per-utterance CMVN (SUPERB's FBANK) the pooled projection is the same for every utterance: chance."""
    kw = dict(data=corpus, overrides=_SMALL, max_steps=40, lr_sweep=[1e-2], cache_dir=tmp_path / "cache",
              progress=False)
    assert run_superb("sid", "fbank:nocmvn", tmp_path / "raw", **kw)["test"]["accuracy"] >= 0.75
    assert run_superb("sid", "fbank", tmp_path / "cmvn", **kw)["test"]["accuracy"] <= 0.25


def test_head_resume_is_exact(corpus, ckpt, tmp_path):
    cfg = load_superb_config("asr", None, _SMALL + _TASK_OVERRIDES["asr"] + ["optim.max_steps=6", "head.dropout=0.3",
                                                                           "optim.save_every=3"])
    dd = {n: read_data_dir(corpus / n) for n in ("train", "dev")}
    src = {n: build_cache(str(ckpt), corpus / n, "all", tmp_path / "cache", progress=False) for n in dd}

    def trainer(run_dir):
        task = make_task(cfg)
        splits = {n: task.make_split(n, corpus / n, dd[n], dd[n].utt2dur) for n in dd}
        task.fit(splits["train"])
        return HeadTrainer(task, cfg, splits["train"], splits["dev"], src, 1e-3, run_dir, seed=3, progress=False)

    full = trainer(tmp_path / "full")
    full.run()
    first = trainer(tmp_path / "split")
    first.run(stop_after=3)
    assert [p.name for p in (tmp_path / "split").glob("step-*")] == ["step-00000003"]
    with pytest.raises(UserError, match="--resume"):
        trainer(tmp_path / "split").run()
    second = trainer(tmp_path / "split")
    second.run(resume=True)
    assert first.losses + second.losses == full.losses   # bit-exact: weights, Adam state, RNG, batch position
    assert len(full.losses) == 6


# ------------------------------------------------------------------------------------------------ CLI, errors, table
def test_help_lists_every_task():
    out = subprocess.run([sys.executable, "-m", "speechssl", "superb", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for t in TASKS:
        assert f"  {t} " in out


def test_missing_label_is_one_line_naming_file_and_utterance(corpus, tmp_path):
    bad = tmp_path / "data"
    import shutil

    shutil.copytree(corpus / "train", bad / "train")
    lines = (bad / "train" / "utt2kw").read_text().splitlines()
    (bad / "train" / "utt2kw").write_text("\n".join(lines[1:]) + "\n")
    for s in ("dev", "test"):
        shutil.copytree(corpus / s, bad / s)
    r = subprocess.run([sys.executable, "-m", "speechssl", "superb", "--task", "ks", "--upstream", "fbank",
                        "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "utt2kw" in err[0] and lines[0].split()[0] in err[0], r.stderr
    # a task's file absent: named
    (bad / "train" / "utt2kw").unlink()
    with pytest.raises(UserError, match="utt2kw: no such file"):
        run_superb("ks", "fbank", tmp_path / "o2", data=bad, progress=False, cache_dir=tmp_path / "c")
    # phones.ctm without an utterance
    (bad / "dev" / "utt2phones").unlink()
    ctm = bad / "dev" / "phones.ctm"
    utts = read_data_dir(bad / "dev").utt_ids()
    ctm.write_text("".join(f"{u} 1 0.00 0.10 y\n" for u in utts[1:]))
    with pytest.raises(UserError, match=f"phones.ctm: no phones for utterance {utts[0]}"):
        run_superb("pr", "fbank", tmp_path / "o3", data=bad, progress=False, cache_dir=tmp_path / "c")


def test_table_across_tasks_and_upstreams(tmp_path):
    runs = [("fbank", "pr", "per", 0.5), ("fbank", "sid", "accuracy", 0.25),
            ("random:x/hubert_iter1/best", "pr", "per", 0.4), ("hubert_iter2", "asv", "eer", 0.1),
            ("hubert_iter2", "asr", "wer", 0.9)]
    for up, task, metric, val in runs:
        d = tmp_path / up.replace("/", "_").replace(":", "_") / task
        d.mkdir(parents=True)
        label = {"random:x/hubert_iter1/best": "random:hubert_iter1"}.get(up, up)
        test = {metric: val, **({"min_dcf": 0.5} if task == "asv" else {}), **({"cer": 0.3} if task == "asr" else {})}
        (d / "results.json").write_text(json.dumps({"task": task, "metric": metric, "upstream_label": label,
                                                    "test": test}))
    table = results_table([str(tmp_path / "*" / "*")])
    lines = table.strip().splitlines()
    assert lines[0] == "| upstream | PR PER% ↓ | ASR WER% ↓ | ASR CER% ↓ | SID acc% ↑ | ASV EER% ↓ | ASV minDCF ↓ |"
    assert lines[2] == "| fbank | 50.0 | – | – | 25.0 | – | – |"
    assert lines[3] == "| random:hubert_iter1 | 40.0 | – | – | – | – | – |"
    assert lines[4] == "| hubert_iter2 | – | 90.0 | 30.0 | – | 10.0 | 0.500 |"


@pytest.mark.parametrize("args, message", [
    (["optim.eval_every=0"], "optim.eval_every must be >= 1 step, got 0"),
    (["optim.max_duration=-1", "optim.lr=0"], "optim.lr must be > 0, got 0.0; optim.max_duration must be > 0"),
    (["--max-steps", "0"], "--max-steps (optim.max_steps) must be >= 1 for task pr"),
    (["folds=0"], "need folds >= 1"),
])
def test_bad_optim_values_are_one_line_errors(args, message, corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "speechssl", "superb", "--task", "pr", "--upstream", "fbank", "--data",
                        str(corpus), "--out", str(tmp_path / "o"), "--no-progress", *args],
                       capture_output=True, text=True)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and message in err[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_prepare_verb_runs_the_corpus_preparer(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "speechssl", "superb", "prepare", *a],  # noqa: E731
                                    capture_output=True, text=True)
    r = run("fluent_speech_commands", "--help")
    assert r.returncode == 0 and "--corpus" in r.stdout
    r = run("fluent_speech_commands", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr
    r = run("no_such_corpus")
    assert r.returncode == 2 and "choose one of librispeech" in r.stderr


def test_table_refuses_unreadable_or_foreign_json_in_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text("{not json")
    with pytest.raises(UserError, match=r"a/results.json: unreadable \(JSONDecodeError"):
        results_table([str(tmp_path / "a")])
    (tmp_path / "a" / "results.json").write_text(json.dumps({"task": "pr", "test": {"per": "high"}}))
    with pytest.raises(UserError, match="not a `speechssl superb` result"):
        results_table([str(tmp_path / "a")])


@pytest.mark.parametrize("args, message", [
    (["--lr-sweep=-1e-3"], "learning rates must be > 0"),
    (["--lr-sweep", "0,1e-3"], "learning rates must be > 0"),
])
def test_bad_lr_sweep_is_one_line(args, message, corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "speechssl", "superb", "--task", "ks", "--upstream", "fbank", "--data",
                        str(corpus), "--out", str(tmp_path / "o"), *args], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("per_utt", ["0", "-2"])
def test_trials_per_utt_must_be_positive(per_utt, corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "speechssl", "superb", "trials", "--data", str(corpus / "dev"), "--out",
                        str(tmp_path / "t"), "--per-utt", per_utt], capture_output=True, text=True)
    assert r.returncode == 1 and "--per-utt must be >= 1" in r.stderr and not (tmp_path / "t").exists(), r.stderr


def test_sigkill_mid_sweep_then_resume_equals_the_uninterrupted_run_and_never_mixes(corpus, ckpt, tmp_path):
    """Kill -9 while the second lr of a sweep trains (the first one finished): a resume with another upstream,
    --max-steps or --seed is refused naming it (it would reuse the finished lr); the same options finish with the
    uninterrupted run's result; a finished run resumed with other options is refused, with its own returns it."""
    from killing import cli, kill_when

    args = ["superb", "--task", "pr", "--upstream", str(ckpt), "--data", str(corpus), "--cache", "none",
            "--lr-sweep", "1e-3,1e-2", "--max-steps", "80", "--seed", "1", "--no-progress", *_SMALL]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli([*args, "--out", str(full)]).returncode == 0
    kill_when([*args, "--out", str(cut)], cut, "lr_0.01/step-*/COMPLETE")
    assert (cut / "lr_0.001" / "result.json").is_file() and not (cut / "results.json").exists()
    kw = dict(data=corpus, cache="none", lr_sweep=[1e-3, 1e-2], max_steps=80, seed=1, overrides=_SMALL,
              progress=False, resume=True)
    for change, named in [({"upstream": "fbank"}, "input upstream"), ({"max_steps": 90}, "optim.max_steps = 90"),
                          ({"seed": 2}, "seed = 2, but the run was made with 1")]:
        opts = {**kw, **change}
        with pytest.raises(UserError, match="--resume with") as e:
            run_superb("pr", opts.pop("upstream", str(ckpt)), cut, **opts)
        assert named.replace("input ", "") in str(e.value) and "--overwrite" in str(e.value)
    r = cli([*args, "--out", str(cut), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    for r in (a, b):
        for lr in r["sweep"]:
            lr.pop("train_seconds")
    assert (a["test"], a["dev"], a["lr"], a["sweep"]) == (b["test"], b["dev"], b["lr"], b["sweep"])
    # finished: another option is refused, the same ones return the result; a rerun without --resume is refused
    with pytest.raises(UserError, match="seed = 5"):
        run_superb("pr", str(ckpt), cut, **{**kw, "seed": 5})
    assert run_superb("pr", str(ckpt), cut, **kw)["test"] == b["test"]
    with pytest.raises(UserError, match="holds a superb run already"):
        run_superb("pr", str(ckpt), cut, **{**kw, "resume": False})
    # --overwrite starts over: the old lrs are gone before the new run trains
    r = run_superb("pr", "fbank", cut, **{**kw, "resume": False, "lr_sweep": [1e-2], "max_steps": 4},
                   overwrite=True)
    assert r["upstream"] == "fbank" and sorted(p.name for p in cut.glob("lr_*")) == ["lr_0.01"]
