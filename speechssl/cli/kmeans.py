"""`speechssl kmeans fit|label`: k-means on a streamed sample of a feature store; unit labels keyed by utterance."""

from __future__ import annotations

import argparse
import os
import sys

from speechssl.cli import verb_group


def _passive_omp() -> None:
    """torch and faiss bundle separate OpenMP runtimes; with the default spin-waiting, each one's idle threads
    steal the cores from the other's next parallel region (measured: faiss Lloyd 20x slower right after a
    torch op on 2 cores). Passive waiting fixes it; the variable is read when a runtime loads, so set it
    before torch / faiss are imported (a user's own setting wins)."""
    if "torch" not in sys.modules and "faiss" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# k-means fitting options of `kmeans fit` and `units layers`, declared once. Their defaults are those of
# speechssl.units.fit.FitOptions (the library's): an option left out is not passed on. Not imported here, since
# importing it loads torch before _passive_omp can act.
FIT_OPTIONS = ("sample_frac", "max_frames", "seed", "niter", "nredo", "init")


def register(subparsers, help_):
    verbs = verb_group(subparsers, "kmeans", help_)

    f = verbs.add_parser("fit", help="fit k-means (faiss) on a uniform frame sample drawn in one pass over a store",
                         description=_fit.__doc__)
    f.add_argument("--feats", required=True, help="feature store dir (speechssl features dump)")
    add_fit_options(f)
    f.add_argument("--device", default="auto", help="auto | cpu | cuda")
    f.add_argument("--out", required=True, help="k-means dir: centroids.safetensors, centroids.npy, kmeans.json")
    f.set_defaults(func=_fit)

    lab = verbs.add_parser("label", help="assign every utterance's frames to the nearest centroid (text.km)",
                           description=_label.__doc__)
    lab.add_argument("--feats", required=True, help="feature store dir")
    lab.add_argument("--km", required=True, help="k-means dir from `speechssl kmeans fit`")
    lab.add_argument("--out", required=True, help="label dir")
    lab.add_argument("--nshard", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    lab.add_argument("--rank", type=int, default=None,
                     help="the one shard to label (default: torchrun's $RANK share, else every shard)")
    lab.add_argument("--device", default="auto", help="auto | cpu | cuda")
    lab.add_argument("--batch-frames", type=int, default=8192, help="frames per distance matmul")
    lab.set_defaults(func=_label)


def add_fit_options(p: argparse.ArgumentParser) -> None:
    """``--k`` and the k-means options (:data:`FIT_OPTIONS`); read them back with :func:`fit_options`."""
    p.add_argument("--k", type=int, required=True, help="number of clusters")
    opt = dict(default=argparse.SUPPRESS)
    p.add_argument("--sample-frac", type=float, **opt, help="fraction of all frames to sample (default 0.1)")
    p.add_argument("--max-frames", type=int, **opt, help="cap on sampled frames (bounds memory; default: none)")
    p.add_argument("--seed", type=int, **opt, help="seed of the sample, k-means++ and restarts (default 0)")
    p.add_argument("--niter", type=int, **opt, help="Lloyd iterations per run (default 20)")
    p.add_argument("--nredo", type=int, **opt, help="restarts; the lowest objective wins (default 1)")
    p.add_argument("--init", choices=["kmeans++", "random"], **opt,
                   help="kmeans++ (default) or random (faiss's k distinct random frames)")


def fit_options(args: argparse.Namespace) -> dict:
    """The k-means options given on the command line, as keyword arguments of ``fit_store`` / ``evaluate_layers``."""
    return {name: getattr(args, name) for name in FIT_OPTIONS if hasattr(args, name)}


def _fit(args: argparse.Namespace) -> int:
    """Fit k-means on a uniformly random sample of frames drawn in one streaming pass; memory is the sample
    (<= --max-frames x dim x 4 B) plus k-means working memory, printed before starting. Lloyd iterations in faiss,
    started from greedy k-means++ seeding (faiss itself only has random init: --init random); nredo restarts
    keep the best objective."""
    _passive_omp()
    from speechssl.units.kmeans import fit_store

    fit_store(args.feats, args.out, k=args.k, device=args.device, **fit_options(args))
    return 0


def _label(args: argparse.Namespace) -> int:
    """Write text.km ('utt u1 u2 ...', sorted by id) and meta.json. Sharded: shard R (a contiguous block of the
    sorted ids) goes to shards/R-of-N.km. Without --rank, every shard is labelled in turn (under torchrun:
    shards $RANK, $RANK+$WORLD_SIZE, ...); shards already done with the same k-means model are skipped; whoever
    finishes the last shard merges."""
    _passive_omp()
    from speechssl.units.kmeans import label_store

    merged = label_store(args.feats, args.km, args.out, rank=args.rank, nshard=args.nshard, device=args.device,
                         batch_frames=args.batch_frames)
    if merged:
        print(f"labels: wrote {args.out}/text.km and meta.json")
    else:
        print(f"labels: this process's shard(s) done; {args.out}/text.km is merged when the last shard finishes")
    return 0
