"""Property tests (hypothesis) of the mechanics the results rest on: HuBERT span masks, greedy CTC collapse, the
mapping of 100 Hz labels onto 50 Hz model frames, sharding, and PNMI.

Each property holds for every input the strategy draws, not only on average: e.g. a mask is a union of
``mask_length`` windows on every row, so an implementation that keeps each row's masked count but scatters the
frames fails here (``test_a_scattered_mask_fails_the_span_property`` runs that mutant against the checker).
Hypothesis is derandomized (the same examples every run, no example database) and ``max_examples`` is small.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import speechssl.models.masking as masking_mod
from speechssl.data.kaldi import c_sorted
from speechssl.models import HubertPretrainModel, hubert_tiny
from speechssl.models.hubert import LABEL_PAD
from speechssl.models.masking import compute_mask_indices
from speechssl.sharding import ids_sha1, resolve_shards, shard_items, shard_range
from speechssl.errors import UserError
from speechssl.superb.metrics import accuracy, cer, ctc_greedy_decode, edit_distance, eer_min_dcf, per, wer
from speechssl.train.data import PretrainDataset
from speechssl.train.finetune import greedy_tokens
from speechssl.units.labels import LabelError, label_stride
from speechssl.units.quality import count_table, quality_from_counts

PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ============================================================================================== masks
def num_mask_bounds(sz: int, p: float, L: int, min_masks: int) -> tuple[int, int]:
    """The fewest and most spans a row of ``sz`` frames can draw: ``max(min_masks, int(p * sz / L + u))``,
    ``u`` in [0, 1)."""
    x = p * sz / float(L)
    return max(min_masks, int(x)), max(min_masks, int(x + 1 - 1e-12))


def span_violations(row: np.ndarray, sz: int, L: int, p: float, min_masks: int) -> list[str]:
    """What is wrong with one row's mask (an empty list: nothing) for a row of ``sz`` valid frames.

    * nothing past ``sz`` (padding) is masked;
    * the masked frames are a union of windows ``[s, min(s + L, sz))`` (spans of ``mask_length``, cut only at the
      row's end): every maximal run not ending at ``sz`` is at least ``L`` long;
    * no more windows than the most spans the row may draw; the last valid frame of a row long enough for all its
      spans is never masked (starts are drawn from ``[0, sz - L)``, fairseq's rule);
    * a row long enough for all its spans has at least ``L + (n_min - 1)`` masked frames (``n_min`` distinct
      starts).
    """
    row = np.asarray(row, dtype=bool)
    problems = []
    if row[sz:].any():
        problems.append(f"padding masked (frames {np.flatnonzero(row[sz:])[:5] + sz})")
    valid = row[:sz]
    covered = np.zeros(sz, dtype=bool)
    for s in range(sz):
        e = min(s + L, sz)
        if valid[s:e].all():
            covered[s:e] = True
    if (valid & ~covered).any():
        problems.append(f"frames {np.flatnonzero(valid & ~covered)[:5]} are in no fully masked window of {L}")
    edges = np.diff(np.r_[0, valid.astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    n_min, n_max = num_mask_bounds(sz, p, L, min_masks)
    windows = int(sum(math.ceil((e - s) / L) for s, e in zip(starts, ends)))
    if windows > n_max:
        problems.append(f"{len(starts)} runs need {windows} windows of {L}, more than the {n_max} spans allowed")
    if sz - L > n_max:  # every span starts in [0, sz - L): whole spans, the last frame never masked
        if sz and valid[-1]:
            problems.append("the last valid frame is masked")
        if n_min >= 1 and int(valid.sum()) < L + n_min - 1:
            problems.append(f"{int(valid.sum())} frames masked, fewer than {n_min} distinct spans of {L} give")
    return problems


def check_masks(compute, *, lengths: list[int], T: int, p: float, L: int, min_masks: int, seed: int) -> None:
    """The mask properties of ``compute`` (``compute_mask_indices``'s signature) on one batch, with and without
    ``require_same_masks``."""
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    pad = torch.arange(T)[None] >= lengths_t[:, None]
    free = compute((len(lengths), T), pad, p, L, min_masks, torch.Generator().manual_seed(seed),
                   require_same_masks=False)
    assert free.shape == (len(lengths), T) and free.dtype == torch.bool
    for b, sz in enumerate(lengths):
        problems = span_violations(free[b].numpy(), sz, L, p, min_masks)
        assert not problems, f"row {b} (length {sz}): " + "; ".join(problems)
    same = compute((len(lengths), T), pad, p, L, min_masks, torch.Generator().manual_seed(seed))
    counts = same.sum(1)
    assert not (same & pad).any(), "padding masked"
    assert (counts == counts[0]).all(), f"require_same_masks: rows differ in masked frames {counts.tolist()}"
    # the row with fewest masked frames keeps its spans whole (the others lose frames at random, as in fairseq)
    assert any(not span_violations(same[b].numpy(), sz, L, p, min_masks) for b, sz in enumerate(lengths))


@st.composite
def mask_cases(draw):
    T = draw(st.integers(1, 90))
    lengths = draw(st.lists(st.integers(0, T), min_size=1, max_size=4))
    if draw(st.booleans()):
        lengths[0] = T  # a batch is padded to its longest row
    return dict(lengths=lengths, T=T, p=draw(st.sampled_from([0.0, 0.05, 0.3, 0.65, 0.8, 1.0])),
                L=draw(st.integers(1, 12)), min_masks=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**16)))


@PROPS
@given(case=mask_cases())
def test_masks_are_spans_of_mask_length_inside_each_rows_length(case):
    check_masks(compute_mask_indices, **case)


@PROPS
@given(case=mask_cases())
def test_hubert_compute_mask_is_compute_mask_indices_with_the_configs_values(case):
    """``HubertPretrainModel.compute_mask`` passes the config's mask_prob, mask_length and mask_min_masks (and the
    padding of each row) to compute_mask_indices, with fairseq's require_same_masks."""
    model = _mask_model(case["p"], case["L"], case["min_masks"])
    lengths = torch.tensor(case["lengths"])
    got = model.compute_mask(lengths, case["T"], torch.Generator().manual_seed(case["seed"]))
    pad = torch.arange(case["T"])[None] >= lengths[:, None]
    want = compute_mask_indices((len(lengths), case["T"]), pad, case["p"], case["L"], case["min_masks"],
                                torch.Generator().manual_seed(case["seed"]))
    assert torch.equal(got, want)
    check_masks(lambda shape, padding, p, L, m, g, require_same_masks=True:
                _mask_model(p, L, m).compute_mask((~padding).sum(1), shape[1], g) if require_same_masks
                else compute_mask_indices(shape, padding, p, L, m, g, require_same_masks=False), **case)


_MODEL = HubertPretrainModel(hubert_tiny(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                         intermediate_size=16, conv_layers=[(16, 3, 2)], num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2, final_dim=8, num_classes=[5],
                                         num_mel_bins=20))


def _mask_model(p: float, L: int, min_masks: int) -> HubertPretrainModel:
    _MODEL.config.mask_prob, _MODEL.config.mask_length, _MODEL.config.mask_min_masks = p, L, min_masks
    return _MODEL


def scattered_compute_mask_indices(shape, padding_mask, mask_prob, mask_length, min_masks=2, generator=None, *,
                                   require_same_masks=True):
    """The mutant of issue 29: each row keeps its masked count, but the frames are scattered at random over the
    row's valid frames."""
    real = compute_mask_indices(shape, padding_mask, mask_prob, mask_length, min_masks, generator,
                                require_same_masks=require_same_masks)
    lengths = [shape[1]] * shape[0] if padding_mask is None else (~padding_mask).sum(1).tolist()
    out = torch.zeros_like(real)
    g = torch.Generator().manual_seed(12345)
    for b, sz in enumerate(lengths):
        out[b, torch.randperm(sz, generator=g)[: int(real[b].sum())]] = True
    return out


@pytest.mark.parametrize("seed", range(3))
def test_a_scattered_mask_fails_the_span_property(seed, monkeypatch):
    """Test of the test: the scattered-frames mutant fails the properties above, called directly and through
    ``HubertPretrainModel.compute_mask`` (compute_mask_indices monkeypatched in speechssl.models.masking, where
    ``pretraining_mask``, every objective's mask, calls it)."""
    case = dict(lengths=[200, 160, 200], T=200, p=0.8, L=10, min_masks=2, seed=seed)
    with pytest.raises(AssertionError, match="in no fully masked window"):
        check_masks(scattered_compute_mask_indices, **case)
    check_masks(compute_mask_indices, **case)
    monkeypatch.setattr(masking_mod, "compute_mask_indices", scattered_compute_mask_indices)
    model = _mask_model(0.8, 10, 2)
    mask = model.compute_mask(torch.tensor([200, 160, 200]), 200, torch.Generator().manual_seed(seed))
    smallest = int(mask.sum(1).argmin())
    assert span_violations(mask[smallest].numpy(), [200, 160, 200][smallest], 10, 0.8, 2)


# ============================================================================================== CTC collapse
def collapse(path, blank: int) -> list[int]:
    """The CTC rule written plainly: merge runs of one token, then drop blanks."""
    return [k for k, _ in itertools.groupby(path) if k != blank]


@st.composite
def ctc_paths(draw):
    """(vocabulary size, blank, target tokens, a frame path that CTC maps to them)."""
    V = draw(st.integers(2, 6))
    blank = draw(st.integers(0, V - 1))
    units = [k for k in range(V) if k != blank]
    target = draw(st.lists(st.sampled_from(units), max_size=8))
    path = [blank] * draw(st.integers(0, 2))
    for i, k in enumerate(target):
        gap = draw(st.integers(0, 2))
        if i and target[i - 1] == k:
            gap = max(gap, 1)  # a repeated token needs a blank in between
        path += [blank] * gap + [k] * draw(st.integers(1, 3))
    path += [blank] * draw(st.integers(0, 2))
    return V, blank, target, path


def _peaked(path: list[int], V: int, seed: int) -> torch.Tensor:
    """``[T, V]`` log-probability-like scores whose argmax per frame is ``path`` (noise elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(path), V, generator=g)
    if path:
        x[torch.arange(len(path)), torch.tensor(path)] = 10.0
    return x.log_softmax(-1)


@PROPS
@given(case=ctc_paths(), seed=st.integers(0, 1000), extra=st.integers(0, 4))
def test_ctc_greedy_decoding_inverts_every_alignment(case, seed, extra):
    """Any CTC alignment of a token sequence (repeats, blanks anywhere, a blank between equal tokens) decodes to
    that sequence: ``ctc_greedy_decode`` (SUPERB) and ``greedy_tokens`` (fine-tuning, ``speechssl decode``);
    frames past a row's length change nothing, and each row of a batch decodes on its own."""
    V, blank, target, path = case
    x = _peaked(path, V, seed)
    assert ctc_greedy_decode(x, blank=blank) == target
    vocab = [f"t{k}" for k in range(V)]
    junk = torch.randn(extra, V, generator=torch.Generator().manual_seed(seed + 1)) * 20
    other = _peaked([k for k in range(V) if k != blank][:1] * 3, V, seed)  # a second row: one token, 3 frames
    T = max(len(path) + extra, 3)
    batch = torch.full((2, T, V), -1e4)
    batch[0, :len(path)] = x
    batch[0, len(path):len(path) + extra] = junk
    batch[1, :3] = other
    out = greedy_tokens(batch, torch.tensor([len(path), 3]), vocab, blank=blank)
    assert out[0] == [vocab[k] for k in target]
    assert out[1] == [vocab[k] for k in collapse(other.argmax(-1).tolist(), blank)]


@PROPS
@given(T=st.integers(0, 30), V=st.integers(2, 5), seed=st.integers(0, 10_000), data=st.data())
def test_ctc_greedy_decoding_is_the_plain_rule_on_any_scores(T, V, seed, data):
    """On arbitrary scores (ties included: integer-valued) the output is merge-then-drop-blanks of the per-frame
    argmax (lowest index on ties); it never holds a blank, never outgrows the frames, and does not change when a
    frame is repeated."""
    blank = data.draw(st.integers(0, V - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (T, V), generator=g).float()
    best = [int(np.argmax(row)) for row in x.numpy()]  # numpy: first index of the maximum
    got = ctc_greedy_decode(x, blank=blank)
    assert got == collapse(best, blank)
    assert blank not in got and len(got) <= T
    if T:
        i = data.draw(st.integers(0, T - 1))
        doubled = torch.cat([x[: i + 1], x[i:]])
        assert ctc_greedy_decode(doubled, blank=blank) == got
    vocab = [chr(ord("a") + k) for k in range(V)]
    assert greedy_tokens(x[None], torch.tensor([T]), vocab, blank=blank) == [[vocab[k] for k in got]]


@settings(PROPS, max_examples=15)
@given(case=ctc_paths(), seed=st.integers(0, 1000))
def test_beam_decoder_collapses_paths_as_greedy_decoding(case, seed):
    """``speechssl.asr.beam.BeamDecoder``: its path-to-tokens rule is the CTC collapse, and without an LM on peaked
    scores its best hypothesis is the greedy one."""
    from speechssl.asr.beam import BeamDecoder  # flashlight-text: the asr extra (make install), not skipped

    V, blank, target, path = case
    vocab = [f"t{k}" for k in range(V)]
    dec = BeamDecoder(vocab, blank=blank, word_delim=None, lexicon=None, beam=8)
    assert dec._tokens(path) == [vocab[k] for k in target]
    assert dec.decode(_peaked(path, V, seed)) == [vocab[k] for k in target]


# ============================================================================================== label-rate mapping
class _Labels:
    """A label set of one utterance (what ``PretrainDataset._labels_for`` asks of a LabelSet)."""

    def __init__(self, lab: np.ndarray, k: int, label_rate: float):
        self.lab, self.k, self.label_rate, self.text_path = lab, k, label_rate, "text.km"
        self.asked: list[tuple[str, int | None]] = []

    def get(self, utt: str, num_samples: int | None = None) -> np.ndarray:
        self.asked.append((utt, num_samples))  # LabelSet.get checks the labels' length against num_samples
        return self.lab


def _dataset() -> PretrainDataset:
    return PretrainDataset([], frame_rate=50.0, downsample_rate=320, num_frames=lambda n: n // 320, crop_max=None,
                           seed=0)


@PROPS
@given(stride=st.integers(1, 4), n_frames=st.integers(0, 40), frame_off=st.integers(0, 20),
       short=st.integers(-3, 3), k=st.integers(1, 50), seed=st.integers(0, 1000))
def test_crop_labels_are_every_stride_th_label_from_the_crop_start(stride, n_frames, frame_off, short, k, seed):
    """Model frame ``i`` of a crop starting at model frame ``f`` gets label ``(f + i) * stride`` (100 Hz labels on a
    50 Hz model: every second one, from the crop's start); a label sequence one model frame short is padded with
    -100, more than one short is an error naming the utterance."""
    need = (frame_off + n_frames) * stride  # labels up to the last frame of the crop
    n_lab = max(0, need - short * stride)
    lab = np.random.default_rng(seed).integers(0, k, n_lab)
    ds = _dataset()
    avail = len(lab[frame_off * stride:: stride])
    if n_frames - avail > 1:
        with pytest.raises(LabelError, match=f"utt u: {n_lab} labels"):
            ds._labels_for(_Labels(lab, k, 50.0 * stride), stride, "u", 0, frame_off, n_frames)
        return
    out = ds._labels_for(_Labels(lab, k, 50.0 * stride), stride, "u", 0, frame_off, n_frames)
    assert out.dtype == np.int64 and out.shape == (n_frames,)
    for i in range(n_frames):
        j = (frame_off + i) * stride
        assert out[i] == (lab[j] if j < n_lab else LABEL_PAD), (i, j)
    # written in place into a batch row (which PretrainDataset._fill fills with -100 first), the same values
    row = np.full(n_frames, LABEL_PAD, dtype=np.int64)
    labels = _Labels(lab, k, 50.0 * stride)
    ds._labels_for(labels, stride, "u", 16000 + seed, frame_off, n_frames, out=row)
    assert row.tolist() == out.tolist()
    # the whole utterance's length (not the crop's) goes to the label set's length check
    assert labels.asked == [("u", 16000 + seed)]


@PROPS
@given(k=st.integers(1, 9), bad=st.sampled_from([-1, 0]), n=st.integers(2, 30), where=st.data())
def test_crop_labels_out_of_range_are_refused(k, bad, n, where):
    lab = np.zeros(n, dtype=np.int64)
    i = where.draw(st.integers(0, n - 1))
    lab[i] = k if bad == 0 else -1
    with pytest.raises(LabelError, match=r"utt u: label out of range \[0, %d\)" % k):
        _dataset()._labels_for(_Labels(lab, k, 50.0), 1, "u", 0, 0, n)


@PROPS
@given(frame_rate=st.sampled_from([0.5, 25.0, 40.0, 50.0, 100.0 / 3]), stride=st.integers(1, 6),
       off=st.sampled_from([0.0, 0.3, 0.5, -0.5, 1e-3]))
def test_label_stride_is_the_whole_ratio_of_rates(frame_rate, stride, off):
    """A whole ratio within a relative 1e-6 (float noise of a rate written in a meta.json) is the stride; anything
    further off, or a rate <= 0, is an error saying so."""
    label_rate = frame_rate * stride
    if off == 0.0:
        assert label_stride(label_rate, frame_rate) == stride
        assert label_stride(label_rate * (1 + 5e-7), frame_rate) == stride
        assert label_stride(label_rate * (1 - 5e-7), frame_rate) == stride
        with pytest.raises(LabelError, match=f"label rate {label_rate * (1 + 1.5e-6):g} Hz is not a whole multiple "
                                             f"of the model frame rate {frame_rate:g} Hz"):
            label_stride(label_rate * (1 + 1.5e-6), frame_rate)
    else:
        with pytest.raises(LabelError, match="not a whole multiple"):
            label_stride(frame_rate * (stride + off), frame_rate)
    with pytest.raises(LabelError, match=f"label rate 0.0 and frame rate {frame_rate} must be positive"):
        label_stride(0.0, frame_rate)
    with pytest.raises(LabelError, match="must be positive"):
        label_stride(label_rate, -frame_rate)
    with pytest.raises(LabelError, match="must be positive"):
        label_stride(label_rate, 0.0)


@PROPS
@given(seed=st.integers(0, 2**31), epoch=st.integers(0, 1000), max_off=st.integers(0, 7))
def test_crop_offsets_are_a_deterministic_uniform_draw(seed, epoch, max_off):
    """``crop_offset``: in ``[0, max_offset_frames]``, the same for the same (seed, epoch, utterance), and over
    utterances uniform on that range (every offset is reached; chi-square, 800 utterances)."""
    from speechssl.train.data import crop_offset

    ids = [f"spk{i % 7}-utt{i:04d}" for i in range(800)]
    offs = np.array([crop_offset(seed, epoch, u, max_off) for u in ids])
    assert offs.min() >= 0 and offs.max() <= max(max_off, 0)
    assert [crop_offset(seed, epoch, u, max_off) for u in ids[:20]] == offs[:20].tolist()
    if max_off <= 0:
        assert not offs.any()
        return
    counts = np.bincount(offs, minlength=max_off + 1)
    expected = len(ids) / (max_off + 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40, counts  # 7 degrees of freedom at most: p < 1e-5
    # another seed, epoch or utterance moves the crops (and which crops a seed gives is fixed across versions:
    # a run resumed, or a recipe rerun, after an update draws the crops it drew before)
    assert [crop_offset(1, 0, "spk0-utt000", 100), crop_offset(7, 3, "spk2-utt011", 1000),
            crop_offset(0, 0, "a", 2**20)] == [61, 642, 778136]
    assert [crop_offset(seed + 1, epoch, u, max_off) for u in ids[:40]] != offs[:40].tolist()
    assert [crop_offset(seed, epoch + 1, u, max_off) for u in ids[:40]] != offs[:40].tolist()


@PROPS
@given(lengths=st.lists(st.integers(1, 9000), min_size=1, max_size=6), crop=st.sampled_from([None, 0.2, 0.35]),
       pad_audio=st.booleans())
@example(lengths=[9000, 8000], crop=0.2, pad_audio=False)  # every row longer than crop_max: cut to crop_max
@example(lengths=[9000, 320], crop=None, pad_audio=False)  # the shortest row exactly one stride
def test_crop_targets_are_whole_frames_and_never_longer_than_the_audio(lengths, crop, pad_audio):
    """``_target_len``: without pad_audio every row is cut to the shortest (or crop_max), a whole number of frame
    strides (a crop shorter than one stride is left whole); with pad_audio each row keeps its own length up to
    crop_max."""
    ds = PretrainDataset([], frame_rate=50.0, downsample_rate=320, num_frames=lambda n: n // 320, crop_max=crop,
                         seed=0, pad_audio=pad_audio)
    got = ds._target_len(lengths)
    cap = None if crop is None else int(round(crop * 16000))
    if pad_audio:
        assert got == [n if cap is None else min(n, cap) for n in lengths]
    else:
        t = min(lengths) if cap is None else min(min(lengths), cap)
        assert got == [t - t % 320 if t >= 320 else t] * len(lengths)  # shorter than a stride: left as it is


# ============================================================================================== sharding
@PROPS
@given(ids=st.lists(st.text("abcXYZ-_0129é", min_size=1, max_size=6), unique=True, max_size=40),
       nshard=st.integers(1, 9), seed=st.integers(0, 1000))
def test_every_utterance_is_in_exactly_one_shard_whatever_the_input_order(ids, nshard, seed):
    """Shards of the C-sorted list: contiguous, in order, sizes within one of each other, their concatenation the
    whole list (each utterance in exactly one shard), and the same shards whatever order the ids came in."""
    order = c_sorted(ids)
    shards = [shard_items(order, nshard, r) for r in range(nshard)]
    assert [u for s in shards for u in s] == order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    bounds = [shard_range(len(order), nshard, r) for r in range(nshard)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(order)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    shuffled = list(ids)
    np.random.default_rng(seed).shuffle(shuffled)
    assert [shard_items(c_sorted(shuffled), nshard, r) for r in range(nshard)] == shards
    # the list's fingerprint follows the ids and their order
    assert ids_sha1(c_sorted(shuffled)) == ids_sha1(order)
    if len(set(order)) > 1:
        assert ids_sha1(order[::-1]) != ids_sha1(order)
        assert ids_sha1(order[1:]) != ids_sha1(order)


@PROPS
@given(nshard=st.integers(1, 12), world=st.integers(1, 6), data=st.data())
def test_ranks_of_a_torchrun_launch_share_the_shards_out(nshard, world, data):
    """Under torchrun every shard is done by exactly one worker; an explicit rank does that shard alone; without
    either, one process does them all."""
    done = []
    for rank in range(world):
        n, mine = resolve_shards(nshard, None, {"WORLD_SIZE": str(world), "RANK": str(rank)})
        assert n == nshard
        done += mine
    assert sorted(done) == list(range(nshard))
    n, mine = resolve_shards(None, None, {"WORLD_SIZE": str(world), "RANK": "0"})
    assert n == world and mine == [0]  # nshard defaults to the world size: one shard each
    assert resolve_shards(nshard, None, {}) == (nshard, list(range(nshard)))
    r = data.draw(st.integers(0, nshard - 1))
    assert resolve_shards(nshard, r, {"WORLD_SIZE": str(world), "RANK": "0"}) == (nshard, [r])
    assert resolve_shards(None, None, {}) == (1, [0])
    # shard_range refuses a rank outside [0, nshard) and nshard < 1, naming both
    for bad_rank in (-1, nshard):
        with pytest.raises(ValueError, match=f"need 0 <= rank < nshard, got rank={bad_rank} nshard={nshard}"):
            shard_range(10, nshard, bad_rank)
    with pytest.raises(ValueError, match="got rank=0 nshard=0"):
        shard_range(10, 0, 0)


# ============================================================================================== PNMI
@st.composite
def count_tables(draw):
    P, K = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    counts = np.array(draw(st.lists(st.integers(0, 40), min_size=P * K, max_size=P * K))).reshape(P, K)
    if counts.sum() == 0:
        counts[draw(st.integers(0, P - 1)), draw(st.integers(0, K - 1))] = 1
    return counts


@PROPS
@given(counts=count_tables(), seed=st.integers(0, 1000))
@example(counts=np.array([[2, 37, 6]]), seed=0)  # one phone: p(y) summed to 1 - 1e-16 gave PNMI 2.0
@example(counts=np.array([[3, 0, 1], [0, 0, 0], [1, 0, 5]]), seed=0)  # a phone without frames, an unused unit
@example(counts=np.array([[0, 0], [0, 1]]), seed=0)  # a single frame
def test_pnmi_and_purities_follow_their_definitions(counts, seed):
    """PNMI = I(y;z)/H(y) (scikit-learn's mutual information from the same contingency table), in [0, 1]; the
    purities are sums of column/row maxima of p(y, z); all of them unchanged by relabelling phones or units,
    scaling the counts, or an unused unit."""
    from sklearn.metrics import mutual_info_score

    m = quality_from_counts(counts)
    p = counts / counts.sum()
    py = p.sum(1)
    h = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    mi = float(mutual_info_score(None, None, contingency=counts))
    assert m["h_phone"] == pytest.approx(h, abs=1e-12)
    assert m["mutual_info"] == pytest.approx(mi, abs=1e-9)
    assert m["pnmi"] == (pytest.approx(mi / h, abs=1e-9) if h > 0 else 0.0)
    assert -1e-12 <= m["pnmi"] <= 1 + 1e-12
    assert all(math.copysign(1.0, v) == 1.0 for v in m.values())  # no -0.0 (it would read "-0.0" in the JSON)
    assert m["phone_purity"] == pytest.approx(p.max(0).sum()) and m["cluster_purity"] == pytest.approx(p.max(1).sum())
    assert py.max() - 1e-12 <= m["phone_purity"] <= 1 + 1e-12
    rng = np.random.default_rng(seed)
    shuffled = counts[rng.permutation(counts.shape[0])][:, rng.permutation(counts.shape[1])]
    for other in (shuffled, 3 * counts, np.c_[counts, np.zeros(len(counts), dtype=int)]):
        for key, value in quality_from_counts(other).items():
            assert value == pytest.approx(m[key], abs=1e-9), key


def test_pnmi_refuses_tables_it_cannot_score():
    for bad in (np.zeros((3, 4), dtype=int), np.array([1, 2, 3]), np.ones((2, 2, 2))):
        with pytest.raises(ValueError, match=r"need a non-empty \[phones, units\] count table, got shape"):
            quality_from_counts(bad)


def test_count_table_takes_any_integer_like_ids():
    """Phone ids of a small dtype (uint8 from a phone table) times k past 255, units read as floats."""
    phones = np.array([0, 2, 2, 1], dtype=np.uint8)
    units = np.array([299.0, 0.0, 299.0, 150.0])
    table = count_table(phones, units, 3, 300)
    assert table.shape == (3, 300) and table[0, 299] == 1 and table[2, 0] == 1 and table[2, 299] == 1
    assert table[1, 150] == 1 and table.sum() == 4


@PROPS
@given(P=st.integers(1, 5), K=st.integers(1, 6), n=st.integers(0, 60), seed=st.integers(0, 1000))
def test_pnmi_is_one_when_units_determine_phones_and_count_table_counts_pairs(P, K, n, seed):
    rng = np.random.default_rng(seed)
    phones, units = rng.integers(0, P, n), rng.integers(0, K, n)
    table = count_table(phones, units, P, K)
    assert table.shape == (P, K) and table.sum() == n
    for y, z in zip(phones, units):
        table[y, z] -= 1
    assert not table.any()  # every (phone, unit) pair counted once, nothing else
    if n:
        # units that each name one phone (a unit per phone here) remove all phone uncertainty
        m = quality_from_counts(count_table(phones, phones, P, P))
        if len(set(phones.tolist())) > 1:
            assert m["pnmi"] == pytest.approx(1.0) and m["phone_purity"] == pytest.approx(1.0)
        else:
            assert m["pnmi"] == 0.0  # one phone: nothing to explain
    # units independent of phones explain nothing
    indep = quality_from_counts(np.outer(rng.integers(1, 5, P), rng.integers(1, 5, K)))
    assert indep["pnmi"] == pytest.approx(0.0, abs=1e-12)


# ============================================================================================== edit distance
@PROPS
@given(a=st.lists(st.integers(0, 3), max_size=12), b=st.lists(st.integers(0, 3), max_size=12),
       c=st.lists(st.integers(0, 3), max_size=12))
def test_edit_distance_is_the_levenshtein_metric(a, b, c):
    def plain(x, y):
        d = list(range(len(y) + 1))
        for i, s in enumerate(x, 1):
            prev, d[0] = d[0], i
            for j, t in enumerate(y, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (s != t))
        return d[-1]

    ab = edit_distance(a, b)
    assert ab == plain(a, b) == edit_distance(b, a)
    assert edit_distance(a, a) == 0
    assert abs(len(a) - len(b)) <= ab <= max(len(a), len(b))
    assert edit_distance(a, c) <= ab + edit_distance(b, c)


# ============================================================================================== SUPERB metrics
def _eer_min_dcf_plain(scores: np.ndarray, target: np.ndarray, p: float, c_miss: float, c_fa: float):
    """The definitions written out: operating points "reject all" then "accept score >= t" for each distinct score
    t, EER where the segment between two points crosses FNR = FPR, minDCF the normalised minimum cost."""
    n_tar, n_non = target.sum(), (~target).sum()
    points = [(0.0, 1.0)]
    for t in sorted(set(scores.tolist()), reverse=True):
        accept = scores >= t
        points.append(((accept & ~target).sum() / n_non, (~accept & target).sum() / n_tar))
    eer = None
    for (f0, m0), (f1, m1) in zip(points, points[1:]):
        d0, d1 = m0 - f0, m1 - f1
        if d0 > 0 >= d1:
            eer = f0 + d0 / (d0 - d1) * (f1 - f0)
            break
    cost = min(c_miss * m * p + c_fa * f * (1 - p) for f, m in points)
    return eer, cost / min(c_miss * p, c_fa * (1 - p))


@PROPS
@given(trials=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=25),
       p=st.sampled_from([0.01, 0.05, 0.5]), c_miss=st.sampled_from([1.0, 3.0]), c_fa=st.sampled_from([1.0, 2.0]),
       layout=st.sampled_from(["list", "tensor", "array2d"]))
def test_eer_and_min_dcf_follow_their_definitions(trials, p, c_miss, c_fa, layout):
    """Against the definitions written out, on tied integer scores, whichever trial has the lowest score; scores
    may come as a list, a tensor or a 2-D array (flattened)."""
    scores = np.array([s for s, _ in trials], dtype=float)
    target = np.array([t for _, t in trials])
    if target.all() or not target.any():
        target[0] = not target[0]
    want = _eer_min_dcf_plain(scores, target, p, c_miss, c_fa)
    if layout == "tensor":
        got = eer_min_dcf(torch.tensor(scores), torch.tensor(target), p, c_miss, c_fa)
    elif layout == "array2d" and len(scores) % 2 == 0:
        got = eer_min_dcf(scores.reshape(2, -1), target.reshape(2, -1), p, c_miss, c_fa)
    else:
        got = eer_min_dcf(scores.astype(int).tolist(), target.tolist(), p, c_miss, c_fa)
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("call,error,message", [
    (lambda: eer_min_dcf([], []), ValueError, r"^eer_min_dcf: no trials to score$"),
    (lambda: eer_min_dcf([1.0, 2.0], [0, 2]), ValueError, r"^eer_min_dcf: is_target must hold booleans or 0/1$"),
    (lambda: eer_min_dcf([1.0, 2.0, 3.0], [0, 0, 0]), UserError,
     r"^eer_min_dcf: all 3 trials are non-target trials; EER needs both kinds \(check the trials file\)$"),
    (lambda: eer_min_dcf([1.0, 2.0], [1, 1]), UserError, r"^eer_min_dcf: all 2 trials are target trials"),
    (lambda: eer_min_dcf([1.0, 2.0], [0, 1], p_target=0.0), ValueError, r"need 0 < p_target < 1 and positive costs"),
    (lambda: eer_min_dcf([1.0, 2.0], [0, 1], p_target=1.0), ValueError, r"need 0 < p_target < 1"),
    (lambda: eer_min_dcf([1.0, 2.0], [0, 1], c_miss=0.0), ValueError, r"positive costs, got 0.01, 0.0, 1"),
    (lambda: eer_min_dcf([1.0, 2.0], [0, 1], c_fa=0.0), ValueError, r"positive costs, got 0.01, 1, 0.0"),
    (lambda: accuracy([], []), ValueError, r"^accuracy: no predictions to score$"),
    (lambda: per([["a"]], ["a"]), ValueError, r"^per: utterance 0: give token lists, not strings"),
    (lambda: per(["a"], [["a"]]), ValueError, r"^per: utterance 0: give token lists, not strings"),
    (lambda: per([["a"]], []), ValueError, r"^per: 1 references but 0 hypotheses; pair them one to one$"),
    (lambda: per([[]], [["a"]]), UserError,
     r"^per: the references hold no tokens at all, so the error rate is undefined; check the label files$"),
    (lambda: wer(["a b"], []), ValueError, r"^wer: 1 references but 0 hypotheses"),
    (lambda: wer(["a b"], [1]), ValueError, r"^wer: utterance 0: references and hypotheses must be strings$"),
    (lambda: wer([1], ["a"]), ValueError, r"^wer: utterance 0: references and hypotheses must be strings$"),
    (lambda: wer(["  "], ["a"]), UserError, r"^wer: every reference is empty"),
    (lambda: cer(["a"], []), ValueError, r"^cer: 1 references but 0 hypotheses"),
    (lambda: cer([" "], ["a"]), UserError, r"^cer: every reference is empty"),
    (lambda: ctc_greedy_decode(torch.zeros(3, 4), blank=4), ValueError,
     r"^ctc_greedy_decode: blank 4 is outside the vocabulary of 4$"),
    (lambda: ctc_greedy_decode(torch.zeros(3, 4), blank=-1), ValueError, r"blank -1 is outside"),
])
def test_metric_errors_name_the_metric_and_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_accuracy_flattens_arrays_and_tensors():
    assert accuracy(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 5]])) == 0.75
    assert accuracy(torch.tensor([[1, 2], [3, 4]]), [1, 2, 0, 4]) == 0.75
    assert accuracy(["a", "b"], ("a", "c")) == 0.5
