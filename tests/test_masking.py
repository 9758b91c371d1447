"""HuBERT span masking: fairseq's compute_mask_indices statistics and padding behaviour."""

import numpy as np
import pytest
import torch

from speechssl.models.masking import compute_mask_indices

torch.set_num_threads(1)


def _fairseq_reference():
    try:
        from s3prl.upstream.wav2vec2.wav2vec2_model import compute_mask_indices as ref
    except Exception:  # s3prl is an optional second reference (pip install --no-deps s3prl)
        return None
    return ref


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
    if ref is None:
        pytest.skip("s3prl not installed")
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
