#!/usr/bin/env python
"""Pretraining data loader throughput: audio seconds per second that ONE loader worker delivers, against plain
``soundfile`` decoding of the same files in the same run, for FLAC and for 16-bit WAV.

Corpus (made once under ``--workdir``, reused when its parameters match): ``--utts`` synthetic speech-like
utterances of 2-15 s at 16 kHz (harmonics through formant-like resonances, syllable envelope, noise bursts),
written as FLAC and as WAV, two Kaldi data dirs (``wav.scp``, ``utt2spk``, ``spk2utt``) with lhotse manifests
(``speechssl.data.lhotse_io.data_dir_to_lhotse``), and one k-means-style label dir (``text.km`` + ``meta.json``
written by ``speechssl.units.labels.write_labels``: k=100 units at 100 Hz with Kaldi MFCC framing, as HuBERT's
first iteration; the dataset strides them onto the 50 Hz frames of HuBERT Base's CNN).

What is timed is the trainer's own loader, built by ``speechssl.train.data.build_pretrain_data`` from a
``PretrainConfig`` (default data settings: ``max_duration`` 87.5 s, crop to the batch's shortest utterance on
the frame grid, at most ``crop_max`` 15.625 s): ``ResumableBatchSampler`` (lhotse dynamic bucketing over the lazy
``cuts.jsonl.gz``) -> ``PretrainDataset`` (``load_audio`` of the crop, label check, stride and crop, padding into
the batch tensors) -> the ``DataLoader`` the trainer iterates. Two ways:

* ``worker``: ``data.num_workers=1``, what the issue asks (one worker process; includes handing each batch to the
  main process: laid out in one of the worker's recycled shared-memory blocks, copied out by the main process as it
  unpickles it). Timed from the first batch's arrival to the end of the epoch,
  counting the audio of the later batches, so the per-epoch fork of the worker (amortised over a real epoch of
  hours, not over this small corpus) is left out. The worker's CPU seconds over the same span are read from
  ``/proc/PID/stat`` (10 ms ticks); the sampler runs in the main process, as in the trainer. A worker hands over
  the int16 samples of 16-bit PCM crops (``speechssl.train.data.batch_wavs``), which the trainer scales to float32
  where it consumes them: on a GPU after the copy, but on a CPU-only trainer in the training process, so that
  conversion (``batch_wavs(batch)`` on the CPU) is inside the timed loop here, after each batch arrives.
* ``main``: ``data.num_workers=0``, the same dataset in the main process: the whole epoch including the sampler's
  start, no inter-process transfer; the cleanest per-core figure, and what ``--profile`` profiles (its batches
  are float32 already: ``batch_wavs`` passes them through, and is called here too).

Peer: ``soundfile.read(path, dtype="float32")`` of every file of the corpus in sequence, in the main process.
Audio per second: seconds of audio *delivered* in batches (``batch["audio_seconds"]``, after cropping) for the
loader, seconds of whole files for the peer. Every case gets a warm-up pass (which also fills the page cache);
then ``--repeat`` rounds interleave all cases (A B C D A B C D ...) so that a burst of load from other processes
hits each alike, and the best round of each is reported (by wall time, and separately by CPU time). Torch uses one
thread (what a loader worker gets). Also printed: how many worker batches came as int16, and what handing a batch's
items to a worker costs (pickle + unpickle of the sampler's ``Utt`` tuples, and of the lhotse cuts sent before).

    python tools/bench/loader.py [--utts 1000] [--repeat 3] [--workdir /tmp/speechssl_loader_bench]
    python tools/bench/loader.py --utts 100 data.num_buckets=3       # quick look; PretrainConfig overrides last
    python tools/bench/loader.py --profile flac      # + cProfile of one main-process epoch
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SR = 16000
K = 100
MFCC_FRAMING = {"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": True}
FORMATS = ("flac", "wav")


# ------------------------------------------------------------------------------------------------ corpus
def speech_like(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """``tools/bench/features.py``'s speech-like generator with 15 harmonics (an hour is made in seconds)."""
    from features import speech_like as features_speech_like  # tools/bench/ is the script's directory

    return features_speech_like(num_samples, rng, harmonics=15)


def make_corpus(root: Path, n_utts: int, seed: int = 0) -> dict:
    """FLAC + WAV files, one Kaldi data dir (+ lhotse manifests) per format, one label dir. Reused if complete."""
    from speechssl.data.lhotse_io import data_dir_to_lhotse
    from speechssl.units.labels import write_labels

    params = {"utts": n_utts, "seed": seed, "version": 1}
    done = root / "corpus.json"
    if done.is_file() and json.loads(done.read_text()).get("params") == params:
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    utts = sorted(f"spk{i % 20:02d}-utt{i:05d}" for i in range(n_utts))  # LC_ALL=C order
    labels, seconds = {}, 0.0
    for fmt in FORMATS:
        (root / "audio" / fmt).mkdir(parents=True, exist_ok=True)
        (root / "data" / fmt).mkdir(parents=True, exist_ok=True)
    for utt in utts:
        n = int(rng.uniform(2.05, 15.0) * SR)
        wav = speech_like(n, rng)
        pcm = np.clip(np.round(wav * 32768.0), -32768, 32767).astype(np.int16)
        sf.write(root / "audio" / "flac" / f"{utt}.flac", pcm, SR, subtype="PCM_16", format="FLAC")
        sf.write(root / "audio" / "wav" / f"{utt}.wav", pcm, SR, subtype="PCM_16", format="WAV")
        labels[utt] = rng.integers(0, K, 1 + (n - 400) // 160)
        seconds += n / SR
    for fmt in FORMATS:
        data = root / "data" / fmt
        (data / "wav.scp").write_text("".join(f"{u} {root / 'audio' / fmt / f'{u}.{fmt}'}\n" for u in utts))
        (data / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in utts))
        spk2utt: dict[str, list[str]] = {}
        for u in utts:
            spk2utt.setdefault(u.split("-")[0], []).append(u)
        (data / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))
        data_dir_to_lhotse(data, data, progress=False)
    write_labels(root / "labels", labels, {"label_rate": 100.0, "k": K, "framing": MFCC_FRAMING})
    info = {"params": params, "seconds": seconds, "utts": n_utts,
            "bytes": {f: sum(p.stat().st_size for p in (root / "audio" / f).iterdir()) for f in FORMATS}}
    done.write_text(json.dumps(info))
    print(f"made the corpus in {time.perf_counter() - t0:.1f} s")
    return info


# ------------------------------------------------------------------------------------------------ the loader
class BaseFraming:
    """What ``build_pretrain_data`` needs of an encoder: HuBERT Base's CNN frame grid (50 Hz, 320 samples) and
    its exact frame count (``ConvFeatureExtractor.num_frames``), without building the transformer."""

    def __init__(self) -> None:
        from speechssl.models.config import hubert_base
        from speechssl.models.frontend import ConvFeatureExtractor

        cfg = hubert_base()
        self.frontend = ConvFeatureExtractor(cfg)
        self.frame_rate = cfg.frame_rate
        self.downsample_rate = cfg.downsample_rate

    def num_frames(self, n):
        return self.frontend.num_frames(n)


def build_loader(root: Path, fmt: str, num_workers: int, encoder, exp: Path, extra: list[str]):
    from speechssl.config import load_config
    from speechssl.train.config import PretrainConfig
    from speechssl.train.data import build_pretrain_data
    from speechssl.train.distributed import Dist

    cfg = load_config(PretrainConfig, None, [
        f"exp_dir={exp}", f"data.train={root / 'data' / fmt}", f"data.train_labels=[{root / 'labels'}]",
        f"data.num_workers={num_workers}", "device=cpu", *extra,
    ])
    return build_pretrain_data(cfg, Dist(), encoder, exp, torch.device("cpu"))


class LoaderCase:
    """One epoch of the trainer's train loader per call: ``(audio s delivered, wall s, cpu s, batches)``; the CPU
    seconds are the worker's with ``workers=1``. Each batch's waveforms are taken as the trainer takes them,
    ``batch_wavs(batch)`` (float32 on the CPU: int16 ones are scaled here, in the timed loop)."""

    def __init__(self, data, workers: int, durations: dict[str, float]):
        from speechssl.train.data import batch_wavs

        self.data, self.workers, self.durations = data, workers, durations
        self.batch_wavs = batch_wavs
        self.int16_batches = 0  # of the last epoch's counted batches, how many came as int16
        self.main_cpu: list[float] = []  # workers: the training process's CPU s per audio s over each timed span
        self.epoch = 0
        self.utt_seconds = 0.0  # whole durations of the utterances the last epoch's counted batches were cut from

    def __call__(self):
        self.data.sampler.set_epoch(self.epoch)
        self.epoch += 1
        audio, utt_s, n, n16, pid, cpu0, cpu1 = 0.0, 0.0, 0, 0, None, None, None
        it = iter(self.data.train_loader)
        c0, w0 = time.process_time(), time.perf_counter()
        for batch in it:
            n += 1
            if self.workers:
                if n == 1:  # steady state: from the first batch's arrival (see the docstring)
                    c0, w0 = time.process_time(), time.perf_counter()
                    pid = it._workers[0].pid  # private, but /proc is the only view of the worker's CPU mid-epoch
                    cpu0 = _proc_cpu(pid)
                    continue
                cpu1 = _proc_cpu(pid) or cpu1  # the worker exits after its last batch: keep the last reading
            n16 += batch["wavs"].dtype == torch.int16
            wavs = self.batch_wavs(batch)  # what the trainer's _to_device does on a CPU
            assert wavs.dtype == torch.float32
            audio += batch["audio_seconds"]
            utt_s += sum(self.durations[u] for u in batch["ids"])
        wall, main_cpu = time.perf_counter() - w0, time.process_time() - c0
        self.utt_seconds = utt_s
        self.int16_batches = n16
        if n < 2:
            raise SystemExit(f"an epoch gave {n} batch(es): use more --utts or a smaller data.max_duration")
        if self.workers:
            cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else float("nan")
            self.main_cpu.append(main_cpu / audio)
        else:
            cpu = main_cpu
        return audio, wall, cpu, n


def handover_cost(data) -> str:
    """What sending one batch's items to a worker costs (pickle + unpickle, as the DataLoader's index queue does):
    the sampler's ``Utt`` tuples against the lhotse cuts they are built from (what was sent before)."""
    import pickle

    from speechssl.train.data import utt_of

    data.sampler.sampler.set_epoch(0)
    cuts = [list(c) for c in data.sampler.sampler]
    utts = [tuple(map(utt_of, c)) for c in cuts]
    n = sum(map(len, cuts))

    def cost(batches) -> tuple[float, float]:
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            for i, b in enumerate(batches):
                pickle.loads(pickle.dumps((0, i, b), protocol=pickle.HIGHEST_PROTOCOL))
            best = min(best, time.process_time() - t0)
        return best / n * 1e6, sum(len(pickle.dumps((0, i, b))) for i, b in enumerate(batches)) / len(batches)

    (tu, bu), (tc, bc) = cost(utts), cost(cuts)
    return (f"hand-over of the sampler's items to a worker (pickle + unpickle, CPU): {tu:.1f} us per utterance as Utt "
            f"tuples ({bu:.0f} B per batch), {tc:.1f} us as lhotse cuts ({bc:.0f} B)")


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a live process (clock ticks of /proc/PID/stat), None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SoundfileCase:
    """``soundfile.read`` of every file, in sequence: ``(audio s, wall s, cpu s, files)``."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self):
        samples = 0
        c0, w0 = time.process_time(), time.perf_counter()
        for p in self.paths:
            samples += len(sf.read(p, dtype="float32")[0])
        return samples / SR, time.perf_counter() - w0, time.process_time() - c0, len(self.paths)


# ------------------------------------------------------------------------------------------------ machine
def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    amx = " ".join(f for f in flags if f.startswith("amx")) or "no AMX"
    return (f"{platform.node()}: {model}, {os.cpu_count()} CPUs ({amx}); python {platform.python_version()}, "
            f"torch {torch.__version__}, soundfile {sf.__version__} (libsndfile {sf.__libsndfile_version__})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utts", type=int, default=1000,
                    help="utterances of 2-15 s (1000: ~2.4 h per format, enough to fill the default 30 buckets)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved timed rounds; the best is reported")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "speechssl_loader_bench")
    ap.add_argument("--modes", nargs="+", default=["worker", "main"], choices=["worker", "main"])
    ap.add_argument("--rates", type=float, nargs="+", default=[1000, 3000, 6000],
                    help="training rates (audio s per s per GPU) to size the workers for")
    ap.add_argument("--profile", choices=FORMATS, help="cProfile one main-process epoch of this format")
    ap.add_argument("overrides", nargs="*", help="PretrainConfig overrides, e.g. data.max_duration=200")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.WARNING)

    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    info = make_corpus(root, args.utts)
    print(machine())
    print(f"corpus: {info['utts']} utterances, {info['seconds'] / 3600:.2f} h per format; "
          + ", ".join(f"{f} {info['bytes'][f] / 2**20:.0f} MiB" for f in FORMATS)
          + f"; loader settings: DataConfig defaults{' + ' + ' '.join(args.overrides) if args.overrides else ''}")
    from speechssl.train.data import load_cuts

    encoder = BaseFraming()
    exp = root / "exp"
    cases: list[tuple[str, str, object]] = []
    durations = {c.id: c.duration for c in load_cuts(root / "data" / "wav")}
    for fmt in FORMATS:
        for mode in args.modes:
            data = build_loader(root, fmt, 1 if mode == "worker" else 0, encoder, exp, args.overrides)
            cases.append((fmt, f"loader, {mode}", LoaderCase(data, 1 if mode == "worker" else 0, durations)))
        paths = sorted(str(p) for p in (root / "audio" / fmt).iterdir())
        cases.append((fmt, "soundfile.read", SoundfileCase(paths)))

    if args.profile:
        data = build_loader(root, args.profile, 0, encoder, exp, args.overrides)
        case = LoaderCase(data, 0, durations)
        case()  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        audio, wall, _, _ = case()
        prof.disable()
        print(f"\ncProfile, {args.profile}, main process: {audio:.0f} s of audio in {wall:.2f} s (profiled)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    for _, _, fn in cases:
        fn()  # warm-up: page cache, lazy imports, lhotse's bucket estimate
    rounds: list[list[tuple]] = [[] for _ in cases]
    for _ in range(args.repeat):
        for i, (_, _, fn) in enumerate(cases):
            rounds[i].append(fn())
    load = os.getloadavg()[0]

    print(f"\n{args.repeat} interleaved rounds after a warm-up; best round of each (wall and CPU separately); "
          f"load average at the end {load:.2f}")
    print(f"{'format':<7}{'case':<18}{'audio s':>8}{'wall s':>8}{'audio s/s':>10}{'vs sf':>7}"
          f"{'cpu s':>8}{'audio s/cpu s':>14}{'vs sf':>7}   all rounds (audio s/s)")
    wall_rate: dict[tuple[str, str], float] = {}
    cpu_rate: dict[tuple[str, str], float] = {}
    for (fmt, name, _), rs in zip(cases, rounds):
        wall_rate[fmt, name] = max(r[0] / r[1] for r in rs)
        cpu_rate[fmt, name] = max(r[0] / r[2] for r in rs)
    for (fmt, name, _), rs in zip(cases, rounds):
        a, w, _, _ = max(rs, key=lambda r: r[0] / r[1])
        _, _, c, _ = max(rs, key=lambda r: r[0] / r[2])
        rw = wall_rate[fmt, name] / wall_rate[fmt, "soundfile.read"]
        rc = cpu_rate[fmt, name] / cpu_rate[fmt, "soundfile.read"]
        allr = " ".join(f"{r[0] / r[1]:.0f}" for r in rs)
        print(f"{fmt:<7}{name:<18}{a:>8.0f}{w:>8.3f}{wall_rate[fmt, name]:>10.0f}{rw:>6.2f}x"
              f"{c:>8.3f}{cpu_rate[fmt, name]:>14.0f}{rc:>6.2f}x   {allr}")
    crop = [(fn.utt_seconds, r[-1][0]) for (_, _, fn), r in zip(cases, rounds) if isinstance(fn, LoaderCase)]
    print("\naudio s: loader = seconds of audio delivered in batches (cropped to each batch's shortest utterance on "
          f"the frame grid: {100 * sum(a for _, a in crop) / sum(u for u, _ in crop):.1f}% of the utterances read; "
          "lhotse's drop_last leaves a few out), soundfile = whole files. vs sf = the loader's rate / soundfile's "
          "rate, same format, same run (issue 25 asks >= 0.75). worker: CPU of the worker process alone (/proc).")
    n16 = [f"{fmt} {fn.int16_batches}/{r[-1][3] - (fn.workers > 0)}" for (fmt, name, fn), r in zip(cases, rounds)
           if isinstance(fn, LoaderCase) and fn.workers]
    if n16:
        print("worker batches handed over as int16 (16-bit PCM; batch_wavs scales them to float32 in the timed loop): "
              + ", ".join(n16))
        main = [f"{fmt} {1e6 * min(fn.main_cpu):.1f} us" for fmt, name, fn in cases
                if isinstance(fn, LoaderCase) and fn.workers]
        print("worker mode, CPU of the training process per audio second (sampler, hand-over, batch_wavs; least of "
              "the rounds): " + ", ".join(main) + "; the worker's own: "
              + ", ".join(f"{fmt} {1e6 / cpu_rate[fmt, name]:.1f} us" for fmt, name, fn in cases
                          if isinstance(fn, LoaderCase) and fn.workers)
              + ". Where the two processes get a core each, the worker's CPU sets the wall rate; where they share one "
              "(a 2-core machine with other jobs running), the wall rate falls toward 1 / (sum of both).")
    print(handover_cost(next(fn for _, _, fn in cases if isinstance(fn, LoaderCase)).data))

    ref_mode = "worker" if "worker" in args.modes else "main"
    per_worker = {fmt: wall_rate[fmt, f"loader, {ref_mode}"] for fmt in FORMATS}
    print(f"\nloader workers one GPU needs: data.num_workers = ceil(training rate / one loader worker's audio s/s "
          f"({ref_mode}, wall)), plus cores for the training process itself")
    print(f"{'training rate (audio s/s)':<28}" + "".join(f"{f:>8}" for f in FORMATS))
    for rate in args.rates:
        print(f"{rate:<28,.0f}" + "".join(f"{math.ceil(rate / per_worker[f]):>8d}" for f in FORMATS))
    h100 = 989e12 * 0.40 / 45e9
    print(f"(HuBERT Base training ~45 GFLOP per audio second: an H100 at 40% of its 989 TFLOP/s dense bf16 peak "
          f"consumes ~{h100:,.0f} audio s/s -> {math.ceil(h100 / per_worker['flac'])} FLAC / "
          f"{math.ceil(h100 / per_worker['wav'])} WAV workers at these rates)")
    for fmt in FORMATS:
        name = f"loader, {ref_mode}"
        rw = wall_rate[fmt, name] / wall_rate[fmt, "soundfile.read"]
        rc = cpu_rate[fmt, name] / cpu_rate[fmt, "soundfile.read"]
        print(f"{fmt}: one loader worker ({ref_mode}) >= 0.75x soundfile: wall {rw:.2f}x "
              f"{'yes' if rw >= 0.75 else 'NO'}, CPU {rc:.2f}x {'yes' if rc >= 0.75 else 'NO'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
