"""Kaldi-compatible MFCC / fbank against kaldi-native-fbank, deltas against independent formulas, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speechssl.features.kaldi import FLOAT_EPS, INT16_LOG_OFFSET, add_deltas, apply_cmvn, fbank, mfcc, num_frames

knf = pytest.importorskip("kaldi_native_fbank")

torch.set_num_threads(1)
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
    librosa = pytest.importorskip("librosa")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    x = torch.from_numpy(np.stack([speech_like(32_000, 7), speech_like(32_000, 8)]))
    torch.testing.assert_close(mfcc(x.cuda()).cpu(), mfcc(x), rtol=0, atol=1e-3)
    torch.testing.assert_close(fbank(x.cuda()).cpu(), fbank(x), rtol=0, atol=1e-3)
