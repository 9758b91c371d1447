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

import json
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
    from speechssl.models.checkpoint import CheckpointError, load_model, load_weights, read_config

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{path}: no config.json (expected a fine-tuned checkpoint directory)")
    meta = json.loads((path / "config.json").read_text())
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
    tok = Tokenizer.from_dict(extra["tokenizer"])
    if "partial" not in meta:
        from speechssl.models.frontend import set_per_row_norm

        return set_per_row_norm(load_model(path)), tok
    part = meta["partial"]
    tune = TuneConfig(**extra["tune"])
    model, sha1 = build_ctc_model(part["base"], None, CTCHeadConfig.from_dict(meta["ctc"]), tune,
                                  trust_pickle=trust_pickle)
    if sha1 != part["base_sha1"]:
        raise CheckpointError(f"{path}: tuned on base {part['base']} with weights SHA-1 {part['base_sha1']}, but "
                              f"{part['base']} now holds {sha1}; the adapters / LoRA only make sense on their base")
    load_weights(model, path)
    return model.eval(), tok
