"""fairseq / s3prl pickle checkpoints in (opt-in), s3prl and transformers formats out (speechssl.models.fairseq,
`speechssl export`). References: s3prl's own loading code (its hubert UpstreamExpert on our s3prl export) and s3prl's
vendored fairseq HubertModel (on a checkpoint laid out as fairseq's checkpoint_utils.save_state writes it, with
omegaconf / fairseq classes that are not installed here), transformers' HubertModel on `--to hf`."""

import enum
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from speechssl.cli import main
from speechssl.errors import UserError
from speechssl.models import HubertModel, HubertPretrainModel, hubert_base, hubert_large, hubert_tiny, save_model
from speechssl.models.checkpoint import CheckpointError
from speechssl.models.fairseq import (
    config_to_fairseq,
    export_s3prl,
    format_conv_layers,
    load_pickle,
    parse_conv_layers,
)
from speechssl.upstream import load

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # s3prl uses the old weight_norm

SMALL = dict(conv_layers=[(48, 10, 5), (48, 3, 2), (48, 2, 2)], hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=64, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def group_norm(**kw):  # Base layout: group-norm CNN, post-LN
    return hubert_base(**{**SMALL, **kw})


def layer_norm(**kw):  # Large layout: layer-norm CNN, pre-LN, normalised waveform
    return hubert_large(**{**SMALL, **kw})


def randomised(model, seed=0):
    """Every parameter moved off its init (LayerNorm/GroupNorm weights and biases too), so the comparison sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def wav(n, seed):
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def ours(model_or_upstream, w):
    hs, lens = model_or_upstream(w[None], torch.tensor([len(w)]))
    return [h[0, : int(lens[0])] for h in hs]


@pytest.fixture
def s3prl_expert(monkeypatch):
    """s3prl's hubert UpstreamExpert class. s3prl.upstream.utils imports s3prl.util.pseudo_data for its own self
    tests, which imports torchaudio (never installed here): an empty stand-in for that one module while importing."""
    import s3prl.upstream.hubert.hubert_model  # noqa: F401

    stand_in = types.ModuleType("s3prl.util.pseudo_data")
    stand_in.get_pseudo_wavs = None  # only s3prl's self tests call it
    monkeypatch.setitem(sys.modules, "s3prl.util.pseudo_data", stand_in)
    from s3prl.upstream.hubert.expert import UpstreamExpert

    return UpstreamExpert


def hooked_hidden(fs_model, w, normalize):
    """Every layer's hidden states of a fairseq HubertModel exactly as s3prl's hubert expert hooks them: the input
    of each encoder layer and the encoder's output, cut to the shortest (fairseq pads to an even length)."""
    hs = []
    handles = [layer.register_forward_hook(lambda m, i, o: hs.append(i[0].transpose(0, 1)))
               for layer in fs_model.encoder.layers]
    handles.append(fs_model.encoder.register_forward_hook(lambda m, i, o: hs.append(o[0])))
    if normalize:
        w = F.layer_norm(w, w.shape)
    with torch.no_grad():
        fs_model.extract_features(w[None], padding_mask=torch.zeros(1, len(w), dtype=torch.bool), mask=False)
    for h in handles:
        h.remove()
    t = min(h.shape[1] for h in hs)
    return [h[0, :t] for h in hs]


def assert_layers_close(a, b, what):
    assert len(a) == len(b), (len(a), len(b))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what} layer {i}: {tuple(x.shape)} vs {tuple(y.shape)}"
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} layer {i}: {m}")


# ----------------------------------------------------------------------------------------- opt-in pickle
def test_pickle_refused_without_trust_pickle_and_loaded_with_it(tmp_path):
    torch.manual_seed(0)
    model = randomised(HubertModel(group_norm()))
    export_s3prl(model, tmp_path / "m.pt")
    refused = r"m\.pt: a pickle checkpoint .*arbitrary code.*trust_pickle=True.*--trust-pickle"
    with pytest.raises(UserError, match=refused):
        load(tmp_path / "m.pt")
    up = load(tmp_path / "m.pt", trust_pickle=True)
    w = wav(4000, 1)
    with torch.no_grad():
        assert_layers_close(ours(up, w), ours(model, w), "reloaded")
    assert up.model.config.conv_layers == model.config.conv_layers


# ----------------------------------------------------------------------------------------- s3prl out
@pytest.mark.parametrize("make", [group_norm, layer_norm], ids=["group_norm_post_ln", "layer_norm_pre_ln_normalize"])
def test_export_s3prl_matches_s3prls_own_hubert_upstream(make, tmp_path, s3prl_expert):
    torch.manual_seed(0)
    model = randomised(HubertPretrainModel(make(num_classes=[7, 5])))
    assert model.config.normalize_waveform == (make is layer_norm)
    save_model(model, model.config, tmp_path / "ckpt")
    export_s3prl(tmp_path / "ckpt", tmp_path / "s3prl.pt")  # a speechssl dir: the head goes along
    # s3prl's expert: torch.load with its default weights_only=True, merge_with_parent, HubertModel, strict load
    expert = s3prl_expert(str(tmp_path / "s3prl.pt")).eval()
    fs = expert.model
    assert torch.equal(fs.label_embs_concat, model.label_embeddings)
    assert torch.equal(fs.final_proj.weight, model.final_proj.weight)
    assert expert.task_cfg.normalize == model.config.normalize_waveform
    for n, seed in ((4000, 1), (3333, 2)):  # one utterance per call: fairseq frames padding differently than ours
        w = wav(n, seed)
        with torch.no_grad():
            theirs = [h[0] for h in expert([w])["hidden_states"]]
            mine = ours(model.hubert.eval(), w)
        assert len(theirs) == model.config.num_hidden_layers + 1
        assert_layers_close(mine, theirs, f"{n} samples")
    # an equal-length batch through the expert too
    batch = [wav(3000, 3), wav(3000, 4)]
    with torch.no_grad():
        theirs = expert(batch)["hidden_states"]
        for i, w in enumerate(batch):
            assert_layers_close(ours(model.hubert, w), [h[i] for h in theirs], f"batch row {i}")


def test_export_s3prl_bare_encoder_and_refusals(tmp_path, s3prl_expert):
    torch.manual_seed(0)
    model = randomised(HubertModel(group_norm()))
    export_s3prl(model, tmp_path / "bare.pt")
    raw = torch.load(tmp_path / "bare.pt", weights_only=True)  # plain containers and tensors only
    assert raw["dictionaries_symbols"] == [None] and not raw["model_weight"]["final_proj.weight"].any()
    expert = s3prl_expert(str(tmp_path / "bare.pt")).eval()
    w = wav(3500, 5)
    with torch.no_grad():
        assert_layers_close(ours(model, w), [h[0] for h in expert([w])["hidden_states"]], "bare encoder")
    with pytest.raises(CheckpointError, match="'fbank' frontend"):
        export_s3prl(HubertModel(hubert_tiny(num_hidden_layers=1)), tmp_path / "fbank.pt")
    # the CNN as wide as the encoder: fairseq has no projection, so ours must be the identity
    wide = HubertModel(group_norm(conv_layers=[(32, 10, 5), (32, 3, 2)]))
    with pytest.raises(CheckpointError, match="not the identity"):
        export_s3prl(wide, tmp_path / "wide.pt")
    assert not (tmp_path / "fbank.pt").exists() and not (tmp_path / "wide.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pt"]  # no temp files left behind


# ----------------------------------------------------------------------------------------- fairseq in
# Stand-ins for omegaconf and fairseq classes, pickled under their real module names (present in sys.modules only
# while saving) with the state layout omegaconf 2.x / fairseq give them: DictConfig/ListConfig {_metadata, _parent,
# _content}, value nodes {_metadata, _parent, _val}, fairseq Dictionary's __dict__, a fairseq ChoiceEnum member.
class ContainerMetadata:
    def __init__(self, key):
        self.ref_type, self.object_type, self.optional, self.key, self.flags = None, None, True, key, {}


class _Node:
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_flags_cache", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class DictConfig(_Node):
    pass


class ListConfig(_Node):
    pass


class AnyNode(_Node):
    pass


class Dictionary:
    def __init__(self, symbols):
        self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
        self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + symbols
        self.count = [1] * len(self.symbols)
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index, self.nspecial = 0, 1, 2, 3, 4


class ExtractorModeChoices(enum.Enum):
    default = "default"
    layer_norm = "layer_norm"


def omegaconf_like(value, key=None, parent=None):
    if isinstance(value, (dict, list)):
        node = DictConfig() if isinstance(value, dict) else ListConfig()
        node.__dict__.update(_metadata=ContainerMetadata(key), _parent=parent, _flags_cache=None)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        content = {k: omegaconf_like(v, k, node) for k, v in items}
        node._content = content if isinstance(value, dict) else list(content.values())
        return node
    node = AnyNode()
    node.__dict__.update(_metadata=ContainerMetadata(key), _parent=parent, _val=value, _flags_cache=None)
    return node


FAKE_MODULES = {"omegaconf": {}, "omegaconf.base": {"ContainerMetadata": ContainerMetadata},
                "omegaconf.dictconfig": {"DictConfig": DictConfig}, "omegaconf.listconfig": {"ListConfig": ListConfig},
                "omegaconf.nodes": {"AnyNode": AnyNode}, "fairseq": {}, "fairseq.data": {},
                "fairseq.data.dictionary": {"Dictionary": Dictionary},
                "fairseq.dataclass": {}, "fairseq.dataclass.constants": {"ExtractorModeChoices": ExtractorModeChoices}}


def save_like_fairseq(path, checkpoint, monkeypatch):
    """torch.save with the stand-in classes under omegaconf / fairseq module names, then those modules gone."""
    with monkeypatch.context() as m:
        for name, attrs in FAKE_MODULES.items():
            module = types.ModuleType(name)
            for attr, cls in attrs.items():
                setattr(module, attr, cls)
                m.setattr(cls, "__module__", name)
            m.setitem(sys.modules, name, module)
        torch.save(checkpoint, path)
    assert "fairseq" not in sys.modules and "omegaconf" not in sys.modules


def fairseq_model(arch, model_cfg, task_cfg, k, seed):
    """s3prl's vendored fairseq HubertModel (with a k-unit dictionary) or Wav2Vec2Model, random weights (norms too)."""
    if arch == "wav2vec2":
        from s3prl.upstream.wav2vec2 import wav2vec2_model as fs

        config_class, build = fs.Wav2Vec2Config, lambda cfg, task: fs.Wav2Vec2Model(cfg)
    else:
        from s3prl.upstream.hubert import hubert_model as fs

        config_class = fs.HubertConfig
        task_class = fs.HubertPretrainingConfig
        build = lambda cfg, task: fs.HubertModel(  # noqa: E731
            cfg, task_class(**{key: v for key, v in task.items() if key in task_class.__dataclass_fields__}),
            [Dictionary([str(i) for i in range(k)]).symbols])
    torch.manual_seed(seed)
    cfg = config_class(**{key: v for key, v in model_cfg.items() if key in config_class.__dataclass_fields__})
    return randomised(build(cfg, task_cfg), seed)


FAIRSEQ_CASES = {
    # post-LN group-norm CNN (Base layout), pretraining checkpoint
    "hubert_base_layout": dict(extractor_mode="default", layer_norm_first=False, normalize=False, embed=32,
                               finetuned=False),
    # pre-LN layer-norm CNN, normalised input, CNN as wide as the encoder (fairseq: no post_extract_proj)
    "hubert_large_layout_no_proj": dict(extractor_mode="layer_norm", layer_norm_first=True, normalize=True, embed=48,
                                        finetuned=False),
    # a CTC fine-tuned checkpoint: the pretrained model under w2v_encoder.w2v_model, its config in w2v_args
    "hubert_ctc_finetuned": dict(extractor_mode="default", layer_norm_first=False, normalize=False, embed=32,
                                 finetuned=True),
    # wav2vec 2.0 (Large-LV60 layout): quantizer / project_q / final_proj dropped, model_type "wav2vec2"
    "wav2vec2_large_layout": dict(arch="wav2vec2", extractor_mode="layer_norm", layer_norm_first=True, normalize=True,
                                  embed=32, finetuned=False),
}


@pytest.mark.parametrize("case", list(FAIRSEQ_CASES))
def test_fairseq_checkpoint_matches_vendored_fairseq_model(case, tmp_path, monkeypatch):
    c = FAIRSEQ_CASES[case]
    arch = c.get("arch", "hubert")
    conv = "[(48,10,5)] + [(48,3,2)] + [(48,2,2)]"
    task_cfg = {"_name": "hubert_pretraining", "data": "/data/manifests", "labels": ["km"], "label_dir": "/data/km",
                "label_rate": 800.0, "sample_rate": 16000, "normalize": c["normalize"], "enable_padding": False,
                "max_sample_size": 250000, "min_sample_size": 32000, "random_crop": True, "pad_audio": False}
    model_cfg = {"_name": "hubert", "label_rate": "${task.label_rate}", "extractor_mode": c["extractor_mode"],
                 "encoder_layers": 3, "encoder_embed_dim": c["embed"], "encoder_ffn_embed_dim": 64,
                 "encoder_attention_heads": 4, "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1,
                 "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.05,
                 "dropout_input": 0.1, "dropout_features": 0.1, "final_dim": 24, "untie_final_proj": True,
                 "layer_norm_first": c["layer_norm_first"], "conv_feature_layers": conv, "conv_bias": False,
                 "logit_temp": 0.1, "target_glu": False, "feature_grad_mult": 0.1, "mask_length": 10,
                 "mask_prob": 0.8, "conv_pos": 16, "conv_pos_groups": 4, "required_seq_len_multiple": 2}
    if arch == "wav2vec2":
        task_cfg = {"_name": "audio_pretraining", "data": "/data/manifests", "sample_rate": 16000,
                    "normalize": c["normalize"], "max_sample_size": 250000, "min_sample_size": 32000}
        model_cfg = {**{key: v for key, v in model_cfg.items() if key not in ("label_rate", "untie_final_proj")},
                     "_name": "wav2vec2", "quantize_targets": True, "latent_vars": 8, "latent_groups": 2,
                     "latent_temp": [2.0, 0.5, 0.999995]}
    fs_model = fairseq_model(arch, {**model_cfg, "label_rate": 800.0}, task_cfg, k=6, seed=3)
    assert (fs_model.post_extract_proj is None) == (c["embed"] == 48)
    model_cfg["extractor_mode"] = ExtractorModeChoices(c["extractor_mode"])  # an enum node, as fairseq's hydra has it
    cfg = {"_name": None, "common": {"seed": 1337, "fp16": True}, "task": task_cfg, "model": model_cfg,
           "criterion": {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                         "loss_weights": [10.0]}}
    state = dict(fs_model.state_dict())
    if c["finetuned"]:
        state = {f"w2v_encoder.w2v_model.{k}": v for k, v in state.items()
                 if not k.startswith(("final_proj.", "label_embs_concat"))}
        state["w2v_encoder.proj.weight"], state["w2v_encoder.proj.bias"] = torch.randn(29, 32), torch.zeros(29)
        cfg = {**cfg, "task": {"_name": "audio_finetuning", "normalize": c["normalize"], "labels": "ltr"},
               "model": {"_name": "hubert_ctc", "w2v_path": "/pretrained.pt", "apply_mask": True,
                         "w2v_args": {"task": task_cfg, "model": model_cfg}}, "criterion": {"_name": "ctc"}}
    checkpoint = {"args": None, "cfg": omegaconf_like(cfg), "model": state, "criterion": None,
                  "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                         "lr_scheduler_state": {"best": None}, "num_updates": 100}],
                  "task_state": {} if arch == "wav2vec2" else {"dictionaries": [
                      Dictionary(list("ABC") if c["finetuned"] else [str(i) for i in range(6)])]},
                  "extra_state": {"epoch": 2}, "last_optimizer_state": None}
    save_like_fairseq(tmp_path / "checkpoint_best.pt", checkpoint, monkeypatch)

    up = load(tmp_path / "checkpoint_best.pt", trust_pickle=True)
    config = up.model.config
    assert (config.feat_extract_norm, config.do_stable_layer_norm, config.normalize_waveform) == (
        {"default": "group", "layer_norm": "layer"}[c["extractor_mode"]], c["layer_norm_first"], c["normalize"])
    assert (config.hidden_size, config.num_hidden_layers, config.final_dim, config.layerdrop) == (
        c["embed"], 3, 24, 0.05)
    assert config.conv_layers == [(48, 10, 5), (48, 3, 2), (48, 2, 2)] and up.frame_rate == 800.0
    assert config.model_type == arch
    if arch == "wav2vec2":
        assert any(k.startswith("quantizer.") for k in state)  # the pretraining head really was there
    elif not c["finetuned"]:
        assert config.num_classes == [10]  # fairseq's dictionary: 4 special symbols + 6 units
    for n, seed in ((4000, 1), (2999, 2)):
        w = wav(n, seed)
        with torch.no_grad():
            assert_layers_close(ours(up, w), hooked_hidden(fs_model, w, c["normalize"]), f"{case} {n} samples")


def test_unreadable_and_mismatched_pickles_are_named(tmp_path, monkeypatch):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a fairseq or s3prl checkpoint \(keys found: \['epoch', "
                                              r"'state_dict'\]\)"):
        load_pickle(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable torch checkpoint"):
        load_pickle(tmp_path / "junk.pt")
    # an s3prl file whose weights lack a layer and carry a stranger: both listed
    torch.manual_seed(0)
    export_s3prl(HubertModel(group_norm()), tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    del raw["model_weight"]["encoder.layers.2.fc1.weight"]
    raw["model_weight"]["encoder.extra.weight"] = torch.zeros(1)
    torch.save(raw, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken\.pt: weights do not match.*missing \['encoder\.layers\.2\.fc1"
                                              r"\.weight'\]; unexpected \['encoder\.extra\.weight'\]"):
        load_pickle(tmp_path / "broken.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["model_cfg"]["activation_fn"] = "relu"
    raw["model_cfg"]["conv_feature_layers"] = "__import__('os').system('echo owned')"
    torch.save(raw, tmp_path / "relu.pt")
    with pytest.raises(CheckpointError, match=r"relu\.pt: .*activation_fn='relu' \(GELU only\); conv_feature_layers"):
        load_pickle(tmp_path / "relu.pt")


def test_conv_feature_layers_parser():
    paper = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    layers = parse_conv_layers(paper)
    assert layers == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert format_conv_layers(layers) == paper and parse_conv_layers(format_conv_layers(SMALL["conv_layers"])) == \
        SMALL["conv_layers"]
    assert parse_conv_layers(" [ (64, 3, 2), ] * 2 + 1 * [(8,1,1)]") == [(64, 3, 2), (64, 3, 2), (8, 1, 1)]
    for bad in ("__import__('os').system('true')", "[(1, 2)]", "[(1, 2, 3)] * 10**9", "[(1.5, 2, 3)]", "[]", "",
                "[(1,2,3)] - [(1,2,3)]", "[x for x in ()]"):
        with pytest.raises(ValueError, match="conv_feature_layers"):
            parse_conv_layers(bad)
    model_cfg, task_cfg = config_to_fairseq(group_norm())
    assert model_cfg["conv_feature_layers"] == "[(48,10,5)] + [(48,3,2)] + [(48,2,2)]"
    assert (model_cfg["label_rate"], task_cfg["label_rate"], task_cfg["normalize"]) == (800.0, 800.0, False)


# ----------------------------------------------------------------------------------------- the CLI verb
def test_cli_export_writes_both_formats(tmp_path, capsys):
    import transformers

    torch.manual_seed(0)
    model = randomised(HubertPretrainModel(group_norm(num_classes=[9])))
    save_model(model, model.config, tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "s3prl", str(tmp_path / "m.pt")]) == 0
    hf = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
    w = wav(4000, 1)
    with torch.no_grad():
        out = hf(w[None], output_hidden_states=True)
        mine = ours(model.hubert.eval(), w)
    assert_layers_close(mine, [h[0] for h in out.hidden_states[:-1]] + [out.last_hidden_state[0]], "transformers")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["dictionaries_symbols"] == [[str(i) for i in range(9)]]
    assert torch.equal(raw["model_weight"]["label_embs_concat"], model.label_embeddings)
    up = load(tmp_path / "m.pt", trust_pickle=True)
    with torch.no_grad():
        assert_layers_close(ours(up, w), mine, "s3prl file")
    # a pickle source: refused without --trust-pickle (one line), exported with it
    capsys.readouterr()
    assert main(["export", "--ckpt", str(tmp_path / "m.pt"), "--to", "hf", str(tmp_path / "hf2")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--trust-pickle" in err and "arbitrary code" in err
    assert main(["export", "--ckpt", str(tmp_path / "m.pt"), "--trust-pickle", "--to", "hf",
                 str(tmp_path / "hf2")]) == 0
    hf2 = transformers.HubertModel.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(w[None]).last_hidden_state, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    # an existing OUT needs --overwrite; a missing CKPT and an fbank model are one-line errors
    capsys.readouterr()
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "s3prl", str(tmp_path / "m.pt")]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--to", "s3prl", "--overwrite",
                 str(tmp_path / "m.pt")]) == 0
    assert main(["export", "--ckpt", str(tmp_path / "nope"), "--to", "s3prl", str(tmp_path / "n.pt")]) == 1
    assert "nope: no such checkpoint" in capsys.readouterr().err
    tiny = HubertPretrainModel(hubert_tiny(num_hidden_layers=1))
    save_model(tiny, tiny.config, tmp_path / "tiny")
    assert main(["export", "--ckpt", str(tmp_path / "tiny"), "--to", "s3prl", str(tmp_path / "t.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'fbank' frontend" in err
