#!/usr/bin/env python
"""Benchmark: our k-means (k-means++ seeding + faiss Lloyd on a sample, torch assignment) vs fairseq's recipe.

fairseq (examples/hubert/simple_kmeans/learn_kmeans.py + dump_km_label.py): sklearn
``MiniBatchKMeans(n_clusters=k, init="k-means++", batch_size=10000, n_init=20, max_iter=100,
max_no_improvement=100, tol=0.0, reassignment_ratio=0.0, compute_labels=False, init_size=None)`` fitted on a
``--sk-frac`` sample (10% in fairseq's README), then ``predict`` on every frame.

Both run on the same frames in one process; inertia (sum of squared distances to the nearest centroid,
per frame) is measured on ALL frames with the same exact float64 routine for both. Data: a Gaussian mixture
with anisotropic, unequal components (MFCC-like 39-d case and a 256-d hidden-layer-like case).

    .venv/bin/python tools/bench/kmeans.py                 # both cases, 1M frames each
    .venv/bin/python tools/bench/kmeans.py --frames 200000 --cases 39
"""

from __future__ import annotations

import argparse
import os
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


def run_ours(x: np.ndarray, k: int, frac: float, niter: int, nredo: int, seed: int) -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), int(round(frac * len(x))), replace=False))]
    c = fit_kmeans(sample, k, niter=niter, nredo=nredo, seed=seed, device="cpu")
    t1 = time.perf_counter()
    Assigner(c, device="cpu")(x)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--cases", default="39,256", help="comma list of 39 (k=100) and/or 256 (k=500)")
    ap.add_argument("--sk-frac", type=float, default=0.1, help="fairseq recipe sample fraction (README: 10%%)")
    ap.add_argument("--frac", type=float, default=0.1, help="our sample fraction")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--nredo", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    spec = {"39": (39, 100, 300), "256": (256, 500, 1000)}
    rows = []
    with threadpool_limits(args.threads):
        for case in args.cases.split(","):
            d, k, comps = spec[case]
            x = mixture(args.frames, d, comps, args.seed)
            of, ol, oc = run_ours(x, k, args.frac, args.niter, args.nredo, args.seed)
            oi = exact_inertia_per_frame(x, oc)
            print(f"[{d}-d k={k}] ours: fit {of:.2f}s label {ol:.2f}s inertia/frame {oi:.4f}", flush=True)
            sf, sl, sc = run_fairseq(x, k, args.sk_frac, args.seed)
            si = exact_inertia_per_frame(x, sc)
            print(f"[{d}-d k={k}] fairseq: fit {sf:.2f}s label {sl:.2f}s inertia/frame {si:.4f}", flush=True)
            rows.append((f"{args.frames}x{d} k={k}", of, ol, oi, sf, sl, si))
    print(f"\nours: k-means++ + faiss Lloyd, sample {args.frac:g}, niter {args.niter}, nredo {args.nredo}; "
          f"fairseq: MiniBatchKMeans on a {args.sk_frac:g} sample; {args.threads} threads; inertia on all frames")
    print(f"{'case':<22}{'ours fit':>9}{'label':>7}{'total':>7}{'fq fit':>8}{'label':>7}{'total':>7}"
          f"{'speedup':>9}{'inertia ours/fq':>17}")
    for name, of, ol, oi, sf, sl, si in rows:
        print(f"{name:<22}{of:9.2f}{ol:7.2f}{of + ol:7.2f}{sf:8.2f}{sl:7.2f}{sf + sl:7.2f}"
              f"{(sf + sl) / (of + ol):8.1f}x{oi / si:17.4f}")


if __name__ == "__main__":
    main()
