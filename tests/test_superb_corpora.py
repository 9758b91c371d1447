"""Real-corpus preparation for SUPERB on tiny fake trees in each corpus's released layout (no download).

Each test writes a few short WAV/FLAC files with soundfile and the corpus's own list/label files, runs the
preparer, and asserts the produced data dirs exactly (ids, labels, splits, trials); then breaks one file at a
time and checks the one-line error names the file and line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechssl.data.kaldi import read_data_dir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.corpora.fluent_speech_commands import prepare_fluent_speech_commands
from speechssl.superb.corpora.iemocap import fold_utterances, prepare_iemocap
from speechssl.superb.corpora.librispeech import prepare_librispeech, read_lexicon
from speechssl.superb.corpora.speech_commands import prepare_speech_commands
from speechssl.superb.corpora.voxceleb1 import prepare_voxceleb1

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def _audio(path: Path, seconds: float, fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * SR))
    wav = 0.01 * np.random.default_rng(n).standard_normal(n).astype(np.float32)
    sf.write(path, wav, SR, format=fmt, subtype="PCM_16")
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _table(path: Path) -> dict[str, str]:
    """A Kaldi table as {key: rest of line}."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(" ")
        out[key] = rest
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ LibriSpeech

LEXICON = """;;; a CMUdict-style header comment
HELLO  HH AH0 L OW1
HELLO(1)  HH EH0 L OW1
WORLD  W ER1 L D
A  AH0
a  EY1
CAT  K AE1 T  # trailing comment
SAT\tS AE1 T
"""


def _librispeech(root: Path) -> Path:
    corpus = root / "LibriSpeech"
    parts = {
        "train-clean-100": {("103", "1240"): ["HELLO WORLD", "A CAT SAT"], ("1034", "121119"): ["WORLD"]},
        "dev-clean": {("84", "121123"): ["CAT"]},
        "test-clean": {("1089", "134686"): ["HELLO A CAT"]},
    }
    for part, chapters in parts.items():
        for (spk, chap), texts in chapters.items():
            d = corpus / part / spk / chap
            lines = []
            for i, t in enumerate(texts):
                utt = f"{spk}-{chap}-{i:04d}"
                _audio(d / f"{utt}.flac", 0.2 + 0.1 * i, fmt="FLAC")
                lines.append(f"{utt} {t}\n")
            _text(d / f"{spk}-{chap}.trans.txt", "".join(lines))
    _text(root / "lexicon.txt", LEXICON)
    return corpus


def test_read_lexicon(tmp_path):
    lex = read_lexicon(_text(tmp_path / "lex.txt", LEXICON))
    # stress removed, first pronunciation wins (HELLO(1) and lower-case 'a' ignored), comments and tabs handled
    assert lex == {"HELLO": ["HH", "AH", "L", "OW"], "WORLD": ["W", "ER", "L", "D"], "A": ["AH"],
                   "CAT": ["K", "AE", "T"], "SAT": ["S", "AE", "T"]}
    with pytest.raises(UserError, match=r"lexp.txt:2: second field '1.0' is a number.*lexiconp"):
        read_lexicon(_text(tmp_path / "lexp.txt", "A AH0\nB 1.0 B IY1\n"))
    with pytest.raises(UserError, match=r"bad.txt:1: word 'B' has no phones"):
        read_lexicon(_text(tmp_path / "bad.txt", "B\n"))


def test_librispeech(tmp_path):
    corpus = _librispeech(tmp_path)
    out = tmp_path / "out"
    summary = prepare_librispeech(corpus, out, lexicon=tmp_path / "lexicon.txt")
    assert summary["counts"] == {"train": 3, "dev": 1, "test": 1}
    assert json.loads((out / "prepare.json").read_text())["counts"] == summary["counts"]
    train = out / "train"
    assert _table(train / "text") == {"103-1240-0000": "HELLO WORLD", "103-1240-0001": "A CAT SAT",
                                      "1034-121119-0000": "WORLD"}
    assert _table(train / "utt2phones") == {"103-1240-0000": "HH AH L OW W ER L D",
                                            "103-1240-0001": "AH K AE T S AE T", "1034-121119-0000": "W ER L D"}
    assert _table(train / "utt2spk") == {"103-1240-0000": "103", "103-1240-0001": "103", "1034-121119-0000": "1034"}
    assert _table(train / "wav.scp")["103-1240-0001"] == str(corpus / "train-clean-100/103/1240/103-1240-0001.flac")
    assert float(_table(train / "utt2dur")["103-1240-0001"]) == pytest.approx(0.3)
    assert _table(out / "dev" / "utt2phones") == {"84-121123-0000": "K AE T"}
    assert _table(out / "test" / "text") == {"1089-134686-0000": "HELLO A CAT"}
    dd = read_data_dir(train)  # passes every Kaldi check
    assert set(dd.extra) == {"utt2phones"}
    with pytest.raises(UserError, match="already exists"):
        prepare_librispeech(corpus, out)
    # without a lexicon: ASR dirs, no phones
    prepare_librispeech(corpus, tmp_path / "asr", parts={"dev": "dev-clean"})
    assert sorted(p.name for p in (tmp_path / "asr" / "dev").iterdir()) == [
        "reco2dur", "spk2utt", "text", "utt2dur", "utt2spk", "wav.scp"]


def test_librispeech_oov(tmp_path):
    corpus = _librispeech(tmp_path)
    lex = _text(tmp_path / "small.txt", "HELLO HH AH0 L OW1\nWORLD W ER1 L D\nA AH0\n")
    with pytest.raises(UserError) as e:
        prepare_librispeech(corpus, tmp_path / "o1", lexicon=lex)
    trans = corpus / "train-clean-100/103/1240/103-1240.trans.txt"
    assert _one_line(e) == (f"{trans}:2: utterance 103-1240-0001: word 'CAT' is not in the lexicon; add it (e.g. with "
                            "a G2P) or pass --oov skip to drop such utterances")
    assert not (tmp_path / "o1").exists()
    # --oov skip drops 103-1240-0001 (CAT, SAT) from train
    summary = prepare_librispeech(corpus, tmp_path / "o2", lexicon=lex, oov="skip", parts={"train": "train-clean-100"})
    assert summary["counts"] == {"train": 2}
    assert _table(tmp_path / "o2/train/utt2phones") == {"103-1240-0000": "HH AH L OW W ER L D",
                                                         "1034-121119-0000": "W ER L D"}


def test_librispeech_bad_input(tmp_path):
    corpus = _librispeech(tmp_path)
    trans = corpus / "dev-clean/84/121123/84-121123.trans.txt"
    (corpus / "dev-clean/84/121123/84-121123-0000.flac").unlink()
    with pytest.raises(UserError) as e:
        prepare_librispeech(corpus, tmp_path / "o")
    assert _one_line(e).startswith(f"{trans}:1: lists audio {corpus}/dev-clean/84/121123/84-121123-0000.flac, which does not exist")
    _audio(corpus / "dev-clean/84/121123/84-121123-0000.flac", 0.2, fmt="FLAC")
    _text(trans, "84-121123-0000 CAT\n84-999-0001 CAT\n")
    with pytest.raises(UserError, match=rf"{trans}:2: utterance id '84-999-0001' is not 84-121123-NNNN"):
        prepare_librispeech(corpus, tmp_path / "o")
    _text(trans, "84-121123-0000\n")
    with pytest.raises(UserError, match=rf"{trans}:1: utterance 84-121123-0000 has no transcript"):
        prepare_librispeech(corpus, tmp_path / "o")
    with pytest.raises(MissingInputError, match="LibriSpeech part 'train-clean-360' not found"):
        prepare_librispeech(corpus, tmp_path / "o", parts={"train": "train-clean-360"})
    with pytest.raises(MissingInputError, match="nolex.txt: lexicon not found"):
        prepare_librispeech(corpus, tmp_path / "o", lexicon=tmp_path / "nolex.txt")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ Speech Commands

KW = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def _speech_commands(root: Path) -> tuple[Path, Path]:
    corpus = root / "speech_commands_v0.01"
    for w in KW + ("bed",):
        (corpus / w).mkdir(parents=True)
    clips = ["yes/0a7c2a8d_nohash_0.wav", "yes/0a7c2a8d_nohash_1.wav", "yes/aaaa0001_nohash_0.wav",
             "no/cccc0003_nohash_1.wav", "bed/bbbb0002_nohash_0.wav", "bed/0a7c2a8d_nohash_0.wav",
             "stop/dddd0004_nohash_0.wav"]
    for c in clips:
        _audio(corpus / c, 0.5)
    _audio(corpus / "_background_noise_/white_noise.wav", 10.5)  # 10 slices: 0-7 train, 8 dev, 9 test
    _audio(corpus / "_background_noise_/running_tap.wav", 2.3)  # 2 slices: train
    _text(corpus / "_background_noise_/README.md", "noise\n")
    (corpus / "yes/._0a7c2a8d_nohash_0.wav").write_bytes(b"\x00\x05 macOS resource fork, not audio")
    _text(corpus / "validation_list.txt", "yes/aaaa0001_nohash_0.wav\nbed/bbbb0002_nohash_0.wav\n")
    _text(corpus / "testing_list.txt", "no/cccc0003_nohash_1.wav\n")
    _text(corpus / "README.md", "speech commands\n")
    test_set = root / "speech_commands_test_set_v0.01"
    _audio(test_set / "yes/eeee0005_nohash_0.wav", 1.0)
    _audio(test_set / "_unknown_/ffff0006_nohash_0.wav", 1.0)
    _audio(test_set / "_silence_/2.wav", 1.0)
    return corpus, test_set


def test_speech_commands(tmp_path):
    corpus, test_set = _speech_commands(tmp_path)
    out = tmp_path / "out"
    summary = prepare_speech_commands(corpus, out, test_set_dir=test_set)
    assert _table(out / "train/utt2kw") == {
        "0a7c2a8d-bed-0": "_unknown_", "0a7c2a8d-yes-0": "yes", "0a7c2a8d-yes-1": "yes", "dddd0004-stop-0": "stop",
        "running_tap-_silence_-0000": "_silence_", "running_tap-_silence_-0001": "_silence_",
        **{f"white_noise-_silence_-{i:04d}": "_silence_" for i in range(8)}}
    assert _table(out / "dev/utt2kw") == {"aaaa0001-yes-0": "yes", "bbbb0002-bed-0": "_unknown_",
                                          "white_noise-_silence_-0008": "_silence_"}
    assert _table(out / "test/utt2kw") == {"cccc0003-no-1": "no", "white_noise-_silence_-0009": "_silence_"}
    assert _table(out / "test_official/utt2kw") == {"eeee0005-yes-0": "yes", "ffff0006-_unknown_-0": "_unknown_",
                                                    "silence-_silence_-2": "_silence_"}
    seg = _table(out / "train/segments")
    assert seg["running_tap-_silence_-0001"] == "running_tap 1 2"
    assert seg["white_noise-_silence_-0007"] == "white_noise 7 8"
    assert seg["0a7c2a8d-yes-1"] == "0a7c2a8d-yes-1 0 0.5"
    assert _table(out / "dev/segments")["white_noise-_silence_-0008"] == "white_noise 8 9"
    assert _table(out / "train/wav.scp")["white_noise"] == str(corpus / "_background_noise_/white_noise.wav")
    assert _table(out / "train/utt2spk")["0a7c2a8d-bed-0"] == "0a7c2a8d"
    assert not (out / "test_official/segments").exists()
    assert float(_table(out / "test_official/utt2dur")["silence-_silence_-2"]) == pytest.approx(1.0)
    for split in ("train", "dev", "test", "test_official"):
        read_data_dir(out / split)
    assert summary["counts"]["train"]["_silence_"] == 10 and summary["counts"]["train"]["_unknown_"] == 1
    # without the official test set: three splits
    prepare_speech_commands(corpus, tmp_path / "o2")
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["dev", "prepare.json", "test", "train"]


def test_speech_commands_bad_input(tmp_path):
    corpus, test_set = _speech_commands(tmp_path)
    val = corpus / "validation_list.txt"
    _text(val, "yes/aaaa0001_nohash_0.wav\nyes/zzzz9999_nohash_0.wav\n")
    with pytest.raises(UserError) as e:
        prepare_speech_commands(corpus, tmp_path / "o")
    assert _one_line(e).startswith(f"{val}:2: lists audio {corpus}/yes/zzzz9999_nohash_0.wav, which does not exist")
    _text(val, "yes/aaaa0001_nohash_0.wav\nyes aaaa0001_nohash_0.wav\n")
    with pytest.raises(UserError, match=rf"{val}:2: expected '<word>/<speaker>_nohash_<n>.wav'"):
        prepare_speech_commands(corpus, tmp_path / "o")
    _text(val, "no/cccc0003_nohash_1.wav\n")
    with pytest.raises(UserError, match=rf"testing_list.txt:1: no/cccc0003_nohash_1.wav is also in the validation list \({val}:1\)"):
        prepare_speech_commands(corpus, tmp_path / "o")
    _text(val, "yes/aaaa0001_nohash_0.wav\n")
    _audio(corpus / "go/badname.wav", 0.3)
    with pytest.raises(UserError, match=r"go/badname.wav: clip name 'badname.wav' is not <speaker>_nohash_<n>.wav"):
        prepare_speech_commands(corpus, tmp_path / "o")
    (corpus / "go/badname.wav").unlink()
    (test_set / "maybe").mkdir()
    with pytest.raises(UserError, match=r"maybe: not one of the 12 classes"):
        prepare_speech_commands(corpus, tmp_path / "o", test_set_dir=test_set)
    (corpus / "testing_list.txt").unlink()
    with pytest.raises(MissingInputError, match=r"testing_list.txt: Speech Commands split list testing_list.txt not found"):
        prepare_speech_commands(corpus, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ VoxCeleb1

IDEN = """1 id10001/1zcIwhmdeo4/00001.wav
2 id10001/1zcIwhmdeo4/00002.wav
3 id10001/7gWzIy6yIIk/00001.wav
1 id10002/C7k7C-PDvAA/00001.wav
1 id10002/C7k7C-PDvAA/00002.wav
3 id10002/xTV-jFAUKcw/00001.wav
1 id10270/5r0dWxy17C8/00001.wav
2 id10270/5r0dWxy17C8/00002.wav
1 id10271/1gtz-CUIygI/00001.wav
3 id10271/1gtz-CUIygI/00002.wav
"""
TRIALS = """1 id10270/5r0dWxy17C8/00001.wav id10270/5r0dWxy17C8/00002.wav
0 id10270/5r0dWxy17C8/00001.wav id10271/1gtz-CUIygI/00002.wav
0 id10271/1gtz-CUIygI/00001.wav id10270/5r0dWxy17C8/00002.wav
"""


def _voxceleb1(root: Path) -> Path:
    corpus = root / "VoxCeleb1"
    for line in IDEN.splitlines():
        rel = line.split()[1]
        sub = "vox1_test_wav" if rel.startswith(("id10270", "id10271")) else "vox1_dev_wav"
        _audio(corpus / sub / "wav" / rel, 0.3)
    _text(corpus / "iden_split.txt", IDEN)
    _text(corpus / "veri_test2.txt", TRIALS)
    return corpus


def test_voxceleb1(tmp_path):
    corpus = _voxceleb1(tmp_path)
    out = tmp_path / "out"
    summary = prepare_voxceleb1(corpus, out)
    assert _table(out / "sid/train/utt2spk") == {
        "id10001-1zcIwhmdeo4-00001": "id10001", "id10002-C7k7C-PDvAA-00001": "id10002",
        "id10002-C7k7C-PDvAA-00002": "id10002", "id10270-5r0dWxy17C8-00001": "id10270",
        "id10271-1gtz-CUIygI-00001": "id10271"}
    assert _table(out / "sid/dev/utt2spk") == {"id10001-1zcIwhmdeo4-00002": "id10001",
                                               "id10270-5r0dWxy17C8-00002": "id10270"}
    assert list(_table(out / "sid/test/utt2spk")) == ["id10001-7gWzIy6yIIk-00001", "id10002-xTV-jFAUKcw-00001",
                                                      "id10271-1gtz-CUIygI-00002"]
    assert _table(out / "sid/test/wav.scp")["id10271-1gtz-CUIygI-00002"] == str(
        corpus / "vox1_test_wav/wav/id10271/1gtz-CUIygI/00002.wav")
    # ASV: train on the speakers no trial names, test on the trial utterances
    assert set(_table(out / "asv/train/utt2spk").values()) == {"id10001", "id10002"}
    assert len(_table(out / "asv/train/utt2spk")) == 6
    assert list(_table(out / "asv/test/utt2spk")) == ["id10270-5r0dWxy17C8-00001", "id10270-5r0dWxy17C8-00002",
                                                      "id10271-1gtz-CUIygI-00001", "id10271-1gtz-CUIygI-00002"]
    assert (out / "asv/test/trials").read_text() == (
        "id10270-5r0dWxy17C8-00001 id10270-5r0dWxy17C8-00002 target\n"
        "id10270-5r0dWxy17C8-00001 id10271-1gtz-CUIygI-00002 nontarget\n"
        "id10271-1gtz-CUIygI-00001 id10270-5r0dWxy17C8-00002 nontarget\n")
    assert summary["counts"]["asv"] == {"train": 6, "test": 4, "trials": 3, "target_trials": 1,
                                        "train_speakers": 2, "test_speakers": 2}
    assert float(_table(out / "sid/dev/utt2dur")["id10001-1zcIwhmdeo4-00002"]) == pytest.approx(0.3)
    for d in ("sid/train", "sid/dev", "sid/test", "asv/train", "asv/test"):
        read_data_dir(out / d)
    # SID only, without durations and without a trial list
    (corpus / "veri_test2.txt").unlink()
    prepare_voxceleb1(corpus, tmp_path / "sid_only", asv=False, with_durations=False)
    assert sorted(p.name for p in (tmp_path / "sid_only").iterdir()) == ["prepare.json", "sid"]
    assert not (tmp_path / "sid_only/sid/train/utt2dur").exists()


def test_voxceleb1_bad_input(tmp_path):
    corpus = _voxceleb1(tmp_path)
    iden, trials = corpus / "iden_split.txt", corpus / "veri_test2.txt"
    _text(trials, TRIALS + "1 id10270/5r0dWxy17C8/00001.wav id10271/1gtz-CUIygI/00001.wav\n")
    with pytest.raises(UserError, match=rf"{trials}:4: label 1 but the speakers are id10270 and id10271"):
        prepare_voxceleb1(corpus, tmp_path / "o")
    _text(trials, "2 id10270/5r0dWxy17C8/00001.wav id10270/5r0dWxy17C8/00002.wav\n")
    with pytest.raises(UserError, match=rf"{trials}:1: expected '<1\|0> <enroll wav> <test wav>'"):
        prepare_voxceleb1(corpus, tmp_path / "o")
    trials.unlink()
    with pytest.raises(UserError, match="neither veri_test2.txt nor veri_test.txt found"):
        prepare_voxceleb1(corpus, tmp_path / "o")
    _text(iden, IDEN + "4 id10001/1zcIwhmdeo4/00003.wav\n")
    with pytest.raises(UserError, match=rf"{iden}:11: expected '<1\|2\|3> idNNNNN/<video>/<n>.wav'"):
        prepare_voxceleb1(corpus, tmp_path / "o", asv=False)
    _text(iden, IDEN + "1 id10001/1zcIwhmdeo4/00009.wav\n")
    with pytest.raises(UserError) as e:
        prepare_voxceleb1(corpus, tmp_path / "o", asv=False)
    assert _one_line(e).startswith(f"{iden}:11: lists audio {corpus}/vox1_dev_wav/wav/id10001/1zcIwhmdeo4/00009.wav, which does not exist")
    _text(iden, IDEN + "1 id19999/abc/00001.wav\n")
    with pytest.raises(UserError, match=rf"{iden}:11: lists audio of speaker id19999, whose folder is in none of the wav roots"):
        prepare_voxceleb1(corpus, tmp_path / "o", asv=False)
    iden.unlink()
    with pytest.raises(MissingInputError, match="iden_split.txt: VoxCeleb1 iden_split.txt not found"):
        prepare_voxceleb1(corpus, tmp_path / "o", asv=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()  # an existing output is refused before the corpus is read
    with pytest.raises(UserError, match=r"o: already exists; remove it or choose another --out"):
        prepare_voxceleb1(corpus, tmp_path / "o", asv=False)


# ------------------------------------------------------------------------------------------------ IEMOCAP

_EVAL_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def _turn(start: float, turn: str, emo: str) -> str:
    return (f"[{start:.4f} - {start + 1.5:.4f}]\t{turn}\t{emo}\t[2.5000, 2.5000, 2.5000]\n"
            f"C-E2:\tNeutral;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n\n")


IEMOCAP_TURNS = {
    1: ("Ses01F_impro01", [("Ses01F_impro01_F000", "neu"), ("Ses01F_impro01_M000", "exc"), ("Ses01F_impro01_F001", "fru")]),
    2: ("Ses02M_script01_1", [("Ses02M_script01_1_M000", "ang"), ("Ses02M_script01_1_F000", "xxx")]),
    3: ("Ses03F_impro02", [("Ses03F_impro02_F000", "sad")]),
    4: ("Ses04M_impro03", [("Ses04M_impro03_M000", "hap")]),
    5: ("Ses05F_script02_2", [("Ses05F_script02_2_F010", "sur"), ("Ses05F_script02_2_M011", "neu")]),
}


def _iemocap(root: Path) -> Path:
    corpus = root / "IEMOCAP_full_release"
    for k, (dialog, turns) in IEMOCAP_TURNS.items():
        s = corpus / f"Session{k}"
        _text(s / "dialog/EmoEvaluation" / f"{dialog}.txt",
              _EVAL_HEADER + "".join(_turn(3.0 * i, t, e) for i, (t, e) in enumerate(turns)))
        (s / "dialog/EmoEvaluation" / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
        (s / "dialog/EmoEvaluation/Categorical").mkdir()
        for t, _ in turns:
            _audio(s / "sentences/wav" / dialog / f"{t}.wav", 0.4)
    return corpus


def test_iemocap(tmp_path):
    corpus = _iemocap(tmp_path)
    out = tmp_path / "out"
    summary = prepare_iemocap(corpus, out)
    emo = _table(out / "all/utt2emo")
    assert emo == {"Ses01F-Ses01F_impro01_F000": "neu", "Ses01M-Ses01F_impro01_M000": "hap",
                   "Ses02M-Ses02M_script01_1_M000": "ang", "Ses03F-Ses03F_impro02_F000": "sad",
                   "Ses04M-Ses04M_impro03_M000": "hap", "Ses05M-Ses05F_script02_2_M011": "neu"}
    sessions = _table(out / "all/utt2session")
    assert sessions == {u: u[4] for u in emo}
    assert _table(out / "all/utt2spk") == {u: u.split("-")[0] for u in emo}
    assert _table(out / "all/wav.scp")["Ses01M-Ses01F_impro01_M000"] == str(
        corpus / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav")
    assert summary["counts"]["kept"] == {"neu": 2, "hap": 2, "ang": 1, "sad": 1}
    assert summary["counts"]["source_labels"] == {"ang": 1, "exc": 1, "fru": 1, "hap": 1, "neu": 2, "sad": 1,
                                                  "sur": 1, "xxx": 1}
    read_data_dir(out / "all")
    train, test = fold_utterances(sessions, 1)
    assert test == ["Ses01F-Ses01F_impro01_F000", "Ses01M-Ses01F_impro01_M000"]
    assert len(train) == 4 and not set(train) & set(test)
    with pytest.raises(UserError, match="fold must be one of"):
        fold_utterances(sessions, 6)


def test_iemocap_bad_input(tmp_path):
    corpus = _iemocap(tmp_path)
    ev = corpus / "Session3/dialog/EmoEvaluation/Ses03F_impro02.txt"
    good = ev.read_text()
    _text(ev, _EVAL_HEADER + "[3.0 - 4.5]\tSes03F_impro02_F000\n")
    with pytest.raises(UserError, match=rf"{ev}:3: expected '\[<start> - <end>\]<TAB><turn><TAB><emotion><TAB>\[v, a, d\]'"):
        prepare_iemocap(corpus, tmp_path / "o")
    _text(ev, good.replace("\tsad\t", "\tbored\t"))
    with pytest.raises(UserError, match=rf"{ev}:3: emotion 'bored' is not an IEMOCAP label"):
        prepare_iemocap(corpus, tmp_path / "o")
    _text(ev, good.replace("Ses03F_impro02_F000", "Ses03F_impro09_F000"))
    with pytest.raises(UserError, match=rf"{ev}:3: turn 'Ses03F_impro09_F000' does not belong to dialog Ses03F_impro02"):
        prepare_iemocap(corpus, tmp_path / "o")
    _text(ev, good)
    wav = corpus / "Session3/sentences/wav/Ses03F_impro02/Ses03F_impro02_F000.wav"
    wav.unlink()
    with pytest.raises(UserError) as e:
        prepare_iemocap(corpus, tmp_path / "o")
    assert _one_line(e).startswith(f"{ev}:3: lists audio {wav}, which does not exist")
    _audio(wav, 0.4)
    import shutil

    shutil.rmtree(corpus / "Session5/dialog")
    with pytest.raises(MissingInputError, match="Session5/dialog/EmoEvaluation: IEMOCAP Session5 EmoEvaluation folder not found"):
        prepare_iemocap(corpus, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ Fluent Speech Commands

FSC_HEADER = ",path,speakerId,transcription,action,object,location\n"
FSC_ROWS = {
    "train": [("wavs/speakers/2BqVo8kVB2Skwgyb/0a3129c0-4474-11e9-a9a5-5dbec3b8816a.wav", "2BqVo8kVB2Skwgyb",
               "Change language", "change language", "none", "none"),
              ("wavs/speakers/2BqVo8kVB2Skwgyb/0ee42a80-4474-11e9-a9a5-5dbec3b8816a.wav", "2BqVo8kVB2Skwgyb",
               "Turn on the lights, please", "activate", "lights", "none")],
    "valid": [("wavs/speakers/7B4XmNppyrCK/a1b2.wav", "7B4XmNppyrCK", "Bring me my shoes", "bring", "shoes", "none")],
    "test": [("wavs/speakers/4aGjX3AG5xcxeL7a/c3d4.wav", "4aGjX3AG5xcxeL7a", "Heat up the kitchen",
              "increase", "heat", "kitchen")],
}


def _fsc_csv(rows) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for i, r in enumerate(rows):
        w.writerow((i,) + tuple(r))
    return FSC_HEADER + buf.getvalue()


def _fsc(root: Path) -> Path:
    corpus = root / "fluent_speech_commands_dataset"
    for split, rows in FSC_ROWS.items():
        _text(corpus / "data" / f"{split}_data.csv", _fsc_csv(rows))
        for r in rows:
            _audio(corpus / r[0], 0.3)
    return corpus


def test_fluent_speech_commands(tmp_path):
    corpus = _fsc(tmp_path)
    out = tmp_path / "out"
    summary = prepare_fluent_speech_commands(corpus, out)
    u1 = "2BqVo8kVB2Skwgyb-0a3129c0-4474-11e9-a9a5-5dbec3b8816a"
    u2 = "2BqVo8kVB2Skwgyb-0ee42a80-4474-11e9-a9a5-5dbec3b8816a"
    assert _table(out / "train/utt2intent") == {u1: "change_language none none", u2: "activate lights none"}
    assert _table(out / "train/text") == {u1: "Change language", u2: "Turn on the lights, please"}
    assert _table(out / "train/utt2spk") == {u1: "2BqVo8kVB2Skwgyb", u2: "2BqVo8kVB2Skwgyb"}
    assert _table(out / "train/wav.scp")[u1] == str(corpus / FSC_ROWS["train"][0][0])
    assert _table(out / "dev/utt2intent") == {"7B4XmNppyrCK-a1b2": "bring shoes none"}
    assert _table(out / "test/utt2intent") == {"4aGjX3AG5xcxeL7a-c3d4": "increase heat kitchen"}
    assert summary["counts"]["train"] == {"utterances": 2, "speakers": 1, "intents": 2}
    for s in ("train", "dev", "test"):
        read_data_dir(out / s)


def test_fluent_speech_commands_bad_input(tmp_path):
    corpus = _fsc(tmp_path)
    csv_path = corpus / "data/valid_data.csv"
    _text(csv_path, _fsc_csv(FSC_ROWS["valid"] + [("wavs/speakers/x/missing.wav", "x", "Go", "activate", "music", "none")]))
    with pytest.raises(UserError) as e:
        prepare_fluent_speech_commands(corpus, tmp_path / "o")
    assert _one_line(e).startswith(f"{csv_path}:3: lists audio {corpus}/wavs/speakers/x/missing.wav, which does not exist")
    _text(csv_path, _fsc_csv([FSC_ROWS["valid"][0][:4] + ("", "none")]))
    with pytest.raises(UserError, match=rf"{csv_path}:2: empty 'object'"):
        prepare_fluent_speech_commands(corpus, tmp_path / "o")
    _text(csv_path, ",path,speakerId,transcription,action,location\n0,a.wav,x,Go,activate,none\n")
    with pytest.raises(UserError, match=rf"{csv_path}:1: header lacks column 'object'"):
        prepare_fluent_speech_commands(corpus, tmp_path / "o")
    csv_path.unlink()
    with pytest.raises(MissingInputError, match="valid_data.csv: FSC dev list not found"):
        prepare_fluent_speech_commands(corpus, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ the shell entry


def test_prepare_sh_runs_and_prints_one_line_errors(tmp_path):
    corpus = _fsc(tmp_path)
    script = REPO / "egs/superb/fluent_speech_commands/prepare.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([str(script), "--corpus", str(corpus), "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out/test/utt2intent").is_file()
    (corpus / "data/test_data.csv").write_text(FSC_HEADER + "0,wavs/a.wav,spk,Go,activate\n")
    bad = subprocess.run([str(script), "--corpus", str(corpus), "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"speechssl superb prepare fluent_speech_commands: error: {corpus}/data/test_data.csv:2: 5 fields, the header has 7"]
