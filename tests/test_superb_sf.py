"""SUPERB slot filling: the slot-tag format, s3prl's slot metrics and parsing, the CTC head on a tiny batch, the
Audio SNIPS preparer on a fake tree in its released layout, and the mini_synth data (make_slots.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.data.kaldi import DataDir, read_data_dir, write_data_dir
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.config import default_config
from speechssl.superb.corpora.common import CorpusError
from speechssl.superb.corpora.snips import prepare_snips
from speechssl.superb.slots import (SlotFilling, SlotFormatError, format_slots, parse_slots, parse_tokens, slot_tokens,
                                    slot_type_f1, slot_value_cer)
from speechssl.superb.tasks import Example, Split, make_task

ROOT = Path(__file__).resolve().parents[1]
for sub in ("egs/mini_synth/superb/local", "egs/mini_synth/hubert/local"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

LINE = "PLAY <artist> THE BEATLES </artist> IN THE <room> KITCHEN </room>"


# ------------------------------------------------------------------------------------------------ format
def test_parse_format_tokens_round_trip():
    spans = parse_slots("  PLAY <artist>  THE BEATLES </artist> IN THE <room> KITCHEN </room> ")
    assert spans == [(None, "PLAY"), ("artist", "THE BEATLES"), (None, "IN THE"), ("room", "KITCHEN")]
    assert format_slots(spans) == LINE
    assert parse_slots(format_slots(spans)) == spans
    toks = slot_tokens(spans)   # s3prl CharacterTextSlotEncoder order: B- before the characters, E- after
    assert " ".join(toks) == ("P L A Y | B-artist T H E | B E A T L E S E-artist | I N | T H E | "
                              "B-room K I T C H E N E-room")
    assert parse_tokens(toks) == ("PLAY THE BEATLES IN THE KITCHEN", [("artist", "THE BEATLES"), ("room", "KITCHEN")])
    assert parse_slots("<city> PARIS </city>") == [("city", "PARIS")]
    assert parse_tokens(slot_tokens(parse_slots("NO SLOTS HERE"))) == ("NO SLOTS HERE", [])


@pytest.mark.parametrize("line, what", [
    ("PLAY <artist> ABBA", "never closed"),
    ("PLAY ABBA </artist>", "without an open slot"),
    ("PLAY <artist> ABBA </room>", "does not close the open slot <artist>"),
    ("<a> X <b> Y </b> </a>", "do not nest"),
    ("PLAY <artist> </artist>", "is empty"),
    ("", "no words"),
])
def test_parse_errors(line, what):
    with pytest.raises(SlotFormatError, match=what):
        parse_slots(line)


def _data_dir(path: Path, slots: dict[str, str]) -> Path:
    utts = sorted(slots)
    write_data_dir(DataDir(wav_scp={u: f"/nonexistent/{u}.wav" for u in utts},
                           utt2spk={u: u.split("-")[0] for u in utts}, extra={"utt2slots": slots}), path)
    return path


def test_labels_and_bad_line_names_file_and_line(tmp_path):
    task = make_task(default_config("sf"))
    assert isinstance(task, SlotFilling) and task.metric == "slot_f1" and task.higher_is_better
    good = _data_dir(tmp_path / "good", {"s1-a": LINE, "s1-b": "-", "s2-c": "HELLO"})
    labels = task.labels(read_data_dir(good), good, "train")
    assert labels == {"s1-a": parse_slots(LINE), "s2-c": [(None, "HELLO")]}   # "-": not in the task
    bad = _data_dir(tmp_path / "bad", {"s1-a": LINE, "s1-b": "OK", "s2-c": "PLAY <artist> ABBA </room>"})
    with pytest.raises(SlotFormatError, match=rf"^{re.escape(str(bad / 'utt2slots'))}:3: closing tag </room>"):
        task.labels(read_data_dir(bad), bad, "dev")
    plain = tmp_path / "plain"
    write_data_dir(DataDir(wav_scp={"s1-a": "/x.wav"}, utt2spk={"s1-a": "s1"}), plain)
    with pytest.raises(MissingInputError, match="utt2slots: no such file"):
        task.labels(read_data_dir(plain), plain, "train")
    cfg = default_config("sf")
    cfg.head = dataclasses.replace(cfg.head, units="bpe")
    with pytest.raises(UserError, match="units"):
        make_task(cfg)


# ------------------------------------------------------------------------------------------------ metrics
def test_slot_metrics_by_hand():
    refs = [[("city", "PARIS"), ("date", "TODAY")], [("artist", "ABBA")], [], [("room", "KITCHEN")],
            [("time", "AB"), ("time", "CD")]]
    hyps = [[("city", "PARIS")], [], [], [("room", "GARAGE"), ("room", "KITCHN"), ("city", "X")], [("time", "CD")]]
    # per-utterance type F1: {city,date} vs {city}: P 1, R 1/2 -> 2/3; {artist} vs {} -> 0; {} vs {} -> 1;
    # {room} vs {room, city}: P 1/2, R 1 -> 2/3; {time} vs {time} -> 1.  Mean (2/3 + 0 + 1 + 2/3 + 1) / 5 = 10/15
    assert slot_type_f1(refs, hyps) == pytest.approx(10 / 15)
    # values: PARIS/PARIS 0, TODAY/"" 5, ABBA/"" 4, KITCHEN/best(KITCHN: 1, GARAGE: 6) 1, AB/CD 2, CD/CD 0
    # = 12 edits over 5 + 5 + 4 + 7 + 2 + 2 = 25 reference characters (spaces count: none here)
    assert slot_value_cer(refs, hyps) == pytest.approx(12 / 25)
    assert slot_value_cer([[("city", "NEW YORK")]], [[("city", "NEWYORK")]]) == pytest.approx(1 / 8)
    with pytest.raises(UserError, match="no slot"):
        slot_value_cer([[]], [[("city", "X")]])


def _s3prl_string(toks: list[str]) -> str:
    """s3prl CharacterTextSlotEncoder.decode: B- tags as 'B-t ', E- tags as ' E-t', '|' as a blank."""
    return "".join(f"{t} " if t.startswith("B-") else f" {t}" if t.startswith("E-") else " " if t == "|" else t
                   for t in toks)


def _s3prl_slots(s: str) -> list[tuple[str, str]]:
    """s3prl downstream/ctc/metric.py ``parse`` (hypothesis side): regex pairing, tags cleaned from the values."""
    s = re.sub(r" +", " ", s)
    out = []
    for t, v in re.compile(r"B\-(\S+) (.+?) E\-\1").findall(s):
        out.append((t, re.sub(r" E\-(\S+)", "", re.sub(r"B\-(\S+) ", "", v))))
    return out


def test_parse_tokens_matches_s3prl_regex():
    cases = ["B-city P A R I S E-city",                       # well formed
             "P L A Y | B-artist A B B A",                    # no closing tag
             "B-city P A R I S E-room | I N",                 # wrong closing type
             "B-city P A | B-room K I T E-room | X E-city",    # nested opening: the outer pair wins
             "B-room A E-room | B-room B E-room",            # two slots of one type
             "A | E-room | B-room | C E-room"]                # stray closing tag
    for c in cases:
        toks = c.split()
        assert parse_tokens(toks)[1] == _s3prl_slots(_s3prl_string(toks)), c
    # an empty pair: s3prl's lazy regex runs on to the next closing tag and keeps the inner one in the value
    toks = "B-room | | E-room | B-room A E-room".split()
    assert parse_tokens(toks)[1] == [("room", "A")] and _s3prl_slots(_s3prl_string(toks)) == [("room", "E-room A")]
    rng = np.random.default_rng(0)
    for _ in range(300):   # random hypotheses: tags on word edges, dropped / swapped at random
        toks: list[str] = []
        for w in range(int(rng.integers(1, 6))):
            toks += ["|"] if w else []
            if rng.random() < 0.4:
                toks.append(f"B-{rng.choice(['city', 'room', 'date'])}")
            toks += list(rng.choice(["A", "B", "C"], size=int(rng.integers(1, 4))))
            if rng.random() < 0.4:
                toks.append(f"E-{rng.choice(['city', 'room', 'date'])}")
        assert parse_tokens(toks)[1] == _s3prl_slots(_s3prl_string(toks)), toks


# ------------------------------------------------------------------------------------------------ head
def test_head_overfits_two_examples_and_decodes_their_slots():
    torch.manual_seed(0)
    cfg = default_config("sf")
    cfg.head = dataclasses.replace(cfg.head, proj_dim=32, hidden=32, num_layers=1, dropout=0.0, downsample=0)
    task = make_task(cfg)
    task.frame_rate = 100.0
    targets = [parse_slots("GO <city> PARIS </city>"), parse_slots("<room> BED </room> ON")]
    split = Split("train", Path("."), DataDir(wav_scp={}, utt2spk={}),
                  [Example(f"u{i}", 1.0, t) for i, t in enumerate(targets)])
    task.fit(split)
    assert {"B-city", "E-city", "B-room", "E-room", "|"} <= set(task.vocab) and task.vocab[0] == "<blank>"
    head = task.build_head(8)
    assert head.downsample == 2           # 0: concatenate frames down to 50 Hz
    x, lens = torch.randn(2, 80, 8), torch.tensor([80, 64])
    x[1, 64:] = 0
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        loss = task.loss(head, x, lens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        out = task.evaluate(head, [(split.examples, x, lens)], split)
        assert [parse_tokens(t) for t in task.decode(head, x, lens)] == [("GO PARIS", [("city", "PARIS")]),
                                                                         ("BED ON", [("room", "BED")])]
    assert out == {"slot_f1": 1.0, "slot_cer": 0.0, "wer": 0.0, "cer": 0.0}
    task.frame_rate = 50.0
    assert task.build_head(8).downsample == 1


# ------------------------------------------------------------------------------------------------ SNIPS
def _wav(path: Path, seconds: float = 0.25) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(16000 * seconds), dtype=np.int16), 16000, subtype="PCM_16")


def fake_snips(root: Path, extra_line: str = "") -> Path:
    lines = []
    for spk, split in (("Ivy", "train"), ("Aditi", "valid"), ("Brian", "test"), ("Amy", "train")):
        lines += [f"{spk}-snips-{split}-0 BOS PLAY THE BEATLES , IN THE KITCHEN EOS\t"
                  "O O artist artist O O O room PlayMusic",
                  f"{spk}-snips-{split}-1 BOS ROCK & ROLL TODAY EOS\tO genre genre genre timeRange PlayMusic"]
    (root / "SNIPS").mkdir(parents=True)
    (root / "SNIPS" / "all.iob.snips.txt").write_text("\n".join(lines) + "\n" + extra_line)
    for spk, split in (("Ivy", "train"), ("Aditi", "valid"), ("Brian", "test"), ("Amy", "train")):
        for n in (0, 1):
            _wav(root / "SNIPS" / split / f"{spk}-snips-{split}-{n}.wav")
    _wav(root / "SNIPS" / "train" / "Ivy-snips-train-9.wav")   # no transcript line: skipped, counted
    return root / "SNIPS"


def test_prepare_snips(tmp_path):
    corpus = fake_snips(tmp_path)
    summary = prepare_snips(corpus, tmp_path / "out")
    # Amy is a dev voice in SUPERB's split: her train/ wavs are not used
    assert summary["counts"]["train"] == {"utterances": 2, "speakers": 1, "unlabelled_wavs": 1}
    dd = read_data_dir(tmp_path / "out" / "train")
    assert dd.utt_ids() == ["Ivy-snips-train-0", "Ivy-snips-train-1"]
    assert dd.text["Ivy-snips-train-0"] == "PLAY THE BEATLES IN THE KITCHEN"
    assert dd.extra["utt2slots"] == {
        "Ivy-snips-train-0": "PLAY <artist> THE BEATLES </artist> IN THE <room> KITCHEN </room>",
        "Ivy-snips-train-1": "<genre> ROCK AND ROLL </genre> <timeRange> TODAY </timeRange>"}
    assert dd.utt2dur["Ivy-snips-train-0"] == pytest.approx(0.25)
    dev = read_data_dir(tmp_path / "out" / "dev")
    assert dev.utt_ids() == ["Aditi-snips-valid-0", "Aditi-snips-valid-1"] and set(dev.utt2spk.values()) == {"Aditi"}
    assert read_data_dir(tmp_path / "out" / "test").utt_ids() == ["Brian-snips-test-0", "Brian-snips-test-1"]
    labels = make_task(default_config("sf")).labels(dd, tmp_path / "out" / "train", "train")
    assert parse_tokens(slot_tokens(labels["Ivy-snips-train-1"]))[1] == [("genre", "ROCK AND ROLL"),
                                                                         ("timeRange", "TODAY")]
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["corpus"] == "snips"


@pytest.mark.parametrize("line, what", [
    ("Ivy-snips-train-0 BOS A B EOS O O O X", "one tab"),
    ("Ivy-snips-train-0 BOS A B EOS\tO O X", "2 words but 3 tag fields"),
    ("Ivy-snips-train-0 A B\tO O O X", "BOS words EOS"),
])
def test_prepare_snips_bad_lines(tmp_path, line, what):
    corpus = fake_snips(tmp_path)
    text = (corpus / "all.iob.snips.txt").read_text().splitlines()
    text[0] = line
    (corpus / "all.iob.snips.txt").write_text("\n".join(text) + "\n")
    with pytest.raises(CorpusError, match=rf"all\.iob\.snips\.txt:1: .*{what}"):
        prepare_snips(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_snips_duplicate_and_missing(tmp_path):
    corpus = fake_snips(tmp_path, extra_line="Ivy-snips-train-0 BOS X EOS\tO O Y\n")
    with pytest.raises(CorpusError, match=r"all\.iob\.snips\.txt:9: utterance Ivy-snips-train-0 listed twice \(also at "
                                          r"line 1\)"):
        prepare_snips(corpus, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match=r"empty/all\.iob\.snips\.txt: SNIPS transcripts"):
        prepare_snips(tmp_path / "empty", tmp_path / "out")
    corpus = fake_snips(tmp_path / "novalid")
    for wav in (corpus / "valid").iterdir():
        wav.unlink()
    (corpus / "valid").rmdir()
    with pytest.raises(MissingInputError, match=r"SNIPS/valid: SNIPS valid audio not found"):
        prepare_snips(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ mini_synth
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    import make_corpus
    import make_slots

    root = tmp_path_factory.mktemp("sf")
    main, held = make_corpus.make_speakers(make_corpus.CorpusConfig.make(seed=0))
    info = {"options": {"clean": False}, "speakers": {s.spk_id: dataclasses.asdict(s) for s in main + held},
            "splits": {"train": {"speakers": [s.spk_id for s in main[:4]]}}}
    (root / "corpus").mkdir()
    (root / "corpus" / "corpus.json").write_text(json.dumps(info))
    args = ["--corpus", str(root / "corpus"), "--train", "10", "--dev", "4", "--test", "6"]
    assert make_slots.main(args + ["--out", str(root / "a"), "--nj", "1"]) == 0
    assert make_slots.main(args + ["--out", str(root / "b"), "--nj", "2"]) == 0
    assert make_slots.main(args + ["--out", str(root / "a")]) == 1      # an existing output is never touched
    return make_slots, root / "a", root / "b"


def test_make_slots_output(made):
    make_slots, a, b = made
    values: dict[str, set] = {}
    for split, n in (("train", 10), ("dev", 4), ("test", 6)):
        dd = read_data_dir(a / split)
        assert len(dd) == n and set(dd.utt2spk.values()) <= {"spk01", "spk02", "spk03", "spk04"}
        for u, line in dd.extra["utt2slots"].items():
            spans = parse_slots(line)                               # tags balanced, known types
            assert {t for t, _ in spans if t} <= set(make_slots.VALUES)
            assert dd.text[u] == " ".join(w for t, w in spans)      # text = the slot line without its tags
            slots = {t: w.lower() for t, w in spans if t}
            assert all(v in make_slots.VALUES[t] for t, v in slots.items())
            if len(slots) >= 2:                                      # combination pools: disjoint across splits
                assert make_slots.pool(slots) == split
            values.setdefault(split, set()).add(tuple(sorted(slots.items())))
            audio, sr = sf.read(dd.wav_scp[u], dtype="int16")
            assert sr == 16000 and dd.utt2dur[u] == pytest.approx(len(audio) / 16000) and 0.5 < dd.utt2dur[u] < 5
        assert (b / split / "utt2slots").read_text() == (a / split / "utt2slots").read_text()
    multi = [v for v in values["test"] if len(v) >= 2]
    assert not set(multi) & values["train"]
    for wav in sorted((a / "wav" / "test").iterdir()):                # --nj does not change a byte
        assert wav.read_bytes() == (b / "wav" / "test" / wav.name).read_bytes()
    assert json.loads((a / "slots.json").read_text())["splits"]["test"]["utterances"] == 6
