"""Signal transforms that make espeak speech less clean, all vectorised numpy/scipy, all alignment-safe.

* `resample_speed`: espeak's 22,050 Hz to 16 kHz and speed perturbation in one soxr resampling. Kaldi/sox-style
  speed perturbation (tempo and pitch change together): a sample at time t ends up at t / factor, exactly.
* `reverberate`: convolution with a synthetic room impulse response (direct path at lag 0 followed by
  exponentially decaying noise with a random RT60); the output is cut to the input length, so alignments
  are unchanged.
* `coloured_noise` (white/pink/brown by spectral shaping), `babble` (a mix of other synthetic talkers) and
  `add_noise` at a given SNR;
* `band_limit`: telephone band-pass or random low-pass (zero-phase, no delay);
* `random_gain` / `to_int16`: level and 16-bit output without clipping.

Every function takes its randomness from a `numpy.random.Generator` and is deterministic given it.
"""

from __future__ import annotations

import numpy as np
import soxr
from scipy import signal

__all__ = [
    "resample_speed",
    "reverberate",
    "synthetic_rir",
    "coloured_noise",
    "babble",
    "add_noise",
    "band_limit",
    "peak_normalise",
    "to_int16",
]

SR = 16000


def resample_speed(audio: np.ndarray, in_rate: int, factor: float = 1.0, out_rate: int = SR) -> np.ndarray:
    """Resample ``audio`` from ``in_rate`` to ``out_rate`` and speed it up by ``factor`` (0.9 = slower).

    Equivalent to playing the input at ``in_rate * factor`` and sampling at ``out_rate``: input sample n maps
    to output position ``n * out_rate / (in_rate * factor)``. Returns float32 in the input's scale.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    x = audio.astype(np.float32, copy=False)
    return soxr.resample(x, in_rate * factor, out_rate, quality="HQ").astype(np.float32, copy=False)


def synthetic_rir(rng: np.random.Generator, rt60: float, drr_db: float, sr: int = SR) -> np.ndarray:
    """A room impulse response: unit direct path at lag 0, then a diffuse tail of exponentially decaying
    Gaussian noise (60 dB decay in ``rt60`` seconds) starting after 1-4 ms, scaled to a direct-to-reverberant
    energy ratio of ``drr_db``. A few sparse early reflections are added in the first 30 ms."""
    n = max(int(rt60 * sr), 16)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * 10.0 ** (-3.0 * t / rt60)
    onset = int(rng.uniform(0.001, 0.004) * sr)
    tail[:onset] = 0.0
    n_early = int(rng.integers(2, 6))
    pos = rng.integers(onset, max(onset + 1, int(0.03 * sr)), size=n_early)
    tail[pos] += rng.uniform(-1.0, 1.0, size=n_early) * 3.0 * np.abs(tail[pos]).max(initial=1e-3)
    energy = float(np.sum(tail**2)) + 1e-12
    tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / energy)
    tail[0] = 1.0  # direct path at lag 0: the alignment does not move
    return tail.astype(np.float32)


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with ``rir`` and keep the first ``len(x)`` samples (tail trimmed, no delay)."""
    return signal.oaconvolve(x, rir, mode="full")[: len(x)].astype(np.float32)


# IIR approximation of a 1/f (pink) spectrum, within +-0.5 dB over 10 Hz-20 kHz (Kellet / Smith's classic
# three-pole design); brown noise is white noise through a leaky integrator (1/f^2 above ~10 Hz).
_PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
_PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])
_BROWN_B = np.array([1.0])
_BROWN_A = np.array([1.0, -0.996])


def coloured_noise(rng: np.random.Generator, n: int, colour: str, sr: int = SR) -> np.ndarray:
    """Unit-variance noise with power spectrum ~ 1/f^alpha: white (0), pink (1), brown (2), by IIR filtering."""
    if colour not in ("white", "pink", "brown"):
        raise ValueError(f"coloured_noise: unknown colour {colour!r}")
    white = rng.standard_normal(n, dtype=np.float32)
    if colour == "white":
        return white
    b, a = (_PINK_B, _PINK_A) if colour == "pink" else (_BROWN_B, _BROWN_A)
    warm = min(n, sr // 2)  # run the filter in on extra samples so the start is stationary too
    pre = rng.standard_normal(warm, dtype=np.float32)
    out = signal.lfilter(b, a, np.concatenate([pre, white]))[warm:].astype(np.float32)
    return out / (out.std() + 1e-12)


def babble(rng: np.random.Generator, n: int, bank: list[np.ndarray]) -> np.ndarray:
    """``n`` samples of babble: a random excerpt (cyclically extended) from a clip of the babble ``bank``."""
    clip = bank[int(rng.integers(len(bank)))]
    start = int(rng.integers(len(clip)))
    idx = (start + np.arange(n)) % len(clip)
    out = clip[idx].astype(np.float32)
    return out / (out.std() + 1e-12)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float, ref_power: float | None = None) -> np.ndarray:
    """``x + g * noise`` with g such that power(speech) / power(g * noise) = ``snr_db``.

    ``ref_power``: the speech power to use (e.g. measured on the voiced part only); default: mean power of x.
    """
    p_s = float(np.mean(x.astype(np.float64) ** 2)) if ref_power is None else ref_power
    p_n = float(np.mean(noise.astype(np.float64) ** 2)) + 1e-20
    g = np.sqrt(p_s / (p_n * 10.0 ** (snr_db / 10.0)))
    return (x + g * noise).astype(np.float32)


def band_limit(x: np.ndarray, kind: str, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    """``"telephone"``: 300-3400 Hz band-pass; ``"lowpass"``: low-pass at a random 2.5-6 kHz. Zero phase."""
    if kind == "telephone":
        sos = signal.butter(4, [300.0, 3400.0], btype="bandpass", fs=sr, output="sos")
    elif kind == "lowpass":
        sos = signal.butter(6, float(rng.uniform(2500.0, 6000.0)), btype="lowpass", fs=sr, output="sos")
    else:
        raise ValueError(f"band_limit: unknown kind {kind!r}")
    return signal.sosfiltfilt(sos, x).astype(np.float32)


def peak_normalise(x: np.ndarray, peak: float) -> np.ndarray:
    """Scale so that max |x| == ``peak`` (silence stays silence)."""
    m = float(np.max(np.abs(x))) if len(x) else 0.0
    return x if m == 0.0 else (x * (peak / m)).astype(np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] -> int16 with rounding (values are clipped to the int16 range)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
