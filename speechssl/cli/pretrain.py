"""`speechssl pretrain`: HuBERT masked-unit pretraining (run directly, or under torchrun for DDP).

    speechssl pretrain --config conf/pretrain_iter1.yaml exp_dir=exp/hubert_iter1 optim.max_steps=1000
    torchrun --nproc_per_node 8 -m speechssl pretrain --config conf/hubert_base_iter1.yaml --resume auto
    speechssl pretrain --config conf/pretrain_iter1.yaml --print-config model.num_hidden_layers=4
    speechssl pretrain --config conf/hubert_base_iter2.yaml ckpt.init_from=models/hubert-base-ls960  # transformers
    speechssl pretrain --config conf/hubert_base_iter2.yaml --trust-pickle ckpt.init_from=hubert_base_ls960.pt
"""

from __future__ import annotations

import sys


def register(subparsers, help_):
    p = subparsers.add_parser(
        "pretrain",
        help=help_,
        description="HuBERT masked-unit pretraining. Settings come from --config (YAML) and dotted key=value "
        "overrides (e.g. optim.lr=1e-3 data.max_duration=60); --print-config shows the merged result. "
        "Run under torchrun for multi-GPU / multi-node DDP.",
    )
    p.add_argument("--config", help="YAML config (sections: model, data, optim, ckpt; top level: exp_dir, seed, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied after --config")
    p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|DIR",
        help="continue the run in exp_dir with its options (any other defining option is refused): auto = its "
        "newest complete checkpoint (none: start fresh); or a checkpoint dir",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in exp_dir (checkpoints, logs, best) and start over")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="let ckpt.init_from unpickle a fairseq / s3prl .pt checkpoint (unpickling can run arbitrary code: only "
        "for files from a source you trust); the same as the override ckpt.trust_pickle=true",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from speechssl.config import load_config, to_yaml
    from speechssl.train.trainer import PretrainConfig, TrainingAborted, pretrain

    overrides = list(args.overrides) + (["ckpt.trust_pickle=true"] if args.trust_pickle else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    try:
        summary = pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingAborted as e:
        print(f"speechssl pretrain: aborted: {e}", file=sys.stderr)
        return 3
    return 0 if summary.get("stop_reason") in ("max_steps", "max_minutes") else 2
