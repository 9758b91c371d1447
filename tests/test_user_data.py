"""A user's own data, not the built-in corpus: `data validate --audio` names every unusable utterance, and a Kaldi
data dir with segments, 8 kHz and 48 kHz recordings and wav.scp pipes runs through `recipes/hubert.sh` stages 1-8.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechssl.cli import main
from speechssl.data import DataDir, read_data_dir, write_data_dir
from speechssl.data.audio_check import check_audio

ROOT = Path(__file__).resolve().parents[1]


def _speechlike(seconds: float, sr: int, seed: int) -> np.ndarray:
    """Speech-like test audio: 80 ms "phones" of harmonic tones (random pitch and formant-ish weights) or noise."""
    rng = np.random.default_rng(seed)
    seg = int(0.08 * sr)
    n = int(seconds * sr)
    t = np.arange(seg) / sr
    parts = []
    for _ in range((n + seg - 1) // seg):
        if rng.random() < 0.2:
            p = rng.normal(0, 0.05, seg)
        else:
            f0 = rng.uniform(90, 250)
            harm = np.arange(1, int(min(sr / 2 - 100, 3800) // f0) + 1)
            weights = rng.random(len(harm)) ** 2 / harm
            p = (weights[:, None] * np.sin(2 * np.pi * f0 * harm[:, None] * t + rng.uniform(0, 6.3, (len(harm), 1)))).sum(0)
            p = 0.3 * p / (np.abs(p).max() + 1e-9)
        parts.append(p * np.hanning(seg) ** 0.25)
    return np.concatenate(parts)[:n].astype(np.float32)


def _dir(path: Path, wavs: dict[str, str], segments: dict[str, tuple[str, float, float]] | None = None) -> Path:
    utts = segments if segments is not None else wavs
    write_data_dir(
        DataDir(wav_scp=wavs, utt2spk={u: u.split("-")[0] for u in utts}, text={u: "a b" for u in utts}, segments=segments),
        path,
    )
    return path


# ------------------------------------------------------------------------------------------- (a) validate --audio
@pytest.fixture
def bad_dir(tmp_path):
    return make_bad_dir(tmp_path)


def make_bad_dir(tmp_path: Path) -> Path:
    """Three good utterances and the four bad ones of the issue: missing, 0-sample, corrupt, NaN."""
    w = tmp_path / "wav"
    w.mkdir()
    wavs = {}
    for i in range(3):
        sf.write(w / f"good{i}.wav", _speechlike(0.5, 16000, i), 16000, subtype="PCM_16")
        wavs[f"spk-good{i}"] = str(w / f"good{i}.wav")
    wavs["spk-missing"] = str(w / "missing.wav")  # never written
    sf.write(w / "empty.wav", np.zeros(0, np.float32), 16000, subtype="PCM_16")  # a header, no samples
    wavs["spk-empty"] = str(w / "empty.wav")
    (w / "corrupt.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    wavs["spk-corrupt"] = str(w / "corrupt.wav")
    nan = _speechlike(0.5, 16000, 9)
    nan[1234] = np.nan
    sf.write(w / "nan.wav", nan, 16000, subtype="FLOAT")
    wavs["spk-nan"] = str(w / "nan.wav")
    return _dir(tmp_path / "data", wavs)


def test_structural_validation_alone_passes_bad_audio(bad_dir):
    assert main(["data", "validate", str(bad_dir)]) == 0  # what the issue reports: --audio is what catches them


def test_header_check_names_missing_empty_corrupt(bad_dir, capsys):
    assert main(["data", "validate", "--audio", str(bad_dir)]) == 1  # a bare --audio before DIR means header
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("utt ")]
    assert len(lines) == 3, err
    assert f"utt spk-missing: {bad_dir.parent}/wav/missing.wav: no such file" in lines
    assert any(ln.startswith("utt spk-empty: ") and "zero-length audio" in ln for ln in lines)
    assert any(ln.startswith("utt spk-corrupt: ") and "unreadable or corrupt audio" in ln for ln in lines)
    assert "3 of 7 utterances have unusable audio (header check)" in err
    assert "spk-good" not in err and "spk-nan" not in err  # NaN needs the samples: --audio full


def test_full_check_names_all_four(bad_dir, capsys):
    assert main(["data", "validate", "--audio", "full", "--nj", "3", str(bad_dir)]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("utt ")]
    assert [ln.split(":")[0] for ln in lines] == ["utt spk-corrupt", "utt spk-empty", "utt spk-missing", "utt spk-nan"]
    assert "non-finite sample (NaN or inf) at frame 1234" in lines[-1]
    assert "4 of 7 utterances have unusable audio (full check)" in err


def test_good_dir_passes_both_checks(bad_dir, tmp_path, capsys):
    dd = read_data_dir(bad_dir)
    good = tmp_path / "good"
    write_data_dir(dd.subset([u for u in dd.utt_ids() if "good" in u]), good)
    for mode in ("header", "full"):
        assert main(["data", "validate", "--audio", mode, "--nj", "2", str(good)]) == 0
        assert f"audio readable ({mode} check)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a value that is neither check nor the only dir is a usage error
        main(["data", "validate", "--audio", "sometimes", str(good)])


def test_segments_and_pipes(tmp_path):
    """Segments past their recording (beyond Kaldi's 0.5 s tolerance) and failing pipes, per utterance."""
    w = tmp_path / "rec.wav"
    sf.write(w, _speechlike(3.0, 8000, 1), 8000, subtype="PCM_16")
    wavs = {"r1": str(w), "r2": f"cat {w} |", "r3": "false |", "r4": f"cat {tmp_path}/nothing.wav |"}
    segments = {
        "s-r1-a": ("r1", 0.0, 1.5),
        "s-r1-b": ("r1", 1.5, 3.4),  # 0.4 s past the end: truncated, as Kaldi's extract-segments does
        "s-r1-c": ("r1", 2.0, 3.6),  # 0.6 s past: an error
        "s-r2-a": ("r2", 3.1, 3.3),  # starts after the end
        "s-r2-b": ("r2", 0.5, 2.5),
        "s-r3-a": ("r3", 0.0, 1.0),
        "s-r3-b": ("r3", 1.0, 2.0),
        "s-r4-a": ("r4", 0.0, 1.0),
    }
    d = _dir(tmp_path / "data", wavs, segments)
    for mode in ("header", "full"):
        probs = {p.utt_id: p for p in check_audio(d, mode=mode, nj=2, progress=False)}
        assert sorted(probs) == ["s-r1-c", "s-r2-a", "s-r3-a", "s-r3-b", "s-r4-a"], mode
        assert "ends beyond the audio (3.000 s, tolerance 0.5 s)" in probs["s-r1-c"].problem
        assert "at or beyond the end of the audio" in probs["s-r2-a"].problem
        assert probs["s-r3-b"].source == "false |" and "pipe command failed" in probs["s-r3-b"].problem
        assert "pipe command" in probs["s-r4-a"].problem


def test_pipe_streaming_a_wav_without_lengths(tmp_path):
    """A pipe whose WAV header leaves the sizes at 0 (streamed: read to EOF, as Kaldi does) reads like the file;
    before, it read as zero-length audio."""
    from speechssl.audio import audio_info, load_audio

    x = _speechlike(1.0, 8000, 5)
    sf.write(tmp_path / "a.wav", x, 8000, subtype="PCM_16")
    shutil.copy(tmp_path / "a.wav", tmp_path / "s.wav")
    _as_stream(tmp_path / "s.wav")
    pipe = f"cat {tmp_path}/s.wav |"
    assert audio_info(pipe) == audio_info(str(tmp_path / "a.wav"))
    np.testing.assert_array_equal(load_audio(pipe, start=0.25, end=0.75), load_audio(str(tmp_path / "a.wav"), start=0.25, end=0.75))
    d = _dir(tmp_path / "data", {"s-0": pipe})
    assert check_audio(d, mode="full", progress=False) == []


# ------------------------------------------------------------- (b) a user's Kaldi dir through recipes/hubert.sh
TRAIN_OPTS = ("optim.max_steps=2 data.num_buckets=2 data.max_duration=8 data.valid_max_duration=16 valid_every=2 "
              "log_every=1 progress=false")


def _as_stream(path: Path) -> None:
    """Rewrite a PCM WAV as a streaming tool writes it to a pipe: RIFF and data sizes 0 ("read to EOF", Kaldi's
    stream mode of WaveData::Read)."""
    b = bytearray(path.read_bytes())
    assert b[36:40] == b"data"
    b[4:8] = b[40:44] = bytes(4)
    path.write_bytes(bytes(b))


def _recordings_and_segments(out: Path, spk: str, recs: list[tuple[str, int, float, str]], seed: int):
    """Long recordings (id, rate, seconds, how wav.scp reads it: file, pipe, or stream = a pipe whose WAV header
    has no lengths) cut into ~1.5-2.5 s segments with pauses between; 48 kHz recordings are stereo; each
    recording's last segment ends 0.3 s past its end (Kaldi truncates within 0.5 s)."""
    rng = np.random.default_rng(seed)
    wavs, segments = {}, {}
    for rec, sr, seconds, how in recs:
        path = out / f"{rec}.wav"
        wav = _speechlike(seconds, sr, seed + sr)
        if sr == 48000:  # a studio recording: stereo (the loader averages the channels)
            wav = np.stack([wav, 0.8 * np.roll(wav, 7)], axis=1)
        sf.write(path, wav, sr, subtype="PCM_16")
        if how == "stream":
            _as_stream(path)
        rec_id = f"{spk}-{rec}"
        wavs[rec_id] = str(path) if how == "file" else f"cat {path} |"
        t, i = 0.2, 0
        while t + 1.5 < seconds:
            end = min(t + rng.uniform(1.5, 2.5), seconds)
            if seconds - end < 1.0:
                end = seconds + 0.3
            segments[f"{rec_id}-{i:03d}"] = (rec_id, round(t, 3), round(end, 3))
            t, i = end + rng.uniform(0.1, 0.4), i + 1
    return wavs, segments


@pytest.fixture(scope="module")
def user_corpus(tmp_path_factory):
    return make_user_job(tmp_path_factory.mktemp("user"))


def make_user_job(top: Path) -> Path:
    """A job dir as a user would have it: its own data dirs and confs beside copies of recipes/ and tools/."""
    shutil.copytree(ROOT / "recipes", top / "recipes")
    shutil.copytree(ROOT / "tools", top / "tools", ignore=shutil.ignore_patterns("bench"))
    job = top / "job"
    shutil.copytree(ROOT / "egs" / "mini_synth" / "hubert" / "conf", job / "conf")
    audio = top / "audio"
    audio.mkdir()
    sets = {
        # train: an 8 kHz file and a 48 kHz pipe; dev: the other way round, the pipe's WAV streamed without lengths
        "train": [("spkA", [("tel", 8000, 16.0, "file")], 1), ("spkB", [("studio", 48000, 14.0, "pipe")], 2)],
        "dev": [("spkA", [("tel2", 8000, 7.0, "stream")], 3), ("spkB", [("studio2", 48000, 6.0, "file")], 4)],
    }
    for name, speakers in sets.items():
        wavs, segments = {}, {}
        for spk, recs, seed in speakers:
            w, s = _recordings_and_segments(audio, spk, recs, seed)
            wavs.update(w)
            segments.update(s)
        _dir(job / "data" / name, wavs, segments)
    return job


def test_user_kaldi_dir_runs_through_stages_1_to_8(user_corpus):
    job = user_corpus
    dd = read_data_dir(job / "data" / "train")
    assert dd.segments is not None and any(v.endswith("|") for v in dd.wav_scp.values())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", "../recipes/hubert.sh", "--stage", "1", "--stop-stage", "8", "--data", "data", "--nj", "2",
         "--alignments", "none", "--sample-frac", "1", "--iter1-opts", TRAIN_OPTS,
         "--feats1", "mfcc fbank:spk-meanvar"],
        cwd=job, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "audio readable (header check)" in proc.stdout
    for d in ["dump/mfcc/train", "dump/mfcc/dev", "exp/kmeans_mfcc_k100", "dump/labels_iter1_mfcc/train",
              "dump/fbank_cmvn-spk-meanvar/train", "exp/kmeans_fbank_cmvn-spk-meanvar_k100",
              "dump/labels_iter1_fbank_cmvn-spk-meanvar/dev", "exp/hubert_iter1", "dump/labels_iter2/train",
              "dump/labels_iter2/dev"]:
        assert (job / d / ".done").is_file(), d
    # the per-speaker CMVN set: every speaker's frames, in whichever shard, have zero mean and unit variance (the 8 kHz
    # speaker's mel bins above 4 kHz are constant, so they stay 0)
    from speechssl.features.store import FeatureReader

    fb = FeatureReader(job / "dump/fbank_cmvn-spk-meanvar/train")
    assert fb.meta["source"]["options"]["cmvn"] == "spk-meanvar" and fb.meta["nshard"] == 2
    for spk in ("spkA", "spkB"):
        frames = np.concatenate([fb[u] for u in fb.ids if dd.utt2spk[u] == spk]).astype(np.float64)
        np.testing.assert_allclose(frames.mean(0), 0.0, atol=1e-3)
        std = frames.std(0)
        assert np.all((np.abs(std - 1.0) < 1e-3) | (std < 1e-3)) and (np.abs(std - 1.0) < 1e-3).sum() >= 60, std
    cfg = json.loads((job / "exp/hubert_iter1/best/config.json").read_text())
    assert cfg["model"]["num_classes"] == [100, 100]
    for s in ("train", "dev"):
        lines = (job / f"dump/labels_iter2/{s}/text.km").read_text().splitlines()
        assert sorted(ln.split()[0] for ln in lines) == read_data_dir(job / "data" / s).utt_ids()


def test_recipe_stage_1_stops_on_bad_audio(tmp_path):
    """The recipe's validation stage reads the audio headers: a bad file stops it there, named by utterance id."""
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    shutil.copytree(ROOT / "tools", tmp_path / "tools", ignore=shutil.ignore_patterns("bench"))
    job = tmp_path / "job"
    job.mkdir()
    make_bad_dir(job).rename(job / "train")
    shutil.copytree(job / "train", job / "dev")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "../recipes/hubert.sh", "--stage", "1", "--stop-stage", "2", "--data", "."],
                          cwd=job, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for utt in ("spk-missing", "spk-empty", "spk-corrupt"):
        assert f"utt {utt}: " in proc.stderr, proc.stderr
    assert "stage 2" not in proc.stdout
