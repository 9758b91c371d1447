"""``speechssl decode``: a fine-tuned CTC model over a data dir -> hypotheses and error rates.

:func:`decode` loads any fine-tuned model :func:`speechssl.train.finetune.load_finetuned` reads (ours, full or
adapters / LoRA on their base, or a transformers ``HubertForCTC`` / ``Wav2Vec2ForCTC`` directory), runs it over every
utterance of the data dir in duration-sorted batches (each row's output is its utterance's alone: the padding of a
batch changes nothing), decodes greedily or with :class:`speechssl.asr.beam.BeamDecoder` (optionally with a word
n-gram LM), and writes to ``out_dir`` in one atomic rename:

* ``hyp.txt``: ``uttid hypothesis`` (words; phones for phone units), sorted as Kaldi sorts;
* ``ref.txt``: the references, when the data dir has them (``text``; ``utt2phones`` / ``phones.ctm`` for phones);
* ``scores.json``: WER and CER (jiwer, corpus level), or PER for phones, the utterance count, the model and
  decoder settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from speechssl.errors import MissingInputError, UserError
from speechssl.fileio import atomic_dir

log = logging.getLogger(__name__)

__all__ = ["decode", "check_decode_options"]


def check_decode_options(*, beam: int, lm: str | None, lm_weight: float, word_score: float,
                         batch_seconds: float) -> None:
    """The decoder options in range, before the model is loaded (one line naming the option)."""
    if not isinstance(beam, int) or beam < 0:
        raise UserError(f"--beam must be >= 0 (0: greedy best path), got {beam}")
    if lm and not beam:
        raise UserError("--lm needs a beam search: give --beam N (e.g. 50)")
    for option, value in (("--lm-weight", lm_weight), ("--word-score", word_score)):
        if not math.isfinite(value):
            raise UserError(f"{option} must be a finite number, got {value}")
    if not (batch_seconds > 0 and math.isfinite(batch_seconds)):
        raise UserError(f"--batch-seconds must be > 0, got {batch_seconds}")
    if lm and not Path(lm).is_file():
        raise MissingInputError(f"--lm {lm}: no such file (an ARPA word n-gram)")


def decode(ckpt: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, beam: int = 0,
           lm: str | None = None, lm_weight: float = 0.5, word_score: float = 0.0, batch_seconds: float = 120.0,
           device: str = "cpu", trust_pickle: bool = False, bf16: bool | None = None) -> dict[str, Any]:
    """Decode ``data_dir`` with the fine-tuned model ``ckpt``; ``beam`` 0 = greedy (best path), else beam search of
    that width (with ``lm``: an ARPA word n-gram, ``lm_weight``, ``word_score``). ``bf16``: the encoder under bf16
    autocast (None: as the fine-tuning run validated, so that decoding dev repeats its validation, where the device
    supports it; float32 for a checkpoint that does not say, e.g. a transformers directory; the CTC scores are
    float32 either way). Returns the scores dict."""
    from speechssl.data.kaldi import load_utterance, read_data_dir
    from speechssl.progress import progress_bar
    from speechssl.superb import metrics
    from speechssl.asr.checkpoint import load_finetuned
    from speechssl.train.finetune import greedy_tokens
    from speechssl.train.tokens import read_transcripts

    check_decode_options(beam=beam, lm=lm, lm_weight=lm_weight, word_score=word_score, batch_seconds=batch_seconds)
    model, tok = load_finetuned(ckpt, trust_pickle=trust_pickle)
    from speechssl.train.distributed import bf16_supported

    model = model.to(device).eval()
    dev = torch.device(device)
    if bf16 is None:
        trained = _trained_bf16(Path(ckpt))
        bf16 = bool(trained) and bf16_supported(dev)
    dd = read_data_dir(data_dir)
    utts = list(dd.utterances())
    if not utts:
        raise UserError(f"{data_dir}: no utterances to decode")
    refs: dict[str, str] | None = None
    try:
        raw, ref_path = read_transcripts(data_dir, tok.units)
    except MissingInputError:
        raw = None
        log.info("%s: no references; writing hypotheses only", data_dir)
    if raw is not None:
        missing = [u.utt_id for u in utts if u.utt_id not in raw]
        if missing:
            raise UserError(f"{ref_path}: no reference for utterance {missing[0]} ({len(missing)} missing)")
        refs = {u.utt_id: tok.detok(tok.tokens(raw[u.utt_id])) for u in utts}
    searcher = None
    if beam:
        from speechssl.asr.beam import BeamDecoder

        searcher = BeamDecoder(tok.vocab, blank=0, word_delim=tok.word_delim, lm=lm, beam=beam,
                               lm_weight=lm_weight, word_score=word_score)

    # duration-sorted batches of at most batch_seconds of audio (padding included): utt2dur, else the audio headers
    from speechssl.data.durations import durations_of

    durs = durations_of(dd, [u.utt_id for u in utts])
    order = sorted(utts, key=lambda u: (durs[u.utt_id], u.utt_id))
    batches, cur, longest = [], [], 0.0
    for u in order:
        longest2 = max(longest, durs[u.utt_id])
        if cur and longest2 * (len(cur) + 1) > batch_seconds:
            batches.append(cur)
            cur, longest2 = [], durs[u.utt_id]
        cur.append(u)
        longest = longest2
    if cur:
        batches.append(cur)

    hyps: dict[str, str] = {}
    bar = progress_bar(total=len(utts), desc="decode", unit="utt")
    with torch.no_grad():
        for group in batches:
            wavs = [torch.from_numpy(load_utterance(u)) for u in group]
            for u, w in zip(group, wavs):
                if w.numel() == 0:
                    raise UserError(f"{data_dir}: utterance {u.utt_id} has no audio")
            lens = torch.tensor([len(w) for w in wavs])
            batch = torch.zeros(len(wavs), int(lens.max()))
            for i, w in enumerate(wavs):
                batch[i, : len(w)] = w
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(bf16)):
                logits, frame_lens = model.logits(batch.to(device), lens.to(device))
            if searcher is None:
                toks = greedy_tokens(logits, frame_lens, tok.vocab)
            else:
                toks = searcher.decode_batch(logits.log_softmax(-1).cpu(), frame_lens.cpu())
            for u, t in zip(group, toks):
                hyps[u.utt_id] = tok.detok(t)
            bar.update(len(group))
    bar.close()

    ids = sorted(hyps, key=lambda s: s.encode())
    scores: dict[str, Any] = {"checkpoint": str(ckpt), "data": str(data_dir), "utterances": len(ids),
                              "units": tok.units, "decoder": "beam" if beam else "greedy", "beam": beam,
                              "bf16": bool(bf16),
                              "lm": lm, "lm_weight": lm_weight if lm else None,
                              "word_score": word_score if lm else None}
    if refs is not None:
        r = [refs[u] for u in ids]
        h = [hyps[u] for u in ids]
        if tok.units == "phone":
            scores["per"] = metrics.per([x.split() for x in r], [x.split() for x in h])
        else:
            scores["wer"] = metrics.wer(r, h)
            scores["cer"] = metrics.cer(r, h)
    _write_outputs(Path(out_dir), ids, hyps, refs, scores)
    shown = " ".join(f"{k.upper()} {100 * scores[k]:.2f}%" for k in ("wer", "cer", "per") if k in scores)
    log.info("decoded %d utterances of %s with %s (%s): %s -> %s", len(ids), data_dir, ckpt, scores["decoder"],
             shown or "no references", out_dir)
    return scores


def _trained_bf16(ckpt: Path) -> bool | None:
    """Whether the fine-tuning run of a speechssl checkpoint validated under bf16 (None: not recorded)."""
    try:
        extra = json.loads((ckpt / "config.json").read_text()).get("extra", {})
    except (OSError, ValueError, AttributeError):
        return None
    value = extra.get("bf16") if isinstance(extra, dict) else None
    return value if isinstance(value, bool) else None


def _write_outputs(out: Path, ids: list[str], hyps: dict[str, str], refs: dict[str, str] | None,
                   scores: dict[str, Any]) -> None:
    """hyp.txt, ref.txt, scores.json into ``out`` in one rename: a half-written result never looks finished."""
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "hyp.txt").write_text("".join(f"{u} {hyps[u]}\n" for u in ids), encoding="utf-8")
        if refs is not None:
            (tmp / "ref.txt").write_text("".join(f"{u} {refs[u]}\n" for u in ids), encoding="utf-8")
        (tmp / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
