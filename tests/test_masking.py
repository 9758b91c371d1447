"""HuBERT span masking: fairseq's compute_mask_indices statistics and padding behaviour.

The reference is s3prl's copy of fairseq's ``compute_mask_indices`` (tools/install.sh installs s3prl with the dev
extra): imported plainly, so a missing or broken s3prl fails these tests instead of skipping them. The span
structure (every mask a union of ``mask_length`` windows) is checked for any shape in tests/test_properties.py.
"""

import numpy as np
import pytest
import torch
from s3prl.upstream.wav2vec2.wav2vec2_model import compute_mask_indices as fairseq_compute_mask_indices

from speechssl.models.masking import compute_mask_indices


def _fairseq_reference():
    return fairseq_compute_mask_indices


def _expected_fraction(T: int, p: float, L: int, draws: int = 20000, seed: int = 0) -> float:
    """Monte-Carlo of the published algorithm written out independently in numpy (no overlap prevention)."""
    rng = np.random.default_rng(seed)
    total = 0
    for _ in range(draws):
        n = max(2, int(p * T / L + rng.random()))
        starts = rng.choice(T - L, n, replace=False)
        idx = (starts[:, None] + np.arange(L)[None]).ravel()
        total += len(np.unique(idx[idx < T]))
    return total / (draws * T)


def test_mask_fraction_matches_published_hubert_setting():
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([compute_mask_indices((1, 500), None, 0.8, 10, generator=g) for _ in range(1500)])
    frac = masks.float().mean().item()
    # ~57% of frames of an utterance end up masked at mask_prob 0.8, mask_length 10 (spans overlap)
    assert abs(frac - 0.57) < 0.015, frac
    assert abs(frac - _expected_fraction(500, 0.8, 10, draws=3000)) < 0.01
    # in a batch every row keeps as many masked frames as the row with fewest (fairseq require_same_masks),
    # which lowers the fraction; without it each row gets its own ~57%
    batch = compute_mask_indices((50, 500), None, 0.8, 10, generator=g)
    assert len(set(batch.sum(1).tolist())) == 1 and batch.float().mean() < frac
    free = compute_mask_indices((50, 500), None, 0.8, 10, generator=g, require_same_masks=False)
    assert len(set(free.sum(1).tolist())) > 1 and abs(free.float().mean().item() - 0.57) < 0.02


def test_mask_statistics_match_s3prl_fairseq_implementation():
    ref = _fairseq_reference()
    np.random.seed(0)
    g = torch.Generator().manual_seed(1)
    for T, p, L in [(500, 0.8, 10), (120, 0.65, 10), (37, 0.8, 10)]:
        theirs = np.mean([ref((8, T), None, p, L, min_masks=2).mean() for _ in range(300)])
        ours = np.mean([compute_mask_indices((8, T), None, p, L, generator=g).float().mean().item()
                        for _ in range(300)])
        assert abs(ours - theirs) < 0.015, (T, ours, theirs)
    # padded batch: fairseq equalises the count to the row with fewest masked frames
    pad = torch.zeros(8, 200, dtype=torch.bool)
    pad[4:, 150:] = True
    pad[7, 60:] = True
    theirs = np.mean([ref((8, 200), pad, 0.8, 10, min_masks=2).sum() for _ in range(300)])
    ours = np.mean([compute_mask_indices((8, 200), pad, 0.8, 10, generator=g).sum().item() for _ in range(300)])
    assert abs(ours - theirs) / theirs < 0.03, (ours, theirs)


def test_padding_is_never_masked_and_masking_is_per_utterance():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([300, 180, 25, 300])
    pad = torch.arange(300)[None] >= lengths[:, None]
    for _ in range(50):
        m = compute_mask_indices((4, 300), pad, 0.8, 10, generator=g, require_same_masks=False)
        assert not (m & pad).any()
        # a short utterance is masked on its own length, not cut off by a batch-level span count
        assert m[2, :25].sum() > 0
    # without equalisation the long rows get ~57%, the short one its own share
    masks = torch.stack([compute_mask_indices((4, 300), pad, 0.8, 10, generator=g, require_same_masks=False)
                         for _ in range(200)]).float()
    assert abs(masks[:, 0].mean().item() - 0.57) < 0.03
    assert abs(masks[:, 1, :180].mean().item() - 0.57) < 0.04


def test_min_masks_and_tiny_lengths():
    g = torch.Generator().manual_seed(0)
    # mask_prob 0: min_masks spans are still drawn (fairseq); mask_prob 0 with min_masks 0 masks nothing
    m = compute_mask_indices((2, 100), None, 0.0, 10, min_masks=2, generator=g)
    assert 10 < m.sum(1).min() <= 20
    assert not compute_mask_indices((2, 100), None, 0.0, 10, min_masks=0, generator=g).any()
    # utterances shorter than a span and empty rows do not crash and stay inside their length
    pad = torch.arange(12)[None] >= torch.tensor([12, 5, 0])[:, None]
    m = compute_mask_indices((3, 12), pad, 0.8, 10, generator=g, require_same_masks=False)
    assert not (m & pad).any() and m[0].any() and m[1].any()


def test_generator_makes_masks_reproducible():
    a = compute_mask_indices((4, 200), None, 0.8, 10, generator=torch.Generator().manual_seed(7))
    b = compute_mask_indices((4, 200), None, 0.8, 10, generator=torch.Generator().manual_seed(7))
    c = compute_mask_indices((4, 200), None, 0.8, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------- per row and per span
def _row_span_stats(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: masked frames, maximal masked runs, first frame masked, last frame masked; per span (pooled over
    rows): the length of every maximal run."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, ((0, 0), (1, 1))).astype(np.int8)
    edges = np.diff(padded, axis=1)
    run_lengths = []
    for row in edges:
        starts, ends = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
        run_lengths.extend((ends - starts).tolist())
    return {"count": m.sum(1), "runs": (edges == 1).sum(1), "first": m[:, 0], "last": m[:, -1],
            "run_length": np.array(run_lengths, dtype=float)}


@pytest.mark.parametrize("T,p,L,min_masks", [
    (500, 0.8, 10, 2), (120, 0.65, 10, 2), (37, 0.8, 10, 2), (21, 0.8, 10, 2), (15, 0.8, 10, 2), (12, 0.8, 10, 2),
    (11, 0.8, 10, 2), (5, 0.8, 10, 2), (1, 0.8, 10, 2), (60, 0.0, 5, 2), (60, 0.3, 5, 0), (40, 0.5, 1, 3),
])
def test_row_and_span_statistics_match_fairseq(T, p, L, min_masks):
    """Each row on its own (``require_same_masks=False``; fairseq draws a row's span count on its own length when
    given a padding mask): the distribution of masked frames, of maximal runs and of their lengths, and of the first
    and last frame being masked, equal fairseq's (within 5 standard errors, 2000 rows each). Short rows (the
    ``sz - mask_length <= num_mask`` branch, spans cut at the row's end) are where implementations differ."""
    n = 2000
    np.random.seed(T)
    theirs = _row_span_stats(fairseq_compute_mask_indices((n, T), torch.zeros(n, T, dtype=torch.bool), p, L,
                                                          min_masks=min_masks, require_same_masks=False))
    ours = _row_span_stats(compute_mask_indices((n, T), None, p, L, min_masks=min_masks, require_same_masks=False,
                                                generator=torch.Generator().manual_seed(T)).numpy())
    for key in ("count", "runs", "first", "last", "run_length"):
        a, b = ours[key].astype(float), theirs[key].astype(float)
        se = np.sqrt(a.var() / max(len(a), 1) + b.var() / max(len(b), 1))
        assert abs(a.mean() - b.mean()) <= 5 * se + 1e-9, (key, a.mean(), b.mean(), se)
    # the count of masked frames has the same support (no count fairseq never gives, none of its counts missing
    # among the frequent ones)
    their_counts = np.bincount(theirs["count"], minlength=T + 1) / n
    our_counts = np.bincount(ours["count"], minlength=T + 1) / n
    assert not ((our_counts > 0) & (their_counts == 0) & (our_counts > 0.01)).any()
    assert not ((their_counts > 0.01) & (our_counts == 0)).any()


def test_last_frame_of_a_long_row_is_never_masked_as_in_fairseq():
    """Starts are drawn from ``[0, sz - mask_length)`` (fairseq's ``np.random.choice(sz - min_len)``), so the last
    valid frame of a row long enough for all its spans is never masked; padded rows keep it at their own length."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([200, 150, 60])
    pad = torch.arange(200)[None] >= lengths[:, None]
    for _ in range(100):
        m = compute_mask_indices((3, 200), pad, 0.8, 10, generator=g, require_same_masks=False)
        assert not m[torch.arange(3), lengths - 1].any()
        assert m[:, 0].float().mean() < 1  # and the first frame is not special
    np.random.seed(0)
    ref = fairseq_compute_mask_indices((200, 60), None, 0.8, 10, min_masks=2, require_same_masks=False)
    assert not ref[:, -1].any() and ref[:, -2].any()


def test_default_min_masks_is_hubert_two_and_validation():
    g = torch.Generator().manual_seed(0)
    # fairseq HuBERT calls compute_mask_indices with min_masks=2: a mask_prob 0 still masks two distinct spans
    for _ in range(20):
        m = compute_mask_indices((1, 100), None, 0.0, 10, generator=g, require_same_masks=False)
        runs = _row_span_stats(m.numpy())
        assert 10 < int(m.sum()) <= 20 and runs["runs"][0] <= 2
    # mask_length 1 is a valid span (one frame), 0 is refused with a message naming the option
    m = compute_mask_indices((2, 50), None, 0.5, 1, generator=g, require_same_masks=False)
    assert 2 <= int(m[0].sum()) <= 26
    with pytest.raises(ValueError, match="mask_length must be >= 1, got 0"):
        compute_mask_indices((2, 50), None, 0.5, 0)
    # an empty batch is an empty mask
    assert compute_mask_indices((0, 50), None, 0.8, 10).shape == (0, 50)


def test_generator_leaves_torch_global_rng_alone_and_rounding_uses_it():
    """With a generator every draw (span counts' probabilistic rounding included) comes from it: the global RNG
    is untouched, and the same seed gives the same masks on lengths where the rounding matters."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    pad = torch.arange(203)[None] >= torch.tensor([203, 177, 91])[:, None]
    a = compute_mask_indices((3, 203), pad, 0.8, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    masks = []
    for seed in range(6):
        torch.manual_seed(1000 + seed)  # a global RNG in another state each time: the masks must not change
        masks.append(compute_mask_indices((3, 203), pad, 0.8, 10, generator=torch.Generator().manual_seed(5),
                                          require_same_masks=False))
    assert all(torch.equal(masks[0], m) for m in masks)
    assert torch.equal(a, compute_mask_indices((3, 203), pad, 0.8, 10, generator=torch.Generator().manual_seed(5)))


def test_empty_rows_anywhere_in_the_batch_leave_the_others_masked():
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([0, 80, 0, 60])
    pad = torch.arange(80)[None] >= lengths[:, None]
    for _ in range(20):
        m = compute_mask_indices((4, 80), pad, 0.8, 10, generator=g, require_same_masks=False)
        assert not m[0].any() and not m[2].any() and m[1].any() and m[3].any()
        # with require_same_masks every row keeps as many frames as the emptiest row: none
        assert not compute_mask_indices((4, 80), pad, 0.8, 10, generator=g).any()


def test_require_same_masks_keeps_a_subset_of_each_rows_spans():
    """Equalising draws after all rows are masked: with the same seed, each equalised row is a subset of the row
    without equalisation, every row has the smallest row's count, and the smallest row is unchanged."""
    lengths = torch.tensor([100, 73, 100, 40])
    pad = torch.arange(100)[None] >= lengths[:, None]
    for seed in range(30):
        free = compute_mask_indices((4, 100), pad, 0.65, 7, generator=torch.Generator().manual_seed(seed),
                                    require_same_masks=False)
        same = compute_mask_indices((4, 100), pad, 0.65, 7, generator=torch.Generator().manual_seed(seed))
        counts = free.sum(1)
        assert (same.sum(1) == counts.min()).all()
        assert not (same & ~free).any()
        smallest = int(counts.argmin())
        assert torch.equal(same[smallest], free[smallest])
