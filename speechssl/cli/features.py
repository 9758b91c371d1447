"""`speechssl features ...`: dump MFCC / fbank of a data dir into a sharded store, and describe a store.
(A checkpoint's hidden layers: `speechssl extract`.)

Each verb parses its arguments and calls one library function in `speechssl.features`.
"""

from __future__ import annotations

import argparse
import json

from speechssl.cli import verb_group
from speechssl.cli.options import at_least, positive
from speechssl.errors import UserError
from speechssl.fileio import check_writable_dir


def _dump(args: argparse.Namespace) -> int:
    from speechssl.features.dump import dump_features

    if args.kind == "hidden" or args.ckpt is not None or args.layer is not None:
        raise UserError("hidden-layer features moved to `speechssl extract --upstream CKPT --data DIR --layers L "
                        "--out DIR` (store: DIR/layer_L)")
    positive("--batch-seconds", args.batch_seconds)
    at_least("--workers", args.workers, 0)
    at_least("--nshard", args.nshard, 1)
    check_writable_dir(args.out, "--out")  # the store's shards are written into it

    complete = dump_features(
        args.data,
        args.out,
        kind=args.kind,
        nshard=args.nshard,
        rank=args.rank,
        cmvn=args.cmvn or False,
        device=args.device,
        overwrite=args.overwrite,
        batch_seconds=args.batch_seconds,
        workers=args.workers,
    )
    if complete:
        print(f"features: {args.out} complete")
    else:
        print(f"features: this process's shard(s) done; {args.out} is complete when the other shards finish")
    return 0


def _info(args: argparse.Namespace) -> int:
    from speechssl.features.store import FeatureReader

    r = FeatureReader(args.dir)
    print(json.dumps(r.meta, indent=1, sort_keys=True))
    hours = r.total_frames / r.frame_rate / 3600.0
    print(f"{args.dir}: {len(r)} utterances, {r.total_frames} frames, {hours:.3f} h, dim {r.dim}, "
          f"{r.meta['nshard']} shard(s)")
    return 0


def register(subparsers, help_: str) -> None:
    verbs = verb_group(subparsers, "features", help_)

    v = verbs.add_parser(
        "dump",
        help="compute MFCC (39-d, HuBERT iteration 1) or 80-d fbank for a data dir into a sharded store "
             "(a checkpoint's layers: speechssl extract)",
        description="Shards are contiguous ranges of the sorted utterance list. Without --rank, every shard is "
        "dumped in turn (under torchrun: shards $RANK, $RANK+$WORLD_SIZE, ...); finished shards with the same "
        "header are skipped, unfinished ones redone.",
    )
    v.add_argument("--data", required=True, metavar="DIR", help="Kaldi data dir")
    v.add_argument("--out", required=True, metavar="DIR", help="feature store directory")
    v.add_argument("--kind", choices=("mfcc", "fbank", "hidden"), default="mfcc",
                   help="mfcc or fbank (hidden: retired, use `speechssl extract`)")
    v.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)  # retired with --kind hidden: named in the error
    v.add_argument("--layer", type=int, default=None, help=argparse.SUPPRESS)
    v.add_argument("--nshard", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    v.add_argument("--rank", type=int, default=None,
                   help="the one shard to dump (default: torchrun's $RANK share, else every missing shard)")
    v.add_argument("--cmvn", nargs="?", const="mean", choices=("mean", "meanvar", "spk-mean", "spk-meanvar"),
                   default=None, help="CMVN of the static features: per utterance (--cmvn = mean; --cmvn meanvar) "
                   "or per speaker of utt2spk (spk-mean, spk-meanvar; Kaldi's compute-cmvn-stats --spk2utt)")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    v.add_argument("--overwrite", action="store_true", help="redo shards finished with a different header")
    v.add_argument("--batch-seconds", type=float, default=None,
                   help="padded audio per batch (default 10 on cpu, 300 on cuda)")
    v.add_argument("--workers", type=int, default=2, help="audio reading threads (default 2)")
    v.set_defaults(func=_dump)

    v = verbs.add_parser("info", help="print a feature store's header, utterances, frames and hours")
    v.add_argument("dir")
    v.set_defaults(func=_info)
