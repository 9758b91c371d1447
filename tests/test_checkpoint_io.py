"""One checkpoint writer (models.checkpoint.save_model), one reader (models.checkpoint.load_weights), and the
trainer's use of them: step directories, EXP/best, resume and init_from."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from speechssl.errors import MissingInputError
from speechssl.models.checkpoint import CheckpointError, load_model, load_weights, save_model
from speechssl.models.config import hubert_tiny
from speechssl.models.hubert import HubertModel, HubertPretrainModel
from speechssl.train import state as st
from speechssl.train.checkpoints import load_step
from speechssl.train.trainer import Trainer, pretrain
from test_train import make_corpus, tiny_cfg

TRAIN = Path(__file__).resolve().parents[1] / "speechssl" / "train"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=2, **kw)
    return HubertPretrainModel(cfg), cfg


def _no_temp_dirs(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ the writer
def test_add_files_land_in_the_same_atomic_directory(tmp_path):
    model, cfg = _tiny()

    def add(tmp):
        assert not (tmp_path / "ck").exists()  # nothing visible before the whole directory is complete
        (tmp / "extra.json").write_text("{}")

    save_model(model, cfg, tmp_path / "ck", add_files=add)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "extra.json", "model.safetensors"]

    def fail(tmp):
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(model, cfg, tmp_path / "ck", add_files=fail)
    # the old directory is untouched and no temp directory is left behind
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "extra.json", "model.safetensors"]
    assert _no_temp_dirs(tmp_path)


def test_weights_from_links_the_same_bytes_and_refuses_another_model(tmp_path):
    model, cfg = _tiny()
    save_model(model, cfg, tmp_path / "step", extra={"step": 3})
    save_model(model, cfg, tmp_path / "best", extra={"step": 3, "valid": {"loss": 1.0}}, weights_from=tmp_path / "step")
    a, b = tmp_path / "step" / "model.safetensors", tmp_path / "best" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    save_model(model, cfg, tmp_path / "fresh")  # serialised: the same bytes as the link
    assert (tmp_path / "fresh" / "model.safetensors").read_bytes() == b.read_bytes()
    assert json.loads((tmp_path / "best" / "config.json").read_text())["extra"]["valid"] == {"loss": 1.0}
    other_cfg = hubert_tiny(num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="weights_from must hold these very weights"):
        save_model(HubertPretrainModel(other_cfg), other_cfg, tmp_path / "x", weights_from=tmp_path / "step")
    with pytest.raises(CheckpointError, match="weights_from must hold these very weights"):
        save_model(model.hubert, cfg, tmp_path / "x", weights_from=tmp_path / "step")  # bare vs pretrain model
    assert not (tmp_path / "x").exists() and _no_temp_dirs(tmp_path)


# ------------------------------------------------------------------------------------------------ the reader
def test_load_weights_strict_whole_model_and_config_check(tmp_path):
    model, cfg = _tiny()
    save_model(model, cfg, tmp_path / "ck")
    torch.manual_seed(1)
    other = HubertPretrainModel(cfg).train()
    meta = load_weights(other, tmp_path / "ck", config=cfg)
    assert meta["model_class"] == "HubertPretrainModel" and other.training  # mode untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    changed = hubert_tiny(num_hidden_layers=2, mask_prob=0.5)
    with pytest.raises(CheckpointError, match=r"model config differs from the checkpoint's in \['mask_prob'\]"):
        load_weights(HubertPretrainModel(changed), tmp_path / "ck", config=changed)
    with pytest.raises(CheckpointError, match=r"missing keys \['hubert\.encoder\.layers\.2\.") as e:
        load_weights(HubertPretrainModel(hubert_tiny(num_hidden_layers=3)), tmp_path / "ck")
    # the caller's model is another one: the checkpoint itself is fine (no "re-copy" advice); at most 5 names a kind
    assert "re-copy" not in str(e.value) and "(+" in str(e.value) and "\n" not in str(e.value)


def test_load_weights_encoder_only_leaves_the_head(tmp_path):
    model, cfg = _tiny(num_classes=[13])
    save_model(model, cfg, tmp_path / "pre")
    save_model(model.hubert, cfg, tmp_path / "bare")
    for src in ("pre", "bare"):  # the encoder of either kind of checkpoint
        torch.manual_seed(7)
        target = HubertPretrainModel(hubert_tiny(num_hidden_layers=2, num_classes=[5]))  # another head
        head = target.label_embeddings.detach().clone()
        load_weights(target, tmp_path / src, encoder_only=True)
        assert torch.equal(target.label_embeddings, head)
        for k, v in model.hubert.state_dict().items():
            assert torch.equal(target.hubert.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match=r"encoder parameters missing \['encoder\.layers\.2\."):
        load_weights(HubertModel(hubert_tiny(num_hidden_layers=3)), tmp_path / "pre", encoder_only=True)
    with pytest.raises(CheckpointError, match="pretrain_head=False"):
        load_weights(HubertPretrainModel(cfg), tmp_path / "bare")
    assert isinstance(load_model(tmp_path / "bare", pretrain_head=False), HubertModel)


# ------------------------------------------------------------------------------------------------ the trainer
def test_trainer_writes_through_the_models_writer(tmp_path, corpus):
    data, labdir = corpus
    exp = tmp_path / "v"
    # a crashed save of an earlier run left a temp dir: pruned at the next save
    (exp / "checkpoints" / ".step-00000003.tmp-abc").mkdir(parents=True)
    cfg = tiny_cfg(exp, data, labdir, "optim.max_steps=4", "valid_every=2", "ckpt.every_steps=2", "ckpt.keep_last=1",
                   dev=True)
    summary = pretrain(cfg)
    ckpts = st.checkpoint_dirs(exp / "checkpoints")
    assert [s for s, _ in ckpts] == [4] and _no_temp_dirs(exp / "checkpoints") and _no_temp_dirs(exp)
    step4 = ckpts[-1][1]
    assert sorted(p.name for p in step4.iterdir()) == sorted([
        "COMPLETE", "collapse_watch.json", "config.json", "model.safetensors",
        "rng.json", "rng.safetensors", "train_state.json", "train_state.safetensors"])
    best = exp / "best"
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((best / "config.json").read_text())
    assert meta["extra"]["step"] == summary["best_step"] and "acc_m_0" in meta["extra"]["valid"]
    assert meta["extra"]["best_by"] == "acc" and meta["extra"]["kind"] == "hubert_pretrain"
    assert isinstance(load_model(best), HubertPretrainModel)

    # without a dev set "best" is the latest step: its weights are that step's file, not a second write
    exp = tmp_path / "nodev"
    pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=2", "ckpt.every_steps=2"))
    step2, best = exp / "checkpoints" / st.step_dir_name(2), exp / "best"
    assert (best / "model.safetensors").read_bytes() == (step2 / "model.safetensors").read_bytes()
    assert os.path.samefile(best / "model.safetensors", step2 / "model.safetensors")  # a hard link on Linux
    assert json.loads((best / "config.json").read_text())["extra"]["step"] == 2


def test_resume_refuses_another_model_config(tmp_path, corpus):
    """The step's weights are read for another model config: one line naming the differing field (the trainer's
    own run record may refuse such a resume before it gets here)."""
    data, labdir = corpus
    exp = tmp_path / "r"
    pretrain(tiny_cfg(exp, data, labdir, "optim.max_steps=2", "ckpt.every_steps=2"))
    changed = tiny_cfg(exp, data, labdir, "model.mask_prob=0.5").model
    with pytest.raises(CheckpointError, match=r"in \['mask_prob'\]; resume with the same model\.\* settings"):
        load_step(exp / "checkpoints" / st.step_dir_name(2), HubertPretrainModel(changed), changed)


def test_init_from_reads_through_the_models_reader(tmp_path, corpus):
    data, labdir = corpus
    with pytest.raises(MissingInputError, match=r"ckpt\.init_from: .*nowhere: no such checkpoint"):
        Trainer(tiny_cfg(tmp_path / "i", data, labdir, f"ckpt.init_from={tmp_path / 'nowhere'}"))


def test_train_reads_and_writes_model_files_only_through_models_checkpoint():
    """One writer, one reader: no module of the train room names a model file or imports safetensors itself
    (state.py's training-state bundles excepted), and only checkpoints.py calls the models room's writer/reader."""
    for path in TRAIN.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"[\"'](model\.safetensors|config\.json)[\"']", text), path
        imports = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert path.name == "state.py" or not [line for line in imports if "safetensors" in line], path
    users = {p.name for p in TRAIN.glob("*.py") if re.search(r"\b(save_model|load_weights|load_model)\(", p.read_text())}
    assert users == {"checkpoints.py"}
