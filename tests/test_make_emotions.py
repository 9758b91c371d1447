"""Tests of the mini_synth emotion-recognition data (egs/mini_synth/superb/local/make_emotions.py)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
for sub in ("egs/mini_synth/superb/local", "egs/mini_synth/hubert/local"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

import make_corpus  # noqa: E402
import make_emotions  # noqa: E402

from speechssl.data.kaldi import read_data_dir  # noqa: E402

EMOTIONS = {"ang", "hap", "neu", "sad"}


def fake_corpus(path: Path, *, clean: bool) -> Path:
    """The corpus.json fields make_emotions reads (speakers, test_spk, options, seed), as make_corpus writes them."""
    main, held = make_corpus.make_speakers(make_corpus.CorpusConfig.make(seed=0))
    info = {"seed": 0, "options": asdict(make_corpus.CorpusConfig.make(seed=0, tiny=True, clean=clean)),
            "speakers": {s.spk_id: asdict(s) for s in main + held},
            "splits": {"test_spk": {"speakers": [s.spk_id for s in held]}}}
    path.mkdir()
    (path / "corpus.json").write_text(json.dumps(info))
    return path


def run(argv: list[str]) -> int:
    return make_emotions.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The --tiny set twice from the same (noisy, --tiny) corpus: in-process (--nj 1), and with 2 worker processes
    and --tiny left implicit (a tiny corpus gives the tiny set)."""
    root = tmp_path_factory.mktemp("er")
    corpus = fake_corpus(root / "corpus", clean=False)
    assert run(["--hubert-data", corpus, "--out", root / "a", "--tiny", "--nj", 1]) == 0
    assert run(["--hubert-data", corpus, "--out", root / "b", "--nj", 2]) == 0
    return corpus, root / "a", root / "b"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The --tiny set from a clean corpus: the renderer adds no jitter or channel, the styles alone move prosody."""
    root = tmp_path_factory.mktemp("er_clean")
    corpus = fake_corpus(root / "corpus", clean=True)
    assert run(["--hubert-data", corpus, "--out", root / "er", "--tiny", "--nj", 1]) == 0
    return root / "er"


def test_data_dir_valid_with_emotions_and_sessions(made):
    _, out, _ = made
    dd = read_data_dir(out)   # validates (sorted, consistent tables, utt2spk / spk2utt)
    emo, sess = dd.extra["utt2emo"], dd.extra["utt2session"]
    assert set(emo) == set(sess) == set(dd.utt2spk) == set(dd.wav_scp) == set(dd.text) == set(dd.utt2dur)
    assert sorted(emo.values()) == sorted(sorted(EMOTIONS) * 8)   # 8 utterances per emotion
    speakers = defaultdict(set)
    for u, s in sess.items():
        speakers[s].add(dd.utt2spk[u])
        assert u.startswith(dd.utt2spk[u] + "-")
    assert sorted(speakers) == ["Ses01", "Ses02"]
    info = json.loads((made[0] / "corpus.json").read_text())
    for spks in speakers.values():   # one female and one male speaker per session, as IEMOCAP
        assert sorted(info["speakers"][s]["gender"] for s in spks) == ["f", "m"]
    # every sentence of a speaker is spoken in all four styles: the text says nothing about the emotion
    styles = defaultdict(list)
    for u in dd.utt2spk:
        styles[dd.utt2spk[u], dd.text[u]].append(emo[u])
    assert all(sorted(v) == sorted(EMOTIONS) for v in styles.values())
    for u, path in dd.wav_scp.items():
        audio, sr = sf.read(path, dtype="int16")
        assert sr == 16000 and audio.ndim == 1 and abs(len(audio) / sr - dd.utt2dur[u]) < 1e-3
        assert 1.0 < len(audio) / sr < 8.0   # the rendered utterance lasts 1-8 s of audio (a length, not a timing)
    assert json.loads((out / "er.json").read_text())["utterances"] == {e: 8 for e in sorted(EMOTIONS)}


def test_deterministic_whatever_nj(made):
    _, a, b = made
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(names) > 32
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name == Path("wav.scp"):   # absolute paths into each output
            x, y = x.replace(str(a).encode(), b""), y.replace(str(b).encode(), b"")
        assert x == y, name


def test_existing_out_refused(made, capsys, tmp_path):
    corpus, out, _ = made
    before = sorted(p.name for p in out.iterdir())
    assert run(["--hubert-data", corpus, "--out", out, "--tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert run(["--hubert-data", tmp_path, "--out", tmp_path / "x", "--tiny"]) == 1   # no corpus.json
    assert "corpus.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp dir left behind


def _prosody(path: str) -> tuple[float, float, float]:
    """(speech seconds, median log F0, log F0 spread 90-10 %) of a clean rendering (librosa's YIN, voiced frames)."""
    import librosa

    x, sr = sf.read(path, dtype="float32")
    loud = np.flatnonzero(np.abs(x) > 0.01)
    x = x[loud[0]:loud[-1] + 1]
    f0 = librosa.yin(x, fmin=50, fmax=500, sr=sr, frame_length=1024, hop_length=256)
    rms = librosa.feature.rms(y=x, frame_length=1024, hop_length=256, center=True)[0][: len(f0)]
    lf = np.log(f0[rms > 0.25 * rms.max()])
    return len(x) / sr, float(np.median(lf)), float(np.percentile(lf, 90) - np.percentile(lf, 10))


def test_styles_change_prosody_as_designed(clean):
    """Per (speaker, sentence): sad slower and lower than neutral, anger and happiness faster and higher, happiness
    with a wider pitch range than sadness and anger. Measured on the audio (librosa), not taken from the plan."""
    dd = read_data_dir(clean)
    by = defaultdict(dict)
    for u in dd.utt2spk:
        by[dd.utt2spk[u], dd.text[u]][dd.extra["utt2emo"][u]] = _prosody(dd.wav_scp[u])
    assert len(by) == 8
    for key, p in by.items():
        dur = {e: v[0] for e, v in p.items()}
        assert dur["sad"] > dur["neu"] > dur["ang"], (key, dur)
        assert dur["neu"] > dur["hap"], (key, dur)
    f0 = {e: np.mean([p[e][1] - p["neu"][1] for p in by.values()]) for e in EMOTIONS}
    spread = {e: np.mean([p[e][2] - p["neu"][2] for p in by.values()]) for e in EMOTIONS}
    assert f0["sad"] < -0.1 and f0["ang"] > 0.06 and f0["hap"] > 0.1, f0   # log F0: -0.20, +0.12, +0.21 now
    assert spread["hap"] > spread["sad"] + 0.08 and spread["hap"] > spread["ang"] + 0.08, spread   # +0.15, +0.14
    # ... but a speaker's own pitch matters more than the style: mean F0 alone does not separate the classes
    median = defaultdict(list)
    for p in by.values():
        for e, v in p.items():
            median[e].append(v[1])
    assert max(median["sad"]) > min(median["hap"]) and max(median["neu"]) > min(median["ang"])
