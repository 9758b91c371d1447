"""`speechssl units quality`: PNMI, phone purity and cluster purity of unit labels against phone alignments."""

from __future__ import annotations

import argparse


def _quality(args: argparse.Namespace) -> int:
    from speechssl.units.quality import label_quality

    report = label_quality(args.labels, args.alignments, tier=args.tier, out_json=args.out, plot=args.plot)
    print(report.summary())
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def register(subparsers, help_):
    p = subparsers.add_parser("units", help=help_, description=help_)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    q = verbs.add_parser("quality", help="phone purity, cluster purity, PNMI (HuBERT paper IV-F)",
                         description="Frame-level phone (the phone covering each frame centre) vs unit statistics. "
                                     "Labelled utterances without alignment are skipped and counted.")
    q.add_argument("--labels", required=True, help="label dir (text.km + meta.json)")
    q.add_argument("--alignments", required=True, help="Kaldi CTM file, a TextGrid, or a dir of TextGrids (MFA)")
    q.add_argument("--tier", default="phones", help="TextGrid tier with phones (default: phones)")
    q.add_argument("--out", default=None, help="write metrics + count table as JSON")
    q.add_argument("--plot", default=None, help="write a PNG heatmap of P(phone | unit)")
    q.set_defaults(func=_quality)
