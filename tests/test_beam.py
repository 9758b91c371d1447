"""CTC beam search and the ARPA builder (speechssl.asr): LM validity against ARPA back-off semantics computed here,
KenLM reading our files, the LM fixing an acoustically ambiguous spelling, beam search without an LM against greedy
decoding and against brute force, and one-line errors for bad input."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from pathlib import Path

import flashlight.lib.text.decoder  # noqa: F401  the asr extra (make install): a missing one fails, not skips
import pytest
import torch
import torch.nn.functional as F

from speechssl.asr import AsrError, BeamDecoder, build_arpa, build_arpa_from_text, kneser_ney
from speechssl.errors import MissingInputError, UserError
from speechssl.superb.metrics import ctc_greedy_decode

VOCAB = ["<blank>", "|"] + list("ACDEGHNORSTW")
IX = {t: i for i, t in enumerate(VOCAB)}


# ---------------------------------------------------------------- an ARPA reader and its semantics, written here
def parse_arpa(path: Path) -> tuple[dict[int, int], dict[tuple, float], dict[tuple, float]]:
    """Header counts, log10 probabilities and log10 back-off weights of an ARPA file (independent of lm.read_arpa)."""
    header, logp, bow = {}, {}, {}
    section = None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if line == "\\data\\":
            section = "data"
        elif line == "\\end\\":
            section = "end"
        elif line.startswith("\\"):
            section = int(line[1])
        elif section == "data":
            n, c = line.split()[1].split("=")
            header[int(n)] = int(c)
        else:
            f = line.split("\t")
            g = tuple(f[1].split(" "))
            assert len(g) == section, line
            logp[g] = float(f[0])
            if len(f) == 3:
                bow[g] = float(f[2])
    assert section == "end"
    return header, logp, bow


def arpa_prob(logp: dict, bow: dict, w: str, h: tuple) -> float:
    """P(w | h) by the ARPA back-off rule: the stored n-gram if there is one, else bow(h) * P(w | h minus its
    oldest word); <unk> stands for a word outside the vocabulary."""
    if (w,) not in logp:
        w = "<unk>"
    if h + (w,) in logp:
        return 10 ** logp[h + (w,)]
    assert h, f"unigram {w} missing"
    return 10 ** bow.get(h, 0.0) * arpa_prob(logp, bow, w, h[1:])


def random_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "THE CAT SAT ON A MAT DOG RAN TO".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 7))) for _ in range(n)]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_arpa_is_valid_normalised_and_read_by_kenlm(tmp_path, order):
    sents = random_corpus(150)
    path = build_arpa(sents, tmp_path / "lm.arpa", order=order)
    header, logp, bow = parse_arpa(path)
    assert header == {n: sum(len(g) == n for g in logp) for n in range(1, order + 1)}
    assert logp[("<s>",)] == -99 and ("</s>",) in logp and ("<unk>",) in logp
    vocab = [g[0] for g in logp if len(g) == 1 and g != ("<s>",)]
    # every context the file defines (each n-gram below the top order that can be followed), plus unseen ones
    contexts = {g[-(order - 1):] if order > 1 else () for g in logp if len(g) < order and g[-1] != "</s>"}
    contexts |= {(), ("MAT", "ZEBRA", "MAT")[:order - 1], ("<s>",) if order > 1 else ()}
    for h in contexts:
        total = sum(arpa_prob(logp, bow, w, h) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-5), (h, total)
    # each order: an n-gram's context and its lower-order suffix are in the file (KenLM needs both)
    for g in logp:
        if len(g) > 1:
            assert g[:-1] in logp and g[1:] in logp, g
    # KenLM (flashlight's) reads the file and scores sentences as the back-off rule says
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    words = vocab + ["ZEBRA"]
    d = Dictionary(words)
    lm = KenLM(str(path), d)
    for sent in ["THE CAT SAT ON A MAT", "ZEBRA DOG RAN", ""]:
        state, hist, ken, ours = lm.start(False), ("<s>",), 0.0, 0.0
        for w in sent.split():
            state, s = lm.score(state, d.get_index(w))
            ken += s
            ours += math.log10(arpa_prob(logp, bow, w, hist[-(order - 1):] if order > 1 else ()))
            hist += (w if (w,) in logp else "<unk>",)
        state, s = lm.finish(state)
        ken += s
        ours += math.log10(arpa_prob(logp, bow, "</s>", hist[-(order - 1):] if order > 1 else ()))
        assert ken == pytest.approx(ours, abs=1e-4), sent


def test_discount_estimates_cover_the_tiny_corpus_fallbacks():
    m = kneser_ney(random_corpus(150), order=4)
    # unigrams: every word follows more than 4 distinct words (no count-of-counts at all) -> 0.5; bigrams: t1..t4 =
    # 11, 5, 26, 18 make D2 negative -> the single discount; trigrams: 244, 75, 21, 6 -> modified KN; 4-grams: no
    # 4-gram seen 4 times -> the single discount
    assert m.estimate == ["constant", "single", "modified", "single"]
    for (d1, d2, d3), how in zip(m.discounts, m.estimate):
        assert 0 < d1 < 1 and 0 < d2 < 2 and 0 < d3 < 3
        if how != "modified":
            assert d1 == d2 == d3


def test_kneser_ney_matches_hand_computed_values():
    # Bigram model. Unigrams use continuation counts (distinct left neighbours): SAN 1, FRANCISCO 1 (always after
    # SAN, though seen 3 times), THE 1, A 1, MY 1, CAT 3, </s> 2, <unk> 0: total 10, count-of-counts t1=5, t2=1,
    # t3=1, t4=0 -> single discount D = 5/(5+2*1) = 5/7; gamma = D * 7 types / 10 = 1/2; 8 words (no <s>) share it.
    m = kneser_ney(["SAN FRANCISCO"] * 3 + ["THE CAT", "A CAT", "MY CAT"], order=2)
    p1 = m.prob[1]
    assert p1[("CAT",)] == pytest.approx((3 - 5 / 7) / 10 + 0.5 / 8)          # 0.291071
    assert p1[("FRANCISCO",)] == pytest.approx((1 - 5 / 7) / 10 + 0.5 / 8)    # 0.091071: KN, not frequency
    assert p1[("</s>",)] == pytest.approx((2 - 5 / 7) / 10 + 0.5 / 8)
    assert p1[("<unk>",)] == pytest.approx(0.5 / 8)
    # Bigrams use raw counts: 6 seen once, 4 seen three times -> t2 = 0 -> D = 0.5. Context <s>: SAN 3, THE 1, A 1,
    # MY 1 -> total 6, gamma = 4 * 0.5 / 6 = 1/3.
    assert m.backoff[1][("<s>",)] == pytest.approx(1 / 3)
    assert m.prob[2][("<s>", "SAN")] == pytest.approx((3 - 0.5) / 6 + (1 / 3) * p1[("SAN",)])   # 0.447024


def test_kaldi_text_reader(tmp_path):
    text = tmp_path / "text"
    text.write_text("u1 THE CAT\nu2\nu3 A DOG SAT\n")
    out = build_arpa_from_text(text, tmp_path / "lm" / "2gram.arpa", order=2)
    header, logp, _ = parse_arpa(out)
    assert ("<s>", "</s>") in logp                      # u2: an empty transcript is a sentence
    assert {g[0] for g in logp if len(g) == 1} == {"<s>", "</s>", "<unk>", "THE", "CAT", "A", "DOG", "SAT"}
    text.write_text("u1 THE CAT\n\nu3 A DOG\n")
    with pytest.raises(AsrError, match=r"text:2: blank line"):
        build_arpa_from_text(text, tmp_path / "x.arpa")
    text.write_text("u1 THE </s> CAT\n")
    with pytest.raises(AsrError, match=r"text:1: .*'</s>' is reserved"):
        build_arpa_from_text(text, tmp_path / "x.arpa")
    with pytest.raises(MissingInputError, match="nope"):
        build_arpa_from_text(tmp_path / "nope", tmp_path / "x.arpa")
    with pytest.raises(AsrError, match="order must be an integer >= 2"):
        build_arpa(["A B"], tmp_path / "x.arpa", order=1)


# ---------------------------------------------------------------- decoding
def emissions(frames: list[dict[str, float]], vocab=VOCAB) -> torch.Tensor:
    """[T, V] log-probabilities: each frame the given probabilities, the rest 0.02 each, renormalised."""
    ix = {t: i for i, t in enumerate(vocab)}
    rows = []
    for f in frames:
        p = torch.full((len(vocab),), 0.02)
        for t, v in f.items():
            p[ix[t]] = v
        rows.append((p / p.sum()).log())
    return torch.stack(rows)


def greedy(lp: torch.Tensor, vocab=VOCAB) -> list[str]:
    return [vocab[i] for i in ctc_greedy_decode(lp)]


B = "<blank>"
# "TH?|CAT": the vowel frame says A (0.5) a little louder than E (0.4)
AMBIGUOUS = [{"T": .9}, {B: .9}, {"H": .9}, {"A": .5, "E": .4}, {B: .9}, {"|": .9}, {"C": .9}, {"A": .9}, {B: .9},
             {"T": .9}]
LM_TEXT = ["THE CAT SAT", "THE CAT RAN", "THE DOG SAT", "A CAT SAT ON THE DOG", "THA DOG"]


@pytest.fixture(scope="module")
def cat_lm(tmp_path_factory):
    return build_arpa(LM_TEXT, tmp_path_factory.mktemp("lm") / "cat.arpa", order=3)


def test_lm_picks_the_spelling_the_acoustics_miss(cat_lm):
    lp = emissions(AMBIGUOUS)
    assert greedy(lp) == list("THA|CAT")
    assert BeamDecoder(VOCAB).decode(lp) == list("THA|CAT")               # no LM: the acoustics alone
    # THA is an LM word too, so it is the LM, not the lexicon, that rules it out: without its weight THA wins
    assert BeamDecoder(VOCAB, lm=cat_lm, lm_weight=0.0).decode(lp) == list("THA|CAT")
    dec = BeamDecoder(VOCAB, lm=cat_lm, lm_weight=1.0)
    assert dec.mode == "lexicon" and set(dec.lexicon) == {"THE", "CAT", "SAT", "RAN", "DOG", "A", "ON", "THA"}
    best, second = dec.nbest(lp, 2)
    assert best.tokens == list("THE|CAT") and best.words == ["THE", "CAT"]
    assert second.tokens == list("THA|CAT")
    assert best.am_score < second.am_score and best.lm_score > second.lm_score
    assert best.score == pytest.approx(best.am_score + 1.0 * best.lm_score, abs=1e-4)
    # decode_batch: padded batch, each utterance its own length
    pad = torch.cat([lp, torch.zeros(3, len(VOCAB)).log_softmax(-1)])
    short = emissions([{"C": .9}, {"A": .9}, {B: .9}, {"T": .9}])
    batch = torch.stack([pad, torch.cat([short, torch.zeros(9, len(VOCAB)).log_softmax(-1)])])
    assert dec.decode_batch(batch, torch.tensor([10, 4])) == [list("THE|CAT"), list("CAT")]


def test_lexicon_decoding_puts_the_delimiter_between_words(cat_lm):
    # no "|" frame between THE and CAT: the lexicon decoder splits the words, the tokens say where
    lp = emissions([{"T": .9}, {B: .9}, {"H": .9}, {"E": .9}, {"C": .9}, {"A": .9}, {B: .9}, {"T": .9}])
    assert greedy(lp) == list("THECAT")
    h = BeamDecoder(VOCAB, lm=cat_lm, lm_weight=1.0).nbest(lp)[0]
    assert h.words == ["THE", "CAT"] and h.tokens == list("THE|CAT")


def test_lexicon_file_and_skipped_words(tmp_path, cat_lm, caplog):
    lex = tmp_path / "lexicon.txt"
    lex.write_text("THE T H E |\nTHA T H A\nCAT C A T |\n")
    dec = BeamDecoder(VOCAB, lexicon=lex)                        # no LM: closed vocabulary, acoustics decide
    assert dec.lexicon == {"THE": [list("THE")], "THA": [list("THA")], "CAT": [list("CAT")]}
    assert dec.decode(emissions(AMBIGUOUS)) == list("THA|CAT")
    lm = build_arpa(LM_TEXT + ["THE CAFÉ", "the cat"], tmp_path / "mixed.arpa")
    with caplog.at_level("WARNING", logger="speechssl.asr.beam"):
        dec = BeamDecoder(VOCAB, lm=lm)
    assert "CAFÉ" not in dec.lexicon and "the" not in dec.lexicon and "CAT" in dec.lexicon
    assert "3 of 11 LM words" in caplog.text and "CAFÉ" in caplog.text
    lex.write_text("THE T H E\nCAT C A X\n")
    with pytest.raises(AsrError, match=r"lexicon.txt:2: 'CAT' is spelled with 'X'"):
        BeamDecoder(VOCAB, lexicon=lex)


def test_phone_units_with_a_phone_lm(tmp_path):
    # Phones: no word delimiter, lexicon-free; an LM whose words are phones (built over phone sequences).
    phones = ["<blank>", "k", "ae", "eh", "t"]
    lp = emissions([{"k": .9}, {"ae": .45, "eh": .55}, {"t": .9}], phones)
    assert greedy(lp, phones) == ["k", "eh", "t"]
    assert BeamDecoder(phones, word_delim=None).decode(lp) == ["k", "eh", "t"]
    lm = build_arpa(["k ae t"] * 5 + ["t eh"], tmp_path / "phones.arpa", order=3)
    dec = BeamDecoder(phones, word_delim=None, lm=lm, lexicon=None, lm_weight=1.0)
    assert dec.mode == "lexicon-free"
    h = dec.nbest(lp)[0]
    assert h.tokens == ["k", "ae", "t"] and h.words == ["k", "ae", "t"]


def test_beam_without_lm_is_greedy():
    clear = emissions([{"C": .9}, {"C": .9}, {B: .9}, {"A": .9}, {"|": .9}, {"|": .9}, {"T": .9}, {B: .9},
                       {"T": .9}, {"|": .9}])
    assert greedy(clear) == list("CA|T") + ["T", "|"]
    for beam in (1, 50):
        assert BeamDecoder(VOCAB, beam=beam).decode(clear) == greedy(clear)
    # Viterbi scoring (log_add=False): the best path is the frame-wise argmax, whatever the beam
    vocab = ["<blank>", "|", "a", "b", "c"]
    decs = [BeamDecoder(vocab, beam=b) for b in (1, 5, 50)]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lp = (torch.randn(int(torch.randint(1, 30, (1,), generator=g)), 5, generator=g) * 2).log_softmax(-1)
        want = greedy(lp, vocab)
        for d in decs:
            h = d.nbest(lp)[0]
            assert h.tokens == want
            assert h.score == pytest.approx(float(lp.max(dim=1).values.sum()), abs=1e-4)   # the argmax path's
    assert decs[0].decode(torch.zeros(0, 5)) == []


def ctc_log_likelihood(lp: torch.Tensor, labels: list[int]) -> float:
    """log P(labels | lp) summed over all CTC alignments (torch's CTC forward pass)."""
    if not labels:
        return float(lp[:, 0].sum())
    return -float(F.ctc_loss(lp[:, None], torch.tensor([labels]), [lp.shape[0]], [len(labels)], blank=0,
                             reduction="sum"))


def test_prefix_search_finds_the_most_probable_labelling():
    # Two frames of blank 0.55 / A 0.45: greedy says "" (0.3025), but P("A") = 0.45^2 + 2 * 0.45 * 0.55 = 0.6975.
    vocab = ["<blank>", "|", "A"]
    lp = torch.tensor([[0.55, 1e-6, 0.45]] * 2).log()
    assert greedy(lp, vocab) == []
    assert BeamDecoder(vocab).decode(lp) == []                              # Viterbi: the best single path
    h = BeamDecoder(vocab, log_add=True).nbest(lp)[0]
    assert h.tokens == ["A"] and h.score == pytest.approx(math.log(0.6975), abs=1e-4)
    # With a beam that prunes nothing, log_add search is exact: it returns the labelling of highest CTC probability
    # (brute force over all 3^0 + ... + 3^6 labellings of 6 frames) with that probability as its score.
    vocab = ["<blank>", "|", "a", "b"]
    dec = BeamDecoder(vocab, beam=100_000, beam_threshold=1000, log_add=True)
    labellings = [list(s) for n in range(7) for s in itertools.product([1, 2, 3], repeat=n)]
    g = torch.Generator().manual_seed(1)
    n_differ = 0
    for _ in range(8):
        lp = torch.randn(6, 4, generator=g).log_softmax(-1)
        scores = [ctc_log_likelihood(lp, lab) for lab in labellings]
        best = max(range(len(labellings)), key=scores.__getitem__)
        h = dec.nbest(lp)[0]
        assert [vocab.index(t) for t in h.tokens] == labellings[best]
        assert h.score == pytest.approx(scores[best], abs=1e-4)
        n_differ += h.tokens != greedy(lp, vocab)
    assert n_differ > 0          # the example is not one where greedy already is the answer


def test_bad_input_is_a_one_line_error(tmp_path, cat_lm):
    with pytest.raises(AsrError, match="blank index 30 is outside the vocabulary of 14"):
        BeamDecoder(VOCAB, blank=30)
    with pytest.raises(AsrError, match="the blank '<pad>' is not in the vocabulary"):
        BeamDecoder(VOCAB, blank="<pad>")
    with pytest.raises(AsrError, match=r"vocab\[1\] is the word delimiter '\|', not a blank"):
        BeamDecoder(VOCAB, blank=1)
    with pytest.raises(AsrError, match="the word delimiter '#' is not in the vocabulary"):
        BeamDecoder(VOCAB, word_delim="#")
    assert BeamDecoder(VOCAB, blank="<blank>").blank == 0
    # a blank index that points at a letter: the lexicon would spell words with the blank
    with pytest.raises(AsrError, match="spelled with the blank"):
        BeamDecoder(VOCAB, blank=IX["A"], lm=cat_lm)
    missing = tmp_path / "no_such.arpa"
    with pytest.raises(MissingInputError, match="no_such.arpa: no such LM file") as e:
        BeamDecoder(VOCAB, lm=missing)
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)
    with pytest.raises(MissingInputError, match="no_such.arpa: no such LM file"):
        BeamDecoder(VOCAB, lm=missing, lexicon=None)
    bad = tmp_path / "bad.arpa"
    bad.write_text("hello\n")
    with pytest.raises(AsrError, match="bad.arpa: not an ARPA file"):
        BeamDecoder(VOCAB, lm=bad)
    with pytest.raises(AsrError, match=r"bad.arpa: KenLM cannot load this LM: .*hello") as e:
        BeamDecoder(VOCAB, lm=bad, lexicon=None)
    assert "\n" not in str(e.value)
    lower = build_arpa(["the cat"], tmp_path / "lower.arpa")
    with pytest.raises(AsrError, match="none of its 2 words can be spelled .* check case"):
        BeamDecoder(VOCAB, lm=lower)
    with pytest.raises(AsrError, match="needs a word delimiter"):
        BeamDecoder(VOCAB, word_delim=None, lm=cat_lm)
    dec = BeamDecoder(VOCAB)
    with pytest.raises(AsrError, match="15 columns but the vocabulary has 14 tokens"):
        dec.decode(torch.zeros(5, 15))
    with pytest.raises(AsrError, match="NaN"):
        dec.decode(torch.full((5, 14), float("nan")))
    with pytest.raises(AsrError, match=r"lens\[1\] = 9 is outside 0..5"):
        dec.decode_batch(torch.zeros(2, 5, 14), [5, 9])


def test_speechssl_works_without_flashlight():
    code = (
        "import sys; sys.modules['flashlight'] = None\n"
        "import speechssl.asr as asr\n"
        "assert not [m for m in sys.modules if m.startswith('flashlight') and sys.modules[m] is not None]\n"
        "try:\n"
        "    asr.BeamDecoder(['<blank>', '|', 'A'])\n"
        "except asr.MissingDependencyError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1 and "pip install 'speechssl[asr]'" in out and "flashlight-text" in out
