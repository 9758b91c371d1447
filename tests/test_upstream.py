import numpy as np
import pytest
import torch

from speechssl import upstream
from speechssl.models import HubertPretrainModel, hubert_tiny, save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
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
