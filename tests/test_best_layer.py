"""`speechssl units best-layer`: best PNMI of a `units layers` report, else the paper's layer scaled to depth."""

from __future__ import annotations

import json

import pytest
import torch

from speechssl.cli import main
from speechssl.models import HubertModel, hubert_tiny, save_model
from speechssl.units.best_layer import choose_layer, paper_layer
from speechssl.upstream import checkpoint_sha1


def _ckpt(path, layers: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hubert_tiny(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      conv_layers=[(32, 3, 2)], num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    save_model(HubertModel(cfg), cfg, path)
    return path


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """An iteration's exp dir: best/ (a 4-layer checkpoint) and layers/layers.json scoring it (best layer 1)."""
    root = tmp_path_factory.mktemp("best_layer") / "hubert_iter1"
    ckpt = _ckpt(root / "best", layers=4)
    rows = [{"layer": i, "pnmi": p} for i, p in enumerate([0.10, 0.31, 0.25, 0.20, 0.12])]
    (root / "layers").mkdir(parents=True)
    (root / "layers" / "layers.json").write_text(json.dumps(
        {"layers": rows, "best_layer": 1, "checkpoint": str(ckpt), "checkpoint_sha1": checkpoint_sha1(ckpt)}))
    return root


def _run(capsys, *argv):
    rc = main(["units", "best-layer", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_paper_layer_scales_base_choice():
    assert paper_layer(12) == 6  # HuBERT Base iteration 2: layer 6 of 12
    assert paper_layer(24) == 12
    assert paper_layer(6) == 3  # mini_synth
    assert paper_layer(3) == 2 and paper_layer(1) == 1  # never the encoder input
    with pytest.raises(ValueError):
        paper_layer(0)


def test_report_present_gives_its_best_layer(exp, capsys):
    for argv in (["--exp", str(exp)],
                 ["--ckpt", str(exp / "best"), "--layers-json", str(exp / "layers" / "layers.json")],
                 ["--layers-json", str(exp / "layers" / "layers.json")]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 0, err
        assert out == "1\n"  # the index alone: the recipe reads it with $(...)
        assert "best PNMI" in err and "layers.json" in err and "0.3100" in err


def test_no_report_falls_back_to_middle_layer(tmp_path, capsys):
    exp = tmp_path / "hubert_iter1"
    _ckpt(exp / "best", layers=6)
    for argv in (["--exp", str(exp)], ["--ckpt", str(exp / "best")]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 0, err
        assert out == "3\n"
        assert "paper-depth rule" in err and "6 transformer layers" in err
    choice = choose_layer(exp_dir=exp)
    assert (choice.layer, choice.rule) == (3, "paper-depth")


def test_explicit_report_must_exist(tmp_path, capsys):
    ckpt = _ckpt(tmp_path / "best", layers=2)
    rc, out, err = _run(capsys, "--ckpt", str(ckpt), "--layers-json", str(tmp_path / "layers" / "layers.json"))
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "layers.json" in err and "no per-layer report" in err


@pytest.mark.parametrize("problem", ["missing", "no_config", "bad_format", "bad_json"])
def test_bad_checkpoint_is_one_line_error(tmp_path, capsys, problem):
    ckpt = tmp_path / "ckpt"
    if problem != "missing":
        ckpt.mkdir()
    if problem == "bad_format":
        (ckpt / "config.json").write_text(json.dumps({"format": "transformers"}))
    if problem == "bad_json":
        (ckpt / "config.json").write_text("{not json")
    rc, out, err = _run(capsys, "--ckpt", str(ckpt))
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("speechssl units: error:") and str(ckpt) in err
    assert "Traceback" not in err


def test_report_checked_against_checkpoint(exp, tmp_path, capsys):
    # a report of other weights (iteration 1 re-trained since): refused
    other = _ckpt(tmp_path / "other", layers=4, seed=1)
    rc, out, err = _run(capsys, "--ckpt", str(other), "--layers-json", str(exp / "layers" / "layers.json"))
    assert rc == 1 and out == "" and "SHA-1" in err
    # a best layer the checkpoint does not have
    shallow = _ckpt(tmp_path / "shallow", layers=1)
    bad = tmp_path / "layers.json"
    bad.write_text(json.dumps({"layers": [], "best_layer": 3}))
    rc, out, err = _run(capsys, "--ckpt", str(shallow), "--layers-json", str(bad))
    assert rc == 1 and out == "" and "outside 0..1" in err
    # not a units-layers report
    bad.write_text(json.dumps({"layers": []}))
    rc, out, err = _run(capsys, "--layers-json", str(bad))
    assert rc == 1 and "best_layer" in err


def test_needs_a_source(capsys):
    rc, out, err = _run(capsys)
    assert rc == 1 and "--exp" in err
