"""The benchmarks' peer code paths (issue 29): what each peer is given, checked without timing anything.

* ``tools/bench/kmeans.py``'s transcription of fairseq's ``ApplyKmeans`` (dump_km_label.py) labels every frame with
  its nearest centroid, as an exact float64 argmin does, whatever the block size it is called on.
* ``tools/bench/extract.py``'s equal-work peer run sees exactly ours' batches (utterances sorted by duration,
  ``padded_batches`` under the same padded-seconds budget), its as-documented run sees corpus order under the same
  budget, and fairseq's documented one-utterance-per-call run sees one utterance per batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import extract
        import kmeans

        yield {"extract": extract, "kmeans": kmeans}
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("block", [1, 7, 500, 10_000])
def test_apply_kmeans_is_the_exact_argmin(bench, block):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 39)).astype(np.float32)
    c = rng.normal(scale=2.0, size=(100, 39)).astype(np.float32)
    exact = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    km = bench["kmeans"]
    got = km.fairseq_label(km.ApplyKmeans(c), x, block)
    assert got.shape == (3000,)
    assert (got == exact).mean() > 0.999  # float32 rounding may flip an exact near-tie, nothing more


def _seen_batches(bench, tmp_path, runner, **kw):
    ex = bench["extract"]
    data, lengths = ex.make_corpus(tmp_path / "corpus", 45.0)
    seen: list[list[int]] = []

    def forward(wavs, layers):
        seen.append([len(w) for w in wavs])
        frames = [max(1, (len(w) - 400) // 320 + 1) for w in wavs]
        return {layer: torch.zeros(len(wavs), max(frames), 4) for layer in layers}, frames

    spec = {"data": str(data), "out": str(tmp_path / "out"), "layer_list": [6], "max_duration": 20.0}
    info = getattr(ex, runner)(spec, forward, **kw)
    return seen, [int(s * ex.SR) for s in lengths], info, ex  # synth() makes int(seconds * SR) samples


def test_extract_equal_work_peer_gets_ours_batches(bench, tmp_path):
    seen, lengths, info, ex = _seen_batches(bench, tmp_path, "_equal_work_run")
    flat = [n for b in seen for n in b]
    assert sorted(flat) == flat == sorted(lengths)  # sorted by duration, every utterance once
    from speechssl.data.batching import padded_batches

    ours = list(padded_batches(sorted(lengths), float, 20.0 * ex.SR))
    assert seen == ours
    assert info["batches"] == len(ours)
    assert info["padded_s"] == pytest.approx(sum(len(b) * max(b) for b in ours) / ex.SR)


def test_extract_documented_peer_gets_corpus_order(bench, tmp_path):
    seen, lengths, info, ex = _seen_batches(bench, tmp_path, "_documented_run")
    assert [n for b in seen for n in b] == lengths  # corpus order (utt ids unrelated to length)
    assert all(len(b) * max(b) <= 20.0 * ex.SR or len(b) == 1 for b in seen)
    one, _, info1, _ = _seen_batches(bench, tmp_path / "one", "_documented_run", per_utterance=True)
    assert [len(b) for b in one] == [1] * len(lengths)
    assert info1["padded_s"] == pytest.approx(sum(lengths) / ex.SR)
