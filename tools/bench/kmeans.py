#!/usr/bin/env python
"""Benchmark: our k-means (k-means++ seeding + faiss Lloyd on a sample, faiss top-1 assignment) vs fairseq's recipe.

fairseq (examples/hubert/simple_kmeans/learn_kmeans.py + dump_km_label.py): sklearn
``MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=10000, n_init=20, max_iter=100,
max_no_improvement=100, tol=0.0, reassignment_ratio=0.0, compute_labels=False, init_size=None)`` fitted on a
``--sk-frac`` sample (10% in fairseq's README), then ``predict`` on every frame.

Both run on the same frames (fairseq's recipe in a child process, so it can be stopped after --sk-timeout
seconds); inertia (sum of squared distances to the nearest centroid, per frame) is measured on ALL frames with
the same exact float64 routine for both. Data: real frames of a feature store (``--feats``, e.g. a mini_synth
MFCC dump) for the low-dimensional case, else a Gaussian mixture with anisotropic, unequal components
(MFCC-like 39-d case); the 256-d k=500 hidden-layer-like case is always the mixture.

    .venv/bin/python tools/bench/kmeans.py                 # both cases, 1M frames each
    .venv/bin/python tools/bench/kmeans.py --feats egs/mini_synth/hubert/dump/mfcc/train --skip-slow
    .venv/bin/python tools/bench/kmeans.py --frames 200000 --cases 39
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

# torch and faiss each bundle an OpenMP runtime; spin-waiting threads of one starve the other (see
# speechssl/cli/kmeans.py). Must be set before either is imported; the CLI does the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

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


def run_fairseq(x: np.ndarray, k: int, frac: float, seed: int) -> tuple[float, float, np.ndarray]:
    from sklearn.cluster import MiniBatchKMeans

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), int(round(frac * len(x))), replace=False))]
    km = MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=10000, n_init=20, max_iter=100,
                         max_no_improvement=100, tol=0.0, reassignment_ratio=0.0, compute_labels=False,
                         init_size=None, random_state=seed)
    km.fit(sample)
    t1 = time.perf_counter()
    km.predict(x)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, km.cluster_centers_.astype(np.float32)


def cpu_times() -> float:
    """CPU seconds of this process and its finished children (all threads): less sensitive to other users'
    load on a shared machine than wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_fairseq_capped(x: np.ndarray, k: int, frac: float, seed: int, threads: int,
                       timeout: float | None) -> tuple[float, float, np.ndarray] | None:
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
        print(f"  fairseq CPU time (fit + label, incl. loading the frames): {cpu_times() - c0:.2f}s", flush=True)
        return float(r["fit"]), float(r["label"]), r["centroids"]


def fairseq_child(tmp: str, k: int, frac: float, seed: int, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    x = np.load(os.path.join(tmp, "x.npy"), mmap_mode="r")
    with threadpool_limits(threads):
        fit, label, c = run_fairseq(np.asarray(x), k, frac, seed)
    np.savez(os.path.join(tmp, "result.npz"), fit=fit, label=label, centroids=c)


def run_ours(x: np.ndarray, k: int, frac: float, niter: int, nredo: int, seed: int
             ) -> tuple[float, float, float, np.ndarray]:
    """Fit time, label time (default CPU backend: faiss), label time with the torch backend, centroids."""
    c0, t0 = cpu_times(), time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), int(round(frac * len(x))), replace=False))]
    c = fit_kmeans(sample, k, niter=niter, nredo=nredo, seed=seed, device="cpu")
    t1 = time.perf_counter()
    c1 = cpu_times()
    Assigner(c, device="cpu")(x)
    t2, c2 = time.perf_counter(), cpu_times()
    Assigner(c, device="cpu", backend="torch")(x)
    t3, c3 = time.perf_counter(), cpu_times()
    print(f"  ours CPU time: fit {c1 - c0:.2f}s, label {c2 - c1:.2f}s (torch backend {c3 - c2:.2f}s)", flush=True)
    return t1 - t0, t2 - t1, t3 - t2, c


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
    ap.add_argument("--skip-slow", action="store_true", help="skip fairseq's recipe on the 256-d k=500 case")
    ap.add_argument("--sk-timeout", type=float, default=300.0,
                    help="seconds before fairseq's recipe (run in a child process) is stopped (default 300)")
    ap.add_argument("--fairseq-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fairseq_child:
        fairseq_child(args.fairseq_child, args.k, args.sk_frac, args.seed, args.threads)
        return
    torch.set_num_threads(args.threads)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    spec = {"39": (39, 100, 300), "256": (256, 500, 1000)}
    rows = []
    for case in args.cases.split(","):
        d, k, comps = spec[case]
        if case == "39" and args.feats:
            x = store_frames(args.feats, args.frames, args.seed)
            d, k, data = x.shape[1], args.feats_k, f"{args.feats}"
        else:
            x, data = mixture(args.frames, d, comps, args.seed), "mixture"
        name = f"{len(x)}x{d} k={k}"
        with threadpool_limits(args.threads):
            of, ol, ot, oc = run_ours(x, k, args.frac, args.niter, args.nredo, args.seed)
            oi = exact_inertia_per_frame(x, oc)
        print(f"[{name}, {data}] ours: fit {of:.2f}s label {ol:.2f}s (torch backend {ot:.2f}s) "
              f"inertia/frame {oi:.4f}", flush=True)
        if case == "256" and args.skip_slow:
            rows.append((name, data, of, ol, ot, oi, None))
            continue
        fq = run_fairseq_capped(x, k, args.sk_frac, args.seed, args.threads, args.sk_timeout)
        if fq is None:
            print(f"[{name}] fairseq: stopped after {args.sk_timeout:g}s", flush=True)
            rows.append((name, data, of, ol, ot, oi, None))
            continue
        sf, sl, sc = fq
        with threadpool_limits(args.threads):
            si = exact_inertia_per_frame(x, sc)
        print(f"[{name}] fairseq: fit {sf:.2f}s label {sl:.2f}s inertia/frame {si:.4f}", flush=True)
        rows.append((name, data, of, ol, ot, oi, (sf, sl, si)))
    print(f"\nours: k-means++ + faiss Lloyd, sample {args.frac:g}, niter {args.niter}, nredo {args.nredo}, "
          f"faiss top-1 assignment (torch addmm+min in brackets); fairseq: MiniBatchKMeans on a {args.sk_frac:g} "
          f"sample + predict; {args.threads} threads; inertia on all frames")
    print(f"{'case':<22}{'data':<10}{'ours fit':>9}{'label':>7}{'(torch)':>8}{'total':>7}{'fq fit':>8}{'label':>7}"
          f"{'total':>7}{'speedup':>9}{'inertia ours/fq':>17}")
    for name, data, of, ol, ot, oi, fq in rows:
        short = "mixture" if data == "mixture" else "feats"
        line = f"{name:<22}{short:<10}{of:9.2f}{ol:7.2f}{ot:8.2f}{of + ol:7.2f}"
        if fq is None:
            line += f"{'-':>8}{'-':>7}{'-':>7}   (fairseq skipped or timed out)"
        else:
            sf, sl, si = fq
            line += f"{sf:8.2f}{sl:7.2f}{sf + sl:7.2f}{(sf + sl) / (of + ol):8.1f}x{oi / si:17.4f}"
        print(line)


if __name__ == "__main__":
    main()
