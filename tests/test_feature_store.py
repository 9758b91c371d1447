"""Feature store: bit-exact round trip, atomic shards, and clear errors on inconsistent stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speechssl.features.store import FeatureReader, FeatureStoreError, FeatureWriter, shard_done

META = {"kind": "mfcc", "dim": 5, "frame_rate": 100.0, "source": {"opts": "test"}}


def _utts(seed: int, n: int, prefix: str, dim: int = 5, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}{i:03d}": rng.standard_normal((int(rng.integers(1, 50)), dim)).astype(dtype) for i in range(n)}


def _write(out, rank, nshard, utts, meta=META, **kw):
    with FeatureWriter(out, rank, nshard, meta, **kw) as w:
        for k, v in utts.items():
            w.add(k, v)
    return w


def test_round_trip_bit_exact_and_memmap(tmp_path):
    a, b = _utts(0, 7, "a"), _utts(1, 5, "b")
    _write(tmp_path, 0, 2, a)
    _write(tmp_path, 1, 2, b)
    r = FeatureReader(tmp_path)
    want = {**a, **b}
    assert r.ids == list(want)
    assert len(r) == 12 and "a003" in r and "zzz" not in r
    assert r.total_frames == sum(v.shape[0] for v in want.values())
    assert r.meta["kind"] == "mfcc" and r.meta["dim"] == 5 and r.meta["nshard"] == 2 and r.meta["dtype"] == "float32"
    assert r.meta["source"] == {"opts": "test"}
    for k, v in want.items():
        got = r[k]
        assert isinstance(got, np.memmap)
        assert got.dtype == np.float32 and got.shape == v.shape
        assert got.tobytes() == v.tobytes()
        assert r.num_frames(k) == v.shape[0]
    with pytest.raises(KeyError, match="zzz"):
        r["zzz"]
    # streaming pass sees the same frames
    seen = {}
    for ids, offsets, data in r.shard_arrays():
        assert offsets.shape == (len(ids) + 1,) and offsets[-1] == data.shape[0]
        for i, k in enumerate(ids):
            seen[k] = np.asarray(data[offsets[i] : offsets[i + 1]])
    assert all(np.array_equal(seen[k], want[k]) for k in want)


def test_float16_store_and_inferred_dim(tmp_path):
    u = _utts(2, 3, "x", dim=8)
    meta = {"kind": "hubert_l6", "frame_rate": 50, "dtype": "float16", "source": {"ckpt": "abc", "layer": 6}}
    _write(tmp_path, 0, 1, u, meta=meta)
    r = FeatureReader(tmp_path)
    assert r.dim == 8 and r.meta["dtype"] == "float16" and r.frame_rate == 50.0
    for k, v in u.items():
        assert r[k].dtype == np.float16
        np.testing.assert_array_equal(r[k], v.astype(np.float16))


def test_duplicate_id_across_shards_names_it(tmp_path):
    _write(tmp_path, 0, 2, {"u1": np.zeros((3, 5)), "dup": np.zeros((2, 5))})
    _write(tmp_path, 1, 2, {"dup": np.ones((2, 5))})
    with pytest.raises(FeatureStoreError, match=r"'dup'.*shard 0 and shard 1"):
        FeatureReader(tmp_path)


def test_duplicate_id_within_shard_rejected_on_add(tmp_path):
    with pytest.raises(FeatureStoreError, match="duplicate utterance id 'u'"):
        with FeatureWriter(tmp_path, 0, 1, META) as w:
            w.add("u", np.zeros((3, 5)))
            w.add("u", np.zeros((3, 5)))
    assert not shard_done(tmp_path, 0)
    assert not list(tmp_path.glob("*.tmp*")), "aborted writer must remove its temp files"


def test_unfinished_or_missing_shard_is_not_readable(tmp_path):
    _write(tmp_path, 0, 2, _utts(3, 2, "a"))
    with pytest.raises(FeatureStoreError, match=r"shard\(s\) \[1\] of 2 missing or unfinished"):
        FeatureReader(tmp_path)
    # a writer that never closes (crash) leaves only temp files: still unreadable
    w = FeatureWriter(tmp_path, 1, 2, META)
    w.add("b000", np.zeros((4, 5), np.float32))
    with pytest.raises(FeatureStoreError, match="missing or unfinished"):
        FeatureReader(tmp_path)
    w.close()
    assert len(FeatureReader(tmp_path)) == 3
    # removing the marker makes the shard unfinished again
    (tmp_path / "shard.1.done").unlink()
    with pytest.raises(FeatureStoreError, match="unfinished"):
        FeatureReader(tmp_path)


def test_exception_inside_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with FeatureWriter(tmp_path, 0, 1, META) as w:
            w.add("a", np.zeros((2, 5)))
            raise RuntimeError("boom")
    assert not shard_done(tmp_path, 0)
    assert not any(tmp_path.iterdir())


def test_finished_shard_is_immutable(tmp_path):
    u = _utts(4, 3, "a")
    _write(tmp_path, 0, 1, u)
    before = (tmp_path / "shard.0.bin").read_bytes()
    with pytest.raises(FeatureStoreError, match="finished and immutable.*overwrite"):
        FeatureWriter(tmp_path, 0, 1, META)
    assert (tmp_path / "shard.0.bin").read_bytes() == before
    w = _write(tmp_path, 0, 1, {"new": np.ones((2, 5))}, overwrite=True)
    with pytest.raises(FeatureStoreError, match="closed"):
        w.add("late", np.ones((1, 5)))
    r = FeatureReader(tmp_path)
    assert r.ids == ["new"]


def test_header_disagreement_between_shards(tmp_path):
    _write(tmp_path, 0, 2, _utts(5, 2, "a"))
    _write(tmp_path, 1, 2, _utts(6, 2, "b"), meta={**META, "source": {"opts": "other"}})
    with pytest.raises(FeatureStoreError, match="shard 1 disagrees.*source"):
        FeatureReader(tmp_path)


def test_stray_shard_from_larger_nshard(tmp_path):
    _write(tmp_path, 0, 1, _utts(7, 2, "a"))
    (tmp_path / "shard.3.done").write_text("")
    (tmp_path / "shard.3.json").write_text(json.dumps({**META, "dtype": "float32", "nshard": 1}))
    with pytest.raises(FeatureStoreError):
        FeatureReader(tmp_path)


def test_truncated_data_file(tmp_path):
    _write(tmp_path, 0, 1, _utts(8, 3, "a"))
    p = tmp_path / "shard.0.bin"
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(FeatureStoreError, match=r"shard\.0\.bin: size"):
        FeatureReader(tmp_path)


@pytest.mark.parametrize(
    "utt,arr,msg",
    [
        ("bad id", np.zeros((2, 5)), "invalid utterance id"),
        ("u", np.zeros((2, 4)), "dim 4 != store dim 5"),
        ("u", np.zeros(5), r"must be \[T, D\]"),
        ("u", np.array([[np.nan] * 5]), "NaN/inf"),
    ],
)
def test_bad_add(tmp_path, utt, arr, msg):
    with pytest.raises(FeatureStoreError, match=msg):
        with FeatureWriter(tmp_path, 0, 1, META) as w:
            w.add(utt, arr)
    assert not shard_done(tmp_path, 0)


def test_float16_overflow_rejected(tmp_path):
    with pytest.raises(FeatureStoreError, match="u1.*NaN/inf.*float16"):
        with FeatureWriter(tmp_path, 0, 1, {**META, "dtype": "float16"}) as w:
            w.add("u1", np.full((2, 5), 1e6))


def test_empty_shard_agrees_with_any_dim(tmp_path):
    _write(tmp_path, 0, 2, _utts(9, 2, "a"), meta={**META, "dim": None})
    _write(tmp_path, 1, 2, {}, meta={**META, "dim": None})
    r = FeatureReader(tmp_path)
    assert r.dim == 5 and len(r) == 2
