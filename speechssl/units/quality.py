"""Label quality against phone alignments: phone purity, cluster purity, PNMI (HuBERT paper, §IV-F).

With the joint distribution ``p(y, z)`` of phone ``y`` and unit ``z`` over all aligned frames:

* phone purity   ``E_z[max_y p(y|z)] = sum_z max_y p(y, z)``  (how well a unit predicts one phone)
* cluster purity ``E_y[max_z p(z|y)] = sum_y max_z p(y, z)``  (how concentrated a phone is on one unit)
* PNMI           ``I(y; z) / H(y)``                          (share of phone uncertainty the units remove)

Utterances of the label set without an alignment are skipped and counted, never mixed in. An alignment may end
before its audio (those label frames are unscored) or run past it (the overhang is clipped), as real aligners'
output does; both are counted (``alignment_coverage`` in the JSON, a summary line). A gap of more than
``max(0.5 s, 10 % of the utterance)`` is a wrong pairing: an error naming the utterance
(:func:`speechssl.units.alignments.frame_coverage`, the rule ``units layers`` uses too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from speechssl.data.kaldi import c_sorted
from speechssl.errors import UserError
from speechssl.fileio import atomic_path, atomic_write_text, check_writable_file
from speechssl.progress import progress_bar
from speechssl.units.alignments import CoverageStats, PhoneAlignment, frame_phones, read_alignments
from speechssl.units.labels import read_labels

__all__ = ["QualityReport", "PhoneUnitCounts", "quality_from_counts", "count_table", "evaluate_labels",
           "label_quality", "plot_phone_given_unit"]


def quality_from_counts(counts: np.ndarray) -> dict[str, float]:
    """Phone purity, cluster purity, PNMI, H(y) and I(y;z) (nats) from a ``[phones, units]`` count table."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if c.ndim != 2 or total <= 0:
        raise ValueError(f"need a non-empty [phones, units] count table, got shape {c.shape} with {total} frames")
    p = c / total
    # marginals from the counts, not as sums of p: with a single phone p(y) is then exactly 1 and H(y) exactly 0
    # (summed, it can round to 1 - 1e-16, and PNMI came out as 2e-16 / 1e-16 = 2)
    py, pz = c.sum(1) / total, c.sum(0) / total
    nz = p > 0
    outer = np.outer(py, pz)
    mi = float(np.sum(p[nz] * np.log(p[nz] / outer[nz]))) + 0.0
    h_y = float(-np.sum(py[py > 0] * np.log(py[py > 0]))) + 0.0  # + 0.0: no -0.0 in the JSON
    return {
        "phone_purity": float(p.max(0).sum()),
        "cluster_purity": float(p.max(1).sum()),
        "pnmi": mi / h_y if h_y > 0 else 0.0,
        "h_phone": h_y,
        "mutual_info": mi,
    }


def count_table(phone_ids: np.ndarray, units: np.ndarray, num_phones: int, k: int) -> np.ndarray:
    """``[num_phones, k]`` int64 table of frame counts of each (phone, unit) pair."""
    flat = np.asarray(phone_ids, dtype=np.int64) * k + np.asarray(units, dtype=np.int64)
    return np.bincount(flat, minlength=num_phones * k).reshape(num_phones, k)


@dataclass
class QualityReport:
    """Metrics plus everything needed to audit them (count table, phones, skipped utterances)."""

    metrics: dict[str, float]
    counts: np.ndarray  # [P, K] int64
    phones: list[str]
    num_frames: int
    num_utts: int
    skipped_no_alignment: list[str] = field(default_factory=list)  # labelled, not aligned
    aligned_not_labelled: list[str] = field(default_factory=list)
    coverage: CoverageStats = field(default_factory=CoverageStats)  # unscored / clipped frames, largest gap

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the count table is included: it is small, and lets anyone recompute)."""
        return {
            **self.metrics,
            "num_frames": self.num_frames,
            "num_utts": self.num_utts,
            "num_skipped_no_alignment": len(self.skipped_no_alignment),
            "skipped_no_alignment": self.skipped_no_alignment[:100],
            "num_aligned_not_labelled": len(self.aligned_not_labelled),
            "alignment_coverage": self.coverage.to_dict(),
            "phones": self.phones,
            "counts": self.counts.tolist(),
        }

    def summary(self) -> str:
        """Lines for the terminal."""
        m = self.metrics
        lines = [
            f"phone purity   {m['phone_purity']:.4f}",
            f"cluster purity {m['cluster_purity']:.4f}",
            f"PNMI           {m['pnmi']:.4f}",
            f"frames {self.num_frames}, utterances {self.num_utts}, phones {len(self.phones)}, "
            f"units used {int((self.counts.sum(0) > 0).sum())}/{self.counts.shape[1]}",
        ]
        if self.skipped_no_alignment:
            lines.append(f"skipped {len(self.skipped_no_alignment)} labelled utterance(s) without alignment "
                         f"(e.g. {', '.join(self.skipped_no_alignment[:3])})")
        if self.aligned_not_labelled:
            lines.append(f"{len(self.aligned_not_labelled)} aligned utterance(s) have no labels (ignored)")
        if self.coverage.summary():
            lines.append(self.coverage.summary())
        return "\n".join(lines)


class PhoneUnitCounts:
    """The ``[phones, k]`` table of (phone at each label frame's centre, unit) counts, one utterance at a time:
    the one counting rule of ``units quality`` (:func:`evaluate_labels`) and ``units layers``.

    ``phones``: a fixed phone inventory (rows in that order); None: rows are added as phones appear and
    :meth:`table` sorts them (C order, so tables and plots are comparable across runs). The alignment length rule
    is :func:`~speechssl.units.alignments.frame_phones`; ``coverage`` counts its unscored / clipped frames.
    """

    FLUSH_FRAMES = 1 << 16  # frames buffered (~1 MiB) between bincounts (one per flush, not one per utterance)

    def __init__(self, k: int, phones: Sequence[str] | None = None, coverage: CoverageStats | None = None) -> None:
        self.k = int(k)
        self.fixed = phones is not None
        self.index: dict[str, int] = {p: i for i, p in enumerate(phones or ())}
        self._counts = np.zeros((len(self.index), self.k), dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (phone ids, units) not yet counted
        self._buffered = 0
        self.coverage = coverage if coverage is not None else CoverageStats()
        self.num_utts = 0

    def add(self, units: np.ndarray, ali: PhoneAlignment, label_rate: float, framing: Mapping[str, Any] | None,
            *, label_file: str | None = None) -> None:
        """Count the scored frames of one utterance's units against its alignment."""
        units = np.asarray(units)
        phones = frame_phones(ali, len(units), label_rate, framing, label_file=label_file, coverage=self.coverage)
        index = self.index
        pid = np.fromiter((index[p] if self.fixed else index.setdefault(p, len(index)) for p in phones),
                          dtype=np.int64, count=len(phones))
        self._pending.append((pid, units[: len(phones)]))
        self._buffered += len(pid)
        self.num_utts += 1
        if self._buffered >= self.FLUSH_FRAMES:
            self._flush()

    def _flush(self) -> None:
        n = len(self.index)
        if n > self._counts.shape[0]:
            self._counts = np.vstack([self._counts, np.zeros((n - self._counts.shape[0], self.k), np.int64)])
        if self._pending:
            self._counts += count_table(np.concatenate([p for p, _ in self._pending]),
                                        np.concatenate([u for _, u in self._pending]), n, self.k)
        self._pending, self._buffered = [], 0

    @property
    def counts(self) -> np.ndarray:
        """``[phones, k]`` int64 counts so far, rows in :attr:`index` order."""
        self._flush()
        return self._counts

    def table(self) -> tuple[list[str], np.ndarray]:
        """``(phones, counts)``: a fixed inventory in its order, else the phones seen, C-sorted."""
        names, counts = list(self.index), self.counts
        if self.fixed:
            return names, counts
        order = c_sorted(names)
        return order, counts[[self.index[p] for p in order]]


def evaluate_labels(labels: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                    alignments: Mapping[str, PhoneAlignment], *, label_file: str | None = None) -> QualityReport:
    """Frame-level phone/unit statistics of ``labels`` against ``alignments`` (see module docstring)."""
    rate = float(meta["label_rate"])
    framing = meta.get("framing")
    counter = PhoneUnitCounts(int(meta["k"]))
    skipped = []
    for utt in progress_bar(c_sorted(labels), desc="label quality", unit="utt", leave=False):
        ali = alignments.get(utt)
        if ali is None:
            skipped.append(utt)
            continue
        counter.add(labels[utt], ali, rate, framing, label_file=label_file)
    names, counts = counter.table()
    if not counter.num_utts or not counts.sum():
        raise UserError(
            f"no labelled utterance has an alignment ({len(labels)} labelled, {len(alignments)} aligned, e.g. "
            f"labels {c_sorted(labels)[:2]} vs alignments {c_sorted(alignments)[:2]}): check the utterance ids"
        )
    return QualityReport(
        metrics=quality_from_counts(counts),
        counts=counts,
        phones=names,
        num_frames=int(counts.sum()),
        num_utts=counter.num_utts,
        skipped_no_alignment=skipped,
        aligned_not_labelled=c_sorted(set(alignments) - set(labels)),
        coverage=counter.coverage,
    )


def label_quality(label_dir: str | os.PathLike, alignments: str | os.PathLike, *, tier: str = "phones",
                  out_json: str | os.PathLike | None = None, plot: str | os.PathLike | None = None) -> QualityReport:
    """Read a label dir and a CTM / TextGrid dir, compute the metrics, optionally write JSON and a PNG heatmap."""
    for path, option in ((out_json, "--out"), (plot, "--plot")):
        if path is not None:
            check_writable_file(path, option)
    labels, meta = read_labels(label_dir)
    alis = read_alignments(alignments, tier=tier)
    text = Path(label_dir) / "text.km" if Path(label_dir).is_dir() else Path(label_dir)
    report = evaluate_labels(labels, meta, alis, label_file=str(text))
    if out_json is not None:
        d = report.to_dict()
        d.update(labels=str(label_dir), alignments=str(alignments), k=int(meta["k"]),
                 label_rate=float(meta["label_rate"]), kmeans_hash=meta.get("kmeans_hash"))
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_json, json.dumps(d, indent=1) + "\n")
    if plot is not None:
        plot_phone_given_unit(report, plot, title=f"P(phone | unit), {Path(label_dir).name}")
    return report


def unit_order(p_y_given_z: np.ndarray) -> np.ndarray:
    """Units sorted by their most likely phone (phone index), then by that probability, descending."""
    best = p_y_given_z.argmax(0)
    return np.lexsort((-p_y_given_z.max(0), best))


def plot_phone_given_unit(report: QualityReport, path: str | os.PathLike, title: str = "P(phone | unit)") -> None:
    """PNG heatmap of P(phone | unit): phones sorted on the y axis, used units ordered by most likely phone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's global state
    from matplotlib.figure import Figure

    counts = report.counts[:, report.counts.sum(0) > 0].astype(np.float64)
    units = np.flatnonzero(report.counts.sum(0) > 0)
    p = counts / counts.sum(0, keepdims=True)
    order = unit_order(p)
    n_ph, n_u = p.shape
    fig = Figure(figsize=(min(4 + 0.06 * n_u, 40), min(2 + 0.16 * n_ph, 30)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(p[:, order], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(n_ph))
    ax.set_yticklabels(report.phones, fontsize=max(4, min(9, 600 // max(n_ph, 1))))
    if n_u <= 120:
        ax.set_xticks(range(n_u))
        ax.set_xticklabels([str(u) for u in units[order]], rotation=90, fontsize=5)
    ax.set_xlabel(f"unit (ordered by most likely phone), {n_u} used")
    ax.set_ylabel("phone")
    m = report.metrics
    ax.set_title(f"{title}\nPNMI {m['pnmi']:.3f}, phone purity {m['phone_purity']:.3f}, "
                 f"cluster purity {m['cluster_purity']:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
