"""A loader that keeps up (issue 25): the trainer's data-wait fraction and warning, and the fast batch assembly of
``PretrainDataset`` (decode in place, shared-memory batches in workers, int16 waveforms from a worker for 16-bit
PCM, ``Utt`` tuples instead of lhotse cuts) giving the same batches as before."""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.audio import load_audio, open_audio
from speechssl.train.data import (
    LABEL_PAD,
    PCM16_SCALE,
    PretrainDataset,
    ResumableBatchSampler,
    Utt,
    batch_wavs,
    collate_identity,
    crop_offset,
    cut_num_samples,
    load_label_sets,
    utt_of,
)
from speechssl.train.logs import DataWaitWatch, Window
from speechssl.train.trainer import Trainer
from speechssl.units.labels import write_labels
from test_train import K, make_corpus, tiny_cfg

SR = 16000


# ------------------------------------------------------------------------------------------------ data_wait
def _train(tmp_path, corpus, caplog, sleep_s: float | None) -> tuple[list[float], list[str]]:
    """Train a tiny model whose dataset sleeps ``sleep_s`` per batch, or (None) hands out its first batch again at
    once; (data_wait per log line, warnings)."""
    data, labdir = corpus
    cfg = tiny_cfg(tmp_path, data, labdir, "optim.max_steps=8", "log_every=2", "ckpt.every_steps=100",
                   "data.num_workers=0")
    orig = PretrainDataset.__getitem__
    first: list[dict] = []

    def slow(self, item):
        time.sleep(sleep_s)
        return orig(self, item)

    def instant(self, item):
        if not first:
            first.append(orig(self, item))
        return first[0] | {"epoch": item[0], "index": item[1]}

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="speechssl"):
        mp.setattr(PretrainDataset, "__getitem__", instant if sleep_s is None else slow)
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    lines = [r.getMessage() for r in caplog.records
             if r.name == "speechssl.train.logs" and r.levelno == logging.INFO]
    waits = [float(m.group(1)) for line in lines if (m := re.search(r"data_wait=([0-9.e+-]+)", line))]
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "data_wait" in r.getMessage()]
    return waits, warnings


def test_a_sleeping_loader_shows_in_data_wait_and_warns_once(tmp_path, caplog):
    corpus = make_corpus(tmp_path / "c")
    waits, warnings = _train(tmp_path / "slow", corpus, caplog, 0.25)
    assert len(waits) == 4  # updates 2, 4, 6, 8
    assert all(w > 0.5 for w in waits), waits  # ~95% of each update is the sleep
    # the first log line is exempt (loader start-up); then one warning, the next not before 20 more log lines
    assert len(warnings) == 1, warnings
    assert "data.num_workers (now 0" in warnings[0] and "update 4" in warnings[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "slow" / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/data_wait")] == [2, 4, 6, 8]


def test_a_fast_loader_keeps_data_wait_low(tmp_path, caplog):
    corpus = make_corpus(tmp_path / "c")
    waits, warnings = _train(tmp_path / "fast", corpus, caplog, None)
    assert len(waits) == 4 and all(0.0 <= w < 0.2 for w in waits[1:]) and not warnings, (waits, warnings)


def test_data_wait_watch_throttles_and_names_the_workers(caplog):
    watch = DataWaitWatch(num_workers=3, threshold=0.2, every=3)
    with caplog.at_level(logging.WARNING, logger="speechssl"):
        fired = [watch.check({"data_wait": w}, step) for step, w in enumerate([0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9], 1)]
    assert fired == [False, True, False, False, True, False, False]  # not the first line, then every 3rd at most
    assert "raise data.num_workers (now 3;" in caplog.records[0].getMessage()
    assert not DataWaitWatch(2).check({"loss": 1.0}, 1)  # no data_wait, no warning


def test_window_data_wait_is_wait_over_update_time():
    from speechssl.train.distributed import Dist

    w = Window()
    w.add({"loss": 1.0}, 1.0, 4.0)
    w.add_time(0.3, 1.0)
    w.add_time(0.1, 1.0)
    stats = w.reduce(Dist())
    assert stats["data_wait"] == pytest.approx(0.2) and stats["loss"] == 1.0
    w2 = Window()
    w2.add({"loss": 1.0}, 1.0, 4.0)
    assert "data_wait" not in w2.reduce(Dist())  # no times added


# ------------------------------------------------------------------------------------------------ batches unchanged
def _reference_batch(ds: PretrainDataset, epoch: int, index: int, cuts) -> dict:
    """The batch as ``PretrainDataset`` assembled it before decoding in place: one array per utterance from
    ``load_audio`` (float32), cut or zero-padded to its target, copied into zeros; labels strided and padded per row."""
    cuts = [c if isinstance(c, Utt) else utt_of(c) for c in cuts]
    lengths = [c.num_samples for c in cuts]
    targets = ds._target_len(lengths)
    wavs, labels, frames = [], [[] for _ in ds.label_sets], []
    for cut, n, t in zip(cuts, lengths, targets):
        max_off = (n - t) // ds.ds if n > t else 0
        f_off = crop_offset(ds.seed, epoch, cut.id, max_off) if ds.random_crop else 0
        start = cut.start + f_off * ds.ds / SR
        wav = load_audio(cut.source, utt_id=cut.id, start=start, end=start + t / SR)
        wav = wav[:t] if len(wav) >= t else np.pad(wav, (0, t - len(wav)))
        wavs.append(torch.from_numpy(wav))
        nf = int(ds.num_frames(t))
        frames.append(nf)
        for j, (ls, stride) in enumerate(zip(ds.label_sets, ds.strides)):
            lab = ls.get(cut.id, n)[f_off * stride :: stride][:nf].astype(np.int64)
            labels[j].append(np.concatenate([lab, np.full(nf - len(lab), LABEL_PAD, dtype=np.int64)]))
    B, S, T = len(cuts), max(targets), max(frames)
    wb = torch.zeros(B, S)
    for i, w in enumerate(wavs):
        wb[i, : len(w)] = w
    lbs = []
    for per_set in labels:
        lb = torch.full((B, T), LABEL_PAD, dtype=torch.long)
        for i, lab in enumerate(per_set):
            lb[i, : len(lab)] = torch.from_numpy(lab)
        lbs.append(lb)
    return {"wavs": wb, "wav_lens": torch.tensor(targets), "labels": lbs, "ids": [c.id for c in cuts]}


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """16-bit WAV and FLAC, a stereo 8 kHz WAV (resampled: not decoded in place) and a float WAV (neither can be
    int16), two label sets."""
    from lhotse import CutSet

    root = tmp_path_factory.mktemp("mixed")
    data, labdir = make_corpus(root, n_utts=9)
    cuts = CutSet.from_file(data / "cuts.jsonl.gz")
    rng = np.random.default_rng(1)
    new = []
    for i, cut in enumerate(cuts):
        path = cut.recording.sources[0].source
        if i % 3 == 1:  # the same samples as FLAC
            flac = path.replace(".wav", ".flac")
            sf.write(flac, sf.read(path, dtype="int16")[0], SR, subtype="PCM_16", format="FLAC")
            cut.recording.sources[0].source = flac
        elif i == 2:  # stereo at 8 kHz
            n8 = cut.recording.num_samples // 2
            sf.write(path, (rng.standard_normal((n8, 2)) * 0.1).astype(np.float32), 8000, subtype="PCM_16")
            cut.recording.sampling_rate = 8000
            cut.recording.num_samples = n8
            cut.recording.channel_ids = [0, 1]
        elif i == 7:  # float samples: decoded as float32 even in a worker
            sf.write(path, sf.read(path, dtype="float32")[0] * 0.5, SR, subtype="FLOAT")
        new.append(cut)
    labdir2 = root / "labels50"
    labels = {c.id: rng.integers(0, 7, 1 + (cut_num_samples(c) - 400) // 320) for c in new}
    write_labels(labdir2, labels, {"label_rate": 50.0, "k": 7,
                                   "framing": {"type": "window", "frame_length": 400, "frame_shift": 320}})
    return CutSet.from_cuts(new), [labdir, labdir2]


def _all_int16(cuts) -> bool:
    """Every crop of the batch decodes as int16: mono 16-bit PCM files at 16 kHz."""
    out = True
    for c in cuts:
        with open_audio((c if isinstance(c, Utt) else utt_of(c)).source) as a:
            out = out and a.int16_at(SR)
    return out


@pytest.mark.parametrize("pad_audio", [False, True])
def test_batches_are_those_of_the_straightforward_assembly(mixed_corpus, pad_audio):
    cuts, label_dirs = mixed_corpus
    ds = PretrainDataset(load_label_sets(label_dirs), frame_rate=50.0, downsample_rate=320,
                         num_frames=lambda n: max(0, (n - 400) // 320 + 1), crop_max=1.5, seed=5,
                         pad_audio=pad_audio)
    groups = [list(cuts)[i : i + 3] for i in range(0, 9, 3)]
    # lhotse cuts and Utt tuples (what the sampler sends) alike
    items = [(epoch, i, g if epoch % 2 else tuple(map(utt_of, g))) for epoch in range(4) for i, g in enumerate(groups)]
    loader = torch.utils.data.DataLoader(ds, sampler=items, batch_size=None, collate_fn=collate_identity,
                                         num_workers=1)
    from_workers = list(loader)  # all held at once: the worker's recycled blocks must not change what was received
    assert len(from_workers) == len(items)
    starts_int16 = True  # the worker starts a batch as int16 when its last batch was all int16
    seen = set()
    for item, from_worker in zip(items, from_workers):
        ref = _reference_batch(ds, *item)
        in_process = ds[item]
        assert in_process["wavs"].dtype == torch.float32  # in the training process: float32 always
        for got in (in_process, from_worker):
            assert got["ids"] == ref["ids"]
            wavs = batch_wavs(got)
            assert wavs.dtype == torch.float32 and torch.equal(wavs, ref["wavs"])
            assert torch.equal(got["wav_lens"], ref["wav_lens"]) and got["wav_lens"].dtype == torch.long
            assert len(got["labels"]) == 2
            for a, b in zip(got["labels"], ref["labels"]):
                assert torch.equal(a, b) and a.dtype == torch.long
        assert batch_wavs(in_process) is in_process["wavs"]  # float32 batches pass through untouched
        all16 = _all_int16(item[2])
        switched = starts_int16 and not all16  # started as int16, turned float32 at its first non-16-bit crop
        assert from_worker["wavs"].dtype == (torch.int16 if starts_int16 and all16 else torch.float32)
        seen.add((str(from_worker["wavs"].dtype), switched))
        # copied out of the worker's shared block as it was received: private tensors
        assert not any(t.is_shared() for t in (from_worker["wavs"], from_worker["wav_lens"], *from_worker["labels"]))
        starts_int16 = all16
    assert seen == {("torch.int16", False), ("torch.float32", True), ("torch.float32", False)}  # every path taken


def test_a_worker_recycles_its_shared_memory_blocks(tmp_path, monkeypatch):
    """A worker lays its batches out in a few blocks of shared memory that come back to it once the training process
    has copied each batch out: a handful of blocks for many batches, and no file descriptors left behind."""
    from lhotse import CutSet

    from speechssl.train import data as train_data

    data, labdir = make_corpus(tmp_path / "c", n_utts=12)
    cuts = list(CutSet.from_file(data / "cuts.jsonl.gz"))
    ds = PretrainDataset(load_label_sets([labdir]), frame_rate=50.0, downsample_rate=320,
                         num_frames=lambda n: max(0, (n - 400) // 320 + 1), crop_max=1.5, seed=5)
    made = tmp_path / "blocks.log"
    new_block = train_data._new_block

    def counted(nbytes):  # runs in the (forked) worker
        with open(made, "a") as f:
            f.write(f"{nbytes}\n")
        return new_block(nbytes)

    monkeypatch.setattr(train_data, "_new_block", counted)
    items = [(e, i, tuple(map(utt_of, cuts[i : i + 3]))) for e in range(10) for i in range(0, 12, 3)]
    # the first worker of the process opens what the process keeps for every later one (torch's and
    # multiprocessing's shared-memory plumbing): count from after one, not from whichever test ran a loader before
    list(torch.utils.data.DataLoader(ds, sampler=items[:8], batch_size=None, collate_fn=collate_identity,
                                     num_workers=1, prefetch_factor=2))

    def unaccounted():
        """Open descriptors beyond the ones the last worker's state holds: one per mapped block (a Python mmap keeps
        a duplicate of its descriptor) and its pipe. How many blocks a worker made depends on the release latency
        under load, so those are not compared across workers; everything else must come back to where it was."""
        return len(os.listdir("/proc/self/fd")) - len(train_data._maps) - len(train_data._release_fds)

    fds = unaccounted()
    for epoch in range(3):  # a new worker each time, as every epoch of the trainer
        made.unlink(missing_ok=True)
        loader = torch.utils.data.DataLoader(ds, sampler=items, batch_size=None, collate_fn=collate_identity,
                                             num_workers=1, prefetch_factor=2)
        got = list(loader)
        for item, b in zip(items[:4], got[:4]):
            assert torch.equal(batch_wavs(b), _reference_batch(ds, *item)["wavs"])
        assert b["wavs"].dtype == torch.int16
        assert len(made.read_text().split()) <= 5  # 40 batches in at most 5 blocks (prefetch 2, release latency)
    assert len(train_data._release_fds) <= 1  # the pipes of the exited workers were closed
    assert {token for token, _ in train_data._maps} <= set(train_data._release_fds)  # and their blocks unmapped
    assert unaccounted() <= fds


def test_batches_beyond_the_pool_travel_as_torch_shares_them(tmp_path, monkeypatch):
    from lhotse import CutSet

    from speechssl.train.data import _BlockPool

    data, labdir = make_corpus(tmp_path / "c", n_utts=6)
    cuts = list(CutSet.from_file(data / "cuts.jsonl.gz"))
    ds = PretrainDataset(load_label_sets([labdir]), frame_rate=50.0, downsample_rate=320,
                         num_frames=lambda n: max(0, (n - 400) // 320 + 1), crop_max=1.5, seed=5)
    monkeypatch.setattr(_BlockPool, "MAX_BLOCKS", 1)  # the prefetched batch finds the only block in flight
    items = [(e, i, tuple(map(utt_of, cuts[i : i + 3]))) for e in range(4) for i in (0, 3)]
    loader = torch.utils.data.DataLoader(ds, sampler=items, batch_size=None, collate_fn=collate_identity,
                                         num_workers=1, prefetch_factor=2)
    for item, got in zip(items, list(loader)):
        ref = _reference_batch(ds, *item)
        assert torch.equal(batch_wavs(got), ref["wavs"]) and torch.equal(got["labels"][0], ref["labels"][0])
        assert not got["wavs"].is_shared()


def test_block_pool_hands_out_only_released_blocks():
    from speechssl.train.data import _BlockPool

    pool = _BlockPool()
    specs = [((4, 1000), torch.int16), ((4,), torch.long)]
    taken = [pool.take(specs)[0] for _ in range(pool.MAX_BLOCKS)]
    assert sorted(taken) == list(range(pool.MAX_BLOCKS))
    block, views = pool.take(specs)
    assert block is None and views[0].shape == (4, 1000)  # all in flight: a block of its own
    os.write(pool.w, struct.pack("<i", 3))  # what the training process writes once it has copied batch 3 out
    block, views = pool.take(specs)
    assert block == 3 and views[0].untyped_storage().data_ptr() == pool.blocks[3].data_ptr()
    os.write(pool.w, struct.pack("<2i", 3, 5))
    big = [((4, 10**6), torch.int16)]  # too big for the free blocks: one of them is replaced by a bigger one
    block, views = pool.take(big)
    assert block in (3, 5) and pool.blocks[block].nbytes() >= 8 * 10**6


def test_a_crop_one_sample_longer_than_its_row(tmp_path):
    """A segment whose start falls on half a sample reads one sample more than its crop (rounding); when it is the
    longest row, it cannot be decoded in place (int16 row in a worker: the batch turns float32)."""
    x = (np.random.default_rng(3).integers(-2000, 2000, 4001)).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, SR, subtype="PCM_16")
    sf.write(tmp_path / "b.flac", x[::-1].copy(), SR, subtype="PCM_16")
    labels = {u: np.zeros(1 + (n - 400) // 160, dtype=np.int64) for u, n in (("a", 4000), ("b", 3001))}
    write_labels(tmp_path / "lab", labels, {"label_rate": 100.0, "k": K,
                                            "framing": {"type": "window", "frame_length": 400, "frame_shift": 160}})
    ds = PretrainDataset(load_label_sets([tmp_path / "lab"]), frame_rate=50.0, downsample_rate=320,
                         num_frames=lambda n: max(0, (n - 400) // 320 + 1), crop_max=None, seed=0, pad_audio=True)
    utts = (Utt("b", str(tmp_path / "b.flac"), 0.0, 3001), Utt("a", str(tmp_path / "a.wav"), 0.5 / SR, 4000 - 1))
    item = (0, 0, utts)
    ref = _reference_batch(ds, *item)
    loader = torch.utils.data.DataLoader(ds, sampler=[item, item], batch_size=None, collate_fn=collate_identity,
                                         num_workers=1)
    for got in (ds[item], *loader):
        assert torch.equal(batch_wavs(got), ref["wavs"]) and got["wav_lens"].tolist() == [3001, 3999]
        assert got["wavs"].dtype == torch.float32


@pytest.mark.filterwarnings("ignore:You are using DynamicBucketingSampler with an eagerly read CutSet")
def test_the_sampler_sends_plain_tuples(mixed_corpus):
    cuts, _ = mixed_corpus
    sampler = ResumableBatchSampler(cuts, max_duration=5.0, crop_max=None, num_buckets=1, seed=0, shuffle=False,
                                    drop_last=False)
    batches = list(sampler)
    assert [u.id for _, _, utts in batches for u in utts] == [c.id for c in cuts]
    for _, _, utts in batches:
        assert type(utts) is tuple and all(type(u) is Utt for u in utts)
        lhotse = [cuts[u.id] for u in utts]
        assert list(utts) == [utt_of(c) for c in lhotse]
        assert len(pickle.dumps(utts)) * 3 < len(pickle.dumps(lhotse))  # what crosses to a worker


def test_int16_is_float32_decoding_bit_for_bit(tmp_path):
    """``x / 32768`` of the int16 samples is libsndfile's float32 decoding of 16-bit PCM, for every value."""
    x = np.concatenate([np.arange(-32768, 32768), np.random.default_rng(0).integers(-32768, 32768, 5000)])
    x = x.astype(np.int16)
    for name, fmt in (("a.wav", "WAV"), ("a.flac", "FLAC")):
        path = str(tmp_path / name)
        sf.write(path, x, SR, subtype="PCM_16", format=fmt)
        f32 = load_audio(path)
        out = np.zeros(len(x) + 10, dtype=np.int16)
        i16 = load_audio(path, out=out)
        assert i16.dtype == np.int16 and np.may_share_memory(i16, out) and np.array_equal(i16, x)
        got = batch_wavs({"wavs": torch.from_numpy(i16[None])})
        assert got.dtype == torch.float32 and np.array_equal(got[0].numpy().view(np.int32), f32.view(np.int32))
        scaled = torch.from_numpy(i16).to(torch.float32).mul_(PCM16_SCALE)  # the GPU path's ops, on the CPU
        assert np.array_equal(scaled.numpy().view(np.int32), f32.view(np.int32))


def test_load_audio_decodes_into_out_when_it_can(tmp_path):
    wav = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    sf.write(tmp_path / "a.wav", wav, SR, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", wav, SR, subtype="PCM_16")
    sf.write(tmp_path / "s.wav", np.stack([wav, -wav], 1), SR, subtype="PCM_16")
    sf.write(tmp_path / "f.wav", wav, SR, subtype="FLOAT")
    sf.write(tmp_path / "r.wav", wav, 8000, subtype="PCM_16")
    for name in ("a.wav", "a.flac", "s.wav", "f.wav", "r.wav"):
        path = str(tmp_path / name)
        plain = load_audio(path, start=0.25, end=0.75)
        out = np.full(9000, 7.0, dtype=np.float32)
        got = load_audio(path, start=0.25, end=0.75, out=out)
        assert np.array_equal(got, plain) and got.dtype == np.float32
        # stereo is averaged, 8 kHz resampled: a new array
        assert np.may_share_memory(got, out) == (name in ("a.wav", "a.flac", "f.wav"))
        small = np.zeros(100, dtype=np.float32)  # too small: a new array, out untouched
        assert np.array_equal(load_audio(path, start=0.25, end=0.75, out=small), plain) and not small.any()
        # int16: mono 16-bit PCM at the rate only, else a new float32 array
        out16 = np.full(9000, 7, dtype=np.int16)
        got16 = load_audio(path, start=0.25, end=0.75, out=out16)
        with open_audio(path) as a:
            assert a.int16_at(SR) == (name in ("a.wav", "a.flac"))
        if name in ("a.wav", "a.flac"):
            assert got16.dtype == np.int16 and np.may_share_memory(got16, out16)
            assert np.array_equal(got16 / np.float32(32768), plain) and (out16[len(got16):] == 7).all()
        else:
            assert got16.dtype == np.float32 and np.array_equal(got16, plain) and (out16 == 7).all()
    with pytest.raises(ValueError, match="float32 1-D"):
        load_audio(str(tmp_path / "a.wav"), out=np.zeros(10))


def test_labels_one_frame_short_are_padded_not_refused(tmp_path):
    """``check_label_length`` allows a label sequence one frame short; the crop pads it with LABEL_PAD (the range
    check used to run after the padding and refused -100 as out of range)."""
    from speechssl.units.labels import LabelError

    write_labels(tmp_path / "lab", {"u1": np.arange(10) % K}, {"label_rate": 50.0, "k": K})
    ds = PretrainDataset(load_label_sets([tmp_path / "lab"]), frame_rate=50.0, downsample_rate=320,
                         num_frames=lambda n: n // 320, crop_max=None, seed=0)
    ls = ds.label_sets[0]
    n = 10 * 320  # 10 frames of audio: 10 labels expected
    got = ds._labels_for(ls, 1, "u1", n, frame_off=1, n_frames=10)  # the crop needs labels 1..10: one short
    assert got.tolist() == (np.arange(1, 10) % K).tolist() + [LABEL_PAD]
    with pytest.raises(LabelError, match="cover only 8 of the 10"):
        ds._labels_for(ls, 1, "u1", n, frame_off=2, n_frames=10)
