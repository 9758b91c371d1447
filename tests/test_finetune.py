"""CTC fine-tuning (issue 26): the tri-stage schedule against fairseq's formula, the freeze schedule (which parameters
get gradients at which update; adapters), greedy CTC decoding, the CTC loss (sentence average, against the forward
recursion on each utterance alone) and error counts against independent references, tokenizer round trips,
bit-identical resume, 2-process DDP == 1 process, one-line errors of the CLI, and tiny end-to-end runs through
``speechssl finetune`` + ``speechssl decode`` (full and adapters, the base's SHA-1 checked).

Tiny everything: the pretraining tests' corpus (12 utterances of 1.2-2.6 s) with transcripts over five letters,
the 2-layer hidden-32 model of ``test_train.tiny_cfg`` saved as a pretraining checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speechssl.cli import main
from speechssl.config import load_config, to_yaml
from speechssl.errors import UserError
from speechssl.models.checkpoint import save_model
from speechssl.models.hubert import HubertPretrainModel
from speechssl.train import state as st
from speechssl.train.finetune import FinetuneConfig, FinetuneTrainer, error_counts, finetune, greedy_tokens
from speechssl.train.schedule import tri_stage_lr
from speechssl.train.tokens import BLANK, Tokenizer, build_tokenizer
from speechssl.upstream import checkpoint_sha1
from test_train import _free_port, make_corpus, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["ab", "ba", "cab", "dab", "bad", "ace", "dead"]  # letters a-e: the char vocabulary is | a b c d e


# ------------------------------------------------------------------------------------------------ fixtures
def add_transcripts(data: Path, seed: int, words=WORDS) -> dict[str, str]:
    """``text`` (2-3 words of ``words``) and ``utt2phones`` (one phone per letter, ``sil`` / ``sp`` around words)
    for every utterance of a data dir made by ``make_corpus``."""
    rng = np.random.default_rng(seed)
    utts = [line.split()[0] for line in (data / "utt2spk").read_text().splitlines()]
    text = {u: " ".join(rng.choice(words, int(rng.integers(2, 4)))) for u in utts}
    (data / "text").write_text("".join(f"{u} {text[u]}\n" for u in utts))
    phones = {u: "sil " + " sp ".join(" ".join(w) for w in t.split()) + " sil" for u, t in text.items()}
    (data / "utt2phones").write_text("".join(f"{u} {phones[u]}\n" for u in utts))
    return text


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    """(train dir, dev dir, pretraining checkpoint of the tiny config)."""
    root = tmp_path_factory.mktemp("asr")
    train, labels = make_corpus(root / "train", n_utts=12, seed=0)
    dev, _ = make_corpus(root / "dev", n_utts=4, seed=1)
    add_transcripts(train, 0)
    add_transcripts(dev, 1)
    model_cfg = tiny_cfg(root / "unused", train, labels).model
    torch.manual_seed(0)
    base = root / "pretrained"
    save_model(HubertPretrainModel(model_cfg), model_cfg, base)
    return train, dev, base


def tiny_ft(exp: Path, train: Path, dev: Path | None, init: Path | str, *overrides: str, units: str = "char") -> list[str]:
    """``speechssl finetune`` arguments of a tiny CPU run (every update a few utterances, short masks)."""
    args = ["finetune", "--init", str(init), "--train", str(train), "--units", units, "--out", str(exp)]
    if dev is not None:
        args += ["--dev", str(dev)]
    return args + [
        "data.max_duration=4.0", "data.num_buckets=2", "data.num_workers=0", "optim.lr=1e-3", "optim.warmup_steps=2",
        "optim.hold_steps=1", "optim.decay_steps=4", "optim.max_steps=4", "optim.bf16=false", "ckpt.every_steps=100",
        "log_every=1", "valid_every=100", "progress=false", "device=cpu", "seed=3", "ctc.freeze_updates=2",
        "ctc.mask_time_length=4", "ctc.mask_channel_length=4", *overrides]


def ft_config(*args: str) -> FinetuneConfig:
    """The FinetuneConfig the CLI builds from ``tiny_ft`` arguments."""
    from speechssl.cli import build_parser

    ns = build_parser().parse_args(list(args))
    opts = {"init": ns.init, "data.train": ns.train, "data.dev": ns.dev, "units": ns.units, "exp_dir": ns.out,
            "tune.mode": ns.tune}
    return load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in opts.items() if v is not None] + ns.overrides)


def params_of(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


def error_line(err: str, verb: str) -> str:
    """The one ``speechssl VERB: error: ...`` line of stderr (log lines may precede it)."""
    lines = [line for line in err.splitlines() if line.startswith(f"speechssl {verb}:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ 1. schedules
def fairseq_tri_stage(peak, warmup, hold, decay, init_scale, final_scale):
    """fairseq ``TriStageLRSchedule`` (``fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py``), rewritten: the lr
    is set to ``init_lr`` at construction and ``step_update(num_updates)`` after each update, so the k-th update
    (1-based) runs at the value for ``num_updates = k - 1``."""
    init_lr, final_lr = init_scale * peak, final_scale * peak
    warmup_rate = (peak - init_lr) / warmup if warmup else 0.0
    decay_factor = -math.log(final_scale) / decay

    def lr_of_num_updates(n):
        if n < warmup:
            return init_lr + warmup_rate * n
        if n < warmup + hold:
            return peak
        if n <= warmup + hold + decay:
            return peak * math.exp(-decay_factor * (n - warmup - hold))
        return final_lr

    return lambda update: lr_of_num_updates(update - 1)


@pytest.mark.parametrize("warmup, hold, decay", [(8, 3, 10), (0, 0, 5), (5, 0, 1)])
def test_tri_stage_matches_fairseq(warmup, hold, decay):
    peak, fs = 2e-3, 0.05
    kw = dict(peak_lr=peak, warmup_steps=warmup, hold_steps=hold, decay_steps=decay, init_lr_scale=0.01,
              final_lr_scale=fs)
    ref = fairseq_tri_stage(peak, warmup, hold, decay, 0.01, fs)
    end = warmup + hold + decay
    got = [tri_stage_lr(u, **kw) for u in range(1, end + 6)]
    assert got == pytest.approx([ref(u) for u in range(1, end + 6)], rel=1e-12, abs=0)
    # the boundaries, spelled out
    if warmup:
        assert tri_stage_lr(1, **kw) == pytest.approx(0.01 * peak)  # the first update is not wasted at 0
        assert tri_stage_lr(warmup, **kw) < peak
    assert tri_stage_lr(warmup + 1, **kw) == pytest.approx(peak)  # warm-up done
    assert tri_stage_lr(warmup + hold + 1, **kw) == pytest.approx(peak)  # last of the hold / first of the decay
    assert tri_stage_lr(warmup + hold + 2, **kw) == pytest.approx(peak * fs ** (1 / decay))
    assert tri_stage_lr(end + 1, **kw) == pytest.approx(fs * peak)  # the decay ends at final_lr_scale * peak
    assert all(tri_stage_lr(u, **kw) == fs * peak for u in range(end + 2, end + 50))  # then constant
    with pytest.raises(ValueError):
        tri_stage_lr(0, **kw)


class GradRecorder:
    """Per optimizer step: names of the parameters with a gradient, and of those the step changed."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.named = list(model.named_parameters())
        self.with_grad: list[set[str]] = []
        self.changed: list[set[str]] = []
        self._before: dict[str, torch.Tensor] = {}
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, opt, args, kwargs):
        self.with_grad.append({n for n, p in self.named if p.grad is not None})
        self._before = {n: p.detach().clone() for n, p in self.named}

    def _post(self, opt, args, kwargs):
        self.changed.append({n for n, p in self.named if not torch.equal(p.detach(), self._before[n])})


def test_freeze_schedule_head_first_then_transformer_never_the_frontend(asr, tmp_path):
    train, dev, base = asr
    cfg = ft_config(*tiny_ft(tmp_path / "fz", train, None, base, "encoder.layerdrop=0.0"))
    assert cfg.ctc.freeze_updates == 2 and cfg.encoder.feature_grad_mult == 0.0
    trainer = FinetuneTrainer(cfg)
    rec = GradRecorder(trainer.model, trainer.optimizer)
    assert trainer.train()["step"] == 4
    trainer.close()
    names = [n for n, _ in trainer.model.named_parameters()]
    head = {n for n in names if n.startswith("lm_head.")}
    frontend = {n for n in names if n.startswith("hubert.feature_extractor.")}
    transformer = {n for n in names if n.startswith("hubert.encoder.")}
    assert head and frontend and transformer
    assert len(rec.with_grad) == 4
    for u in (0, 1):  # updates 1-2: the head alone
        assert rec.with_grad[u] == head, f"update {u + 1}: {sorted(rec.with_grad[u] - head)[:5]}"
        assert rec.changed[u] == head
    for u in (2, 3):  # updates 3-4: everything but the frozen frontend (LayerDrop off: every layer is used)
        assert transformer <= rec.with_grad[u] and head <= rec.with_grad[u], f"update {u + 1}"
        assert not rec.with_grad[u] & frontend
        assert transformer <= rec.changed[u] and not rec.changed[u] & frontend
        assert set(names) - frontend == rec.with_grad[u]  # projection and mask embedding train too
    # the frontend still holds the pretrained weights
    pre = params_of(base)
    sd = trainer.model.state_dict()
    for n in frontend:
        assert torch.equal(sd[n], pre[n])


def test_adapters_train_only_adapters_and_head(asr, tmp_path):
    train, dev, base = asr
    fractions = {}
    for dim in (64, 4):
        cfg = ft_config(*tiny_ft(tmp_path / f"ad{dim}", train, None, base, "ctc.freeze_updates=0",
                                 "encoder.layerdrop=0.0", "optim.max_steps=2", f"tune.adapter_dim={dim}",
                                 "--tune", "adapters"))
        trainer = FinetuneTrainer(cfg)
        rec = GradRecorder(trainer.model, trainer.optimizer)
        trainer.train()
        trainer.close()
        named = dict(trainer.model.named_parameters())
        tuned = {n for n in named if n.startswith("lm_head.") or ".adapter." in n}
        assert len({n for n in tuned if ".adapter." in n}) == 2 * 6  # 2 layers x (layer norm, down, up) x (w, b)
        assert {n for n, p in named.items() if p.requires_grad} == tuned
        for u in range(2):
            assert rec.with_grad[u] == tuned
        # adapters start as the identity (up_proj zero): update 1 moves the head and the up projections
        assert rec.changed[1] == tuned
        n_tuned = sum(named[n].numel() for n in tuned)
        # independent count: per layer LN 2h + down h*d+d + up d*h+h; head h*V+V
        h, v = 32, len(trainer.tokenizer.vocab)
        assert n_tuned == 2 * (2 * h + h * dim + dim + dim * h + h) + h * v + v
        fractions[dim] = n_tuned / sum(p.numel() for p in named.values())
    print(f"adapters trained fraction of the tiny config: dim 64 {fractions[64]:.1%}, dim 4 {fractions[4]:.1%}")
    assert fractions[4] < 0.10 < fractions[64]  # dim 64 on hidden 32 is not small; dim 4 is


# ------------------------------------------------------------------------------------------------ 2. greedy decoding
def test_greedy_tokens_hand_made():
    vocab = [BLANK, "|", "a", "b", "c"]
    idx = {t: i for i, t in enumerate(vocab)}
    frames = ["a", "a", BLANK, "a", "|", "b", "b", BLANK, BLANK, "c", "b", "b"]
    logits = torch.full((2, len(frames), len(vocab)), -1.0)
    for t, tok in enumerate(frames):
        logits[0, t, idx[tok]] = 2.0 + 0.1 * t  # argmax of each frame, whatever the scale
    logits[1] = logits[0].flip(0)  # second row: reversed, only its first 5 frames valid
    lens = torch.tensor([10, 5])  # row 0 ignores its last two frames ("b b")
    out = greedy_tokens(logits, lens, vocab)
    assert out[0] == ["a", "a", "|", "b", "c"]  # a a _ a | b b _ _ c -> a a | b c
    assert out[1] == ["b", "c"]  # b b c _ _ -> b c
    tok = Tokenizer("char", vocab)
    assert tok.detok(out[0]) == "aa bc"
    # another blank index
    assert greedy_tokens(logits[:1], lens[:1], vocab, blank=idx["b"]) == [["a", BLANK, "a", "|", BLANK, "c"]]


def ctc_nll(lp: np.ndarray, target: list[int], blank: int = 0) -> float:
    """-log p(target | frames) by the CTC forward recursion (Graves et al. 2006) over ``lp`` [T, V] log-probs."""
    ext = [blank]
    for t in target:
        ext += [t, blank]
    alpha = np.full(len(ext), -np.inf)
    alpha[0] = lp[0, blank]
    alpha[1] = lp[0, ext[1]] if len(ext) > 1 else -np.inf
    for t in range(1, len(lp)):
        prev = alpha.copy()
        for s in range(len(ext)):
            v = prev[s]
            if s >= 1:
                v = np.logaddexp(v, prev[s - 1])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                v = np.logaddexp(v, prev[s - 2])
            alpha[s] = v + lp[t, ext[s]]
    return float(-np.logaddexp(alpha[-1], alpha[-2]) if len(ext) > 1 else -alpha[-1])


def test_ctc_loss_is_the_sentence_average_of_each_utterance_alone(asr):
    from speechssl.models.ctc import CTCHeadConfig
    from speechssl.train.finetune import EncoderOverrides, TuneConfig, build_ctc_model

    train, dev, base = asr
    model, _ = build_ctc_model(str(base), EncoderOverrides(), CTCHeadConfig(vocab_size=6), TuneConfig())
    model.eval()  # no masks, no dropout: the loss of a batch is a function of its utterances
    gen = torch.Generator().manual_seed(0)
    wavs = [0.1 * torch.randn(n, generator=gen) for n in (16000, 24000, 8000, 1600)]
    targets = [[1, 2, 2, 3], [4, 5, 1], [3], list(range(1, 6)) * 4]  # the last: 20 tokens in ~4 frames
    lens = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lens.max()))
    padded = torch.full((len(wavs), 20), -100)
    for i, (w, t) in enumerate(zip(wavs, targets)):
        batch[i, : len(w)] = w
        padded[i, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        out = model(batch, lens, [padded])
        alone = []
        for w, t in zip(wavs, targets):
            logits, frames = model.logits(w[None])
            lp = logits[0, : int(frames[0])].double().log_softmax(-1).numpy()
            alone.append(ctc_nll(lp, t) if len(lp) >= len(t) else 0.0)  # zero_infinity: impossible -> 0
    assert int(frames[0]) < 20 and alone[-1] == 0.0 and out["logs"]["zero_inf"] == 1
    assert out["sample_size"] == 4  # sentence_avg: the trainer weighs utterances, not frames or tokens
    assert float(out["loss"]) == pytest.approx(sum(alone) / 4, rel=1e-4)
    assert out["logs"]["ntokens"] == sum(map(len, targets))
    padded[0, 1] = 0  # the blank is never a target
    with pytest.raises(UserError, match="without the blank"):
        model(batch, lens, [padded])


# ------------------------------------------------------------------------------------------------ 3. metrics, tokens
def edit_distance(r, h) -> int:
    d = list(range(len(h) + 1))
    for i, x in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_error_counts_against_jiwer_and_edit_distance():
    refs = ["the cat sat on the mat", "", "a dog", "hello world"]
    hyps = ["the cat sit on mat", "uh huh", "a dog barked", ""]
    werr, wref, cerr, cref = error_counts(refs, hyps)
    assert (werr, wref) == (sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)),
                            sum(len(r.split()) for r in refs))
    assert (cerr, cref) == (sum(edit_distance(r, h) for r, h in zip(refs, hyps)), sum(len(r) for r in refs))
    assert werr / wref == pytest.approx(jiwer.wer(refs, hyps))
    assert cerr / cref == pytest.approx(jiwer.cer(refs, hyps))
    assert werr == 2 + 2 + 1 + 2  # sub + del; the empty reference's two insertions; an insertion; two deletions
    assert error_counts(refs, hyps, chars=False) == (werr, wref, 0.0, 0.0)
    # counts add up over batches (validation sums them over batches and ranks), whatever the split, including a
    # batch whose only reference is empty (its insertions still count)
    assert error_counts([""], ["uh huh"]) == (2.0, 0.0, 6.0, 0.0)
    for cut in ([1], [2], [3], [1, 2], [2, 3], [1, 2, 3]):
        bounds = [0, *cut, len(refs)]
        parts = [error_counts(refs[a:b], hyps[a:b]) for a, b in zip(bounds, bounds[1:])]
        assert tuple(map(sum, zip(*parts))) == (werr, wref, cerr, cref), cut


def test_tokenizer_round_trips():
    lines = ["HELLO WORLD", "HI  THERE", ""]
    tok = build_tokenizer("char", lines)
    assert tok.vocab == [BLANK, "|", "D", "E", "H", "I", "L", "O", "R", "T", "W"]
    assert tok.tokens("HELLO WORLD") == list("HELLO|WORLD")
    assert tok.detok([tok.vocab[i] for i in tok.encode("HI  THERE")]) == "HI THERE"
    assert tok.metric == "wer" and tok.word_delim == "|"
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok and again.encode("HELLO WORLD") == tok.encode("HELLO WORLD")

    ph = build_tokenizer("phone", ["sil HH AH sp L OW sil", "spn W ER L D"])
    assert ph.vocab == [BLANK, "AH", "D", "ER", "HH", "L", "OW", "W"]
    ids = ph.encode("sil HH AH sp L OW sil")
    assert [ph.vocab[i] for i in ids] == ["HH", "AH", "L", "OW"] and ph.metric == "per"
    assert ph.detok([ph.vocab[i] for i in ids]) == "HH AH L OW"

    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 3)) for i in range(40)]
    bpe = build_tokenizer("bpe:12", texts)
    assert bpe.vocab[0] == BLANK and len(bpe.vocab) >= 12
    back = Tokenizer.from_dict(json.loads(json.dumps(bpe.to_dict())))
    for t in texts[:10] + ["cab dead ace"]:
        ids = back.encode(t)
        assert 0 not in ids and back.detok([back.vocab[i] for i in ids]) == t
    assert len(back.encode("cab dead ace")) < len("cab dead ace")  # pieces longer than characters exist

    with pytest.raises(UserError) as e:
        tok.encode("HELLO ZOE", where="data/dev/text: utterance u7")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data/dev/text: utterance u7: 'Z' not in the char vocabulary")
    with pytest.raises(UserError, match="bpe:N"):
        build_tokenizer("bpe:many", texts)


# ------------------------------------------------------------------------------------------------ 4. exact resume
def test_exact_resume_is_bit_identical(asr, tmp_path):
    train, dev, base = asr
    # 8 updates (freeze_updates 3: the resume at 4 comes after the unfreezing; epochs are ~3 batches of 8 s)
    common = ["data.max_duration=8.0", "optim.decay_steps=6", "ctc.freeze_updates=3", "ckpt.every_steps=4",
              "valid_every=4"]
    assert main(tiny_ft(tmp_path / "a", train, dev, base, *common, "optim.max_steps=8", "data.num_workers=1")) == 0
    assert main(tiny_ft(tmp_path / "b", train, dev, base, *common, "optim.max_steps=4")) == 0
    half = tmp_path / "b" / "checkpoints" / st.step_dir_name(4)
    ts = st.load_bundle(half, "train_state")
    assert ts["step"] == 4 and ts["sampler"]["epoch"] >= 1  # the first half crossed an epoch boundary
    torch.manual_seed(12345)  # disturb the global RNGs: the resume must restore them
    np.random.seed(999)
    assert main(tiny_ft(tmp_path / "b", train, dev, base, *common, "optim.max_steps=8", "--resume", "auto")) == 0
    pa = params_of(tmp_path / "a" / "checkpoints" / st.step_dir_name(8))
    pb = params_of(tmp_path / "b" / "checkpoints" / st.step_dir_name(8))
    assert pa.keys() == pb.keys() and any(k.startswith("lm_head.") for k in pa)
    p4 = params_of(half)
    moved = [k for k in pa if k.startswith("hubert.encoder.") and not torch.equal(pa[k], p4[k])]
    assert moved, "the encoder did not train after the resume"
    diff = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not diff, f"parameters differ after resume: {diff[:5]}"
    sa = st.load_bundle(tmp_path / "a" / "checkpoints" / st.step_dir_name(8), "train_state")
    sb = st.load_bundle(tmp_path / "b" / "checkpoints" / st.step_dir_name(8), "train_state")
    assert sa["sampler"] == sb["sampler"] and sa["best_metric"] == sb["best_metric"]
    assert json.loads((tmp_path / "a" / "best" / "config.json").read_text())["extra"]["valid"] == \
        json.loads((tmp_path / "b" / "best" / "config.json").read_text())["extra"]["valid"]


# ------------------------------------------------------------------------------------------------ 5. DDP
def test_two_process_ddp_matches_one_process(asr, tmp_path):
    train, dev, base = asr
    # one bucket: the same batch stream whatever the world size; 8 s per update = 1 x 4 s x 2 = 2 x 4 s x 1.
    # freeze_updates 2 of 4: DDP sees the head alone, then the whole encoder (find_unused_parameters)
    common = ["data.num_buckets=1", "optim.batch_seconds=8", "optim.max_steps=4", "ckpt.every_steps=4"]
    one = ft_config(*tiny_ft(tmp_path / "one", train, None, base, *common))
    two = ft_config(*tiny_ft(tmp_path / "two", train, None, base, *common))
    conf = tmp_path / "two.yaml"
    conf.write_text(to_yaml(two))
    finetune(one)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "speechssl", "finetune", "--config", str(conf)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "effective batch: world 2 x max_duration 4 s x accum 1 = 8 s" in out.stderr
    p1 = params_of(tmp_path / "one" / "checkpoints" / st.step_dir_name(4))
    p2 = params_of(tmp_path / "two" / "checkpoints" / st.step_dir_name(4))
    pre = params_of(base)
    enc = [k for k in p1 if k.startswith("hubert.encoder.")]
    moved = max(float((p1[k] - pre[k]).abs().max()) for k in enc)
    assert moved > 1e-3  # the encoder moved far more than the tolerance
    assert p1.keys() == p2.keys()
    diff = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    print(f"DDP 2 processes vs 1 process: max abs parameter difference {diff:.3g} (encoder moved {moved:.3g})")
    assert diff <= 1e-5
    ts = st.load_bundle(tmp_path / "two" / "checkpoints" / st.step_dir_name(4), "train_state")
    assert ts["world_size"] == 2
    # the logged updates agree too (Adam would hide a gradient off by a constant factor; the gradient norm does not)
    logged = [update_logs(tmp_path / run / "train.log") for run in ("one", "two")]
    assert [u["frozen"] for u in logged[0]] == ["1", "1", "0", "0"]
    assert logged[0] == logged[1]


def update_logs(path: Path) -> list[dict[str, str]]:
    """Per logged update, the fields that do not depend on speed: ``update N: k=v ...`` of train.log."""
    keep = ("frames", "frozen", "grad_norm", "loss", "ntokens", "zero_inf", "lr")
    out = []
    for line in path.read_text().splitlines():
        # log_train's INFO lines only: under load the data-wait watch adds a WARNING "...: update N: training waited ..."
        if " INFO speechssl.train.logs: update " in line:
            fields = dict(kv.split("=", 1) for kv in line.split(": update ", 1)[1].split()[1:])
            out.append({k: fields[k] for k in keep})
    return out


# ------------------------------------------------------------------------------------------------ 6. bad input
def test_dev_character_missing_from_train_vocabulary(asr, tmp_path, capsys):
    train, dev, base = asr
    bad_dev, _ = make_corpus(tmp_path / "baddev", n_utts=3, seed=2)
    text = add_transcripts(bad_dev, 2)
    utt = sorted(text)[1]
    text[utt] = text[utt] + " zed"
    (bad_dev / "text").write_text("".join(f"{u} {t}\n" for u, t in sorted(text.items())))
    assert main(tiny_ft(tmp_path / "x", train, bad_dev, base)) == 1
    line = error_line(capsys.readouterr().err, "finetune")
    assert line.startswith(f"speechssl finetune: error: {bad_dev / 'text'}: utterance {utt}: 'z' not in the char "
                           "vocabulary"), line


def test_utterance_without_transcript(asr, tmp_path, capsys):
    train, dev, base = asr
    d, _ = make_corpus(tmp_path / "c1", n_utts=4, seed=3)
    text = add_transcripts(d, 3)
    utt = sorted(text)[2]
    (d / "text").write_text("".join(f"{u} {t}\n" for u, t in sorted(text.items()) if u != utt))
    assert main(tiny_ft(tmp_path / "x1", d, None, base)) == 1
    line = error_line(capsys.readouterr().err, "finetune")
    assert str(d / "text") in line and utt in line, line
    # phones from a CTM that lacks an utterance: the fine-tuning data reader's own check
    d2, _ = make_corpus(tmp_path / "c2", n_utts=4, seed=3)
    utts = sorted(add_transcripts(d2, 3))
    (d2 / "utt2phones").unlink()
    from speechssl.data.durations import durations_of
    from speechssl.data.kaldi import read_data_dir

    dur = durations_of(read_data_dir(d2))  # phones spanning each utterance (a CTM of other audio is refused first)
    (d2 / "phones.ctm").write_text("".join(f"{u} 1 0.00 {dur[u] / 2:.3f} a\n{u} 1 {dur[u] / 2:.3f} {dur[u] / 2:.3f} b\n"
                                           for u in utts if u != utts[0]))
    assert main(tiny_ft(tmp_path / "x2", d2, None, base, units="phone")) == 1
    line = error_line(capsys.readouterr().err, "finetune")
    assert line.startswith(f"speechssl finetune: error: {d2 / 'phones.ctm'}: no transcript for utterance {utts[0]}")


def test_init_of_another_architecture_or_no_checkpoint(asr, tmp_path, capsys):
    train, dev, base = asr
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    save_file({"embeddings.word_embeddings.weight": torch.zeros(4, 32)}, str(bert / "model.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    for init, what in ((bert, "model_type 'bert' is not supported"), (tmp_path / "nowhere", "no such checkpoint"),
                       (empty, "no config.json"), (notes, "pickle")):
        assert main(tiny_ft(tmp_path / f"x_{Path(init).name}", train, None, init)) == 1
        line = error_line(capsys.readouterr().err, "finetune")
        assert str(init) in line and what in line, line


def test_decode_of_a_pretraining_checkpoint_is_an_error(asr, tmp_path, capsys):
    train, dev, base = asr
    assert main(tiny_ft(tmp_path / "ok", train, None, base, "optim.max_steps=1")) == 0  # --init of it works
    capsys.readouterr()
    assert main(["decode", "--ckpt", str(base), "--data", str(dev), "--out", str(tmp_path / "dec")]) == 1
    line = error_line(capsys.readouterr().err, "decode")
    assert str(base) in line and "not a fine-tuned (CTC) one" in line, line
    assert not (tmp_path / "dec").exists()


# ------------------------------------------------------------------------------------------------ 7. end to end
def read_kaldi_text(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        u, _, rest = line.partition(" ")
        out[u] = rest
    return out


@pytest.mark.parametrize("units", ["char", "phone"])
def test_finetune_then_decode_scores_equal_jiwer(asr, tmp_path, capsys, monkeypatch, units):
    train, dev, base = asr
    exp = tmp_path / "exp"
    assert main(tiny_ft(exp, train, dev, base, "valid_every=2", units=units)) == 0
    best = json.loads((exp / "best" / "config.json").read_text())
    assert best["extra"]["kind"] == "ctc_finetune" and best["extra"]["tokenizer"]["units"] == units
    metric = "per" if units == "phone" else "wer"
    assert best["extra"]["best_by"] == "error" and metric in best["extra"]["valid"]
    capsys.readouterr()
    out = tmp_path / "dec"
    assert main(["decode", "--ckpt", str(exp / "best"), "--data", str(dev), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hyp, ref = read_kaldi_text(out / "hyp.txt"), read_kaldi_text(out / "ref.txt")
    scores = json.loads((out / "scores.json").read_text())
    ids = [line.split()[0] for line in (dev / "utt2spk").read_text().splitlines()]
    assert list(hyp) == ids and list(ref) == ids and scores["utterances"] == len(ids) == printed["utterances"]
    if units == "phone":  # references: the phones without silences
        assert ref == {u: " ".join(p for p in t.split() if p not in ("sil", "sp"))
                       for u, t in read_kaldi_text(dev / "utt2phones").items()}
        assert scores["per"] == pytest.approx(jiwer.wer([ref[u] for u in ids], [hyp[u] for u in ids]))
        assert "wer" not in scores
    else:
        assert ref == read_kaldi_text(dev / "text")
        assert scores["wer"] == pytest.approx(jiwer.wer([ref[u] for u in ids], [hyp[u] for u in ids]))
        assert scores["cer"] == pytest.approx(jiwer.cer([ref[u] for u in ids], [hyp[u] for u in ids]))
    assert printed[metric] == scores[metric]
    # the validation of the same model on the same data by the trainer (summed batch counts) agrees
    assert best["extra"]["valid"][metric] == pytest.approx(scores[metric])
    # --batch-seconds bounds each forward's padded audio (durations from utt2dur or the headers: this dir has no
    # segments), and the hypotheses do not depend on how the utterances were batched
    from speechssl.models.ctc import CTCModel

    shapes, logits = [], CTCModel.logits

    def recorded(self, wavs, wav_lens=None):
        shapes.append(tuple(wavs.shape))
        return logits(self, wavs, wav_lens)

    monkeypatch.setattr(CTCModel, "logits", recorded)
    assert main(["decode", "--ckpt", str(exp / "best"), "--data", str(dev), "--out", str(tmp_path / "dec3"),
                 "--batch-seconds", "3"]) == 0
    assert sum(n for n, _ in shapes) == len(ids) and len(shapes) > 1
    assert all(n == 1 or n * samples <= 3 * 16000 for n, samples in shapes), shapes
    assert read_kaldi_text(tmp_path / "dec3" / "hyp.txt") == hyp


def test_adapters_checkpoint_holds_only_tuned_tensors_and_checks_its_base(asr, tmp_path, capsys):
    train, dev, base = asr
    copy = tmp_path / "base_copy"
    shutil.copytree(base, copy)
    exp = tmp_path / "ad"
    assert main(tiny_ft(exp, train, dev, copy, "tune.adapter_dim=8", "--tune", "adapters")) == 0
    saved = params_of(exp / "best")
    assert saved and all(k.startswith("lm_head.") or ".adapter." in k for k in saved), sorted(saved)
    assert {k for k in saved if k.startswith("lm_head.")} == {"lm_head.weight", "lm_head.bias"}
    assert len([k for k in saved if ".adapter." in k]) == 12
    meta = json.loads((exp / "best" / "config.json").read_text())
    sha1 = checkpoint_sha1(copy)
    assert meta["partial"]["base"] == str(copy.resolve()) and meta["partial"]["base_sha1"] == sha1

    # decode rebuilds it on its base: the decoded model holds the base's encoder and the saved tensors
    from speechssl.asr.checkpoint import load_finetuned

    model, tok = load_finetuned(exp / "best")
    sd = model.state_dict()
    pre = params_of(copy)
    for k, v in pre.items():
        if k.startswith("hubert."):
            assert torch.equal(sd[k], v), k
    for k, v in saved.items():
        assert torch.equal(sd[k], v), k
    assert main(["decode", "--ckpt", str(exp / "best"), "--data", str(dev), "--out", str(tmp_path / "d1")]) == 0
    assert json.loads((tmp_path / "d1" / "scores.json").read_text())["wer"] == pytest.approx(
        meta["extra"]["valid"]["wer"])

    # the base changes: decoding refuses, naming the SHA-1 recorded at training time
    w = params_of(copy)
    k = "hubert.encoder.layers.0.attention.q_proj.weight"
    w[k] = w[k] + 1e-3
    save_file(w, str(copy / "model.safetensors"))
    capsys.readouterr()
    assert main(["decode", "--ckpt", str(exp / "best"), "--data", str(dev), "--out", str(tmp_path / "d2")]) == 1
    line = error_line(capsys.readouterr().err, "decode")
    assert sha1 in line and checkpoint_sha1(copy) in line and str(exp / "best") in line, line


def test_sigkill_then_resume_equals_the_uninterrupted_run(asr, tmp_path):
    """``speechssl finetune`` killed -9 after its first checkpoint and resumed with the same options ends with the
    uninterrupted run's weights and best dev error; another unit inventory or init is refused in one line."""
    from killing import cli, kill_when

    train, dev, base = asr
    common = ["data.max_duration=8.0", "optim.decay_steps=20", "optim.max_steps=30", "ctc.freeze_updates=3",
              "ckpt.every_steps=3", "ckpt.keep_last=1", "valid_every=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = cli(tiny_ft(full, train, dev, base, *common))
    assert r.returncode == 0, r.stderr[-2000:]
    kill_when(tiny_ft(cut, train, dev, base, *common), cut / "checkpoints", "step-*/COMPLETE")
    line = error_line(cli(tiny_ft(cut, train, dev, base, *common, "--resume", "auto", units="phone")).stderr,
                      "finetune")
    assert "--resume with units = phone, but the run was made with char" in line
    line = error_line(cli(tiny_ft(cut, train, dev, f"random:{base}", *common, "--resume", "auto")).stderr, "finetune")
    assert f"init = random:{base}" in line
    r = cli(tiny_ft(cut, train, dev, base, *common, "--resume", "auto"))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    last = st.step_dir_name(30)
    pa, pb = params_of(full / "checkpoints" / last), params_of(cut / "checkpoints" / last)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    ea, eb = (json.loads((d / "best" / "config.json").read_text())["extra"] for d in (full, cut))
    assert (ea["step"], ea["valid"]) == (eb["step"], eb["valid"])
    # a rerun without --resume is refused
    assert "holds a finetune run already" in error_line(cli(tiny_ft(cut, train, dev, base, *common)).stderr,
                                                          "finetune")
