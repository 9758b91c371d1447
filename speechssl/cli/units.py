"""`speechssl units quality|layers|best-layer`: PNMI, phone purity and cluster purity of unit labels against phone
alignments; the same for k-means units of every hidden layer of a checkpoint (what each layer learned), beside those
of an untrained model of the same config and of MFCC; the layer the next iteration's units come from."""

from __future__ import annotations

import argparse
import sys

from speechssl.cli import verb_group
from speechssl.cli.kmeans import add_fit_options, fit_options


def _quality(args: argparse.Namespace) -> int:
    """Frame-level phone (the phone covering each frame centre) vs unit statistics. Labelled utterances without
    alignment are skipped and counted. An alignment may end before its audio (those frames are unscored) or run
    past it (the overhang is clipped), as forced aligners' output does; both are counted and reported
    (utterances, frames, largest gap). A gap of more than max(0.5 s, 10% of the utterance) means the alignment
    belongs to other audio: an error naming the utterance."""
    from speechssl.fileio import check_writable_file
    from speechssl.units.quality import label_quality

    for path, option in ((args.out, "--out"), (args.plot, "--plot")):
        if path is not None:
            check_writable_file(path, option)
    report = label_quality(args.labels, args.alignments, tier=args.tier, out_json=args.out, plot=args.plot)
    print(report.summary())
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _layers(args: argparse.Namespace) -> int:
    """For each hidden layer: k-means (as `kmeans fit`: uniform frame sample, k-means++ + Lloyd) on a sample drawn
    in one model pass, then a second pass assigns every frame and counts (phone, unit) pairs; nothing is dumped
    to disk. With --spectral, units of MFCC or fbank at the same k, sample fraction and seed on the same
    utterances, each scored at its own frame rate. Unless --no-baseline, an untrained model of the checkpoint's
    config (seeded with --seed) goes through the same passes (same utterances, sample and k): its PNMI/purities
    per layer and each layer's PNMI ratio to it. Writes OUT/layers.json (best_layer = argmax PNMI of the trained
    model) and OUT/layers.png (random init as a second line beside MFCC)."""
    from speechssl.cli.kmeans import _passive_omp

    _passive_omp()
    from speechssl.fileio import check_writable_dir
    from speechssl.units.layers import evaluate_layers, select_utterances

    opts = fit_options(args)  # checked, --k too
    select_utterances([], max_utts=args.max_utts, subset_frac=args.subset_frac)  # their range checks
    if args.out is not None:
        check_writable_dir(args.out, "--out")  # before both model passes, not after them
    evaluate_layers(args.ckpt, args.data, args.alignments, k=args.k, mfcc=args.mfcc, layers=args.layers,
                    max_utts=args.max_utts, subset_frac=args.subset_frac, tier=args.tier, device=args.device,
                    baseline=not args.no_baseline, out_dir=args.out, **opts)
    return 0


def _best_layer(args: argparse.Namespace) -> int:
    """Prints the hidden-state index (0 = encoder input, i = output of transformer layer i) alone on stdout and the
    rule used on stderr. With a per-layer report (`units layers`: layers.json): its best_layer, the argmax of
    PNMI. Without one (no phone alignments): the HuBERT paper's choice scaled to depth,
    ceil(num_hidden_layers / 2) of the checkpoint (Base: layer 6 of 12)."""
    from speechssl.units.best_layer import choose_layer

    choice = choose_layer(ckpt=args.ckpt, layers_json=args.layers_json, exp_dir=args.exp)
    print(f"speechssl units best-layer: {choice.reason}", file=sys.stderr)
    print(choice.layer)
    return 0


def register(subparsers, help_):
    verbs = verb_group(subparsers, "units", help_)
    q = verbs.add_parser("quality", help="phone purity, cluster purity, PNMI (HuBERT paper IV-F)",
                         description=_quality.__doc__)
    q.add_argument("--labels", required=True, help="label dir (text.km + meta.json)")
    q.add_argument("--alignments", required=True, help="Kaldi CTM file, a TextGrid, or a dir of TextGrids (MFA)")
    q.add_argument("--tier", default="phones", help="TextGrid tier with phones (default: phones)")
    q.add_argument("--out", default=None, help="write metrics + count table as JSON")
    q.add_argument("--plot", default=None, help="write a PNG heatmap of P(phone | unit)")
    q.set_defaults(func=_quality)

    lay = verbs.add_parser(
        "layers", help="PNMI / purities of k-means units of every hidden layer of a checkpoint (and of MFCC)",
        description=_layers.__doc__)
    lay.add_argument("--ckpt", required=True, help="checkpoint dir (model.safetensors + config.json)")
    lay.add_argument("--data", required=True, help="Kaldi data dir")
    lay.add_argument("--alignments", required=True, help="Kaldi CTM file, a TextGrid, or a dir of TextGrids")
    add_fit_options(lay)  # --k and the options of `kmeans fit`, applied to every layer's sample
    lay.add_argument("--spectral", "--mfcc", dest="mfcc", default=None, metavar="STORE",
                     help="spectral feature store of the same data dir (MFCC, or fbank as the mini_synth iteration-1 "
                          "targets): baseline units at the same k")
    lay.add_argument("--layers", default="all", help="'all' (default) or comma-separated hidden-state indices")
    lay.add_argument("--max-utts", type=int, default=None, help="evaluate on a random subset of N utterances")
    lay.add_argument("--subset-frac", type=float, default=None, help="evaluate on a random fraction of utterances")
    lay.add_argument("--tier", default="phones", help="TextGrid tier with phones (default: phones)")
    lay.add_argument("--device", default="auto", help="auto | cpu | cuda")
    lay.add_argument("--no-baseline", action="store_true",
                     help="skip the random-init baseline (an untrained model of the same config; on by default)")
    lay.add_argument("--out", default=None, help="output dir for layers.json + layers.png (default: print only)")
    lay.set_defaults(func=_layers)

    best = verbs.add_parser(
        "best-layer", help="the hidden layer for the next iteration's units: best PNMI, or the middle layer",
        description=_best_layer.__doc__)
    best.add_argument("--exp", default=None, metavar="DIR",
                      help="an iteration's exp dir: --ckpt DIR/best, and --layers-json DIR/layers/layers.json if "
                           "that file exists")
    best.add_argument("--ckpt", default=None, help="checkpoint dir (its config.json gives the depth)")
    best.add_argument("--layers-json", default=None, metavar="FILE",
                      help="a `units layers` report; must exist when given (checked against --ckpt's weights)")
    best.set_defaults(func=_best_layer)
