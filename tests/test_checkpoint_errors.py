"""A broken checkpoint is the user's to fix: one ``speechssl GROUP: error: ...`` line naming the file, never a
traceback, and nothing left behind that the next stage would take for a finished output.

Every verb that reads a checkpoint directory (``extract``, ``export`` to transformers and to s3prl, ``units layers``,
``superb --upstream``, ``pretrain ckpt.init_from=``, ``decode --ckpt`` and ``export`` of a fine-tuned checkpoint)
against every corruption: a truncated, garbage or empty ``model.safetensors``; a ``config.json`` that is not JSON,
lacks its model, or describes another model than the weights (another depth: missing keys; another width: shape
mismatches); no ``config.json``; the ``model.safetensors`` file given where its directory is expected. All of them
go through one reader (``speechssl.models.checkpoint``). Tiny waveform-CNN models, CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from speechssl.audio import save_audio
from speechssl.cli import main
from speechssl.data.kaldi import DataDir, write_data_dir
from speechssl.models.checkpoint import CheckpointError, load_model, read_safetensors, save_model
from speechssl.models.config import HubertConfig
from speechssl.models.ctc import CTCHeadConfig, CTCModel
from speechssl.models.hf import export_hf
from speechssl.models.hubert import HubertPretrainModel
from speechssl.train import state as st
from speechssl.train.tokens import BLANK, WORD_DELIM, Tokenizer
from test_train import make_corpus, tiny_cfg

CNN = dict(conv_layers=[(16, 10, 5), (16, 3, 2), (16, 2, 2)], hidden_size=16, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=32, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
           final_dim=8, num_classes=[4], feature_grad_mult=1.0, layerdrop=0.0)
CORRUPTIONS = ["truncated", "garbage", "empty", "bad-config", "no-model-config", "deeper-config", "wider-config",
               "no-config", "safetensors-file"]
VERBS = ["extract", "export-hf", "export-s3prl", "units-layers", "superb", "pretrain", "decode", "export-finetuned"]
GROUP = {"export-hf": "export", "export-s3prl": "export", "export-finetuned": "export", "units-layers": "units"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data for every verb, and one intact checkpoint of each kind (pretraining, fine-tuned CTC)."""
    root = tmp_path_factory.mktemp("ckpt_errors")
    data, labels = make_corpus(root / "corpus", n_utts=3)
    utts = [line.split()[0] for line in (data / "utt2spk").read_text().splitlines()]
    ctm = root / "phones.ctm"
    ctm.write_text("".join(f"{u} 1 0.00 0.50 aa\n{u} 1 0.50 0.50 iy\n" for u in utts))
    superb = root / "superb"
    for i, split in enumerate(("train", "dev", "test")):
        keyword_split(superb / split, seed=i)
    cfg = HubertConfig(**CNN)
    torch.manual_seed(0)
    pre = root / "pretrained"
    save_model(HubertPretrainModel(cfg), cfg, pre, extra={"step": 1})
    tok = Tokenizer("char", [BLANK, WORD_DELIM, "a", "b"])
    ft = root / "finetuned"
    save_model(CTCModel(cfg, CTCHeadConfig(vocab_size=len(tok.vocab))), cfg, ft,
               extra={"kind": "ctc_finetune", "tokenizer": tok.to_dict()})
    return {"root": root, "data": data, "labels": labels, "ctm": ctm, "superb": superb, "pre": pre, "ft": ft}


def keyword_split(d: Path, seed: int) -> None:
    """A keyword-spotting data dir (``speechssl superb --task ks``): four utterances, two keywords."""
    rng = np.random.default_rng(seed)
    wav_scp, utt2spk, kw = {}, {}, {}
    for i in range(4):
        utt = f"spk{i % 2}-{d.name}-{i}"
        path = d / "wav" / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_audio(path, (0.1 * rng.standard_normal(8000)).astype(np.float32))
        wav_scp[utt], utt2spk[utt], kw[utt] = str(path), f"spk{i % 2}", ("yes", "no")[i % 2]
    write_data_dir(DataDir(wav_scp=wav_scp, utt2spk=utt2spk), d)
    (d / "utt2kw").write_text("".join(f"{u} {k}\n" for u, k in sorted(kw.items())))


def corrupt(src: Path, dst: Path, kind: str) -> tuple[Path, Path]:
    """A copy of checkpoint ``src`` at ``dst`` broken as ``kind``: (the path to give the verb, the file (or
    directory) the error line must name)."""
    shutil.copytree(src, dst)
    weights, config = dst / "model.safetensors", dst / "config.json"
    data = weights.read_bytes()
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
        return dst, weights
    if kind == "garbage":
        weights.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
        return dst, weights
    if kind == "empty":
        weights.write_bytes(b"")
        return dst, weights
    if kind == "bad-config":
        text = config.read_text()
        config.write_text(text[: len(text) // 2])
        return dst, config
    meta = json.loads(config.read_text())
    if kind == "no-model-config":
        del meta["model"]
        config.write_text(json.dumps(meta))
        return dst, config
    if kind == "deeper-config":  # a third layer the weights lack: missing keys
        meta["model"]["num_hidden_layers"] += 1
        config.write_text(json.dumps(meta))
        return dst, dst
    if kind == "wider-config":  # another FFN width: every fc1/fc2 tensor of the wrong shape
        meta["model"]["intermediate_size"] *= 2
        config.write_text(json.dumps(meta))
        return dst, dst
    if kind == "no-config":
        config.unlink()
        return dst, dst
    assert kind == "safetensors-file"
    return weights, weights


def run_verb(verb: str, ckpt: Path, w: dict, out: Path) -> list[str]:
    """The command line of ``verb`` reading checkpoint ``ckpt`` and writing under ``out``."""
    if verb == "extract":
        return ["extract", "--upstream", str(ckpt), "--data", str(w["data"]), "--layers", "all", "--out",
                str(out / "hidden"), "--device", "cpu", "--workers", "1"]
    if verb in ("export-hf", "export-finetuned"):
        return ["export", "--ckpt", str(ckpt), "--to", "hf", str(out / "hf")]
    if verb == "export-s3prl":
        return ["export", "--ckpt", str(ckpt), "--to", "s3prl", str(out / "model.pt")]
    if verb == "units-layers":
        return ["units", "layers", "--ckpt", str(ckpt), "--data", str(w["data"]), "--alignments", str(w["ctm"]),
                "--k", "2", "--device", "cpu", "--out", str(out / "layers")]
    if verb == "superb":
        return ["superb", "--task", "ks", "--upstream", str(ckpt), "--data", str(w["superb"]), "--out",
                str(out / "ks"), "--cache-dir", str(out / "cache"), "--max-steps", "1", "--no-progress"]
    if verb == "pretrain":
        cfg = tiny_cfg(out / "exp", w["data"], w["labels"])
        return ["pretrain", f"model={json.dumps(cfg.model.to_dict())}", f"exp_dir={out / 'exp'}",
                f"data.train={w['data']}", f"data.train_labels=[{w['labels']}]", "data.max_duration=4.0",
                "data.num_buckets=1", "data.num_workers=0", "optim.max_steps=1", "optim.bf16=false", "progress=false",
                "device=cpu", "collapse_watch_frames=0", f"ckpt.init_from={ckpt}"]
    assert verb == "decode"
    return ["decode", "--ckpt", str(ckpt), "--data", str(w["data"]), "--out", str(out / "decode")]


def nothing_finished(verb: str, out: Path) -> list[Path]:
    """What ``verb`` left under ``out`` that a next stage would take for a finished output (must be none)."""
    if verb == "extract":  # a store: its header and shards
        return sorted((out / "hidden").rglob("*"))
    if verb in ("export-hf", "export-finetuned"):
        return [out / "hf"] if (out / "hf").exists() else []
    if verb == "export-s3prl":
        return [out / "model.pt"] if (out / "model.pt").exists() else []
    if verb == "units-layers":
        return sorted((out / "layers").rglob("*"))
    if verb == "superb":
        return sorted((out / "ks").rglob("results.json")) + sorted((out / "cache").rglob("*"))
    if verb == "pretrain":
        return sorted((out / "exp").glob("best")) + sorted((out / "exp" / "checkpoints").glob("step-*"))
    return sorted((out / "decode").rglob("*"))


def error_line(err: str, group: str) -> str:
    """The one ``speechssl GROUP: error: ...`` line of stderr; no traceback, no internal error."""
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"speechssl {group}:")]
    assert len(lines) == 1 and lines[0].startswith(f"speechssl {group}: error: "), err[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("verb", VERBS)
def test_a_broken_checkpoint_is_one_error_line_and_leaves_nothing_finished(verb, kind, world, tmp_path, capsys):
    src = world["ft" if verb in ("decode", "export-finetuned") else "pre"]
    ckpt, named = corrupt(src, tmp_path / "ckpt" / "best", kind)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(run_verb(verb, ckpt, world, out)) == 1
    line = error_line(capsys.readouterr().err, GROUP.get(verb, verb))
    assert str(named) in line, line
    what = {"truncated": "corrupt or truncated safetensors file", "garbage": "corrupt or truncated safetensors file",
            "empty": "empty file", "bad-config": "not valid JSON", "no-model-config": "'model'",
            "deeper-config": "missing", "wider-config": "shape mismatches", "no-config": "no config.json",
            "safetensors-file": "is a safetensors file; give the checkpoint directory that holds it"}[kind]
    assert what in line, line
    if kind == "safetensors-file":
        assert f"({ckpt.parent}, with config.json)" in line, line
    elif kind in ("truncated", "garbage", "empty", "bad-config", "no-model-config", "deeper-config", "wider-config"):
        assert "re-copy or re-export the checkpoint" in line, line
    assert nothing_finished(verb, out) == []


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "safetensors-file"])
def test_a_broken_transformers_directory_is_one_line(kind, world, tmp_path, capsys):
    """The transformers reader (``speechssl.models.hf``) opens its weights through the same function."""
    hf = tmp_path / "hf_src"
    export_hf(world["pre"], hf)
    ckpt, named = corrupt(hf, tmp_path / "hf", kind)
    capsys.readouterr()
    assert main(run_verb("extract", ckpt, world, tmp_path / "out")) == 1
    line = error_line(capsys.readouterr().err, "extract")
    assert str(named) in line, line
    what = {"truncated": "corrupt or truncated safetensors file", "garbage": "corrupt or truncated safetensors file",
            "empty": "empty file", "safetensors-file": "is a safetensors file; give the checkpoint directory"}[kind]
    assert what in line, line
    assert nothing_finished("extract", tmp_path / "out") == []


def test_the_reader_names_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    assert torch.equal(read_safetensors(path)["a"], torch.zeros(3))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError) as e:
        read_safetensors(path)
    assert str(e.value).startswith(f"{path}: corrupt or truncated safetensors file (")
    assert str(e.value).endswith("re-copy or re-export the checkpoint") and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        read_safetensors(tmp_path)


def test_load_model_of_a_safetensors_file_names_its_directory(world):
    weights = world["pre"] / "model.safetensors"
    with pytest.raises(CheckpointError, match=rf"^{weights} is a safetensors file; give the checkpoint directory "
                                              rf"that holds it \({world['pre']}, with config.json\)$"):
        load_model(weights)


@pytest.mark.parametrize("kind", ["truncated", "empty", "bad-json"])
def test_a_broken_training_state_bundle_is_one_line(kind, tmp_path):
    st.save_bundle(tmp_path, "train_state", {"step": 3, "w": torch.ones(4)})
    assert st.load_bundle(tmp_path, "train_state")["step"] == 3
    tensors, header = tmp_path / "train_state.safetensors", tmp_path / "train_state.json"
    if kind == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:20])
    elif kind == "empty":
        tensors.write_bytes(b"")
    else:
        header.write_text("{")
    with pytest.raises(CheckpointError) as e:
        st.load_bundle(tmp_path, "train_state")
    message = str(e.value)
    assert "\n" not in message and str(header if kind == "bad-json" else tensors) in message, message


def test_resume_from_a_step_with_a_broken_training_state_is_one_line(world, tmp_path, capsys):
    """``pretrain --resume auto`` on a step whose ``train_state.safetensors`` was cut short: one line naming it."""
    exp = tmp_path / "exp"
    cfg = tiny_cfg(exp, world["data"], world["labels"])
    args = ["pretrain", f"model={json.dumps(cfg.model.to_dict())}", f"exp_dir={exp}", f"data.train={world['data']}",
            f"data.train_labels=[{world['labels']}]", "data.max_duration=4.0", "data.num_buckets=1",
            "data.num_workers=0",
            "optim.warmup_steps=1", "optim.bf16=false", "progress=false", "device=cpu", "collapse_watch_frames=0",
            "ckpt.every_steps=1", "valid_every=1000"]
    assert main([*args, "optim.max_steps=1"]) == 0
    step = exp / "checkpoints" / st.step_dir_name(1)
    state = step / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    assert main([*args, "optim.max_steps=2", "--resume", "auto"]) == 1
    line = error_line(capsys.readouterr().err, "pretrain")
    assert str(state) in line and "corrupt or truncated safetensors file" in line, line
    assert not (exp / "checkpoints" / st.step_dir_name(2)).exists()


def test_checkpoint_sha1_names_what_is_missing(world, tmp_path):
    """The SHA-1 naming a checkpoint's weights: a directory without weights is a MissingInputError (an OSError, as
    callers that fingerprint before loading expect); ``random:CKPT`` is named by CKPT's config.json."""
    import hashlib

    from speechssl.errors import MissingInputError
    from speechssl.upstream import checkpoint_sha1

    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(MissingInputError, match="no_weights: no model.safetensors or pytorch_model.bin"):
        checkpoint_sha1(tmp_path / "no_weights")
    config = (world["pre"] / "config.json").read_bytes()
    assert checkpoint_sha1(f"random:{world['pre']}") == "random:" + hashlib.sha1(config).hexdigest()
    with pytest.raises(OSError, match="random:CKPT needs CKPT's config.json"):
        checkpoint_sha1(f"random:{tmp_path / 'nowhere'}")
