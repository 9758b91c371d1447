"""The wav2vec 2.0 and BEST-RQ pretraining objectives (``models/wav2vec2.py``, ``models/bestrq.py``).

wav2vec 2.0: loss and every gradient against transformers' ``Wav2Vec2ForPreTraining`` on the same weights (exported
by ``export_hf``, which is checked too), masks and distractors; the Gumbel temperature schedule; distractor
sampling; ``neg_is_pos``. BEST-RQ: the frozen quantizer's seed and checkpointing, its targets against an independent
kaldi-native-fbank + numpy reimplementation, padding invariance, noise fill. Both: the collapse watch on a forced
collapse, overfitting a fixed batch, every trainable parameter trained (DDP), exact resume through the trainer.
Tiny configs; CPU, one thread (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import chisquare

from speechssl.errors import UserError
from test_features import knf_fbank  # kaldi-native-fbank: the fbank reference (dev extra)
from speechssl.models import export_hf, load_model, save_model
from speechssl.models.bestrq import ENTROPY_FLOOR, BestRQPretrainModel
from speechssl.models.config import hubert_base, hubert_large, hubert_tiny
from speechssl.models.hubert import LABEL_PAD, HubertPretrainModel
from speechssl.models import wav2vec2 as w2v
from speechssl.models.wav2vec2 import PERPLEXITY_FLOOR, Wav2Vec2PretrainModel, gumbel_temperature, sample_negatives
from speechssl.train import state as st
from speechssl.train.trainer import pretrain
from test_train import make_corpus, params_of, tiny_cfg

SR = 16000
# encoder sizes shared by every model here; no dropout or LayerDrop, so the only randomness is what a test draws
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_length=3, mask_prob=0.5)
SMALL_CNN = [(32, 10, 5), (32, 3, 2), (32, 2, 2)]  # stride 20, receptive field 30 samples: many frames, cheap
PAPER_CNN_32 = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2  # the paper's strides (320 samples = 2 fbank frames)


def w2v_cfg(layout: str = "post_ln_group", **kw):
    """A tiny wav2vec 2.0 pretraining config: waveform CNN, G x V = 2 x 8 codevectors, K = 5 distractors. The CNN
    gets the full gradient (transformers has no feature_grad_mult); no feature penalty (transformers has none)."""
    base = dict(model_type="wav2vec2", objective="wav2vec2", conv_layers=SMALL_CNN, feature_grad_mult=1.0,
                feature_penalty_weight=0.0, num_codevector_groups=2, num_codevectors_per_group=8, codevector_dim=16,
                proj_codevector_dim=12, num_negatives=5, **TINY)
    if layout == "pre_ln_layer":  # Large's layout: layer-norm CNN, pre-LN encoder
        return hubert_large(**{**base, "normalize_waveform": False, **kw})
    return hubert_base(**{**base, **kw})


def brq_cfg(frontend: str = "fbank", **kw):
    """A tiny BEST-RQ config with two codebooks (16 and 8 codes); frames stack s = 2 fbank frames either way."""
    base = dict(objective="bestrq", num_classes=[16, 8], **TINY)
    if frontend == "cnn":
        return hubert_base(**{**base, "conv_layers": PAPER_CNN_32, "feature_grad_mult": 1.0,
                              "feature_penalty_weight": 0.0, **kw})
    return hubert_tiny(**{**base, "conv_layers": [(32, 3, 2)], **kw})


def speech_like(n: int, seed: int) -> np.ndarray:
    """A harmonic tone with a gliding pitch, a syllable-rate envelope and noise: fbank frames that differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.9 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    sig = sum(np.sin(h * phase) / h for h in range(1, 20)) * (0.3 + np.sin(2 * np.pi * 3.0 * t) ** 2)
    sig = sig + 0.3 * rng.standard_normal(n) * (np.sin(2 * np.pi * 1.7 * t) > 0.5)
    return (0.3 * sig / np.abs(sig).max()).astype(np.float32)


def batch(lengths, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded speech-like rows of the given lengths."""
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = torch.from_numpy(speech_like(n, seed + i))
    return wavs, torch.tensor(lengths)


def fixed_mask(model, lens: torch.Tensor, seed: int = 2) -> torch.Tensor:
    frame_lens = model.hubert.num_frames(lens)
    return model.compute_mask(frame_lens, int(frame_lens.max()), torch.Generator().manual_seed(seed))


def seed_before(module: torch.nn.Module, seed: int):
    """Seed torch's global RNG right before ``module`` runs (the hook's handle is returned)."""
    def hook(_module, _inputs):
        torch.manual_seed(seed)  # returns None: the inputs are left as they are

    return module.register_forward_pre_hook(hook)


# ================================================================================== wav2vec 2.0 vs transformers
@pytest.mark.parametrize("layout", ["post_ln_group", "pre_ln_layer"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wav2vec2_loss_and_gradients_match_transformers(tmp_path, layout, mode):
    """Same weights (through export_hf), same mask_time_indices and sampled_negative_indices, same Gumbel draw and
    temperature: ours.loss * sample_size is transformers' summed loss, and every parameter's gradient is the same.

    Padding: the second row is shorter (zeros + attention_mask for transformers). Both CNNs read the zero-padded
    batch alike (group norm: statistics over the whole padded length in both; transformers' CNN ignores the
    attention mask), and both encoders mask the padded frames; the loss reads masked frames only, which are valid.

    The Gumbel draw: transformers' encoder calls torch.rand once per layer in training (LayerDrop) even with
    layerdrop 0, ours does not, so seeding once before the forwards would give different draws. Seeding right
    before each quantizer makes its one draw (``gumbel_softmax``'s exponential noise) the same: with every dropout
    at 0 nothing else is random.

    neg_is_pos: ours compares the picked codes, transformers the projected vectors bit for bit; the two agree unless
    the straight-through output of equal picks differs by a rounding, which this batch does not hit (and the batch
    does have distractors equal to their positive, in both modes)."""
    import transformers
    from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

    torch.manual_seed(0)
    model = Wav2Vec2PretrainModel(w2v_cfg(layout))
    with torch.no_grad():  # move biases off 0 and LayerNorm weights off 1, so the comparison covers them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_hf(model, tmp_path)
    hf, info = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    ours = dict(model.named_parameters())
    theirs = dict(hf.named_parameters())

    def our_name(name: str) -> str:
        return "hubert." + name[len("wav2vec2."):] if name.startswith("wav2vec2.") else name

    assert {our_name(n) for n in theirs} == set(ours)
    for name, p in theirs.items():
        assert torch.equal(p, ours[our_name(name)]), name

    wavs, lens = batch([3200, 2400])
    mask = fixed_mask(model, lens)
    B, T = mask.shape
    np.random.seed(5)
    negatives = torch.from_numpy(_sample_negative_indices((B, T), model.config.num_negatives, mask.numpy())).long()
    attention_mask = (torch.arange(wavs.shape[1])[None] < lens[:, None]).long()

    model.train(mode == "train")
    hf.train(mode == "train")
    model.num_updates = 100_000
    assert 0.5 < model.temperature < 1.5  # neither the start nor the end of the schedule
    hf.set_gumbel_temperature(model.temperature)
    hooks = [seed_before(m.quantizer, 7) for m in (model, hf)]
    out = model(wavs, lens, mask=mask, negatives=negatives)
    ref = hf(wavs, attention_mask=attention_mask, mask_time_indices=mask, sampled_negative_indices=negatives)
    for h in hooks:
        h.remove()

    M = int(mask.sum())
    assert out["sample_size"] == M and torch.equal(out["mask"], mask)
    # a distractor identical to its positive (neg_is_pos, -inf in both) does occur in this batch
    q = ref.projected_quantized_states.detach()
    same = (q.reshape(B * T, -1)[negatives] == q.unsqueeze(2)).all(-1) & mask.unsqueeze(-1)
    assert same.any()
    assert out["loss"].item() * M == pytest.approx(ref.loss.item(), rel=1e-6)
    torch.testing.assert_close(out["loss"], ref.loss / M, atol=1e-5, rtol=0)
    assert out["logs"]["loss_m_0"] * M == pytest.approx(ref.contrastive_loss.item(), rel=1e-6)
    assert out["logs"]["diversity_loss"] * M == pytest.approx(ref.diversity_loss.item(), rel=1e-5)
    assert out["logs"]["prob_perplexity"] == pytest.approx(ref.codevector_perplexity.item(), rel=1e-5)

    out["loss"].backward()
    (ref.loss / M).backward()
    without = set()
    for name, p in theirs.items():
        mine = ours[our_name(name)].grad
        assert (mine is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(mine, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        if p.grad is None or not p.grad.any():
            without.add(name)
    # every parameter has a (non-zero) gradient, but in eval the argmax quantizer's projection (none in either);
    # in training the straight-through Gumbel trains it
    assert without == (set() if mode == "train" else {"quantizer.weight_proj.weight", "quantizer.weight_proj.bias"})


def test_export_hf_of_a_wav2vec2_checkpoint(tmp_path):
    """A Wav2Vec2PretrainModel checkpoint dir through ``speechssl export --to hf``: Wav2Vec2ForPreTraining with our
    quantizer settings, AutoModel's Wav2Vec2Model gives our encoder's output, speechssl reads the encoder back;
    other pretraining models are still written as their encoder."""
    import transformers

    from speechssl.cli import main
    from speechssl.models.hf import load_hf_dir

    torch.manual_seed(3)
    cfg = w2v_cfg(num_negatives=7, diversity_loss_weight=0.25, contrastive_logits_temperature=0.2, mask_min_masks=1,
                  feat_quantizer_dropout=0.05, mask_length=4)
    model = Wav2Vec2PretrainModel(cfg).eval()
    save_model(model, cfg, tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["Wav2Vec2ForPreTraining"] and conf["model_type"] == "wav2vec2"
    expected = dict(num_codevector_groups=2, num_codevectors_per_group=8, codevector_dim=16, proj_codevector_dim=12,
                    num_negatives=7, contrastive_logits_temperature=0.2, diversity_loss_weight=0.25,
                    feat_quantizer_dropout=0.05, mask_time_prob=0.5, mask_time_length=4, mask_time_min_masks=1)
    assert {k: conf[k] for k in expected} == expected
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {k.split(".")[0] for k in written} == {"wav2vec2", "quantizer", "project_q", "project_hid"}
    for k, v in model.state_dict().items():
        assert torch.equal(written[k.replace("hubert.", "wav2vec2.", 1) if k.startswith("hubert.") else k], v), k

    hf, info = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert (hf.config.num_negatives, hf.config.contrastive_logits_temperature) == (7, 0.2)
    base = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(base).__name__ == "Wav2Vec2Model"
    wavs, lens = batch([3000])
    with torch.no_grad():
        mine = model.hubert(wavs, lens)[0][-1]
        torch.testing.assert_close(mine, base(wavs).last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_hf_dir(tmp_path / "hf")(wavs, lens)[0][-1], mine, atol=0, rtol=0)

    # any other pretraining model: its encoder alone, as before (a BEST-RQ model with the waveform CNN here)
    brq = BestRQPretrainModel(brq_cfg("cnn"))
    export_hf(brq, tmp_path / "brq")
    conf = json.loads((tmp_path / "brq" / "config.json").read_text())
    assert conf["architectures"] == ["HubertModel"] and "num_negatives" not in conf
    assert set(load_file(str(tmp_path / "brq" / "model.safetensors"))) == set(brq.hubert.state_dict())


# ================================================================================== Gumbel temperature
def test_gumbel_temperature_schedule_and_the_quantizer_uses_it():
    schedule = [2.0, 0.5, 0.999995]
    crossover = math.log(0.5 / 2.0) / math.log(0.999995)  # 277258.2 updates: 2 * 0.999995**n = 0.5
    assert 277_258 < crossover < 277_259
    for n in (0, 1, 1000, 100_000, 277_258, 277_259, 300_000, 10**7):
        assert gumbel_temperature(schedule, n) == pytest.approx(max(2 * 0.999995**n, 0.5), rel=1e-12)
    assert gumbel_temperature(schedule, 277_258) > 0.5 == gumbel_temperature(schedule, 277_259)
    assert gumbel_temperature(schedule, 0) == 2.0
    assert gumbel_temperature([1.0, 0.1, 0.5], 3) == 0.125 and gumbel_temperature([1.0, 0.1, 0.5], 4) == 0.1

    model = Wav2Vec2PretrainModel(w2v_cfg(gumbel_temperature=[1.0, 0.1, 0.5]))
    wavs, lens = batch([1200])
    for n, temp in ((0, 1.0), (2, 0.25), (3, 0.125), (50, 0.1)):
        model.num_updates = n
        with torch.no_grad():
            out = model(wavs, lens)
        assert model.quantizer.temperature == out["logs"]["temp"] == temp


# ================================================================================== distractors
def test_sample_negatives_are_other_masked_frames_of_the_same_row_uniformly():
    T = 30
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[0, [2, 3, 4, 10, 11, 20]] = True
    mask[1, 5:25] = True
    mask[2, 7] = True  # one masked frame: no distractor to draw
    K = 3000
    neg = sample_negatives(mask, K, torch.Generator().manual_seed(0))
    assert neg.shape == (4, T, K) and neg.dtype == torch.long
    assert (neg[~mask] == -1).all() and (neg[2:] == -1).all()
    for b in (0, 1):
        pos = torch.nonzero(mask[b]).view(-1)
        for t in pos.tolist():
            row, frame = neg[b, t] // T, neg[b, t] % T
            assert (row == b).all() and mask[b, frame].all() and (frame != t).all()
            others = [p for p in pos.tolist() if p != t]
            counts = torch.bincount(frame, minlength=T)[others].numpy()
            assert counts.sum() == K
            assert chisquare(counts).pvalue > 1e-4, (b, t, counts)  # uniform over the other masked frames
    # the generator decides: same seed, same draw; another seed, another
    assert torch.equal(neg, sample_negatives(mask, K, torch.Generator().manual_seed(0)))
    assert not torch.equal(neg, sample_negatives(mask, K, torch.Generator().manual_seed(1)))


def test_the_model_draws_distractors_from_valid_masked_frames(monkeypatch):
    """Even a mask that covers padding: forward samples distractors among its valid masked frames only."""
    drawn = []

    def spy(mask, k, generator=None):
        out = sample_negatives(mask, k, generator)
        drawn.append((mask.clone(), out))
        return out

    monkeypatch.setattr(w2v, "sample_negatives", spy)
    model = Wav2Vec2PretrainModel(w2v_cfg()).eval()
    wavs, lens = batch([3200, 1600])
    frame_lens = model.hubert.num_frames(lens)
    T = int(frame_lens.max())
    everything = torch.ones(2, T, dtype=torch.bool)
    with torch.no_grad():
        out = model(wavs, lens, mask=everything)
    (mask, neg), = drawn
    valid = torch.arange(T)[None] < frame_lens[:, None]
    assert torch.equal(mask, valid) and torch.equal(out["mask"], valid) and out["sample_size"] == int(valid.sum())
    picked = neg[valid]
    assert (picked >= 0).all()
    assert valid.view(-1)[picked].all()  # never a padded frame
    assert ((picked // T) == torch.nonzero(valid)[:, :1]).all()  # the same row


def test_a_distractor_identical_to_the_positive_is_ignored():
    """neg_is_pos: a distractor with the positive's codes (the frame itself, or another frame quantized alike) gets
    logit -inf, so adding it leaves the loss as it was; a distractor with other codes does not."""
    torch.manual_seed(1)
    model = Wav2Vec2PretrainModel(w2v_cfg()).eval()
    wavs, lens = batch([4000])
    mask = fixed_mask(model, lens)
    T = mask.shape[1]
    with torch.no_grad():
        features, _ = model.hubert.extract_features(wavs, lens)
        _, _, codes = model.quantizer(model.hubert.feature_projection.layer_norm(features))
    codes = codes[0]  # [T, G]
    pos = torch.nonzero(mask[0]).view(-1).tolist()
    twin = next((a, b) for a in pos for b in pos if a != b and torch.equal(codes[a], codes[b]))
    other = next(b for b in pos if not torch.equal(codes[twin[0]], codes[b]))

    def loss(negatives):
        with torch.no_grad():
            return model(wavs, lens, mask=mask, negatives=negatives)["loss"].item()

    one = sample_negatives(mask, 1, torch.Generator().manual_seed(0))
    itself = torch.arange(T).view(1, T, 1)
    assert loss(torch.cat([one, itself], -1)) == pytest.approx(loss(one), rel=1e-6)
    with_twin = torch.cat([one, itself], -1)
    with_twin[0, twin[0], 1] = twin[1]
    assert loss(with_twin) == pytest.approx(loss(one), rel=1e-6)
    with_other = torch.cat([one, itself], -1)
    with_other[0, twin[0], 1] = other
    assert loss(with_other) > loss(one) + 1e-4


# ================================================================================== BEST-RQ targets
def forward_targets(model, wavs, lens, **kw) -> tuple[list[torch.Tensor], dict]:
    """The targets ``forward`` trains on (spied on ``model.targets``) and its output."""
    seen = []
    original = model.targets

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    model.targets = spy
    try:
        with torch.no_grad():
            out = model(wavs, lens, **kw)
    finally:
        del model.targets
    assert len(seen) == 1
    return seen[0], out


def reference_targets(model: BestRQPretrainModel, wav: np.ndarray, num_frames: int):
    """BEST-RQ's targets of one utterance, written from the paper independently of bestrq.py: kaldi-native-fbank's
    fbank, numpy mean/variance normalisation over the utterance, stacks of s = frame step / 10 ms frames, times
    P_i, L2-normalised, the codebook row of highest cosine; -100 where the stack runs past the last fbank frame.
    Returns per codebook ``(codes [T], margin [T])`` (margin: best minus second-best cosine)."""
    fb = knf_fbank(wav, model.config.num_mel_bins).astype(np.float64)
    fb = (fb - fb.mean(0)) / np.sqrt(np.maximum(fb.var(0), 1e-10))
    s = model.config.downsample_rate // 160
    out = []
    for i in range(len(model.config.num_classes)):
        P = model.quantizer.projections[i].double().numpy()
        C = getattr(model.quantizer, f"codebook_{i}").double().numpy()
        codes = np.full(num_frames, LABEL_PAD)
        margin = np.full(num_frames, np.inf)
        for t in range(num_frames):
            if (t + 1) * s > len(fb):
                continue
            z = fb[t * s:(t + 1) * s].reshape(-1) @ P
            cos = C @ (z / np.linalg.norm(z)) / np.linalg.norm(C, axis=1)
            top = np.sort(cos)
            codes[t], margin[t] = int(cos.argmax()), top[-1] - top[-2]
        out.append((codes, margin))
    return out


@pytest.mark.parametrize("frontend", ["fbank", "cnn"])
def test_bestrq_targets_match_a_numpy_reference_and_ignore_padding(frontend):
    torch.manual_seed(0)
    model = BestRQPretrainModel(brq_cfg(frontend)).eval()
    assert model.config.downsample_rate == 320 and model.stack == 2
    # 98 fbank frames (even), 77 (odd: the last model frame of the fbank frontend stacks past the end)
    lengths = [16000, 12560]
    wavs, lens = batch(lengths, seed=10)
    targets, _ = forward_targets(model, wavs, lens)
    frame_lens = model.hubert.num_frames(lens).tolist()
    T = max(frame_lens)
    incomplete = 0
    for b, n in enumerate(lengths):
        ref = reference_targets(model, wavs[b, :n].numpy(), frame_lens[b])
        alone, _ = forward_targets(model, wavs[b:b + 1, :n], lens[b:b + 1])
        for i, (codes, margin) in enumerate(ref):
            mine = targets[i][b]
            assert mine.shape == (T,) and (mine[frame_lens[b]:] == LABEL_PAD).all()  # padding frames: no target
            mine = mine[:frame_lens[b]].numpy()
            assert np.array_equal(alone[i][0].numpy(), mine)  # the row alone: the same targets
            assert np.array_equal(mine == LABEL_PAD, codes == LABEL_PAD)
            clear = margin > 1e-3  # frames the two fbank implementations' rounding cannot tip
            assert clear.mean() > 0.9 and np.array_equal(mine[clear], codes[clear]), (b, i)
            assert (mine == codes).mean() > 0.97
            incomplete += int((codes == LABEL_PAD).sum())
            used = codes[codes != LABEL_PAD]
            assert len(np.unique(used)) >= model.config.num_classes[i] // 2  # not a degenerate quantizer
    if frontend == "fbank":
        assert incomplete == 2  # the odd row's last frame, in both codebooks


def test_bestrq_quantizer_is_seeded_frozen_and_saved(tmp_path):
    cfg = brq_cfg()
    wavs, lens = batch([8000, 6400], seed=3)
    a, b, c = (BestRQPretrainModel(brq_cfg(quantizer_seed=s)).eval() for s in (0, 0, 1))
    buffers = dict(a.quantizer.named_buffers())
    assert set(buffers) == {"projections", "codebook_0", "codebook_1"}
    assert not [n for n, _ in a.named_parameters() if n.startswith("quantizer.")]
    # the paper's draws: Xavier-normal projections [s * 80, d], unit-norm codebook rows
    d, rows = cfg.bestrq_codebook_dim, 2 * cfg.num_mel_bins
    assert buffers["projections"].shape == (2, rows, d)
    assert buffers["projections"].std().item() == pytest.approx(math.sqrt(2 / (rows + d)), rel=0.05)
    assert torch.allclose(buffers["codebook_0"].norm(dim=-1), torch.ones(16))
    for name, value in b.quantizer.named_buffers():  # same seed: same quantizer whatever else was drawn before
        assert torch.equal(value, buffers[name]), name
    ta, tb, tc = (forward_targets(m, wavs, lens)[0] for m in (a, b, c))
    for i in range(2):
        assert torch.equal(ta[i], tb[i])
        valid = ta[i] != LABEL_PAD
        assert (ta[i][valid] != tc[i][valid]).float().mean() > 0.5  # another seed, other codes
    assert not torch.equal(a.quantizer.projections, c.quantizer.projections)

    # the checkpoint holds the buffers (changed here, so a model rebuilt from the seed alone would differ)
    with torch.no_grad():
        a.quantizer.projections.mul_(-1.0)
        a.quantizer.codebook_1.copy_(a.quantizer.codebook_1.flip(0))
    save_model(a, a.config, tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {"quantizer.projections", "quantizer.codebook_0", "quantizer.codebook_1"} <= set(stored)
    back = load_model(tmp_path / "ckpt")
    assert isinstance(back, BestRQPretrainModel)
    for name, value in a.quantizer.named_buffers():
        assert torch.equal(dict(back.quantizer.named_buffers())[name], value), name
    for x, y in zip(forward_targets(back, wavs, lens)[0], forward_targets(a, wavs, lens)[0]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("frontend", ["fbank", "cnn"])
def test_bestrq_masked_input_frames_are_noise(frontend):
    """No mask embedding: the frames a masked model frame reads (its stacked fbank frames, or the CNN's output
    frame) are replaced by N(0, std^2) noise; everything else is the clean input."""
    torch.manual_seed(0)
    std = 0.1
    model = BestRQPretrainModel(brq_cfg(frontend, bestrq_mask_noise_std=std)).eval()
    wavs, lens = batch([16000, 11000], seed=4)
    mask = fixed_mask(model, lens)
    enc, front = model.hubert, model.hubert.feature_extractor
    seen = []
    if frontend == "fbank":
        clean, fbank_lens = front.fbank(wavs, lens)
        original = front.encode

        def spy(feats, flens):
            seen.append(feats.clone())
            return original(feats, flens)

        front.encode = spy
        with torch.no_grad():
            out = model(wavs, lens, mask=mask)
        del front.encode
        noisy = seen[0]
        masked = mask.repeat_interleave(2, dim=1)[:, :clean.shape[1]] & (
            torch.arange(clean.shape[1])[None] < fbank_lens[:, None])
    else:
        with torch.no_grad():
            clean, _ = front(wavs, lens)
        h = enc.feature_projection.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        with torch.no_grad():
            out = model(wavs, lens, mask=mask)
        h.remove()
        noisy = seen[0]
        masked = mask
    assert torch.equal(out["mask"], mask) and mask.sum() > 10
    assert noisy.shape == clean.shape
    assert torch.equal(noisy[~masked], clean[~masked])
    replaced = noisy[masked]
    assert not torch.isclose(replaced, clean[masked]).any()
    assert replaced.mean().abs() < 0.1 * std and replaced.std().item() == pytest.approx(std, rel=0.1)


# ================================================================================== collapse watch
def test_wav2vec2_collapse_warning_threshold():
    model = Wav2Vec2PretrainModel(w2v_cfg(num_codevectors_per_group=320))  # G x V = 640: the floor is 64
    assert PERPLEXITY_FLOOR * 640 == 64
    (line,) = model.collapse_warnings({"code_perplexity": 63.9})
    assert "code perplexity 63.9 of 640 codevectors" in line and "diversity_loss_weight" in line
    assert model.collapse_warnings({"code_perplexity": 64.0}) == []
    assert model.collapse_warnings({"code_perplexity": 300.0}) == []
    assert model.collapse_warnings({"loss": 1.0}) == []  # no perplexity logged: nothing to say


def _train_fixed_batch(model, wavs, lens, mask, labels, steps: int, lr: float) -> tuple[dict, dict]:
    """Eval-mode logs before and after ``steps`` AdamW updates on one batch with a fixed mask."""
    def evaluate():
        model.eval()
        with torch.no_grad():
            logs = model(wavs, lens, labels, mask=mask)["logs"]
        model.train()
        return logs

    before = evaluate()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        if hasattr(model, "num_updates"):
            model.num_updates = step
        out = model(wavs, lens, labels, mask=mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return before, evaluate()


def test_wav2vec2_codebook_collapse_sets_off_the_watch():
    """Without the diversity loss and with a high learning rate the codebook collapses onto a few codes (its code
    perplexity falls under 10% of G x V) and the watch says so; the same run with the diversity loss keeps it."""
    wavs, lens = batch([8000, 8000], seed=1)
    logs = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = Wav2Vec2PretrainModel(w2v_cfg(num_codevectors_per_group=32, diversity_loss_weight=weight))
        before, logs[weight] = _train_fixed_batch(model, wavs, lens, fixed_mask(model, lens), [], steps=20, lr=5e-2)
        assert before["code_perplexity"] > 0.3 * 64 and model.collapse_warnings(before) == []
        warnings = model.collapse_warnings(logs[weight])
        assert bool(warnings) == (weight == 0.0), (weight, logs[weight]["code_perplexity"])
    assert logs[0.0]["code_perplexity"] < PERPLEXITY_FLOOR * 64
    assert logs[1.0]["code_perplexity"] > 0.5 * 64


def test_bestrq_constant_audio_sets_off_the_entropy_watch():
    model = BestRQPretrainModel(brq_cfg()).eval()
    with torch.no_grad():
        speech = model(*batch([16000, 16000], seed=2))["logs"]
        silence = model(torch.zeros(2, 16000), torch.tensor([16000, 16000]))["logs"]
    for i, v in enumerate((16, 8)):
        assert speech[f"target_entropy_max_{i}"] == silence[f"target_entropy_max_{i}"] == math.log2(v)
        assert speech[f"target_entropy_{i}"] > 0.6 * math.log2(v)
        assert silence[f"target_entropy_{i}"] == 0.0  # every frame the same code
    assert model.collapse_warnings(speech) == []
    lines = model.collapse_warnings(silence)
    assert len(lines) == 2 and lines[0].startswith("BEST-RQ codebook 0: target entropy 0.00 bits")
    # the threshold: half the ceiling
    stats = {"target_entropy_0": 2.0, "target_entropy_max_0": 4.0,
             "target_entropy_1": 1.49, "target_entropy_max_1": 3.0}
    assert ENTROPY_FLOOR == 0.5
    (line,) = model.collapse_warnings(stats)
    assert line.startswith("BEST-RQ codebook 1: target entropy 1.49 bits")


# ================================================================================== training
def _objective_model(objective: str):
    torch.manual_seed(0)
    if objective == "wav2vec2":
        return Wav2Vec2PretrainModel(w2v_cfg(num_codevectors_per_group=32)), []
    if objective == "bestrq":
        return BestRQPretrainModel(brq_cfg()), []
    model = HubertPretrainModel(hubert_tiny(conv_layers=[(32, 3, 2)], num_classes=[16], final_dim=16, **TINY))
    return model, None


@pytest.mark.parametrize("objective", ["wav2vec2", "bestrq", "hubert"])
def test_each_objective_overfits_a_fixed_batch(objective):
    model, labels = _objective_model(objective)
    n = 8000 if objective == "wav2vec2" else 16000  # ~400 frames at the small CNN's stride, ~50 at 320 samples
    wavs, lens = batch([n, n], seed=6)
    if labels is None:  # HuBERT: fixed random units
        T = int(model.hubert.num_frames(n))
        labels = [torch.randint(0, 16, (2, T), generator=torch.Generator().manual_seed(0))]
    before, after = _train_fixed_batch(model, wavs, lens, fixed_mask(model, lens), labels, steps=30, lr=1e-2)
    keys = ["m_0", "m_1"] if objective == "bestrq" else ["m_0"]
    for k in keys:
        assert after[f"loss_{k}"] < 0.25 * before[f"loss_{k}"], (k, before, after)
        assert after[f"acc_{k}"] > before[f"acc_{k}"] + 0.5, (k, before, after)
    if objective == "wav2vec2":  # learnt, not won by a collapsed codebook (distractors equal to the positive)
        assert model.collapse_warnings(after) == []


@pytest.mark.parametrize("objective", ["wav2vec2", "bestrq", "hubert"])
def test_every_trainable_parameter_gets_a_gradient(objective):
    """With no LayerDrop and the frontend trained, the trainer's DDP runs with find_unused_parameters=False, which
    needs a gradient for every parameter the optimizer holds."""
    model, labels = _objective_model(objective)
    wavs, lens = batch([8000, 6000], seed=7)
    if labels is None:
        labels = [torch.zeros(2, int(model.hubert.num_frames(8000)), dtype=torch.long)]
    model.train()
    model(wavs, lens, labels)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_bestrq_trains_under_ddp(tmp_path):
    """Two updates of BEST-RQ in DistributedDataParallel as the trainer wraps it (find_unused_parameters=False for
    layerdrop 0 and feature_grad_mult > 0; one gloo process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = _objective_model("bestrq")
    assert model.config.layerdrop == 0 and model.config.feature_grad_mult > 0
    wavs, lens = batch([8000, 6000], seed=8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model, find_unused_parameters=False)
        for _ in range(2):
            ddp(wavs, lens, [])["loss"].backward()
    finally:
        dist.destroy_process_group()


# ================================================================================== the trainer
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_utts=8)


OBJECTIVE_OVERRIDES = {
    # the waveform CNN (paper strides, 32 channels); a fast Gumbel anneal, so the temperature moves within the run
    "wav2vec2": ["model.objective=wav2vec2", "model.model_type=wav2vec2", "model.frontend=cnn",
                 "model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]",
                 "model.feature_penalty_weight=1.0", "model.num_codevectors_per_group=16", "model.codevector_dim=16",
                 "model.proj_codevector_dim=16", "model.num_negatives=10", "model.gumbel_temperature=[2.0,0.5,0.9]"],
    "bestrq": ["model.objective=bestrq", "model.num_classes=[16,8]"],
}


@pytest.mark.parametrize("objective", ["wav2vec2", "bestrq"])
def test_exact_resume_is_bit_identical(tmp_path, corpus, objective):
    """20 updates straight equal 10, then ``--resume auto`` 10 more, bit for bit (the trainer sets num_updates, so
    the Gumbel temperature anneals from where the first half stopped; masks, distractors, noise and dropout come
    from the trainer's seeds)."""
    data, labdir = corpus
    over = OBJECTIVE_OVERRIDES[objective] + ["data.train_labels=[]"]
    a = pretrain(tiny_cfg(tmp_path / "a", data, labdir, *over))
    assert a["step"] == 20 and a["stop_reason"] == "max_steps"
    src = tmp_path / "a" / "checkpoints" / st.step_dir_name(10)
    b_exp = tmp_path / "b"
    (b_exp / "checkpoints").mkdir(parents=True)
    shutil.copytree(src, b_exp / "checkpoints" / src.name)
    torch.manual_seed(12345)  # disturb the global RNGs: resume must restore / re-derive them
    np.random.seed(999)
    b = pretrain(tiny_cfg(b_exp, data, labdir, *over), resume="auto")
    assert b["step"] == 20
    last = st.step_dir_name(20)
    pa, pb = params_of(tmp_path / "a" / "checkpoints" / last), params_of(b_exp / "checkpoints" / last)
    p10 = params_of(src)
    assert pa.keys() == pb.keys() and any(k.startswith("quantizer.") for k in pa)
    assert [k for k in pa if not torch.equal(pa[k], p10[k])], "the second half did not train"
    diff = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not diff, f"parameters differ after resume: {diff[:5]}"
    assert isinstance(load_model(tmp_path / "a" / "checkpoints" / last),
                      Wav2Vec2PretrainModel if objective == "wav2vec2" else BestRQPretrainModel)


@pytest.mark.parametrize("objective", ["wav2vec2", "bestrq"])
def test_label_dirs_with_a_self_supervised_objective_are_refused(tmp_path, corpus, objective):
    data, labdir = corpus
    with pytest.raises(UserError) as e:  # tiny_cfg gives data.train_labels=[labdir]
        pretrain(tiny_cfg(tmp_path / "x", data, labdir, *OBJECTIVE_OVERRIDES[objective]))
    msg = str(e.value)
    assert "\n" not in msg and f"model.objective={objective} makes its own targets" in msg
    assert "data.train_labels" in msg
