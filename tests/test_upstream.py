import numpy as np
import pytest
import torch

from speechssl import upstream
from speechssl.errors import UserError
from speechssl.models import HubertPretrainModel, hubert_tiny, save_model


SEED = 1234  # not 0: random_init's default seed would rebuild exactly these (untrained) weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(SEED)
    cfg = hubert_tiny(num_hidden_layers=2)
    model = HubertPretrainModel(cfg)
    out = tmp_path_factory.mktemp("ckpt")
    save_model(model, cfg, out)
    return out, model


def test_every_layer_padded_batch_matches_single(ckpt):
    path, model = ckpt
    up = upstream.load(path)
    up.train()  # frozen: stays deterministic in train mode
    wavs = [torch.randn(16000), torch.randn(11200)]
    hs, lens = up(wavs)
    assert len(hs) == up.num_layers == 3
    assert lens.tolist() == [int(up.model.num_frames(16000)), int(up.model.num_frames(11200))]
    single, _ = up([wavs[1]])
    for h, s in zip(hs, single):
        torch.testing.assert_close(h[1, : lens[1]], s[0], atol=1e-4, rtol=1e-4)
    # the same weights as the pretraining model's encoder
    ref, _ = model.hubert.eval()(wavs[0][None], torch.tensor([16000]))
    torch.testing.assert_close(hs[-1][0], ref[-1][0], atol=1e-5, rtol=1e-5)


def test_layer_extractor_and_range(ckpt):
    path, _ = ckpt
    up = upstream.load(path)
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    fn = upstream.layer_extractor(up, 1, dtype=np.float32)
    out = fn(wav)
    full, _ = up([torch.from_numpy(wav)])
    np.testing.assert_allclose(out, full[1][0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        upstream.layer_extractor(up, 3)
    assert len(upstream.checkpoint_sha1(path)) == 40


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        upstream.load(tmp_path)


def _weights(up: upstream.Upstream) -> dict[str, torch.Tensor]:
    return up.model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_seeded_untrained_and_rng_neutral(ckpt, tmp_path):
    path, model = ckpt
    trained = upstream.load(path)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = upstream.random_init(path)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is untouched
    b = upstream.random_init(path, seed=0)
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(trained))
    assert not _same(_weights(a), _weights(upstream.random_init(path, seed=1)))
    # the same config, built the same way: with the seed the checkpoint was made under, its (untrained) weights
    assert _same(_weights(upstream.random_init(path, seed=SEED)), _weights(trained))
    assert a.model.config == trained.model.config and a.num_layers == trained.num_layers == 3
    assert a.source == f"random:{path}" and not a.model.training
    assert all(not p.requires_grad for p in a.parameters())
    # `random:CKPT` spelling of load == random_init(CKPT) (seed 0)
    c = upstream.load(f"random:{path}")
    assert _same(_weights(c), _weights(a)) and c.source == a.source
    # only config.json is read
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert _same(_weights(upstream.random_init(tmp_path)), _weights(a))
    wav = torch.randn(8000)
    hs, _ = a([wav])
    hs_b, _ = b([wav])
    for h, h_b in zip(hs, hs_b):
        torch.testing.assert_close(h, h_b, atol=0, rtol=0)


def test_parse_layers():
    assert upstream.parse_layers("all", 4) == [0, 1, 2, 3] == upstream.parse_layers(None, 4)
    assert upstream.parse_layers("3,0,3", 4) == [0, 3] == upstream.parse_layers([3, 0], 4)
    with pytest.raises(UserError, match=r"--layers '4': ckpt has hidden states 0\.\.3"):
        upstream.parse_layers("4", 4, "ckpt")
    with pytest.raises(UserError, match="comma-separated integers"):
        upstream.parse_layers("6;9", 13)
    with pytest.raises(UserError, match="hidden states"):
        upstream.parse_layers("", 13)


def test_group_norm_upstream_is_batch_independent(tmp_path):
    """Base layout (group-norm CNN): rows of a padded batch equal each utterance alone (the model's own default,
    whole-batch statistics as fairseq / transformers, does not)."""
    from speechssl.models import HubertModel, hubert_base

    torch.manual_seed(0)
    model = HubertModel(hubert_base(conv_layers=[(32, 10, 5), (32, 3, 2)], hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_conv_pos_embeddings=8,
                                    num_conv_pos_embedding_groups=2))
    wavs = [torch.randn(1600), torch.randn(12000)]
    lens = torch.tensor([1600, 12000])
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
    with torch.no_grad():
        default, frames = model.eval()(batch, lens)
    up = upstream.Upstream(model)
    hs, _ = up(batch, lens)
    alone, _ = up([wavs[0]])
    n = int(frames[0])
    torch.testing.assert_close(hs[-1][0, :n], alone[-1][0], atol=1e-4, rtol=1e-4)
    assert float((default[-1][0, :n] - alone[-1][0]).abs().max()) > 1e-2
