"""speechssl.models.hf: fine-tuned CTC models as transformers *ForCTC directories with their processor, and back
(export_hf_ctc, load_hf_ctc, `speechssl export --to hf` of a fine-tuned checkpoint, `speechssl decode` of a
transformers directory). References: transformers' AutoModelForCTC / AutoProcessor on the exported files. CPU, 2
threads, tiny models (3-layer CNN, 2 x 32 transformer)."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers  # the reference (interop extra, make install): imported plainly, a missing one fails
from safetensors.torch import load_file

from speechssl import cli
from speechssl.errors import UserError
from speechssl.models import hubert_tiny
from speechssl.models.checkpoint import save_model
from speechssl.models.ctc import CTCHeadConfig, CTCModel
from speechssl.models.hf import export_hf, export_hf_ctc, hf_config_dict, load_hf_ctc
from speechssl.models.peft import LoRALinear, add_adapters, add_lora
from speechssl.train.finetune import greedy_tokens
from speechssl.train.tokens import BLANK, Tokenizer

pytestmark = pytest.mark.threads(2)  # torch and faiss threads, set per test by tests/conftest.py

CHARS = Tokenizer("char", [BLANK, "|", "A", "B", "E", "H", "L", "O", "'"])
PHONES = Tokenizer("phone", [BLANK, "AH0", "B", "HH", "IY1", "L", "OW1"])
GROUP = dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)  # base layout
LAYER = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, normalize_waveform=True)  # large
HF_CLASSES = {"hubert": "HubertForCTC", "wav2vec2": "Wav2Vec2ForCTC", "wavlm": "WavLMForCTC"}


def ctc_model(model_type="hubert", layout=GROUP, tok=CHARS, seed=0, **head) -> CTCModel:
    """A tiny waveform-CNN CTC model, every parameter perturbed away from its init; lm_head reads the main
    directions in which the hidden states of noise vary (as a trained head would), so greedy paths visit many
    tokens and words instead of one token throughout."""
    extra = dict(num_buckets=32, max_bucket_distance=64) if model_type == "wavlm" else {}
    config = hubert_tiny(frontend="cnn", conv_layers=[(32, 10, 5), (32, 3, 2), (32, 2, 2)], hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, final_dim=32, model_type=model_type,
                         **{"normalize_waveform": False, **layout}, **extra)
    torch.manual_seed(seed)
    model = CTCModel(config, CTCHeadConfig(vocab_size=len(tok.vocab), **head))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.eval()
        wavs, lens = waves([4000] * 4, seed=100 + seed)
        h = model.encode(wavs, lens, apply_mask=False)[0].flatten(0, 1)
        mean = h.mean(0)
        _, sv, vt = torch.linalg.svd(h - mean, full_matrices=False)
        directions = vt[: len(tok.vocab)] / sv[: len(tok.vocab), None] * h.shape[0] ** 0.5
        directions *= torch.where(torch.rand(len(tok.vocab), 1) < 0.5, -1.0, 1.0)
        model.lm_head.weight.copy_(4 * directions)
        model.lm_head.bias.copy_(-4 * directions @ mean + 0.1 * torch.randn(len(tok.vocab)))
    return model


def waves(lengths, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = scale * torch.randn(n, generator=g)
    return wavs, torch.tensor(lengths)


def hf_logits(hf, wavs, attention_mask=None):
    with torch.no_grad():
        return hf(wavs, attention_mask=attention_mask).logits


def max_diff(a, b, frame_lens):
    """Largest absolute difference over the valid frames of each row."""
    return max(float((a[i, :n] - b[i, :n]).abs().max()) for i, n in enumerate(frame_lens.tolist()))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def load_for_ctc(path):
    hf, info = transformers.AutoModelForCTC.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


# ------------------------------------------------------------------------------------------------ (a) logits
@pytest.mark.parametrize("model_type,layout,head", [
    ("hubert", GROUP, {}),
    ("wav2vec2", LAYER, dict(mask_time_prob=0.3, mask_channel_prob=0.2, mask_channel_length=8, final_dropout=0.1)),
    ("wavlm", GROUP, dict(mask_time_prob=0.0, mask_channel_prob=0.0)),  # no masking: no masked_spec_embed
], ids=["hubert_group", "wav2vec2_layer_normalized", "wavlm_group_unmasked"])
def test_auto_model_for_ctc_loads_the_export_with_our_logits(model_type, layout, head, tmp_path):
    model = ctc_model(model_type, layout, **head)
    export_hf_ctc(model, CHARS.vocab, CHARS.word_delim, tmp_path / "hf")
    hf = load_for_ctc(tmp_path / "hf")
    assert type(hf).__name__ == HF_CLASSES[model_type]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["architectures"], cfg["vocab_size"], cfg["pad_token_id"]) == ([HF_CLASSES[model_type]], 9, 0)
    h = model.head_config
    assert (cfg["mask_time_prob"], cfg["mask_time_length"], cfg["mask_feature_prob"], cfg["mask_feature_length"],
            cfg["final_dropout"]) == (h.mask_time_prob, h.mask_time_length, h.mask_channel_prob,
                                      h.mask_channel_length, h.final_dropout)
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    prefix = {"hubert": "hubert.", "wav2vec2": "wav2vec2.", "wavlm": "wavlm."}[model_type]
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight)
    assert all(k.startswith((prefix, "lm_head.")) for k in weights)
    assert (prefix + "masked_spec_embed" in weights) == (h.mask_time_prob > 0 or h.mask_channel_prob > 0)
    again = load_hf_ctc(tmp_path / "hf")[0]  # with or without masked_spec_embed
    assert again.head_config == CTCHeadConfig(**{**h.to_dict(), "freeze_updates": 0})

    if layout is GROUP:
        # transformers' group norm takes its statistics over the padding too: compare unpadded utterances
        for n, seed in ((3100, 1), (4000, 2)):
            wavs, lens = waves([n], seed)
            ours, frame_lens = model.logits(wavs, lens)
            assert ours.shape == hf_logits(hf, wavs).shape
            err = max_diff(ours, hf_logits(hf, wavs), frame_lens)
            assert err < 1e-4, err
    else:
        # layer-norm CNN: a padded batch with an attention mask; transformers gets the waveforms normalised as ours
        # does it inside (fairseq's layer_norm over each utterance's valid samples, eps 1e-5)
        wavs, lens = waves([4000, 2600], 3)
        ours, frame_lens = model.logits(wavs, lens)
        mask = (torch.arange(wavs.shape[1])[None] < lens[:, None]).float()
        mean = (wavs * mask).sum(1, keepdim=True) / lens[:, None]
        var = (((wavs - mean) * mask) ** 2).sum(1, keepdim=True) / lens[:, None]
        normalized = (wavs - mean) / torch.sqrt(var + 1e-5) * mask
        err = max_diff(ours, hf_logits(hf, normalized, mask.long()), frame_lens)
        assert err < 1e-4, err
        # end to end through transformers' processor (normalise, pad, attention mask): its variance epsilon is
        # 1e-7, not 1e-5, so the inputs differ by ~1e-4 relative and the logits (up to ~45 here) a little more
        proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
        inputs = proc([w[:n].numpy() for w, n in zip(wavs, lens)], sampling_rate=16000, padding=True,
                      return_tensors="pt")
        assert "attention_mask" in inputs
        err = max_diff(ours, hf_logits(hf, inputs.input_values, inputs.attention_mask), frame_lens)
        assert err < 1e-3, err


# ------------------------------------------------------------------------------------------------ (b) processor
@pytest.mark.parametrize("tok", [CHARS, PHONES], ids=["char", "phone"])
def test_processor_decodes_and_encodes_as_our_tokenizer(tok, tmp_path):
    model = ctc_model(tok=tok, seed=1)
    export_hf_ctc(model, tok.vocab, tok.word_delim, tmp_path / "hf")
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert type(proc).__name__ == "Wav2Vec2Processor"
    assert len(proc.tokenizer) == len(tok.vocab)  # no <unk>/<s>/</s> beyond the model's outputs
    assert proc.tokenizer.pad_token_id == 0
    hf = load_for_ctc(tmp_path / "hf")
    ours_text = []
    for n, seed in ((4000, 1), (3300, 2), (2500, 3)):
        wavs, lens = waves([n], seed)
        logits, frame_lens = model.logits(wavs, lens)
        ours = tok.detok(greedy_tokens(logits, frame_lens, tok.vocab)[0])
        theirs = proc.batch_decode(hf_logits(hf, wavs).argmax(-1))[0]
        if tok.units == "char":
            # transformers keeps a double space where the model emits "| <blank> |"; we collapse it
            theirs = " ".join(theirs.split())
        assert theirs == ours
        ours_text.append(ours)
    words = " ".join(ours_text).split()
    assert len(words) > 6 and len(set(words)) > 3  # real sequences, not one token
    text = "HELLO BOB" if tok.units == "char" else "HH AH0 L OW1 B"
    assert proc.tokenizer(text).input_ids == tok.encode(text)  # labels for fine-tuning in transformers


# ------------------------------------------------------------------------------------------------ (c) back
@pytest.mark.parametrize("tok,layout", [(CHARS, GROUP), (PHONES, LAYER)], ids=["char_group", "phone_layer"])
def test_load_hf_ctc_round_trip(tok, layout, tmp_path):
    model = ctc_model("wavlm", layout, tok=tok, seed=2)
    export_hf_ctc(model, tok.vocab, tok.word_delim, tmp_path / "hf")
    again, vocab, delim = load_hf_ctc(tmp_path / "hf")
    assert vocab == ["<pad>"] + tok.vocab[1:] and delim == tok.word_delim
    assert hf_config_dict(again.config) == hf_config_dict(model.config) and not again.training
    assert again.config.normalize_waveform == model.config.normalize_waveform
    assert (again.head_config.vocab_size, again.head_config.blank) == (len(tok.vocab), 0)
    wavs, lens = waves([4000, 2600], 4)
    (a, fa), (b, fb) = again.logits(wavs, lens), model.logits(wavs, lens)
    assert torch.equal(a, b) and torch.equal(fa, fb)

    # a directory transformers saved itself (transformers 5: processor_config.json, added_tokens_decoder, ...)
    hf = load_for_ctc(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "resaved")
    transformers.AutoProcessor.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    again, vocab, delim = load_hf_ctc(tmp_path / "resaved")
    assert vocab == ["<pad>"] + tok.vocab[1:] and delim == tok.word_delim
    assert again.config.normalize_waveform == model.config.normalize_waveform
    wavs, lens = waves([3500], 5)
    ours, frame_lens = again.logits(wavs, lens)
    inputs = transformers.AutoProcessor.from_pretrained(tmp_path / "resaved")(wavs[0].numpy(), sampling_rate=16000,
                                                                              return_tensors="pt")
    tol = 1e-3 if model.config.normalize_waveform else 1e-4  # the processor's variance epsilon: see above
    assert max_diff(ours, hf_logits(hf, inputs.input_values), frame_lens) < tol


def test_load_hf_ctc_refusals(tmp_path):
    model = ctc_model()
    export_hf_ctc(model, CHARS.vocab, "|", tmp_path / "hf")
    bad = shutil.copytree(tmp_path / "hf", tmp_path / "pad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "pad_token_id": 3}))
    with pytest.raises(UserError, match="pad_token_id is 3") as err:
        load_hf_ctc(bad)
    assert "\n" not in str(err.value)

    bad = shutil.copytree(tmp_path / "hf", tmp_path / "vocab")
    (bad / "vocab.json").write_text(json.dumps({"<pad>": 0, "|": 1, "A": 2}))
    with pytest.raises(UserError, match=r"no token for id\(s\) \[3, 4, 5, 6, 7\]"):
        load_hf_ctc(bad)

    export_hf(model.hubert, tmp_path / "encoder")  # a bare encoder: no lm_head
    shutil.copy(tmp_path / "hf" / "vocab.json", tmp_path / "encoder")
    cfg = json.loads((tmp_path / "encoder" / "config.json").read_text())
    (tmp_path / "encoder" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 9}))
    with pytest.raises(UserError, match="not a HubertForCTC directory"):
        load_hf_ctc(tmp_path / "encoder")


# ------------------------------------------------------------------------------------------------ (d) decode
def write_data_dir(root, texts, seed=0):
    """A Kaldi data dir of len(texts) noise utterances (0.2-0.3 s, soundfile 16-bit WAVs) with a ``text``."""
    import soundfile as sf

    from speechssl.data.kaldi import DataDir, write_data_dir as write

    (root / "wav").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    scp, text = {}, {}
    for i, words in enumerate(texts):
        utt = f"spk0-utt{i}"
        sf.write(root / "wav" / f"{utt}.wav", 0.3 * rng.standard_normal(3200 + 800 * i), 16000, subtype="PCM_16")
        scp[utt], text[utt] = str(root / "wav" / f"{utt}.wav"), words
    write(DataDir(wav_scp=scp, utt2spk={u: "spk0" for u in scp}, text=text), root / "data")
    return root / "data"


def test_speechssl_decode_reads_the_transformers_directory(tmp_path):
    from speechssl.data.kaldi import load_utterance, read_data_dir

    model = ctc_model("hubert", LAYER, seed=3)  # layer-norm CNN: a padded batch row equals the utterance alone
    export_hf_ctc(model, CHARS.vocab, "|", tmp_path / "hf")
    data = write_data_dir(tmp_path, ["HELLO BOB", "ABE", "HOLA BELLO OLE"])
    code = cli.main(["decode", "--ckpt", str(tmp_path / "hf"), "--data", str(data), "--out", str(tmp_path / "dec")])
    assert code == 0
    hyps = dict(line.rstrip("\n").partition(" ")[::2] for line in (tmp_path / "dec" / "hyp.txt").open())
    scores = json.loads((tmp_path / "dec" / "scores.json").read_text())
    assert scores["utterances"] == 3 and scores["units"] == "char" and 0 <= scores["cer"]

    hf = load_for_ctc(tmp_path / "hf")
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    for utt in read_data_dir(data).utterances():
        inputs = proc(load_utterance(utt), sampling_rate=16000, return_tensors="pt")
        expected = proc.batch_decode(hf_logits(hf, inputs.input_values).argmax(-1))[0]
        assert hyps[utt.utt_id] == " ".join(expected.split()), utt.utt_id
    assert sum(len(h.split()) for h in hyps.values()) > 3


# ------------------------------------------------------------------------------------------------ (e) tuning
def test_lora_is_merged_on_a_copy_adapters_and_fbank_are_refused(tmp_path):
    model = ctc_model(seed=4)
    add_lora(model.hubert, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_hf_ctc(model, CHARS.vocab, "|", tmp_path / "lora")
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4  # the caller's model keeps its LoRA
    assert not any("lora" in k for k in load_file(str(tmp_path / "lora" / "model.safetensors")))
    hf = load_for_ctc(tmp_path / "lora")
    wavs, lens = waves([3600], 6)
    ours, frame_lens = model.logits(wavs, lens)
    assert max_diff(ours, hf_logits(hf, wavs), frame_lens) < 1e-4
    plain = ctc_model(seed=4)  # same base weights without the LoRA update: visibly different logits
    assert max_diff(plain.logits(wavs, lens)[0], ours, frame_lens) > 1e-2

    adapted = ctc_model(seed=5)
    add_adapters(adapted.hubert, dim=8)
    with pytest.raises(UserError, match="adapters") as err:
        export_hf_ctc(adapted, CHARS.vocab, "|", tmp_path / "adapters")
    assert "\n" not in str(err.value) and not (tmp_path / "adapters").exists()

    fbank = CTCModel(hubert_tiny(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64),
                     CTCHeadConfig(vocab_size=9))
    with pytest.raises(UserError, match="fbank") as err:
        export_hf_ctc(fbank, CHARS.vocab, "|", tmp_path / "fbank")
    assert "\n" not in str(err.value) and not (tmp_path / "fbank").exists()

    with pytest.raises(UserError, match="9 outputs"):
        export_hf_ctc(model, CHARS.vocab[:-1], "|", tmp_path / "short")
    bpe = [BLANK, "\u2581HE", "LLO", "\u2581BOB", "A", "B", "E", "H", "L"]
    with pytest.raises(UserError, match="sentencepiece"):
        export_hf_ctc(model, bpe, None, tmp_path / "bpe")


# ------------------------------------------------------------------------------------------------ (f) CLI
def test_cli_export_of_a_finetuned_checkpoint(tmp_path, capsys):
    model = ctc_model("wav2vec2", GROUP, tok=PHONES, seed=6)
    save_model(model, model.config, tmp_path / "ft", extra={"tokenizer": PHONES.to_dict(), "kind": "ctc_finetune"})
    assert cli.main(["export", "--ckpt", str(tmp_path / "ft"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "AutoModelForCTC" in capsys.readouterr().out
    hf = load_for_ctc(tmp_path / "hf")
    assert type(hf).__name__ == "Wav2Vec2ForCTC"
    wavs, lens = waves([3900], 7)
    ours, frame_lens = model.logits(wavs, lens)
    logits = hf_logits(hf, wavs)
    assert max_diff(ours, logits, frame_lens) < 1e-4
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert proc.batch_decode(logits.argmax(-1))[0] == PHONES.detok(greedy_tokens(ours, frame_lens, PHONES.vocab)[0])

    # --encoder-only: the bare encoder, as before
    assert cli.main(["export", "--ckpt", str(tmp_path / "ft"), "--to", "hf", "--encoder-only",
                     str(tmp_path / "enc")]) == 0
    enc = transformers.AutoModel.from_pretrained(tmp_path / "enc")
    assert type(enc).__name__ == "Wav2Vec2Model"

    # bpe units: a one-line error (transformers has no CTC tokenizer for sentencepiece pieces)
    bpe = Tokenizer("bpe", [BLANK] + [f"p{i}" for i in range(8)], spm_model="")
    save_model(model, model.config, tmp_path / "bpe", extra={"tokenizer": bpe.to_dict(), "kind": "ctc_finetune"})
    assert cli.main(["export", "--ckpt", str(tmp_path / "bpe"), "--to", "hf", str(tmp_path / "bpe_hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert err.startswith("speechssl export: error:") and "bpe units cannot go to transformers" in err
    assert not (tmp_path / "bpe_hf").exists()


@pytest.mark.parametrize("mode", ["lora", "adapters"])
def test_cli_export_of_a_partial_checkpoint(mode, tmp_path, capsys):
    """LoRA / adapters checkpoints hold the tuned tensors only, on their base: LoRA goes out merged, adapters are a
    one-line error."""
    from speechssl.train.finetune import TuneConfig, build_ctc_model

    base = ctc_model(seed=7)
    save_model(base.hubert, base.config, tmp_path / "base")
    tune = TuneConfig(mode=mode, lora_rank=4, adapter_dim=8)
    model, sha1 = build_ctc_model(str(tmp_path / "base"), None, base.head_config, tune)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # lm_head and the LoRA / adapter tensors
                p.normal_(0, 0.3)
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    save_model(model, model.config, tmp_path / "ft", partial={"base": str(tmp_path / "base"), "base_sha1": sha1,
                                                               "keys": keys},
               extra={"tokenizer": CHARS.to_dict(), "kind": "ctc_finetune", "tune": vars(tune)})
    code = cli.main(["export", "--ckpt", str(tmp_path / "ft"), "--to", "hf", str(tmp_path / "hf")])
    if mode == "adapters":
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 1 and err.startswith("speechssl export: error:") and "adapters" in err
        assert not (tmp_path / "hf").exists()
        return
    assert code == 0
    hf = load_for_ctc(tmp_path / "hf")
    wavs, lens = waves([3700], 8)
    ours, frame_lens = model.eval().logits(wavs, lens)
    assert max_diff(ours, hf_logits(hf, wavs), frame_lens) < 1e-4
    assert max_diff(base.logits(wavs, lens)[0], ours, frame_lens) > 1e-2  # the LoRA update and new head count
