"""Tests of the built-in mini_synth corpus generator (egs/mini_synth/hubert/local)."""

from __future__ import annotations

import gzip
import json
import sys
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

LOCAL = Path(__file__).resolve().parents[1] / "egs" / "mini_synth" / "hubert" / "local"
sys.path.insert(0, str(LOCAL))

import augment  # noqa: E402
import espeak  # noqa: E402
import grammar  # noqa: E402
import make_corpus  # noqa: E402
import phoneset  # noqa: E402
import render  # noqa: E402

from speechssl.data.kaldi import read_data_dir, validate_data_dir  # noqa: E402

SPLITS = ("train", "dev", "test", "test_spk")


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same --tiny corpus generated twice: in-process (nj=1) and with 2 worker processes."""
    root = tmp_path_factory.mktemp("mini_synth")
    cfg = make_corpus.CorpusConfig.make(seed=3, tiny=True)
    make_corpus.make_corpus(root / "a", cfg, nj=1)
    make_corpus.make_corpus(root / "b", cfg, nj=2)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def corpus(corpora):
    return corpora[0]


def read_ctm(path: Path) -> dict[str, list[tuple[float, float, str]]]:
    out: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        utt, ch, start, dur, phone = line.split(" ")
        assert ch == "1" and len(start.split(".")[1]) >= 3 and len(dur.split(".")[1]) >= 3
        out[utt].append((float(start), float(dur), phone))
    return out


def wav_seconds(path: str) -> float:
    with wave.open(path) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (16000, 2, 1)
        return w.getnframes() / 16000


def check_segments(segments: list[tuple[float, float, str]], audio_seconds: float, phones: set[str]) -> None:
    """Contiguous from 0, every phone in the set, last end within 30 ms of the audio length."""
    t = 0.0
    for start, dur, phone in segments:
        assert abs(start - t) < 1e-6, f"gap/overlap at {start} (expected {t})"
        assert dur > 0 and phone in phones
        t = start + dur
    assert abs(t - audio_seconds) <= 0.030


# --------------------------------------------------------------------------------------------- corpus files

def test_layout_and_kaldi_dirs(corpus):
    summary = json.loads((corpus / "corpus.json").read_text())
    phones = [line.split()[0] for line in (corpus / "phones.txt").read_text().splitlines()]
    assert phones == list(phoneset.PHONES) and phones[0] == "sil" and len(phones) == 40
    for split in SPLITS:
        d = corpus / split
        validate_data_dir(d)
        dd = read_data_dir(d)
        for name in ("utt2kw", "utt2intent", "utt2type"):
            assert set(dd.extra[name]) == set(dd.utt2spk)
        for m in ("recordings.jsonl.gz", "supervisions.jsonl.gz", "cuts.jsonl.gz"):
            assert (d / m).stat().st_size > 0
        assert summary["splits"][split]["utterances"] == len(dd.utt2spk)
        for utt, spk in dd.utt2spk.items():
            assert utt.startswith(spk + "-")
            assert abs(wav_seconds(dd.wav_scp[utt]) - dd.utt2dur[utt]) < 1e-6  # utt2dur has 6 decimals
        assert set(dd.extra["utt2type"].values()) == {"read", "kw", "intent"}, split
    assert not list(corpus.parent.glob(".*tmp*")), "temporary directory left behind"


def test_deterministic_across_runs_and_nj(corpora):
    a, b = corpora
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".wav":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        elif rel.name.endswith(".gz"):  # gzip headers carry names/times; compare the content
            assert gzip.decompress((a / rel).read_bytes()).replace(str(a).encode(), b"ROOT") == \
                gzip.decompress((b / rel).read_bytes()).replace(str(b).encode(), b"ROOT"), rel
        elif rel.name != "corpus.json":  # corpus.json records wall times and nj
            assert (a / rel).read_text().replace(str(a), "ROOT") == (b / rel).read_text().replace(str(b), "ROOT"), rel
    ja, jb = (json.loads((d / "corpus.json").read_text()) for d in (a, b))
    ja.pop("generation_seconds"), jb.pop("generation_seconds")
    assert ja == jb


def test_ctm_covers_audio_and_is_contiguous(corpus):
    phones = set(phoneset.PHONES)
    for split in SPLITS:
        dd = read_data_dir(corpus / split)
        ctm = read_ctm(corpus / split / "phones.ctm")
        assert set(ctm) == set(dd.utt2spk)
        for utt, segs in ctm.items():
            check_segments(segs, dd.utt2dur[utt], phones)
            assert segs[0][2] == "sil" and segs[-1][2] == "sil"  # leading/trailing silence labelled
            if dd.extra["utt2kw"][utt] == "_silence_":
                assert [p for _, _, p in segs] == ["sil"]
            else:
                assert any(p != "sil" for _, _, p in segs)


def test_labels(corpus):
    for split in SPLITS:
        dd = read_data_dir(corpus / split)
        for utt, kind in dd.extra["utt2type"].items():
            assert f"-{kind}-" in utt
            kw, intent = dd.extra["utt2kw"][utt], dd.extra["utt2intent"][utt].split()
            if kind == "kw":
                assert kw in grammar.KW_LABELS
                if kw in grammar.KEYWORDS:
                    assert dd.text[utt] == kw.upper()
                elif kw == "_silence_":
                    assert dd.text[utt] == ""
                else:
                    assert dd.text[utt].lower() in grammar.UNKNOWN_WORDS
            else:
                assert kw == "-"
            if kind == "intent":
                assert tuple(intent) in grammar.INTENTS
                assert intent[0] in grammar.INTENT_ACTIONS and intent[1] in grammar.INTENT_OBJECTS
                assert intent[2] in grammar.INTENT_LOCATIONS
            else:
                assert intent == ["-", "-", "-"]


def test_splits_sentences_and_speakers(corpus):
    dds = {s: read_data_dir(corpus / s) for s in SPLITS}

    def read_texts(split):
        dd = dds[split]
        return {dd.text[u] for u, k in dd.extra["utt2type"].items() if k == "read"}

    train = read_texts("train")
    for split in ("dev", "test", "test_spk"):
        assert read_texts(split) and not (read_texts(split) & train)
    spk = {s: set(dds[s].utt2spk.values()) for s in SPLITS}
    assert spk["dev"] <= spk["train"] and spk["test"] <= spk["train"]
    assert spk["test_spk"] and not (spk["test_spk"] & spk["train"])


def test_refuses_to_overwrite_finished_corpus(corpus, capsys):
    before = (corpus / "corpus.json").read_bytes()
    assert make_corpus.main(["--out", str(corpus), "--tiny"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (corpus / "corpus.json").read_bytes() == before


def test_bad_options_and_foreign_dirs_refused(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert make_corpus.main(["--out", str(foreign), "--tiny"]) == 2
    assert "not a mini_synth corpus" in capsys.readouterr().err and (foreign / "notes.txt").exists()
    assert make_corpus.main(["--out", str(tmp_path / "x"), "--hours", "0"]) == 2
    assert make_corpus.main(["--out", str(tmp_path / "x"), "--nj", "0"]) == 2
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------- rendering

SPEAKER = render.Speaker("spk01", "en-us+m3", "m", 45, 50, 170, 0)


def test_clean_alignment_agrees_with_waveform():
    """In clean speech, espeak's pauses (sil) are near-silent and vowels are loud."""
    prompt = grammar.Prompt("read", "Yes, the old lamp is on, and the music is off.", "")
    out = render.render(prompt, SPEAKER, render.RenderOptions(clean=True), np.random.default_rng(0))
    x = out.audio.astype(np.float64) / 32768
    check_segments([(s / 16000, (e - s) / 16000, p) for s, e, p in out.segments], len(x) / 16000,
                   set(phoneset.PHONES))
    vowels = {"aa", "ae", "ah", "ao", "aw", "ay", "eh", "er", "ey", "ih", "iy", "ow", "oy", "uh", "uw"}
    # skip the first 50 ms of a pause: espeak labels pause starts up to ~50 ms after a plosive/fricative tail
    sil_e = [np.mean(x[s + 800:e] ** 2) for s, e, p in out.segments if p == "sil" and e - s > 1600]
    vow_e = [np.mean(x[s:e] ** 2) for s, e, p in out.segments if p in vowels]
    assert len(sil_e) >= 3 and len(vow_e) >= 8  # leading, two commas, trailing
    assert max(sil_e) < 1e-3 * np.median(vow_e)
    # the first phone starts the speech: the lead is silent, the 30 ms after the first start are not
    lead_end = out.segments[0][1]
    assert np.mean(x[:lead_end] ** 2) < 1e-4 * np.mean(x[lead_end:lead_end + 480] ** 2)


def test_augmented_alignment_covers_audio():
    opts = render.RenderOptions()
    for i, text in enumerate(["Where is the dusty bicycle?", "turn on the lights in the kitchen", "go"]):
        prompt = grammar.Prompt("kw" if text == "go" else "read", text, "")
        out = render.render(prompt, SPEAKER, opts, np.random.default_rng(i), babble_bank=None)
        check_segments([(s / 16000, (e - s) / 16000, p) for s, e, p in out.segments], len(out.audio) / 16000,
                       set(phoneset.PHONES))
        if prompt.kind == "kw":
            assert len(out.audio) == 16000


def test_speed_perturbation_scales_alignment():
    prompt = grammar.Prompt("read", "Henry had to move the heavy wooden wardrobe before dinner.", "")
    spans = {}
    for f in (1.0, 1.1):
        opts = render.RenderOptions(speed=(f, f), p_reverb=0.0, p_noise=0.0, p_telephone=0.0, p_lowpass=0.0)
        out = render.render(prompt, SPEAKER, opts, np.random.default_rng(7))
        speech = [(s, e) for s, e, p in out.segments if p != "sil"]
        durs = np.array([e - s for s, e, p in out.segments[1:-1]], dtype=float)
        spans[f] = (speech[-1][1] - speech[0][0], durs)
    assert spans[1.0][0] / spans[1.1][0] == pytest.approx(1.1, abs=0.002)
    d10, d11 = spans[1.0][1], spans[1.1][1]
    assert len(d10) == len(d11)
    np.testing.assert_allclose(d10 / 1.1, d11, atol=2.0)  # every segment, up to two rounded boundaries


# --------------------------------------------------------------------------------------------- pieces

def test_espeak_binding_events_and_errors():
    import ctypes

    assert ctypes.sizeof(espeak._Event) == 40
    syn = espeak.synthesize("stop", espeak.Voice("en-us"))
    assert syn.sample_rate == 22050 and syn.audio.dtype == np.int16
    starts = [s for s, _ in syn.phones]
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < len(syn.audio)
    assert [phoneset.to_phone(m, "en-us") for _, m in syn.phones if not m.startswith("_")] == ["s", "t", "aa", "p"]
    with pytest.raises(espeak.EspeakError, match="rejected voice"):
        espeak.synthesize("hello", espeak.Voice("xx-nonexistent"))
    # the same text gives the same samples whatever was spoken before (fresh library state per call)
    again = [espeak.synthesize(t, espeak.Voice(v)) for t, v in (("go", "en-029+f2"), ("stop", "en-us"))][1]
    assert np.array_equal(again.audio, syn.audio) and again.phones == syn.phones
    assert espeak._mnemonic(b"'aI@3xyz") == "'aI@3xyz" and espeak._mnemonic(b"t#\0\0\0\0\0\0") == "t#"


def test_phone_map():
    assert phoneset.to_phone("'aI", "en") == "ay" and phoneset.to_phone(",O@", "en") == "ao"
    assert phoneset.to_phone("_:", "en") == "sil" and phoneset.to_phone("t#", "en-us") == "t"
    with pytest.raises(phoneset.UnknownPhoneError, match=r"'Q9'.*voice 'en-xx\+m1'"):
        phoneset.to_phone("Q9", "en-xx+m1")
    assert set(phoneset.load_phone_map().values()) == set(phoneset.PHONES)


def test_grammar():
    rng = np.random.default_rng(0)
    sents = [grammar.read_sentence(rng) for _ in range(400)]
    assert len({s.words for s in sents}) > 390
    assert all(s.words == grammar.transcript(s.speak) and s.words.isupper() for s in sents)
    vocab = {w for s in sents for w in s.words.split()}
    assert len(vocab) > 400
    assert grammar.number_words(342) == "three hundred and forty two"
    assert grammar.number_words(21000) == "twenty one thousand"
    pools = {grammar.text_pool(s.words) for s in sents}
    assert pools == {"train", "dev", "test"}
    kws = {grammar.keyword_prompt(rng).label for _ in range(500)}
    assert kws == set(grammar.KW_LABELS)
    assert not set(grammar.UNKNOWN_WORDS) & set(grammar.KEYWORDS)


def test_augment_pieces():
    rng = np.random.default_rng(0)
    rir = augment.synthetic_rir(rng, rt60=0.5, drr_db=3.0)
    assert rir[0] == 1.0 and len(rir) == 8000
    x = np.zeros(4000, np.float32)
    x[100] = 1.0
    y = augment.reverberate(x, rir)
    assert len(y) == len(x) and np.argmax(np.abs(y)) == 100  # direct path keeps its place
    for colour, slope in (("white", 0.0), ("pink", -1.0), ("brown", -2.0)):
        n = augment.coloured_noise(rng, 64000, colour)
        f = np.fft.rfftfreq(len(n), 1 / 16000)
        p = np.abs(np.fft.rfft(n)) ** 2
        band = (f > 100) & (f < 4000)
        fit = np.polyfit(np.log(f[band]), np.log(p[band] + 1e-20), 1)[0]
        assert abs(fit - slope) < 0.25, (colour, fit)
    s = rng.standard_normal(16000).astype(np.float32)
    noisy = augment.add_noise(s, augment.coloured_noise(rng, 16000, "white"), snr_db=10.0)
    assert 10 * np.log10(np.mean(s**2) / np.mean((noisy - s) ** 2)) == pytest.approx(10.0, abs=1e-3)
