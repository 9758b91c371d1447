"""SUPERB query-by-example spoken term detection (QbE): subsequence DTW of every query in every document on each
layer's frozen features, no training; the layer is picked on dev by MTWV, and test MTWV / ATWV are reported.

Data (one Kaldi data dir per split, queries and documents together)::

    utt2role    "<utt> query" | "<utt> doc"       every utterance of the dir (read with the data dir)
    qbe_truth   "<query_utt> <doc_utt> <start> <end>" per occurrence of a query's term in a document (seconds;
                the times are kept for reference, scoring is per (query, document) pair as in QUESST 2014)

A (query, document) pair is a target trial when qbe_truth has a line for it, else a non-target trial. Queries
without any occurrence are left out of the TWV average (as NIST STD scoring leaves out terms without occurrences).

Matching follows s3prl's ``downstream/quesst14_dtw`` (its defaults): features normalised per dimension by the mean
and standard deviation over all frames of the split's queries and documents; distance ``exp(1 - cos) - 1``
("cosine_exp"); each query frame's row of distances min-max scaled to [0, 1] over the document's frames; DTW with
dtw-python's ``asymmetric`` steps (every step advances one query frame and 0, 1 or 2 document frames) with open
begin and open end (subsequence), cost normalised by the query length; score = -cost, z-normalised per query over
the documents; queries shorter than 5 frames score 0 everywhere. The DTW here is our own, vectorised over
documents and document frames (:func:`subsequence_dtw`).

Metric: term-weighted value with QUESST 2014's costs, P_target = 0.0008, C_miss = 100, C_fa = 1, so
beta = C_fa / C_miss * (1 / P_target - 1) = 12.49 (Anguera et al., "Query by Example Search on Speech at MediaEval
2014", CEUR-WS Vol-1263, paper 35; the scorer is the release's scoring/score-TWV-Cnxe.sh, whose "maxTWV" is
SUPERB's MTWV). Checked against that script: it sets ``P_target=0.0008 C_fa=1 C_miss=100`` and hands the jar the
effective prior ``C_miss P_target / (C_miss P_target + C_fa (1 - P_target))``, whose odds ``(1 - prior) / prior`` are
this beta::

    TWV(t) = 1 - mean_q [ P_miss(q, t) + beta * P_fa(q, t) ]     detections: score >= t, one threshold for all

P_miss = 1 - hits / targets of q, P_fa = false alarms / non-target documents of q. MTWV = max over t (including
"detect nothing", TWV 0, so MTWV >= 0). ATWV here: TWV at a threshold fixed on dev, halfway between the lowest
detected score and the next lower one at the chosen layer's best dev TWV (a QUESST system sets its YES/NO
decisions before the evaluation; s3prl says YES above a fixed z-score of 2). Dev ATWV is therefore dev MTWV.
Result: ``{"dev": {"mtwv", "atwv"}, "test": {"mtwv", "atwv"}, "layer", "threshold", "beta", "per_layer_mtwv":
{layer: {"dev": mtwv, "test": mtwv}}}``; the layer is the best by dev MTWV (the lowest index on ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speechssl.data.kaldi import DataDir, c_sorted
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.corpora.common import read_lines
from speechssl.superb.tasks import Example, Split, Task

__all__ = ["P_TARGET", "C_MISS", "C_FA", "BETA", "QbESplit", "QueryByExample", "read_truth", "subsequence_dtw",
           "qbe_scores", "twv_curve", "mtwv", "twv_at"]

P_TARGET, C_MISS, C_FA = 0.0008, 100.0, 1.0
BETA = C_FA / C_MISS * (1.0 / P_TARGET - 1.0)
MIN_QUERY_FRAMES = 5
_CHUNK = 1 << 24         # distance values computed at once (query frames x document frames)
_GAP = 2                 # +inf columns between documents laid end to end (the longest DTW step)
_MEMORY = 2e9            # bytes of float16 features held at once (score() reads the layers in groups that fit)


# ------------------------------------------------------------------------------------------------- data
def read_truth(path: Path, roles: dict[str, str]) -> list[tuple[str, str, float, float]]:
    """The occurrences of ``path`` (qbe_truth); bad lines are errors naming ``file:line``."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file; task qbe needs the term occurrences "
                                "('query_utt doc_utt start end' per line)")
    out, seen = [], set()
    for n, line in read_lines(path):
        f, where = line.split(), f"{path}:{n}"
        if len(f) != 4:
            raise UserError(f"{where}: expected 'query_utt doc_utt start end', got {line.strip()!r}")
        for u, want in ((f[0], "query"), (f[1], "doc")):
            if roles.get(u) != want:
                got = "not in the data dir" if u not in roles else f"a {roles[u]} in utt2role"
                raise UserError(f"{where}: {u} should be a {want}, but it is {got}")
        try:
            start, end = float(f[2]), float(f[3])
        except ValueError:
            raise UserError(f"{where}: start and end must be seconds, got {f[2]!r} {f[3]!r}") from None
        if not 0 <= start < end:
            raise UserError(f"{where}: need 0 <= start < end, got {start} {end}")
        if (f[0], f[1], start) in seen:
            raise UserError(f"{where}: occurrence listed twice")
        seen.add((f[0], f[1], start))
        out.append((f[0], f[1], start, end))
    return out


@dataclass
class QbESplit(Split):
    queries: list[str] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))   # [queries, docs]


# ------------------------------------------------------------------------------------------------- matching
def _gapped(lens: Tensor) -> tuple[Tensor, Tensor]:
    """Documents end to end with _GAP columns before each: (column of every document frame, document of every
    column, _GAP columns: len(lens))."""
    ends = torch.cumsum(lens + _GAP, 0)
    doc_of = torch.full((int(ends[-1]),), len(lens), dtype=torch.long)
    doc_of[torch.cat([torch.arange(int(e) - int(n), int(e)) for e, n in zip(ends, lens)])] = \
        torch.repeat_interleave(torch.arange(len(lens)), lens)
    return (doc_of < len(lens)).nonzero().squeeze(1), doc_of


def _dtw(dist: Tensor, doc_of: Tensor, n_docs: int) -> Tensor:
    """The DTW of :func:`subsequence_dtw` on the gapped layout (``dist [Tq, W]``, +inf in the gap columns, which
    keep the 1- and 2-frame steps inside each document): the best cost per document / Tq."""
    acc, nxt = dist[0].clone(), torch.full_like(dist[0], math.inf)
    best = torch.empty(dist.shape[1] - 2)
    for i in range(1, dist.shape[0]):
        torch.minimum(acc[2:], acc[1:-1], out=best)
        torch.minimum(best, acc[:-2], out=best)
        torch.add(dist[i, 2:], best, out=nxt[2:])
        acc, nxt = nxt, acc
    out = torch.full((n_docs + 1,), math.inf).scatter_reduce(0, doc_of, acc, "amin")
    return out[:n_docs] / dist.shape[0]


def subsequence_dtw(dist: Tensor, lens: Tensor) -> Tensor:
    """``dist [Tq, sum(lens)]``: a query's frame distances to documents laid end to end (``lens [N]`` frames each)
    -> the best subsequence alignment cost in each document divided by ``Tq``: open begin and end, asymmetric steps
    ``acc[i, j] = dist[i, j] + min(acc[i-1, j], acc[i-1, j-1], acc[i-1, j-2])``."""
    cols, doc_of = _gapped(lens)
    gapped = torch.full((dist.shape[0], len(doc_of)), math.inf)
    gapped[:, cols] = dist
    return _dtw(gapped, doc_of, len(lens))


def qbe_scores(queries: Sequence[Tensor], docs: Sequence[Tensor]) -> np.ndarray:
    """Detection scores ``[queries, docs]`` of one layer's features (``[T, D]`` each), as the module docstring
    says: normalise, cosine_exp distances, per-row min-max, subsequence DTW, -cost, z-norm per query."""
    frames = torch.cat([*queries, *docs]).float()
    centred = frames - frames.mean(0)
    unit = F.normalize(centred / centred.square().mean(0).sqrt().clamp_min(1e-9), dim=-1)
    q_off = np.cumsum([0] + [len(q) for q in queries])
    q_all, d_all = unit[: q_off[-1]], unit[q_off[-1]:]
    d_len = torch.tensor([len(d) for d in docs])
    d_end = torch.cumsum(d_len, 0)
    cost = torch.zeros(len(queries), len(docs), dtype=torch.float64)
    lo = 0
    while lo < len(docs):   # documents in chunks of at most _CHUNK distance values (at least one document)
        hi = lo + 1
        while hi < len(docs) and int(d_end[hi] - d_end[lo] + d_len[lo] + _GAP * (hi - lo + 1)) * len(q_all) <= _CHUNK:
            hi += 1
        n = hi - lo
        cols, doc_of = _gapped(d_len[lo:hi])
        neg = torch.zeros(len(doc_of), unit.shape[1])
        neg[cols] = -d_all[int(d_end[lo] - d_len[lo]): int(d_end[hi - 1])]
        # exp(-cos): cosine_exp's exp(1 - cos) - 1 up to a positive affine map, which the min-max scaling removes
        dist = (q_all @ neg.T).exp_()                                            # [query frames, columns]
        starts = cols[torch.cumsum(d_len[lo:hi], 0) - d_len[lo:hi]]             # each document's first column
        gaps = starts[1:] - _GAP                                                 # segments: doc, gap, doc, ...
        bounds = torch.cat([torch.stack([starts[:-1], gaps], 1).reshape(-1), starts[-1:]]).numpy()
        mn = torch.from_numpy(np.minimum.reduceat(dist.numpy(), bounds, axis=1)[:, ::2])
        mx = torch.from_numpy(np.maximum.reduceat(dist.numpy(), bounds, axis=1)[:, ::2])
        scale = torch.cat([1.0 / (mx - mn).clamp_min(1e-9), torch.ones(len(q_all), 1)], 1)
        shift = torch.cat([-mn * scale[:, :n], torch.full((len(q_all), 1), math.inf)], 1)   # gap columns: +inf
        for qi in range(len(queries)):
            a, b = q_off[qi], q_off[qi + 1]
            if b - a >= MIN_QUERY_FRAMES:   # (dist - min) / (max - min) per query frame and document, then DTW
                d = torch.addcmul(shift[a:b].index_select(1, doc_of), dist[a:b], scale[a:b].index_select(1, doc_of))
                cost[qi, lo:hi] = _dtw(d, doc_of, n).double()
        lo = hi
    scores = -cost.numpy()
    scores = (scores - scores.mean(1, keepdims=True)) / np.clip(scores.std(1, keepdims=True), 1e-9, None)
    scores[np.diff(q_off) < MIN_QUERY_FRAMES] = 0.0
    return scores


# ------------------------------------------------------------------------------------------------- metric
def _weights(targets: np.ndarray, beta: float) -> np.ndarray:
    """Per trial, its TWV change when detected: +1/(|Q| n_target(q)), -beta/(|Q| n_nontarget(q)); 0 for queries
    without targets (left out of the average)."""
    t = np.asarray(targets, bool)
    used = t.any(1)
    if not used.any():
        raise UserError("qbe: no query has an occurrence in the documents: TWV is undefined")
    n_t, n_nt = t.sum(1, keepdims=True), (~t).sum(1, keepdims=True)
    w = np.where(t, 1.0 / np.maximum(n_t, 1), -beta / np.maximum(n_nt, 1))
    return np.where(used[:, None], w, 0.0) / used.sum()


def twv_curve(scores: np.ndarray, targets: np.ndarray, beta: float = BETA) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, TWV at each): thresholds are +inf (detect nothing) then every distinct score, descending."""
    s, w = np.asarray(scores, float).ravel(), _weights(targets, beta).ravel()
    order = np.argsort(-s, kind="stable")
    s, cum = s[order], np.cumsum(w[order])
    last = np.r_[s[1:] != s[:-1], True]     # the last trial of each group of equal scores
    return np.r_[math.inf, s[last]], np.r_[0.0, cum[last]]


def mtwv(scores: np.ndarray, targets: np.ndarray, beta: float = BETA) -> tuple[float, float]:
    """(maximum TWV over thresholds, a threshold reaching it: the middle of the first best score interval, i.e.
    halfway between the lowest detected score and the next lower one; +inf: detect nothing, -inf: everything)."""
    thr, twv = twv_curve(scores, targets, beta)
    k = int(np.argmax(twv))
    mid = (thr[k] + thr[k + 1]) / 2 if 0 < k < len(thr) - 1 else thr[k] if k == 0 else -math.inf
    return float(twv[k]), float(mid)


def twv_at(scores: np.ndarray, targets: np.ndarray, threshold: float, beta: float = BETA) -> float:
    """TWV with detections ``score >= threshold``."""
    w = _weights(targets, beta)
    return float(w[np.asarray(scores) >= threshold].sum())


# ------------------------------------------------------------------------------------------------- task
class QueryByExample(Task):
    name, metric, higher_is_better = "qbe", "mtwv", True
    trains = False
    split_names = ("dev", "test")

    def labels(self, dd: DataDir, path: Path, role: str) -> dict[str, str]:
        if "utt2role" not in dd.extra:
            raise MissingInputError(f"{path / 'utt2role'}: no such file; task qbe needs it (utterance -> query|doc)")
        roles = {u: v.strip() for u, v in dd.extra["utt2role"].items()}
        bad = next((u for u in c_sorted(roles) if roles[u] not in ("query", "doc")), None)
        if bad is not None:
            raise UserError(f"{path / 'utt2role'}: utterance {bad}: role must be 'query' or 'doc', got {roles[bad]!r}")
        return roles

    def make_split(self, name: str, path: Path, dd: DataDir, durations: dict[str, float]) -> QbESplit:
        roles = self.labels(dd, path, name)
        queries = [u for u in c_sorted(roles) if roles[u] == "query"]
        docs = [u for u in c_sorted(roles) if roles[u] == "doc"]
        if not queries or not docs:
            raise UserError(f"{path / 'utt2role'}: {len(queries)} queries and {len(docs)} documents; "
                            "task qbe needs both")
        truth = read_truth(path / "qbe_truth", roles)
        qi, di = {u: i for i, u in enumerate(queries)}, {u: i for i, u in enumerate(docs)}
        targets = np.zeros((len(queries), len(docs)), bool)
        for q, d, _, _ in truth:
            targets[qi[q], di[d]] = True
        examples = [Example(u, float(durations[u]), roles[u]) for u in c_sorted(roles)]
        return QbESplit(name, path, dd, examples, queries=queries, docs=docs, targets=targets)

    def fit(self, train: Split) -> None:
        pass

    @staticmethod
    def _features(source: Any, utts: list[str], layers: list[int], batch: int = 32) -> dict[int, dict[str, Tensor]]:
        """layer -> utt -> ``[T, D]`` float16 (as cached) for ``layers`` of the source."""
        out: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
        for i in range(0, len(utts), batch):
            part = utts[i:i + batch]
            x, lens = source.get(part)
            for layer in layers:
                li = source.layers.index(layer)
                for b, u in enumerate(part):
                    if int(lens[b]) == 0:
                        raise UserError(f"qbe: utterance {u} has no feature frames (too short for the upstream)")
                    out[layer][u] = x[li, b, : int(lens[b])].half()
        return out

    def score(self, sources: dict[str, Any], splits: dict[str, Split]) -> dict[str, Any]:
        scored: dict[str, dict[int, np.ndarray]] = {}
        targets: dict[str, np.ndarray] = {}
        for name in ("dev", "test"):
            sp, src = splits[name], sources[name]
            if not isinstance(sp, QbESplit):
                raise TypeError(f"qbe: split {name} was not made by QueryByExample.make_split")
            targets[name], scored[name] = sp.targets, {}
            # the layers in groups of at most _MEMORY bytes of float16 features (all at once for small data)
            one_layer = 2.0 * src.dim * src.frame_rate * sum(ex.duration for ex in sp.examples)
            step = max(1, int(_MEMORY // max(one_layer, 1.0)))
            for i in range(0, len(src.layers), step):
                feats = self._features(src, sp.queries + sp.docs, src.layers[i:i + step])
                for layer, f in feats.items():
                    scored[name][layer] = qbe_scores([f[u] for u in sp.queries], [f[u] for u in sp.docs])
        per_layer = {layer: {name: mtwv(scored[name][layer], targets[name]) for name in scored}
                     for layer in scored["dev"]}
        layer = max(per_layer, key=lambda k: (per_layer[k]["dev"][0], -k))   # best dev MTWV, lowest layer on ties
        threshold = per_layer[layer]["dev"][1]
        result: dict[str, Any] = {name: {"mtwv": per_layer[layer][name][0],
                                         "atwv": twv_at(scored[name][layer], targets[name], threshold)}
                                  for name in ("dev", "test")}
        result.update(layer=layer, threshold=threshold if math.isfinite(threshold) else str(threshold), beta=BETA,
                      per_layer_mtwv={str(k): {n: v[n][0] for n in v} for k, v in per_layer.items()})
        return result
