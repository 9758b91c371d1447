"""`speechssl kmeans fit|label`: k-means on a streamed sample of a feature store; unit labels keyed by utterance."""

from __future__ import annotations

import argparse
import os
import sys


def _passive_omp() -> None:
    """torch and faiss bundle separate OpenMP runtimes; with the default spin-waiting, each one's idle threads
    steal the cores from the other's next parallel region (measured: faiss Lloyd 20x slower right after a
    torch op on 2 cores). Passive waiting fixes it; the variable is read when a runtime loads, so set it
    before torch / faiss are imported (a user's own setting wins)."""
    if "torch" not in sys.modules and "faiss" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _fit(args: argparse.Namespace) -> int:
    _passive_omp()
    from speechssl.units.kmeans import fit_store

    fit_store(args.feats, args.out, k=args.k, sample_frac=args.sample_frac, max_frames=args.max_frames,
              seed=args.seed, niter=args.niter, nredo=args.nredo, init=args.init, device=args.device)
    return 0


def _label(args: argparse.Namespace) -> int:
    _passive_omp()
    from speechssl.units.kmeans import label_store

    merged = label_store(args.feats, args.km, args.out, rank=args.rank, nshard=args.nshard, device=args.device,
                         batch_frames=args.batch_frames)
    if merged:
        print(f"labels: wrote {args.out}/text.km and meta.json")
    else:
        print(f"labels: this process's shard(s) done; {args.out}/text.km is merged when the last shard finishes")
    return 0


def register(subparsers, help_):
    p = subparsers.add_parser("kmeans", help=help_, description=help_)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    f = verbs.add_parser("fit", help="fit k-means (faiss) on a uniform frame sample drawn in one pass over a store",
                         description="Fit k-means on a uniformly random sample of frames drawn in one streaming "
                                     "pass; memory is the sample (<= --max-frames x dim x 4 B) plus k-means working "
                                     "memory, printed before starting. Lloyd iterations in faiss, started from greedy "
                                     "k-means++ seeding (faiss itself only has random init: --init random); "
                                     "nredo restarts keep the best objective.")
    f.add_argument("--feats", required=True, help="feature store dir (speechssl features dump)")
    f.add_argument("--k", type=int, required=True, help="number of clusters")
    f.add_argument("--sample-frac", type=float, default=0.1, help="fraction of all frames to sample (default 0.1)")
    f.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames (bounds memory)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--niter", type=int, default=20, help="Lloyd iterations per run (default 20)")
    f.add_argument("--nredo", type=int, default=1, help="restarts; the lowest objective wins (default 1)")
    f.add_argument("--init", default="kmeans++", choices=["kmeans++", "random"],
                   help="kmeans++ (default) or random (faiss's k distinct random frames)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda")
    f.add_argument("--out", required=True, help="k-means dir: centroids.safetensors, centroids.npy, kmeans.json")
    f.set_defaults(func=_fit)

    lab = verbs.add_parser("label", help="assign every utterance's frames to the nearest centroid (text.km)",
                           description="Write text.km ('utt u1 u2 ...', sorted by id) and meta.json. Sharded: "
                                       "shard R (a contiguous block of the sorted ids) goes to shards/R-of-N.km. "
                                       "Without --rank, every shard is labelled in turn (under torchrun: shards "
                                       "$RANK, $RANK+$WORLD_SIZE, ...); shards already done with the same k-means "
                                       "model are skipped; whoever finishes the last shard merges.")
    lab.add_argument("--feats", required=True, help="feature store dir")
    lab.add_argument("--km", required=True, help="k-means dir from `speechssl kmeans fit`")
    lab.add_argument("--out", required=True, help="label dir")
    lab.add_argument("--nshard", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    lab.add_argument("--rank", type=int, default=None,
                     help="the one shard to label (default: torchrun's $RANK share, else every shard)")
    lab.add_argument("--device", default="auto", help="auto | cpu | cuda")
    lab.add_argument("--batch-frames", type=int, default=8192, help="frames per distance matmul")
    lab.set_defaults(func=_label)
