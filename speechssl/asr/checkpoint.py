"""A fine-tuned CTC model back from disk, with its tokenizer: :func:`load_finetuned` (what ``speechssl decode`` and
``speechssl export`` read).

* a speechssl checkpoint of :class:`~speechssl.models.ctc.CTCModel` (``speechssl finetune``'s ``EXP/best`` or a step):
  built and loaded by :func:`speechssl.models.checkpoint.load_model`;
* a *partial* one (``tune`` adapters / LoRA): only the trained tensors, on the frozen base their ``config.json``
  names; the base is rebuilt exactly as fine-tuning built it
  (:func:`speechssl.train.finetune.build_ctc_model`) after checking that its weights still have the SHA-1 recorded
  at training time, then the trained tensors are loaded over it;
* a transformers ``HubertForCTC`` / ``Wav2Vec2ForCTC`` directory with its ``vocab.json``
  (:func:`speechssl.models.hf.load_hf_ctc`): ``<pad>`` is the blank, ``|`` the word delimiter.
"""

from __future__ import annotations

from pathlib import Path

from speechssl.models.ctc import CTCHeadConfig, CTCModel
from speechssl.train.finetune import TuneConfig, build_ctc_model
from speechssl.train.tokens import BLANK, WORD_DELIM, Tokenizer

__all__ = ["load_finetuned"]


def load_finetuned(path: str | Path, *, trust_pickle: bool = False) -> tuple[CTCModel, Tokenizer]:
    """A fine-tuned model in eval mode and its tokenizer, from a speechssl checkpoint (full, or partial: adapters or
    LoRA, rebuilt on its base after checking the base's SHA-1) or a transformers ``HubertForCTC`` /
    ``Wav2Vec2ForCTC`` directory (``vocab.json``; its ``<pad>`` is the blank)."""
    from speechssl.errors import MissingInputError
    from speechssl.models.checkpoint import (REDO, CheckpointError, checkpoint_dir, load_model, load_weights,
                                             read_config, read_json)

    path = checkpoint_dir(path)  # a checkpoint's model.safetensors or config.json: name its directory
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{path}: no config.json (expected a fine-tuned checkpoint directory)")
    meta = read_json(path / "config.json")
    if meta.get("format") != "speechssl-hubert":
        from speechssl.models.hf import load_hf_ctc

        model, vocab, delim = load_hf_ctc(path)
        units = "char" if delim is not None else "phone"
        vocab = [BLANK] + [(WORD_DELIM if t == delim else t) for t in vocab[1:]]
        from speechssl.models.frontend import set_per_row_norm

        return set_per_row_norm(model.eval()), Tokenizer(units, vocab)
    _, meta = read_config(path)
    if meta.get("model_class") != "CTCModel":
        raise CheckpointError(f"{path}: a {meta.get('model_class')} checkpoint, not a fine-tuned (CTC) one; "
                              "fine-tune it first (speechssl finetune --init ...)")
    extra = meta.get("extra", {})
    try:
        tok = Tokenizer.from_dict(extra["tokenizer"])
        part = meta.get("partial")
        tune = TuneConfig(**extra["tune"]) if part is not None else None
        if part is not None:
            base, base_sha1 = str(part["base"]), part["base_sha1"]
            head = CTCHeadConfig.from_dict(meta["ctc"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # UserError is a ValueError
        what = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise CheckpointError(f"{path / 'config.json'}: fine-tuning record unusable ({what}); {REDO}") from None
    if part is None:
        from speechssl.models.frontend import set_per_row_norm

        return set_per_row_norm(load_model(path)), tok
    model, sha1 = build_ctc_model(base, None, head, tune, trust_pickle=trust_pickle)
    if sha1 != base_sha1:
        raise CheckpointError(f"{path}: tuned on base {base} with weights SHA-1 {base_sha1}, but "
                              f"{base} now holds {sha1}; the adapters / LoRA only make sense on their base")
    load_weights(model, path)
    return model.eval(), tok
