"""speechssl.models.hf: transformers HuBERT / wav2vec 2.0 / WavLM directories loaded into our modules and written
back. References: tiny random transformers models (``output_hidden_states=True``), their saved files, and
transformers' own WavLM bucket function. CPU, 1-2 threads, tiny models."""

import json
import logging
import shutil

import pytest
import torch
import transformers  # the reference (interop extra, make install): imported plainly, a missing one fails
from safetensors.torch import load_file, save_file

from speechssl import upstream
from speechssl.errors import UserError
from speechssl.models import HubertConfig, HubertModel, HubertPretrainModel, hubert_base
from speechssl.models.checkpoint import CheckpointError
from speechssl.models.hf import export_hf, load_hf_dir, read_hf_config, read_hf_state_dict
from speechssl.models.wavlm import relative_position_buckets

pytestmark = pytest.mark.threads(2)  # torch and faiss threads, set per test by tests/conftest.py

# 3-layer CNN (hop 20 samples): 4000 samples -> 199 frames, past WavLM's max_bucket_distance below
TINY = dict(conv_dim=[32, 32, 32], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2], hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)
BASE = dict(feat_extract_norm="group", do_stable_layer_norm=False)  # group-norm CNN, post-LN
LARGE = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)  # layer-norm CNN, stable LN
CLASSES = {"hubert": ("HubertConfig", "HubertModel"), "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
           "wavlm": ("WavLMConfig", "WavLMModel")}
EXTRA = {"hubert": {}, "wav2vec2": {}, "wavlm": dict(num_buckets=32, max_bucket_distance=64)}
# config.json keys that decide the architecture (and so must survive load + export)
ARCH_KEYS = ["model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "hidden_act", "layer_norm_eps", "feat_extract_norm", "feat_extract_activation",
             "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "num_feat_extract_layers",
             "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm", "mask_time_prob"]
ARCH_KEYS_BY_TYPE = {"hubert": ["feat_proj_layer_norm", "conv_pos_batch_norm"], "wav2vec2": ["add_adapter"],
                     "wavlm": ["add_adapter", "num_buckets", "max_bucket_distance"]}


def hf_model(model_type, layout, head="Model", seed=0, **kw):
    """A tiny random transformers model, every parameter perturbed (LayerNorms, biases, gates are not at init)."""
    config_cls, _ = CLASSES[model_type]
    config = getattr(transformers, config_cls)(**TINY, **layout, **EXTRA[model_type], **kw)
    name = {"hubert": "Hubert", "wav2vec2": "Wav2Vec2", "wavlm": "WavLM"}[model_type] + head
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def save_pretrained(hf, path, safe=True):
    """``hf.save_pretrained(path)``; ``safe=False``: the weights as ``pytorch_model.bin`` (a ``torch.save`` of the
    state dict), as transformers 4.x wrote with ``safe_serialization=False`` (5.x writes safetensors only)."""
    hf.save_pretrained(path)
    if not safe:
        weights = path / "model.safetensors"
        torch.save(load_file(str(weights)), path / "pytorch_model.bin")
        weights.unlink()


def waves(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, torch.tensor(lengths)


def reference_states(hf, wavs, attention_mask=None):
    """transformers' hidden states in the upstream convention: input of every layer + encoder output (for
    stable-LN models transformers' last hidden_states entry precedes the final LayerNorm; last_hidden_state
    follows it, as ours)."""
    with torch.no_grad():
        out = hf(wavs, attention_mask=attention_mask, output_hidden_states=True)
    if hf.config.do_stable_layer_norm:
        assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state, atol=1e-3)
    else:
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    return list(out.hidden_states[:-1]) + [out.last_hidden_state]


def assert_states_match(ours, ref, frame_lens=None):
    assert len(ours) == len(ref)
    for layer, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, (layer, a.shape, b.shape)
        if frame_lens is not None:  # padded batch: valid frames only
            a = torch.cat([a[i, :n] for i, n in enumerate(frame_lens.tolist())])
            b = torch.cat([b[i, :n] for i, n in enumerate(frame_lens.tolist())])
        err = float((a - b).abs().max())
        assert err < 1e-4, f"layer {layer}: max abs difference {err:.2e}"


CASES = [
    ("hubert", "base", BASE, {}, True),
    ("hubert", "large", LARGE, {}, True),
    ("hubert", "base_no_proj_ln", BASE, dict(feat_proj_layer_norm=False), True),
    ("wav2vec2", "base", BASE, {}, True),
    ("wav2vec2", "large_bin", LARGE, {}, False),  # pytorch_model.bin
    ("wavlm", "base", BASE, {}, True),
    ("wavlm", "large", LARGE, {}, True),
]


@pytest.mark.parametrize("model_type,name,layout,kw,safe", CASES, ids=[f"{c[0]}_{c[1]}" for c in CASES])
def test_hidden_states_match_transformers_and_round_trip(model_type, name, layout, kw, safe, tmp_path):
    hf = hf_model(model_type, layout, **kw)
    save_pretrained(hf, tmp_path / "hf", safe)
    up = upstream.load(tmp_path / "hf")
    assert up.model.config.model_type == model_type and not up.model.training
    assert up.num_layers == TINY["num_hidden_layers"] + 1

    for lengths in ([4000, 4000], [3100]):  # unpadded batch of two, one utterance
        wavs, lens = waves(lengths, seed=len(lengths))
        hidden, frame_lens = up(wavs, lens)
        assert frame_lens.tolist() == hf._get_feat_extract_output_lengths(lens).tolist()
        assert_states_match(hidden, reference_states(hf, wavs))

    # round trip: every tensor identical, the architecture keys of config.json equal, loadable by transformers
    export_hf(load_hf_dir(tmp_path / "hf"), tmp_path / "out")
    original = (load_file(str(tmp_path / "hf" / "model.safetensors")) if safe
                else torch.load(tmp_path / "hf" / "pytorch_model.bin", weights_only=True))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    before = json.loads((tmp_path / "hf" / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ARCH_KEYS + ARCH_KEYS_BY_TYPE[model_type]:
        assert after.get(key) == before.get(key), key
    again, info = transformers.AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(again) is type(hf) and not info["missing_keys"] and not info["unexpected_keys"]


def test_padded_batch_wavlm_large_matches_transformers(tmp_path):
    """Padded keys get -inf on top of the gated bias (layer-norm CNN: rows are independent of padding)."""
    hf = hf_model("wavlm", LARGE, seed=3)
    hf.save_pretrained(tmp_path)
    up = upstream.load(tmp_path)
    wavs, lens = waves([4000, 2600])
    hidden, frame_lens = up(wavs, lens)
    mask = (torch.arange(wavs.shape[1])[None] < lens[:, None]).long()
    assert_states_match(hidden, reference_states(hf, wavs, mask), frame_lens)


def test_wavlm_buckets_match_transformers():
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    offsets = torch.arange(-1500, 1501)[None, :]
    for buckets, distance in ((320, 800), (32, 64)):
        ref = WavLMAttention(16, 2, num_buckets=buckets, max_distance=distance)._relative_positions_bucket(offsets)
        assert torch.equal(relative_position_buckets(offsets, buckets, distance), ref)


def test_wavlm_bf16_autocast_and_layerdrop_spares_layer_zero():
    config = HubertConfig(model_type="wavlm", conv_layers=[(32, 10, 5), (32, 3, 2)], hidden_size=32,
                          num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
                          max_bucket_distance=64, layerdrop=1.0)
    model = HubertModel(config)
    wavs, lens = waves([3000, 2000])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, _ = model(wavs, lens)
    assert all(torch.isfinite(h.float()).all() for h in hidden)
    model.train()  # layerdrop=1: every layer but the first (which computes the position bias) is dropped
    with torch.no_grad():
        hidden, _ = model(wavs, lens)
    assert not torch.equal(hidden[1], hidden[0]) and torch.equal(hidden[3], hidden[1])


def test_for_ctc_directory_loads_encoder_and_ignores_head(tmp_path, caplog):
    hf = hf_model("hubert", BASE, head="ForCTC", vocab_size=12)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith("lm_head.") for k in load_file(str(tmp_path / "model.safetensors")))
    with caplog.at_level(logging.INFO, logger="speechssl.models.hf"):
        up = upstream.load(tmp_path)
    assert "ignoring head weights ['lm_head']" in caplog.text
    wavs, lens = waves([3000])
    hidden, _ = up(wavs, lens)
    assert_states_match(hidden, reference_states(hf.hubert, wavs))


def test_old_weight_norm_names_and_missing_masked_spec_embed(tmp_path):
    """transformers 4.x files store the positional conv's weight norm as weight_g/weight_v; a model saved with
    mask_time_prob=0 has no masked_spec_embed. Both load; other missing or extra keys are errors."""
    hf = hf_model("wav2vec2", BASE, mask_time_prob=0.0)
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "masked_spec_embed" not in state
    old = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                             "weight_v"): v for k, v in state.items()}
    assert "encoder.pos_conv_embed.conv.weight_g" in old
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({f"wav2vec2.{k}": v for k, v in old.items()}, tmp_path / "hf" / "pytorch_model.bin")
    loaded = read_hf_state_dict(tmp_path / "hf")
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    wavs, lens = waves([3000])
    assert_states_match(upstream.load(tmp_path / "hf")(wavs, lens)[0], reference_states(hf, wavs))

    shutil.copytree(tmp_path / "hf", tmp_path / "bad")
    (tmp_path / "bad" / "pytorch_model.bin").unlink()
    broken = dict(state)
    del broken["encoder.layers.1.final_layer_norm.bias"]
    broken["encoder.layers.2.final_layer_norm.bias"] = state["encoder.layers.1.final_layer_norm.bias"]
    save_file(broken, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder\.layers\.1\.final_layer_norm\.bias'\]; "
                                              r"unexpected keys \['encoder\.layers\.2\.final_layer_norm\.bias'\]"):
        upstream.load(tmp_path / "bad")


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("model_type,changes,key", [
    ("wavlm", dict(model_type="data2vec-audio"), "model_type"),
    ("hubert", dict(conv_pos_batch_norm=True), "conv_pos_batch_norm"),
    ("wav2vec2", dict(feat_extract_activation="relu"), "feat_extract_activation"),
    ("wav2vec2", dict(add_adapter=True), "add_adapter"),
    ("wav2vec2", dict(adapter_attn_dim=16), "adapter_attn_dim"),
    ("wavlm", dict(num_feat_extract_layers=7), "num_feat_extract_layers"),
    ("hubert", dict(layer_norm_eps=1e-6), "layer_norm_eps"),
], ids=["unknown_model_type", "conv_pos_batch_norm", "relu", "adapter", "attn_adapter", "num_layers", "eps"])
def test_unsupported_configs_are_one_line_user_errors(model_type, changes, key, tmp_path):
    hf_model(model_type, BASE).save_pretrained(tmp_path / "hf")
    bad = _edit_config(tmp_path / "hf", tmp_path / "bad", **changes)
    for source in (bad, f"random:{bad}"):
        with pytest.raises(UserError) as err:
            upstream.load(source)
        message = str(err.value)
        assert "\n" not in message and str(bad / "config.json") in message and key in message, message


def test_random_init_of_a_transformers_dir(tmp_path):
    hf_model("wavlm", LARGE).save_pretrained(tmp_path)
    trained = upstream.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # only config.json is read
    a, b = upstream.load(f"random:{tmp_path}"), upstream.random_init(tmp_path)
    assert a.model.config == trained.model.config == read_hf_config(tmp_path)
    sa, st = a.model.state_dict(), trained.model.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in st.items()}
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in sa.items())  # seeded: same weights
    assert not torch.equal(sa["encoder.layers.0.attention.rel_attn_embed.weight"],
                           st["encoder.layers.0.attention.rel_attn_embed.weight"])
    assert a.source == f"random:{tmp_path}"
    assert 0.01 < float(sa["encoder.layers.0.attention.rel_attn_embed.weight"].std()) < 0.04  # init_bert_params


def test_preprocessor_do_normalize_sets_normalize_waveform(tmp_path):
    hf_model("wav2vec2", LARGE).save_pretrained(tmp_path)
    assert read_hf_config(tmp_path).normalize_waveform is False  # no preprocessor_config.json: raw waveforms
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    assert read_hf_config(tmp_path).normalize_waveform is True


def test_config_model_types_and_pretraining_refusal():
    old = hubert_base().to_dict()
    for key in ("model_type", "feat_proj_layer_norm", "num_buckets", "max_bucket_distance"):
        old.pop(key)
    assert HubertConfig.from_dict(old).model_type == "hubert"  # configs written before these fields load as before
    with pytest.raises(UserError, match="model_type must be one of"):
        hubert_base(model_type="bert")
    with pytest.raises(UserError, match="feat_proj_layer_norm=False exists for model_type 'hubert' only"):
        hubert_base(model_type="wav2vec2", feat_proj_layer_norm=False)
    with pytest.raises(UserError, match="num_buckets"):
        hubert_base(model_type="wavlm", num_buckets=2)
    for model_type in ("wav2vec2", "wavlm"):  # HuBERT's objective pretrains a hubert encoder
        with pytest.raises(UserError, match=f"model.model_type='{model_type}': HuBERT's masked-unit prediction "
                                            "pretrains a 'hubert' encoder"):
            HubertPretrainModel(hubert_base(model_type=model_type, num_hidden_layers=1))
    with pytest.raises(UserError, match="objective 'bestrq' pretrains model_type 'hubert' or 'wav2vec2', got 'wavlm'"):
        hubert_base(model_type="wavlm", objective="bestrq")
    with pytest.raises(UserError, match="objective 'wav2vec2' needs model_type 'wav2vec2'"):
        hubert_base(objective="wav2vec2")
    with pytest.raises(UserError, match="objective must be one of"):
        hubert_base(objective="data2vec")


def test_export_refuses_fbank(tmp_path):
    from speechssl.models import hubert_tiny

    with pytest.raises(UserError, match="fbank"):
        export_hf(HubertModel(hubert_tiny(num_hidden_layers=1, model_type="wavlm")), tmp_path / "x")
    assert not (tmp_path / "x").exists()
