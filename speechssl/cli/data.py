"""`speechssl data ...`: validate, fix, convert to/from lhotse, durations, filter and subset Kaldi data dirs; prepare
Libri-light's limited-supervision splits and speaker-balanced N-minute subsets.

Each verb parses its arguments and calls one library function in `speechssl.data` (``librilight-limited``: in
`speechssl.superb.corpora.librilight`, beside the other corpus preparers).
"""

from __future__ import annotations

import argparse
import sys

from speechssl.cli import verb_group
from speechssl.cli.options import at_least, non_negative, positive
from speechssl.errors import UserError
from speechssl.fileio import check_writable_dir

_AUDIO_CHECKS = ("header", "full")  # speechssl.data.audio_check.AUDIO_CHECKS (not imported: keeps --help fast)


def _validate(args: argparse.Namespace) -> int:
    from speechssl.data.kaldi import DataDirError, read_data_dir

    if args.audio is not None and args.audio not in _AUDIO_CHECKS:
        if args.dir is not None:
            args.parser.error(f"argument --audio: invalid choice {args.audio!r} (choose from {', '.join(_AUDIO_CHECKS)})")
        args.dir, args.audio = args.audio, "header"  # `validate --audio DIR`: a bare --audio followed by the dir
    if args.dir is None:
        args.parser.error("the following arguments are required: dir")
    at_least("--nj", args.nj, 1)
    dd = read_data_dir(args.dir)
    n_spk = len(set(dd.utt2spk.values()))
    seg = f", {len(dd.wav_scp)} recordings (segments)" if dd.segments is not None else ""
    audio = ""
    if args.audio is not None:
        from speechssl.data.audio_check import check_audio, summarise

        problems = check_audio(dd, mode=args.audio, nj=args.nj)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            raise DataDirError(f"{args.dir}: {summarise(problems, dd, args.audio)}")
        audio = f"; audio readable ({args.audio} check)"
    print(f"{args.dir}: OK: {len(dd)} utterances, {n_spk} speakers{seg}{audio}")
    return 0


def _fix(args: argparse.Namespace) -> int:
    from speechssl.data.kaldi import fix_data_dir

    check_writable_dir(args.dir, "data dir")  # fixed in place: its files and .backup/
    r = fix_data_dir(args.dir)
    print(f"{args.dir}: kept {r['utterances_kept']} of {r['utterances_before']} utterances")
    for name, n in sorted(r["dropped"].items()):
        print(f"  dropped {n} utterances missing from {name}")
    for name, n in sorted(r["duplicates_removed"].items()):
        print(f"  removed {n} duplicate lines from {name}")
    if r["recordings_dropped"]:
        print(f"  dropped {r['recordings_dropped']} unused recordings")
    if r["resorted"]:
        print(f"  re-sorted {', '.join(r['resorted'])}")
    print(f"  originals kept in {args.dir}/.backup")
    return 0


def _to_lhotse(args: argparse.Namespace) -> int:
    from speechssl.data.lhotse_io import data_dir_to_lhotse

    check_writable_dir(args.out, "OUT")
    cuts = data_dir_to_lhotse(args.dir, args.out)
    print(f"{args.out}: wrote recordings, supervisions and {len(cuts)} cuts")
    return 0


def _from_lhotse(args: argparse.Namespace) -> int:
    from speechssl.data.lhotse_io import lhotse_to_data_dir

    check_writable_dir(args.out, "OUT")
    dd = lhotse_to_data_dir(args.manifests, args.out, durations=not args.no_durations)
    print(f"{args.out}: wrote {len(dd)} utterances")
    return 0


def _durations(args: argparse.Namespace) -> int:
    from speechssl.data.durations import compute_durations

    at_least("--nj", args.nj, 1)
    check_writable_dir(args.dir, "data dir")  # utt2dur and reco2dur are written into it
    dd = compute_durations(args.dir, nj=args.nj)
    total = sum(dd.utt2dur.values())  # type: ignore[union-attr]
    print(f"{args.dir}: wrote utt2dur and reco2dur: {len(dd)} utterances, {total / 3600:.3f} h")
    return 0


def _filter(args: argparse.Namespace) -> int:
    from speechssl.data.durations import filter_data_dir

    if args.min_duration is None and args.max_duration is None:
        raise UserError("give --min-duration and/or --max-duration")
    non_negative("--min-duration", args.min_duration)
    positive("--max-duration", args.max_duration)
    if args.min_duration is not None and args.max_duration is not None and args.min_duration > args.max_duration:
        raise UserError(f"--min-duration {args.min_duration:g} is above --max-duration {args.max_duration:g}: no "
                        "utterance could pass")
    at_least("--nj", args.nj, 1)
    check_writable_dir(args.out, "OUT")
    kept, dropped = filter_data_dir(args.dir, args.out, min_duration=args.min_duration, max_duration=args.max_duration, nj=args.nj)
    print(f"{args.out}: kept {kept} utterances, dropped {dropped}")
    return 0


def _subset(args: argparse.Namespace) -> int:
    from speechssl.data.kaldi import subset_data_dir

    at_least("--first", args.first, 1)
    check_writable_dir(args.out, "OUT")
    n = subset_data_dir(args.dir, args.out, utt_list=args.utt_list, first=args.first)
    print(f"{args.out}: wrote {n} utterances")
    return 0


def _librilight_limited(args: argparse.Namespace) -> int:
    from speechssl.superb.corpora.librilight import prepare_librilight_limited

    at_least("--nj", args.nj, 1)
    c = prepare_librilight_limited(args.root, args.out, args.split, num_jobs=args.nj)["counts"]
    print(f"{args.out}: Libri-light {args.split}: {c['utterances']} utterances, {c['speakers']} speakers, "
          f"{c['minutes']:.2f} minutes")
    return 0


def _subset_minutes(args: argparse.Namespace) -> int:
    from speechssl.data.subsets import subset_minutes

    positive("--minutes", args.minutes)
    at_least("--nj", args.nj, 1)
    check_writable_dir(args.out, "--out")
    s = subset_minutes(args.data, args.out, args.minutes, args.seed, nj=args.nj)
    print(f"{args.out}: {s['utterances']} utterances, {s['speakers']} speakers, {s['minutes']:.2f} minutes "
          f"(target {args.minutes:g}, seed {args.seed})")
    return 0


def register(subparsers, help_: str) -> None:
    verbs = verb_group(subparsers, "data", help_)

    v = verbs.add_parser(
        "validate",
        usage="speechssl data validate [-h] [--audio [header|full]] [--nj NJ] dir",
        help="check a data dir as Kaldi's validate_data_dir.sh --no-feats does (and more); --audio: its audio too",
        description="Check a data dir's files as Kaldi's validate_data_dir.sh --no-feats does (and more). With --audio, "
        "also open its audio and list every unusable utterance, one line each ('utt ID: SOURCE: PROBLEM'), then "
        "exit 1. --audio / --audio header: every wav.scp entry's header (pipes are run and decoded): missing, "
        "empty, corrupt, zero frames, segments beyond their recording. --audio full: also decode every "
        "utterance as the feature dump does: undecodable or truncated data, NaN/inf samples.",
    )
    v.add_argument("dir", nargs="?")  # optional only to argparse: see _validate (`--audio DIR`)
    v.add_argument(
        "--audio", nargs="?", const="header", default=None, metavar="header|full",
        help="check the audio: 'header' (what a bare --audio means) or 'full' (decode every sample)",
    )
    v.add_argument("--nj", type=int, default=1, help="parallel readers for --audio (default 1)")
    v.set_defaults(func=_validate, parser=v)

    v = verbs.add_parser("fix", help="sort, drop utterances missing from any file, rebuild spk2utt (like fix_data_dir.sh)")
    v.add_argument("dir")
    v.set_defaults(func=_fix)

    v = verbs.add_parser("to-lhotse", help="write recordings/supervisions/cuts.jsonl.gz for a data dir")
    v.add_argument("dir")
    v.add_argument("out", help="output directory for the manifests (may be the data dir itself)")
    v.set_defaults(func=_to_lhotse)

    v = verbs.add_parser("from-lhotse", help="write a Kaldi data dir from lhotse manifests")
    v.add_argument("manifests", help="directory with recordings+supervisions.jsonl.gz, or a cuts manifest file")
    v.add_argument("out")
    v.add_argument("--no-durations", action="store_true", help="do not write utt2dur / reco2dur")
    v.set_defaults(func=_from_lhotse)

    v = verbs.add_parser("durations", help="compute utt2dur and reco2dur from audio headers")
    v.add_argument("dir")
    v.add_argument("--nj", type=int, default=1, help="parallel readers (default 1)")
    v.set_defaults(func=_durations)

    v = verbs.add_parser("filter", help="copy utterances within a duration range to a new data dir")
    v.add_argument("dir")
    v.add_argument("out")
    v.add_argument("--min-duration", type=float, default=None, metavar="SEC")
    v.add_argument("--max-duration", type=float, default=None, metavar="SEC")
    v.add_argument("--nj", type=int, default=1, help="parallel readers when utt2dur is missing")
    v.set_defaults(func=_filter)

    v = verbs.add_parser("subset", help="copy listed (or the first N) utterances to a new data dir")
    v.add_argument("dir")
    v.add_argument("out")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--utt-list", metavar="FILE", help="file with one utterance id per line")
    g.add_argument("--first", type=int, metavar="N", help="the first N utterances in sorted order")
    v.set_defaults(func=_subset)

    v = verbs.add_parser(
        "librilight-limited",
        help="Libri-light's labelled fine-tuning split (10min, 10min:K, 1h, 10h) as a data dir",
        description="Prepare a Libri-light limited-supervision split from a local librispeech_finetuning/ tree "
        "(nothing is downloaded): 10min = 1h/0, 10min:K = fold K of 1h (K = 0..5), 1h = all six folds, "
        "10h = 1h + 9h. Writes one data dir (Kaldi files, lhotse manifests, prepare.json) with LibriSpeech "
        "utterance ids; OUT must not exist and appears only when everything succeeded.",
    )
    v.add_argument("--root", required=True, metavar="DIR", help="the librispeech_finetuning/ directory")
    v.add_argument("--split", required=True, metavar="SPLIT", help="10min, 10min:K (K = 0..5), 1h or 10h")
    v.add_argument("--out", required=True, metavar="DIR", help="output data dir (must not exist)")
    v.add_argument("--nj", type=int, default=1, help="threads reading audio headers (default 1)")
    v.set_defaults(func=_librilight_limited)

    v = verbs.add_parser(
        "subset-minutes",
        help="a speaker-balanced subset of about N minutes (nested across N for one seed)",
        description="Copy a speaker-balanced subset of about --minutes of audio to a new data dir: a seeded "
        "round robin over speakers by audio, cut at the first utterance that would overshoot by more than half "
        "its duration. With the same --seed a smaller subset is contained in a larger one. Uses utt2dur (or "
        "the audio headers); writes utt2dur, lhotse manifests if the source has them, and subset.json.",
    )
    v.add_argument("--data", required=True, metavar="DIR", help="source data dir")
    v.add_argument("--minutes", required=True, type=float, help="target amount of audio in minutes")
    v.add_argument("--out", required=True, metavar="DIR", help="output data dir (must not exist)")
    v.add_argument("--seed", type=int, default=0, help="order of speakers and utterances (default 0)")
    v.add_argument("--nj", type=int, default=1, help="parallel readers when utt2dur is missing (default 1)")
    v.set_defaults(func=_subset_minutes)
