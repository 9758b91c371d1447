#!/usr/bin/env python
"""MFCC throughput: speechssl's batched Kaldi MFCC against the peers installable here, on the same audio.

Audio: ``--minutes`` of synthetic speech-like signal (harmonics through formant-like resonances, noise bursts)
in utterances of 2-15 s, held in memory (this measures feature computation, not I/O). Every extractor gets a
warm-up pass, then ``--repeat`` interleaved timed rounds (A B C ... A B C ...); the median round is reported as
seconds of audio per second (x real time), and ours/peer is the median over rounds of the peer's time / ours in
the same round.

Threads: every library gets the same thread count. First all at 1 thread (``torch.set_num_threads(1)`` for ours and
lhotse, threadpoolctl's ``threadpool_limits(1)`` for the BLAS/OpenMP pools numpy and scipy use in librosa), then all
at ``--threads`` (default 2) where the library can use threads; kaldi-native-fbank has no thread option, so it
appears in the 1-thread table only.

Peers: kaldi-native-fbank (OnlineMfcc, 13-d: it has no deltas), librosa (mfcc + feature.delta twice: 39-d),
lhotse's own torch Kaldi MFCC (``lhotse.features.kaldi.extractors.Mfcc`` per utterance and ``Wav2MFCC`` on
padded batches; 13-d: no deltas). All configured as Kaldi: 25/10 ms, 23 mel bins, 20 Hz-Nyquist, lifter 22,
no energy, snip_edges, dither 0 (librosa has no Kaldi framing options; its closest setting is used).

    python tools/bench/features.py [--minutes 10] [--threads 2] [--repeat 5] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
) -> list[tuple[list[float], list[float]]]:
    """(wall seconds, process CPU seconds) of every round, per extractor; rounds are interleaved (A B C A B C ...)
    so that a burst of load from other processes hits every extractor alike, and each extractor gets a warm-up pass
    first. CPU seconds (all threads) are reported too: on a shared, oversubscribed machine they move less than
    wall time."""
    for fn in fns:
        fn(wavs[:8])  # warm-up: caches, allocator, lazy imports
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            fn(wavs)
            walls[i].append(time.perf_counter() - w0)
            cpus[i].append(time.process_time() - c0)
    return list(zip(walls, cpus))


def set_threads(n: int):
    """``n`` threads for everyone: torch's intra-op pool (ours, lhotse) and, through threadpoolctl, the BLAS and
    OpenMP pools numpy/scipy use (librosa). Returns the limiter (``restore_original_limits()`` undoes it)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    return threadpool_limits(n)


# name, dims, function, whether the library can use more than one thread
ROWS = [
    ("speechssl batched", "39", lambda dev: ours_batched(True, dev), True),
    ("speechssl batched", "13", lambda dev: ours_batched(False, dev), True),
    ("speechssl per-utt", "39", lambda dev: ours_per_utt, True),
    ("kaldi-native-fbank", "13", lambda dev: knf_mfcc, False),  # C++, one thread, no thread option
    ("librosa", "39", lambda dev: librosa_mfcc, True),  # numpy/scipy: BLAS threads (mel matmul)
    ("lhotse Mfcc per-utt", "13", lambda dev: lhotse_per_utt, True),  # torch
    ("lhotse Wav2MFCC batched", "13", lambda dev: lhotse_batched, True),  # torch
]


def run_setting(threads: int, device: str, wavs: list[np.ndarray], repeat: int, skip: list[str]) -> None:
    """Every row that can run at ``threads`` threads, interleaved; prints the table."""
    audio_s = sum(len(w) for w in wavs) / SR
    limiter = set_threads(threads)
    rows = [(name, dim, make(device)) for name, dim, make, threaded in ROWS
            if name not in skip and (threads == 1 or threaded)]
    left_out = [name for name, _, _, threaded in ROWS if name not in skip and threads > 1 and not threaded]
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    times = time_interleaved([fn for _, _, fn in rows], wavs, repeat)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    limiter.restore_original_limits()
    ours = {dim: walls for (name, dim, _), (walls, _) in zip(rows, times) if name == "speechssl batched"}
    print(f"\n{threads} thread(s) for every library (torch.set_num_threads({threads}) + threadpoolctl "
          f"threadpool_limits({threads})); median of {repeat} interleaved rounds; load average {load0:.2f} -> "
          f"{load1:.2f}")
    print(f"{'extractor':<26}{'dims':>5}{'wall s':>9}{'x real time':>13}{'cpu s':>8}{'ours/peer':>11}")
    for (name, dim, _), (walls, cpus) in zip(rows, times):
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        ref = ours.get(dim) or ours.get("39")  # compare like with like: same dims, same round
        ratio = statistics.median(w / r for w, r in zip(walls, ref)) if ref else float("nan")
        print(f"{name:<26}{dim:>5}{wall:>9.3f}{audio_s / wall:>13.0f}{cpu:>8.3f}{ratio:>10.1f}x")
    for name in left_out:
        print(f"{name:<26}    (single-threaded library, no thread option: its row is the 1-thread one)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2,
                    help="the second setting: every library at this many threads (the first is 1 thread for all)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip", nargs="*", default=[], help="row names to skip")
    ap.add_argument("--quick", action="store_true", help="3 minutes of audio, 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.repeat = min(args.minutes, 3.0), min(args.repeat, 3)
    warnings.filterwarnings("ignore", message=".*snip_edges.*")  # lhotse warns about Kaldi's framing
    wavs = make_corpus(args.minutes)
    audio_s = sum(len(w) for w in wavs) / SR
    print(f"{len(wavs)} utterances, {audio_s / 60:.1f} min of audio, device {args.device}, "
          f"thread settings 1{f' and {args.threads}' if args.threads > 1 else ''}")
    for threads in sorted({1, max(1, args.threads)}):
        run_setting(threads, args.device, wavs, args.repeat, args.skip)
    print("\nours/peer = the peer's wall time / our batched wall time at the same dims in the same round, median over "
          "rounds (>1: ours faster). Same thread count for every library in a table.")


if __name__ == "__main__":
    main()
