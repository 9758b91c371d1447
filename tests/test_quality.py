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
    # 0.16 s of alignment for 0.12 s of labels: 0.04 s overhang is aligner slack, clipped and counted
    (tmp_path / "a.ctm").write_text("utt1 1 0.00 0.06 a\nutt1 1 0.06 0.10 b\n")
    report = evaluate_labels(UNITS, META, read_alignments(tmp_path / "a.ctm"))
    assert report.num_frames == 12 and report.coverage.clipped_frames == 4
    # 1 s of alignment for 0.12 s of labels: another utterance's
    (tmp_path / "b.ctm").write_text("utt1 1 0.00 0.06 a\nutt1 1 0.06 0.94 b\n")
    with pytest.raises(AlignmentError, match="utt utt1: 12 labels"):
        evaluate_labels(UNITS, META, read_alignments(tmp_path / "b.ctm"))


# ------------------------------------------------ alignment vs audio length: unscored, clipped, wrong pairing

RATE = 100.0
WINDOW = {"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": True}  # Kaldi MFCC


def _one_second_labels(tmp_path, framing=None, utts=("utt1",)):
    """1 s of audio per utterance: 100 frames at 100 Hz (98 with 25 ms snip_edges windows)."""
    n = 100 if framing is None else 98
    units = {u: np.arange(n) % 3 for u in utts}
    meta = dict(META, **({"framing": framing} if framing else {}))
    write_labels(tmp_path / "lab", units, meta)
    return n


def _ctm(path, utt, end, pause_from=None):
    """Phones a, b alternating every 0.1 s up to ``end``; from ``pause_from`` one trailing ``sil`` to ``end``."""
    stop = end if pause_from is None else pause_from
    t, lines, i = 0.0, [], 0
    while t < stop - 1e-9:
        d = min(0.1, stop - t)
        lines.append(f"{utt} 1 {t:.3f} {d:.3f} {'ab'[i % 2]}")
        t, i = t + d, i + 1
    if pause_from is not None:
        lines.append(f"{utt} 1 {pause_from:.3f} {end - pause_from:.3f} sil")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("framing", [None, WINDOW])
def test_ctm_ending_two_frames_early_is_scored(tmp_path, framing):
    n = _one_second_labels(tmp_path, framing)
    ctm = _ctm(tmp_path / "early.ctm", "utt1", 1.0 - 2 / RATE)  # a Kaldi CTM 2 frames short of the audio
    report = label_quality(tmp_path / "lab", ctm, out_json=tmp_path / "q.json")
    cov = report.coverage
    assert report.num_frames == n - 2 and report.num_utts == 1
    assert (cov.utts_affected, cov.utts_unscored, cov.unscored_frames, cov.clipped_frames) == (1, 1, 2, 0)
    assert cov.largest_gap_utt == "utt1" and cov.largest_gap_s == pytest.approx(0.02)
    d = json.loads((tmp_path / "q.json").read_text())["alignment_coverage"]
    assert d["unscored_frames"] == 2 and d["utts_affected"] == 1 and d["largest_gap_utt"] == "utt1"
    assert d["largest_gap_kind"] == "unscored"
    assert "2 frame(s) (0.02 s) past the alignment's end unscored" in report.summary()


@pytest.mark.parametrize("framing", [None, WINDOW])
def test_trailing_pause_overhanging_120ms_is_clipped(tmp_path, framing):
    n = _one_second_labels(tmp_path, framing)
    ctm = _ctm(tmp_path / "over.ctm", "utt1", 1.12, pause_from=0.9)  # pause 0.9 .. 1.12 s, audio ends at 1 s
    report = label_quality(tmp_path / "lab", ctm, out_json=tmp_path / "q.json")
    cov = report.coverage
    assert report.num_frames == n and cov.unscored_frames == 0  # every label frame scored
    assert (cov.utts_affected, cov.utts_clipped, cov.clipped_frames) == (1, 1, 12)
    assert cov.clipped_seconds == pytest.approx(0.12) and cov.largest_gap_kind == "clipped"
    # the pause is scored up to the audio's end: frame centres from 0.9 s (0.905 s / 0.9125 s on) to the last frame
    assert report.counts[report.phones.index("sil")].sum() == (10 if framing is None else 9)
    d = json.loads((tmp_path / "q.json").read_text())["alignment_coverage"]
    assert d["clipped_frames"] == 12 and d["clipped_seconds"] == pytest.approx(0.12)


def test_coverage_sums_over_utterances(tmp_path):
    _one_second_labels(tmp_path, utts=("u1", "u2", "u3"))
    ctm = _ctm(tmp_path / "a.ctm", "u1", 0.98)
    _ctm(ctm, "u2", 1.12, pause_from=0.9)
    _ctm(ctm, "u3", 1.0)
    cov = label_quality(tmp_path / "lab", ctm).coverage
    assert (cov.num_utts, cov.utts_affected, cov.unscored_frames, cov.clipped_frames) == (3, 2, 2, 12)
    assert cov.largest_gap_utt == "u2" and cov.largest_gap_frames == 12


@pytest.mark.parametrize("end", [3.2, 0.3])
def test_alignment_of_another_utterance_is_refused(tmp_path, capsys, end):
    _one_second_labels(tmp_path)
    ctm = _ctm(tmp_path / "other.ctm", "utt1", end)  # seconds off: the alignment of other audio
    with pytest.raises(AlignmentError, match=r"utt utt1: 100 labels in .*text\.km") as e:
        label_quality(tmp_path / "lab", ctm)
    assert "\n" not in str(e.value) and "max(0.5 s, 10% of the utterance)" in str(e.value)
    from speechssl.cli import main

    assert main(["units", "quality", "--labels", str(tmp_path / "lab"), "--alignments", str(ctm)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # past tqdm's bar
    assert len(errors) == 1 and errors[0].startswith("speechssl units: error: utt utt1: 100 labels in ")
    assert "other.ctm" in errors[0]


def test_gap_tolerance_is_half_a_second_or_ten_percent():
    from speechssl.units.alignments import PhoneAlignment, frame_coverage

    def ali(end):
        return PhoneAlignment("u", np.array([0.0]), np.array([end]), ["a"], end, "x.ctm")

    assert frame_coverage(ali(1.5), 100, RATE).clipped == 50  # 1 s utterance: up to 0.5 s
    with pytest.raises(AlignmentError):
        frame_coverage(ali(1.51), 100, RATE)
    assert frame_coverage(ali(20.0 - 1.9), 2000, RATE).unscored == 190  # 20 s utterance: up to 10 % = 2 s
    with pytest.raises(AlignmentError):
        frame_coverage(ali(20.0 - 2.1), 2000, RATE)


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


def test_units_layers_uses_the_same_rule(tmp_path):
    """`units layers` frames alignments with the same rule and reports the same counts, per frame rate."""
    import torch

    from speechssl import upstream
    from speechssl.audio import save_audio
    from speechssl.data.kaldi import DataDir, write_data_dir
    from speechssl.features.dump import dump_features
    from speechssl.models import HubertPretrainModel, hubert_tiny, save_model
    from speechssl.units.layers import evaluate_layers

    rng = np.random.default_rng(0)
    wav_scp, utt2spk = {}, {}
    for utt in ("u1", "u2"):
        t = np.arange(16000) / 16000.0  # 1 s
        wav = 0.3 * np.sin(2 * np.pi * np.where(t % 0.2 < 0.1, 300.0, 1100.0) * t)
        save_audio(tmp_path / f"{utt}.wav", (wav + 0.003 * rng.standard_normal(len(t))).astype(np.float32))
        wav_scp[utt], utt2spk[utt] = str(tmp_path / f"{utt}.wav"), "spk"
    write_data_dir(DataDir(wav_scp=wav_scp, utt2spk=utt2spk), tmp_path / "data")
    ctm = _ctm(tmp_path / "a.ctm", "u1", 0.96)  # 2 model frames (50 Hz) short of the audio
    _ctm(ctm, "u2", 1.12, pause_from=0.9)  # trailing pause 120 ms past the audio
    dump_features(tmp_path / "data", tmp_path / "mfcc", kind="mfcc", nshard=1, workers=1)
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      conv_layers=[(32, 3, 2)])
    save_model(HubertPretrainModel(cfg), cfg, tmp_path / "ckpt")
    # 49 frames per second: the fbank frontend's padded conv, within a frame of floor(50 x seconds)
    n = int(upstream.load(tmp_path / "ckpt").model.num_frames(16000))
    lines: list[str] = []
    r = evaluate_layers(tmp_path / "ckpt", tmp_path / "data", ctm, k=2, mfcc=tmp_path / "mfcc", layers=[1],
                        sample_frac=1.0, niter=2, device="cpu", baseline=False, out_dir=tmp_path / "out",
                        progress=False, report=lines.append)
    written = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert written["alignment_coverage"] == r["alignment_coverage"]
    lay, mf = r["alignment_coverage"]["layers"], r["alignment_coverage"]["mfcc"]
    assert (lay["utts_affected"], lay["unscored_frames"], lay["clipped_frames"]) == (2, n - 48, 56 - n)  # 50 Hz
    assert (mf["utts_affected"], mf["unscored_frames"], mf["clipped_frames"]) == (2, 4, 12)  # 100 Hz
    assert lay["largest_gap_utt"] == mf["largest_gap_utt"] == "u2"
    assert r["layers"][0]["num_frames"] == n + 48 and r["mfcc"]["num_frames"] == 98 + 94
    assert any(line.startswith("layers: alignment/audio length: 2 of 2") for line in lines)
