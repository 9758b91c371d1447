"""`speechssl superb`: SUPERB downstream evaluation of a frozen upstream.

    speechssl superb --task pr --upstream exp/hubert_iter2/best --data data --out exp/superb/iter2/pr
    speechssl superb --task sid --upstream fbank --data data --out exp/superb/fbank/sid --lr-sweep 1e-4,1e-3,1e-2
    speechssl superb table 'exp/superb/*/*'
    speechssl superb trials --data data/test_spk --out exp/superb/trials_test_spk
    speechssl superb prepare fluent_speech_commands --corpus FSC --out data/superb/fsc
"""

from __future__ import annotations

import argparse
import sys


# the corpus preparers of speechssl.superb.corpora (`speechssl superb prepare CORPUS ...`)
CORPORA = ("librispeech", "librilight", "speech_commands", "voxceleb1", "iemocap", "fluent_speech_commands",
           "quesst14", "libri2mix", "snips")


def prepare(argv: list[str]) -> int:
    """``speechssl superb prepare CORPUS [options]``: the corpus module's own parser, errors and exit code."""
    import importlib

    if not argv or argv[0] not in CORPORA:
        got = f" {argv[0]!r}" if argv else ""
        print(f"speechssl superb prepare: error: corpus{got}: choose one of {', '.join(CORPORA)} "
              "(speechssl superb prepare CORPUS --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"speechssl.superb.corpora.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


def _task_list() -> str:
    from speechssl.superb.config import TASK_HELP

    return "\n".join(f"  {t:<4} {h}" for t, h in TASK_HELP.items())


def register(subparsers, help_):
    p = subparsers.add_parser(
        "superb", help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{help_}.\n\nTrain a task head on a frozen upstream (lr picked on dev, reported on test):\n"
        "  speechssl superb --task T --upstream U --data DIR --out EXP [options] [key=value ...]\n"
        "Other verbs:\n  speechssl superb table RESULTS_GLOB... [--out FILE]   one markdown table (rows: upstreams, "
        "columns: tasks)\n  speechssl superb trials --data DIR --out FILE [--per-utt 2] [--seed 0]   speaker-"
        "verification trials from utt2spk\n  speechssl superb prepare CORPUS --corpus DIR --out DIR [...]   a real "
        f"corpus as data dirs (CORPUS: {', '.join(CORPORA)}; CORPUS --help: its options)\n\n"
        f"tasks:\n{_task_list()}\n\n"
        "upstreams: a checkpoint dir (speechssl or transformers), random:CKPT (untrained model of CKPT's config), "
        "fbank (80-d), mfcc (39-d).",
    )
    from speechssl.superb.config import TASKS

    p.add_argument("--task", choices=TASKS, help="the task (see above)")
    p.add_argument("--upstream", help="checkpoint dir | random:CKPT | fbank | mfcc")
    p.add_argument("--data", help="dir with train/ dev/ test/ Kaldi data dirs (er: one data dir with utt2session)")
    p.add_argument("--train", help="training data dir (overrides DATA/train)")
    p.add_argument("--dev", help="dev data dir (overrides DATA/dev)")
    p.add_argument("--test", help="test data dir (overrides DATA/test)")
    p.add_argument("--out", help="run directory (results.json, layer weights, checkpoints)")
    p.add_argument("--conf", help="YAML overriding the task's SUPERB defaults (featurizer, head, optim, ...)")
    p.add_argument("--lr-sweep", help="comma-separated learning rates, e.g. 1e-5,1e-4,1e-3,1e-2 (picked on dev)")
    p.add_argument("--max-steps", type=int, help="training steps per learning rate (= optim.max_steps)")
    p.add_argument("--seed", type=int, default=0, help="head init and batch order seed (default 0)")
    p.add_argument("--cache", choices=["disk", "none"], default="disk",
                   help="disk: extract the upstream's layers once into a float16 feature cache (default); "
                        "none: run the upstream on every step")
    p.add_argument("--cache-dir", help="feature cache root (default: OUT/../feature_cache)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT with its options (finished lrs are reused; a finished run prints its "
                   "result); another task, upstream, data, seed, sweep or config is refused")
    p.add_argument("--overwrite", action="store_true", help="delete the run in OUT and start over")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dev-trials", help="asv: dev trials file (default DEV/trials)")
    p.add_argument("--test-trials", help="asv: test trials file (default TEST/trials)")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in OUT/lr_*/tensorboard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the merged task config as YAML and exit")
    p.add_argument("--per-utt", type=int, default=2, help="trials: target and non-target trials per utterance")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides (optim.max_duration=60 head.proj_dim=128); `table` / `trials` "
                        "as the first word select those verbs")
    p.set_defaults(func=run)


def run(args) -> int:
    from speechssl.errors import UserError

    words = list(args.overrides)
    if words and words[0] in ("table", "trials"):
        return _table(words[1:], args.out) if words[0] == "table" else _trials(args)
    if args.print_config:
        if args.task is None:
            raise UserError("--print-config needs --task (speechssl superb --help lists the tasks)")
        from speechssl.config import to_yaml
        from speechssl.superb.config import load_superb_config

        sys.stdout.write(to_yaml(load_superb_config(args.task, args.conf, words)))
        return 0
    missing = [o for o in ("task", "upstream", "out") if getattr(args, o) is None]
    if missing:
        raise UserError(f"missing --{' --'.join(missing)} (speechssl superb --help lists the tasks)")
    sweep = None
    if args.lr_sweep:
        try:
            sweep = [float(x) for x in args.lr_sweep.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--lr-sweep {args.lr_sweep!r}: expected numbers like 1e-4,1e-3") from None
        if not sweep or any(not lr > 0 for lr in sweep):
            raise UserError(f"--lr-sweep {args.lr_sweep!r}: learning rates must be > 0, like 1e-4,1e-3")
    from speechssl.superb.runner import run_superb

    r = run_superb(args.task, args.upstream, args.out, data=args.data, train=args.train, dev=args.dev,
                   test=args.test, conf=args.conf, overrides=words, lr_sweep=sweep, max_steps=args.max_steps,
                   seed=args.seed, cache=args.cache, cache_dir=args.cache_dir, resume=args.resume,
                   overwrite=args.overwrite,
                   device=args.device, dev_trials=args.dev_trials, test_trials=args.test_trials,
                   progress=not args.no_progress, tensorboard=args.tensorboard)
    print(f"{r['task']} {r['upstream_label']}: test " + " ".join(f"{k}={v:.4f}" for k, v in r["test"].items())
          + f" (lr {r['lr']}, {r['timing']['total_s']:.0f} s)")
    return 0


def _table(patterns: list[str], out: str | None) -> int:
    from speechssl.errors import UserError
    from speechssl.fileio import atomic_write_text
    from speechssl.superb.table import results_table

    if not patterns:
        raise UserError("superb table: give results.json files or run dirs (globs), e.g. 'exp/superb/*/*'")
    table = results_table(patterns)
    sys.stdout.write(table)
    if out:
        atomic_write_text(out, table)
    return 0


def _trials(a) -> int:
    from speechssl.data.kaldi import read_data_dir
    from speechssl.errors import UserError
    from speechssl.fileio import atomic_write_text, check_writable_file
    from speechssl.superb.tasks import make_trials

    if not a.data or not a.out:
        raise UserError("superb trials: give --data DIR and --out FILE")
    check_writable_file(a.out, "--out")
    if a.per_utt < 1:
        raise UserError(f"superb trials: --per-utt must be >= 1 (target and non-target trials per utterance), got "
                        f"{a.per_utt}")
    trials = make_trials(read_data_dir(a.data), per_utt=a.per_utt, seed=a.seed)
    atomic_write_text(a.out, "".join(f"{e} {t} {'target' if y else 'nontarget'}\n" for e, t, y in trials))
    print(f"{a.out}: {len(trials)} trials ({sum(y for *_, y in trials)} target)")
    return 0
