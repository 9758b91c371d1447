"""`speechssl report EXP [--superb DIR ...] [--out FILE]`: EXP/report.md with PNG plots of every stage's output.

    speechssl report egs/mini_synth/hubert/exp
    speechssl report egs/mini_synth/hubert/exp --superb egs/mini_synth/superb/exp
"""

from __future__ import annotations

import argparse


def register(subparsers, help_: str) -> None:
    p = subparsers.add_parser(
        "report", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nReads what the stages wrote in EXP (pretraining runs: train.log, config.yaml, "
        "TensorBoard scalars, collapse_watch.json;\nRUN/layers/layers.json; k-means sets' quality.json) and the "
        "SUPERB runs under each --superb DIR\n(<upstream>/<task>/results.json), and writes EXP/report.md with its "
        "figures in EXP/report/.\nEach quality table carries its baselines (untrained model, spectral features); "
        "a section\nwithout input says so. Prints the path of the report.",
    )
    p.add_argument("exp", metavar="EXP", help="the recipe's experiment directory (e.g. egs/mini_synth/hubert/exp)")
    p.add_argument("--superb", action="append", default=[], metavar="DIR",
                   help="a SUPERB exp root holding <upstream>/<task>/results.json (repeatable)")
    p.add_argument("--asr", action="append", default=[], metavar="DIR",
                   help="a fine-tuning exp root holding <run>/decode_test/scores.json (repeatable)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the markdown (default EXP/report.md); figures go to FILE's dir/<stem>/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speechssl.fileio import check_writable_dir, check_writable_file
    from speechssl.report import write_report

    out = Path(args.out) if args.out else Path(args.exp) / "report.md"
    check_writable_file(out, "--out" if args.out else "EXP")
    check_writable_dir(out.parent / out.stem, "--out" if args.out else "EXP")  # the figures' dir
    print(write_report(args.exp, superb_dirs=args.superb, out=args.out, asr_dirs=args.asr))
    return 0
