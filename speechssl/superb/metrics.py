"""SUPERB task metrics: PER, WER/CER, accuracy, EER + minDCF, greedy CTC decoding.

Every rate is a fraction (0.25, not 25 %). Error rates are corpus-level: the edit operations of all utterances
summed, divided by the reference tokens of all utterances (as s3prl's ``ter``/``wer`` and jiwer do), never a mean
of per-utterance rates.

Speaker verification (``eer_min_dcf``) follows s3prl's ``s3prl.metric.compute_eer`` / ``compute_minDCF``, which
SUPERB reports:

- the operating points are those a threshold can realise: "accept every trial whose score is >= t" for each
  distinct score t (tied scores move together), plus "reject all"; this is the point list of
  ``sklearn.metrics.roc_curve``;
- **EER** is where the ROC, linearly interpolated between those points, crosses FNR = FPR (s3prl finds the same
  point with ``brentq`` on ``interp1d(fpr, tpr)``; we walk the segments, which also handles vertical segments where
  ``interp1d`` is ill-defined). Kaldi's ``compute-eer`` does *not* interpolate: it steps through the sorted target
  scores and reports the miss rate at the first one above the matching non-target quantile, so it can differ
  from ours by up to about 1/#targets;
- **minDCF** is ``min_t [c_miss * FNR(t) * p_target + c_fa * FPR(t) * (1 - p_target)] / c_def`` with
  ``c_def = min(c_miss * p_target, c_fa * (1 - p_target))``, the normalisation of Kaldi's
  ``sid/compute_min_dcf.py`` and s3prl. Kaldi's script walks the individually sorted scores, so with tied scores
  it can reach operating points no threshold realises (and it omits "accept all", which never wins for
  ``p_target <= 0.5`` with equal costs); without ties the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from speechssl.errors import UserError

__all__ = ["edit_distance", "per", "wer", "cer", "accuracy", "eer_min_dcf", "ctc_greedy_decode"]


def _check_pairs(name: str, refs: Sequence, hyps: Sequence) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{name}: {len(refs)} references but {len(hyps)} hypotheses; pair them one to one")
    if len(refs) == 0:
        raise ValueError(f"{name}: no utterances to score")


def edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
    """Levenshtein distance between two token sequences (substitutions, deletions, insertions all cost 1).

    One DP row per reference token, vectorised over the hypothesis: with ``a[j] = min(prev[j] + 1,
    prev[j-1] + sub(i, j))`` the row is ``cur[j] = min_{k<=j} a[k] + (j - k)`` (the insertions), a running
    minimum of ``a[k] - k``.
    """
    if len(ref) == 0:
        return len(hyp)
    if len(hyp) == 0:
        return len(ref)
    vocab: dict[Any, int] = {}
    r = np.array([vocab.setdefault(t, len(vocab)) for t in ref], dtype=np.int64)
    h = np.array([vocab.setdefault(t, len(vocab)) for t in hyp], dtype=np.int64)
    cols = np.arange(len(h) + 1, dtype=np.int64)
    prev = cols.copy()  # row 0: j insertions
    for i, tok in enumerate(r, start=1):
        a = np.empty_like(prev)
        a[0] = i  # i deletions
        a[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (h != tok))
        prev = np.minimum.accumulate(a - cols) + cols
    return int(prev[-1])


def per(refs: list[list[str]], hyps: list[list[str]]) -> float:
    """Token (phone) error rate: summed edit distances / total reference tokens.

    ``refs[i]`` and ``hyps[i]`` are the token lists of utterance i. An empty reference list is allowed (its
    hypothesis tokens count as insertions) as long as the references hold at least one token in total.
    """
    _check_pairs("per", refs, hyps)
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if isinstance(r, str) or isinstance(h, str):
            raise ValueError(f"per: utterance {i}: give token lists, not strings (use wer/cer for strings)")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise UserError("per: the references hold no tokens at all, so the error rate is undefined; check the label files")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def _check_strings(name: str, refs: list[str], hyps: list[str], unit: str) -> None:
    _check_pairs(name, refs, hyps)
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not isinstance(r, str) or not isinstance(h, str):
            raise ValueError(f"{name}: utterance {i}: references and hypotheses must be strings")
    empty = all(not (r.split() if unit == "words" else r.strip()) for r in refs)
    if empty:
        raise UserError(f"{name}: every reference is empty, so the error rate is undefined; check the transcripts")


def wer(refs: list[str], hyps: list[str]) -> float:
    """Word error rate with jiwer (words = whitespace-separated tokens; leading/trailing/multiple spaces ignored)."""
    import jiwer

    _check_strings("wer", refs, hyps, "words")
    return float(jiwer.wer(reference=list(refs), hypothesis=list(hyps)))


def cer(refs: list[str], hyps: list[str]) -> float:
    """Character error rate with jiwer (inner spaces count as characters; leading/trailing spaces stripped)."""
    import jiwer

    _check_strings("cer", refs, hyps, "chars")
    return float(jiwer.cer(reference=list(refs), hypothesis=list(hyps)))


def _flat(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    return list(x)


def accuracy(preds: Sequence | torch.Tensor | np.ndarray, labels: Sequence | torch.Tensor | np.ndarray) -> float:
    """Fraction of positions where ``preds[i] == labels[i]`` (class indices or label strings; tensors flattened)."""
    p, y = _flat(preds), _flat(labels)
    if len(p) != len(y):
        raise ValueError(f"accuracy: {len(p)} predictions but {len(y)} labels")
    if not p:
        raise ValueError("accuracy: no predictions to score")
    return sum(int(a == b) for a, b in zip(p, y)) / len(p)


def _operating_points(scores: np.ndarray, is_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, FNR) for "reject all" and then "accept score >= t" for each distinct score t, descending."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], is_target[order]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    n_tar, n_non = tp[-1], fp[-1]
    fpr = np.r_[0.0, fp[last_of_tie] / n_non]
    fnr = np.r_[1.0, 1.0 - tp[last_of_tie] / n_tar]
    return fpr, fnr


def eer_min_dcf(
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    is_target: Sequence[bool] | np.ndarray | torch.Tensor,
    p_target: float = 0.01,
    c_miss: float = 1,
    c_fa: float = 1,
) -> tuple[float, float]:
    """(EER, minDCF) of verification trials; higher score = more likely the same speaker.

    EER: the interpolated ROC's crossing of FNR = FPR (s3prl's rule; see the module docstring for Kaldi's).
    minDCF: normalised by ``min(c_miss * p_target, c_fa * (1 - p_target))`` as Kaldi's ``compute_min_dcf.py``.
    Needs at least one target and one non-target trial and finite scores.
    """
    s = np.asarray(_flat(scores), dtype=np.float64)
    t = np.asarray(_flat(is_target))
    if len(s) != len(t):
        raise ValueError(f"eer_min_dcf: {len(s)} scores but {len(t)} target flags")
    if len(s) == 0:
        raise ValueError("eer_min_dcf: no trials to score")
    if not np.isin(t, [0, 1]).all():
        raise ValueError("eer_min_dcf: is_target must hold booleans or 0/1")
    t = t.astype(bool)
    if not np.isfinite(s).all():
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"eer_min_dcf: score {i} is {s[i]}; scores must be finite")
    if t.all() or not t.any():
        kind = "target" if t.all() else "non-target"
        raise UserError(f"eer_min_dcf: all {len(t)} trials are {kind} trials; EER needs both kinds (check the trials file)")
    if not 0.0 < p_target < 1.0 or c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"eer_min_dcf: need 0 < p_target < 1 and positive costs, got {p_target}, {c_miss}, {c_fa}")
    fpr, fnr = _operating_points(s, t)
    d = fnr - fpr  # 1 at "reject all", -1 at "accept all", strictly decreasing in between
    i = int(np.argmax(d <= 0.0))
    w = d[i - 1] / (d[i - 1] - d[i])
    eer = float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))
    c_det = c_miss * fnr * p_target + c_fa * fpr * (1.0 - p_target)
    c_def = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return eer, float(c_det.min() / c_def)


def ctc_greedy_decode(log_probs: torch.Tensor, blank: int = 0) -> list[int]:
    """Best-path CTC decoding of one utterance: argmax per frame ``[T, V]``, merge repeats, drop ``blank``.

    Pass only the utterance's valid frames (slice off padding first). Ties in the argmax go to the lower index.
    """
    x = torch.as_tensor(log_probs)
    if x.dim() != 2:
        raise ValueError(f"ctc_greedy_decode: expected [T, V] scores of one utterance, got shape {tuple(x.shape)}")
    if not 0 <= blank < x.shape[1]:
        raise ValueError(f"ctc_greedy_decode: blank {blank} is outside the vocabulary of {x.shape[1]}")
    if x.shape[0] == 0:
        return []
    best = x.argmax(dim=1)
    best = torch.unique_consecutive(best)
    return [int(k) for k in best.tolist() if k != blank]
