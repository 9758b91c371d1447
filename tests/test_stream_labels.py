"""Iteration-2 labels without dumping the corpus: `speechssl extract --sample-frac` (a seeded utterance sample, the
k-means sample) and `speechssl kmeans label --upstream` (each shard through extract's forward straight to the nearest
centroid). Streaming labels are byte-identical to extract's full dump + `kmeans label --feats` (nshard 1 and 2, --rank
runs, torchrun env, CLI); they carry the dump's numbers (float16 store values); finished shards are skipped, one
interrupted by an exception or SIGKILL is redone; the sample is deterministic, independent of sharding and recorded in
the header; bad input is a one-line error.

Model and corpus: tests/test_extract.py's small Base-layout CNN model (random weights) and tone-and-noise WAVs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_extract import cnn_ckpt, make_data  # noqa: F401  (cnn_ckpt: a fixture)

from speechssl.cli import main
from speechssl.data.kaldi import read_data_dir
from speechssl.features.dump import dump_features
from speechssl.features.store import FeatureReader, FeatureStoreError
from speechssl.units import label_stream
from speechssl.units.kmeans import KMeansModel, fit_store, label_store
from speechssl.upstream.extract import extract, layer_dir, sample_utterances

LAYER = 2
LAYERS = [LAYER]
DURATIONS = (0.3, 2.7, 1.1, 0.5, 4.0, 1.6, 0.8, 2.2, 1.3, 0.9, 3.1, 0.6)  # 12 utterances, lots of padding in a batch
KW = dict(max_duration=3.0, progress=False)  # batches of several rows, one utterance alone


@pytest.fixture(scope="module")
def ckpt(cnn_ckpt):
    """test_extract's small random Base-shaped checkpoint (the waveform CNN at 50 Hz)."""
    return cnn_ckpt


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("corpus"), durations=DURATIONS)


@pytest.fixture(scope="module")
def km(ckpt, data, tmp_path_factory):
    """The new iteration-2 chain's k-means: extract a 40% utterance sample, fit on all its frames."""
    root = tmp_path_factory.mktemp("km")
    assert extract(ckpt, data, root / "sample", LAYERS, sample_frac=0.4, seed=1, nshard=2, **KW)
    fit_store(layer_dir(root / "sample", LAYER), root / "km", k=16, sample_frac=1.0, niter=5, device="cpu",
              report=lambda _: None)
    return root / "km"


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(ckpt, data, km, tmp_path_factory):
    """The full-dump path: extract the whole data dir, `kmeans label --feats`; {nshard: label dir}."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for nshard in (1, 2):
        assert extract(ckpt, data, root / f"dump{nshard}", LAYERS, nshard=nshard, **KW)
        assert label_store(layer_dir(root / f"dump{nshard}", LAYER), km, root / f"labels{nshard}", nshard=nshard,
                           device="cpu")
        out[nshard] = root / f"labels{nshard}"
    return out


# ------------------------------------------------------------------------------------------ equal to the dump path
@pytest.mark.parametrize("nshard", [1, 2])
def test_streaming_labels_are_the_full_dump_labels(nshard, ckpt, data, km, reference, tmp_path):
    assert label_stream.label_upstream(ckpt, data, km, tmp_path / "st", LAYER, nshard=nshard, device="cpu", **KW)
    ref = reference[nshard]
    assert (tmp_path / "st" / "text.km").read_bytes() == (ref / "text.km").read_bytes()
    assert (tmp_path / "st" / "meta.json").read_bytes() == (ref / "meta.json").read_bytes()
    assert _files(tmp_path / "st") == _files(ref)  # shard files and headers too
    meta = json.loads((ref / "meta.json").read_text())
    assert meta["num_utts"] == len(DURATIONS) and meta["kmeans_hash"] == KMeansModel.load(km).hash
    assert meta["features"]["source"]["layer"] == LAYER and "sample" not in meta["features"]["source"]["data"]
    units = {u for line in (ref / "text.km").read_text().splitlines() for u in line.split()[1:]}
    assert len(units) > 4  # not a degenerate labelling that any features would reproduce


def test_rank_runs_torchrun_and_cli_give_the_same_bytes(ckpt, data, km, reference, tmp_path, monkeypatch):
    want = _files(reference[2])
    assert not label_stream.label_upstream(ckpt, data, km, tmp_path / "ranks", LAYER, nshard=2, rank=1,
                                           device="cpu", **KW)
    assert not (tmp_path / "ranks" / "text.km").exists()
    assert label_stream.label_upstream(ckpt, data, km, tmp_path / "ranks", LAYER, nshard=2, rank=0, device="cpu", **KW)
    assert _files(tmp_path / "ranks") == want
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        done = label_stream.label_upstream(ckpt, data, km, tmp_path / "torchrun", LAYER, device="cpu", **KW)
    assert done and _files(tmp_path / "torchrun") == want
    monkeypatch.delenv("WORLD_SIZE")
    base = ["kmeans", "label", "--upstream", str(ckpt), "--layer", str(LAYER), "--data", str(data), "--km", str(km),
            "--out", str(tmp_path / "cli"), "--nshard", "2", "--max-duration", "3", "--device", "cpu"]
    assert main([*base, "--rank", "0"]) == 0 and main([*base, "--rank", "1"]) == 0
    assert _files(tmp_path / "cli") == want


def test_assigned_features_are_the_dump_store_values(ckpt, data, km, reference, tmp_path, monkeypatch):
    """What reaches the nearest-centroid search is, bit for bit, what the dump path's store holds (float16,
    same batches), for every utterance of each shard, and the header label_with gets is the store's."""
    seen: dict[str, np.ndarray] = {}
    metas = []
    real = label_stream.label_with

    def spy(features, utt_ids, km_, out_dir, meta, **kw):
        metas.append(meta)

        def tee():
            for utt, f in features:
                seen[utt] = f
                yield utt, f
        return real(tee(), utt_ids, km_, out_dir, meta, **kw)

    monkeypatch.setattr(label_stream, "label_with", spy)
    assert label_stream.label_upstream(ckpt, data, km, tmp_path / "st", LAYER, nshard=2, device="cpu", **KW)
    store = FeatureReader(reference[2].parent / "dump2" / f"layer_{LAYER}")
    assert sorted(seen) == sorted(store.ids) and len(metas) == 2
    for utt in store.ids:
        assert seen[utt].dtype == np.float16
        np.testing.assert_array_equal(seen[utt], store[utt])
    for meta in metas:
        assert {k: meta[k] for k in ("kind", "dim", "frame_rate", "source", "framing")} == \
            {k: store.meta[k] for k in ("kind", "dim", "frame_rate", "source", "framing")}


# ------------------------------------------------------------------------------------------ resuming
def _count_reads(monkeypatch) -> list[str]:
    """Record the utterance ids whose audio the forward reads."""
    import speechssl.upstream.extract as ex

    reads: list[str] = []
    real = ex.load_utterance

    def counting(u, *a, **kw):
        reads.append(u.utt_id)
        return real(u, *a, **kw)

    monkeypatch.setattr(ex, "load_utterance", counting)
    return reads


def test_finished_shard_skipped_failed_shard_redone(ckpt, data, km, reference, tmp_path, monkeypatch):
    import speechssl.upstream.extract as ex

    ids = read_data_dir(data).utt_ids()
    shard0, shard1 = ids[:6], ids[6:]
    out = tmp_path / "st"
    real = ex.load_utterance

    def failing(u, *a, **kw):  # shard 1 fails on its third utterance (duration order)
        if u.utt_id in shard1:
            failing.n += 1
            if failing.n == 3:
                raise RuntimeError("disk went away")
        return real(u, *a, **kw)

    failing.n = 0
    monkeypatch.setattr(ex, "load_utterance", failing)
    with pytest.raises(RuntimeError, match="disk went away"):
        label_stream.label_upstream(ckpt, data, km, out, LAYER, nshard=2, device="cpu", workers=1, **KW)
    assert (out / "shards" / "0-of-2.json").exists() and (out / "shards" / "0-of-2.km").exists()
    assert not (out / "shards" / "1-of-2.json").exists() and not (out / "shards" / "1-of-2.km").exists()
    assert not (out / "text.km").exists() and not list(out.rglob("*.tmp*"))
    stamp = (out / "shards" / "0-of-2.km").stat().st_mtime_ns

    reads = _count_reads(monkeypatch)
    assert label_stream.label_upstream(ckpt, data, km, out, LAYER, nshard=2, device="cpu", **KW)
    assert sorted(reads) == sorted(shard1)  # shard 0 skipped without reading its audio, shard 1 redone
    assert (out / "shards" / "0-of-2.km").stat().st_mtime_ns == stamp
    assert _files(out) == _files(reference[2])
    reads.clear()
    assert label_stream.label_upstream(ckpt, data, km, out, LAYER, nshard=2, device="cpu", **KW)
    assert reads == []  # everything finished: nothing recomputed


def test_sigkill_mid_shard_then_rerun_redoes_it(ckpt, km, tmp_path):
    """Shard 0 reads files, shard 1 slow pipes: kill -9 once shard 0's header is written, rerun: shard 0 kept, shard
    1 redone, the labels equal a clean in-process run."""
    data = make_data(tmp_path / "corpus", durations=DURATIONS, pipe_from=6, sleep=0.4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "speechssl", "kmeans", "label", "--upstream", str(ckpt), "--layer", str(LAYER),
           "--data", str(data), "--km", str(km), "--out", str(out), "--nshard", "2", "--max-duration", "3",
           "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # a hang guard, not a speed check
        while not (out / "shards" / "0-of-2.json").exists():
            assert proc.poll() is None, "kmeans label ended before it could be killed"
            if time.time() > deadline:
                pytest.fail("no shard 0 in 600 s: hung")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "shards" / "1-of-2.json").exists() and not (out / "text.km").exists()
    stamp = (out / "shards" / "0-of-2.km").stat().st_mtime_ns
    assert label_stream.label_upstream(ckpt, data, km, out, LAYER, nshard=2, device="cpu", **KW)
    assert (out / "shards" / "0-of-2.km").stat().st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp*"))
    assert label_stream.label_upstream(ckpt, data, km, tmp_path / "clean", LAYER, nshard=2, device="cpu", **KW)
    assert _files(out) == _files(tmp_path / "clean")


# ------------------------------------------------------------------------------------------ the utterance sample
def test_extract_sample_is_seeded_independent_of_sharding_and_recorded(ckpt, data, tmp_path):
    ids = read_data_dir(data).utt_ids()
    picked, record = sample_utterances(ids, 0.4, seed=1)
    assert len(picked) == round(0.4 * len(ids)) and picked == sorted(picked) and set(picked) <= set(ids)
    assert sample_utterances(ids, 0.4, seed=1) == (picked, record)
    assert sample_utterances(ids, 0.4, seed=2)[0] != picked and sample_utterances(ids, 0.5, seed=1)[0] != picked
    assert sample_utterances(ids, 1.0) == (ids, None) and sample_utterances(ids, None) == (ids, None)
    draws = np.zeros(len(ids))
    for seed in range(300):  # uniform: every utterance drawn about 40% of the time
        draws[[ids.index(u) for u in sample_utterances(ids, 0.4, seed=seed)[0]]] += 1
    assert np.abs(draws / 300 - 0.4).max() < 0.15, draws

    for nshard in (1, 3):
        assert extract(ckpt, data, tmp_path / f"s{nshard}", LAYERS, sample_frac=0.4, seed=1, nshard=nshard, **KW)
    a, b = FeatureReader(layer_dir(tmp_path / "s1", LAYER)), FeatureReader(layer_dir(tmp_path / "s3", LAYER))
    assert sorted(a.ids) == sorted(b.ids) == picked
    assert a.meta["source"]["data"]["sample"] == b.meta["source"]["data"]["sample"] == record == \
        {"frac": 0.4, "seed": 1, "of_num_utts": len(ids), "of_utts_sha1": record["of_utts_sha1"]}
    assert a.meta["source"]["data"]["num_utts"] == len(picked)


def test_extract_of_another_sample_is_refused_then_redone(ckpt, data, tmp_path, capsys):
    out = tmp_path / "s"
    assert extract(ckpt, data, out, LAYERS, sample_frac=0.4, seed=1, **KW)
    stamp = (layer_dir(out, LAYER) / "shard.0.bin").stat().st_mtime_ns
    assert extract(ckpt, data, out, LAYERS, sample_frac=0.4, seed=1, **KW)  # same sample: skipped
    assert (layer_dir(out, LAYER) / "shard.0.bin").stat().st_mtime_ns == stamp
    for other in (dict(sample_frac=0.4, seed=2), dict(sample_frac=0.5, seed=1), dict()):
        with pytest.raises(FeatureStoreError, match=r"different header \(source: .*--overwrite"):
            extract(ckpt, data, out, LAYERS, **other, **KW)
    base = ["extract", "--upstream", str(ckpt), "--data", str(data), "--layers", str(LAYER), "--out", str(out),
            "--max-duration", "3"]
    assert main([*base, "--sample-frac", "0.4", "--seed", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different header" in err and "sample" in err, err
    assert main([*base, "--sample-frac", "0.4", "--seed", "2", "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(FeatureReader(layer_dir(out, LAYER)).ids) == \
        sample_utterances(read_data_dir(data).utt_ids(), 0.4, seed=2)[0]
    for bad in ("0", "1.5", "-0.1"):
        assert main([*base, "--sample-frac", bad]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--sample-frac must be in (0, 1]" in err, err


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_one_line_error(ckpt, data, km, tmp_path, capsys):
    out = tmp_path / "o"
    stream = ["--upstream", str(ckpt), "--layer", str(LAYER), "--data", str(data)]
    common = ["kmeans", "label", "--km", str(km), "--out", str(out), "--device", "cpu"]
    mfcc_km = tmp_path / "mfcc_km"
    dump_features(data, tmp_path / "mfcc", kind="mfcc")
    fit_store(tmp_path / "mfcc", mfcc_km, k=4, sample_frac=1.0, niter=2, device="cpu", report=lambda _: None)
    layer1_km = tmp_path / "l1_km"
    extract(ckpt, data, tmp_path / "l1", [1], sample_frac=0.5, **KW)
    fit_store(layer_dir(tmp_path / "l1", 1), layer1_km, k=4, sample_frac=1.0, niter=2, device="cpu",
              report=lambda _: None)
    capsys.readouterr()
    cases = [
        ([*common, *stream, "--feats", str(tmp_path / "mfcc")], "exactly one of --feats"),
        ([*common], "exactly one of --feats"),
        ([*common, "--upstream", str(ckpt), "--data", str(data)], "--upstream needs --layer"),
        ([*common, "--upstream", str(ckpt), "--layer", "1"], "--upstream needs --data"),
        ([*common, "--feats", str(tmp_path / "mfcc"), "--layer", "1"], "--layer goes with --upstream"),
        ([*common, "--upstream", str(ckpt), "--layer", "4", "--data", str(data)], "--layer 4: "),
        ([*common, "--upstream", str(ckpt), "--layer", "x", "--data", str(data)], "--layer must be one integer"),
        ([*common, *stream, "--overlap-seconds", "1"], "--overlap-seconds goes with --chunk-seconds"),
        (["kmeans", "label", "--km", str(mfcc_km), "--out", str(out), *stream], "features differ"),
        (["kmeans", "label", "--km", str(layer1_km), "--out", str(out), *stream], "features differ"),
    ]
    for argv, says in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("speechssl kmeans: error:") and says in err, (argv, err)
    assert not out.exists()
    # the hidden-state k-means refused for the MFCC store too (the check runs both ways)
    assert main(["kmeans", "label", "--feats", str(tmp_path / "mfcc"), "--km", str(km), "--out", str(out)]) == 1
    assert "features differ" in capsys.readouterr().err
