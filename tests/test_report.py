"""`speechssl report`: EXP/report.md and its PNGs from the files the stages write, every figure beside its baselines.

The exp tree is built with the writers the stages use where they are cheap (TensorBoard's SummaryWriter through
the trainer's `log_train`, the collapse watch's own reference file and scalars, `QualityReport.to_dict`,
`plot_layers`) and with the exact JSON schemas elsewhere (layers.json, results.json, layer_weights.json).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from speechssl.cli import main
from speechssl.errors import UserError
from speechssl.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_LOG = [  # the trainer's own lines (speechssl/train/trainer.py, train/data.py; checked below)
    "2026-01-01 10:00:00,000 INFO speechssl.train.data: labels dump/labels_iter1_fbank_cmvn-meanvar/train: k=100 "
    "at 100 Hz (model 50 Hz)",
    "2026-01-01 10:00:00,000 INFO speechssl.train.data: labels dump/labels_iter1_mfcc/train: k=100 at 100 Hz "
    "(model 50 Hz)",
    "2026-01-01 10:00:01,000 INFO speechssl.train.trainer: effective batch: world 1 x max_duration 32 s x accum 2 = "
    "64 s of audio per update (paper Base: 32 x 87.5 s = 2800 s); 5.31M parameters; device cpu; bf16 True",
    "2026-01-01 10:05:00,000 INFO speechssl.train.trainer: stopped at update 40 (max_minutes) after 4.9 min of "
    "training",
]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 100 and h > 100
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


class ToyEncoder(nn.Module):
    """Three "layers" of 64-d frames cut from the waveform (the upstream contract: hidden states, frame lengths);
    ``squash(i)`` projects layer i onto one direction (a collapse)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.ParameterList([nn.Parameter(torch.randn(64, 64, generator=g)) for _ in range(3)])

    def squash(self, i: int) -> None:
        with torch.no_grad():
            self.w[i].copy_(self.w[i][:, :1].repeat(1, 64))

    def forward(self, wavs, lens):
        x = wavs.view(wavs.shape[0], -1, 64)
        return [x @ w for w in self.w], lens // 64


def make_run(run: Path, *, collapse_layer: int | None = None) -> dict:
    """A pretraining run dir as the trainer leaves it; returns the numbers written."""
    from torch.utils.tensorboard import SummaryWriter

    from speechssl.train.collapse import CollapseWatch
    from speechssl.train.logs import log_train

    run.mkdir(parents=True)
    cfg = {"exp_dir": str(run), "log_every": 10, "valid_every": 20,
           "model": {"num_classes": [100, 100], "num_hidden_layers": 2},
           "data": {"train": "data/train", "train_labels": ["dump/labels_iter1_fbank_cmvn-meanvar/train",
                                                            "dump/labels_iter1_mfcc/train"], "max_duration": 32.0},
           "optim": {"lr": 0.001, "warmup_steps": 10, "max_steps": 40, "max_minutes": 5.0, "accum_grad": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "train.log").write_text("\n".join(TRAIN_LOG) + "\n")
    g = torch.Generator().manual_seed(1)
    batches = [{"wavs": torch.randn(2, 64 * 60, generator=g), "wav_lens": torch.tensor([64 * 60, 64 * 50]),
                "ids": ["u1", "u2"]}]
    enc = ToyEncoder()
    watch = CollapseWatch.from_batches(batches, lambda n: n // 64, max_frames=100, source="dev")
    watch.start(enc, run)  # writes run/collapse_watch.json
    writer = SummaryWriter(str(run / "tensorboard"))
    truth = {"train_loss": {}, "valid_acc0": {}, "ranks": {}}
    for step in (10, 20, 30, 40):
        loss = 8.0 - step / 10
        log_train({"loss": loss, "acc_m_0": step / 100, "acc_m_1": step / 200, "acc_u_0": 0.5, "acc_u_1": 0.4,
                   "audio_sec_per_sec": 10.0, "lr": 1e-3 * (1 - step / 40)}, step, writer, None)
        truth["train_loss"][step] = loss
        if step % 20 == 0:
            for k, v in {"loss": loss + 1, "acc_m_0": step / 150, "acc_m_1": step / 300}.items():
                writer.add_scalar(f"valid/{k}", v, step)
            truth["valid_acc0"][step] = step / 150
            if step == 40 and collapse_layer is not None:
                enc.squash(collapse_layer)
            stats = watch.check(enc, step, writer)
            truth["ranks"][step] = {i: stats[f"rank_L{i}"] for i in range(3)}
    writer.close()
    truth["ref"] = {i: v["rank"] for i, v in watch.reference.items()}
    (run / "best").mkdir()
    (run / "best" / "config.json").write_text(json.dumps(
        {"format": "speechssl", "extra": {"step": 40, "best_by": "acc", "metric": 0.2133}}))
    return truth


def layer_rows(pnmis, base=0.5):
    return [{"layer": i, "pnmi": p, "phone_purity": base + p / 10, "cluster_purity": base - p / 10,
             "num_frames": 1000, "units_used": 90, "inertia_per_frame": 1.0, "dim": 32} for i, p in enumerate(pnmis)]


def make_layers(run: Path, trained, random, spectral=0.325, kind="fbank+cmvn(meanvar)") -> dict:
    """RUN/layers/layers.{json,png} in the format of `speechssl units layers` (plot by its own plot function)."""
    from speechssl.units.layers import plot_layers

    rows, rrows = layer_rows(trained), layer_rows(random, base=0.3)
    for r, rr in zip(rows, rrows):
        r["ratio_to_random"] = r["pnmi"] / rr["pnmi"]
    best = max(rows, key=lambda r: r["pnmi"])
    rbest = max(rrows, key=lambda r: r["pnmi"])
    d = {"layers": rows, "random_init": {"layers": rrows, "best_layer": rbest["layer"], "best_pnmi": rbest["pnmi"],
                                         "seed": 0, "source": "random:ckpt"},
         "mfcc": {"pnmi": spectral, "phone_purity": 0.4, "cluster_purity": 0.2, "num_frames": 2000, "units_used": 99,
                  "inertia_per_frame": 3.0, "feats": "dump/fbank/train", "kind": kind, "frame_rate": 100.0,
                  "dim": 80},
         "best_layer": best["layer"], "best_ratio_to_random_best": best["pnmi"] / rbest["pnmi"], "k": 100,
         "checkpoint": str(run / "best"), "checkpoint_sha1": "0123456789abcdef", "data": "data/train",
         "alignments": "data/train/phones.ctm", "utterances": 500, "utterances_fit": 500}
    (run / "layers").mkdir(parents=True)
    plot_layers(d, run / "layers" / "layers.png")
    (run / "layers" / "layers.json").write_text(json.dumps(d, indent=1))
    return d


def make_kmeans(exp: Path, name: str, kind: str, cmvn, counts=None) -> dict | None:
    """A k-means dir (kmeans.json) and, with ``counts``, its quality.{json,png} as `units quality` writes them."""
    from speechssl.units.quality import QualityReport, plot_phone_given_unit, quality_from_counts

    d = exp / name
    d.mkdir(parents=True)
    (d / "kmeans.json").write_text(json.dumps({
        "k": 100, "feats_dir": f"dump/{name}/train", "dim": 39,
        "feature_meta": {"kind": kind, "dim": 80 if kind == "fbank" else 39,
                         "source": {"options": {"cmvn": cmvn}}}}))
    if counts is None:
        return None
    counts = np.asarray(counts, dtype=np.int64)
    rep = QualityReport(metrics=quality_from_counts(counts), counts=counts, phones=["a", "b", "sil"],
                        num_frames=int(counts.sum()), num_utts=3)
    obj = rep.to_dict() | {"k": 100, "label_rate": 100.0}
    (d / "quality.json").write_text(json.dumps(obj))
    plot_phone_given_unit(rep, d / "quality.png")
    return obj


def make_superb(root: Path, upstream: str, label: str, task: str, test: dict, weights=None) -> None:
    """EXP/<upstream>/<task>/results.json (+ layer_weights.json) as `speechssl superb` writes them."""
    d = root / upstream / task
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "task": task, "metric": next(iter(test)), "higher_is_better": False, "upstream": upstream,
        "upstream_label": label, "upstream_sha1": "x", "test": test, "dev": test, "lr": 1e-3,
        "layers": list(range(len(weights))) if weights else [0], "layer_weights": weights}))
    (d / "layer_weights.json").write_text(json.dumps({
        "kind": "weighted_sum", "layers": list(range(len(weights))) if weights else [0], "weights": weights,
        "title": f"{task} lr=0.001"}))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    base = tmp_path_factory.mktemp("rep")
    exp, sup = base / "exp", base / "superb_exp"
    t1 = make_run(exp / "hubert_iter1")
    t2 = make_run(exp / "hubert_iter2", collapse_layer=2)
    l1 = make_layers(exp / "hubert_iter1", [0.347, 0.342, 0.343], [0.308, 0.310, 0.308])
    l2 = make_layers(exp / "hubert_iter2", [0.353, 0.349, 0.355], [0.308, 0.310, 0.308])
    q_fb = make_kmeans(exp, "kmeans_fbank_cmvn-meanvar_k100", "fbank", "meanvar",
                       counts=[[30, 2, 1, 0], [3, 25, 2, 1], [0, 1, 5, 40]])
    q_mf = make_kmeans(exp, "kmeans_mfcc_k100", "mfcc", None, counts=[[20, 10, 1, 0], [8, 20, 2, 1], [1, 5, 5, 30]])
    make_kmeans(exp, "kmeans_iter1_L2_k100", "hubert_l2", None)  # iteration-2 targets: no quality.json
    make_superb(sup, "fbank", "fbank", "pr", {"per": 0.934})
    make_superb(sup, "random_hubert_iter1", "random:hubert_iter1", "pr", {"per": 0.660}, [0.2, 0.3, 0.5])
    make_superb(sup, "hubert_iter1", "hubert_iter1", "pr", {"per": 0.578}, [0.1, 0.6, 0.3])
    make_superb(sup, "hubert_iter1", "hubert_iter1", "ks", {"accuracy": 0.528}, [0.5, 0.25, 0.25])
    md_path = write_report(exp, superb_dirs=[sup])
    return {"exp": exp, "sup": sup, "md": md_path, "text": md_path.read_text(), "t1": t1, "t2": t2, "l1": l1,
            "l2": l2, "q_fb": q_fb, "q_mf": q_mf}


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{text}")


def nums(cells: list[str]) -> list[float]:
    return [float(re.sub(r"[*×]", "", c)) for c in cells if re.fullmatch(r"\**[\d.]+\**×?", c)]


# ------------------------------------------------------------------------------------------------ the report
def test_report_files(full):
    exp = full["exp"]
    assert full["md"] == exp / "report.md"
    pngs = sorted(p.name for p in (exp / "report").glob("*.png"))
    assert pngs == ["pnmi_by_layer.png", "superb_layer_weights.png", "train_hubert_iter1.png",
                    "train_hubert_iter2.png"]
    for p in (exp / "report").glob("*.png"):
        assert_png(p)
    # every image and link in the markdown resolves, relative to the report
    links = re.findall(r"\]\(([^)]+)\)", full["text"])
    assert len(links) >= 8
    for link in links:
        assert (exp / link).is_file(), link


def test_header(full):
    head = full["text"].split("## ")[0]
    assert f"`{full['exp'].resolve()}`" in head
    assert re.search(r"generated: \d{4}-\d\d-\d\d \d\d:\d\d", head)
    assert re.search(r"code: speechssl at (`[0-9a-f]{7,}`|unknown)", head)
    assert re.search(r"machine .*: .+, \d+ cores available, AMX (yes|no|unknown)", head)


def test_pretraining_tables(full):
    s = section(full["text"], "Pretraining")
    row = table_row(s, "hubert_iter1")
    assert row[1] == "40 of 40 (max_minutes)"
    assert row[2] == "4.9 min (budget 5)"
    assert row[3].startswith("64 s of audio (1 × 32 s × accum 2)")
    assert "cpu, bf16" == row[5]
    assert row[6] == "iter1_fbank_cmvn-meanvar (100), iter1_mfcc (100)"
    assert "update 40" in row[7] and "0.213" in row[7]
    it1 = s.split("### hubert_iter1")[1].split("### hubert_iter2")[0]
    # last values read back from the event files, with chance beside the accuracies
    loss = table_row(it1, "loss")
    assert nums(loss[1:3]) == pytest.approx([full["t1"]["train_loss"][40], full["t1"]["train_loss"][40] + 1],
                                            abs=1e-3)
    acc = table_row(it1, "masked accuracy, iter1_fbank_cmvn-meanvar")
    assert nums(acc[1:]) == pytest.approx([0.4, full["t1"]["valid_acc0"][40], 0.01], abs=1e-3)
    assert "update 40" in it1 and "Chance: 1/k" in it1
    # collapse watch: update-0 ranks from collapse_watch.json, last ranks from TensorBoard, the ratio
    ref, last = full["t1"]["ref"], full["t1"]["ranks"][40]
    assert nums(table_row(it1, "rank at update 0")[1:]) == pytest.approx([ref[i] for i in range(3)], abs=0.06)
    assert nums(table_row(it1, "rank at update 40")[1:]) == pytest.approx([last[i] for i in range(3)], abs=0.06)
    assert nums(table_row(it1, "ratio")[1:]) == pytest.approx([last[i] / ref[i] for i in range(3)], abs=0.006)
    assert "No layer below the collapse floor." in it1
    it2 = s.split("### hubert_iter2")[1]
    assert full["t2"]["ranks"][40][2] < 0.1 * full["t2"]["ref"][2]
    assert "**Collapsed layers: L2.**" in it2


def test_pnmi_table_has_baselines(full):
    s = section(full["text"], "What each layer learned")
    assert "![PNMI by layer](report/pnmi_by_layer.png)" in s
    assert table_row(s, "PNMI")[1:5] == ["spectral units", "L0", "L1", "L2"]
    spec = table_row(s, "fbank+cmvn(meanvar) units")
    assert "spectral baseline" in spec[0] and spec[1] == "0.325" and spec[2:5] == ["", "", ""]
    assert nums(spec[1:]) == pytest.approx([0.325, 0.325 / 0.310], abs=5e-3)
    rnd = table_row(s, "untrained model")
    assert nums(rnd[1:]) == pytest.approx([0.308, 0.310, 0.308, 1.0])
    assert rnd[1] == "" and rnd[3] == "**0.310**"
    # both iterations share the untrained baseline: one row, not two
    assert sum(1 for line in s.splitlines() if line.startswith("| untrained model")) == 1
    it1, it2 = table_row(s, "hubert_iter1"), table_row(s, "hubert_iter2")
    assert nums(it1[1:]) == pytest.approx([0.347, 0.342, 0.343, round(0.347 / 0.310, 2)])
    assert it1[2] == "**0.347**" and it2[4] == "**0.355**"
    assert it2[-1] == f"{0.355 / 0.310:.2f}×"
    rows = [line.split("|")[1].strip() for line in s.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows.index("hubert_iter1") > rows.index(rnd[0]) > rows.index(spec[0])  # baselines first


def test_label_quality(full):
    s = section(full["text"], "Label quality")
    fb = table_row(s, "kmeans_fbank_cmvn-meanvar_k100")
    assert fb[1] == "fbank+CMVN(meanvar), 80-d"
    q = full["q_fb"]
    assert nums(fb[2:7]) == pytest.approx([100, q["num_frames"], q["pnmi"], q["phone_purity"], q["cluster_purity"]],
                                          abs=5e-4)
    assert "[quality.png](kmeans_fbank_cmvn-meanvar_k100/quality.png)" in fb[7]
    mf = table_row(s, "kmeans_mfcc_k100")
    assert nums(mf[4:7]) == pytest.approx([full["q_mf"]["pnmi"], full["q_mf"]["phone_purity"],
                                           full["q_mf"]["cluster_purity"]], abs=5e-4)
    # the hidden-layer set: its layer's row from the per-layer report, the untrained model's same layer beside it
    hid = table_row(s, "kmeans_iter1_L2_k100")
    assert hid[1] == "hubert_iter1 layer 2"
    assert nums(hid[4:7]) == pytest.approx([0.343, 0.5 + 0.0343, 0.5 - 0.0343], abs=5e-4)
    base = table_row(s, "↳ baseline: untrained model, layer 2")
    assert nums(base[4:7]) == pytest.approx([0.308, 0.3 + 0.0308, 0.3 - 0.0308], abs=5e-4)


def test_superb_section(full):
    from speechssl.superb.runner import results_table

    s = section(full["text"], "SUPERB")
    table = results_table([str(full["sup"])])
    assert table.strip() in s  # the table of `speechssl superb table`, not a second builder
    assert nums(table_row(s, "fbank")[1:2]) == [93.4]
    assert nums(table_row(s, "random:hubert_iter1")[1:2]) == [66.0]
    assert nums(table_row(s, "hubert_iter1")[1:]) == [57.8, 52.8]
    assert "Baseline missing" not in s
    assert "![SUPERB layer weights](report/superb_layer_weights.png)" in s


def test_missing_sections_are_stated(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    md = write_report(exp).read_text()
    assert "No pretraining run found" in md
    assert "No per-layer report found" in md
    assert "No k-means set found" in md
    assert "No SUPERB run found" in md
    assert not list((exp / "report").glob("*.png"))
    # a SUPERB root without the baselines says so
    sup = tmp_path / "sup"
    make_superb(sup, "hubert_iter1", "hubert_iter1", "pr", {"per": 0.5}, [0.5, 0.5])
    md = write_report(exp, superb_dirs=[sup]).read_text()
    assert "Baseline missing from this table: a spectral upstream (fbank / mfcc) and an untrained model" in md
    empty = tmp_path / "empty_sup"
    empty.mkdir()
    assert "No SUPERB run found (no `results.json`" in write_report(exp, superb_dirs=[empty]).read_text()


def test_stale_figures_removed_and_out(full, tmp_path):
    exp = full["exp"]
    out = tmp_path / "elsewhere" / "r.md"
    path = write_report(exp, out=out)
    assert path == out and out.is_file()
    assert sorted(p.name for p in (out.parent / "r").glob("*.png")) == [
        "pnmi_by_layer.png", "train_hubert_iter1.png", "train_hubert_iter2.png"]
    for link in re.findall(r"\]\(([^)]+\.png)\)", out.read_text()):
        assert (out.parent / link).is_file(), link


@pytest.mark.parametrize("broken", ["hubert_iter1/layers/layers.json", "kmeans_mfcc_k100/quality.json",
                                    "SUPERB", "hubert_iter1/collapse_watch.json", "hubert_iter1/config.yaml"])
def test_malformed_input_is_one_line_naming_the_file(full, tmp_path, broken, capsys):
    import shutil

    exp, sup = tmp_path / "exp", tmp_path / "sup"
    shutil.copytree(full["exp"], exp)
    shutil.copytree(full["sup"], sup)
    bad = sup / "fbank" / "pr" / "results.json" if broken == "SUPERB" else exp / broken
    bad.write_text("{ not json: [" if bad.suffix != ".yaml" else "model: [unclosed\n")
    with pytest.raises(UserError, match=re.escape(str(bad))):
        write_report(exp, superb_dirs=[sup])
    capsys.readouterr()
    assert main(["report", str(exp), "--superb", str(sup)]) == 1
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("speechssl report: error: ") and str(bad) in lines[0], cap.err
    assert "Traceback" not in cap.err


def test_well_formed_json_of_the_wrong_shape(full, tmp_path):
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(full["exp"], exp)
    (exp / "hubert_iter2" / "layers" / "layers.json").write_text(json.dumps({"layers": [{"layer": 0}], "k": 100}))
    with pytest.raises(UserError, match=r"layers\.json: not a `speechssl units layers` report"):
        write_report(exp)


def test_cli_verb(full, tmp_path, capsys):
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(full["exp"], exp)
    (exp / "report.md").unlink()
    assert main(["report", str(exp), "--superb", str(full["sup"])]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(exp / "report.md")
    text = Path(out).read_text()
    assert "## SUPERB" in text and "| hubert_iter1 |" in text
    assert f"--superb {full['sup'].resolve()}" in text  # the header says how to regenerate it
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "no such experiment directory" in capsys.readouterr().err


def test_train_log_lines_match_the_trainer():
    """The report parses train.log lines the trainer writes: their format strings are still there."""
    root = Path(__file__).resolve().parents[1] / "speechssl" / "train"
    trainer = (root / "trainer.py").read_text()
    assert ("effective batch: world %d x max_duration %g s x accum %d = %g s of audio per update" in trainer
            and "parameters; device %s; bf16 %s" in trainer)
    assert "stopped at update %d (%s) after %.1f min of training" in trainer
    assert re.search(r'"labels %s: k=%d', (root / "data.py").read_text())


def _asr_run(root: Path, name: str, init: str, train: str, tune: str, scores: dict, trained: int = 10) -> None:
    run = root / name
    (run / "decode_test").mkdir(parents=True)
    (run / "best").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"init": init, "data": {"train": train}, "tune": {"mode": tune}}))
    (run / "best" / "config.json").write_text(json.dumps(
        {"format": "speechssl-hubert", "model_class": "CTCModel",
         "extra": {"step": 120, "params": {"trained": trained, "total": 100}}}))
    (run / "decode_test" / "scores.json").write_text(json.dumps({"decoder": "greedy", "lm": None, **scores}))


def test_asr_section_rows_and_baselines(tmp_path):
    """One row per (init, subset, tuning): PER from the phone run, CER / WER from the char run of the same row, the
    untrained model's rows marked as the baseline and listed first within a subset."""
    exp = tmp_path / "exp"
    exp.mkdir()
    asr = tmp_path / "asr"
    ck = "/x/exp/hubert_iter2/best"
    _asr_run(asr, "phone_iter2_10min", ck, "/d/train_10min", "full", {"per": 0.412})
    _asr_run(asr, "char_iter2_10min", ck, "/d/train_10min", "full", {"cer": 0.2, "wer": 0.55})
    _asr_run(asr, "phone_random_10min", "random:" + ck, "/d/train_10min", "full", {"per": 0.70})
    _asr_run(asr, "adapters_iter2_10min", ck, "/d/train_10min", "adapters", {"per": 0.5}, trained=3)
    _asr_run(asr, "phone_iter2_1h", ck, "/d/train_1h", "full", {"per": 0.3})
    md = write_report(exp, asr_dirs=[asr]).read_text()
    section = md[md.index("## Fine-tuning"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0] == "| untrained (hubert_iter2 config) (baseline) | train_10min | full | 10.0% | 70.0 | — | — | 120 |"
    assert rows[1] == "| hubert_iter2 | train_10min | full | 10.0% | 41.2 | 20.0 | 55.0 | 120/120 |"
    assert rows[2] == "| hubert_iter2 | train_10min | adapters | 3.0% | 50.0 | — | — | 120 |"
    assert rows[3].startswith("| hubert_iter2 | train_1h | full |")
    assert "5 runs from" in section
    assert f"--asr {asr.resolve()}" in md


def test_asr_section_missing_dir_is_one_line(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    assert main(["report", str(exp), "--asr", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such directory" in err[0]


def test_objectives_section(tmp_path):
    """With a run of another objective (make compare), one row per objective (HuBERT: its last iteration, timed over
    all its iterations) beside fbank and the untrained model, each figure from its own file; HuBERT alone: none."""
    exp, sup, asr = tmp_path / "exp", tmp_path / "superb", tmp_path / "asr"
    for name in ("hubert_iter1", "hubert_iter2"):
        make_run(exp / name)
    make_layers(exp / "hubert_iter2", [0.353, 0.349, 0.355], [0.308, 0.310, 0.308], spectral=0.325)
    assert "## Objectives" not in write_report(exp).read_text()
    for name, obj, pnmi in (("wav2vec2", "wav2vec2", [0.31, 0.33, 0.32]), ("bestrq", "bestrq", [0.34, 0.36, 0.35])):
        make_run(exp / name)
        cfg = yaml.safe_load((exp / name / "config.yaml").read_text())
        cfg["model"]["objective"] = obj
        (exp / name / "config.yaml").write_text(yaml.safe_dump(cfg))
        make_layers(exp / name, pnmi, [0.308, 0.310, 0.308])
    for up, label, per, acc in (("fbank", "fbank", 0.934, 0.40), ("random_hubert_iter1", "random:x", 0.66, 0.30),
                                ("hubert_iter2", "hubert_iter2", 0.55, 0.61), ("wav2vec2", "wav2vec2", 0.60, 0.5),
                                ("bestrq", "bestrq", 0.58, 0.55)):
        make_superb(sup, up, label, "pr", {"per": per})
        make_superb(sup, up, label, "ks", {"accuracy": acc})
    for name, init, per in (("phone_random_10min", "random:/e/hubert_iter2/best", 0.7),
                            ("phone_iter2_10min", "/e/hubert_iter2/best", 0.41),
                            ("phone_bestrq_10min", "/e/bestrq/best", 0.45),
                            ("phone_iter2_1h", "/e/hubert_iter2/best", 0.2)):   # 1 h: not in the 10-minute column
        _asr_run(asr, name, init, "/d/" + name.rsplit("_", 1)[1].replace("10min", "train_10min"), "full", {"per": per})
    (asr / "phone_iter2_1h" / "config.yaml").write_text(yaml.safe_dump(
        {"init": "/e/hubert_iter2/best", "data": {"train": "/d/train_1h"}, "tune": {"mode": "full"}}))
    text = section(write_report(exp, superb_dirs=[sup], asr_dirs=[asr]).read_text(), "Objectives")
    minutes = re.search(r"after ([\d.]+) min", "\n".join(TRAIN_LOG))
    assert minutes, "TRAIN_LOG has no stop line"
    m = float(minutes[1])
    assert table_row(text, "fbank")[1:] == ["none", "0.325 (fbank+cmvn(meanvar) units (100 Hz))", "93.4", "40.0", "–",
                                            "–"]
    assert table_row(text, "untrained")[1:] == ["none", "0.310 (1.00×)", "66.0", "30.0", "–", "70.0"]
    hub = table_row(text, "HuBERT (hubert_iter2)")
    assert hub[1].startswith(f"{2 * m:.1f} min,") and "(2 runs)" in hub[1]
    assert hub[2:] == ["0.355 (L2, 1.15×)", "55.0", "61.0", "–", "41.0"]
    assert table_row(text, "wav2vec 2.0 (wav2vec2)")[2:] == ["0.330 (L1, 1.06×)", "60.0", "50.0", "–", "–"]
    assert table_row(text, "BEST-RQ (bestrq)")[2:] == ["0.360 (L1, 1.16×)", "58.0", "55.0", "–", "45.0"]
