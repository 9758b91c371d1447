"""Data for masked-unit pretraining: cuts, unit labels, duration-bucketed batches, label-aligned crops.

* ``load_cuts(data_dir)``: the data dir's lhotse ``cuts.jsonl.gz`` (built from the Kaldi files into a cache dir
  when the data dir has none).
* ``load_label_sets``: one ``speechssl.units.labels.LabelSet`` per label dir; every label goes through its
  ``get(utt, num_samples)`` (``check_label_length``) and ``stride_for(frame_rate)`` (``label_stride``).
* ``ResumableBatchSampler``: lhotse ``DynamicBucketingSampler`` (batches in seconds, duration buckets, DDP
  rank/world size, ``drop_last``) plus an exact, prefetch-proof position: the trainer records how many batches
  of the current epoch it has *consumed* (lhotse's own ``state_dict`` counts batches *yielded*, which runs ahead
  of training when a DataLoader prefetches). Resuming re-iterates the epoch's manifest and skips them; no audio
  is read while skipping. It yields each batch as plain ``Utt`` tuples (id, audio source, start, samples), built
  in the process that samples: that is all the dataset needs, and a loader worker receives those instead of
  pickled lhotse cuts.
* ``build_pretrain_data``: the trainer's train (and dev) loaders from a ``PretrainConfig``, checked up front.
* ``PretrainDataset``: reads audio through ``speechssl.audio.open_audio`` (``load_audio`` in two steps: the header
  says whether a crop can be decoded as int16, see below), crops each batch to a common length
  (fairseq HuBERT: the shortest utterance, at most ``crop_max``; or pads when ``pad_audio``), with crop
  offsets on the model's frame grid (multiples of ``downsample_rate`` samples) so the labels are cut at
  exactly the matching frame. Offsets are a hash of (seed, epoch, utterance id): no global RNG, so crops are
  identical after a resume, with any number of workers.

Batch waveforms: **read ``batch["wavs"]`` only through ``batch_wavs(batch, device)``**, which returns them as
float32 [B, S]. A batch built in a DataLoader worker whose crops are all 16-bit PCM files, mono, at 16 kHz
(LibriSpeech and most corpora) carries them as the int16 samples: half the bytes to hand over (and to copy to the
GPU), no float conversion in the worker; ``batch_wavs`` converts them where they are consumed (on the GPU after the
copy), as ``x / 32768``, which is bit for bit what decoding to float32 gives (libsndfile scales 16-bit PCM by
2^-15). Any other batch (a float, 24-bit or 8-bit file, another rate, several channels, a pipe, or a batch built in
the training process) is float32 already. The trainer's updates, validation and the collapse watch all go through
``batch_wavs``.

Hand-over from a worker (``_BlockPool``): a worker lays each batch out in one of a few blocks of shared memory that
it reuses; the training process maps each block once, copies the batch out of it as it unpickles it (the batch it
gets is private memory, as with ``num_workers=0``) and hands the block back through a pipe. A fresh block per batch
(torch's way) cost more than decoding 16-bit WAV: page allocation, zeroing, mapping and freeing, and a file
descriptor passed over a new socket connection, for every batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import select
import signal
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from lhotse.dataset.sampling.base import TimeConstraint

from speechssl.audio import SAMPLE_RATE, open_audio
from speechssl.errors import MissingInputError, UserError
from speechssl.train.distributed import Dist, barrier
from speechssl.units.labels import LabelError, LabelSet

if TYPE_CHECKING:
    from speechssl.train.config import PretrainConfig

log = logging.getLogger(__name__)

LABEL_PAD = -100

PCM16_SCALE = 2.0**-15
"""float32 value of a 16-bit PCM sample: ``x * PCM16_SCALE`` (= ``x / 32768``, exact), as libsndfile decodes it."""

__all__ = [
    "LABEL_PAD",
    "load_cuts",
    "load_label_sets",
    "check_cuts_and_labels",
    "CroppedTimeConstraint",
    "ResumableBatchSampler",
    "PretrainDataset",
    "PretrainData",
    "build_pretrain_data",
    "check_label_classes",
    "batch_wavs",
    "PCM16_SCALE",
    "Utt",
    "utt_of",
    "cut_num_samples",
    "crop_offset",
]


# ---------------------------------------------------------------------------------------------- cuts
def load_cuts(data_dir: str | Path, cache_dir: str | Path | None = None):
    """The lazily-read CutSet of a data dir (``DIR/cuts.jsonl.gz``).

    A Kaldi-only data dir is converted with ``speechssl.data.lhotse_io.data_dir_to_lhotse`` into
    ``cache_dir`` (never into the input dir); a later call reuses the cached manifests.
    """
    from lhotse import CutSet

    data_dir = Path(data_dir)
    cuts_file = data_dir / "cuts.jsonl.gz"
    if not cuts_file.is_file():
        if not (data_dir / "wav.scp").is_file():
            raise MissingInputError(f"{data_dir}: neither cuts.jsonl.gz nor a Kaldi wav.scp; is this a data dir?")
        if cache_dir is None:
            raise MissingInputError(f"{cuts_file} missing and no cache dir given to build it from the Kaldi files")
        cache_dir = Path(cache_dir)
        cuts_file = cache_dir / "cuts.jsonl.gz"
        if not cuts_file.is_file():
            from speechssl.data.lhotse_io import data_dir_to_lhotse

            log.info("%s has no lhotse manifests; writing them to %s", data_dir, cache_dir)
            data_dir_to_lhotse(data_dir, cache_dir)
    return CutSet.from_jsonl_lazy(cuts_file)


def cut_num_samples(cut, sample_rate: int = SAMPLE_RATE) -> int:
    """Length of a cut in samples at ``sample_rate`` (what ``load_audio`` returns for it)."""
    rec = getattr(cut, "recording", None)
    if rec is not None and rec.sampling_rate == sample_rate and getattr(cut, "num_samples", None) is not None:
        return int(cut.num_samples)
    return int(round(cut.duration * sample_rate))


def _cut_source(cut) -> str:
    rec = cut.recording
    if rec is None or len(rec.sources) != 1:
        raise UserError(f"utterance {cut.id}: expected a cut with one audio source, got {rec!r}")
    src = rec.sources[0]
    if src.type == "file":
        return src.source
    if src.type == "command":
        return src.source + " |"
    raise UserError(f"utterance {cut.id}: unsupported audio source type {src.type!r}")


class Utt(NamedTuple):
    """What ``PretrainDataset`` needs of a cut: a plain tuple, cheap to pickle to a loader worker."""

    id: str
    source: str  # a path, or a pipe command ending in "|" (``load_audio``)
    start: float  # seconds into the source
    num_samples: int  # length at 16 kHz (``cut_num_samples``)


def utt_of(cut) -> Utt:
    """The ``Utt`` of a lhotse cut (one audio source, a file or a command)."""
    return Utt(cut.id, _cut_source(cut), cut.start, cut_num_samples(cut))


# ---------------------------------------------------------------------------------------------- labels
def load_label_sets(dirs: Sequence[str | Path]) -> list[LabelSet]:
    """One ``speechssl.units.labels.LabelSet`` per label dir (the label-length check lives there)."""
    return [LabelSet(d) for d in dirs]


def check_label_classes(label_dirs: Sequence[str | Path], num_classes: Sequence[int], *,
                        option: str = "data.train_labels") -> None:
    """Each label dir's k (its ``meta.json``, which bounds every label in it) equals the model head's
    ``model.num_classes[i]``, checked from the meta files alone before any data is read: a larger k would index past
    the head at the first batch, a smaller one leaves classes no label uses (usually the wrong label dir)."""
    from speechssl.units.labels import read_meta

    if len(label_dirs) != len(num_classes):
        raise UserError(f"model.num_classes {list(num_classes)} has {len(num_classes)} entries but {option} lists "
                        f"{len(label_dirs)} label dir(s): give one codebook size per label set")
    for i, (d, nc) in enumerate(zip(label_dirs, num_classes)):
        k = int(read_meta(d)["k"])
        if k > nc:
            raise UserError(f"{d}: k={k} (its meta.json) but model.num_classes[{i}]={nc}: labels {nc}..{k - 1} are "
                            f"out of range of the model's head; set model.num_classes[{i}]={k} or give the label dir "
                            "of this model's k-means")
        if k < nc:
            raise UserError(f"{d}: k={k} (its meta.json) but model.num_classes[{i}]={nc}: the head would have "
                            f"{nc - k} classes no label uses, which usually means the wrong label dir; give the label "
                            f"dir of a k={nc} k-means or set model.num_classes[{i}]={k}")


def check_cuts_and_labels(
    cuts, label_sets: Sequence[LabelSet], *, min_duration: float, where: str, max_errors: int = 5
) -> tuple[list[str], float]:
    """Check every cut up front (before hours of training): labels exist in every set and their length fits
    the audio (``check_label_length``). Returns (ids of usable cuts, their total hours); cuts shorter than
    ``min_duration`` seconds are skipped (as fairseq's ``min_sample_size``) and counted in the log.

    Raises ``LabelError`` (one line) naming the first offending utterance and its problem, then the next ids.
    """
    keep, missing, errors = [], [], []
    short = 0
    total = 0.0
    for cut in cuts:
        for ls in label_sets:
            if cut.id not in ls:
                missing.append(f"utt {cut.id}: no labels in {ls.text_path}")
                continue
            try:
                ls.get(cut.id, cut_num_samples(cut))
            except LabelError as e:
                errors.append(str(e))
        if cut.duration < min_duration:
            short += 1
            continue
        keep.append(cut.id)
        total += cut.duration
    problems = missing + errors
    if problems:  # one line: the first problem in full, the next utterance ids by name
        others = [p.split(":")[0] for p in problems[1:max_errors]]
        more = f"; also {', '.join(others)}" if others else ""
        more += f" and {len(problems) - max_errors} more" if len(problems) > max_errors else ""
        raise LabelError(f"{where}: {len(problems)} utterance(s) with missing or misaligned labels: "
                         f"{problems[0]}{more}")
    if short:
        log.info("%s: skipping %d utterance(s) shorter than %.2f s", where, short, min_duration)
    if not keep:
        raise UserError(f"{where}: no utterance of at least {min_duration} s (data.crop_min)")
    return keep, total / 3600.0


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class CroppedTimeConstraint(TimeConstraint):
    """lhotse ``TimeConstraint`` counting each cut as at most ``crop_max`` seconds (what the model will see),
    so ``max_duration`` is the audio per batch after cropping, as fairseq's ``max_tokens`` is."""

    crop_max: float | None = None

    def _len(self, example) -> float:
        d = example.duration
        return min(d, self.crop_max) if self.crop_max is not None else d

    def add(self, example) -> None:
        if self.max_duration is not None:
            d = self._maybe_apply_quadratic_correction(self._len(example))
            self.current += d
            self.longest_seen = max(self.longest_seen, d)
        self.num_cuts += 1

    def measure_length(self, example) -> float:
        return self._len(example)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index_in_epoch, utts)`` from a lhotse ``DynamicBucketingSampler``: ``utts`` a tuple of one
    ``Utt`` per cut of the batch (what the dataset needs, without the lhotse objects).

    ``state_dict()`` = ``{"epoch", "batches_done"}``: set ``batches_done`` from the batches the trainer has
    actually consumed (``mark_consumed``), not from what a prefetching DataLoader pulled.
    """

    def __init__(
        self,
        cuts,
        *,
        max_duration: float,
        crop_max: float | None,
        num_buckets: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        world_size: int = 1,
        rank: int = 0,
        keep_ids: set[str] | None = None,
    ):
        from lhotse.dataset import DynamicBucketingSampler

        if keep_ids is not None:
            cuts = cuts.filter(_Keep(keep_ids))
        # num_buckets=1: no duration bucketing (lhotse needs >= 2 buckets: one holds everything, one is empty)
        buckets = dict(duration_bins=[1e9]) if num_buckets == 1 else dict(num_buckets=num_buckets)
        self.sampler = DynamicBucketingSampler(
            cuts,
            constraint=CroppedTimeConstraint(max_duration=max_duration, crop_max=crop_max),
            **buckets,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            world_size=world_size,
            rank=rank,
        )
        self.epoch = 0
        self.batches_done = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches_done = 0

    def mark_consumed(self, epoch: int, index: int) -> None:
        self.epoch, self.batches_done = epoch, index + 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch = int(sd["epoch"])
        self.batches_done = int(sd["batches_done"])

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        epoch, skip = self.epoch, self.batches_done
        self.sampler.set_epoch(epoch)
        for i, cuts in enumerate(self.sampler):
            if i < skip:
                continue  # fast-forward on the manifest only; no audio is read
            yield epoch, i, tuple(map(utt_of, cuts))

    def __len__(self) -> int:  # pragma: no cover - lhotse samplers have no cheap length
        raise TypeError("ResumableBatchSampler has no length (batches are sized dynamically)")


class _Keep:
    """Picklable filter predicate (cut id in a set)."""

    def __init__(self, ids: set[str]):
        self.ids = ids

    def __call__(self, cut) -> bool:
        return cut.id in self.ids


# ---------------------------------------------------------------------------------------------- dataset
def crop_offset(seed: int, epoch: int, utt_id: str, max_offset_frames: int) -> int:
    """A crop offset in frames, uniform on [0, max_offset_frames], from a hash of (seed, epoch, utt id)."""
    if max_offset_frames <= 0:
        return 0
    h = hashlib.blake2b(f"{seed}\x00{epoch}\x00{utt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (max_offset_frames + 1)


class PretrainDataset(torch.utils.data.Dataset):
    """``dataset[(epoch, index, utts)]`` -> a padded batch (``utts``: ``Utt`` tuples or lhotse cuts).

    Batch: ``wavs`` [B, S] (float32, or int16 from a worker: read them with ``batch_wavs``), ``wav_lens`` int64
    [B], ``labels`` list (one per label set) of int64 [B, T] at the model frame rate (pad ``LABEL_PAD``), ``ids``,
    ``epoch``, ``index``, ``audio_seconds``.

    ``num_frames(num_samples) -> int`` is the model's frame count for a waveform length; ``frame_rate`` and
    ``downsample_rate`` its frame grid (50 Hz, 320 samples for the HuBERT CNN).
    """

    def __init__(
        self,
        label_sets: Sequence[LabelSet],
        *,
        frame_rate: float,
        downsample_rate: int,
        num_frames: Callable[[int], int],
        crop_max: float | None,
        seed: int,
        pad_audio: bool = False,
        random_crop: bool = True,
    ):
        self.label_sets = list(label_sets)
        self.strides = [ls.stride_for(frame_rate) for ls in self.label_sets]
        self.frame_rate = frame_rate
        self.ds = int(downsample_rate)
        self.num_frames = num_frames
        self.crop_max = None if crop_max is None else int(round(crop_max * SAMPLE_RATE))
        self.seed = seed
        self.pad_audio = pad_audio
        self.random_crop = random_crop
        self._frames: dict[int, int] = {}  # num_frames memo: crops are whole frame strides, a few hundred lengths
        self._int16_next = True  # a worker starts its next batch as int16 (its last batch was all 16-bit PCM)
        self._scratch: np.ndarray | None = None  # int16 decode buffer of the in-process path
        self._pool: _BlockPool | None = None  # a worker's recycled shared-memory blocks (made in the worker)

    def __getstate__(self) -> dict:  # to a spawned worker: no buffers, no pool (each worker makes its own)
        return {**self.__dict__, "_scratch": None, "_pool": None}

    def _num_frames(self, n: int) -> int:
        nf = self._frames.get(n)
        if nf is None:
            if len(self._frames) >= 65536:  # pad_audio: one length per utterance; stay bounded
                self._frames.clear()
            nf = self._frames[n] = int(self.num_frames(n))
        return nf

    def _target_len(self, lengths: list[int]) -> list[int]:
        cap = self.crop_max
        if self.pad_audio:
            return [n if cap is None else min(n, cap) for n in lengths]
        t = min(lengths) if cap is None else min(min(lengths), cap)
        if t >= self.ds:
            t -= t % self.ds  # a whole number of frame strides
        return [t] * len(lengths)

    def _labels_for(self, ls: LabelSet, stride: int, utt_id: str, n_full: int, frame_off: int, n_frames: int,
                    out: np.ndarray | None = None):
        """Labels of the crop at the model frame rate (``out``: the batch row to write them into, else a new array)."""
        lab = ls.get(utt_id, n_full)  # raises LabelError naming the utterance on a length mismatch
        sel = lab[frame_off * stride :: stride][:n_frames]
        if len(sel) < n_frames:
            # check_label_length allows the label sequence to be one label frame short at the end
            short = n_frames - len(sel)
            if short > 1:
                raise LabelError(
                    f"utt {utt_id}: {len(lab)} labels at {ls.label_rate} Hz cover only {len(sel)} of the "
                    f"{n_frames} model frames of the crop at frame {frame_off} ({ls.text_path})"
                )
        if sel.size and (sel.min() < 0 or sel.max() >= ls.k):
            raise LabelError(f"utt {utt_id}: label out of range [0, {ls.k}) in {ls.text_path}")
        if out is None:
            out = np.full(n_frames, LABEL_PAD, dtype=np.int64)
        out[: len(sel)] = sel  # the rest stays LABEL_PAD
        return out

    def __getitem__(self, item) -> dict:
        """One batch. Each crop is decoded straight into its row of the batch tensor (``AudioFile.read(out=...)``),
        which a DataLoader worker lays out in one of its recycled blocks of shared memory (``_BlockPool``): no per-
        utterance array, no copy into the batch, no fresh pages to allocate, zero and map for every batch; the
        training process copies the batch out as it receives it, which frees the block for the worker's next one.

        ``item`` is ``(epoch, index, utts)``: ``Utt`` tuples (what the sampler yields) or lhotse cuts. In a worker
        the waveforms are int16 when every crop is 16-bit PCM, mono, at 16 kHz (see the module docstring); the
        batch starts as int16 when the worker's last batch was all such crops and turns float32 at the first crop
        that is not. In the training process they are float32: 16-bit crops of uncompressed files (WAV) are decoded
        as int16 into a scratch row and scaled into the batch row (twice as fast as libsndfile's own conversion)."""
        epoch, index, utts = item
        utts = [u if type(u) is Utt else utt_of(u) for u in utts]
        lengths = [u.num_samples for u in utts]
        targets = self._target_len(lengths)
        frames = [self._num_frames(t) for t in targets]
        B, S, T = len(utts), max(targets), max(frames)
        in_worker = torch.utils.data.get_worker_info() is not None
        specs = [((B,), torch.long), ((B, S), torch.int16 if in_worker and self._int16_next else torch.float32)]
        specs += [((B, T), torch.long)] * len(self.label_sets)
        if not in_worker:
            lens, wavs, *lab_batches = [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
            block = None
        else:
            if self._pool is None or self._pool.pid != os.getpid():
                self._pool = _BlockPool()
            block, (lens, wavs, *lab_batches) = self._pool.take(specs)
        try:
            batch = self._fill(epoch, index, utts, lengths, targets, frames, lens, wavs, lab_batches)
        except BaseException:
            if block is not None:
                self._pool.give_back(block)
            raise
        return _Shipped(batch, self._pool, block) if in_worker else batch

    def _fill(self, epoch, index, utts, lengths, targets, frames, lens, wavs, lab_batches) -> dict:
        S = wavs.shape[1]
        lens.numpy()[:] = targets
        rows = wavs.numpy()
        lab_rows = [lb.numpy() for lb in lab_batches]
        for lr in lab_rows:
            lr.fill(LABEL_PAD)
        all16 = True
        for i, (u, n, t, nf) in enumerate(zip(utts, lengths, targets, frames)):
            max_off = (n - t) // self.ds if n > t else 0
            f_off = crop_offset(self.seed, epoch, u.id, max_off) if self.random_crop else 0
            start = u.start + f_off * self.ds / SAMPLE_RATE
            dst = rows[i]
            with open_audio(u.source, utt_id=u.id) as a:
                if a.int16_at(SAMPLE_RATE):
                    if dst.dtype == np.int16:
                        out = dst
                    else:  # libsndfile converts FLAC to float32 as fast as to int16; PCM files 2x slower than numpy
                        out = dst if a.format == "FLAC" else self._scratch16(S + 2)
                else:
                    all16 = False
                    if dst.dtype == np.int16:
                        wavs, rows = _float32_batch(wavs, i)
                        dst = rows[i]
                    out = dst
                wav = a.read(start=start, end=start + t / SAMPLE_RATE, out=out)
            if abs(len(wav) - t) > 2:
                raise UserError(f"utterance {u.id}: read {len(wav)} samples, the manifest implies {t}")
            m = min(len(wav), t)
            if wav.dtype == dst.dtype:
                if not np.may_share_memory(wav, dst):  # not decoded in place (pipe, other rate, several channels)
                    dst[:m] = wav[:m]
            elif wav.dtype == np.int16:  # decoded as int16 into the scratch row: scale into the float32 row
                np.multiply(wav[:m], np.float32(PCM16_SCALE), out=dst[:m])
            else:  # float32 for an int16 row: a crop one sample longer than the row (rounding), not decoded in place
                wavs, rows = _float32_batch(wavs, i)
                dst = rows[i]
                dst[:m] = wav[:m]
            dst[m:] = 0  # zero padding: past the crop, or a read up to 2 samples short
            for j, (ls, stride) in enumerate(zip(self.label_sets, self.strides)):
                self._labels_for(ls, stride, u.id, n, f_off, nf, out=lab_rows[j][i, :nf])
        self._int16_next = all16
        return {
            "wavs": wavs,
            "wav_lens": lens,
            "labels": lab_batches,
            "ids": [u.id for u in utts],
            "epoch": epoch,
            "index": index,
            "audio_seconds": float(sum(targets)) / SAMPLE_RATE,
        }

    def _scratch16(self, n: int) -> np.ndarray:
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = np.empty(max(n, 16 * SAMPLE_RATE), dtype=np.int16)
        return self._scratch


def batch_wavs(batch: dict, device: torch.device | str | None = None, *, non_blocking: bool = False) -> torch.Tensor:
    """The float32 waveforms [B, S] of a ``PretrainDataset`` batch, on ``device`` (default: where they are).

    Every consumer of a batch's audio goes through here: int16 waveforms (a worker's batch of 16-bit PCM crops)
    are moved first (half the bytes) and scaled there, ``x * 2^-15``, bit-identical to float32 decoding."""
    w = batch["wavs"]
    if device is not None:
        w = w.to(device, non_blocking=non_blocking)
    if w.dtype != torch.int16:
        return w
    if w.device.type == "cpu":  # numpy: one vectorised pass whatever torch's thread settings (torch's own int16 ->
        # float32 cast is several times slower on one thread, and far slower with threads on a busy CPU)
        return torch.from_numpy(np.multiply(w.numpy(), np.float32(PCM16_SCALE), dtype=np.float32))
    return w.to(torch.float32).mul_(PCM16_SCALE)  # on the device, after the (int16) copy


def _float32_batch(wavs16: torch.Tensor, rows_done: int) -> tuple[torch.Tensor, np.ndarray]:
    """A float32 batch tensor (a worker's: in a block of shared memory of its own, not recycled) with the first
    ``rows_done`` int16 rows scaled into it."""
    specs = [(tuple(wavs16.shape), torch.float32)]
    if torch.utils.data.get_worker_info() is None:  # pragma: no cover - in process the batch is float32 from the start
        wavs = torch.empty(specs[0][0], dtype=torch.float32)
    else:
        offsets, nbytes = _layout(specs)
        (wavs,) = _views(torch.UntypedStorage._new_shared(nbytes), specs, offsets)
    rows = wavs.numpy()
    np.multiply(wavs16.numpy()[:rows_done], np.float32(PCM16_SCALE), out=rows[:rows_done])
    return wavs, rows


def _layout(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[int], int]:
    """Byte offsets of tensors of the given (shape, dtype)s in one block (each 64-byte aligned), and its size."""
    offsets, nbytes = [], 0
    for shape, dtype in specs:
        offsets.append(nbytes)
        nbytes += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    return offsets, max(nbytes, 1)


def _views(block: torch.UntypedStorage, specs, offsets) -> list[torch.Tensor]:
    out = []
    for (shape, dtype), off in zip(specs, offsets):
        out.append(torch.empty(0, dtype=dtype).set_(block, off // dtype.itemsize, shape))
    return out


def _new_block(nbytes: int) -> torch.UntypedStorage:
    """A recycled block: shared memory behind a file descriptor (torch allocates its pages at once, ``fallocate``)."""
    return torch.UntypedStorage._new_using_fd_cpu(nbytes)


class _BlockPool:
    """A DataLoader worker's blocks of shared memory, each reused for batch after batch, and their way to the
    training process.

    A fresh block per batch (what torch's ``default_collate`` does) costs the kernel more than decoding 16-bit WAV:
    pages allocated and zeroed, mapped in the worker and again in the training process, freed when the batch dies,
    and the block's file descriptor passed over a fresh authenticated socket connection every time. Here each block
    goes to the training process once (its file descriptor, mapped there and kept); then a batch is a few numbers
    (block, layout), the training process copies it out of the mapping as it unpickles it (``_received``: private
    tensors, so nothing it keeps can change under it) and writes the block's number into this worker's pipe, and
    ``take`` hands out only blocks whose number came back. The pipe's write end travels with the worker's first
    batch; the blocks of a worker that has exited are unmapped when the next worker's first batch arrives."""

    MAX_BLOCKS = 8  # in flight at once: the DataLoader's prefetch (2 per worker) and a little slack

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token = f"{self.pid}-{os.urandom(6).hex()}"
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.w_sent = False
        self.blocks: list[torch.UntypedStorage] = []
        self.gens: list[int] = []  # a block replaced by a bigger one gets a new generation (and is sent again)
        self.sent: list[int] = []  # the generation of each block the training process has (-1: none)
        self.free: set[int] = set()

    def take(self, specs) -> tuple[int | None, list[torch.Tensor]]:
        """(block number, or None for a block of its own that is not recycled; tensors of ``specs`` laid out in it)."""
        offsets, nbytes = _layout(specs)
        self._drain()
        fits = [i for i in self.free if self.blocks[i].nbytes() >= nbytes]
        size = -(-nbytes * 9 // 8 // 65536) * 65536  # room for somewhat longer batches: fewer reallocations
        if fits:
            i = min(fits, key=lambda j: self.blocks[j].nbytes())
        elif self.free:  # a free block too small for this batch: replace it by a bigger one
            i = max(self.free, key=lambda j: self.blocks[j].nbytes())
            self.blocks[i] = _new_block(size)
            self.gens[i] += 1
        elif len(self.blocks) < self.MAX_BLOCKS:
            i = len(self.blocks)
            self.blocks.append(_new_block(size))
            self.gens.append(0)
            self.sent.append(-1)
        else:  # MAX_BLOCKS batches on their way: a block of its own, which travels as torch shares tensors
            return None, _views(torch.UntypedStorage._new_shared(nbytes), specs, offsets)
        self.free.discard(i)
        return i, _views(self.blocks[i], specs, offsets)

    def give_back(self, block: int | None) -> None:
        if block is not None:
            self.free.add(block)

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.r, 4096)  # whole 4-byte messages: pipe writes up to PIPE_BUF are atomic
            except BlockingIOError:
                return
            if not data:  # pragma: no cover - the write end is kept open here
                return
            self.free.update(struct.unpack(f"<{len(data) // 4}i", data))

    def ship(self, batch: dict, block: int | None) -> tuple:
        """``_received``'s arguments for ``batch`` (called when the batch is pickled in the worker)."""
        from multiprocessing.reduction import DupFd

        tensors = [batch["wav_lens"], batch["wavs"], *batch["labels"]]
        meta = {k: v for k, v in batch.items() if k not in ("wavs", "wav_lens", "labels")}
        if block is None:
            return (None, None, 0, 0, None, None, tensors, len(batch["labels"]), meta)
        storage = self.blocks[block]
        entries: list = []
        for t in tensors:
            if t.untyped_storage().data_ptr() == storage.data_ptr():
                entries.append((tuple(t.shape), str(t.dtype).removeprefix("torch."), t.storage_offset() * t.itemsize))
            else:  # the float32 waveforms of a batch that turned float32 (a block of their own): as torch does
                entries.append(t)
        df_block = df_pipe = None
        if self.sent[block] != self.gens[block]:
            df_block = DupFd(storage._share_fd_cpu_()[0])
            self.sent[block] = self.gens[block]
        if not self.w_sent:
            df_pipe, self.w_sent = DupFd(self.w), True
        return (self.token, block, self.gens[block], storage.nbytes(), df_block, df_pipe, entries,
                len(batch["labels"]), meta)


class _Shipped:
    """A worker's batch on its way to the training process (see ``_BlockPool``)."""

    __slots__ = ("batch", "pool", "block")

    def __init__(self, batch: dict, pool: _BlockPool, block: int | None):
        self.batch, self.pool, self.block = batch, pool, block

    def __reduce__(self):
        return _received, self.pool.ship(self.batch, self.block)


# training process: the blocks of the workers, mapped once, and the write ends of their release pipes
_maps: dict[tuple[str, int], tuple[int, mmap.mmap]] = {}  # (worker token, block) -> (generation, mapping)
_release_fds: dict[str, int] = {}  # worker token -> write end of its release pipe
_maps_lock = threading.Lock()  # batches may be unpickled in pin-memory threads, one per loader


def _received(token, block, gen, nbytes, df_block, df_pipe, entries, num_labels, meta) -> dict:
    """In the training process, as a worker's batch is unpickled: its tensors copied out of the worker's block into
    private memory, then the block released to the worker."""
    tensors = []
    if block is None:
        tensors = [t.clone() for t in entries]
    else:
        with _maps_lock:
            if df_pipe is not None:  # a new worker: first forget the workers that have exited
                _forget_exited_workers()
                fd = _release_fds[token] = df_pipe.detach()
                os.set_blocking(fd, False)
            if df_block is not None:
                fd = df_block.detach()
                try:
                    mapping = mmap.mmap(fd, nbytes)
                finally:
                    os.close(fd)
                old = _maps.pop((token, block), None)
                if old is not None:
                    old[1].close()
                _maps[token, block] = (gen, mapping)
            have, mapping = _maps[token, block]
            if have != gen:  # pragma: no cover - a replaced block is always sent before its first batch
                raise RuntimeError(f"loader worker block {block}: generation {gen} expected, {have} mapped")
            for e in entries:
                if isinstance(e, torch.Tensor):
                    tensors.append(e.clone())
                    continue
                shape, dtype, offset = e
                dtype = getattr(torch, dtype)
                t = torch.empty(shape, dtype=dtype)
                view = np.frombuffer(mapping, dtype=t.numpy().dtype, count=t.numel(), offset=offset)
                t.numpy().reshape(-1)[:] = view
                del view  # no export of the mapping left behind
                tensors.append(t)
            _release(token, block)
    lens, wavs, *labels = tensors
    return {"wavs": wavs, "wav_lens": lens, "labels": labels[:num_labels], **meta}


def _release(token: str, block: int) -> None:
    fd = _release_fds.get(token)
    if fd is None:  # pragma: no cover - the first batch of a worker carries its pipe
        return
    try:
        os.write(fd, struct.pack("<i", block))
    except BlockingIOError:  # pragma: no cover - never more than MAX_BLOCKS messages wait in the pipe
        pass  # the worker just does not get this block back
    except OSError:  # the worker has exited (EPIPE)
        _forget(token)


def _forget(token: str) -> None:
    fd = _release_fds.pop(token, None)
    if fd is not None:
        os.close(fd)
    for key in [k for k in _maps if k[0] == token]:
        _maps.pop(key)[1].close()


def _forget_exited_workers() -> None:
    """Unmap the blocks of workers that have exited (the write end of a pipe without a reader polls POLLERR)."""
    if not _release_fds or not hasattr(select, "poll"):
        return
    poll = select.poll()
    for fd in _release_fds.values():
        poll.register(fd, 0)
    dead = {fd for fd, ev in poll.poll(0) if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL)}
    for token, fd in list(_release_fds.items()):
        if fd in dead:
            _forget(token)


def _after_fork_in_child() -> None:
    """A worker forked from the training process does not keep its parent's mappings of other workers' blocks (they
    would hold those pages for its lifetime) nor their pipes."""
    global _maps_lock
    _maps_lock = threading.Lock()
    for _, mapping in _maps.values():
        try:
            mapping.close()
        except BufferError:  # pragma: no cover - forked while another thread was copying out of it
            pass
    _maps.clear()
    for fd in _release_fds.values():
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass
    _release_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def collate_identity(batch):
    """DataLoader(batch_size=None) passes the dataset's batch through unchanged."""
    return batch


# ---------------------------------------------------------------------------------------------- the trainer's loaders
@dataclass
class PretrainData:
    train_labels: list[LabelSet]
    sampler: ResumableBatchSampler  # the train sampler: its position is part of the training state
    train_loader: torch.utils.data.DataLoader
    dev_loader: torch.utils.data.DataLoader | None  # None without data.dev
    empty_epoch_error: str = "an epoch produced no full batch"  # names the data dir and the settings to change

    def train_batches(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, starting at the sampler's saved position."""
        while True:
            start_skip = self.sampler.batches_done
            got = False
            for batch in start_loader(self.train_loader):
                got = True
                yield batch
            if not got and start_skip == 0:
                raise UserError(self.empty_epoch_error)
            self.sampler.set_epoch(self.sampler.epoch + 1)


def build_pretrain_data(cfg: "PretrainConfig", d: Dist, encoder, exp_dir: Path, device: torch.device) -> PretrainData:
    """Train (and dev) cuts, labels and loaders of a run, every utterance's labels checked before training starts.

    ``encoder`` gives ``frame_rate``, ``downsample_rate`` and ``num_frames``; Kaldi-only data dirs are converted
    into ``exp_dir/data/{train,dev}`` once, by rank 0.
    """
    dc = cfg.data
    if not dc.train:
        raise UserError("data.train is not set (a data dir with cuts.jsonl.gz or Kaldi files)")
    from speechssl.models.pretrain import uses_labels

    if uses_labels(cfg.model):
        if not dc.train_labels:
            raise UserError("data.train_labels is empty (one label dir per label set)")
        if dc.dev and len(dc.dev_labels) != len(dc.train_labels):
            raise UserError(
                f"data.dev_labels lists {len(dc.dev_labels)} label dir(s), data.train_labels "
                f"{len(dc.train_labels)}: give one dev label dir per label set"
            )
        check_label_classes(dc.train_labels, cfg.model.num_classes)  # before any data is read or converted
        if dc.dev:
            check_label_classes(dc.dev_labels, cfg.model.num_classes, option="data.dev_labels")
    elif dc.train_labels or dc.dev_labels:
        raise UserError(f"model.objective={cfg.model.objective} makes its own targets, but data.train_labels / "
                        f"data.dev_labels name {len(dc.train_labels) + len(dc.dev_labels)} label dir(s): leave them "
                        "empty (unit labels are HuBERT's)")
    frame_rate = float(encoder.frame_rate)

    def split(data_dir: str, label_dirs: list[str], name: str, *, train: bool):
        if d.is_main:
            load_cuts(data_dir, exp_dir / "data" / name)  # builds manifests once (rank 0)
        barrier(d)
        cuts = load_cuts(data_dir, exp_dir / "data" / name)
        labels = load_label_sets(label_dirs)
        keep, hours = check_cuts_and_labels(cuts, labels, min_duration=dc.crop_min, where=data_dir)
        sampler = ResumableBatchSampler(
            cuts, max_duration=dc.max_duration if train else dc.valid_max_duration or dc.max_duration,
            crop_max=dc.crop_max, num_buckets=dc.num_buckets if train else min(dc.num_buckets, 10), seed=cfg.seed,
            shuffle=train, drop_last=train, world_size=d.world, rank=d.rank, keep_ids=set(keep),
        )
        dataset = PretrainDataset(
            labels, frame_rate=frame_rate, downsample_rate=int(encoder.downsample_rate),
            num_frames=_NumFrames(encoder), crop_max=dc.crop_max, seed=cfg.seed, pad_audio=dc.pad_audio,
            random_crop=True,
        )
        nw = dc.num_workers
        loader = torch.utils.data.DataLoader(
            dataset, sampler=sampler, batch_size=None, collate_fn=collate_identity, num_workers=nw,
            worker_init_fn=_worker_init if nw > 0 else None, prefetch_factor=2 if nw > 0 else None,
            pin_memory=device.type == "cuda",
        )
        log.info("%s: %s, %d utterances, %.2f h", name, data_dir, len(keep), hours)
        return labels, sampler, loader

    train_labels, sampler, train_loader = split(dc.train, dc.train_labels, "train", train=True)
    dev_loader = None
    if dc.dev:
        dev_labels, _, dev_loader = split(dc.dev, dc.dev_labels, "dev", train=False)
        for tr, dv in zip(train_labels, dev_labels):
            if tr.k != dv.k or tr.label_rate != dv.label_rate:
                raise UserError(
                    f"dev labels {dv.label_dir} (k={dv.k}, {dv.label_rate} Hz) do not match train labels "
                    f"{tr.label_dir} (k={tr.k}, {tr.label_rate} Hz)"
                )
    for ls in train_labels:
        log.info("labels %s: k=%d at %g Hz (model %g Hz)", ls.label_dir, ls.k, ls.label_rate, frame_rate)
    empty = (f"{dc.train}: an epoch produced no full batch. Batches are dropped when a duration bucket runs out "
             f"before reaching data.max_duration={dc.max_duration} s (lhotse drop_last), so a small corpus needs fewer "
             f"buckets: lower data.num_buckets (now {dc.num_buckets}) or data.max_duration; {d.world} process(es)")
    return PretrainData(train_labels, sampler, train_loader, dev_loader, empty)


class _NumFrames:
    """``num_samples -> frames`` of the encoder (a picklable callable for DataLoader workers)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, n: int) -> int:
        with torch.no_grad():
            return int(self.encoder.num_frames(torch.tensor([int(n)]))[0])


STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


def start_loader(loader: torch.utils.data.DataLoader) -> Iterator:
    """``iter(loader)`` with the stop signals blocked while its workers fork. A worker gets torch's own SIGTERM
    handler (which re-raises a signal from anyone but its parent) before its ``worker_init_fn`` ignores the signal; a
    preemption landing in that window killed the worker and the trainer raised "DataLoader worker exited
    unexpectedly" instead of saving (seen under load, where a tiny corpus re-forks the workers every few updates).
    Blocked, the signal waits: the worker discards it once :func:`_worker_init` ignores it and unblocks; the trainer
    gets it as soon as the workers are started."""
    if loader.num_workers == 0 or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)
    # A preemption (SLURM, torchrun passing on SIGTERM) signals every process of the job, loader workers included.
    # They leave it to the training process, which finishes the update, saves a checkpoint and then shuts them down;
    # a worker dying of the signal would make the DataLoader raise before the checkpoint is written. The signals
    # arrive blocked (start_loader): ignore them, then unblock (a pending one is discarded).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
