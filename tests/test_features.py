"""Kaldi-compatible MFCC / fbank against kaldi-native-fbank, deltas against independent formulas, batching."""

from __future__ import annotations

import math

import kaldi_native_fbank as knf  # the reference (dev extra): imported plainly, so a missing one fails, not skips
import numpy as np
import pytest
import torch

from speechssl.features.kaldi import FLOAT_EPS, INT16_LOG_OFFSET, add_deltas, apply_cmvn, fbank, mfcc, num_frames

SR = 16000


def speech_like(num_samples: int, seed: int) -> np.ndarray:
    """Voiced speech-ish signal in [-1, 1]: a harmonic source with a gliding f0 through formant-like resonances,
    syllable-rate amplitude modulation, unvoiced noise bursts, and a little background noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SR
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + rng.uniform(-20, 40)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = rng.uniform([500, 1200, 2400], [900, 2000, 3200])
    sig = np.zeros(num_samples)
    for h in range(1, 40):
        fh = h * f0
        gain = sum(1.0 / (1.0 + ((fh - fc) / 120.0) ** 2) for fc in formants) / h**0.5
        sig += gain * np.sin(h * phase) * (fh < SR / 2)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)) ** 2
    sig *= env
    noise = rng.standard_normal(num_samples)
    bursts = (np.sin(2 * np.pi * 2.3 * t + rng.uniform(0, 6)) > 0.8).astype(float)
    sig += 0.8 * noise * bursts + 0.01 * noise
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def knf_frame_opts(o):
    o.frame_opts.dither = 0.0
    o.frame_opts.snip_edges = True
    o.frame_opts.samp_freq = SR
    return o


def knf_mfcc(x: np.ndarray) -> np.ndarray:
    o = knf_frame_opts(knf.MfccOptions())
    o.use_energy = False
    o.num_ceps = 13
    o.mel_opts.num_bins = 23
    o.cepstral_lifter = 22.0
    m = knf.OnlineMfcc(o)
    m.accept_waveform(SR, x.tolist())
    m.input_finished()
    return np.stack([np.asarray(m.get_frame(i)) for i in range(m.num_frames_ready)])


def knf_fbank(x: np.ndarray, bins: int = 80) -> np.ndarray:
    o = knf_frame_opts(knf.FbankOptions())
    o.mel_opts.num_bins = bins
    o.use_energy = False
    f = knf.OnlineFbank(o)
    f.accept_waveform(SR, x.tolist())
    f.input_finished()
    return np.stack([np.asarray(f.get_frame(i)) for i in range(f.num_frames_ready)])


def assert_close_rel_std(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-3) -> None:
    """max |ours - ref| per dimension within tol x the reference's std in that dimension."""
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max(axis=0)
    std = ref.std(axis=0)
    assert (err <= tol * std).all(), f"worst dim {err.argmax()}: err {err.max():.3g}, ratio {(err / std).max():.3g}"


LENGTHS = [400, 16000, 16000 + 77, 37_123, 48_000 + 159]  # incl. exactly one frame and non-multiples of the shift


@pytest.mark.parametrize("n", LENGTHS)
def test_num_frames_matches_kaldi(n):
    x = speech_like(n, 1)
    assert num_frames(n) == knf_mfcc(x).shape[0] == 1 + (n - 400) // 160
    assert num_frames(399) == 0


@pytest.mark.parametrize("n", LENGTHS[1:])
def test_mfcc_matches_kaldi_native_fbank(n):
    x = speech_like(n, n)
    ref = knf_mfcc(x)
    ours = mfcc(torch.from_numpy(x), deltas=False).numpy()
    assert ours.dtype == np.float32
    assert_close_rel_std(ours, ref)


@pytest.mark.parametrize("n", LENGTHS[1:])
def test_fbank_matches_kaldi_native_fbank(n):
    x = speech_like(n, n + 1)
    assert_close_rel_std(fbank(torch.from_numpy(x)).numpy(), knf_fbank(x))


def test_int16_scale_is_a_constant_log_offset():
    """Kaldi reads int16 values; our default is float in [-1, 1]. The only difference is a log offset."""
    x = speech_like(20_000, 5)
    x16 = x * 32768.0
    ref_mfcc, ref_fb = knf_mfcc(x16), knf_fbank(x16)
    # Fed the same int16-scale samples, we match Kaldi directly.
    assert_close_rel_std(mfcc(torch.from_numpy(x16), deltas=False).numpy(), ref_mfcc)
    # Fed [-1, 1] floats: fbank shifts by 2 ln 32768 in every bin, MFCC only in C0 (by sqrt(23) x that),
    # except where an energy falls under the float-epsilon log floor at the smaller scale.
    floor = math.log(FLOAT_EPS)
    fb = fbank(torch.from_numpy(x)).numpy()
    above = ref_fb - INT16_LOG_OFFSET > floor + 1e-3
    assert above.mean() > 0.9
    err = np.abs(fb + INT16_LOG_OFFSET - ref_fb)
    assert (err[above] <= 1e-3 * ref_fb.std(0)[np.nonzero(above)[1]]).all()
    np.testing.assert_allclose(fb[~above], floor, atol=1e-3)
    m = mfcc(torch.from_numpy(x), deltas=False).numpy()
    m[:, 0] += math.sqrt(23) * INT16_LOG_OFFSET
    ok = knf_fbank(x16, bins=23) - INT16_LOG_OFFSET > floor + 1e-3
    frames = ok.all(axis=1)
    assert frames.mean() > 0.5
    assert (np.abs(m - ref_mfcc)[frames] <= 1e-3 * ref_mfcc.std(0)).all()


def kaldi_deltas_numpy(x: np.ndarray, order: int = 2, window: int = 2) -> np.ndarray:
    """Independent transcription of Kaldi's DeltaFeatures (feat/feature-functions.cc)."""
    scales = [np.array([1.0])]
    denom = 2 * sum(j * j for j in range(1, window + 1))
    for i in range(1, order + 1):
        prev = scales[i - 1]
        prev_off = (len(prev) - 1) // 2
        cur_off = prev_off + window
        cur = np.zeros(len(prev) + 2 * window)
        for j in range(-window, window + 1):
            for k in range(-prev_off, prev_off + 1):
                cur[j + k + cur_off] += j * prev[k + prev_off] / denom
        scales.append(cur)
    T, D = x.shape
    out = np.zeros((T, D * (order + 1)))
    for i in range(order + 1):
        s = scales[i]
        off = (len(s) - 1) // 2
        for t in range(T):
            for j in range(-off, off + 1):
                out[t, i * D : (i + 1) * D] += s[j + off] * x[min(max(t + j, 0), T - 1)]
    return out


def fairseq_deltas_numpy(x: np.ndarray) -> np.ndarray:
    """torchaudio.functional.compute_deltas (win 5, replicate padding) applied twice, in numpy."""

    def d(y):
        p = np.pad(y, ((2, 2), (0, 0)), mode="edge")
        return sum(n * (p[2 + n : 2 + n + len(y)] - p[2 - n : 2 - n + len(y)]) for n in (1, 2)) / 10.0

    d1 = d(x)
    return np.concatenate([x, d1, d(d1)], axis=1)


def test_deltas_against_independent_formulas():
    import librosa

    rng = np.random.default_rng(3)
    x = rng.standard_normal((57, 13)).astype(np.float64)
    xt = torch.from_numpy(x).float()
    kal = add_deltas(xt, mode="kaldi").double().numpy()
    fsq = add_deltas(xt, mode="fairseq").double().numpy()
    np.testing.assert_allclose(kal, kaldi_deltas_numpy(x), atol=1e-5)
    np.testing.assert_allclose(fsq, fairseq_deltas_numpy(x), atol=1e-5)
    # first-order deltas: librosa's Savitzky-Golay (width 5, mode nearest) is the same regression filter
    lib = librosa.feature.delta(x.T, width=5, order=1, mode="nearest", axis=-1).T
    np.testing.assert_allclose(kal[:, 13:26], lib, atol=1e-5)
    # the two conventions differ only in the 2nd-order deltas of the first/last 2 frames
    np.testing.assert_allclose(kal[2:-2], fsq[2:-2], atol=1e-5)
    assert np.abs(kal[:2, 26:] - fsq[:2, 26:]).max() > 1e-3


def test_mfcc_39_is_statics_plus_deltas():
    x = torch.from_numpy(speech_like(24_000, 9))
    full = mfcc(x)
    assert full.shape == (num_frames(24_000), 39)
    static = mfcc(x, deltas=False)
    np.testing.assert_allclose(full.numpy(), fairseq_deltas_numpy(static.double().numpy()), atol=1e-4)


def test_batched_padded_equals_unbatched():
    lens = [16_000 + 77, 9_000, 31_999, 399, 400]
    wavs = [torch.from_numpy(speech_like(n, i)) for i, n in enumerate(lens)]
    batch = torch.zeros(len(lens), max(lens))
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = w
        batch[i, len(w) :] = 0.5  # junk padding must not leak
    lengths = torch.tensor(lens)
    for fn, kw in [(mfcc, {}), (mfcc, {"cmvn": "meanvar"}), (mfcc, {"delta_mode": "kaldi"}), (fbank, {"cmvn": True})]:
        out = fn(batch, lengths=lengths, **kw)
        assert out.shape[:2] == (len(lens), num_frames(max(lens)))
        for i, w in enumerate(wavs):
            single = fn(w, **kw)
            t = num_frames(len(w))
            assert single.shape[0] == t
            torch.testing.assert_close(out[i, :t], single, rtol=0, atol=2e-4)
            assert (out[i, t:] == 0).all()


def test_cmvn_against_numpy():
    x = torch.from_numpy(speech_like(20_000, 4))
    st = mfcc(x, deltas=False).double().numpy()
    mean_only = mfcc(x, deltas=False, cmvn=True).double().numpy()
    np.testing.assert_allclose(mean_only, st - st.mean(0), atol=1e-4)
    mv = mfcc(x, deltas=False, cmvn="meanvar").double().numpy()
    np.testing.assert_allclose(mv, (st - st.mean(0)) / st.std(0), atol=1e-4)
    # CMVN comes before the deltas (Kaldi's apply-cmvn | add-deltas): deltas of normalised statics
    full = mfcc(x, cmvn="meanvar").double().numpy()
    np.testing.assert_allclose(full, fairseq_deltas_numpy(mv), atol=1e-4)
    with pytest.raises(ValueError, match="cmvn"):
        mfcc(x, cmvn="bogus")
    torch.testing.assert_close(apply_cmvn(torch.ones(0, 3)), torch.ones(0, 3))


def test_short_and_bad_inputs():
    assert mfcc(torch.zeros(399)).shape == (0, 39)
    assert fbank(torch.zeros(2, 100)).shape == (2, 0, 80)
    with pytest.raises(ValueError, match="floating point"):
        mfcc(torch.zeros(1000, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"\[S\] or \[B, S\]"):
        mfcc(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="lengths"):
        mfcc(torch.zeros(2, 1000), lengths=torch.tensor([1000, 1001]))


def test_dither_option():
    x = torch.from_numpy(speech_like(8000, 2))
    assert torch.equal(mfcc(x), mfcc(x))  # deterministic by default
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = mfcc(x, dither=1e-3, generator=g1), mfcc(x, dither=1e-3, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, mfcc(x))


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py): the only skip a CPU run has
def test_gpu_matches_cpu():
    x = torch.from_numpy(np.stack([speech_like(32_000, 7), speech_like(32_000, 8)]))
    torch.testing.assert_close(mfcc(x.cuda()).cpu(), mfcc(x), rtol=0, atol=1e-3)
    torch.testing.assert_close(fbank(x.cuda()).cpu(), fbank(x), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# dumping a data dir into a feature store


def make_data_dir(root, durations=(1.3, 0.7, 2.05, 1.0, 0.9), segments=False):
    """A tiny Kaldi data dir of speech-like WAVs (optionally as segments of one recording)."""
    from speechssl.audio import save_audio
    from speechssl.data.kaldi import DataDir, write_data_dir

    wav_dir = root / "wav"
    wav_dir.mkdir(parents=True)
    utts = [f"spk{i % 2}-utt{i:02d}" for i in range(len(durations))]
    if segments:
        total = speech_like(int(SR * (sum(durations) + 0.1)), 99)
        save_audio(wav_dir / "rec.wav", total)
        segs, t = {}, 0.0
        for u, d in zip(utts, durations):
            segs[u] = ("rec", round(t, 2), round(t + d, 2))
            t += d
        dd = DataDir(wav_scp={"rec": str(wav_dir / "rec.wav")}, utt2spk={u: u.split("-")[0] for u in utts}, segments=segs)
    else:
        scp = {}
        for i, (u, d) in enumerate(zip(utts, durations)):
            save_audio(wav_dir / f"{u}.wav", speech_like(int(SR * d), i))
            scp[u] = str(wav_dir / f"{u}.wav")
        dd = DataDir(wav_scp=scp, utt2spk={u: u.split("-")[0] for u in utts})
    write_data_dir(dd, root / "data")
    return root / "data"


def reference_feats(data_dir, kind="mfcc", **kw):
    from speechssl.data.kaldi import load_utterance, read_data_dir

    fn = mfcc if kind == "mfcc" else fbank
    dd = read_data_dir(data_dir)
    return {u.utt_id: fn(torch.from_numpy(load_utterance(u)), **kw).numpy() for u in dd.utterances()}


@pytest.mark.parametrize("segments", [False, True])
def test_dump_matches_unbatched_and_reruns_only_missing(tmp_path, segments):
    from speechssl.features.dump import dump_features
    from speechssl.features.store import FeatureReader, FeatureStoreError

    data = make_data_dir(tmp_path, segments=segments)
    out = tmp_path / "feats"
    dump_features(data, out, kind="mfcc", nshard=3, batch_seconds=2.0)  # small batches: several per shard
    r = FeatureReader(out)
    ref = reference_feats(data)
    assert r.ids == sorted(ref) and r.dim == 39 and r.meta["frame_rate"] == 100.0
    for u, want in ref.items():
        np.testing.assert_allclose(r[u], want, rtol=0, atol=2e-4)
    assert [len(ids) for ids, _, _ in r.shard_arrays()] == [1, 2, 2]  # contiguous ranges of the sorted list

    # rerun: finished shards with the same header are skipped (files untouched)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    dump_features(data, out, kind="mfcc", nshard=3)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    # an interrupted shard (no .done) is redone, the others are left alone
    (out / "shard.1.done").unlink()
    dump_features(data, out, kind="mfcc", nshard=3)
    assert (out / "shard.0.bin").stat().st_mtime_ns == stamp["shard.0.bin"]
    assert (out / "shard.1.bin").stat().st_mtime_ns != stamp["shard.1.bin"]
    np.testing.assert_array_equal(FeatureReader(out)[r.ids[2]], r[r.ids[2]])
    # other options on a finished store: refused, with the way out named
    with pytest.raises(FeatureStoreError, match="different header.*cmvn.*--overwrite"):
        dump_features(data, out, kind="mfcc", nshard=3, cmvn=True)
    dump_features(data, out, kind="mfcc", nshard=3, cmvn=True, overwrite=True)
    r2 = FeatureReader(out)
    assert r2.meta["source"]["options"]["cmvn"] == "mean"
    u = r2.ids[0]
    np.testing.assert_allclose(r2[u], reference_feats(data, cmvn=True)[u], rtol=0, atol=2e-4)


@pytest.mark.parametrize("kind,mode", [("mfcc", "spk-meanvar"), ("fbank", "spk-mean")])
def test_dump_speaker_cmvn_against_numpy_whatever_the_sharding(tmp_path, kind, mode):
    """Per-speaker CMVN (Kaldi's compute-cmvn-stats --spk2utt | apply-cmvn [| add-deltas]): each utterance is
    normalised by the statistics of all frames of its speaker, including utterances in other shards."""
    from speechssl.features.dump import dump_features
    from speechssl.features.store import FeatureReader, FeatureStoreError

    data = make_data_dir(tmp_path)  # spk0: 3 utterances, spk1: 2
    statics = reference_feats(data, kind, **({"deltas": False} if kind == "mfcc" else {}))
    want = {}
    for spk in ("spk0", "spk1"):
        utts = [u for u in statics if u.startswith(spk + "-")]
        frames = np.concatenate([statics[u] for u in utts]).astype(np.float64)
        mean, std = frames.mean(0), frames.std(0)
        for u in utts:
            y = statics[u] - mean
            y = y / std if mode == "spk-meanvar" else y
            want[u] = fairseq_deltas_numpy(y) if kind == "mfcc" else y
    for nshard in (1, 4):  # 4: spk0's utterances lie in two shards
        out = tmp_path / f"feats{nshard}"
        dump_features(data, out, kind=kind, nshard=nshard, cmvn=mode)
        r = FeatureReader(out)
        assert r.meta["source"]["options"]["cmvn"] == mode and r.dim == (39 if kind == "mfcc" else 80)
        for u, w in want.items():
            np.testing.assert_allclose(r[u], w, rtol=0, atol=5e-4)
    # a speaker's statistics differ from the utterance's own: per-utterance CMVN gives other numbers
    own = reference_feats(data, kind, cmvn="meanvar" if mode == "spk-meanvar" else "mean")
    assert max(np.abs(own[u] - want[u]).max() for u in want) > 0.05
    # the speakers are in the header: after utt2spk changes, the finished store is refused, not reused
    utts = sorted(want)
    (data / "utt2spk").write_text("".join(f"{u} spk\n" for u in utts))
    (data / "spk2utt").write_text("spk " + " ".join(utts) + "\n")
    with pytest.raises(FeatureStoreError, match="different header.*utt2spk_sha1"):
        dump_features(data, tmp_path / "feats1", kind=kind, nshard=1, cmvn=mode)


def test_dump_by_rank_and_torchrun_env(tmp_path, monkeypatch):
    from speechssl.features.dump import dump_features, resolve_shards
    from speechssl.features.store import FeatureReader, FeatureStoreError

    data = make_data_dir(tmp_path)
    out = tmp_path / "fb"
    dump_features(data, out, kind="fbank", nshard=2, rank=1)
    assert sorted(p.name for p in out.glob("*.done")) == ["shard.1.done"]
    with pytest.raises(FeatureStoreError, match=r"shard\(s\) \[0\] of 2"):
        FeatureReader(out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert resolve_shards(None, None) == (2, [0])
    assert resolve_shards(4, None) == (4, [0, 2])  # torchrun workers split the shards: RANK, RANK + WORLD_SIZE
    dump_features(data, out, kind="fbank", nshard=None)
    r = FeatureReader(out)
    ref = reference_feats(data, kind="fbank")
    assert r.dim == 80 and set(r.ids) == set(ref)
    for u in r.ids:
        np.testing.assert_allclose(r[u], ref[u], rtol=0, atol=2e-4)
    # the data dir changed since the dump: the utterance-list fingerprint no longer matches
    from speechssl.data.kaldi import read_data_dir, write_data_dir

    dd = read_data_dir(data)
    write_data_dir(dd.subset(dd.utt_ids()[:3]), tmp_path / "data3")
    with pytest.raises(FeatureStoreError, match="utts_sha1"):
        dump_features(tmp_path / "data3", out, kind="fbank", nshard=2)


def test_dump_with_generic_function(tmp_path):
    from speechssl.data.kaldi import load_utterance, read_data_dir
    from speechssl.features.dump import dump_with
    from speechssl.features.store import FeatureReader

    data = make_data_dir(tmp_path)

    def frames_50hz(wav: np.ndarray) -> np.ndarray:  # a stand-in for a model layer: 50 Hz, 4-d
        n = len(wav) // 320
        return wav[: n * 320].reshape(n, 320)[:, :4] * 10

    meta = {"kind": "toy_l3", "frame_rate": 50.0, "dtype": "float16", "source": {"checkpoint_sha1": "abc", "layer": 3}}
    dump_with(data, tmp_path / "hid", frames_50hz, meta, nshard=2)
    r = FeatureReader(tmp_path / "hid")
    assert r.meta["kind"] == "toy_l3" and r.dim == 4 and r.meta["source"]["layer"] == 3
    for u in read_data_dir(data).utterances():
        np.testing.assert_array_equal(r[u.utt_id], frames_50hz(load_utterance(u)).astype(np.float16))
    dump_with(data, tmp_path / "hid", frames_50hz, meta, nshard=2)  # rerun: skipped, no error


def test_dump_errors_name_the_utterance_and_leave_no_shard(tmp_path):
    from speechssl.features.dump import dump_features

    data = make_data_dir(tmp_path, durations=(1.0, 0.02, 1.0))
    for cmvn, out in ((False, "f"), ("spk-meanvar", "f_spk")):  # spk1's only utterance: no frames for its statistics
        with pytest.raises(ValueError, match=r"utt spk1-utt01 .*shorter than one 25 ms frame"):
            dump_features(data, tmp_path / out, nshard=1, cmvn=cmvn)
        assert not list((tmp_path / out).glob("*.done")) and not list((tmp_path / out).glob("*.tmp*"))
    with pytest.raises(ValueError, match="unknown feature kind"):
        dump_features(data, tmp_path / "g", kind="plp")


def test_cli_dump_and_info(tmp_path, capsys):
    from speechssl.cli import main

    data = make_data_dir(tmp_path)
    out = tmp_path / "feats"
    assert main(["features", "dump", "--data", str(data), "--out", str(out), "--nshard", "2", "--cmvn", "meanvar"]) == 0
    assert main(["features", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert '"kind": "mfcc"' in text and "5 utterances" in text and "dim 39" in text and "2 shard(s)" in text
    assert main(["features", "info", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
