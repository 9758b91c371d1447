"""`speechssl export --ckpt CKPT --to hf|s3prl OUT`: a checkpoint as a transformers directory or an s3prl checkpoint.

CKPT is anything :func:`speechssl.upstream.load` reads: a speechssl checkpoint directory, a transformers directory,
``random:CKPT``, or (only with ``--trust-pickle``) a fairseq / s3prl ``.pt`` file.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from speechssl.errors import UserError

FORMATS = {
    "hf": "a directory transformers' AutoModel.from_pretrained loads (HubertModel, Wav2Vec2Model or WavLMModel: "
          "config.json, model.safetensors, preprocessor_config.json)",
    "s3prl": "s3prl's converted HuBERT checkpoint (one .pt file: task_cfg, model_cfg, model_weight, "
             "dictionaries_symbols), for s3prl's hubert_local upstream",
}


def register(subparsers, help_: str) -> None:
    p = subparsers.add_parser("export", help=help_, description=inspect.cleandoc(_export.__doc__ or ""))
    p.add_argument("--ckpt", required=True,
                   help="speechssl or transformers checkpoint directory, random:CKPT, or (with --trust-pickle) a "
                        "fairseq / s3prl .pt file")
    p.add_argument("--to", required=True, choices=sorted(FORMATS),
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickle checkpoint (fairseq / s3prl .pt); unpickling can run arbitrary code, so "
                        "only for files from a source you trust")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("out", metavar="OUT", help="output directory (hf) or .pt file (s3prl)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    """Write the encoder of a checkpoint in another toolkit's format. `--to hf`: a transformers directory
    (waveform-CNN models; HuBERT, wav2vec 2.0 and WavLM encoders as their transformers classes). `--to s3prl`: s3prl's
    converted HuBERT checkpoint (waveform-CNN HuBERT; a speechssl checkpoint keeps its pretraining head, other
    sources get s3prl's "no dictionary" head). OUT is written atomically; an existing OUT needs --overwrite."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    if args.to == "s3prl" and out.is_dir():
        raise UserError(f"{out}: a directory; --to s3prl writes one .pt file")
    if args.to == "hf" and out.exists() and not out.is_dir():
        raise UserError(f"{out}: a file; --to hf writes a directory")
    source = _source(args.ckpt, args.trust_pickle)
    if args.to == "hf":
        from speechssl.models import export_hf

        export_hf(source, out)
        print(f"wrote {out} (transformers directory: AutoModel.from_pretrained('{out}'))")
    else:
        from speechssl.models.fairseq import export_s3prl

        export_s3prl(source, out)
        print(f"wrote {out} (s3prl converted HuBERT checkpoint: -u hubert_local -k {out})")
    return 0


def _source(ckpt: str, trust_pickle: bool):
    """A speechssl checkpoint directory as it is (the exporters read it themselves, head included); anything
    else as the encoder :func:`speechssl.upstream.load` builds from it."""
    from speechssl.models.checkpoint import CheckpointError, read_config
    from speechssl.upstream import RANDOM_PREFIX, load

    path = Path(ckpt)
    if not ckpt.startswith(RANDOM_PREFIX) and path.is_dir():
        try:
            read_config(path)
            return path
        except (CheckpointError, ValueError):  # a transformers directory, or a broken one: load() says which
            pass
    # the exporters need the weights themselves, not features: the one place outside upstream that takes .model
    return load(ckpt, trust_pickle=trust_pickle).model
