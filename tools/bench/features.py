#!/usr/bin/env python
"""MFCC throughput: speechssl's batched Kaldi MFCC against the peers installable here, on the same audio.

Audio: ``--minutes`` of synthetic speech-like signal (harmonics through formant-like resonances, noise bursts)
in utterances of 2-15 s, held in memory (this measures feature computation, not I/O). Every extractor gets a
warm-up pass, then the best of ``--repeat`` interleaved timed passes is reported as seconds of audio per second (x real time).

Peers: kaldi-native-fbank (OnlineMfcc, 13-d: it has no deltas), librosa (mfcc + feature.delta twice: 39-d),
lhotse's own torch Kaldi MFCC (``lhotse.features.kaldi.extractors.Mfcc`` per utterance and ``Wav2MFCC`` on
padded batches; 13-d: no deltas). All configured as Kaldi: 25/10 ms, 23 mel bins, 20 Hz-Nyquist, lifter 22,
no energy, snip_edges, dither 0 (librosa has no Kaldi framing options; its closest setting is used).

    python tools/bench/features.py [--minutes 10] [--threads 2] [--repeat 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Callable

import numpy as np
import torch

SR = 16000


def speech_like(num_samples: int, rng: np.random.Generator, harmonics: int = 29) -> np.ndarray:
    """Harmonic source with a gliding f0 through three formant-like resonances, syllable-rate envelope, noise
    (``tools/bench/loader.py`` takes 15 harmonics, so that an hour is made in seconds)."""
    t = np.arange(num_samples) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + rng.uniform(-20, 40)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = rng.uniform([500, 1200, 2400], [900, 2000, 3200])
    sig = np.zeros(num_samples)
    for h in range(1, harmonics + 1):
        fh = h * f0
        gain = sum(1.0 / (1.0 + ((fh - fc) / 120.0) ** 2) for fc in formants) / h**0.5
        sig += gain * np.sin(h * phase) * (fh < SR / 2)
    sig *= 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)) ** 2
    noise = rng.standard_normal(num_samples)
    sig += 0.8 * noise * (np.sin(2 * np.pi * 2.3 * t) > 0.8) + 0.01 * noise
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def make_corpus(minutes: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    wavs, total = [], 0.0
    while total < minutes * 60:
        dur = float(rng.uniform(2.0, 15.0))
        wavs.append(speech_like(int(dur * SR), rng))
        total += dur
    return wavs


def ours_batched(deltas: bool, device: str) -> Callable[[list[np.ndarray]], None]:
    """The dump path: sort by length, pad into small batches (default_batch_seconds), MFCC with lengths, cut."""
    from speechssl.features.dump import batch_extractor

    fn = batch_extractor("mfcc", device=device, deltas=deltas)

    def run(wavs: list[np.ndarray]) -> None:
        with torch.inference_mode():
            fn(wavs)

    return run


def ours_per_utt(wavs: list[np.ndarray]) -> None:
    from speechssl.features.kaldi import mfcc

    with torch.inference_mode():
        for w in wavs:
            mfcc(torch.from_numpy(w))


def knf_mfcc(wavs: list[np.ndarray]) -> None:
    import kaldi_native_fbank as knf

    o = knf.MfccOptions()
    o.frame_opts.dither = 0.0
    o.frame_opts.snip_edges = True
    o.use_energy = False
    o.mel_opts.num_bins = 23
    for w in wavs:
        m = knf.OnlineMfcc(o)
        m.accept_waveform(SR, w)
        m.input_finished()
        np.stack([m.get_frame(i) for i in range(m.num_frames_ready)])


def librosa_mfcc(wavs: list[np.ndarray]) -> None:
    import librosa

    for w in wavs:
        c = librosa.feature.mfcc(y=w, sr=SR, n_mfcc=13, n_fft=512, win_length=400, hop_length=160, n_mels=23,
                                 fmin=20.0, center=False, lifter=22, window="hann")
        d1 = librosa.feature.delta(c, width=5, order=1, mode="nearest")
        d2 = librosa.feature.delta(d1, width=5, order=1, mode="nearest")
        np.concatenate([c, d1, d2]).T


def lhotse_per_utt(wavs: list[np.ndarray]) -> None:
    from lhotse.features.kaldi.extractors import Mfcc, MfccConfig

    ex = Mfcc(MfccConfig(snip_edges=True, high_freq=0.0, dither=0.0))
    for w in wavs:
        ex.extract(w, SR)


def lhotse_batched(wavs: list[np.ndarray]) -> None:
    """lhotse's Wav2MFCC module on padded batches (same batching as ours)."""
    from lhotse.features.kaldi.layers import Wav2MFCC

    mod = Wav2MFCC(sampling_rate=SR, snip_edges=True, high_freq=0.0, dither=0.0)
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    max_padded = 120 * SR  # lhotse's module is built for big padded batches
    start = 0
    with torch.inference_mode():
        while start < len(order):
            end = start + 1
            while end < len(order) and len(wavs[order[end]]) * (end + 1 - start) <= max_padded:
                end += 1
            idx = order[start:end]
            batch = torch.zeros(len(idx), len(wavs[idx[-1]]))
            for j, i in enumerate(idx):
                batch[j, : len(wavs[i])] = torch.from_numpy(wavs[i])
            mod(batch)
            start = end


def time_interleaved(
    fns: list[Callable[[list[np.ndarray]], None]], wavs: list[np.ndarray], repeat: int
) -> list[tuple[float, float]]:
    """Best-of-``repeat`` (wall, process CPU) seconds per extractor; repetitions are interleaved (A B C A B C ...)
    so that a burst of load from other processes hits every extractor alike. Each gets a warm-up pass first.
    CPU seconds (all threads) are reported too: on a shared, oversubscribed machine they move less than wall time."""
    for fn in fns:
        fn(wavs[:8])  # warm-up: caches, allocator, lazy imports
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            fn(wavs)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", nargs="*", default=[], help="row names to skip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*snip_edges.*")  # lhotse warns about Kaldi's framing
    wavs = make_corpus(args.minutes)
    audio_s = sum(len(w) for w in wavs) / SR
    print(f"{len(wavs)} utterances, {audio_s / 60:.1f} min of audio, torch threads {args.threads}, device {args.device}")

    rows = [
        ("speechssl batched", "39", ours_batched(True, args.device)),
        ("speechssl batched", "13", ours_batched(False, args.device)),
        ("speechssl per-utt", "39", ours_per_utt),
        ("kaldi-native-fbank", "13", knf_mfcc),
        ("librosa", "39", librosa_mfcc),
        ("lhotse Mfcc per-utt", "13", lhotse_per_utt),
        ("lhotse Wav2MFCC batched", "13", lhotse_batched),
    ]
    rows = [r for r in rows if r[0] not in args.skip]
    times = time_interleaved([fn for _, _, fn in rows], wavs, args.repeat)
    results = [(name, dim, wall, cpu) for (name, dim, _), (wall, cpu) in zip(rows, times)]
    ours39 = next(r[2] for r in results if r[0] == "speechssl batched" and r[1] == "39")
    ours13 = next((r[2] for r in results if r[0] == "speechssl batched" and r[1] == "13"), ours39)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.2f}")
    print(f"\n{'extractor':<26}{'dims':>5}{'wall s':>9}{'x real time':>13}{'cpu s':>8}{'ours/peer':>11}")
    for name, dim, wall, cpu in results:
        ref = ours39 if dim == "39" else ours13  # compare like with like
        print(f"{name:<26}{dim:>5}{wall:>9.3f}{audio_s / wall:>13.0f}{cpu:>8.3f}{wall / ref:>10.1f}x")
    print("\nours/peer = peer time / our batched time at the same dims (>1: ours faster).")


if __name__ == "__main__":
    main()
