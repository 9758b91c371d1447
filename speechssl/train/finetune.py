"""CTC fine-tuning of a pretrained encoder (``speechssl finetune``): fairseq's ``hubert_ctc`` / ``wav2vec_ctc`` recipe
on the pretraining trainer.

Read top to bottom: the config (:class:`FinetuneConfig`, defaults = fairseq ``examples/hubert/config/finetune/
base_10h.yaml``), the data (:class:`CTCDataset`: whole utterances, padded, never cropped, with their token ids),
:class:`FinetuneTrainer` (the hooks of :class:`speechssl.train.trainer.Trainer` it overrides: model, data,
learning rate, validation by error rate, checkpoint contents; the loop, resume, DDP, bf16, signals and budgets are the
pretraining trainer's), then :func:`finetune`. Reading a fine-tuned model back (ours, full or partial, or a
transformers ``*ForCTC`` directory) is :func:`speechssl.asr.checkpoint.load_finetuned`.

The recipe (fairseq name in brackets where it differs):

* the encoder of ``init`` (anything :func:`speechssl.upstream.load` reads, or ``random:CKPT``: the untrained model
  of that config) plus a linear CTC head over ``units`` (``char`` with ``|`` between words, ``phone``, ``bpe:N``);
* the waveform CNN (or fbank conv) frozen: ``encoder.feature_grad_mult=0``; the transformer frozen for the first
  ``ctc.freeze_updates`` updates (``freeze_finetune_updates``), only the head learning meanwhile;
* tri-stage learning rate (``train/schedule.py:tri_stage_lr``), Adam (betas 0.9/0.98, eps 1e-8, no weight decay);
* time masking (``ctc.mask_time_prob`` 0.75, length 10) and channel masking (0.5, length 64), LayerDrop 0.1,
  activation dropout 0.1, other dropouts 0 (``encoder.*`` overrides the checkpoint's regularisation settings);
* CTC loss averaged over utterances (``sentence_avg``), ``zero_infinity``; validation WER (CER; PER for phones) by
  greedy decoding picks ``EXP/best``.

Parameter-efficient tuning (``tune=adapters|lora``, :mod:`speechssl.models.peft`): the encoder frozen, bottleneck
adapters or LoRA trained with the head. Their checkpoints hold only the trained tensors and name the frozen base
(``init``) and the SHA-1 of its weights: ``load_finetuned`` refuses another base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
import torch
from torch import nn

from speechssl.errors import UserError
from speechssl.models.config import HubertConfig
from speechssl.models.ctc import CTCHeadConfig, CTCModel
from speechssl.models.hubert import LABEL_PAD, HubertModel
from speechssl.train import state as st
from speechssl.train.config import CheckpointConfig, OptimConfig
from speechssl.train.data import (
    PretrainData,
    PretrainDataset,
    ResumableBatchSampler,
    _NumFrames,
    _worker_init,
    collate_identity,
    start_loader,
    cut_num_samples,
    load_cuts,
)
from speechssl.train.distributed import all_reduce, barrier
from speechssl.train.schedule import tri_stage_lr
from speechssl.train.tokens import Tokenizer, build_tokenizer, read_transcripts
from speechssl.train.trainer import Trainer, checkpoint_fingerprint

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "CTCDataConfig", "EncoderOverrides", "FinetuneOptimConfig", "TuneConfig",
           "CTCDataset", "FinetuneTrainer", "finetune", "build_ctc_model", "greedy_tokens", "error_counts"]


# ============================================================================================== config
@dataclass
class CTCDataConfig:
    train: str = ""  # data dir (cuts.jsonl.gz or Kaldi files) with transcripts
    dev: str | None = None  # validation data dir: its error rate picks EXP/best
    max_duration: float = 200.0  # seconds of audio per micro-batch per process (fairseq max_tokens 3.2M samples)
    valid_max_duration: float | None = None  # default: max_duration
    min_seconds: float = 0.0  # shorter utterances are skipped
    max_seconds: float | None = None  # longer ones are skipped (never cropped: a crop would cut the transcript)
    num_buckets: int = 30
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_duration <= 0 or self.num_buckets < 1 or self.num_workers < 0 or self.min_seconds < 0:
            raise UserError("need data.max_duration > 0, data.num_buckets >= 1, data.num_workers >= 0, "
                            "data.min_seconds >= 0")
        if self.max_seconds is not None and not self.max_seconds > self.min_seconds:
            raise UserError(f"data.max_seconds must be > data.min_seconds ({self.min_seconds:g}) or null, got "
                            f"{self.max_seconds:g}")


@dataclass
class EncoderOverrides:
    """The encoder's regularisation during fine-tuning (fairseq ``hubert_ctc`` defaults); the architecture is
    the checkpoint's. ``null`` keeps the checkpoint's value."""

    feature_grad_mult: float | None = 0.0  # 0: the CNN / fbank conv frozen
    layerdrop: float | None = 0.1
    hidden_dropout: float | None = 0.0  # (dropout)
    attention_dropout: float | None = 0.0
    activation_dropout: float | None = 0.1
    feat_proj_dropout: float | None = 0.0  # (dropout_input)

    def apply(self, config: HubertConfig) -> HubertConfig:
        changes = {k: v for k, v in vars(self).items() if v is not None}
        return replace(config, **changes)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Adam + tri-stage schedule (``base_10h.yaml``: lr 2e-5, warm-up 8000, hold 0, decay 72000, final scale 0.05,
    25k updates). ``warmup_steps`` / ``max_steps`` / ``lr`` are :class:`OptimConfig`'s."""

    lr: float = 2e-5
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 8000
    hold_steps: int = 0
    decay_steps: int = 72000
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.05
    max_steps: int = 25000
    # the CTC head's learning rate / lr (fairseq: 1, one rate for all). A fresh linear head on a frozen encoder is a
    # probe, and probes want far higher rates than the pretrained encoder can take (SUPERB's phone probe: 1e-2); a
    # short fine-tuning (the CPU demo) spends most of its updates waiting for the head otherwise
    head_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hold_steps < 0 or self.decay_steps < 0 or not 0 < self.final_lr_scale <= 1 or self.head_lr_scale <= 0:
            raise UserError("need optim.hold_steps >= 0, optim.decay_steps >= 0, 0 < optim.final_lr_scale <= 1, "
                            "optim.head_lr_scale > 0")


@dataclass
class FinetuneCheckpointConfig(CheckpointConfig):
    best_by: str = "error"  # the validation error rate (WER; PER for phone units)
    every_steps: int = 1000


@dataclass
class TuneConfig:
    """``full``: every parameter but the frozen frontend; ``adapters``: bottleneck adapters (``adapter_dim``) in
    every transformer layer or the top ``layers``, encoder frozen; ``lora``: LoRA of rank ``lora_rank`` on the
    attention projections (``lora_targets``), encoder frozen. The head always trains."""

    mode: str = "full"
    adapter_dim: int = 64
    layers: int | None = None  # adapters / LoRA in the top N layers only (None: all)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if self.mode not in ("full", "adapters", "lora"):
            raise UserError(f"tune.mode must be full, adapters or lora, got {self.mode!r}")


@dataclass
class FinetuneConfig:
    exp_dir: str = "exp/finetune"
    init: str = ""  # the pretrained model: a speechssl / transformers dir, a fairseq .pt, or random:CKPT
    trust_pickle: bool = False  # allow init from a pickle (fairseq / s3prl .pt)
    units: str = "char"  # char | phone | bpe:N
    seed: int = 1337
    device: str = "auto"
    log_every: int = 200
    valid_every: int = 1000
    progress: bool = True
    encoder: EncoderOverrides = field(default_factory=EncoderOverrides)
    ctc: CTCHeadConfig = field(default_factory=CTCHeadConfig)  # vocab_size comes from the units
    tune: TuneConfig = field(default_factory=TuneConfig)
    data: CTCDataConfig = field(default_factory=CTCDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    ckpt: FinetuneCheckpointConfig = field(default_factory=FinetuneCheckpointConfig)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.log_every < 1 or self.valid_every < 1:
            raise UserError("need log_every >= 1 and valid_every >= 1")


# ============================================================================================== data
class CTCDataset(PretrainDataset):
    """Whole utterances (padded to the longest of the batch, never cropped) and their token ids: the batch of
    :class:`PretrainDataset` without frame labels, plus ``targets`` (one list of token ids per utterance)."""

    def __init__(self, targets: dict[str, list[int]], *, encoder, seed: int):
        super().__init__([], frame_rate=float(encoder.frame_rate), downsample_rate=int(encoder.downsample_rate),
                         num_frames=_NumFrames(encoder), crop_max=None, seed=seed, pad_audio=True, random_crop=False)
        self.targets = targets

    def _fill(self, epoch, index, utts, lengths, targets, frames, lens, wavs, lab_batches) -> dict:
        batch = super()._fill(epoch, index, utts, lengths, targets, frames, lens, wavs, lab_batches)
        batch["targets"] = [self.targets[u.id] for u in utts]  # plain lists: pickled with the batch's metadata
        return batch


def _targets_of(data_dir: str, tok: Tokenizer, cuts, num_frames, dc: CTCDataConfig, name: str
                ) -> tuple[dict[str, list[int]], float]:
    """Token ids of every usable utterance of ``data_dir`` (hours as the second value). Every utterance needs a
    transcript line (an empty one: a target of blanks only) whose tokens are all in the vocabulary, else a one-line
    error naming the file and utterance; utterances outside
    ``[min_seconds, max_seconds]`` or with fewer frames than CTC needs for their tokens are skipped and counted."""
    trans, path = read_transcripts(data_dir, tok.units)
    out: dict[str, list[int]] = {}
    short = long_ = infeasible = 0
    hours = 0.0
    for cut in cuts:
        text = trans.get(cut.id)
        if text is None:
            raise UserError(f"{path}: no transcript for utterance {cut.id}; every utterance of {data_dir} needs a line "
                            "(an empty one for an utterance without speech; or subset the data dir)")
        ids = tok.encode(text, where=f"{path}: utterance {cut.id}")
        if cut.duration < dc.min_seconds:
            short += 1
            continue
        if dc.max_seconds is not None and cut.duration > dc.max_seconds:
            long_ += 1
            continue
        need = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))  # a blank between repeated tokens
        if num_frames(cut_num_samples(cut)) < need:
            infeasible += 1
            continue
        out[cut.id] = ids
        hours += cut.duration / 3600
    if short or long_ or infeasible:
        log.warning("%s (%s): skipped %d utterance(s) shorter than %g s, %d longer than %s s, %d with fewer frames "
                    "than their %s tokens need", data_dir, name, short, dc.min_seconds, long_, dc.max_seconds,
                    infeasible, tok.units)
    if not out:
        raise UserError(f"{data_dir}: no usable utterance for fine-tuning (see the warning above)")
    return out, hours


# ============================================================================================== trainer
class FinetuneTrainer(Trainer):
    """The pretraining trainer with a CTC model, CTC batches, the tri-stage schedule and validation by error rate."""

    kind = "ctc_finetune"
    run_kind = "finetune"
    run_flag = "--out"

    def __init__(self, cfg: FinetuneConfig, *, resume: str | None = None, tokenizer: Tokenizer | None = None,
                 overwrite: bool = False):
        self.tokenizer = tokenizer
        super().__init__(cfg, resume=resume, overwrite=overwrite)  # type: ignore[arg-type]
        if self.dist.is_main:
            n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in self.model.parameters())
            log.info("fine-tuning %s from %s: %s units (%d), tune %s: %.2fM of %.2fM parameters trained (%.1f%%); "
                     "encoder frozen for %d updates", self.cfg.exp_dir, self.cfg.init, self.tokenizer.units,
                     len(self.tokenizer.vocab), self.cfg.tune.mode, n_train / 1e6, n_all / 1e6,
                     100 * n_train / max(n_all, 1), self.cfg.ctc.freeze_updates)

    # ---- hooks
    def run_inputs(self) -> dict[str, str]:
        """The training and dev data dirs (transcripts, phones) and the ``init`` checkpoint."""
        c = self.cfg
        out = {"data.train": st.dir_fingerprint(c.data.train), "init": checkpoint_fingerprint(c.init)}
        if c.data.dev:
            out["data.dev"] = st.dir_fingerprint(c.data.dev)
        return out

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        if not cfg.init:
            raise UserError("init is not set: the pretrained model to fine-tune (a checkpoint dir, a transformers "
                            "dir, a fairseq .pt with --trust-pickle, or random:CKPT)")
        if self.tokenizer is None:
            self.tokenizer = _tokenizer_for(cfg, self.exp, self.dist)
        model, self.base_sha1 = build_ctc_model(cfg.init, cfg.encoder, replace(cfg.ctc, vocab_size=len(
            self.tokenizer.vocab)), cfg.tune, trust_pickle=cfg.trust_pickle)
        return model

    def init_weights(self) -> None:
        """Nothing: :meth:`build_model` started from ``init`` already (the head is fresh)."""

    def optimizer_groups(self) -> list[dict]:
        """The encoder's trainable parameters at the schedule's rate, ``lm_head`` at ``optim.head_lr_scale`` x it."""
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith("lm_head.")]
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("lm_head.")]
        return [{"params": rest, "lr_scale": 1.0}, {"params": head, "lr_scale": self.cfg.optim.head_lr_scale}]

    def find_unused_parameters(self) -> bool:
        return True  # the frozen encoder (first updates, adapters / LoRA) and LayerDrop leave parameters unused

    def lr_at(self, update: int) -> float:
        o = self.cfg.optim
        return tri_stage_lr(update, peak_lr=o.lr, warmup_steps=o.warmup_steps, hold_steps=o.hold_steps,
                            decay_steps=o.decay_steps, init_lr_scale=o.init_lr_scale,
                            final_lr_scale=o.final_lr_scale)

    def build_data(self) -> PretrainData:
        cfg, d, dc = self.cfg, self.dist, self.cfg.data
        if not dc.train:
            raise UserError("data.train is not set (a data dir with transcripts)")
        num_frames = _NumFrames(self.encoder)

        def split(data_dir: str, name: str, *, train: bool):
            if d.is_main:
                load_cuts(data_dir, self.exp / "data" / name)
            barrier(d)
            cuts = load_cuts(data_dir, self.exp / "data" / name)
            targets, hours = _targets_of(data_dir, self.tokenizer, cuts, num_frames, dc, name)
            sampler = ResumableBatchSampler(
                cuts, max_duration=dc.max_duration if train else dc.valid_max_duration or dc.max_duration,
                crop_max=None, num_buckets=dc.num_buckets if train else min(dc.num_buckets, 10), seed=cfg.seed,
                shuffle=train, drop_last=train, world_size=d.world, rank=d.rank, keep_ids=set(targets))
            dataset = CTCDataset(targets, encoder=self.encoder, seed=cfg.seed)
            nw = dc.num_workers
            loader = torch.utils.data.DataLoader(
                dataset, sampler=sampler, batch_size=None, collate_fn=collate_identity, num_workers=nw,
                worker_init_fn=_worker_init if nw > 0 else None, prefetch_factor=2 if nw > 0 else None,
                pin_memory=self.device.type == "cuda")
            if d.is_main:
                log.info("%s: %s, %d utterances, %.2f h", name, data_dir, len(targets), hours)
            return sampler, loader

        sampler, loader = split(dc.train, "train", train=True)
        dev_loader = split(dc.dev, "dev", train=False)[1] if dc.dev else None
        return PretrainData([], sampler, loader, dev_loader, empty_epoch_error=(
            f"{dc.train}: an epoch produced no full batch: lower data.num_buckets (now {dc.num_buckets}) or "
            f"data.max_duration (now {dc.max_duration} s); a small labelled set fills few duration buckets"))

    def _to_device(self, batch: dict):
        wavs, lens, _ = super()._to_device(batch)
        seqs = batch["targets"]
        t = torch.full((len(seqs), max(len(s) for s in seqs)), LABEL_PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return wavs, lens, [t.to(self.device)]

    def checkpoint_extra(self) -> dict:
        c = self.cfg
        frozen_frontend = self.model.config.feature_grad_mult == 0  # the CNN / fbank conv never gets a gradient
        trained = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and not (
            frozen_frontend and n.startswith("hubert.feature_extractor.")))
        return {"kind": self.kind, "tokenizer": self.tokenizer.to_dict(), "init": c.init,
                "init_sha1": self.base_sha1, "tune": vars(c.tune) | {"lora_targets": list(c.tune.lora_targets)},
                "params": {"trained": trained, "total": sum(p.numel() for p in self.model.parameters())},
                "bf16": self.bf16}  # the precision validation ran in: speechssl decode's default

    def save_options(self) -> dict:
        if self.cfg.tune.mode == "full":
            return {}
        keys = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return {"partial": {"base": _absolute(self.cfg.init), "base_sha1": self.base_sha1, "keys": keys}}

    def _metric(self, valid: dict[str, float]) -> tuple[float, bool]:
        return valid[self.tokenizer.metric], False

    @torch.no_grad()
    def validate(self, writer=None) -> dict[str, float]:
        """Dev loss and greedy-decoding error rates (WER, CER; PER for phones), summed over ranks as counts."""
        self._last_valid_step = self.step
        self.model.eval()
        tok = self.tokenizer
        sums = torch.zeros(7, dtype=torch.float64)  # loss*n, n, word err, words, char err, chars, zero_inf
        for batch in start_loader(self.dev_loader):
            wavs, lens, labels = self._to_device(batch)
            with self._autocast():
                out = self.model(wavs, lens, labels)
            n = len(batch["ids"])
            hyps = [tok.detok(h) for h in greedy_tokens(out["logits"], out["frame_lens"], tok.vocab)]
            refs = [tok.detok([tok.vocab[i] for i in s]) for s in batch["targets"]]
            counts = error_counts(refs, hyps, chars=tok.units != "phone")
            sums += torch.tensor([float(out["loss"]) * n, n, *counts, out["logs"]["zero_inf"]], dtype=torch.float64)
        self.model.train()
        t = all_reduce(sums, self.dist)
        n = max(float(t[1]), 1.0)
        words = "per" if tok.units == "phone" else "wer"
        stats = {"loss": float(t[0]) / n, words: float(t[2]) / max(float(t[3]), 1.0)}
        if tok.units != "phone":
            stats["cer"] = float(t[4]) / max(float(t[5]), 1.0)
        self._log_valid(stats, int(n), writer)
        return stats


def _absolute(init: str) -> str:
    """``init`` with an absolute path (a partial checkpoint names its base wherever it is decoded from)."""
    prefix = "random:" if init.startswith("random:") else ""
    return prefix + str(Path(init[len(prefix):]).resolve())


def _tokenizer_for(cfg: FinetuneConfig, exp: Path, d) -> Tokenizer:
    """The run's tokenizer: EXP/tokenizer.json when a run made it (a resume uses the very same), else built from the
    training transcripts by rank 0 and read by every rank."""
    import json

    from speechssl.fileio import atomic_write_text

    path = exp / "tokenizer.json"
    if d.is_main and not path.is_file():
        trans, _ = read_transcripts(cfg.data.train, "phone" if cfg.units == "phone" else "char")
        tok = build_tokenizer(cfg.units, [t for t in trans.values() if t.strip()])
        exp.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(tok.to_dict()))
    barrier(d)
    tok = Tokenizer.from_dict(json.loads(path.read_text()))
    if tok.units != cfg.units.split(":")[0]:
        raise UserError(f"{path}: units {tok.units}, the run asks for {cfg.units}; use another exp_dir")
    return tok


# ============================================================================================== model building
def _encoder_source(init: str, trust_pickle: bool) -> tuple[HubertModel, str]:
    """The encoder of ``init`` (any upstream source, or ``random:CKPT``) and the SHA-1 naming its weights."""
    from speechssl.upstream import RANDOM_PREFIX, checkpoint_sha1, load

    up = load(init, trust_pickle=trust_pickle)
    path = init[len(RANDOM_PREFIX):] if init.startswith(RANDOM_PREFIX) else init
    try:
        sha1 = checkpoint_sha1(path)
    except OSError:  # random:CKPT needs only CKPT's config
        sha1 = "none"
    if init.startswith(RANDOM_PREFIX):
        sha1 = f"{RANDOM_PREFIX}{sha1}"  # seed 0 of that config: the same weights every time
    return up.model, sha1


def build_ctc_model(init: str, overrides: EncoderOverrides | None, head: CTCHeadConfig, tune: TuneConfig, *,
                    trust_pickle: bool = False) -> tuple[CTCModel, str]:
    """A :class:`CTCModel` whose encoder starts as ``init``'s (regularisation from ``overrides``), with a fresh
    head and the tuning modules of ``tune`` (parameters frozen accordingly); and the base's SHA-1."""
    from speechssl.models.frontend import set_per_row_norm

    src, sha1 = _encoder_source(init, trust_pickle)
    if tune.mode != "full":  # the encoder stays frozen; its adapters / LoRA learn from the first update with the head
        head = replace(head, freeze_updates=0)
    config = overrides.apply(src.config) if overrides is not None else src.config
    model = CTCModel(config, head)
    model.hubert.load_state_dict(src.state_dict(), strict=True)
    set_per_row_norm(model)  # a row's output does not depend on the padding of its batch (upstream's convention)
    for p in model.parameters():
        p.requires_grad_(True)
    if tune.mode != "full":
        from speechssl.models import peft

        if tune.mode == "adapters":
            peft.add_adapters(model.hubert, dim=tune.adapter_dim, layers=tune.layers)
        else:
            peft.add_lora(model.hubert, rank=tune.lora_rank, alpha=tune.lora_alpha,
                          targets=tuple(tune.lora_targets), layers=tune.layers)
        peft.freeze_for_tuning(model, tune.mode, head_prefixes=("lm_head",))
    return model, sha1


# ============================================================================================== decoding helpers
def greedy_tokens(logits: torch.Tensor, frame_lens: torch.Tensor, vocab: list[str], blank: int = 0) -> list[list[str]]:
    """Best-path CTC decoding of a batch ``[B, T, V]``: argmax per valid frame, repeats merged, blanks dropped."""
    best = logits.argmax(-1).cpu()
    out = []
    for b in range(best.shape[0]):
        seq = torch.unique_consecutive(best[b, : int(frame_lens[b])]).tolist()
        out.append([vocab[i] for i in seq if i != blank])
    return out


def error_counts(refs: list[str], hyps: list[str], *, chars: bool = True) -> tuple[float, float, float, float]:
    """``(word errors, reference words, char errors, reference chars)`` summed over utterances, with jiwer (the
    counts, so that processes can add them up: a corpus-level rate is errors / reference units)."""
    import jiwer

    if not any(r.strip() for r in refs):  # jiwer needs one reference word; insertions alone have no rate
        return float(sum(len(h.split()) for h in hyps)), 0.0, float(sum(len(h.strip()) for h in hyps) * chars), 0.0
    r, h = list(refs), list(hyps)
    w = jiwer.process_words(r, h)
    werr, wref = w.substitutions + w.deletions + w.insertions, w.substitutions + w.deletions + w.hits
    if not chars:
        return float(werr), float(wref), 0.0, 0.0
    c = jiwer.process_characters(r, h)
    return float(werr), float(wref), float(c.substitutions + c.deletions + c.insertions), float(
        c.substitutions + c.deletions + c.hits)


# ============================================================================================== entry points
def finetune(cfg: FinetuneConfig, resume: str | None = None, *, overwrite: bool = False) -> dict:
    """Run (or resume) a fine-tuning; returns the trainer's summary (step, stop reason, best error rate, ...). EXP must
    be new, or hold this run (``resume``, same defining options), or be deleted first (``overwrite``)."""
    trainer = FinetuneTrainer(cfg, resume=resume, overwrite=overwrite)
    try:
        return trainer.train()
    finally:
        trainer.close()
