"""The `speechssl` command line: one verb group per module, each calling one library function.

Every module in `_GROUPS` defines `register(subparsers)`, adding its verbs with `set_defaults(func=...)`.
`func(args)` returns an exit code (0 or None for success).

Errors: a `speechssl.errors.UserError` (bad input or options; every room's own error type is one) is printed as one
line naming the file / line / utterance id, exit 1; `-v` prints its traceback too. Any other exception is a bug and
always prints its traceback, then one line saying so, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from speechssl.errors import UserError
from speechssl.sharding import wait_for_all_ranks

# (module under speechssl.cli, one-line help)
_GROUPS = [
    ("data", "Kaldi data dirs: validate, fix, convert to/from lhotse, durations, filtering"),
    ("features", "MFCC / fbank features into a sharded, memory-mapped store"),
    ("kmeans", "k-means pseudo-labels: fit on a streamed sample, label every utterance"),
    ("units", "unit quality: PNMI, phone and cluster purity"),
    ("pretrain", "HuBERT masked-unit pretraining (torchrun for DDP)"),
    ("finetune", "CTC fine-tuning of a pretrained encoder for recognition (torchrun for DDP)"),
    ("decode", "CTC decoding of a data dir with a fine-tuned model: greedy or beam search + n-gram LM, WER/CER/PER"),
    ("superb", "SUPERB downstream evaluation: frozen upstream, learned layer weights, task heads"),
    ("export", "write a checkpoint as a transformers directory or an s3prl checkpoint"),
    ("extract", "hidden states of any checkpoint's layers into feature stores"),
    ("report", "EXP/report.md: training curves, PNMI by layer, label quality, SUPERB, each beside its baselines"),
]

# verbs that write shards (speechssl/sharding.py): under torchrun their workers meet before exiting
_SHARDED = {("features", "dump"), ("extract", None), ("kmeans", "label")}


def verb_group(subparsers, name: str, help_: str):
    """The parser of command group ``name`` (``speechssl NAME VERB ...``); returns its verbs' subparsers."""
    p = subparsers.add_parser(name, help=help_, description=help_)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    return verbs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechssl",
        description="Self-supervised speech representation learning toolkit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")
    sub.required = True
    for name, help_ in _GROUPS:
        module = importlib.import_module(f"speechssl.cli.{name}")
        module.register(sub, help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["superb", "prepare"]:  # the corpus preparers parse their own options
        from speechssl.cli.superb import prepare

        return prepare(argv[2:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides anywhere on the line, also after options (argparse takes one run of positionals)
    if hasattr(args, "overrides"):
        words = [w for w in extra if "=" in w and not w.startswith("-")]
        args.overrides = list(args.overrides) + words
        extra = [w for w in extra if w not in words]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # faiss logs every CPU-variant probe at INFO ("Could not load library with AVX2 ...")
        logging.getLogger("faiss").setLevel(logging.WARNING)
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "Using categorical units ..." per plot
    try:
        code = args.func(args)
        if not code and (args.group, getattr(args, "verb", None)) in _SHARDED:
            wait_for_all_ranks()  # under torchrun: every node's launch returns once every shard is written
    except UserError as e:  # names the file / line / utterance id and what to do: one line is the whole story
        if args.verbose:
            traceback.print_exc()
        print(f"speechssl {args.group}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug (ours or a library's): where it happened matters more than the message
        from speechssl.fileio import os_error_line

        line = os_error_line(e)  # safety net: a permission / file-in-the-way / disk-full OSError naming its path
        if line is not None:
            if args.verbose:
                traceback.print_exc()
            print(f"speechssl {args.group}: error: {line}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"speechssl {args.group}: internal error ({type(e).__name__}: {e}); not a problem speechssl knows in "
              "your input: the traceback above says where. Please report it.", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
