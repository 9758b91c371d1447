"""`speechssl extract`: hidden states of any checkpoint's layers into feature stores (OUT/layer_<L>/).

Parses its arguments and calls :func:`speechssl.upstream.extract.extract`.
"""

from __future__ import annotations

import argparse


def _extract(args: argparse.Namespace) -> int:
    """Hidden states of --layers of checkpoint --upstream for every utterance of --data, one feature store per layer
    (OUT/layer_<L>/, kind hubert_l<L>, header with the weights' SHA-1). Utterances are sorted by duration and
    batched by --max-duration seconds of padded audio; the model runs only up to the deepest layer asked for.
    Shards are contiguous blocks of the sorted utterance ids: without --rank every shard in turn (under torchrun:
    shards $RANK, $RANK+$WORLD_SIZE, ...); finished shards with the same header are skipped, unfinished ones redone,
    so a re-run after a crash redoes only what is missing. --sample-frac F --seed S: only a seeded random fraction
    of the utterances (the k-means sample of iteration 2; its labels come from `kmeans label --upstream`)."""
    from speechssl.cli.options import at_least, fraction, non_negative, positive
    from speechssl.errors import UserError
    from speechssl.fileio import check_writable_dir

    if args.chunk_seconds is None and args.overlap_seconds is not None:
        raise UserError("--overlap-seconds goes with --chunk-seconds")
    non_negative("--max-duration", args.max_duration)
    positive("--chunk-seconds", args.chunk_seconds)
    non_negative("--overlap-seconds", args.overlap_seconds)
    at_least("--nshard", args.nshard, 1)
    at_least("--workers", args.workers, 0)
    fraction("--sample-frac", args.sample_frac)
    check_writable_dir(args.out, "--out")  # one store per layer is written into it, shard by shard
    from speechssl.upstream.extract import extract

    complete = extract(
        args.upstream, args.data, args.out, args.layers, max_duration=args.max_duration, dtype=args.dtype,
        nshard=args.nshard, rank=args.rank, device=args.device, trust_pickle=args.trust_pickle,
        overwrite=args.overwrite, chunk_seconds=args.chunk_seconds, overlap_seconds=args.overlap_seconds,
        precision=args.precision, workers=args.workers, sample_frac=args.sample_frac, seed=args.seed,
    )
    where = f"{args.out}/layer_<L>"
    if complete:
        print(f"extract: {where} complete")
    else:
        print(f"extract: this process's shard(s) done; {where} is complete when the other shards finish")
    return 0


def register(subparsers, help_: str) -> None:
    p = subparsers.add_parser("extract", help=help_, description=(_extract.__doc__ or "").replace("\n", " "))
    p.add_argument("--upstream", required=True, metavar="PATH",
                   help="checkpoint: speechssl or transformers directory, random:DIR, or (with --trust-pickle) a "
                        "fairseq / s3prl .pt file")
    p.add_argument("--data", required=True, metavar="DIR", help="Kaldi data dir")
    p.add_argument("--layers", required=True, metavar="L,L|all",
                   help="hidden states to store: comma-separated (0 = encoder input .. N = output) or all")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: one store per layer, DIR/layer_<L>")
    p.add_argument("--max-duration", type=float, default=None, metavar="SEC",
                   help="padded seconds of audio per batch (default 40 on cpu, 400 on cuda; 0: one utterance per "
                        "batch)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="store dtype (default float16)")
    p.add_argument("--nshard", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--rank", type=int, default=None,
                   help="the one shard to extract (default: torchrun's $RANK share, else every missing shard)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickle checkpoint (fairseq / s3prl .pt; unpickling can run code)")
    p.add_argument("--overwrite", action="store_true", help="redo shards finished with a different header")
    p.add_argument("--chunk-seconds", type=float, default=None, metavar="SEC",
                   help="run the transformer of utterances longer than SEC on overlapping windows of SEC (an "
                        "approximation: attention is global; 20-30 s recommended; default: whole utterances)")
    p.add_argument("--overlap-seconds", type=float, default=None, metavar="SEC",
                   help="overlap of those windows (default: a quarter of the chunk, at least the positional conv's "
                        "width); each frame is taken from the window whose centre holds it")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bfloat16 autocast (recorded in the header)")
    p.add_argument("--workers", type=int, default=2, help="audio reading threads (default 2)")
    p.add_argument("--sample-frac", type=float, default=None, metavar="F",
                   help="extract only a seeded, uniformly random fraction F of the utterances (the same for any "
                        "--nshard; recorded in the header, so a store of another sample is refused): the k-means "
                        "sample of iteration 2, fitted with `kmeans fit --sample-frac 1` and labelled by "
                        "`kmeans label --upstream` (default: every utterance)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-frac's draw (default 0)")
    p.set_defaults(func=_extract)
