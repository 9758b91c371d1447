"""`speechssl export --ckpt CKPT --to hf|s3prl OUT`: a checkpoint as a transformers directory or an s3prl checkpoint.

CKPT is anything :func:`speechssl.upstream.load` reads: a speechssl checkpoint directory, a transformers directory,
``random:CKPT``, or (only with ``--trust-pickle``) a fairseq / s3prl ``.pt`` file.

A fine-tuned CTC checkpoint (``speechssl finetune``'s ``EXP/best``, full or adapters / LoRA on its base; read by
:func:`speechssl.asr.checkpoint.load_finetuned`) goes ``--to hf`` as a ``HubertForCTC`` / ``Wav2Vec2ForCTC`` /
``WavLMForCTC`` directory with its processor (:func:`speechssl.models.hf.export_hf_ctc`: LoRA merged, adapters
refused); ``--encoder-only`` writes its encoder alone, as for a pretraining checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from speechssl.errors import UserError
from speechssl.fileio import check_writable_dir, check_writable_file

FORMATS = {
    "hf": "a directory transformers' AutoModel.from_pretrained loads (HubertModel, Wav2Vec2Model or WavLMModel: "
          "config.json, model.safetensors, preprocessor_config.json); for a wav2vec 2.0 pretraining checkpoint, "
          "Wav2Vec2ForPreTraining with its quantizer and projections; for a fine-tuned CTC checkpoint, "
          "AutoModelForCTC + AutoProcessor (HubertForCTC, Wav2Vec2ForCTC or WavLMForCTC; vocab.json, "
          "tokenizer_config.json)",
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
    p.add_argument("--encoder-only", action="store_true",
                   help="for a fine-tuned CTC checkpoint with --to hf: write the encoder alone (AutoModel), without "
                        "lm_head and tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("out", metavar="OUT", help="output directory (hf) or .pt file (s3prl)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    """Write the encoder of a checkpoint in another toolkit's format. `--to hf`: a transformers directory
    (waveform-CNN models; HuBERT, wav2vec 2.0 and WavLM encoders as their transformers classes); a fine-tuned CTC
    checkpoint (full, or LoRA merged into its base; not adapters; char or phone units) becomes a *ForCTC directory
    with its processor (vocab.json: the blank as <pad>, | the word delimiter), unless --encoder-only.
    `--to s3prl`: s3prl's converted HuBERT checkpoint (waveform-CNN HuBERT; a speechssl checkpoint keeps its
    pretraining head, other sources get s3prl's "no dictionary" head). OUT is written atomically; an existing OUT
    needs --overwrite."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    if args.to == "s3prl" and out.is_dir():
        raise UserError(f"{out}: a directory; --to s3prl writes one .pt file")
    if args.to == "hf" and out.exists() and not out.is_dir():
        raise UserError(f"{out}: a file; --to hf writes a directory")
    # before the checkpoint is loaded; OUT itself appears by one rename
    (check_writable_dir if args.to == "hf" else check_writable_file)(out, "OUT")
    if args.to == "hf" and _is_finetuned(args.ckpt):
        _export_finetuned(args.ckpt, out, encoder_only=args.encoder_only, trust_pickle=args.trust_pickle)
        return 0
    if args.encoder_only and args.to != "hf":
        raise UserError("--encoder-only goes with --to hf (s3prl checkpoints hold an encoder only anyway)")
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


def _is_finetuned(ckpt: str) -> bool:
    """True for a speechssl checkpoint directory of a fine-tuned :class:`~speechssl.models.ctc.CTCModel`."""
    from speechssl.models.checkpoint import CheckpointError, read_config

    path = Path(ckpt)
    if not path.is_dir():
        return False
    try:
        _, meta = read_config(path)
    except (CheckpointError, ValueError):
        return False
    return meta.get("model_class") == "CTCModel"


def _export_finetuned(ckpt: str, out: Path, *, encoder_only: bool, trust_pickle: bool) -> None:
    """A fine-tuned checkpoint (full or partial) as a transformers *ForCTC directory, or its encoder alone."""
    from speechssl.asr.checkpoint import load_finetuned
    from speechssl.models.hf import export_hf, export_hf_ctc

    model, tok = load_finetuned(ckpt, trust_pickle=trust_pickle)
    if encoder_only:
        from speechssl.models.peft import merge_lora

        merge_lora(model)  # our own freshly loaded copy; export_hf refuses LoRA modules and adapters
        export_hf(model.hubert, out)
        print(f"wrote {out} (transformers directory, encoder only: AutoModel.from_pretrained('{out}'))")
        return
    if tok.units not in ("char", "phone"):
        raise UserError(f"{ckpt}: {tok.units} units cannot go to transformers: its CTC tokenizers decode characters "
                        "(Wav2Vec2CTCTokenizer) or space-separated phones (Wav2Vec2PhonemeCTCTokenizer), not "
                        "sentencepiece pieces; export the encoder alone with --encoder-only, or decode with speechssl")
    export_hf_ctc(model, tok.vocab, tok.word_delim, out)
    print(f"wrote {out} (transformers directory: AutoModelForCTC.from_pretrained('{out}'), "
          f"AutoProcessor.from_pretrained('{out}'))")


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
