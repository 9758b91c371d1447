"""Labels keyed by utterance id: IO, length checks against independent frame counts, stride, id-set checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from speechssl.features.kaldi import num_frames as kaldi_num_frames
from speechssl.features.store import FeatureWriter
from speechssl.units.labels import (
    LabelError,
    LabelSet,
    check_label_length,
    check_labels_cover,
    expected_num_frames,
    framing_from_features,
    label_stride,
    read_labels,
    write_labels,
)

MFCC = {"type": "window", "frame_length": 400, "frame_shift": 160, "snip_edges": True}
HUBERT_CNN = {"type": "conv", "layers": [[10, 5]] + [[3, 2]] * 4 + [[2, 2]] * 2}


def _conv_len(num_samples: int) -> int:
    """Independent reference: run the HuBERT conv stack's shapes through torch."""
    x = torch.zeros(1, 1, num_samples)
    for k, s in HUBERT_CNN["layers"]:
        x = torch.nn.functional.conv1d(x, torch.zeros(1, 1, k), stride=s)
    return x.shape[-1]


@pytest.mark.parametrize("samples", [400, 401, 559, 560, 16000, 16001, 48123])
def test_expected_frames_match_extractors(samples):
    assert expected_num_frames(samples, MFCC, 100.0) == kaldi_num_frames(samples)
    assert expected_num_frames(samples, HUBERT_CNN, 50.0) == _conv_len(samples)


def test_framing_from_dumped_mfcc_meta():
    from speechssl.features.dump import feature_meta

    assert framing_from_features(feature_meta("mfcc")) == MFCC
    assert framing_from_features({"kind": "hubert_l6", "frame_rate": 50.0, "framing": HUBERT_CNN}) == HUBERT_CNN
    assert framing_from_features({"kind": "hubert_l6", "frame_rate": 50.0}) is None


def test_check_label_length_tolerance_one_frame():
    assert check_label_length("u", 98, 16000, 100.0, framing=MFCC) == 98  # 1 + (16000 - 400) // 160
    check_label_length("u", 97, 16000, 100.0, framing=MFCC)
    check_label_length("u", 99, 16000, 100.0, framing=MFCC)
    with pytest.raises(LabelError, match=r"utt spk1-0007: 101 labels in lab/text.km .* 98 frames"):
        check_label_length("spk1-0007", 101, 16000, 100.0, framing=MFCC, label_file="lab/text.km")
    check_label_length("u", 49, 16000, 50.0, framing=HUBERT_CNN)
    with pytest.raises(LabelError, match="utt u: 46 labels"):
        check_label_length("u", 46, 16000, 50.0, expected=_conv_len(16000))


@pytest.mark.parametrize("label_rate,frame_rate,stride", [(100, 50, 2), (50, 50, 1), (100, 100, 1), (100, 25, 4),
                                                          (16000 / 160, 16000 / 320, 2)])
def test_label_stride(label_rate, frame_rate, stride):
    assert label_stride(label_rate, frame_rate) == stride


@pytest.mark.parametrize("label_rate,frame_rate", [(100, 40), (50, 100), (100, 0), (100, 33.3)])
def test_label_stride_rejects_non_whole(label_rate, frame_rate):
    with pytest.raises(LabelError):
        label_stride(label_rate, frame_rate)


def _some_labels(n=20, k=50, seed=0):
    rng = np.random.default_rng(seed)
    return {f"spk{i % 3}-utt{i:03d}": rng.integers(0, k, size=rng.integers(0, 40)) for i in range(n)}


def test_roundtrip_sorted_and_shuffled_lines(tmp_path):
    labels = _some_labels()
    write_labels(tmp_path, labels, {"label_rate": 100.0, "k": 50, "framing": MFCC})
    lines = (tmp_path / "text.km").read_text().splitlines()
    ids = [ln.split()[0] for ln in lines]
    assert ids == sorted(ids, key=str.encode)  # C byte order
    random.Random(1).shuffle(lines)
    (tmp_path / "text.km").write_text("\n".join(lines) + "\n")
    got, meta = read_labels(tmp_path)
    assert meta["num_utts"] == 20 and set(got) == set(labels)
    for utt, units in labels.items():
        np.testing.assert_array_equal(got[utt], units)


def test_read_errors_name_file_and_line(tmp_path):
    write_labels(tmp_path, {"a": [1, 2], "b": [3]}, {"label_rate": 100.0, "k": 4})
    (tmp_path / "text.km").write_text("a 1 2\nb 3 4\n")
    with pytest.raises(LabelError, match=r"text.km:2: utt b: unit 4 outside \[0, 4\)"):
        read_labels(tmp_path)
    (tmp_path / "text.km").write_text("a 1 2\na 3\n")
    with pytest.raises(LabelError, match=r"text.km:2: duplicate utterance id 'a'"):
        read_labels(tmp_path)
    (tmp_path / "text.km").write_text("a 1 2\n")
    with pytest.raises(LabelError, match="1 utterances but meta.json says 2"):
        read_labels(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(LabelError, match="unfinished"):
        read_labels(tmp_path)


def test_labelset_checks_every_utterance(tmp_path):
    samples = {"u1": 16000, "u2": 8000}
    labels = {u: np.zeros(kaldi_num_frames(s), dtype=int) for u, s in samples.items()}
    labels["u2"] = np.zeros(kaldi_num_frames(8000) + 3, dtype=int)  # 3 frames too long
    write_labels(tmp_path, labels, {"label_rate": 100.0, "k": 2, "framing": MFCC})
    ls = LabelSet(tmp_path)
    assert len(ls.get("u1", 16000)) == 98
    with pytest.raises(LabelError, match=r"utt u2: 51 labels in .*text.km"):
        ls.get("u2", 8000)
    with pytest.raises(LabelError, match="utt u3: no labels"):
        ls.get("u3")
    assert ls.stride_for(50.0) == 2


def test_label_set_vs_feature_store_ids(tmp_path):
    with FeatureWriter(tmp_path / "feats", 0, 1, {"kind": "mfcc", "frame_rate": 100}) as w:
        for u in ("a", "b", "c"):
            w.add(u, np.zeros((5, 2), np.float32))
    write_labels(tmp_path / "lab", {"a": [0] * 5, "b": [0] * 5, "c": [0] * 5}, {"label_rate": 100.0, "k": 1})
    check_labels_cover(tmp_path / "lab", tmp_path / "feats")
    write_labels(tmp_path / "lab", {"a": [0] * 5, "c": [0] * 5}, {"label_rate": 100.0, "k": 1})
    with pytest.raises(LabelError, match=r"1 utterance\(s\) in .*feats but not in .*text.km: b"):
        check_labels_cover(tmp_path / "lab", tmp_path / "feats")
    with pytest.raises(LabelError, match="in .*text.km but not in the given utterance list: c"):
        LabelSet(tmp_path / "lab").check_covers(["a"])


def test_label_set_vs_data_dir(tmp_path):
    from speechssl.data import kaldi

    d = tmp_path / "data"
    d.mkdir()
    (d / "wav.scp").write_text("a /x/a.wav\nb /x/b.wav\n")
    (d / "utt2spk").write_text("a s\nb s\n")
    (d / "spk2utt").write_text("s a b\n")
    assert kaldi.read_data_dir(d, validate=False).utt_ids() == ["a", "b"]
    write_labels(tmp_path / "lab", {"a": [0]}, {"label_rate": 100.0, "k": 1})
    with pytest.raises(LabelError, match="but not in .*text.km: b"):
        check_labels_cover(tmp_path / "lab", d)
