"""speechssl.models: equivalence with transformers' HubertModel and fairseq's HuBERT (s3prl copy), pretraining
head behaviour, frontends, checkpoints. Tiny configs only; CPU, 1-2 threads."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from speechssl.models import (
    HubertConfig,
    HubertModel,
    HubertPretrainModel,
    export_hf,
    hubert_base,
    hubert_large,
    hubert_tiny,
    hubert_xlarge,
    load_model,
    save_model,
)
from speechssl.models.checkpoint import CheckpointError
from speechssl.models.config import HubertConfig

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.threads(2)  # torch and faiss threads, set per test by tests/conftest.py

SMALL = dict(conv_layers=[(48, 10, 5), (48, 3, 2), (48, 2, 2)], hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=64, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def small_post_ln(**kw):  # Base layout: group-norm CNN, post-LN
    return hubert_base(**{**SMALL, **kw})


def small_pre_ln(**kw):  # Large layout: layer-norm CNN, pre-LN
    return hubert_large(**{**SMALL, "normalize_waveform": False, **kw})


def padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, torch.tensor(lengths)


# ----------------------------------------------------------------------------------------- transformers equivalence
@pytest.mark.parametrize("make", [small_post_ln, small_pre_ln], ids=["post_ln_group", "pre_ln_layer"])
def test_hidden_states_match_transformers(make, tmp_path):
    import transformers

    torch.manual_seed(0)
    model = HubertModel(make()).eval()
    ours = set(model.state_dict())
    export_hf(model, tmp_path)
    hf = transformers.HubertModel.from_pretrained(tmp_path).eval()
    # same parameter names, same values (export is a copy, not a translation)
    assert ours == set(hf.state_dict()), ours ^ set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # randomise LayerNorm/bias params too so the comparison covers them
    with torch.no_grad():
        for p in list(model.parameters()):
            p.add_(0.05 * torch.randn_like(p))
        hf.load_state_dict(model.state_dict())

    wavs, lens = padded_batch([4000, 3000, 2500])
    with torch.no_grad():
        hs, frame_lens = model(wavs, lens)
        attention_mask = (torch.arange(wavs.shape[1])[None] < lens[:, None]).long()
        out = hf(wavs, attention_mask=attention_mask, output_hidden_states=True)
    assert len(hs) == len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert frame_lens.tolist() == hf._get_feat_extract_output_lengths(lens).tolist()
    # ours: input of every layer + encoder output (s3prl). transformers 5.x: input of every layer + last layer's
    # output before the final LayerNorm; its last_hidden_state is the encoder output.
    reference = list(out.hidden_states[:-1]) + [out.last_hidden_state]
    for layer, (a, b) in enumerate(zip(hs, reference)):
        for i, n in enumerate(frame_lens.tolist()):
            torch.testing.assert_close(a[i, :n], b[i, :n], atol=1e-5, rtol=1e-5, msg=f"layer {layer} row {i}")
    if model.config.do_stable_layer_norm:  # the pre-LN last state really is different in transformers
        assert not torch.allclose(hs[-1], out.hidden_states[-1], atol=1e-3)
    else:
        torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_export_hf_loads_from_checkpoint_dir_and_rejects_fbank(tmp_path):
    import transformers

    torch.manual_seed(1)
    cfg = small_post_ln()
    model = HubertPretrainModel(cfg).eval()
    save_model(model, cfg, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
    wavs, lens = padded_batch([3000])
    with torch.no_grad():
        torch.testing.assert_close(model.hubert(wavs, lens)[0][-1], hf(wavs).last_hidden_state, atol=1e-5, rtol=1e-5)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["do_normalize"] is False and pre["sampling_rate"] == 16000
    with pytest.raises(ValueError, match="fbank"):
        export_hf(HubertModel(hubert_tiny(num_hidden_layers=1)), tmp_path / "nope")


# ----------------------------------------------------------------------------------------- fairseq equivalence
def _fairseq_copy(model: HubertPretrainModel):
    """The same weights in s3prl's copy of fairseq's HubertModel (fairseq parameter names), built from the fairseq
    config speechssl.models.fairseq writes (unknown keys dropped, as s3prl's merge_with_parent does)."""
    from s3prl.upstream.hubert import hubert_model as fs

    from speechssl.models.fairseq import config_to_fairseq, to_fairseq_state

    model_cfg, task_cfg = config_to_fairseq(model.config)

    def build(cls, cfg):
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})

    ref = fs.HubertModel(build(fs.HubertConfig, model_cfg), build(fs.HubertPretrainingConfig, task_cfg),
                         [list(range(k)) for k in model.config.num_classes]).eval()
    ref.load_state_dict(to_fairseq_state(model), strict=True)
    return ref


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # s3prl uses the old weight_norm
@pytest.mark.parametrize("make", [small_post_ln, small_pre_ln], ids=["post_ln_group", "pre_ln_layer"])
def test_pretraining_loss_matches_fairseq(make, monkeypatch):
    from s3prl.upstream.hubert import hubert_model as fs

    torch.manual_seed(0)
    model = HubertPretrainModel(make(num_classes=[7, 5])).eval()
    with torch.no_grad():  # off the init (attention near uniform there): the comparison sees every weight's place
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = _fairseq_copy(model)
    wavs, lens = padded_batch([4000, 4000])
    T = int(model.hubert.num_frames(4000))
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 7, (2, T), generator=g), torch.randint(0, 5, (2, T), generator=g)]
    mask = model.compute_mask(torch.tensor([T, T]), T, torch.Generator().manual_seed(1))
    monkeypatch.setattr(fs, "compute_mask_indices", lambda *a, **k: mask.numpy())
    with torch.no_grad():
        out = model(wavs, lens, labels, mask=mask)
        res = ref(wavs, target_list=labels, padding_mask=torch.zeros_like(wavs, dtype=torch.bool), mask=True)
    # fairseq criterion: sum of masked CE over label sets / number of masked frames + 10 * features_pen
    n_masked = int(mask.sum())
    ce = [torch.nn.functional.cross_entropy(lg.float(), torch.zeros(lg.shape[0], dtype=torch.long), reduction="sum")
          for lg in res["logit_m_list"]]
    expected = sum(ce) / n_masked + 10.0 * res["features_pen"]
    torch.testing.assert_close(out["loss"], expected.float(), atol=1e-4, rtol=1e-5)
    for i in range(2):
        assert out["logs"][f"loss_m_{i}"] == pytest.approx(float(ce[i]) / n_masked, rel=1e-4)
    assert out["sample_size"] == n_masked
    assert out["logs"]["feature_pen"] == pytest.approx(float(res["features_pen"]), rel=1e-5)


# The shipped pretraining settings, from the YAML files themselves (a tiny encoder; everything the loss depends on:
# pred_masked_weight, pred_nomask_weight, feature_penalty_weight, logit_temp, final_proj tying, masking, as shipped).
TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, final_dim=16)


def _recipe_iter1_label_sets() -> list[int]:
    """``model.num_classes`` that recipes/hubert.sh passes to mini_synth's iteration 1: one target set per
    ``--feats1`` entry of egs/mini_synth/hubert/run.sh (fbank and MFCC units), each of ``k1`` classes."""
    feats1 = re.search(r'\{ feats1="([^"]+)"', (ROOT / "egs/mini_synth/hubert/run.sh").read_text()).group(1).split()
    k1 = int(re.search(r"^k1=(\d+)", (ROOT / "recipes/hubert.sh").read_text(), re.M).group(1))
    return [k1] * len(feats1)


def _shipped_config(conf: str, **changes) -> HubertConfig:
    model = yaml.safe_load((ROOT / conf).read_text())["model"]
    width = 48  # != hidden_size: fairseq has a post_extract_proj then, as the shipped models do
    model.update(TINY_ENCODER, conv_layers=[[width, k, s] for _, k, s in model["conv_layers"]], **changes)
    return HubertConfig.from_dict(model)


SHIPPED = {
    # mini_synth iteration 1 as the recipe runs it: fbank frontend, fbank + MFCC unit sets, unmasked frames
    # predicted too (pred_nomask_weight 1.0), padded rows
    "mini_synth_iter1": ("egs/mini_synth/hubert/conf/pretrain_iter1.yaml", {"num_classes": _recipe_iter1_label_sets()},
                         [4000, 3100]),
    # the same with unequal weights, another temperature and one final_proj shared by the sets, so that the masked
    # and unmasked terms cannot trade places, nor a constant stand for the config's value, unnoticed
    "mini_synth_iter1_varied": ("egs/mini_synth/hubert/conf/pretrain_iter1.yaml",
                                {"num_classes": [7, 5], "pred_masked_weight": 0.7, "pred_nomask_weight": 0.3,
                                 "logit_temp": 0.25, "untie_final_proj": False}, [4000, 2900]),
    # LibriSpeech HuBERT Base iteration 1: waveform CNN, feature penalty 10, masked frames only
    "librispeech_base_iter1": ("egs/librispeech/hubert/conf/hubert_base_iter1.yaml", {"num_classes": [7, 5]},
                               [4000, 4000]),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # s3prl uses the old weight_norm
@pytest.mark.parametrize("name", list(SHIPPED))
def test_pretraining_loss_matches_fairseq_with_the_shipped_settings(name, monkeypatch):
    """fairseq's HubertModel (s3prl's copy) and its ``hubert`` criterion on the same weights, mask and labels:

        loss = (pred_masked_weight * sum_sets sum_masked CE + pred_nomask_weight * sum_sets sum_unmasked CE)
               / sample_size + feature_penalty_weight * features_pen,
        sample_size = masked frames (if pred_masked_weight > 0) + unmasked frames (if pred_nomask_weight > 0)

    with the model section of the shipped YAML (tiny sizes). Masked and unmasked logits of every label set are
    compared too (fairseq: column 0 the target, then every unit with the target's own column at -inf). fairseq has
    only the waveform CNN, so for the fbank frontend its ``forward_features`` returns our frontend's output and its
    ``forward_padding_mask`` our frame padding (the rest of its model is its own)."""
    import s3prl.upstream.hubert.hubert_model as fs

    from speechssl.models.fairseq import config_to_fairseq, fairseq_name

    conf, changes, lengths = SHIPPED[name]
    cfg = _shipped_config(conf, **changes)
    if name.startswith("mini_synth_iter1"):  # what is shipped (so that this test follows the YAML)
        assert cfg.frontend == "fbank" and cfg.pred_nomask_weight > 0 and len(cfg.num_classes) == 2
    torch.manual_seed(0)
    model = HubertPretrainModel(cfg).eval()
    with torch.no_grad():  # off the init: every weight's place matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # projections and unit embeddings of norm below 1 (cosine similarity is scale-free: the normalisation
        # must not be)
        model.label_embeddings.mul_(0.05)
        model.final_proj.weight.mul_(0.05)
        model.final_proj.bias.mul_(0.05)

    fbank = cfg.frontend == "fbank"
    twin = HubertConfig.from_dict({**cfg.to_dict(), "frontend": "cnn", "feature_penalty_weight": 0.0,
                                   "conv_layers": [[48, 10, 5], [48, 8, 4], [48, 4, 4], [48, 2, 2], [48, 2, 2]]}) \
        if fbank else cfg  # the fairseq config of the fbank model: the same but for a CNN of 320x (unused)
    model_cfg, task_cfg = config_to_fairseq(twin)

    def build(cls, c):
        return cls(**{k: v for k, v in c.items() if k in cls.__dataclass_fields__})

    ref = fs.HubertModel(build(fs.HubertConfig, model_cfg), build(fs.HubertPretrainingConfig, task_cfg),
                         [list(range(k)) for k in cfg.num_classes]).eval()
    state = {fairseq_name(k, cfg.feat_extract_norm): v for k, v in model.state_dict().items()
             if not (fbank and k.startswith("hubert.feature_extractor."))}
    missing, unexpected = ref.load_state_dict(state, strict=not fbank)
    assert not unexpected and all(k.startswith("feature_extractor.") for k in missing)

    wavs, lens = padded_batch(lengths)
    with torch.no_grad():
        feats, frame_lens = model.hubert.extract_features(wavs, lens)
    B, T = len(lengths), feats.shape[1]
    padding = torch.arange(T)[None] >= frame_lens[:, None]
    if fbank:
        monkeypatch.setattr(ref, "forward_features", lambda source: feats.transpose(1, 2))
        monkeypatch.setattr(ref, "forward_padding_mask", lambda features, padding_mask: padding)
    else:
        assert not padding.any()  # fairseq's features penalty and group norm see the padding: equal lengths here
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, k, (B, T), generator=g) for k in cfg.num_classes]
    mask = model.compute_mask(frame_lens, T, torch.Generator().manual_seed(1))
    calls = []

    def fairseq_mask(shape, padding_mask, mask_prob, mask_length, *args, min_masks=0, **kw):
        calls.append((tuple(shape), mask_prob, mask_length, min_masks))
        return mask.numpy()

    monkeypatch.setattr(fs, "compute_mask_indices", fairseq_mask)
    ours_logits = []
    real_logits = model.logits
    monkeypatch.setattr(model, "logits", lambda x: ours_logits.append(real_logits(x)) or ours_logits[-1])
    with torch.no_grad():
        out = model(wavs, lens, labels, mask=mask)
        res = ref(wavs, target_list=labels, padding_mask=wavs == 0, mask=True)
    # fairseq draws its mask with the config's settings (min_masks 2 is fairseq HuBERT's, and the config's)
    assert calls == [((B, T), cfg.mask_prob, cfg.mask_length, cfg.mask_min_masks)]

    valid = ~padding
    sel = {"m": mask & valid, "u": valid & ~mask}
    assert sel["m"].any() and sel["u"].any()
    zero = {kind: [torch.zeros(lg.shape[0], dtype=torch.long) for lg in res[f"logit_{kind}_list"]] for kind in "mu"}
    ce = {kind: [torch.nn.functional.cross_entropy(lg.float(), z, reduction="sum")
                 for lg, z in zip(res[f"logit_{kind}_list"], zero[kind])] for kind in "mu"}
    n = {kind: int(sel[kind].sum()) for kind in "mu"}
    weight = {"m": cfg.pred_masked_weight, "u": cfg.pred_nomask_weight}
    sample_size = sum(n[kind] for kind in "mu" if weight[kind] > 0)
    expected = sum(weight[kind] * sum(ce[kind]) for kind in "mu" if weight[kind] > 0) / sample_size
    expected = expected + cfg.feature_penalty_weight * res["features_pen"]
    torch.testing.assert_close(out["loss"], expected.float(), atol=1e-4, rtol=1e-5)
    assert out["sample_size"] == sample_size
    for kind_i, kind in enumerate("mu"):
        for i in range(len(cfg.num_classes)):
            assert out["logs"][f"count_{kind}_{i}"] == n[kind]
            assert out["logs"][f"loss_{kind}_{i}"] == pytest.approx(float(ce[kind][i]) / n[kind], rel=1e-4)
            # the logits themselves: ours over all units, fairseq's target column first
            theirs = res[f"logit_{kind}_list"][i].float()
            target = labels[i][sel[kind]]
            full = theirs[:, 1:].clone()
            full[torch.arange(len(target)), target] = theirs[:, 0]
            torch.testing.assert_close(ours_logits[kind_i][i], full, atol=1e-4, rtol=1e-4)
            acc = float((full.argmax(-1) == target).float().mean())
            assert out["logs"][f"acc_{kind}_{i}"] == pytest.approx(acc)
    if cfg.feature_penalty_weight:
        assert out["logs"]["feature_pen"] == pytest.approx(float(res["features_pen"]), rel=1e-5)


# ----------------------------------------------------------------------------------------- pretraining head
def test_tiny_model_overfits_a_fixed_batch():
    """Random labels of two label sets on a fixed padded batch: masked CE must fall by >= 90% in 40 Adam steps."""
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                      conv_layers=[(64, 3, 2)], final_dim=32, num_classes=[20, 12], hidden_dropout=0.0,
                      attention_dropout=0.0, feat_proj_dropout=0.0, pred_nomask_weight=1.0)
    model = HubertPretrainModel(cfg).train()
    wavs, lens = padded_batch([6400, 6400, 4800], seed=3)
    T = int(model.hubert.num_frames(6400))
    g = torch.Generator().manual_seed(4)
    labels = [torch.randint(0, k, (3, T), generator=g) for k in cfg.num_classes]
    frame_lens = model.hubert.num_frames(lens)
    for lab in labels:
        lab[torch.arange(T)[None] >= frame_lens[:, None]] = -100
    mask = model.compute_mask(frame_lens, T, torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for step in range(40):
        out = model(wavs, lens, labels, mask=mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ce = out["logs"]["loss_m_0"] + out["logs"]["loss_m_1"]
        first = ce if first is None else first
    assert ce < 0.1 * first, (first, ce)
    assert out["logs"]["acc_m_0"] > 0.95 and out["logs"]["acc_u_1"] > 0.95


def test_pretrain_logs_masks_and_padding():
    torch.manual_seed(0)
    model = HubertPretrainModel(hubert_tiny(num_hidden_layers=2, num_classes=[50])).eval()
    wavs, lens = padded_batch([16000, 9000])
    frame_lens = model.hubert.num_frames(lens)
    T = int(frame_lens.max())
    labels = [torch.randint(0, 50, (2, T))]
    out = model(wavs, lens, labels, generator=torch.Generator().manual_seed(0))
    logs = out["logs"]
    for key in ["loss", "loss_m_0", "loss_u_0", "acc_m_0", "acc_u_0", "feature_pen", "mask_frac", "num_frames"]:
        assert isinstance(logs[key], float) and math.isfinite(logs[key]), key
    assert logs["num_frames"] == float(frame_lens.sum())
    mask = out["mask"]
    assert not mask[1, int(frame_lens[1]):].any()  # padded frames are never masked
    assert logs["count_m_0"] + logs["count_u_0"] == logs["num_frames"]  # padded frames carry no loss
    assert 0.2 < logs["mask_frac"] < 0.8
    # loss ignores label -100: relabelling an ignored frame's label changes nothing
    labels2 = [labels[0].clone()]
    labels2[0][mask] = -100
    out2 = model(wavs, lens, labels2, mask=mask)
    # the fbank frontend has no feature penalty, so nothing is left of the loss
    assert out2["logs"]["count_m_0"] == 0 and out2["logs"]["loss"] == 0.0 and out2["logs"]["feature_pen"] > 0


def _record_logits(model, monkeypatch) -> list:
    """The logits ``forward`` computes: one list per ``logits`` call (masked frames first, then unmasked)."""
    calls = []
    real = model.logits
    monkeypatch.setattr(model, "logits", lambda x: calls.append(real(x)) or calls[-1])
    return calls


def test_head_bookkeeping_on_one_frame_ignored_labels_and_gradients(monkeypatch):
    """The loss and logs on edge cases the fairseq comparison does not reach: a one-frame batch (every count 1),
    a label set whose masked frames are all -100 (``sample_size`` counts the first set's frames), unmasked logits
    computed without a graph when their weight is 0, nothing with a graph under no_grad."""
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=1, num_classes=[6, 4])
    model = HubertPretrainModel(cfg).eval()
    calls = _record_logits(model, monkeypatch)
    wavs, lens = padded_batch([400])
    assert int(model.hubert.num_frames(400)) == 1
    labels = [torch.tensor([[3]]), torch.tensor([[2]])]
    with torch.no_grad():
        out = model(wavs, lens, labels, mask=torch.tensor([[True]]))
    (m0, m1), (u0, u1) = calls
    ce = [torch.nn.functional.cross_entropy(m0, labels[0][0], reduction="sum"),
          torch.nn.functional.cross_entropy(m1, labels[1][0], reduction="sum")]
    logs = out["logs"]
    assert out["sample_size"] == 1 and logs["sample_size"] == 1.0 and logs["mask_frac"] == 1.0
    assert logs["num_frames"] == 1.0 and u0.shape == (0, 6) and u1.shape == (0, 4)
    assert float(out["loss"]) == pytest.approx(float(ce[0] + ce[1]), rel=1e-6)
    for i, (lg, lab) in enumerate(zip((m0, m1), labels)):
        assert logs[f"loss_m_{i}"] == pytest.approx(float(ce[i]), rel=1e-6) and logs[f"count_m_{i}"] == 1.0
        assert logs[f"acc_m_{i}"] == float(int(lg.argmax(-1)) == int(lab))
        assert logs[f"loss_u_{i}"] == 0.0 and logs[f"acc_u_{i}"] == 0.0 and logs[f"count_u_{i}"] == 0.0
    assert not m0.requires_grad  # under no_grad nothing keeps a graph
    # labelled as predicted: accuracy 1 on the one frame
    calls.clear()
    right = [lg.argmax(-1)[None] for lg in (m0, m1)]
    with torch.no_grad():
        logs = model(wavs, lens, right, mask=torch.tensor([[True]]))["logs"]
    assert logs["acc_m_0"] == 1.0 and logs["acc_m_1"] == 1.0

    # two rows; set 1 has no label on any masked frame; unmasked frames weigh 0.5
    model.config.pred_nomask_weight = 0.5
    model.train()
    calls.clear()
    wavs, lens = padded_batch([4000, 3000])
    frame_lens = model.hubert.num_frames(lens)
    T = int(frame_lens.max())
    mask = model.compute_mask(frame_lens, T, torch.Generator().manual_seed(0))
    labels = [torch.randint(0, 6, (2, T)), torch.randint(0, 4, (2, T))]
    labels[1][mask] = -100
    out = model(wavs, lens, labels, mask=mask)
    n_m, n_u = int(mask.sum()), int(frame_lens.sum()) - int(mask.sum())
    assert out["sample_size"] == n_m + n_u  # the first set's frames, masked and unmasked
    logs = out["logs"]
    assert logs["count_m_1"] == 0.0 and logs["loss_m_1"] == 0.0 and logs["acc_m_1"] == 0.0
    assert logs["count_m_0"] == n_m and logs["count_u_1"] == n_u
    assert all(lg.requires_grad for lg in calls[0] + calls[1])
    # with pred_nomask_weight 0 the unmasked logits are logged but carry no graph
    model.config.pred_nomask_weight = 0.0
    calls.clear()
    out = model(wavs, lens, labels, mask=mask)
    assert all(lg.requires_grad for lg in calls[0]) and not any(lg.requires_grad for lg in calls[1])
    assert out["sample_size"] == n_m


def test_forward_draws_its_mask_from_the_generator_only():
    model = HubertPretrainModel(hubert_tiny(num_hidden_layers=1, num_classes=[6])).eval()
    wavs, lens = padded_batch([9000, 7000])
    T = int(model.hubert.num_frames(lens).max())
    labels = [torch.randint(0, 6, (2, T))]
    torch.manual_seed(3)
    state = torch.get_rng_state()
    a = model(wavs, lens, labels, generator=torch.Generator().manual_seed(11))["mask"]
    assert torch.equal(torch.get_rng_state(), state)  # eval mode, a generator: torch's RNG untouched
    torch.manual_seed(4)
    b = model(wavs, lens, labels, generator=torch.Generator().manual_seed(11))["mask"]
    assert torch.equal(a, b)
    assert not a[1, int(model.hubert.num_frames(7000)):].any()


def test_labels_one_frame_short_carry_no_loss_on_the_last_frame_and_bad_values_are_named():
    model = HubertPretrainModel(hubert_tiny(num_hidden_layers=1, num_classes=[10])).eval()
    wavs, lens = padded_batch([16000, 16000])
    T = int(model.hubert.num_frames(16000))
    out = model(wavs, lens, [torch.randint(0, 10, (2, T - 1))], generator=torch.Generator().manual_seed(0))
    assert out["logs"]["count_m_0"] + out["logs"]["count_u_0"] == 2 * T - 2  # the padded frame: -100, no target
    with pytest.raises(ValueError, match=r"label set 0: values outside \[0, 10\) \(and not -100\): "
                                         r"\[10, 10, 10, 10, 10\]$"):
        model(wavs, lens, [torch.full((2, T), 10)])
    with pytest.raises(ValueError, match=r"^model.objective='hubert', model.model_type='wav2vec2': HuBERT's "
                                         r"masked-unit prediction pretrains a 'hubert' encoder \(wav2vec 2.0: "
                                         r"model.objective=wav2vec2 model.model_type=wav2vec2; BEST-RQ: "):
        HubertPretrainModel(hubert_tiny(model_type="wav2vec2"))
    with pytest.raises(ValueError, match=r"^model.objective='bestrq', model.model_type='hubert': HuBERT's"):
        HubertPretrainModel(hubert_tiny(objective="bestrq"))


def test_rows_without_frames_give_a_zero_loss():
    model = HubertPretrainModel(hubert_tiny(num_hidden_layers=1, num_classes=[6])).eval()
    T = int(model.hubert.num_frames(1000))
    out = model(torch.zeros(2, 1000), torch.tensor([0, 0]), [torch.full((2, T), -100)])
    assert out["logs"]["num_frames"] == 0.0 and out["logs"]["loss"] == 0.0 and out["logs"]["feature_pen"] == 0.0


def test_feature_penalty_is_the_waveform_cnns_and_refused_on_fbank():
    # waveform CNN (fairseq): loss = CE / sample_size + weight * mean(features^2) over valid frames
    torch.manual_seed(0)
    cfg = hubert_tiny(frontend="cnn", conv_layers=[(32, 10, 5), (32, 8, 4), (32, 4, 4), (32, 2, 2)],
                      feat_extract_norm="group", conv_bias=False, num_hidden_layers=1, num_classes=[20],
                      feature_penalty_weight=10.0)
    model = HubertPretrainModel(cfg).eval()
    wavs, lens = padded_batch([16000, 9000])
    T = int(model.hubert.num_frames(lens).max())
    labels = [torch.full((2, T), -100, dtype=torch.long)]
    out = model(wavs, lens, labels)
    with torch.no_grad():
        feats, flens = model.hubert.extract_features(wavs, lens)
    valid = torch.arange(feats.shape[1])[None] < flens[:, None]
    expected = 10.0 * float(feats[valid].pow(2).mean())
    assert out["logs"]["loss"] == pytest.approx(expected, rel=1e-5) and expected > 0
    # fbank frontend: the penalty collapses it (see HubertConfig), so a config asking for it is refused
    assert hubert_tiny().feature_penalty_weight == 0.0
    with pytest.raises(ValueError, match="feature_penalty_weight=10 with the fbank frontend"):
        hubert_tiny(feature_penalty_weight=10.0)


def test_label_length_mismatch():
    model = HubertPretrainModel(hubert_tiny(num_hidden_layers=1, num_classes=[10])).eval()
    wavs, lens = padded_batch([16000])
    T = int(model.hubert.num_frames(16000))
    for dt in (-1, 0, 1):  # one frame either way is cropped / padded
        assert math.isfinite(model(wavs, lens, [torch.randint(0, 10, (1, T + dt))])["logs"]["loss"])
    with pytest.raises(ValueError, match="more than 1 frame"):
        model(wavs, lens, [torch.randint(0, 10, (1, T + 2))])
    with pytest.raises(ValueError, match="more than 1 frame"):
        model(wavs, lens, [torch.randint(0, 10, (1, T // 2))])
    with pytest.raises(ValueError, match="outside"):
        model(wavs, lens, [torch.full((1, T), 10)])
    with pytest.raises(ValueError, match="label sets"):
        model(wavs, lens, [torch.zeros(1, T, dtype=torch.long)] * 2)


def test_feature_grad_mult():
    wavs, lens = padded_batch([4000, 3000])
    grads = {}
    for fgm in (0.0, 0.1, 1.0):
        torch.manual_seed(0)
        model = HubertModel(small_post_ln(feature_grad_mult=fgm, hidden_dropout=0.0, attention_dropout=0.0,
                                          feat_proj_dropout=0.0, layerdrop=0.0))
        hs, _ = model(wavs, lens)
        hs[-1].pow(2).mean().backward()
        conv = model.feature_extractor.conv_layers[0].conv.weight.grad
        grads[fgm] = None if conv is None else conv.clone()
        assert model.feature_projection.projection.weight.grad is not None
    assert grads[0.0] is None  # no autograd through the CNN at all
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-4, atol=1e-9)


def test_layerdrop_only_in_training():
    torch.manual_seed(0)
    model = HubertModel(small_pre_ln(layerdrop=0.5))
    wavs, lens = padded_batch([4000])
    model.eval()
    with torch.no_grad():
        a, b = model(wavs, lens)[0][-1], model(wavs, lens)[0][-1]
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        outs = [model(wavs, lens)[0][-1] for _ in range(8)]
    assert any(not torch.allclose(o, a, atol=1e-6) for o in outs)  # dropout of layers changes the output


def test_num_layers_prefix_matches_full_run():
    model = HubertModel(small_pre_ln()).eval()
    wavs, lens = padded_batch([4000, 2000])
    with torch.no_grad():
        full, _ = model(wavs, lens)
        part, _ = model(wavs, lens, num_layers=2)
    assert len(part) == 3
    for a, b in zip(part, full):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------- frontends
def test_fbank_frontend_frame_counts_and_batch_independence():
    torch.manual_seed(0)
    model = HubertModel(hubert_tiny(num_hidden_layers=1)).eval()
    assert model.downsample_rate == 320 and model.frame_rate == 50.0
    lengths = [64000, 16000, 15999, 401, 400, 399, 1000]
    for n in lengths:
        if n >= 400:
            wavs, lens = padded_batch([n])
            with torch.no_grad():
                feats, fl = model.extract_features(wavs, lens)
            assert feats.shape[1] == int(model.num_frames(n)) == int(fl[0]), n
    assert int(model.num_frames(399)) == 0
    assert model.num_frames(torch.tensor([64000, 16000])).tolist() == [199, 49]
    # a padded row's valid frames equal its unpadded forward (fbank CMVN and convs are per utterance)
    wavs, lens = padded_batch([16000, 9000])
    with torch.no_grad():
        hs, fl = model(wavs, lens)
        alone, _ = model(wavs[1:, :9000], lens[1:])
    torch.testing.assert_close(hs[-1][1, : int(fl[1])], alone[-1][0], atol=1e-5, rtol=1e-5)


def test_cnn_frontend_frame_formula():
    model = HubertModel(hubert_base(num_hidden_layers=1, conv_layers=[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2))
    # 320x downsampling with a 400-sample receptive field: floor((S - 400) / 320) + 1
    for s in [400, 719, 720, 16000, 64000, 250000]:
        assert int(model.num_frames(s)) == (s - 400) // 320 + 1
        with torch.no_grad():
            assert model.extract_features(torch.zeros(1, s))[0].shape[1] == (s - 400) // 320 + 1
    assert int(model.num_frames(399)) == 0


# ----------------------------------------------------------------------------------------- configs
def test_builders_and_parameter_counts():
    def count(cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in HubertModel(cfg).parameters())
    assert 94e6 < count(hubert_base()) < 95e6  # HuBERT Base ~95M
    assert 315e6 < count(hubert_large()) < 317e6  # Large ~316M
    assert 0.9e9 < count(hubert_xlarge()) < 1.0e9  # X-Large ~1B
    assert 4e6 < count(hubert_tiny()) < 6e6
    base = hubert_base(num_classes=[500])
    assert (base.final_dim, base.feature_grad_mult, base.layerdrop, base.do_stable_layer_norm) == (256, 0.1, 0.05, False)
    large = hubert_large()
    assert (large.final_dim, large.feat_extract_norm, large.do_stable_layer_norm, large.hidden_dropout) == (
        768, "layer", True, 0.0)
    assert hubert_xlarge().final_dim == 1024 and hubert_xlarge().hidden_size == 1280


def test_config_json_round_trip_and_unknown_keys():
    cfg = hubert_tiny(num_classes=[100, 500])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert HubertConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="hidden_sise"):
        HubertConfig.from_dict({**data, "hidden_sise": 3})
    with pytest.raises(ValueError, match="hidden_sise"):
        hubert_base(hidden_sise=3)
    with pytest.raises(ValueError, match="frontend"):
        hubert_base(frontend="mel")


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=2, num_classes=[30, 40])
    model = HubertPretrainModel(cfg).eval()
    save_model(model, cfg, tmp_path / "ck", extra={"step": 12, "labels": ["km100", "km500"]})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["extra"]["step"] == 12 and meta["model"]["num_classes"] == [30, 40]
    loaded = load_model(tmp_path / "ck")
    assert isinstance(loaded, HubertPretrainModel) and not loaded.training
    wavs, lens = padded_batch([8000, 5000])
    T = int(model.hubert.num_frames(8000))
    labels = [torch.randint(0, 30, (2, T)), torch.randint(0, 40, (2, T))]
    mask = model.compute_mask(model.hubert.num_frames(lens), T, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(wavs, lens, labels, mask=mask)["loss"], loaded(wavs, lens, labels, mask=mask)["loss"])
        bare = load_model(tmp_path / "ck", pretrain_head=False)
        assert isinstance(bare, HubertModel)
        for a, b in zip(model.hubert(wavs, lens)[0], bare(wavs, lens)[0]):
            assert torch.equal(a, b)
    # overwrite in place is atomic and replaces the old content
    save_model(model.hubert, cfg, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="pretrain_head=False"):
        load_model(tmp_path / "ck")


def test_checkpoint_key_mismatch_is_reported(tmp_path):
    cfg = hubert_tiny(num_hidden_layers=2)
    save_model(HubertPretrainModel(cfg), cfg, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["num_hidden_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing keys \['hubert\.encoder\.layers\.2\."):
        load_model(tmp_path / "ck")
    meta["model"]["num_hidden_layers"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['hubert\.encoder\.layers\.1\."):
        load_model(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "missing")
    # nothing is pickled: the weights file is safetensors, the config plain JSON
    assert (tmp_path / "ck" / "model.safetensors").read_bytes()[8:9] == b"{"


# ----------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_forward_backward_tiny():
    torch.manual_seed(0)
    model = HubertPretrainModel(hubert_tiny(num_hidden_layers=2, num_classes=[50])).train()
    wavs, lens = padded_batch([16000, 12000])
    T = int(model.hubert.num_frames(16000))
    labels = [torch.randint(0, 50, (2, T))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(wavs, lens, labels)
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_normalize_waveform_is_per_utterance():
    torch.manual_seed(0)
    model = HubertModel(small_pre_ln(normalize_waveform=True)).eval()  # Large layout: layer-norm CNN, pre-LN
    wavs, lens = padded_batch([4000, 2600])
    with torch.no_grad():
        hs, fl = model(wavs, lens)
        scaled, _ = model(3.0 * wavs + 0.2, lens)  # gain and DC offset are normalised away (padding stays ignored)
        alone, _ = model(wavs[1:, :2600], lens[1:])
    n = int(fl[1])
    torch.testing.assert_close(scaled[-1][:, :n], hs[-1][:, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hs[-1][1, :n], alone[-1][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c_in,c_out,kernel,stride,padding,bias", [
    (1, 16, 10, 5, 0, False),    # Base CNN layer 0 (waveform)
    (16, 16, 3, 2, 0, True),     # Base CNN layers 1-4 (conv_bias: Large)
    (16, 8, 2, 2, 0, False),     # Base CNN layers 5-6
    (80, 32, 3, 2, 1, True),     # fbank frontend (padding kernel // 2)
    (4, 4, 5, 1, 2, True),
])
def test_conv1d_matmul_equals_conv1d_with_gradients(c_in, c_out, kernel, stride, padding, bias):
    """The frontend's convs run as one matmul over unfolded windows: same values and gradients as nn.Conv1d."""
    from speechssl.models.frontend import conv1d_matmul

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)
    for frames in (kernel - 2 * padding, 57, 400):
        x = torch.randn(3, c_in, frames, requires_grad=True)
        ours, ref = conv1d_matmul(conv, x), conv(x)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(ours, [x, conv.weight], g)
        refs = torch.autograd.grad(ref, [x, conv.weight], g)
        for a, b in zip(grads, refs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError):   # shorter than the kernel: nn.Conv1d's own error
        conv1d_matmul(conv, torch.randn(1, c_in, kernel - 2 * padding - 1))
