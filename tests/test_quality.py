"""Label-quality metrics and alignment readers: hand-computed figures, CTM == TextGrid, skipped/mismatched utts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from speechssl.units.alignments import SILENCE, AlignmentError, frame_phones, read_alignments, read_ctm
from speechssl.units.labels import write_labels
from speechssl.units.quality import evaluate_labels, label_quality, quality_from_counts, unit_order

# Hand-made joint counts, phones (a, b) x units (0, 1, 2), 12 frames:
#        u0 u1 u2
#   a     4  2  0
#   b     0  2  4
# p(y) = (1/2, 1/2), p(z) = (1/3, 1/3, 1/3)
# phone purity   = sum_z max_y p(y,z) = (4 + 2 + 4) / 12 = 5/6
# cluster purity = sum_y max_z p(y,z) = (4 + 4) / 12     = 2/3
# I(y;z) = 4/12 ln((4/12)/(1/2 * 1/3)) * 2 + 2/12 ln((2/12)/(1/6)) * 2 = (2/3) ln 2;  H(y) = ln 2;  PNMI = 2/3
COUNTS = np.array([[4, 2, 0], [0, 2, 4]])
EXPECTED = {"phone_purity": 5 / 6, "cluster_purity": 2 / 3, "pnmi": 2 / 3, "h_phone": math.log(2),
            "mutual_info": 2 / 3 * math.log(2)}
META = {"label_rate": 100.0, "k": 3}  # no framing: frame i is centred at (i + 0.5) / 100 s
# utt1 frames: 6 x a then 6 x b; units 0 0 0 0 1 1 | 1 1 2 2 2 2  -> exactly COUNTS
UNITS = {"utt1": np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])}

CTM = "utt1 1 0.00 0.06 a\nutt1 1 0.060 0.0600 b\n"

TG_LONG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 0.12
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 0.12
        intervals: size = 1
        intervals [1]:
            xmin = 0
            xmax = 0.12
            text = "ab ""quoted"""
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 0.12
        intervals: size = 2
        intervals [1]:
            xmin = 0
            xmax = 0.06
            text = "a"
        intervals [2]:
            xmin = 0.06
            xmax = 0.12
            text = "b"
'''

TG_SHORT = '''File type = "ooTextFile"
Object class = "TextGrid"

0
0.12
<exists>
1
"IntervalTier"
"phones"
0
0.12
2
0
0.06
"a"
0.06
0.12
"b"
'''


def test_hand_computed_metrics():
    got = quality_from_counts(COUNTS)
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_metrics_extremes():
    # one-to-one units: everything is 1; units independent of phones: PNMI 0
    assert quality_from_counts(np.diag([3, 5, 2]))["pnmi"] == pytest.approx(1.0)
    indep = quality_from_counts(np.outer([1, 3], [2, 2, 4]))
    assert indep["pnmi"] == pytest.approx(0.0, abs=1e-12)
    assert indep["phone_purity"] == pytest.approx(0.75)  # p(b) = 3/4 under every unit


@pytest.mark.parametrize("fmt", ["ctm", "long", "short", "long_utf16"])
def test_formats_give_same_figures(tmp_path, fmt):
    if fmt == "ctm":
        (tmp_path / "a.ctm").write_text(CTM)
        path = tmp_path / "a.ctm"
    else:
        d = tmp_path / "tg" / "speaker1"
        d.mkdir(parents=True)
        text = TG_SHORT if fmt == "short" else TG_LONG
        if fmt == "long_utf16":
            (d / "utt1.TextGrid").write_bytes(text.encode("utf-16"))  # Praat's encoding for non-ASCII files
        else:
            (d / "utt1.TextGrid").write_text(text)
        path = tmp_path / "tg"
    report = evaluate_labels(UNITS, META, read_alignments(path))
    np.testing.assert_array_equal(report.counts, COUNTS)
    assert report.phones == ["a", "b"]
    for key, value in EXPECTED.items():
        assert report.metrics[key] == pytest.approx(value, abs=1e-12)


def test_gap_in_ctm_equals_empty_textgrid_interval(tmp_path):
    (tmp_path / "g.ctm").write_text("u 1 0.00 0.03 a\nu 1 0.07 0.05 b\n")  # 0.03-0.07 unaligned
    tg = TG_SHORT.replace("\n2\n0\n0.06\n\"a\"\n0.06\n0.12\n\"b\"\n",
                          "\n3\n0\n0.03\n\"a\"\n0.03\n0.07\n\"\"\n0.07\n0.12\n\"b\"\n")
    (tmp_path / "u.TextGrid").write_text(tg)
    a = frame_phones(read_ctm(tmp_path / "g.ctm")["u"], 12, 100.0)
    b = frame_phones(read_alignments(tmp_path / "u.TextGrid")["u"], 12, 100.0)
    assert list(a) == list(b) == ["a"] * 3 + [SILENCE] * 4 + ["b"] * 5


def test_frame_centre_with_window_framing(tmp_path):
    # 25 ms windows, 10 ms shift: frame i covers [10i, 10i + 25] ms, centre 10i + 12.5 ms.
    (tmp_path / "w.ctm").write_text("u 1 0 0.0325 a\nu 1 0.0325 0.0675 b\n")
    ali = read_ctm(tmp_path / "w.ctm")["u"]
    framing = {"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": True}
    # centres 12.5, 22.5, 32.5(b: boundary belongs to the next phone), ...; alignment end 0.1 s -> 9 centres < 0.1
    phones = frame_phones(ali, 8, 100.0, framing)
    assert list(phones) == ["a", "a", "b", "b", "b", "b", "b", "b"]


def test_skipped_utterances_are_counted_not_mixed(tmp_path):
    (tmp_path / "a.ctm").write_text(CTM)
    labels = dict(UNITS, utt2=np.array([2, 2, 2]))
    report = evaluate_labels(labels, META, read_alignments(tmp_path / "a.ctm"))
    np.testing.assert_array_equal(report.counts, COUNTS)
    assert report.skipped_no_alignment == ["utt2"] and report.num_utts == 1


def test_length_mismatch_is_error_naming_utterance(tmp_path):
    (tmp_path / "a.ctm").write_text("utt1 1 0.00 0.06 a\nutt1 1 0.06 0.10 b\n")  # 16 frames vs 12 labels
    with pytest.raises(AlignmentError, match="utt utt1: 12 labels"):
        evaluate_labels(UNITS, META, read_alignments(tmp_path / "a.ctm"))
    # one frame off is tolerated
    (tmp_path / "b.ctm").write_text("utt1 1 0.00 0.06 a\nutt1 1 0.06 0.07 b\n")
    assert evaluate_labels(UNITS, META, read_alignments(tmp_path / "b.ctm")).num_frames == 12


def test_bad_inputs_name_file_and_line(tmp_path):
    (tmp_path / "bad.ctm").write_text("u 1 0 0.1 a\nu 1 zero 0.1 b\n")
    with pytest.raises(AlignmentError, match=r"bad.ctm:2: utt u"):
        read_ctm(tmp_path / "bad.ctm")
    (tmp_path / "ovl.ctm").write_text("u 1 0 0.1 a\nu 1 0.05 0.1 b\n")
    with pytest.raises(AlignmentError, match="overlaps"):
        read_ctm(tmp_path / "ovl.ctm")
    (tmp_path / "x.TextGrid").write_text(TG_LONG.replace('name = "phones"', 'name = "segments"'))
    with pytest.raises(AlignmentError, match="no single tier named 'phones'"):
        read_alignments(tmp_path / "x.TextGrid")
    (tmp_path / "t.TextGrid").write_text(TG_SHORT[:-20])
    with pytest.raises(AlignmentError, match="t.TextGrid"):
        read_alignments(tmp_path / "t.TextGrid")


def test_label_quality_writes_json_and_plot(tmp_path):
    write_labels(tmp_path / "lab", UNITS, META)
    (tmp_path / "a.ctm").write_text(CTM)
    report = label_quality(tmp_path / "lab", tmp_path / "a.ctm", out_json=tmp_path / "q.json",
                           plot=tmp_path / "q.png")
    d = json.loads((tmp_path / "q.json").read_text())
    assert d["pnmi"] == pytest.approx(2 / 3) and d["counts"] == COUNTS.tolist()
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.metrics["phone_purity"] == pytest.approx(5 / 6)


def test_unit_order_follows_most_likely_phone():
    p = np.array([[0.1, 0.9, 0.2, 0.6], [0.9, 0.1, 0.8, 0.4]])  # units 1, 3 -> phone 0; units 0, 2 -> phone 1
    assert unit_order(p).tolist() == [1, 3, 0, 2]
