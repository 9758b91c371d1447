"""SUPERB metrics against hand-computed examples and independent references (jiwer, sklearn's roc_curve with
s3prl's EER/minDCF formulas, Kaldi's compute_min_dcf.py rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speechssl.errors import UserError
from speechssl.superb.metrics import accuracy, cer, ctc_greedy_decode, edit_distance, eer_min_dcf, per, wer


# ------------------------------------------------------------------------------------------------ edit distances


def test_edit_distance_by_hand():
    # kitten -> sitting: k->s (sub), e->i (sub), +g (ins) = 3
    assert edit_distance(list("kitten"), list("sitting")) == 3
    # a b -> b a: no transpositions in Levenshtein: 2 substitutions (or del + ins)
    assert edit_distance(["a", "b"], ["b", "a"]) == 2
    assert edit_distance([], ["x", "y"]) == 2  # two insertions
    assert edit_distance(["x", "y", "z"], []) == 3  # three deletions
    assert edit_distance(["sil", "ah"], ["sil", "ah"]) == 0


def test_per_by_hand():
    refs = [["a", "b", "c", "d"], ["a", "b"]]
    hyps = [["a", "x", "c"], ["a", "b", "c"]]
    # utt 1: b->x (sub), d deleted = 2 errors; utt 2: c inserted = 1 error; 3 errors / 6 reference tokens
    assert per(refs, hyps) == pytest.approx(0.5)
    # an empty reference counts its hypothesis as insertions: (1 + 0) / (0 + 1)
    assert per([[], ["aa"]], [["x"], ["aa"]]) == pytest.approx(1.0)
    # corpus-level, not the mean of per-utterance rates: (1 + 0) / (1 + 9) = 0.1, mean would be 0.5
    assert per([["a"], list("bbbbbbbbb")], [["z"], list("bbbbbbbbb")]) == pytest.approx(0.1)


def _naive_levenshtein(r, h):
    d = [[0] * (len(h) + 1) for _ in range(len(r) + 1)]
    for i in range(len(r) + 1):
        d[i][0] = i
    for j in range(len(h) + 1):
        d[0][j] = j
    for i in range(1, len(r) + 1):
        for j in range(1, len(h) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (r[i - 1] != h[j - 1]))
    return d[-1][-1]


def test_per_matches_plain_dp_and_jiwer_on_random_sequences():
    import jiwer

    rng = np.random.default_rng(0)
    phones = ["aa", "b", "ch", "d", "eh"]
    refs, hyps = [], []
    for _ in range(40):
        refs.append([phones[k] for k in rng.integers(0, 5, rng.integers(1, 15))])
        hyps.append([phones[k] for k in rng.integers(0, 5, rng.integers(0, 15))])
    for r, h in zip(refs, hyps):
        assert edit_distance(r, h) == _naive_levenshtein(r, h)
    ref_s = [" ".join(r) for r in refs]
    hyp_s = [" ".join(h) for h in hyps]
    assert per(refs, hyps) == pytest.approx(jiwer.wer(ref_s, hyp_s), abs=1e-12)


def test_wer_cer_by_hand():
    refs = ["the cat sat", "on the mat"]
    hyps = ["the cat sat down", "on mat"]
    # "down" inserted, "the" deleted: 2 errors / 6 reference words
    assert wer(refs, hyps) == pytest.approx(2 / 6)
    # characters (the inner space counts): "abc de" -> "abd de": c->d, 1 error / 6 characters
    assert cer(["abc de"], ["abd de"]) == pytest.approx(1 / 6)
    # an empty hypothesis is all deletions
    assert wer(["a b c"], [""]) == pytest.approx(1.0)
    # an empty reference among others: its hypothesis word is an insertion, (0 + 1) / 2
    assert wer(["a b", ""], ["a b", "x"]) == pytest.approx(0.5)


def test_error_rate_bad_inputs():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        per([["a"], ["b"]], [["a"]])
    with pytest.raises(ValueError, match="no utterances"):
        wer([], [])
    with pytest.raises(UserError, match="no tokens"):
        per([[], []], [["a"], []])
    with pytest.raises(UserError, match="every reference is empty"):
        wer(["", "  "], ["a", "b"])
    with pytest.raises(UserError, match="every reference is empty"):
        cer([""], ["a"])
    with pytest.raises(ValueError, match="token lists, not strings"):
        per(["a b"], ["a b"])  # type: ignore[list-item]


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == pytest.approx(0.5)
    assert accuracy(torch.tensor([[0, 1], [1, 1]]), np.array([0, 1, 1, 0])) == pytest.approx(0.75)
    assert accuracy(["yes", "_unknown_"], ["yes", "no"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


# ------------------------------------------------------------------------------------------------ EER / minDCF


def _trials(targets, nontargets):
    scores = list(targets) + list(nontargets)
    return scores, [True] * len(targets) + [False] * len(nontargets)


def test_eer_min_dcf_sloped_crossing_by_hand():
    # targets 0.8 0.6 0.6 0.3, non-targets 0.6 0.4 0.2. Accepting score >= t (ties together), (FPR, FNR):
    #   reject all (0, 1) ; >=0.8 (0, 3/4) ; >=0.6 (1/3, 1/4) ; >=0.4 (2/3, 1/4) ; >=0.3 (2/3, 0) ; >=0.2 (1, 0)
    # FNR - FPR: 1, 3/4, -1/12: the crossing lies on the tied (sloped) segment (0, 3/4) -> (1/3, 1/4):
    #   w = (3/4) / (3/4 + 1/12) = 9/10, FPR = 9/10 * 1/3 = 0.3, FNR = 3/4 - 9/10 * 1/2 = 0.3  -> EER 0.3
    # minDCF, p=0.01: (0.01 FNR + 0.99 FPR) / 0.01 = FNR + 99 FPR: 1, 0.75, 33.25, ... -> 0.75
    # minDCF, p=0.5: (0.5 FNR + 0.5 FPR) / 0.5 = FNR + FPR: 1, 3/4, 7/12, 11/12, 2/3, 1 -> 7/12
    scores, tgt = _trials([0.8, 0.6, 0.6, 0.3], [0.6, 0.4, 0.2])
    eer, dcf = eer_min_dcf(scores, tgt)
    assert eer == pytest.approx(0.3)
    assert dcf == pytest.approx(0.75)
    eer5, dcf5 = eer_min_dcf(scores, tgt, p_target=0.5)
    assert eer5 == pytest.approx(0.3)
    assert dcf5 == pytest.approx(7 / 12)
    # costs: c_miss=2, c_fa=1, p=0.5: c_def = 0.5; (FNR + 0.5 FPR) / 0.5 = 2 FNR + FPR: 2, 1.5, 5/6, 7/6, 2/3, 1
    assert eer_min_dcf(scores, tgt, p_target=0.5, c_miss=2, c_fa=1)[1] == pytest.approx(2 / 3)


def test_eer_min_dcf_vertical_crossing_by_hand():
    # targets 0.9 0.8 0.4, non-targets 0.7 0.3 0.2 0.1 (no ties). (FPR, FNR) accepting the top k:
    #   (0,1) (0,2/3) (0,1/3) (1/4,1/3) (1/4,0) (2/4,0) (3/4,0) (1,0)
    # FNR - FPR: 1, 2/3, 1/3, 1/12, -1/4: the crossing is on the vertical segment FPR = 1/4 -> EER 0.25
    # minDCF p=0.01: FNR + 99 FPR: 1, 2/3, 1/3, 25.08, 24.75, ... -> 1/3
    scores, tgt = _trials([0.9, 0.8, 0.4], [0.7, 0.3, 0.2, 0.1])
    eer, dcf = eer_min_dcf(scores, tgt)
    assert eer == pytest.approx(0.25)
    assert dcf == pytest.approx(1 / 3)


def test_eer_min_dcf_extremes_by_hand():
    assert eer_min_dcf(*_trials([2.0, 3.0], [0.0, 1.0])) == pytest.approx((0.0, 0.0))  # perfectly separated
    # every score tied: only "reject all" (0, 1) and "accept all" (1, 0): crossing at 0.5; minDCF = min(1, 99)
    assert eer_min_dcf(*_trials([1.0, 1.0], [1.0, 1.0])) == pytest.approx((0.5, 1.0))
    # reversed scores: the crossing is at "accept all minus the targets" (1, 1)
    assert eer_min_dcf(*_trials([0.0, 1.0], [2.0, 3.0]))[0] == pytest.approx(1.0)
    # tensors and 0/1 flags work as well
    eer, _ = eer_min_dcf(torch.tensor([0.8, 0.6, 0.6, 0.3, 0.6, 0.4, 0.2]), torch.tensor([1, 1, 1, 1, 0, 0, 0]))
    assert eer == pytest.approx(0.3)


def _s3prl_reference(scores, labels, p_target):
    """s3prl.metric.compute_eer / compute_minDCF (the formulas, on sklearn's roc_curve)."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, pos_label=1)
    eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    fnr = 1.0 - tpr
    c_det = min(fnr[i] * p_target + fpr[i] * (1 - p_target) for i in range(len(fnr)))
    return float(eer), c_det / min(p_target, 1 - p_target)


def _kaldi_min_dcf(scores, labels, p_target):
    """Kaldi's egs/sre08/v1/sid/compute_min_dcf.py (ComputeErrorRates + ComputeMinDcf, c_miss = c_fa = 1)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    lab = [int(labels[i]) for i in order]
    fnrs, fprs = [], []
    for i, y in enumerate(lab):
        fnrs.append(y if i == 0 else fnrs[-1] + y)
        fprs.append(1 - y if i == 0 else fprs[-1] + 1 - y)
    n_tar = sum(lab)
    n_non = len(lab) - n_tar
    fnrs = [x / n_tar for x in fnrs]
    fprs = [1 - x / n_non for x in fprs]
    c_det = min(fnrs[i] * p_target + fprs[i] * (1 - p_target) for i in range(len(fnrs)))
    return c_det / min(p_target, 1 - p_target)


@pytest.mark.parametrize("decimals", [None, 1])
def test_eer_min_dcf_match_s3prl_on_random_trials(decimals):
    rng = np.random.default_rng(1)
    tar = rng.normal(1.0, 1.0, 150)
    non = rng.normal(-0.5, 1.0, 400)
    scores = np.r_[tar, non]
    if decimals is not None:  # many ties between target and non-target scores: sloped ROC segments
        scores = np.round(scores, decimals)
    labels = np.r_[np.ones(150, int), np.zeros(400, int)]
    perm = rng.permutation(len(scores))
    scores, labels = scores[perm], labels[perm]
    for p in (0.01, 0.05, 0.5):
        eer, dcf = eer_min_dcf(scores, labels, p_target=p)
        ref_eer, ref_dcf = _s3prl_reference(scores, labels, p)
        assert eer == pytest.approx(ref_eer, abs=1e-9)
        assert dcf == pytest.approx(ref_dcf, abs=1e-12)
        if decimals is None:  # without ties Kaldi's point list differs only by "accept all", which never wins here
            assert dcf == pytest.approx(_kaldi_min_dcf(scores.tolist(), labels.tolist(), p), abs=1e-12)
    assert 0.1 < eer < 0.5


def test_eer_min_dcf_bad_inputs():
    with pytest.raises(ValueError, match="3 scores but 2 target flags"):
        eer_min_dcf([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="no trials"):
        eer_min_dcf([], [])
    with pytest.raises(UserError, match="all 2 trials are target trials"):
        eer_min_dcf([0.1, 0.2], [1, 1])
    with pytest.raises(UserError, match="non-target"):
        eer_min_dcf([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="score 1 is nan"):
        eer_min_dcf([0.1, math.nan], [1, 0])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        eer_min_dcf([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="p_target"):
        eer_min_dcf([0.1, 0.2], [1, 0], p_target=1.0)


# ------------------------------------------------------------------------------------------------ CTC decoding


def _one_hot_log_probs(path: list[int], vocab: int) -> torch.Tensor:
    x = torch.full((len(path), vocab), -5.0)
    x[torch.arange(len(path)), torch.tensor(path, dtype=torch.long)] = -0.1
    return x


def test_ctc_greedy_decode():
    path = [0, 1, 1, 0, 1, 2, 2, 0, 0, 3]
    # argmax path 0 1 1 0 1 2 2 0 0 3 -> merge repeats 0 1 0 1 2 0 3 -> drop blank 0 -> 1 1 2 3
    assert ctc_greedy_decode(_one_hot_log_probs(path, 4)) == [1, 1, 2, 3]
    # blank = 2: merge -> 0 1 0 1 2 0 3 -> drop 2 -> 0 1 0 1 0 3
    assert ctc_greedy_decode(_one_hot_log_probs(path, 4), blank=2) == [0, 1, 0, 1, 0, 3]
    assert ctc_greedy_decode(_one_hot_log_probs([0, 0, 0], 3)) == []  # all blank
    assert ctc_greedy_decode(torch.zeros(0, 5)) == []  # no frames
    # ties go to the lower index: frame scores equal for 1 and 2 -> 1
    assert ctc_greedy_decode(torch.tensor([[-9.0, -1.0, -1.0]])) == [1]
    # a repeated label needs a blank between its copies to survive: 1 1 -> [1], 1 0 1 -> [1, 1]
    assert ctc_greedy_decode(_one_hot_log_probs([1, 1], 3)) == [1]
    assert ctc_greedy_decode(_one_hot_log_probs([1, 0, 1], 3)) == [1, 1]


def test_ctc_greedy_decode_bad_inputs():
    with pytest.raises(ValueError, match=r"expected \[T, V\]"):
        ctc_greedy_decode(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="blank 5 is outside"):
        ctc_greedy_decode(torch.zeros(3, 4), blank=5)
