"""SUPERB QbE: subsequence DTW against path enumeration, TWV against hand-computed values, the QUESST 2014
preparer on a fake tree in the released layout, and score() where the answer is known."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.data.kaldi import DataDir, read_data_dir, write_data_dir
from speechssl.errors import UserError
from speechssl.superb.config import load_superb_config
from speechssl.superb.corpora import quesst14
from speechssl.superb.corpora.common import CorpusError
from speechssl.superb.qbe import (BETA, QbESplit, QueryByExample, mtwv, qbe_scores, read_truth, subsequence_dtw,
                                  twv_at, twv_curve)


# ------------------------------------------------------------------------------------------------- DTW
def _brute_force(d: np.ndarray) -> float:
    """Every path: any start column, then each query frame moves 0, 1 or 2 document frames; min mean cost."""
    tq, t = d.shape
    best = math.inf
    for start in range(t):
        for steps in itertools.product((0, 1, 2), repeat=tq - 1):
            cols = np.cumsum((start,) + steps)
            if cols[-1] < t:
                best = min(best, float(d[np.arange(tq), cols].sum()) / tq)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsequence_dtw_matches_path_enumeration(seed):
    rng = np.random.default_rng(seed)
    tq, lens = 4, [7, 3, 5, 1, 2]
    dist = rng.random((tq, sum(lens))).astype(np.float32)
    got = subsequence_dtw(torch.from_numpy(dist), torch.tensor(lens))
    ends = np.cumsum(lens)
    want = [_brute_force(dist[:, e - n: e]) for e, n in zip(ends, lens)]   # each document on its own
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def _reference_scores(queries, docs):
    """s3prl's quesst14_dtw steps, one pair at a time: normalise with the split's frame statistics, scipy cosine
    distances, exp(d) - 1, per-row min-max, asymmetric open-begin/open-end DP, -cost / Tq, z-norm per query."""
    from scipy.spatial.distance import cdist

    frames = np.concatenate(queries + docs).astype(np.float64)
    mean, std = frames.mean(0), frames.std(0)
    out = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        for j, d in enumerate(docs):
            dist = np.exp(cdist((q - mean) / std, (d - mean) / std, "cosine")) - 1
            dist = (dist - dist.min(1, keepdims=True)) / (dist.max(1, keepdims=True) - dist.min(1, keepdims=True))
            acc = dist[0].copy()
            for r in range(1, len(q)):
                acc = dist[r] + np.array([min(acc[max(0, c - 2): c + 1]) for c in range(len(d))])
            out[i, j] = -acc.min() / len(q) if len(q) >= 5 else 0.0
    std = out.std(1, keepdims=True)
    return np.where(std > 0, (out - out.mean(1, keepdims=True)) / np.where(std > 0, std, 1), 0.0)


@pytest.mark.parametrize("chunk", [1 << 24, 200])   # 200: a few documents per chunk, then one per chunk
def test_scores_match_a_per_pair_reference(monkeypatch, chunk):
    monkeypatch.setattr("speechssl.superb.qbe._CHUNK", chunk)
    rng = np.random.default_rng(3)
    queries = [rng.standard_normal((n, 6)).astype(np.float32) for n in (7, 4, 11)]
    docs = [rng.standard_normal((n, 6)).astype(np.float32) for n in (20, 9, 31, 15, 24)]
    got = qbe_scores([torch.from_numpy(x) for x in queries], [torch.from_numpy(x) for x in docs])
    np.testing.assert_allclose(got, _reference_scores(queries, docs), atol=2e-4)


def test_scores_find_a_copied_query():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((9, 6)).astype(np.float32))
    docs = [torch.from_numpy(rng.standard_normal((n, 6)).astype(np.float32)) for n in (30, 25, 40, 33, 28)]
    docs[3][11:20] = q
    s = qbe_scores([q, q[:4]], docs)           # the second query is shorter than 5 frames: scores 0
    assert s.shape == (2, 5) and int(np.argmax(s[0])) == 3
    assert np.all(s[1] == 0)
    np.testing.assert_allclose([s[0].mean(), s[0].std()], [0.0, 1.0], atol=1e-9)


# ------------------------------------------------------------------------------------------------- TWV
# queries A (targets: docs 0, 1), B (target: doc 2), C (no target: left out of the average)
SCORES = np.array([[0.9, 0.3, 0.5, 0.1], [0.2, 0.8, 0.7, 0.0], [0.95, 0.25, 0.6, 0.4]])
TARGETS = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)


def test_twv_hand_computed():
    assert BETA == pytest.approx(12.49)   # QUESST 2014: P_target 0.0008, C_miss 100, C_fa 1
    # the official scorer (scoring/score-TWV-Cnxe.sh) passes the jar an effective prior computed with bc at scale 7
    eff_prior = round((100 * 0.0008) / (100 * 0.0008 + 1 * (1 - 0.0008)), 7)
    assert (1 - eff_prior) / eff_prior == pytest.approx(BETA, rel=1e-5)
    # t = 0.7: A hits doc 0 (P_miss 1/2, no false alarm); B hits doc 2 and false-alarms doc 1 (P_fa 1/3)
    assert twv_at(SCORES, TARGETS, 0.7) == pytest.approx(1 - (0.5 + BETA / 3) / 2)
    # with beta 0.3 the best threshold is 0.3: A 2/2 hits + 1/2 false alarms, B 1/1 + 1/3: 1 - (0.15 + 0.1) / 2
    assert mtwv(SCORES, TARGETS, beta=0.3) == (pytest.approx(0.875), pytest.approx(0.275))   # between 0.3 and 0.25
    # with QUESST's beta every false alarm costs more than a hit gains, but for the first detection (A, doc 0)
    assert mtwv(SCORES, TARGETS) == (pytest.approx(0.25), pytest.approx(0.85))
    thr, twv = twv_curve(SCORES, TARGETS, beta=0.3)
    assert thr[0] == math.inf and twv[0] == 0.0 and len(thr) == 1 + len(np.unique(SCORES))


def test_twv_ties_detect_together_and_nothing_is_zero():
    # one target and one non-target with the same score: both detected or neither (TWV 0 or 1 - 1 = 0)
    assert mtwv(np.array([[1.0, 1.0]]), np.array([[True, False]]), beta=1.0) == (0.0, math.inf)
    with pytest.raises(UserError, match="no query has an occurrence"):
        mtwv(SCORES, np.zeros_like(TARGETS))


# ------------------------------------------------------------------------------------------------- data + task
def _qbe_dir(root: Path, truth: str) -> Path:
    utts = {"q1-a": "query", "q2-b": "query", "d1-x": "doc", "d2-y": "doc", "d3-z": "doc"}
    dd = DataDir(wav_scp={u: f"/nonexistent/{u}.wav" for u in utts}, utt2spk={u: u.split("-")[0] for u in utts},
                 extra={"utt2role": utts})
    write_data_dir(dd, root)
    (root / "qbe_truth").write_text(truth)
    return root


def test_make_split_and_truth_errors(tmp_path):
    task = QueryByExample(load_superb_config("qbe"))
    path = _qbe_dir(tmp_path / "ok", "q1-a d2-y 0.5 1.0\nq2-b d3-z 0.1 0.4\nq1-a d3-z 2 2.5\n")
    sp = task.make_split("dev", path, read_data_dir(path), {u: 1.0 for u in read_data_dir(path).utt_ids()})
    assert sp.queries == ["q1-a", "q2-b"] and sp.docs == ["d1-x", "d2-y", "d3-z"]
    np.testing.assert_array_equal(sp.targets, [[0, 1, 1], [0, 0, 1]])
    dd = read_data_dir(path)
    roles = dict(dd.extra["utt2role"])
    for bad, msg in [("q1-a d2-y 0.5\n", ":1: expected 'query_utt doc_utt start end'"),
                     ("q1-a d2-y 0.5 1\nd1-x q1-a 0 1\n", ":2: d1-x should be a query, but it is a doc"),
                     ("q1-a nope 0 1\n", ":1: nope should be a doc, but it is not in the data dir"),
                     ("q1-a d2-y 1 0.5\n", ":1: need 0 <= start < end"),
                     ("q1-a d2-y x 1\n", ":1: start and end must be seconds")]:
        (path / "qbe_truth").write_text(bad)
        with pytest.raises(UserError, match=msg) as e:
            read_truth(path / "qbe_truth", roles)
        assert "\n" not in str(e.value) and str(path / "qbe_truth") in str(e.value)
    (path / "utt2role").write_text((path / "utt2role").read_text().replace("d2-y doc", "d2-y dok"))
    with pytest.raises(UserError, match=r"utt2role: utterance d2-y: role must be 'query' or 'doc', got 'dok'"):
        task.make_split("dev", path, read_data_dir(path), {})


class _Features:
    """A FeatureSource over fixed per-utterance [L, T, D] arrays."""

    def __init__(self, feats: dict[str, np.ndarray]):
        self.feats, self.layers, self.dim, self.frame_rate = feats, [0, 1], 8, 50.0

    def get(self, utts):
        lens = torch.tensor([self.feats[u].shape[1] for u in utts])
        x = torch.zeros(2, len(utts), int(lens.max()), 8)
        for b, u in enumerate(utts):
            x[:, b, : lens[b]] = torch.from_numpy(self.feats[u])
        return x, lens


def _synthetic(rng, name: str, n_q: int = 4, n_d: int = 12):
    """Layer 1: each query's frames (plus a little noise) pasted into 2 documents; layer 0: unrelated noise."""
    queries, docs = [f"{name}q{i}" for i in range(n_q)], [f"{name}d{j:02d}" for j in range(n_d)]
    feats = {u: rng.standard_normal((2, int(rng.integers(8, 14)) if u in queries else int(rng.integers(30, 60)), 8))
             .astype(np.float32) for u in queries + docs}
    targets = np.zeros((n_q, n_d), bool)
    for i, q in enumerate(queries):
        for j in rng.choice(n_d, 2, replace=False):
            while targets[:, j].any():   # one term per document
                j = (j + 1) % n_d
            targets[i, j] = True
            pos = int(rng.integers(0, feats[docs[j]].shape[1] - feats[q].shape[1]))
            noise = 0.05 * rng.standard_normal(feats[q][1].shape)
            feats[docs[j]][1, pos: pos + feats[q].shape[1]] = feats[q][1] + noise
    split = QbESplit(name, Path(name), None, [], queries=queries, docs=docs, targets=targets)
    return split, _Features(feats)


def test_score_picks_the_informative_layer(monkeypatch):
    rng = np.random.default_rng(0)
    (dev, dev_src), (test, test_src) = _synthetic(rng, "dev"), _synthetic(rng, "test")
    task = QueryByExample(load_superb_config("qbe"))
    r = task.score({"dev": dev_src, "test": test_src}, {"dev": dev, "test": test})
    monkeypatch.setattr("speechssl.superb.qbe._MEMORY", 1)   # one layer read at a time: the same result
    assert task.score({"dev": dev_src, "test": test_src}, {"dev": dev, "test": test}) == r
    assert r["layer"] == 1
    assert r["test"]["mtwv"] == pytest.approx(1.0) and r["dev"]["mtwv"] == pytest.approx(1.0)
    assert r["test"]["atwv"] == pytest.approx(1.0)   # dev's threshold separates test too
    assert r["per_layer_mtwv"]["0"]["test"] < 0.5
    assert task.trains is False and task.split_names == ("dev", "test")


# ------------------------------------------------------------------------------------------------- QUESST 2014
def _wav(path: Path, seconds: float = 0.25) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(8000 * seconds), np.int16), 8000, subtype="PCM_16")


def _fake_quesst(root: Path) -> Path:
    """quesst14Database/ in its released layout: 4 documents, 2 dev + 2 eval queries, two languages."""
    db = root / "quesst14Database"
    langs = {"quesst14_00001": "nnenglish", "quesst14_00002": "nnenglish", "quesst14_00003": "czech",
             "quesst14_00004": "nnenglish", "quesst14_dev_0001": "nnenglish", "quesst14_dev_0002": "czech",
             "quesst14_eval_0001": "nnenglish", "quesst14_eval_0002": "nnenglish"}
    folder = {"dev": "dev_queries", "eval": "eval_queries"}
    keys: dict[str, list[str]] = {"utterances": [], "dev": [], "eval": []}
    for u, lang in langs.items():
        kind = u.split("_")[1] if u.split("_")[1] in folder else "utterances"
        rel = f"{folder.get(kind, 'Audio')}/{u}.wav"
        _wav(db / rel)
        keys[kind].append(f"quesst14Database/{rel} {lang}")
    for kind, lines in keys.items():
        (db / "scoring").mkdir(parents=True, exist_ok=True)
        (db / "scoring" / f"language_key_{kind}.lst").write_text("\n".join(lines) + "\n")
    rttm = {"dev": ["LEXEME quesst14_00001 1 0.50 0.40 quesst14_dev_0001 lex quesst14_dev_0001 <NA>",
                    "LEXEME quesst14_00003 1 0.10 0.30 quesst14_dev_0002 lex quesst14_dev_0002 <NA>",
                    "LEXEME quesst14_00003 1 1.10 0.30 quesst14_dev_0001 lex quesst14_dev_0001 <NA>"],
            "eval": ["SPKR-INFO quesst14_00002 1 <NA> <NA> <NA> unknown spk <NA>",
                     "LEXEME quesst14_00002 1 0.20 0.50 quesst14_eval_0002 lex quesst14_eval_0002 <NA>",
                     "LEXEME quesst14_00004 1 1.00 0.25 quesst14_eval_0002 lex quesst14_eval_0002 <NA>"]}
    for kind in ("dev", "eval"):
        g = db / "scoring" / f"groundtruth_quesst14_{kind}"
        g.mkdir()
        excerpts = "".join(f'  <excerpt audio_filename="Audio/quesst14_0000{i}.wav" channel="1" tbeg="0.000" '
                           f'dur="0.250" source_type="splitcts"/>\n' for i in range(1, 5))
        (g / "quesst14.ecf.xml").write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<ecf source_signal_duration='
                                            f'"1.0" language="multiple" version="quesst14">\n{excerpts}</ecf>\n')
        terms = "".join(f'  <term termid="quesst14_{kind}_000{i}"><termtext>quesst14_{kind}_000{i}</termtext></term>\n'
                        for i in (1, 2))
        (g / f"quesst14_{kind}.tlist.xml").write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<termlist ecf_filename='
                                                      f'"quesst14.ecf.xml" language="multiple" version="1">\n{terms}'
                                                      '</termlist>\n')
        (g / f"quesst14_{kind}.rttm").write_text("\n".join(rttm[kind]) + "\n")
    return db


def test_quesst14_prepare(tmp_path):
    db = _fake_quesst(tmp_path)
    summary = quesst14.prepare_quesst14(db, tmp_path / "out")
    assert summary["counts"]["dev"] == {"queries": 1, "documents": 3, "occurrences": 1, "queries_with_occurrences": 1}
    dev = read_data_dir(tmp_path / "out" / "dev")
    assert dev.extra["utt2role"] == {"quesst14_dev_0001": "query", "quesst14_00001": "doc", "quesst14_00002": "doc",
                                     "quesst14_00004": "doc"}
    assert (tmp_path / "out" / "dev" / "qbe_truth").read_text() == "quesst14_dev_0001 quesst14_00001 0.500 0.900\n"
    assert dev.utt2dur["quesst14_00001"] == pytest.approx(0.25)
    test = read_data_dir(tmp_path / "out" / "test")
    task = QueryByExample(load_superb_config("qbe"))
    sp = task.make_split("test", tmp_path / "out" / "test", test, {u: 0.25 for u in test.utt_ids()})
    assert sp.queries == ["quesst14_eval_0001", "quesst14_eval_0002"]
    np.testing.assert_array_equal(sp.targets, [[0, 0, 0], [0, 1, 1]])
    everything = quesst14.prepare_quesst14(db, tmp_path / "all", languages="all", with_durations=False)
    assert everything["counts"]["dev"]["occurrences"] == 3


def test_quesst14_bad_rttm_is_one_line(tmp_path, capsys):
    db = _fake_quesst(tmp_path)
    rttm = db / "scoring" / "groundtruth_quesst14_eval" / "quesst14_eval.rttm"
    lines = rttm.read_text().splitlines()
    lines[2] = lines[2].replace("1.00 0.25", "1.00 abc")
    rttm.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=rf"^{rttm}:3: tbeg and tdur must be seconds, got '1.00' 'abc'$"):
        quesst14.prepare_quesst14(db, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert quesst14.main(["--corpus", str(db), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{rttm}:3:" in err
    (db / "scoring" / "groundtruth_quesst14_dev" / "quesst14_dev.tlist.xml").write_text("<termlist>\n<term>\n")
    with pytest.raises(CorpusError, match=r"quesst14_dev.tlist.xml:2: <term> without termid="):
        quesst14.prepare_quesst14(db, tmp_path / "out")
