"""`units layers`: per-layer k-means units scored against alignments, in two model passes without dumping.

The strongest check: for one layer (and for MFCC), the numbers equal `features dump` of that layer +
`kmeans fit` + `kmeans label` + `units quality` run separately with the same seed. The random-init baseline equals
`units layers --no-baseline` of a checkpoint holding the random-init weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl import upstream
from speechssl.audio import save_audio
from speechssl.cli import main
from speechssl.data.kaldi import DataDir, write_data_dir
from speechssl.features.dump import dump_features
from speechssl.features.store import FeatureReader, FeatureWriter
from speechssl.models import HubertPretrainModel, hubert_tiny, save_model
from speechssl.units.kmeans import StreamSampler, fit_store, label_store, sample_frames, sample_indices
from speechssl.units.layers import evaluate_layers, layer_feature_meta, parse_layers, select_utterances
from speechssl.units.quality import label_quality

TONES = {"aa": 300.0, "iy": 1100.0, "s": 3500.0}  # one pure tone per phone: MFCC units should find them
K = 3
SEG = 0.4  # seconds per phone segment


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    rng = np.random.default_rng(0)
    wav_scp, utt2spk, ctm = {}, {}, []
    names = list(TONES)
    for i in range(6):
        utt = f"spk{i % 2}-utt{i:02d}"
        order = rng.permutation(len(names)).tolist() + rng.permutation(len(names)).tolist()
        t = np.arange(int(SEG * 16000)) / 16000.0
        wav = np.concatenate([0.3 * np.sin(2 * np.pi * TONES[names[j]] * t + rng.uniform(0, 6)) for j in order])
        wav = (wav + 0.003 * rng.standard_normal(len(wav))).astype(np.float32)
        path = root / "wav" / f"{utt}.wav"
        path.parent.mkdir(exist_ok=True)
        save_audio(path, wav)
        wav_scp[utt], utt2spk[utt] = str(path), f"spk{i % 2}"
        if i != 5:  # the last utterance has no alignment: fitted on, not scored
            ctm += [f"{utt} 1 {s * SEG:.4f} {SEG:.4f} {names[j]}" for s, j in enumerate(order)]
    data = root / "data"
    write_data_dir(DataDir(wav_scp=wav_scp, utt2spk=utt2spk), data)
    (root / "phones.ctm").write_text("\n".join(ctm) + "\n")
    torch.manual_seed(1)  # not the baseline's seed 0: "trained" and random-init weights differ
    cfg = hubert_tiny(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                      conv_layers=[(64, 3, 2)])
    ckpt = root / "ckpt"
    save_model(HubertPretrainModel(cfg), cfg, ckpt)
    mfcc = root / "mfcc"
    dump_features(data, mfcc, kind="mfcc", nshard=2, workers=1)
    out = root / "out"
    rc = main(["units", "layers", "--ckpt", str(ckpt), "--data", str(data), "--alignments", str(root / "phones.ctm"),
               "--k", str(K), "--mfcc", str(mfcc), "--sample-frac", "0.5", "--niter", "10", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    return {"root": root, "data": data, "ctm": root / "phones.ctm", "ckpt": ckpt, "mfcc": mfcc, "out": out,
            "result": json.loads((out / "layers.json").read_text())}


def test_layers_json_and_plot(case):
    r = case["result"]
    assert [row["layer"] for row in r["layers"]] == [0, 1, 2]
    for row in r["layers"]:
        for key in ("pnmi", "phone_purity", "cluster_purity"):
            assert 0.0 <= row[key] <= 1.0 + 1e-9
    assert r["best_layer"] == max(r["layers"], key=lambda row: row["pnmi"])["layer"]
    assert r["mfcc"]["pnmi"] > 0.8  # distinct pure tones per phone: MFCC units are (nearly) the phones
    assert r["k"] == K and r["utterances"] == 5 and r["skipped_no_alignment"] == 1 and r["utterances_fit"] == 6
    assert r["frame_rates"] == {"layers": 50.0, "mfcc": 100.0}
    assert r["checkpoint_sha1"] == upstream.checkpoint_sha1(case["ckpt"])
    assert (case["out"] / "layers.png").stat().st_size > 1000


def test_layer_equals_separate_fit_label_quality(case, tmp_path):
    """Layer 1 dumped to a store (the recipe's `speechssl extract`), then kmeans fit + label +
    units quality: the same numbers."""
    up = upstream.load(case["ckpt"])
    sha1 = upstream.checkpoint_sha1(case["ckpt"])
    assert main(["extract", "--upstream", str(case["ckpt"]), "--data", str(case["data"]), "--layers", "1",
                 "--out", str(tmp_path / "hidden"), "--max-duration", "0"]) == 0
    store = tmp_path / "hidden" / "layer_1"
    source = FeatureReader(store).meta["source"]
    assert {k: source[k] for k in ("checkpoint_sha1", "layer")} == layer_feature_meta(up, 1, sha1)["source"]
    reference = upstream.layer_extractor(up, 1)
    wav, _ = sf.read(str(case["root"] / "wav" / "spk0-utt00.wav"), dtype="float32")
    np.testing.assert_array_equal(FeatureReader(store)["spk0-utt00"], reference(wav))
    fit_store(store, tmp_path / "km", k=K, sample_frac=0.5, niter=10, seed=0, device="cpu")
    label_store(store, tmp_path / "km", tmp_path / "lab", device="cpu")
    q = label_quality(tmp_path / "lab", case["ctm"])
    row = case["result"]["layers"][1]
    for key in ("pnmi", "phone_purity", "cluster_purity"):
        assert row[key] == pytest.approx(q.metrics[key], abs=1e-9), key
    assert row["num_frames"] == q.num_frames


def test_mfcc_equals_separate_fit_label_quality(case, tmp_path):
    """The MFCC baseline (a 2-shard store) equals kmeans fit + label + units quality on that store."""
    fit_store(case["mfcc"], tmp_path / "km", k=K, sample_frac=0.5, niter=10, seed=0, device="cpu")
    label_store(case["mfcc"], tmp_path / "km", tmp_path / "lab", device="cpu")
    q = label_quality(tmp_path / "lab", case["ctm"])
    m = case["result"]["mfcc"]
    for key in ("pnmi", "phone_purity", "cluster_purity"):
        assert m[key] == pytest.approx(q.metrics[key], abs=1e-9), key


def test_random_init_baseline(case):
    """On by default: a random-init row per chosen layer, ratios = trained PNMI / random PNMI at that layer;
    best_layer is still the trained model's argmax."""
    r = case["result"]
    rnd = r["random_init"]
    assert [row["layer"] for row in rnd["layers"]] == [row["layer"] for row in r["layers"]] == [0, 1, 2]
    assert rnd["seed"] == 0 and rnd["source"] == f"random:{case['ckpt']}"
    for row, rrow in zip(r["layers"], rnd["layers"]):
        for key in ("pnmi", "phone_purity", "cluster_purity"):
            assert 0.0 <= rrow[key] <= 1.0 + 1e-9
        assert rrow["num_frames"] == row["num_frames"]  # same utterances, same frames scored
        assert rrow["units_used"] <= K and rrow["units_used"] > K // 2  # k-means on 3 layers x frames: most units used
        assert rrow["inertia_per_frame"] > 0 and rrow["dim"] == row["dim"]  # same config, same width
        assert row["ratio_to_random"] == pytest.approx(row["pnmi"] / rrow["pnmi"], rel=1e-12)
    assert [row["pnmi"] for row in r["layers"]] != [row["pnmi"] for row in rnd["layers"]]  # two different models
    best_random = max(rnd["layers"], key=lambda row: row["pnmi"])
    assert rnd["best_layer"] == best_random["layer"] and rnd["best_pnmi"] == best_random["pnmi"]
    best = max(r["layers"], key=lambda row: row["pnmi"])
    assert r["best_layer"] == best["layer"]
    assert r["best_ratio_to_random_best"] == pytest.approx(best["pnmi"] / best_random["pnmi"], rel=1e-12)


def test_random_init_equals_its_weights_evaluated(case, tmp_path):
    """Independent check: the random-init model written as a checkpoint and evaluated without baseline (same
    sample, k and seed) gives the baseline's numbers exactly."""
    rnd = upstream.random_init(case["ckpt"], seed=0)
    save_model(rnd.model, rnd.model.config, tmp_path / "random_ckpt")
    assert not torch.equal(rnd.model.encoder.layers[0].attention.q_proj.weight,
                           upstream.load(case["ckpt"]).model.encoder.layers[0].attention.q_proj.weight)
    r = evaluate_layers(tmp_path / "random_ckpt", case["data"], case["ctm"], k=K, sample_frac=0.5, niter=10,
                        seed=0, device="cpu", baseline=False, progress=False, report=lambda line: None)
    assert r["random_init"] is None
    baseline = case["result"]["random_init"]["layers"]
    assert [row["layer"] for row in r["layers"]] == [row["layer"] for row in baseline]
    for row, brow in zip(r["layers"], baseline):
        for key in ("pnmi", "phone_purity", "cluster_purity", "inertia_per_frame"):
            assert row[key] == pytest.approx(brow[key], abs=1e-9), (row["layer"], key)
        assert (row["num_frames"], row["units_used"]) == (brow["num_frames"], brow["units_used"])
    assert r["sample_size"] == case["result"]["sample_size"]


def test_no_baseline(case, tmp_path, capsys):
    rc = main(["units", "layers", "--ckpt", str(case["ckpt"]), "--data", str(case["data"]), "--alignments",
               str(case["ctm"]), "--k", "2", "--layers", "1", "--max-utts", "2", "--sample-frac", "1",
               "--niter", "3", "--device", "cpu", "--no-baseline", "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "layers.json").read_text())
    assert r["random_init"] is None and "best_ratio_to_random_best" not in r
    assert all("ratio_to_random" not in row for row in r["layers"])
    out = capsys.readouterr().out
    assert "random PNMI" not in out and "random-init" not in out and "best layer by PNMI: 1" in out


def test_subset_and_layer_selection(case, tmp_path, capsys):
    rc = main(["units", "layers", "--ckpt", str(case["ckpt"]), "--data", str(case["data"]), "--alignments",
               str(case["ctm"]), "--k", "2", "--layers", "0,2", "--max-utts", "3", "--sample-frac", "1",
               "--niter", "5", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "layers.json").read_text())
    assert [row["layer"] for row in r["layers"]] == [0, 2] and r["utterances_fit"] == 3 and r["mfcc"] is None
    assert [row["layer"] for row in r["random_init"]["layers"]] == [0, 2]
    out = capsys.readouterr().out
    assert out.count("random PNMI") == 2 and f"best layer {r['best_layer']}: PNMI" in out
    assert "vs random-init best" in out
    assert main(["units", "layers", "--ckpt", str(case["ckpt"]), "--data", str(case["data"]), "--alignments",
                 str(case["ctm"]), "--k", "2", "--layers", "3"]) == 1  # out of range: one-line error


def test_parse_layers_and_subset():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("3,0,3", 4) == [0, 3]
    with pytest.raises(ValueError, match="hidden states 0..3"):
        parse_layers("4", 4)
    ids = [f"u{i}" for i in range(10)]
    sub = select_utterances(ids, max_utts=4, seed=1)
    assert len(sub) == 4 and sub == sorted(sub) and sub == select_utterances(ids, max_utts=4, seed=1)
    assert select_utterances(ids, subset_frac=0.5) != ids and len(select_utterances(ids, subset_frac=0.5)) == 5


def test_stream_sampler_equals_sample_frames(tmp_path):
    """Planned indices + streaming collection == sample_frames over the store, for a multi-shard layout."""
    rng = np.random.default_rng(3)
    for r in range(3):
        with FeatureWriter(tmp_path, r, 3, {"kind": "x", "frame_rate": 100}) as w:
            for i in range(7):
                w.add(f"r{r}u{i}", rng.standard_normal((int(rng.integers(1, 50)), 4)).astype(np.float32))
    reader = FeatureReader(tmp_path)
    n = 100
    ref = sample_frames(reader.shard_arrays(), reader.total_frames, n, seed=5, chunk=16, progress=False)
    layout = [int(offs[-1]) for _, offs, _ in reader.shard_arrays()]
    s = StreamSampler(sample_indices(layout, n, seed=5, chunk=16), 4, reader.total_frames)
    for u in reader.ids:
        s.feed(reader[u])
    np.testing.assert_array_equal(s.result(), ref)
