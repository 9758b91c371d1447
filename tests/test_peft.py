"""speechssl.models.peft: adapters and LoRA on a frozen encoder. Exact start (zero init) in every layout, where
the adapter sits, only the tuned parameters move, LoRA merges into a plain model, base keys untouched, strict
partial state dicts. Small configs only (the Base one is built on the meta device, to count)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speechssl.models import HubertModel, hubert_base, hubert_large, hubert_tiny
from speechssl.models.peft import (
    Adapter,
    AdaptedFeedForward,
    LoRALinear,
    add_adapters,
    add_lora,
    freeze_for_tuning,
    load_trainable_state_dict,
    merge_lora,
    trainable_state_dict,
)
from speechssl.models.transformer import FeedForward

pytestmark = pytest.mark.threads(2)  # torch and faiss threads, set per test by tests/conftest.py

SMALL = dict(conv_layers=[(32, 10, 5), (32, 3, 2), (32, 2, 2)], hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=64, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
WAVLM = dict(model_type="wavlm", num_buckets=32, max_bucket_distance=64)

CONFIGS = {
    "post_ln": lambda: hubert_base(**SMALL),
    "pre_ln": lambda: hubert_large(**SMALL, normalize_waveform=False),
    "wavlm_post_ln": lambda: hubert_base(**SMALL, **WAVLM),
    "wavlm_pre_ln": lambda: hubert_large(**SMALL, **WAVLM, normalize_waveform=False),
}


def small_model(kind: str, seed: int = 0) -> HubertModel:
    torch.manual_seed(seed)
    model = HubertModel(CONFIGS[kind]())
    with torch.no_grad():  # move LayerNorms and biases off their init too, so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch(lengths=(4000, 2900), seed=1):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wavs[i, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, torch.tensor(lengths)


@torch.no_grad()
def hidden(model: HubertModel, wavs, lens) -> list[torch.Tensor]:
    return model(wavs, lens)[0]


def randomize(model: nn.Module, *, adapters=True, lora=True, scale=0.1, seed=5) -> None:
    """Nonzero adapter up-projections and LoRA B (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if adapters and isinstance(m, Adapter):
                m.up_proj.weight.copy_(scale * torch.randn(m.up_proj.weight.shape, generator=g))
                m.up_proj.bias.copy_(scale * torch.randn(m.up_proj.bias.shape, generator=g))
            if lora and isinstance(m, LoRALinear):
                m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=g))


def add(model, method, **kw):
    if method == "adapters":
        return add_adapters(model, dim=8, **kw)
    if method == "lora":
        return add_lora(model, rank=4, alpha=8, **kw)
    return add_adapters(model, dim=8, **kw) + add_lora(model, rank=4, alpha=8, **kw)


# ------------------------------------------------------------------------------------------ (1) exact start
@pytest.mark.parametrize("method", ["adapters", "lora", "both"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_zero_init_output_equals_base_exactly(kind, method):
    base = small_model(kind)
    tuned = copy.deepcopy(base)
    added = add(tuned, method)
    assert added
    wavs, lens = batch()
    ref, out = hidden(base, wavs, lens), hidden(tuned, wavs, lens)
    assert len(ref) == len(out) == base.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(ref, out)):
        assert torch.equal(a, b), f"{kind} {method}: hidden state {i} differs from the base model's"
    # and the modules are live: trained (nonzero) weights change every layer's output
    randomize(tuned)
    moved = hidden(tuned, wavs, lens)
    assert torch.equal(moved[0], ref[0])  # the input of layer 0 is before any adapter / LoRA
    for i in range(1, len(ref)):
        assert not torch.allclose(moved[i], ref[i], atol=1e-4), f"{kind} {method}: layer {i - 1} unchanged"


@pytest.mark.parametrize("method", ["adapters", "lora"])
def test_only_top_layers_are_tuned(method):
    base = small_model("post_ln")
    tuned = copy.deepcopy(base)
    added = add(tuned, method, layers=1)
    top = base.config.num_hidden_layers - 1
    assert added and all(name.startswith(f"encoder.layers.{top}.") for name in added), added
    randomize(tuned)
    wavs, lens = batch()
    ref, out = hidden(base, wavs, lens), hidden(tuned, wavs, lens)
    for i in range(top + 1):  # inputs of layers 0..top: untouched
        assert torch.equal(ref[i], out[i]), i
    assert not torch.allclose(ref[-1], out[-1], atol=1e-4)


@pytest.mark.parametrize("kind", ["post_ln", "pre_ln", "wavlm_pre_ln"])
def test_adapter_sits_on_the_ffn_output_before_the_residual(kind):
    """post-LN: x = LN'(x + A(FFN(x))); pre-LN: x = x + A(FFN(LN'(x))), with A(f) = f + up(GELU(down(LN(f))))."""
    model = small_model(kind)
    add_adapters(model, dim=8)
    randomize(model)
    layer = model.encoder.layers[1]
    ff, adapter = layer.feed_forward, layer.feed_forward.adapter
    assert isinstance(ff, AdaptedFeedForward)

    def A(f):
        return f + adapter.up_proj(F.gelu(adapter.down_proj(adapter.layer_norm(f))))

    torch.manual_seed(3)
    x = torch.randn(2, 7, model.config.hidden_size)
    position_bias = None
    if model.config.model_type == "wavlm":
        position_bias = model.encoder.layers[0].attention.compute_bias(7)
    with torch.no_grad():
        out, _ = layer(x, None, position_bias)
        a, _ = layer.attend(layer.layer_norm(x) if layer.pre_ln else x, None, position_bias)
        if layer.pre_ln:
            h = x + a
            expected = h + A(FeedForward.forward(ff, layer.final_layer_norm(h)))
        else:
            h = layer.layer_norm(x + a)
            expected = layer.final_layer_norm(h + A(FeedForward.forward(ff, h)))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_compiles_without_graph_breaks():
    model = small_model("pre_ln")
    add_adapters(model, dim=8)
    add_lora(model, rank=4)
    randomize(model)
    layer = model.encoder.layers[2]
    x = torch.randn(2, 5, model.config.hidden_size)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, None)[0], layer(x, None)[0])


# ---------------------------------------------------------------------------------- (2) trainable fractions
ADAPTER_PARAMS = lambda d, dim: 2 * d + (d * dim + dim) + (dim * d + d)  # noqa: E731  LN, down, up


def test_trainable_fraction_base():
    with torch.device("meta"):  # count only: no memory, no init time
        model = HubertModel(hubert_base())
    n_base = sum(p.numel() for p in model.parameters())
    added = add_adapters(model, dim=64)
    names, n_trainable, n_total = freeze_for_tuning(model, "adapters", head_prefixes=())
    assert names == added
    assert n_trainable == 12 * ADAPTER_PARAMS(768, 64) == 1_208_064
    assert n_total == n_base + n_trainable
    assert n_trainable / n_total < 0.10  # 1.26% of 95.6M
    with torch.device("meta"):
        model = HubertModel(hubert_base())
    add_lora(model, rank=8, alpha=16)
    _, n_lora, n_total = freeze_for_tuning(model, "lora", head_prefixes=())
    assert n_lora == 12 * 2 * 2 * 8 * 768  # q and v: A [8, 768] + B [768, 8]
    assert n_lora / n_total < 0.01  # 0.31%


def test_adapters_on_top_layers_only_tiny():
    model = HubertModel(hubert_tiny())
    layers = model.encoder.layers
    added = add_adapters(model, dim=32, layers=2)
    for i, layer in enumerate(layers):
        assert isinstance(layer.feed_forward, AdaptedFeedForward) == (i >= 4), i
    assert {name.split(".")[2] for name in added} == {"4", "5"}
    _, n_trainable, _ = freeze_for_tuning(model, "adapters", head_prefixes=())
    assert n_trainable == 2 * ADAPTER_PARAMS(256, 32)


@pytest.mark.parametrize("bad", [0, 4, -1, True, 1.5])
def test_layers_out_of_range(bad):
    model = small_model("post_ln")
    for fn in (add_adapters, add_lora):
        with pytest.raises(ValueError, match="layers must be"):
            fn(model, layers=bad)


# ------------------------------------------------------------------------------- (3) only trainables move
class WithHead(nn.Module):
    def __init__(self, config, vocab=6):
        super().__init__()
        self.hubert = HubertModel(config)
        self.lm_head = nn.Linear(config.hidden_size, vocab)

    def forward(self, wavs, lens):
        return self.lm_head(self.hubert(wavs, lens)[0][-1])


@pytest.mark.parametrize("method", ["adapters", "lora"])
def test_one_step_changes_only_trainable_parameters(method):
    torch.manual_seed(0)
    model = WithHead(hubert_tiny(num_hidden_layers=3))
    added = add(model.hubert, method)
    names, n_trainable, n_total = freeze_for_tuning(model, method)
    assert names == ["hubert." + n for n in added] + ["lm_head.weight", "lm_head.bias"]
    params = dict(model.named_parameters())
    assert n_trainable == sum(params[n].numel() for n in names)
    assert n_total == sum(p.numel() for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all of them: frozen must still hold
    wavs, lens = batch((8000, 6400))
    for _ in range(2):  # step 2: down_proj / lora_A get gradient once up_proj / lora_B moved off zero
        logits = model(wavs, lens)
        target = torch.randint(0, logits.shape[-1], logits.shape[:2], generator=torch.Generator().manual_seed(2))
        loss = F.cross_entropy(logits.transpose(1, 2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    trainable = set(names)
    for k, v in before.items():
        if k in trainable:
            assert not torch.equal(v, after[k]), f"trainable {k} did not change"
        else:
            assert torch.equal(v, after[k]), f"frozen {k} changed"
            assert params.get(k) is None or params[k].grad is None, k


def test_full_mode_trains_everything():
    model = WithHead(hubert_tiny(num_hidden_layers=2))
    for p in model.hubert.encoder.parameters():
        p.requires_grad_(False)
    names, n_trainable, n_total = freeze_for_tuning(model, "full")
    assert names == [n for n, _ in model.named_parameters()]
    assert n_trainable == n_total == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_errors():
    model = WithHead(hubert_tiny(num_hidden_layers=2))
    with pytest.raises(ValueError, match="tuning mode"):
        freeze_for_tuning(model, "bitfit")
    with pytest.raises(ValueError, match="add_adapters"):
        freeze_for_tuning(model, "adapters")
    with pytest.raises(ValueError, match="add_lora"):
        freeze_for_tuning(model, "lora")
    add_adapters(model.hubert)
    with pytest.raises(ValueError, match="'classifier'"):
        freeze_for_tuning(model, "adapters", head_prefixes=("classifier",))
    # a prefix matches on a name boundary: "lm" is not "lm_head"
    with pytest.raises(ValueError, match="'lm'"):
        freeze_for_tuning(model, "adapters", head_prefixes=("lm",))


# --------------------------------------------------------------------------------------------- (4) merge LoRA
@pytest.mark.parametrize("kind", ["post_ln", "pre_ln", "wavlm_post_ln"])
def test_merge_lora_gives_a_plain_model_with_the_same_outputs(kind):
    base = small_model(kind)
    base_keys = list(base.state_dict())
    tuned = copy.deepcopy(base)
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense")
    add_lora(tuned, rank=4, alpha=8, targets=targets)
    randomize(tuned, scale=0.2)
    wavs, lens = batch()
    with_lora = hidden(tuned, wavs, lens)
    assert not torch.allclose(with_lora[-1], hidden(base, wavs, lens)[-1], atol=1e-3)  # LoRA does something

    merged_names = merge_lora(tuned)
    assert len(merged_names) == len(targets) * base.config.num_hidden_layers
    assert not any(isinstance(m, LoRALinear) for m in tuned.modules())
    assert list(tuned.state_dict()) == base_keys
    for a, b in zip(with_lora, hidden(tuned, wavs, lens)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # a plain HubertModel: loads strictly into a fresh one and computes the same
    plain = HubertModel(base.config).eval()
    plain.load_state_dict(tuned.state_dict(), strict=True)
    for a, b in zip(with_lora, hidden(plain, wavs, lens)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert merge_lora(tuned) == []


def test_lora_scaling_is_alpha_over_rank():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    holder = nn.Module()
    holder.proj = lin
    lora = LoRALinear(lin, rank=2, alpha=6)
    assert lora.weight is lin.weight and lora.bias is lin.bias
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = x @ w.T + b + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)
    assert lora.lora_A.abs().sum() > 0 and lora.lora_A.shape == (2, 6) and lora.lora_B.shape == (5, 2)


# ------------------------------------------------------------------------------------- (5) base keys untouched
@pytest.mark.parametrize("method", ["adapters", "lora", "both"])
@pytest.mark.parametrize("kind", ["post_ln", "wavlm_pre_ln"])
def test_base_keys_unchanged_and_base_weights_load(kind, method):
    base = small_model(kind)
    base_state = base.state_dict()
    torch.manual_seed(9)
    tuned = HubertModel(base.config).eval()  # other random weights
    added = add(tuned, method)
    keys = list(tuned.state_dict())
    assert [k for k in keys if k not in set(added)] == list(base_state)  # same names, same order
    assert set(keys) - set(base_state) == set(added)
    result = tuned.load_state_dict(base_state, strict=False)
    assert sorted(result.missing_keys) == sorted(added)
    assert result.unexpected_keys == []
    for k, v in base_state.items():
        assert torch.equal(tuned.state_dict()[k], v), k
    wavs, lens = batch()
    for a, b in zip(hidden(base, wavs, lens), hidden(tuned, wavs, lens)):
        assert torch.equal(a, b)


def test_twice_and_unknown_targets_are_errors():
    model = small_model("post_ln")
    add_adapters(model, layers=1)
    with pytest.raises(ValueError, match="layer 2 already has an adapter"):
        add_adapters(model)
    assert not any(isinstance(l.feed_forward, AdaptedFeedForward) for l in model.encoder.layers[:2])  # all or nothing
    add_lora(model, targets=("q_proj",))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, targets=("q_proj",))
    with pytest.raises(ValueError, match="'qkv'"):
        add_lora(model, targets=("qkv",))
    with pytest.raises(ValueError, match="'proj'"):  # ambiguous: no Linear named exactly that
        add_lora(model, targets=("proj",))
    with pytest.raises(TypeError, match="Encoder"):
        add_adapters(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ partial state dicts
def test_trainable_state_dict_round_trip_and_strict_keys():
    torch.manual_seed(0)
    model = WithHead(hubert_tiny(num_hidden_layers=2))
    add_adapters(model.hubert, dim=8)
    names, _, _ = freeze_for_tuning(model, "adapters")
    randomize(model)
    state = {k: v.clone() for k, v in trainable_state_dict(model, names).items()}
    assert list(state) == names
    assert trainable_state_dict(model).keys() == state.keys()  # default: the requires_grad set

    other = WithHead(hubert_tiny(num_hidden_layers=2))
    add_adapters(other.hubert, dim=8)
    freeze_for_tuning(other, "adapters")
    load_trainable_state_dict(other, state)
    for k in names:
        assert torch.equal(dict(other.named_parameters())[k], state[k]), k

    with pytest.raises(ValueError, match="not parameters.*'nope'"):
        trainable_state_dict(model, names + ["nope"])
    short = dict(state)
    del short["lm_head.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.bias'\]"):
        load_trainable_state_dict(other, short)
    extra = {**state, "hubert.encoder.layer_norm.weight": torch.ones(32)}
    with pytest.raises(ValueError, match=r"unexpected keys \['hubert.encoder.layer_norm.weight'\].*frozen"):
        load_trainable_state_dict(other, extra)
    with pytest.raises(ValueError, match="unexpected keys.*'bogus'"):
        load_trainable_state_dict(other, {**state, "bogus": torch.zeros(1)})
    bad = {**state, "lm_head.weight": torch.zeros(3, 3)}
    before = dict(other.named_parameters())["lm_head.bias"].clone()
    with pytest.raises(ValueError, match="lm_head.weight: \\(3, 3\\)"):
        load_trainable_state_dict(other, {**bad, "lm_head.bias": before + 1})
    assert torch.equal(dict(other.named_parameters())["lm_head.bias"], before)  # nothing copied on error
