"""SUPERB speaker diarization: DER against pyannote.metrics and hand-computed cases, the permutation-invariant
loss, RTTM files, the task on a toy problem, the Libri2Mix preparer and mini_synth's mixture maker."""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.audio import load_audio
from speechssl.data.kaldi import DataDir, read_data_dir, write_data_dir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.config import default_config
from speechssl.superb.corpora.common import CorpusError
from speechssl.superb.corpora.libri2mix import energy_vad, prepare_libri2mix
from speechssl.superb.der import (Turn, der_components, diarization_error_rate, format_rttm, frames_to_turns,
                                  optimal_mapping, read_rttm, turns_to_frames, write_rttm)
from speechssl.superb.diarization import SpeakerDiarization, permutations, pit_bce
from speechssl.superb.tasks import Example, Split

from fake_librispeech import make_fake_librispeech

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "egs" / "mini_synth" / "superb" / "local"))
import make_mixtures  # noqa: E402


def _random_turns(rng, speakers, length=20.0):
    """Per speaker, disjoint turns with gaps (touching turns of one speaker would merge here, not in pyannote)."""
    out = []
    for s in speakers:
        t = rng.uniform(0, 2)
        while t < length:
            d = rng.uniform(0.2, 3.0)
            out.append(Turn(s, round(t, 3), round(t + d, 3)))
            t += d + rng.uniform(0.05, 2.0)
    return out


# ------------------------------------------------------------------------------------------------ DER
def test_der_matches_pyannote_metrics():
    import pyannote.metrics.diarization as metrics  # the DER reference (dev extra): a missing one fails, not skips
    from pyannote.core import Annotation, Segment

    def ann(turns):
        a = Annotation()
        for i, t in enumerate(turns):
            a[Segment(t.start, t.end), i] = t.speaker
        return a

    rng = np.random.default_rng(0)
    names = {"total": "total", "missed": "missed detection", "false_alarm": "false alarm", "confusion": "confusion"}
    files = {}
    for trial in range(12):
        ref = _random_turns(rng, [f"r{i}" for i in range(rng.integers(1, 5))])
        hyp = _random_turns(rng, [f"h{i}" for i in range(rng.integers(1, 5))])
        files[f"f{trial}"] = (ref, hyp)
        # SUPERB (collar 0, overlap scored); md-eval's collar c = pyannote's full width 2c; overlap skipped
        for collar, skip in ((0.0, False), (0.25, False), (0.1, True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # pyannote: "uem approximated by the extents"
                want = metrics.DiarizationErrorRate(collar=2 * collar, skip_overlap=skip)(ann(ref), ann(hyp),
                                                                                          detailed=True)
            got = der_components(ref, hyp, collar=collar, skip_overlap=skip)
            for k, v in names.items():
                assert got[k] == pytest.approx(want[v], abs=1e-6), (trial, collar, skip, k)
    # the corpus-level figure sums errors over files before dividing, as pyannote's accumulated metric
    metric = metrics.DiarizationErrorRate(collar=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ref, hyp in files.values():
            metric(ann(ref), ann(hyp))
    got = diarization_error_rate({f: r for f, (r, _) in files.items()}, {f: h for f, (_, h) in files.items()})
    assert got["der"] == pytest.approx(abs(metric), abs=1e-9)


def test_der_hand_computed():
    ref = [Turn("A", 0, 4), Turn("B", 3, 8)]
    # one hypothesis speaker short in the 1 s overlap: 1 s missed of 9 s
    assert der_components(ref, [Turn("x", 0, 4), Turn("y", 4, 8)]) == {
        "total": 9.0, "missed": 1.0, "false_alarm": 0.0, "confusion": 0.0}
    # one hypothesis speaker for both: mapped to B (5 s), A's 4 s confused except the overlap (missed there)
    got = der_components(ref, [Turn("x", 0, 8)])
    assert got == {"total": 9.0, "missed": 1.0, "false_alarm": 0.0, "confusion": 3.0}
    got = diarization_error_rate({"f": ref, "g": [Turn("C", 0, 1)]}, {"f": [Turn("x", 0, 8)]})
    assert got["der"] == pytest.approx(5 / 10) and got["missed"] == pytest.approx(2 / 10)   # g: all missed
    # false alarm, and a collar of 0.25 s on each side of each reference boundary
    assert der_components([Turn("A", 1, 5)], [Turn("x", 0.8, 6)]) == pytest.approx(
        {"total": 4.0, "missed": 0.0, "false_alarm": 1.2, "confusion": 0.0})
    assert der_components([Turn("A", 1, 5)], [Turn("x", 0.8, 6)], collar=0.25) == pytest.approx(
        {"total": 3.5, "missed": 0.0, "false_alarm": 0.75, "confusion": 0.0})
    # overlap skipped: only the single-speaker 7 s count
    assert der_components(ref, [Turn("x", 0, 8)], skip_overlap=True) == pytest.approx(
        {"total": 7.0, "missed": 0.0, "false_alarm": 0.0, "confusion": 3.0})


def test_optimal_mapping_is_the_best_permutation():
    rng = np.random.default_rng(1)
    for n_r, n_h in [(2, 2), (3, 2), (2, 4), (4, 4)]:
        cooc = rng.random((n_r, n_h))
        got = sum(cooc[r, h] for r, h in optimal_mapping(cooc))
        n = max(n_r, n_h)
        sq = np.zeros((n, n))
        sq[:n_r, :n_h] = cooc
        best = max(sum(sq[r, p[r]] for r in range(n)) for p in itertools.permutations(range(n)))
        assert got == pytest.approx(best)


# ------------------------------------------------------------------------------------------------ RTTM and frames
def test_rttm_round_trip_and_errors(tmp_path):
    turns = {"mix2": [Turn("s1", 0.5, 1.25)], "mix1": [Turn("b", 1.0, 3.5), Turn("a", 0.0, 2.0)]}
    write_rttm(tmp_path / "rttm", turns)
    assert read_rttm(tmp_path / "rttm") == {"mix1": [Turn("a", 0.0, 2.0), Turn("b", 1.0, 3.5)],
                                            "mix2": [Turn("s1", 0.5, 1.25)]}
    assert format_rttm(turns).splitlines()[0] == "SPEAKER mix1 1 0.000 2.000 <NA> <NA> a <NA> <NA>"
    # s3prl's make_rttm.py writes 9 fields; other RTTM types are skipped
    (tmp_path / "nine").write_text("SPKR-INFO f 1 <NA> <NA> <NA> unknown a <NA>\n"
                                   "SPEAKER f 1 0.5 1.0 <NA> <NA> a <NA>\n")
    assert read_rttm(tmp_path / "nine") == {"f": [Turn("a", 0.5, 1.5)]}
    for bad, what in [("SPEAKER f 1 0.5 1.0 <NA> a", "9 or 10 fields"), ("SPEAKER f 1 x 1.0 <NA> <NA> a <NA>", "not"),
                      ("SPEAKER f 1 0.5 -1 <NA> <NA> a <NA>", ">= 0")]:
        (tmp_path / "bad").write_text("SPEAKER f 1 0 1 <NA> <NA> a <NA> <NA>\n\n" + bad + "\n")
        with pytest.raises(UserError, match=rf"bad:3: .*{what}"):
            read_rttm(tmp_path / "bad")
    with pytest.raises(MissingInputError):
        read_rttm(tmp_path / "none")


def test_frames_and_turns():
    turns = [Turn("a", 0.0, 0.3), Turn("b", 0.2, 0.5), Turn("a", 0.4, 0.6)]
    y = turns_to_frames(turns, ["a", "b"], 8, 10.0)
    assert y[:, 0].tolist() == [1, 1, 1, 0, 1, 1, 0, 0] and y[:, 1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    back = frames_to_turns(y, 10.0, ["a", "b"])
    assert [(t.speaker, round(t.start, 6), round(t.end, 6)) for t in back] == [
        ("a", 0.0, 0.3), ("b", 0.2, 0.5), ("a", 0.4, 0.6)]


# ------------------------------------------------------------------------------------------------ PIT loss
def test_pit_loss_is_invariant_to_speaker_order():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 3)
    y = (torch.rand(3, 7, 3) > 0.5).float()
    lens = torch.tensor([7, 5, 2])
    loss, idx = pit_bce(logits, y, lens)
    for p in itertools.permutations(range(3)):
        assert float(pit_bce(logits, y[..., list(p)], lens)[0]) == pytest.approx(float(loss), abs=1e-6)
    # brute force: each utterance's best order of the summed per-frame speaker-mean BCE, over all valid frames
    total = 0.0
    for b in range(3):
        n = int(lens[b])
        costs = [float(torch.nn.functional.binary_cross_entropy_with_logits(logits[b, :n], y[b, :n][:, list(p)],
                                                                            reduction="none").mean(-1).sum())
                 for p in itertools.permutations(range(3))]
        total += min(costs)
        assert costs[int(idx[b])] == pytest.approx(min(costs), abs=1e-6)
    assert float(loss) == pytest.approx(total / 14, abs=1e-6)
    padded = logits.clone()
    padded[1, 5:] = 100.0   # frames past an utterance's length do not count
    assert float(pit_bce(padded, y, lens)[0]) == pytest.approx(float(loss), abs=1e-6)
    assert permutations(2).tolist() == [[0, 1], [1, 0]]


# ------------------------------------------------------------------------------------------------ the task
def _sd_dir(path: Path, turns: dict[str, list[Turn]], durs: dict[str, float]) -> DataDir:
    dd = DataDir(wav_scp={u: f"/nowhere/{u}.wav" for u in turns}, utt2spk={u: u for u in turns},
                 utt2dur={u: durs[u] for u in turns})
    write_data_dir(dd, path)
    write_rttm(path / "rttm", turns)
    return read_data_dir(path)


def test_task_learns_a_toy_diarization(tmp_path):
    """Features that carry each speaker's activity (in a fixed channel per speaker identity) plus noise: the head
    must learn to read them out in some order, which PIT lets it choose; DER then drops to ~0."""
    rng = np.random.default_rng(0)
    rate, n = 20.0, 24
    turns, durs = {}, {}
    for i in range(n):
        a0 = rng.uniform(0.1, 1.0)
        b0 = a0 + rng.uniform(0.5, 1.5)
        turns[f"m{i:02d}"] = [Turn("A", a0, b0 + 0.3), Turn("B", b0, b0 + rng.uniform(0.8, 1.6))]
        durs[f"m{i:02d}"] = 4.0
    dd = _sd_dir(tmp_path / "d", turns, durs)
    cfg = default_config("sd")
    cfg.head.proj_dim, cfg.head.hidden = 0, 16
    task = SpeakerDiarization(cfg)
    task.frame_rate = rate
    split = task.make_split("train", tmp_path / "d", dd, durs)
    task.fit(split)
    assert task.num_speakers == 2 and task.state() == {"num_speakers": 2}
    T = int(4.0 * rate)
    feats = []
    for ex in split.examples:
        y = turns_to_frames(ex.target, ["A", "B"], T, rate)
        feats.append(torch.from_numpy(np.concatenate([y, rng.normal(0, 0.3, (T, 2))], 1).astype(np.float32)))
    x, lens = torch.stack(feats), torch.full((n,), T)
    torch.manual_seed(0)
    head = task.build_head(4)
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    batches = [(split.examples, x, lens)]
    before = task.evaluate(head, batches, split)["der"]
    for _ in range(150):
        loss = task.loss(head, x, lens, [e.target for e in split.examples])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        got = task.evaluate(head, batches, split)
    assert before > 0.4 and got["der"] < 0.05, (before, got)
    assert got["der"] == pytest.approx(got["missed"] + got["false_alarm"] + got["confusion"])


def test_task_label_errors(tmp_path):
    turns = {"m1": [Turn("A", 0, 1)], "m2": [Turn("A", 0, 1), Turn("B", 1, 2), Turn("C", 2, 3)]}
    dd = _sd_dir(tmp_path / "d", turns, {"m1": 2.0, "m2": 3.0})
    task = SpeakerDiarization(default_config("sd"))
    split = task.make_split("dev", tmp_path / "d", dd, {"m1": 2.0, "m2": 3.0})
    task.fit(Split("train", tmp_path, dd, [Example("m1", 2.0, turns["m1"] + [Turn("B", 1, 2)])]))
    with pytest.raises(UserError, match=r"d/rttm: utterance m2 has 3 speakers"):
        task.check(split)
    (tmp_path / "d" / "rttm").write_text("SPEAKER m1 1 0 1 <NA> <NA> A <NA> <NA>\n"
                                         "SPEAKER zz 1 0 1 <NA> <NA> A <NA> <NA>\n")
    with pytest.raises(UserError, match=r"d/rttm: no SPEAKER line for utterance m2"):
        task.labels(dd, tmp_path / "d", "dev")
    (tmp_path / "d" / "rttm").unlink()
    with pytest.raises(MissingInputError, match=r"d/rttm: no such file"):
        task.labels(dd, tmp_path / "d", "dev")
    task.frame_rate = 0.0
    with pytest.raises(RuntimeError, match="frame_rate"):
        task.targets(turns["m1"], 10)


# ------------------------------------------------------------------------------------------------ Libri2Mix
def _librimix_metadata(root: Path, corpus: Path, *, noise: bool = False) -> Path:
    meta = root / "metadata"
    (meta / "Libri2Mix").mkdir(parents=True)
    (meta / "LibriSpeech").mkdir()
    rttm_lines = []
    for part in ("train-clean-100", "dev-clean", "test-clean"):
        flacs = sorted((corpus / part).rglob("*.flac"))
        rows = ["mixture_ID,source_1_path,source_1_gain,source_2_path,source_2_gain,noise_path,noise_gain"]
        for a, b in zip(flacs[: len(flacs) // 2], flacs[len(flacs) // 2:]):   # two readers per mixture
            rows.append(f"{a.stem}_{b.stem},{a.relative_to(corpus)},0.8,{b.relative_to(corpus)},1.3,n/noise.wav,0.5")
            if part == "dev-clean":   # the s3prl fork's per-source VAD RTTM: id <chapter>-<utt>, name = reader
                for f, segs in ((a, [(0.1, 0.7), (0.9, 1.4)]), (b, [(0.2, 1.1)])):
                    spk, key = f.stem.split("-", 1)
                    rttm_lines += [f"SPEAKER {key} 1 {s:.3f} {e - s:.3f} <NA> <NA> {spk} <NA> <NA>" for s, e in segs]
        (meta / "Libri2Mix" / f"libri2mix_{part}.csv").write_text("\n".join(rows) + "\n")
    (meta / "LibriSpeech" / "dev_clean.rttm").write_text("\n".join(rttm_lines) + "\n")
    return meta


def test_libri2mix(tmp_path):
    corpus = make_fake_librispeech(tmp_path / "LibriSpeech", {"train-clean-100": (2, 1, 2), "dev-clean": (2, 1, 1),
                                                              "test-clean": (2, 1, 1)})
    meta = _librimix_metadata(tmp_path, corpus)
    wham = tmp_path / "wham"
    (wham / "n").mkdir(parents=True)
    noise = np.random.default_rng(0).normal(0, 0.1, 12000).astype(np.float32)   # shorter than a mixture: extended
    sf.write(wham / "n" / "noise.wav", np.stack([noise, -noise], 1), 16000, subtype="FLOAT")
    summary = prepare_libri2mix(corpus, meta, tmp_path / "out", wham_dir=wham)
    assert {k: v["mixtures"] for k, v in summary["counts"].items()} == {"train": 2, "dev": 1, "test": 1}
    assert summary["options"]["activity"]["dev"].endswith("dev_clean.rttm")
    assert summary["options"]["activity"]["train"] == "energy VAD"
    dev = read_data_dir(tmp_path / "out" / "dev")
    (mix_id,) = dev.utt_ids()
    assert dev.utt2spk == {mix_id: mix_id}
    s1, s2 = sorted((corpus / "dev-clean").rglob("*.flac"))
    x1, x2 = load_audio(s1), load_audio(s2)
    mix = load_audio(dev.wav_scp[mix_id])
    assert len(mix) == max(len(x1), len(x2)) and dev.utt2dur[mix_id] == pytest.approx(len(mix) / 16000)
    clean = np.zeros(len(mix))
    clean[: len(x1)] += 0.8 * x1
    clean[: len(x2)] += 1.3 * x2
    resid = mix - clean   # the noise: first channel, times its gain (16-bit rounding aside)
    assert np.abs(resid[:3000] - 0.5 * noise[:3000]).max() < 2e-4   # before the first cross-fade
    assert np.abs(resid[12000:]).max() > 0.01   # extended, not zero-padded
    spk1, spk2 = s1.stem.split("-")[0], s2.stem.split("-")[0]
    assert read_rttm(tmp_path / "out" / "dev" / "rttm") == {mix_id: [
        Turn(spk1, 0.1, 0.7), Turn(spk2, 0.2, 1.1), Turn(spk1, 0.9, 1.4)]}
    train = read_rttm(tmp_path / "out" / "train" / "rttm")
    assert len(train) == 2 and all(len({t.speaker for t in v}) == 2 for v in train.values())
    # without --wham: the sum of the sources
    prepare_libri2mix(corpus, meta, tmp_path / "clean", parts={"dev": "dev-clean"})
    mix = load_audio(read_data_dir(tmp_path / "clean" / "dev").wav_scp[mix_id])
    assert np.abs(mix - clean).max() < 2e-4


def test_libri2mix_bad_input(tmp_path):
    corpus = make_fake_librispeech(tmp_path / "LibriSpeech", {"train-clean-100": (2, 1, 1), "dev-clean": (2, 1, 1),
                                                              "test-clean": (2, 1, 1)})
    meta = _librimix_metadata(tmp_path, corpus)
    csv_path = meta / "Libri2Mix" / "libri2mix_test-clean.csv"
    good = csv_path.read_text()
    with pytest.raises(UserError, match="already exists"):
        (tmp_path / "o").mkdir()
        prepare_libri2mix(corpus, meta, tmp_path / "o")
    csv_path.write_text(good + "x_y,a.flac,0.5\n")
    with pytest.raises(CorpusError, match=r"libri2mix_test-clean.csv:3: 3 fields, the header has 7"):
        prepare_libri2mix(corpus, meta, tmp_path / "o1")
    csv_path.write_text(good + "x_y,test-clean/9/9/9-9-9.flac,0.5,test-clean/8/8/8-8-8.flac,0.5,n,1\n")
    with pytest.raises(CorpusError, match=r"libri2mix_test-clean.csv:3: lists audio .*9-9-9.flac, which does not"):
        prepare_libri2mix(corpus, meta, tmp_path / "o2")
    csv_path.write_text(good.replace("0.8", "loud"))
    with pytest.raises(CorpusError, match=r"libri2mix_test-clean.csv:2: a gain is not a number"):
        prepare_libri2mix(corpus, meta, tmp_path / "o3")
    csv_path.write_text(good)
    rttm = meta / "LibriSpeech" / "dev_clean.rttm"
    rttm.write_text("\n".join(rttm.read_text().splitlines()[:-1]) + "\n")   # the second source's only turn gone
    with pytest.raises(CorpusError, match=r"libri2mix_dev-clean.csv:2: source .* has no turns in .*dev_clean.rttm"):
        prepare_libri2mix(corpus, meta, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_energy_vad():
    t = np.arange(16000 * 2) / 16000
    wav = np.where((t > 0.5) & (t < 1.2) | (t > 1.35) & (t < 1.8), np.sin(2 * np.pi * 200 * t), 1e-4).astype(np.float32)
    iv = energy_vad(wav)
    assert iv.shape == (1, 2) and iv[0] == pytest.approx([0.5, 1.8], abs=0.03)   # the 0.15 s gap is bridged
    assert energy_vad(wav, min_gap=0.1).shape == (2, 2)


# ------------------------------------------------------------------------------------------------ mini_synth
def _fake_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "corpus.json").parent.mkdir(parents=True)
    (root / "corpus.json").write_text("{}\n")
    for split in ("train", "dev", "test"):
        wav_scp, u2s, types, ctm = {}, {}, {}, []
        for spk in ("spk01", "spk02", "spk03"):
            for i in range(4):
                utt = f"{spk}-read-{split}{i}"
                n = int(rng.uniform(1.5, 2.5) * 16000)
                w = (0.1 * rng.standard_normal(n)).astype(np.float32)
                (root / "wav").mkdir(exist_ok=True)
                sf.write(root / "wav" / f"{utt}.wav", w, 16000)
                wav_scp[utt], u2s[utt], types[utt] = str(root / "wav" / f"{utt}.wav"), spk, "read" if i < 3 else "kw"
                dur = n / 16000
                # sil, a, b, sil(0.1: bridged), c, sil(0.4: a new turn), d, sil
                marks = [0.0, 0.2, 0.5, 0.7, 0.8, 1.0, 1.4, dur - 0.1, dur]
                for p, (s, e) in zip(["sil", "a", "b", "sil", "c", "sil", "d", "sil"], zip(marks, marks[1:])):
                    ctm.append(f"{utt} 1 {s:.4f} {e - s:.4f} {p}\n")
        write_data_dir(DataDir(wav_scp=wav_scp, utt2spk=u2s, extra={"utt2type": types}), root / split)
        (root / split / "phones.ctm").write_text("".join(ctm))
    return root


def test_make_mixtures(tmp_path):
    corpus = _fake_corpus(tmp_path / "data")
    counts = {"train": 3, "dev": 2, "test": 2}
    summary = make_mixtures.make_mixtures(corpus, tmp_path / "mix", counts=counts, seed=3)
    assert {k: v["mixtures"] for k, v in summary["counts"].items()} == counts
    for split in counts:
        dd = read_data_dir(tmp_path / "mix" / split)
        rttm = read_rttm(tmp_path / "mix" / split / "rttm")
        assert sorted(rttm) == dd.utt_ids()
        for mix_id, turns in rttm.items():
            a, b = mix_id.split("_")
            assert "kw" not in mix_id and a.split("-")[0] != b.split("-")[0]   # read utterances, two voices
            by = {s: sorted((t.start, t.end) for t in turns if t.speaker == s) for s in {t.speaker for t in turns}}
            first, second = by[a.split("-")[0]], by[b.split("-")[0]]
            # each source: its speech 0.2-1.0 (the 0.1 s pause bridged) and 1.4-(dur-0.1), moved by its offset
            for spans in (first, second):
                assert len(spans) == 2
                assert spans[0][1] - spans[0][0] == pytest.approx(0.8, abs=1e-3)
                assert spans[1][0] - spans[0][0] == pytest.approx(1.2, abs=1e-3)
            span = first[-1][1] - first[0][0]
            assert first[0][0] + 0.3 * span - 1e-3 <= second[0][0] <= first[0][0] + 0.9 * span + 1e-3
            assert dd.utt2dur[mix_id] >= second[-1][1]
    again = make_mixtures.make_mixtures(corpus, tmp_path / "mix2", counts=counts, seed=3)
    assert again["counts"] == summary["counts"]
    for split in counts:
        assert (tmp_path / "mix" / split / "rttm").read_text() == (tmp_path / "mix2" / split / "rttm").read_text()
        one = sorted((tmp_path / "mix" / "wav" / split).iterdir())
        assert [p.read_bytes() for p in one] == [(tmp_path / "mix2" / "wav" / split / p.name).read_bytes() for p in one]
    with pytest.raises(UserError, match=r"only \d+ mixtures of two speakers from 9 read utterances"):
        make_mixtures.make_mixtures(corpus, tmp_path / "mix3", counts={"train": 40}, seed=3)   # 27 pairs exist
    assert not (tmp_path / "mix3").exists()
    assert json.loads((tmp_path / "mix" / "prepare.json").read_text())["options"]["seed"] == 3
    # more mixtures than utterances: sources are reused with new partners, never the same pair twice
    make_mixtures.make_mixtures(corpus, tmp_path / "many", counts={"dev": 12}, seed=0)
    ids = read_data_dir(tmp_path / "many" / "dev").utt_ids()
    assert len({frozenset(i.split("_")) for i in ids}) == 12
    # --max-source: only utterances aligned up to that many seconds
    make_mixtures.make_mixtures(corpus, tmp_path / "short", counts={"dev": 1}, seed=0, max_source=2.0)
    ali = make_mixtures.read_alignments(corpus / "dev" / "phones.ctm")
    (mix_id,) = read_data_dir(tmp_path / "short" / "dev").utt_ids()
    assert all(ali[u].end <= 2.0 for u in mix_id.split("_"))


@pytest.mark.parametrize("k", [1, 3, 5, 11])
def test_median_filter_equals_scipy_medfilt(k):
    """head.median_filter: each speaker's 0/1 activity median-filtered with zero padding, as s3prl's
    scipy.signal.medfilt; the task turns seconds into an odd frame count."""
    from scipy.signal import medfilt
    from speechssl.superb.config import load_superb_config
    from speechssl.superb.diarization import SpeakerDiarization, median_filter

    a = np.random.default_rng(k).random((60, 2)) > 0.5
    ref = np.stack([medfilt(a[:, s].astype(float), k) for s in range(2)], 1) > 0.5
    np.testing.assert_array_equal(median_filter(a, k), ref)
    task = SpeakerDiarization(load_superb_config("sd", None, ["head.median_filter=0.25"]))
    task.frame_rate = 50.0
    assert task._median_frames() == 13     # 12.5 frames -> 13 (odd)
    task.frame_rate = 100.0
    assert task._median_frames() == 25
