"""`speechssl kmeans fit|label`: k-means on a streamed sample of a feature store; unit labels keyed by utterance."""

from __future__ import annotations

import argparse
import os
import sys

from speechssl.cli import verb_group
from speechssl.cli.options import at_least, non_negative, positive
from speechssl.fileio import check_writable_dir


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
    lab.add_argument("--feats", default=None, help="feature store dir (or --upstream: no store)")
    lab.add_argument("--upstream", default=None, metavar="CKPT",
                     help="label hidden state --layer of this checkpoint computed on the fly for every utterance "
                          "of --data (as `speechssl extract` would dump it), instead of --feats")
    lab.add_argument("--layer", default=None, help="with --upstream: the hidden state (0 = encoder input)")
    lab.add_argument("--data", default=None, metavar="DIR", help="with --upstream: Kaldi data dir")
    lab.add_argument("--km", required=True, help="k-means dir from `speechssl kmeans fit`")
    lab.add_argument("--out", required=True, help="label dir")
    lab.add_argument("--nshard", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    lab.add_argument("--rank", type=int, default=None,
                     help="the one shard to label (default: torchrun's $RANK share, else every shard)")
    lab.add_argument("--device", default="auto", help="auto | cpu | cuda")
    lab.add_argument("--batch-frames", type=int, default=8192, help="frames per distance matmul")
    up = lab.add_argument_group("with --upstream (as `speechssl extract`; the same values give the dump's numbers)")
    up.add_argument("--max-duration", type=float, default=None, metavar="SEC",
                    help="padded seconds of audio per batch (default 40 on cpu, 400 on cuda)")
    up.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                    help="the store dtype features are cast to before assignment (default float16)")
    up.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: bfloat16 autocast")
    up.add_argument("--chunk-seconds", type=float, default=None, metavar="SEC",
                    help="overlapping windows of SEC for longer utterances (as extract)")
    up.add_argument("--overlap-seconds", type=float, default=None, metavar="SEC", help="overlap of those windows")
    up.add_argument("--trust-pickle", action="store_true", help="allow a fairseq / s3prl .pt checkpoint")
    up.add_argument("--workers", type=int, default=2, help="audio reading threads (default 2)")
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
    """The k-means options given on the command line, as keyword arguments of ``fit_store`` / ``evaluate_layers``,
    checked (``--k`` too: one line naming the option, before any work)."""
    from speechssl.units.fit import FitOptions

    opts = {name: getattr(args, name) for name in FIT_OPTIONS if hasattr(args, name)}
    FitOptions(**opts).check(args.k)
    return opts


def _fit(args: argparse.Namespace) -> int:
    """Fit k-means on a uniformly random sample of frames drawn in one streaming pass; memory is the sample
    (<= --max-frames x dim x 4 B) plus k-means working memory, printed before starting. Lloyd iterations in faiss,
    started from greedy k-means++ seeding (faiss itself only has random init: --init random); nredo restarts
    keep the best objective."""
    _passive_omp()
    from speechssl.units.kmeans import fit_store

    opts = fit_options(args)
    check_writable_dir(args.out, "--out")  # before the sampling pass and the fit, not after them
    fit_store(args.feats, args.out, k=args.k, device=args.device, **opts)
    return 0


def _label(args: argparse.Namespace) -> int:
    """Write text.km ('utt u1 u2 ...', sorted by id) and meta.json. Sharded: shard R (a contiguous block of the
    sorted ids) goes to shards/R-of-N.km. Without --rank, every shard is labelled in turn (under torchrun:
    shards $RANK, $RANK+$WORLD_SIZE, ...); shards already done with the same k-means model are skipped; whoever
    finishes the last shard merges. Features from a store (--feats) or computed on the fly (--upstream CKPT
    --layer L --data DIR: each shard's utterances through the upstream forward of `speechssl extract`, cast to
    its store dtype, straight to the nearest centroid; no feature store is written)."""
    from speechssl.errors import UserError

    streamed = {"--layer": args.layer, "--data": args.data}
    if (args.feats is None) == (args.upstream is None):
        raise UserError("give exactly one of --feats STORE (a feature store) or --upstream CKPT --layer L "
                        "--data DIR (features computed on the fly)")
    if args.upstream is not None and None in streamed.values():
        raise UserError(f"--upstream needs {' and '.join(k for k, v in streamed.items() if v is None)}")
    given = [k for k, v in streamed.items() if v is not None]
    if args.feats is not None and given:
        raise UserError(f"{' and '.join(given)} {'goes' if len(given) == 1 else 'go'} with --upstream, not --feats "
                        "(a store knows its layer and utterances)")
    if args.chunk_seconds is None and args.overlap_seconds is not None:
        raise UserError("--overlap-seconds goes with --chunk-seconds")
    at_least("--batch-frames", args.batch_frames, 1)
    at_least("--nshard", args.nshard, 1)
    at_least("--workers", args.workers, 0)
    non_negative("--max-duration", args.max_duration)
    positive("--chunk-seconds", args.chunk_seconds)
    non_negative("--overlap-seconds", args.overlap_seconds)
    check_writable_dir(args.out, "--out")  # shards/ and the merged text.km + meta.json are written into it
    _passive_omp()
    if args.upstream is not None:
        from speechssl.units.label_stream import label_upstream

        merged = label_upstream(args.upstream, args.data, args.km, args.out, args.layer, nshard=args.nshard,
                                rank=args.rank, device=None if args.device == "auto" else args.device,
                                trust_pickle=args.trust_pickle, max_duration=args.max_duration, dtype=args.dtype,
                                chunk_seconds=args.chunk_seconds, overlap_seconds=args.overlap_seconds,
                                precision=args.precision, workers=args.workers, batch_frames=args.batch_frames)
    else:
        from speechssl.units.kmeans import label_store

        merged = label_store(args.feats, args.km, args.out, rank=args.rank, nshard=args.nshard, device=args.device,
                             batch_frames=args.batch_frames)
    if merged:
        print(f"labels: wrote {args.out}/text.km and meta.json")
    else:
        print(f"labels: this process's shard(s) done; {args.out}/text.km is merged when the last shard finishes")
    return 0
