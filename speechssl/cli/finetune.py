"""`speechssl finetune`: CTC fine-tuning of a pretrained encoder (run directly, or under torchrun for DDP).

    speechssl finetune --init exp/hubert_iter2/best --train data/train_10min --dev data/dev --units phone \
        --out exp/ft_iter2_10min optim.max_steps=2000
    speechssl finetune --init random:exp/hubert_iter2/best ...     # the untrained baseline, same recipe
    speechssl finetune --init hf_dir --tune adapters tune.layers=3 ...
"""

from __future__ import annotations

import sys


def register(subparsers, help_):
    p = subparsers.add_parser(
        "finetune", help=help_,
        description="CTC fine-tuning of a pretrained encoder (fairseq's hubert_ctc recipe: frozen CNN, encoder frozen "
        "for the first ctc.freeze_updates updates, tri-stage lr, time and channel masking). Settings come from --config "
        "(YAML) and dotted key=value overrides; the options below are shortcuts for init, data.train, data.dev, units, "
        "exp_dir and tune.mode. Run under torchrun for DDP.")
    p.add_argument("--config", help="YAML config (sections: encoder, ctc, tune, data, optim, ckpt)")
    p.add_argument("--init", help="pretrained model: speechssl/transformers dir, fairseq .pt (--trust-pickle), "
                   "or random:CKPT (untrained model of CKPT's config)")
    p.add_argument("--train", help="training data dir (with text, or utt2phones / phones.ctm for --units phone)")
    p.add_argument("--dev", help="validation data dir: its error rate picks EXP/best")
    p.add_argument("--units", help="char | phone | bpe:N")
    p.add_argument("--out", help="experiment dir (exp_dir)")
    p.add_argument("--tune", choices=["full", "adapters", "lora"], help="what is trained (tune.mode)")
    p.add_argument("--trust-pickle", action="store_true", help="allow --init from a fairseq / s3prl pickle")
    p.add_argument("--resume", default=None, metavar="auto|DIR",
                   help="continue the run in EXP with its options (any other defining option is refused): auto = its "
                   "newest complete checkpoint; or a checkpoint dir")
    p.add_argument("--overwrite", action="store_true", help="delete the run in EXP and start over")
    p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied after the options")
    p.set_defaults(func=run)


def run(args) -> int:
    from speechssl.config import load_config, to_yaml
    from speechssl.train.finetune import FinetuneConfig, finetune
    from speechssl.train.trainer import TrainingAborted

    opts = {"init": args.init, "data.train": args.train, "data.dev": args.dev, "units": args.units,
            "exp_dir": args.out, "tune.mode": args.tune}
    overrides = [f"{k}={v}" for k, v in opts.items() if v is not None]
    if args.trust_pickle:
        overrides.append("trust_pickle=true")
    cfg = load_config(FinetuneConfig, args.config, overrides + list(args.overrides))
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    try:
        summary = finetune(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingAborted as e:
        print(f"speechssl finetune: aborted: {e}", file=sys.stderr)
        return 3
    return 0 if summary.get("stop_reason") in ("max_steps", "max_minutes") else 2
