#!/usr/bin/env python
"""Benchmark: our k-means (k-means++ seeding + faiss Lloyd on a sample, faiss top-1 assignment) vs fairseq's recipe.

fairseq's HuBERT recipe (examples/hubert/simple_kmeans/):

* fit, ``learn_kmeans.py``: sklearn ``MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=10000, n_init=20,
  max_iter=100, max_no_improvement=100, tol=0.0, reassignment_ratio=0.0, compute_labels=False, init_size=None)``
  on a ``--sk-frac`` sample (10% in fairseq's README). Recipe against recipe, as each documents it: the quality of
  the result is compared (inertia), not the work done.
* label, ``dump_km_label.py``: its ``ApplyKmeans``, written out below (fairseq is not installable here): a numpy
  matmul ``dist = |x|^2 - 2 x C + |C|^2`` and ``argmin`` per utterance (the script labels one utterance per call).
  Both ways do the same arithmetic as ours (every frame against every centroid, same threads); timed twice: as
  documented, one call per utterance of ``--utt-frames`` frames (default 500: a 10 s utterance at HuBERT's 50 Hz;
  the headline), and on the blocks our ``Assigner`` takes (65,536 frames per call), which shows what block size
  does to it.

Both run on the same frames with the same threads (``--threads`` for torch, faiss's OpenMP and, through
threadpoolctl, the BLAS pool numpy uses). fairseq's fit runs in a child process, so that it can be stopped after
``--sk-timeout`` seconds; the labelling of both is timed in this process in ``--repeat`` interleaved rounds (ours,
ours torch backend, fairseq per utterance, fairseq in blocks, ...), median reported, ratios = median over rounds of
fairseq's time / ours in the same round. Inertia (sum of squared distances to the nearest centroid, per frame) is
measured on ALL frames with the same exact float64 routine for both. Data: real frames of a feature store
(``--feats``, e.g. a mini_synth MFCC dump) for the low-dimensional case, else a Gaussian mixture with anisotropic,
unequal components (MFCC-like 39-d case); the 256-d k=500 hidden-layer-like case is always the mixture.

    .venv/bin/python tools/bench/kmeans.py                 # both cases, 1M frames each (~5 min on 2 cores)
    .venv/bin/python tools/bench/kmeans.py --sk-timeout 3600   # let fairseq's 256-d k=500 fit finish (long)
    .venv/bin/python tools/bench/kmeans.py --quick         # 39-d k=100 and 256-d k=500 at 200k frames
    .venv/bin/python tools/bench/kmeans.py --feats egs/mini_synth/hubert/dump/mfcc/train --skip-slow
    .venv/bin/python tools/bench/kmeans.py --frames 200000 --cases 39
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

# torch and faiss each bundle an OpenMP runtime; spin-waiting threads of one starve the other (see
# speechssl/cli/kmeans.py). Must be set before either is imported; the CLI does the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from speechssl.units.fit import FAISS_BATCH
from speechssl.units.kmeans import Assigner, fit_kmeans


def mixture(n: int, d: int, components: int, seed: int) -> np.ndarray:
    """``n`` frames of a mixture: random means, per-component diagonal scales, Zipf-like weights."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=4.0, size=(components, d)).astype(np.float32)
    scales = rng.uniform(0.3, 2.0, size=(components, d)).astype(np.float32)
    w = 1.0 / np.arange(1, components + 1) ** 0.7
    z = rng.choice(components, size=n, p=w / w.sum())
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        zz = z[s : s + 100_000]
        x[s : s + len(zz)] = means[zz] + scales[zz] * rng.standard_normal((len(zz), d), dtype=np.float32)
    return x


def exact_inertia_per_frame(x: np.ndarray, c: np.ndarray) -> float:
    """Mean squared distance to the nearest centroid, nearest found in fp32, distance recomputed in float64."""
    labels = Assigner(c, device="cpu")(x)
    tot = 0.0
    for s in range(0, len(x), 200_000):
        diff = x[s : s + 200_000].astype(np.float64) - c[labels[s : s + 200_000]].astype(np.float64)
        tot += float((diff * diff).sum())
    return tot / len(x)


def run_fairseq(x: np.ndarray, k: int, frac: float, seed: int) -> tuple[float, np.ndarray]:
    """fairseq's ``learn_kmeans.py`` on a ``frac`` sample: fit seconds, centroids."""
    from sklearn.cluster import MiniBatchKMeans

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), int(round(frac * len(x))), replace=False))]
    km = MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=10000, n_init=20, max_iter=100,
                         max_no_improvement=100, tol=0.0, reassignment_ratio=0.0, compute_labels=False,
                         init_size=None, random_state=seed)
    km.fit(sample)
    return time.perf_counter() - t0, km.cluster_centers_


class ApplyKmeans:
    """fairseq's ``ApplyKmeans`` (examples/hubert/simple_kmeans/dump_km_label.py, facebookresearch/fairseq at
    3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99), numpy branch (``dump_label`` passes each utterance's features as a
    numpy array: its ``torch.from_numpy(feat).cuda()`` line is commented out), with the centroids handed over
    instead of ``joblib.load(km_path).cluster_centers_``. Written out because fairseq does not install here."""

    def __init__(self, cluster_centers: np.ndarray):
        self.C_np = cluster_centers.transpose()
        self.Cnorm_np = (self.C_np ** 2).sum(0, keepdims=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        dist = (
            (x ** 2).sum(1, keepdims=True)
            - 2 * np.matmul(x, self.C_np)
            + self.Cnorm_np
        )
        return np.argmin(dist, axis=1)


def fairseq_label(apply: ApplyKmeans, x: np.ndarray, block: int) -> np.ndarray:
    """``dump_label``'s loop (one ``ApplyKmeans`` call per utterance), here over consecutive ``block``-frame pieces
    of ``x`` (``block`` = an utterance's frames as documented, our Assigner's batch for equal work)."""
    return np.concatenate([apply(x[s : s + block]) for s in range(0, len(x), block)])


def cpu_times() -> float:
    """CPU seconds of this process and its finished children (all threads): less sensitive to other users'
    load on a shared machine than wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_fairseq_capped(x: np.ndarray, k: int, frac: float, seed: int, threads: int,
                       timeout: float | None) -> tuple[float, np.ndarray] | None:
    """:func:`run_fairseq` in a child process (frames passed through a temp .npy), killed after ``timeout`` s.
    None if it ran out of time."""
    with tempfile.TemporaryDirectory(prefix="bench_kmeans_") as tmp:
        np.save(os.path.join(tmp, "x.npy"), x)
        cmd = [sys.executable, os.path.abspath(__file__), "--fairseq-child", tmp, "--k", str(k),
               "--sk-frac", str(frac), "--seed", str(seed), "--threads", str(threads)]
        c0 = cpu_times()
        try:
            subprocess.run(cmd, check=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        r = np.load(os.path.join(tmp, "result.npz"))
        print(f"  fairseq fit CPU time (incl. loading the frames): {cpu_times() - c0:.2f}s", flush=True)
        return float(r["fit"]), r["centroids"]


def fairseq_child(tmp: str, k: int, frac: float, seed: int, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    x = np.load(os.path.join(tmp, "x.npy"), mmap_mode="r")
    with threadpool_limits(threads):
        fit, c = run_fairseq(np.asarray(x), k, frac, seed)
    np.savez(os.path.join(tmp, "result.npz"), fit=fit, centroids=c)


def run_ours(x: np.ndarray, k: int, frac: float, niter: int, nredo: int, seed: int) -> tuple[float, np.ndarray]:
    """Fit seconds, centroids."""
    c0, t0 = cpu_times(), time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), int(round(frac * len(x))), replace=False))]
    c = fit_kmeans(sample, k, niter=niter, nredo=nredo, seed=seed, device="cpu")
    t1 = time.perf_counter()
    print(f"  ours fit CPU time: {cpu_times() - c0:.2f}s", flush=True)
    return t1 - t0, c


def time_labelling(x: np.ndarray, ours_c: np.ndarray, fq_c: np.ndarray | None, repeat: int, utt_frames: int
                   ) -> dict[str, list[float]]:
    """Wall seconds of every round of each labeller, interleaved (ours, ours torch, fairseq per utterance, fairseq
    in blocks, ours, ...) after one warm-up call each; every labeller with its own side's centroids."""
    fns = {"ours": Assigner(ours_c, device="cpu"), "ours_torch": Assigner(ours_c, device="cpu", backend="torch")}
    if fq_c is not None:
        apply = ApplyKmeans(fq_c)
        fns["fq_utt"] = lambda a: fairseq_label(apply, a, utt_frames)
        fns["fq_block"] = lambda a: fairseq_label(apply, a, FAISS_BATCH)
    for fn in fns.values():
        fn(x[:FAISS_BATCH])
    walls: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            walls[name].append(time.perf_counter() - t0)
    return walls


def store_frames(path: str, n: int, seed: int) -> np.ndarray:
    """``min(n, total)`` frames drawn uniformly from a feature store (all of them if it has fewer)."""
    from speechssl.features.store import FeatureReader
    from speechssl.units.kmeans import sample_frames

    reader = FeatureReader(path)
    return sample_frames(reader.shard_arrays(), reader.total_frames, min(n, reader.total_frames), seed=seed,
                         progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--cases", default="39,256", help="comma list of 39 (k=100) and/or 256 (k=500)")
    ap.add_argument("--feats", default=None, help="feature store (e.g. an MFCC dump): its frames replace the "
                                                  "39-d mixture (up to --frames, uniformly drawn)")
    ap.add_argument("--feats-k", type=int, default=100, help="k for the --feats case (default 100)")
    ap.add_argument("--sk-frac", type=float, default=0.1, help="fairseq recipe sample fraction (README: 10%%)")
    ap.add_argument("--frac", type=float, default=0.1, help="our sample fraction")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--nredo", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved labelling rounds (median reported)")
    ap.add_argument("--utt-frames", type=int, default=500,
                    help="frames per dump_km_label call in fairseq's per-utterance labelling (default 500: 10 s at "
                         "50 Hz)")
    ap.add_argument("--skip-slow", action="store_true", help="skip fairseq's fit on the 256-d k=500 case (its "
                                                             "labelling is still timed, with our centroids)")
    ap.add_argument("--sk-timeout", type=float, default=120.0,
                    help="seconds before fairseq's fit (run in a child process) is stopped (default 120)")
    ap.add_argument("--quick", action="store_true", help="200k frames per case, 3 labelling rounds")
    ap.add_argument("--fairseq-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fairseq_child:
        fairseq_child(args.fairseq_child, args.k, args.sk_frac, args.seed, args.threads)
        return
    if args.quick:
        args.frames, args.repeat = min(args.frames, 200_000), min(args.repeat, 3)
    torch.set_num_threads(args.threads)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    spec = {"39": (39, 100, 300), "256": (256, 500, 1000)}
    rows = []
    load0 = os.getloadavg()
    for case in args.cases.split(","):
        d, k, comps = spec[case]
        if case == "39" and args.feats:
            x = store_frames(args.feats, args.frames, args.seed)
            d, k, data = x.shape[1], args.feats_k, f"{args.feats}"
        else:
            x, data = mixture(args.frames, d, comps, args.seed), "mixture"
        name = f"{len(x)}x{d} k={k}"
        with threadpool_limits(args.threads):
            of, oc = run_ours(x, k, args.frac, args.niter, args.nredo, args.seed)
            oi = exact_inertia_per_frame(x, oc)
        print(f"[{name}, {data}] ours: fit {of:.2f}s inertia/frame {oi:.4f}", flush=True)
        fq = None
        if case == "256" and args.skip_slow:
            print(f"[{name}] fairseq fit skipped (--skip-slow)", flush=True)
        else:
            fq = run_fairseq_capped(x, k, args.sk_frac, args.seed, args.threads, args.sk_timeout)
            if fq is None:
                print(f"[{name}] fairseq fit: stopped after {args.sk_timeout:g}s", flush=True)
        if fq is not None:
            sf, sc = fq
            with threadpool_limits(args.threads):
                si = exact_inertia_per_frame(x, sc)
            print(f"[{name}] fairseq: fit {sf:.2f}s inertia/frame {si:.4f}", flush=True)
        with threadpool_limits(args.threads):
            fq_c = fq[1] if fq is not None else oc  # labelling costs the same for any centroids of this shape
            walls = time_labelling(x, oc, fq_c, args.repeat, args.utt_frames)
            n = min(len(x), 200_000)
            agree = float((fairseq_label(ApplyKmeans(fq_c), x[:n], FAISS_BATCH)
                           == Assigner(fq_c, device="cpu")(x[:n])).mean())
        med = {n: statistics.median(w) for n, w in walls.items()}
        ratio = {n: statistics.median(a / b for a, b in zip(w, walls["ours"])) for n, w in walls.items()}
        print(f"[{name}] labelling, median of {args.repeat}: ours {med['ours']:.3f}s (torch backend "
              f"{med['ours_torch']:.3f}s), fairseq ApplyKmeans per {args.utt_frames}-frame utterance "
              f"{med['fq_utt']:.3f}s, "
              f"in 65,536-frame blocks {med['fq_block']:.3f}s; ApplyKmeans labels = faiss labels on {agree:.4%} of "
              f"{n} frames", flush=True)
        rows.append((name, data, of, oi, fq if fq is None else (fq[0], si), med, ratio))
    load1 = os.getloadavg()
    print(f"\nours: k-means++ + faiss Lloyd, sample {args.frac:g}, niter {args.niter}, nredo {args.nredo}, faiss "
          f"top-1 assignment (torch addmm+min in brackets); fairseq: learn_kmeans.py's MiniBatchKMeans on a "
          f"{args.sk_frac:g} sample, dump_km_label.py's ApplyKmeans (numpy matmul + argmin) per "
          f"{args.utt_frames}-frame "
          f"utterance as dump_label calls it (headline) and on our 65,536-frame blocks; {args.threads} threads "
          f"for all; inertia on all frames; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print("label: median of interleaved rounds; ratio = median over rounds of fairseq's time / ours in the same round "
          "(>1: ours faster); fit: one run each, recipe against recipe")
    print(f"{'case':<22}{'data':<9}{'ours fit':>9}{'fq fit':>8}{'ratio':>7}{'inertia ours/fq':>16}"
          f"{'ours label':>11}{'(torch)':>8}{'fq utt':>8}{'ratio':>7}{'fq block':>9}{'ratio':>7}")
    for name, data, of, oi, fq, med, ratio in rows:
        short = "mixture" if data == "mixture" else "feats"
        line = f"{name:<22}{short:<9}{of:9.2f}"
        line += f"{'-':>8}{'-':>7}{'-':>16}" if fq is None else f"{fq[0]:8.2f}{fq[0] / of:6.1f}x{oi / fq[1]:16.4f}"
        line += (f"{med['ours']:11.3f}{med['ours_torch']:8.3f}{med['fq_utt']:8.3f}{ratio['fq_utt']:6.2f}x"
                 f"{med['fq_block']:9.3f}{ratio['fq_block']:6.2f}x")
        print(line + ("   (fairseq fit skipped or timed out: its labelling timed with our centroids)"
                      if fq is None else ""))


if __name__ == "__main__":
    main()
