"""`speechssl extract`: batch independence of both frontends (against each utterance alone and against transformers),
store contents against per-utterance forwards, sharding (no rank / rank / torchrun env: the same bytes), resume
after SIGKILL, header mismatch, one-line option errors, chunked inference of long recordings.

Tiny models: a Base-layout group-norm CNN (48 channels, 3 layers of 32) and the fbank frontend (hubert_tiny).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl import upstream
from speechssl.audio import save_audio
from speechssl.cli import main
from speechssl.data.kaldi import DataDir, write_data_dir
from speechssl.features.store import FeatureReader, FeatureStoreError
from speechssl.models import HubertModel, HubertPretrainModel, export_hf, hubert_base, hubert_large, hubert_tiny, save_model
from speechssl.models.frontend import set_per_row_norm
from speechssl.upstream.extract import chunked_forward, extract, layer_dir, plan_windows

SR = 16000
SMALL = dict(conv_layers=[(48, 10, 5), (48, 3, 2), (48, 2, 2)], hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=64, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
DURATIONS = (0.3, 2.7, 1.1, 0.5, 4.0, 1.6, 0.8)  # very different lengths: lots of padding in a batch
FP16 = dict(atol=1e-3, rtol=1e-3)  # float16 store: half an ulp is 4.9e-4 of the value


def tones_and_noise(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f = rng.uniform(150, 3000, 3)
    wav = sum(0.2 * np.sin(2 * np.pi * fi * t + rng.uniform(0, 6)) for fi in f) + 0.05 * rng.standard_normal(n)
    return wav.astype(np.float32)


def make_data(root: Path, durations=DURATIONS, pipe_from: int | None = None, sleep: float = 0.0) -> Path:
    """A Kaldi dir of WAVs; utterances whose sorted index >= ``pipe_from`` are read through ``sleep S; cat F |``."""
    root.mkdir(parents=True, exist_ok=True)
    utts = [f"spk{i % 2}-utt{i:02d}" for i in range(len(durations))]
    scp = {}
    for i, (u, d) in enumerate(zip(utts, durations)):
        path = root / f"{u}.wav"
        save_audio(path, tones_and_noise(int(d * SR), i))
        scp[u] = f"sleep {sleep}; cat {path} |" if pipe_from is not None and i >= pipe_from else str(path)
    write_data_dir(DataDir(wav_scp=scp, utt2spk={u: u.split("-")[0] for u in utts}), root / "data")
    return root / "data"


def read_wav(data: Path, utt: str) -> np.ndarray:
    return sf.read(str(data.parent / f"{utt}.wav"), dtype="float32")[0]


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = hubert_base(**SMALL)
    path = tmp_path_factory.mktemp("cnn") / "ckpt"
    save_model(HubertPretrainModel(cfg), cfg, path)
    return path


@pytest.fixture(scope="module")
def fbank_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2)
    path = tmp_path_factory.mktemp("fbank") / "ckpt"
    save_model(HubertPretrainModel(cfg), cfg, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("corpus"))


def padded(wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lens.max()))
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = torch.from_numpy(w)
    return batch, lens


# ----------------------------------------------------------------------------------------------- batch independence
@pytest.mark.parametrize("which", ["cnn", "fbank"])
def test_rows_of_a_padded_batch_equal_each_utterance_alone(which, cnn_ckpt, fbank_ckpt):
    up = upstream.load(cnn_ckpt if which == "cnn" else fbank_ckpt)
    wavs = [tones_and_noise(n, i) for i, n in enumerate((3200, 64000, 20800, 9000))]  # 0.2 s .. 4 s
    hs, lens = up(*padded(wavs))
    worst = 0.0
    for i, w in enumerate(wavs):
        alone, n = up(*padded([w]))
        assert int(lens[i]) == int(n[0]) == up.num_frames(len(w))
        worst = max(worst, max(float((h[i, : lens[i]] - a[0]).abs().max()) for h, a in zip(hs, alone)))
    assert worst <= 1e-4, worst


def test_group_norm_per_row_is_transformers_on_each_utterance(cnn_ckpt, tmp_path):
    """The independent reference: transformers' HubertModel run on each utterance alone. Its batched output lets
    padding into the group norm (as fairseq's) and, without an attention mask (its docs' way for group-norm
    models), into attention too; ours with whole-batch statistics reproduces the masked one."""
    import transformers

    up = upstream.load(cnn_ckpt)
    export_hf(up.model, tmp_path / "hf")
    hf = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
    wavs = [tones_and_noise(n, i) for i, n in enumerate((3200, 64000, 20800))]
    batch, lens = padded(wavs)
    hs, frame_lens = up(batch, lens)
    with torch.no_grad():
        hf_batched = hf(batch, output_hidden_states=True).hidden_states  # the docs' way for group-norm models
        for i, w in enumerate(wavs):
            ref = hf(torch.from_numpy(w)[None], output_hidden_states=True).hidden_states
            for layer in (0, 3):
                torch.testing.assert_close(hs[layer][i, : frame_lens[i]], ref[layer][0], atol=1e-4, rtol=1e-4)
        short = int(frame_lens[0])
        assert float((hf_batched[3][0, :short] - hs[3][0, :short]).abs().max()) > 1e-2  # padding leaks there
        # whole-batch statistics (the model's default, for training): transformers given the attention mask
        whole_batch, _ = set_per_row_norm(up.model, False)(batch, lens)
        mask = (torch.arange(batch.shape[1])[None] < lens[:, None]).long()
        hf_masked = hf(batch, attention_mask=mask, output_hidden_states=True).hidden_states
        torch.testing.assert_close(whole_batch[3][0, :short], hf_masked[3][0, :short], atol=1e-4, rtol=1e-4)
    set_per_row_norm(up.model, True)


def test_unpadded_batch_is_the_plain_group_norm(cnn_ckpt):
    up = upstream.load(cnn_ckpt)
    batch, lens = padded([tones_and_noise(8000, 0), tones_and_noise(8000, 1)])
    ours, _ = up(batch, lens)
    plain = HubertModel(up.model.config).eval()  # whole-batch nn.GroupNorm, as transformers
    plain.load_state_dict(up.model.state_dict())
    ref, _ = plain(batch, lens)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- stores
@pytest.mark.parametrize("which", ["cnn", "fbank"])
def test_store_equals_per_utterance_forward(which, cnn_ckpt, fbank_ckpt, data, tmp_path):
    ckpt = cnn_ckpt if which == "cnn" else fbank_ckpt
    up = upstream.load(ckpt)
    layers = [1, up.num_layers - 1]
    assert extract(ckpt, data, tmp_path / "out", layers, max_duration=3.0, nshard=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"layer_{layer}" for layer in layers]
    for layer in layers:
        r = FeatureReader(layer_dir(tmp_path / "out", layer))
        assert r.meta["kind"] == f"hubert_l{layer}" and r.dim == up.hidden_sizes[layer]
        assert r.meta["dtype"] == "float16" and r.frame_rate == up.frame_rate
        assert r.meta["source"]["checkpoint_sha1"] == upstream.checkpoint_sha1(ckpt)
        assert r.meta["source"]["layer"] == layer and r.meta.get("framing") == up.framing
        assert sorted(r.ids) == sorted(f"spk{i % 2}-utt{i:02d}" for i in range(len(DURATIONS)))
        for u in r.ids:
            wav = read_wav(data, u)
            want, _ = up([torch.from_numpy(wav)])
            np.testing.assert_allclose(r[u].astype(np.float32), want[layer][0].numpy(), **FP16)


def test_one_utterance_per_batch_is_layers_extractor(cnn_ckpt, data, tmp_path):
    extract(cnn_ckpt, data, tmp_path / "out", "2", max_duration=0, dtype="float32", progress=False)
    r = FeatureReader(tmp_path / "out" / "layer_2")
    fn = upstream.layers_extractor(upstream.load(cnn_ckpt), [2], dtype=np.float32)
    for u in r.ids:
        np.testing.assert_array_equal(r[u], fn(read_wav(data, u))[2])


def _store_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_no_rank_rank_and_torchrun_give_the_same_stores(cnn_ckpt, data, tmp_path, monkeypatch):
    kw = dict(max_duration=2.0, progress=False)
    assert extract(cnn_ckpt, data, tmp_path / "all", "0,3", nshard=3, **kw)
    assert not extract(cnn_ckpt, data, tmp_path / "ranks", "0,3", nshard=3, rank=2, **kw)
    assert sorted(p.name for p in (tmp_path / "ranks" / "layer_3").glob("*.done")) == ["shard.2.done"]
    assert not extract(cnn_ckpt, data, tmp_path / "ranks", "0,3", nshard=3, rank=0, **kw)
    assert extract(cnn_ckpt, data, tmp_path / "ranks", "0,3", nshard=3, rank=1, **kw)
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in (1, 0, 2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        done = extract(cnn_ckpt, data, tmp_path / "torchrun", "0,3", **kw)  # nshard = $WORLD_SIZE
    assert done
    reference = _store_bytes(tmp_path / "all")
    assert len(reference) == 2 * 3 * 4  # layers x shards x (bin, index, json, done)
    assert _store_bytes(tmp_path / "ranks") == reference
    assert _store_bytes(tmp_path / "torchrun") == reference


def test_sigkill_mid_run_then_rerun_redoes_only_missing_shards(cnn_ckpt, tmp_path):
    """Shard 0 (2 utterances) reads files; shards 1 and 2 read through slow pipes. Kill -9 once shard 0 is
    finished in both stores, re-run: shard 0 is left as it is, 1 and 2 are done, the stores equal a clean run."""
    data = make_data(tmp_path / "corpus", pipe_from=2, sleep=0.5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "speechssl", "extract", "--upstream", str(cnn_ckpt), "--data", str(data),
           "--layers", "1,3", "--out", str(out), "--nshard", "3", "--max-duration", "2", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # a hang guard, not a speed check
        while not all((out / f"layer_{layer}" / "shard.0.done").exists() for layer in (1, 3)):
            assert proc.poll() is None, "extract ended before it could be killed"
            if time.time() > deadline:
                pytest.fail("extract wrote no shard 0 in 600 s: hung (the pipes of shards 1-2 sleep 0.5 s each)")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for layer in (1, 3):
        assert not (out / f"layer_{layer}" / "shard.1.done").exists()
    stamp = {layer: (out / f"layer_{layer}" / "shard.0.bin").stat().st_mtime_ns for layer in (1, 3)}
    kw = dict(nshard=3, max_duration=2, dtype="float32", progress=False)
    assert extract(cnn_ckpt, data, out, "1,3", **kw)
    for layer in (1, 3):
        assert (out / f"layer_{layer}" / "shard.0.bin").stat().st_mtime_ns == stamp[layer]
        assert not list((out / f"layer_{layer}").glob("*.tmp*"))
    assert extract(cnn_ckpt, data, tmp_path / "clean", "1,3", **kw)
    for layer in (1, 3):  # another process (maybe another thread count): equal to float rounding
        got, want = FeatureReader(out / f"layer_{layer}"), FeatureReader(tmp_path / "clean" / f"layer_{layer}")
        assert got.ids == want.ids and got.meta == want.meta
        for u in got.ids:
            np.testing.assert_allclose(got[u], want[u], atol=1e-5, rtol=1e-5)


def test_header_mismatch_is_an_error_until_overwrite(cnn_ckpt, data, tmp_path):
    extract(cnn_ckpt, data, tmp_path / "out", "1", progress=False)
    with pytest.raises(FeatureStoreError, match=r"different header \(dtype: 'float16' vs 'float32'.*--overwrite"):
        extract(cnn_ckpt, data, tmp_path / "out", "1", dtype="float32", progress=False)
    extract(cnn_ckpt, data, tmp_path / "out", "1", dtype="float32", overwrite=True, progress=False)
    assert FeatureReader(tmp_path / "out" / "layer_1").meta["dtype"] == "float32"


def test_one_line_errors(cnn_ckpt, data, tmp_path, capsys):
    base = ["extract", "--upstream", str(cnn_ckpt), "--data", str(data), "--out", str(tmp_path / "o")]
    for layers, says in [("4", "has hidden states 0..3"), ("six", "comma-separated integers")]:
        assert main([*base, "--layers", layers]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("speechssl extract: error: --layers") and says in err, err
    assert main([*base, "--layers", "1", "--overlap-seconds", "1"]) == 1
    assert "--overlap-seconds goes with --chunk-seconds" in capsys.readouterr().err
    assert main(["features", "dump", "--data", str(data), "--out", str(tmp_path / "f"), "--kind", "hidden",
                 "--ckpt", str(cnn_ckpt), "--layer", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "speechssl extract --upstream" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()


def test_cli_extract(fbank_ckpt, data, tmp_path, capsys):
    assert main(["extract", "--upstream", str(fbank_ckpt), "--data", str(data), "--layers", "all",
                 "--out", str(tmp_path / "o"), "--dtype", "float32", "--device", "cpu"]) == 0
    assert "complete" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["layer_0", "layer_1", "layer_2"]


# ----------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("frames,chunk,overlap", [(10, 10, 2), (11, 10, 2), (1000, 100, 25), (1001, 100, 0),
                                                   (257, 64, 63)])
def test_plan_windows_cover_every_frame_once_away_from_edges(frames, chunk, overlap):
    windows = plan_windows(frames, chunk, overlap)
    assert windows[0].keep[0] == 0 and windows[-1].keep[1] == frames
    for w, nxt in zip(windows, windows[1:]):
        assert w.keep[1] == nxt.keep[0] and nxt.start - w.start <= chunk - overlap
    for k, w in enumerate(windows):
        assert 0 <= w.start <= w.keep[0] < w.keep[1] <= w.end <= frames and w.end - w.start == min(chunk, frames)
        if k > 0:
            assert w.keep[0] - w.start >= overlap // 2
        if k < len(windows) - 1:
            assert w.end - w.keep[1] >= overlap // 2
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(1000, 100, 100)


@pytest.mark.parametrize("make", [lambda: hubert_base(**SMALL), lambda: hubert_large(**SMALL),
                                  lambda: hubert_tiny(num_hidden_layers=1)], ids=["group_norm", "large", "fbank"])
def test_frontend_window_by_window_then_encode_is_forward(make):
    """The two halves of forward for chunked inference: the waveform CNN run 0.1 s at a time (group norm with
    the whole utterance's statistics; Large: waveform normalisation over the whole utterance) is exact."""
    torch.manual_seed(0)
    up = upstream.Upstream(HubertModel(make()))
    wav = torch.from_numpy(tones_and_noise(3 * SR + 77, 3))
    whole, _ = up([wav])
    x = up.frontend(wav, window_seconds=0.1)
    assert x.shape == (up.num_frames(len(wav)), up.hidden_sizes[0])
    for a, b in zip(up.encode(x[None]), whole):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_chunked_forward_layer0_exact_deeper_layers_close(cnn_ckpt):
    """Overlap above the positional conv's width: hidden state 0 of every frame equals the whole utterance's
    (pins the windows and the stitching); deeper layers attend within the window only: close, not equal."""
    up = upstream.load(cnn_ckpt)
    wav = tones_and_noise(5 * SR + 123, 7)
    whole, _ = up([torch.from_numpy(wav)])
    chunked = chunked_forward(up, wav, [0, 3], chunk_seconds=1.0, overlap_seconds=0.25, max_duration=2.5)
    assert chunked[0].shape == tuple(whole[0][0].shape)
    np.testing.assert_allclose(chunked[0], whole[0][0].numpy(), atol=1e-4, rtol=0)
    deep = np.abs(chunked[3] - whole[3][0].numpy())
    assert 0 < deep.mean() / np.abs(whole[3][0].numpy()).mean() < 0.2
    same = chunked_forward(up, wav, [3], chunk_seconds=6.0)  # one window: no approximation
    np.testing.assert_allclose(same[3], whole[3][0].numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="chunk of at least 1 s"):
        chunked_forward(up, wav, [3], chunk_seconds=0.5)


def test_extract_chunked_records_the_chunking(cnn_ckpt, data, tmp_path):
    extract(cnn_ckpt, data, tmp_path / "out", "3", chunk_seconds=1.5, overlap_seconds=0.5, dtype="float32",
            progress=False)
    r = FeatureReader(tmp_path / "out" / "layer_3")
    up = upstream.load(cnn_ckpt)
    assert r.meta["source"]["chunk"] == {"frames": int(1.5 * up.frame_rate), "overlap_frames": int(0.5 * up.frame_rate)}
    for u in ("spk0-utt04", "spk1-utt05"):  # 4.0 s and 1.6 s: chunked
        wav = read_wav(data, u)
        want = chunked_forward(up, wav, [3], chunk_seconds=1.5, overlap_seconds=0.5)[3]
        np.testing.assert_allclose(r[u], want, atol=1e-4, rtol=0)
        assert len(r[u]) == up.num_frames(len(wav))
    short = read_wav(data, "spk0-utt02")  # 1.1 s: whole
    np.testing.assert_allclose(r["spk0-utt02"], up([torch.from_numpy(short)])[0][3][0].numpy(), atol=1e-4, rtol=0)
