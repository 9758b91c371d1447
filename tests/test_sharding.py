"""One sharding rule (speechssl.sharding) for every sharded verb: `features dump` and `kmeans label` give the same
merged output without --rank, with --rank R (separate jobs, any order) and as torchrun workers; the trainer reads
the torchrun environment through the same helper."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_features import make_data_dir

from speechssl.cli import main
from speechssl.features.store import FeatureReader
from speechssl.sharding import ids_sha1, resolve_shards, shard_items, shard_range, torchrun_env
from speechssl.units.kmeans import Assigner, KMeansModel
from speechssl.units.labels import read_labels

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def as_worker(monkeypatch, rank, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


# ------------------------------------------------------------------------------------------------ the rule


def test_resolve_shards_rule(monkeypatch):
    # no environment: nshard defaults to 1; no rank -> every shard; --rank -> that one
    assert resolve_shards(None, None) == (1, [0])
    assert resolve_shards(3, None) == (3, [0, 1, 2])
    assert resolve_shards(3, 2) == (3, [2])
    with pytest.raises(ValueError, match=r"--rank must be in \[0, --nshard=2\), got 2"):
        resolve_shards(2, 2)
    with pytest.raises(ValueError, match="--nshard must be >= 1"):
        resolve_shards(0, None)
    with pytest.raises(ValueError, match=r"--rank must be in \[0, --nshard=1\)"):
        resolve_shards(None, 1)
    # torchrun: nshard defaults to WORLD_SIZE; worker RANK takes shards RANK, RANK + WORLD_SIZE, ...
    as_worker(monkeypatch, 1, 2)
    assert resolve_shards(None, None) == (2, [1])
    assert resolve_shards(5, None) == (5, [1, 3])
    assert resolve_shards(1, None) == (1, [])  # more workers than shards: this one has nothing to do
    assert resolve_shards(5, 0) == (5, [0])  # an explicit rank wins over the environment
    # every shard is done by exactly one worker, whatever nshard and WORLD_SIZE are
    for world in (1, 2, 3):
        for nshard in (1, 2, 5):
            done = []
            for r in range(world):
                done += resolve_shards(nshard, None, {"WORLD_SIZE": str(world), "RANK": str(r)})[1]
            assert sorted(done) == list(range(nshard))


def test_torchrun_env_parsing():
    assert torchrun_env({}) is None
    assert torchrun_env({"WORLD_SIZE": ""}) is None
    env = torchrun_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (env.rank, env.world, env.local_rank) == (3, 4, 1)
    assert torchrun_env({"WORLD_SIZE": "2"}).rank == 0
    with pytest.raises(ValueError, match=r"\$RANK must be in \[0, \$WORLD_SIZE=2\), got 2"):
        torchrun_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE='two' is not an integer"):
        torchrun_env({"WORLD_SIZE": "two"})


def test_shard_range_partitions_in_order():
    items = [f"u{i:02d}" for i in range(11)]
    for nshard in (1, 2, 3, 11, 13):
        blocks = [shard_items(items, nshard, r) for r in range(nshard)]
        assert sum(blocks, []) == items
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert shard_range(5, 2, 0) == (0, 2) and shard_range(5, 2, 1) == (2, 5)
    assert ids_sha1(["a", "b"]) != ids_sha1(["b", "a"])


def test_trainer_reads_the_same_environment(monkeypatch):
    from speechssl.train.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    d, device = init_distributed("cpu")
    assert (d.rank, d.world, d.enabled, device.type) == (0, 1, False, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"\$RANK must be in \[0, \$WORLD_SIZE=2\)"):
        init_distributed("cpu")


# ----------------------------------------------------------------------------------- the sharded verbs


def store_files(path):
    """Every file of a finished feature store, by name (headers included: they must agree byte for byte)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if not p.name.startswith(".")}


def label_files(path):
    return {name: (path / name).read_bytes() for name in ("text.km", "meta.json")}


def run_modes(monkeypatch, capsys, tmp, verb_args, nshard=2):
    """Run a sharded verb three ways into tmp/{all,ranks,torchrun}; return the printed line of each call."""
    lines = {}

    def call(mode, *extra):
        assert main([*verb_args(tmp / mode), *extra]) == 0
        lines.setdefault(mode, []).append(capsys.readouterr().out.strip().splitlines()[-1])

    call("all", "--nshard", str(nshard))
    for r in reversed(range(nshard)):  # separate jobs, finishing in any order
        call("ranks", "--nshard", str(nshard), "--rank", str(r))
    for r in range(nshard):  # torchrun workers: no --nshard, no --rank
        as_worker(monkeypatch, r, nshard)
        call("torchrun")
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name)
    return lines


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("sharding"))


def test_features_dump_same_store_every_way(tmp_path, data, monkeypatch, capsys):
    def dump(out):
        return ["features", "dump", "--data", str(data), "--out", str(out), "--kind", "fbank"]

    lines = run_modes(monkeypatch, capsys, tmp_path, dump)
    assert lines["all"] == [f"features: {tmp_path / 'all'} complete"]
    for mode in ("ranks", "torchrun"):
        first, last = lines[mode]
        assert "complete when the other shards finish" in first and last.endswith("complete")
    ref = store_files(tmp_path / "all")
    assert sorted(ref) == [f"shard.{r}.{ext}" for r in (0, 1) for ext in ("bin", "done", "index", "json")]
    for mode in ("ranks", "torchrun"):
        assert store_files(tmp_path / mode) == ref, mode
    # more shards than torchrun workers: each worker does its share, the store is the one dumped in one process
    for r in range(2):
        as_worker(monkeypatch, r, 2)
        assert main([*dump(tmp_path / "strided"), "--nshard", "3"]) == 0
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*dump(tmp_path / "one"), "--nshard", "3"]) == 0
    assert store_files(tmp_path / "strided") == store_files(tmp_path / "one")
    r = FeatureReader(tmp_path / "strided")
    assert r.meta["nshard"] == 3 and r.ids == FeatureReader(tmp_path / "all").ids
    np.testing.assert_array_equal(r[r.ids[-1]], FeatureReader(tmp_path / "all")[r.ids[-1]])


def test_kmeans_label_same_labels_every_way(tmp_path, data, monkeypatch, capsys):
    feats, km = tmp_path / "feats", tmp_path / "km"
    assert main(["features", "dump", "--data", str(data), "--out", str(feats), "--kind", "mfcc", "--nshard", "2"]) == 0
    assert main(["kmeans", "fit", "--feats", str(feats), "--k", "5", "--sample-frac", "1", "--niter", "5",
                 "--device", "cpu", "--out", str(km)]) == 0
    capsys.readouterr()

    def label(out):
        return ["kmeans", "label", "--feats", str(feats), "--km", str(km), "--out", str(out), "--device", "cpu"]

    lines = run_modes(monkeypatch, capsys, tmp_path, label)
    assert lines["all"] == [f"labels: wrote {tmp_path / 'all'}/text.km and meta.json"]  # --nshard alone merges
    for mode in ("ranks", "torchrun"):
        first, last = lines[mode]
        assert "merged when the last shard finishes" in first and last.startswith("labels: wrote")
    ref = label_files(tmp_path / "all")
    for mode in ("ranks", "torchrun"):
        assert label_files(tmp_path / mode) == ref, mode
        assert sorted(p.name for p in (tmp_path / mode / "shards").iterdir()) == [
            "0-of-2.json", "0-of-2.km", "1-of-2.json", "1-of-2.km"]
    labels, meta = read_labels(tmp_path / "all")
    assert meta["nshard"] == 2 and meta["num_utts"] == 5
    model, reader = KMeansModel.load(km), FeatureReader(feats)
    assert sorted(labels) == reader.ids
    for utt in reader.ids:
        np.testing.assert_array_equal(labels[utt], Assigner(model.centroids, device="cpu")(np.asarray(reader[utt])))

    # three shards over two torchrun workers: worker 0 labels shards 0 and 2, worker 1 shard 1 and merges
    as_worker(monkeypatch, 0, 2)
    assert main([*label(tmp_path / "strided"), "--nshard", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "strided" / "shards").glob("*.km")) == ["0-of-3.km", "2-of-3.km"]
    as_worker(monkeypatch, 1, 2)
    assert main([*label(tmp_path / "strided"), "--nshard", "3"]) == 0
    assert (tmp_path / "strided" / "text.km").read_bytes() == ref["text.km"]
    assert json.loads((tmp_path / "strided" / "meta.json").read_text())["nshard"] == 3

    # a rerun finds every shard done with the same model and labels nothing again; the merge is unchanged
    monkeypatch.delenv("WORLD_SIZE")
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "all" / "shards").iterdir()}
    assert main([*label(tmp_path / "all"), "--nshard", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    assert label_files(tmp_path / "all") == ref
