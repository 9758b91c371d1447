"""Bad input, one table: every verb answers a problem the user can fix with ONE line, exit 1, no traceback, and
leaves nothing a rerun or a later stage would take for finished.

Each :class:`Case` is one row: the command line (``{name}`` placeholders: the module's shared inputs, see
:func:`env`, and ``{tmp}``, the case's own empty directory), a substring the error line must contain (the file, key
or utterance id it names), and the outputs that must not be left complete. ``setup`` (optional) prepares what only
this case needs, in ``{tmp}``. Most cases run ``speechssl.cli.main`` in this process; ``subprocess=True`` ones run
``python -m speechssl`` to show the same end to end. Adding a case is adding one row to :data:`CASES`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.audio import save_audio
from speechssl.cli import main
from speechssl.data.kaldi import DataDir, write_data_dir

SR = 16000
PHONES = ("aa", "iy", "s")
TONES = {"aa": 300.0, "iy": 1100.0, "s": 3500.0}
SEG = 0.2  # seconds per phone


# ------------------------------------------------------------------------------------------- shared inputs
def _data_dir(root: Path, name: str, n: int, seed: int) -> tuple[Path, list[str]]:
    """``n`` utterances of three 0.2 s tones each (one per phone, seeded order), 2 speakers, text, utt2dur, utt2phones,
    and a matching ``phones.ctm``. Returns the dir and its CTM lines."""
    rng = np.random.default_rng(seed)
    wavs, u2s, text, dur, u2p, ctm = {}, {}, {}, {}, {}, []
    for i in range(n):
        utt = f"spk{i % 2}-{name}{i:02d}"
        order = [PHONES[j] for j in rng.permutation(3)]
        t = np.arange(int(SEG * SR)) / SR
        wav = np.concatenate([0.3 * np.sin(2 * np.pi * TONES[p] * t) for p in order])
        wav = (wav + 0.003 * rng.standard_normal(len(wav))).astype(np.float32)
        path = root / "wav" / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_audio(path, wav)
        wavs[utt], u2s[utt], text[utt] = str(path), f"spk{i % 2}", " ".join(order)
        dur[utt] = len(wav) / SR
        u2p[utt] = " ".join(order)
        ctm += [f"{utt} 1 {k * SEG:.3f} {SEG:.3f} {p}" for k, p in enumerate(order)]
    d = root / name
    write_data_dir(DataDir(wav_scp=wavs, utt2spk=u2s, text=text, utt2dur=dur, extra={"utt2phones": u2p}), d)
    (d / "phones.ctm").write_text("\n".join(ctm) + "\n")
    return d, ctm


def _other_audio_ctm(ctm: list[str]) -> str:
    """The same phones, timed for audio 5x as long (another recording, another sample rate)."""
    out = []
    for line in ctm:
        u, ch, start, d, p = line.split()
        out.append(f"{u} {ch} {5 * float(start):.3f} {5 * float(d):.3f} {p}")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Inputs every case may name: tiny data dirs, MFCC store, k-means model, labels, a tiny checkpoint,
    a SUPERB data root, alignments (matching and of other audio), and paths blocked by a file."""
    from speechssl.features.dump import dump_features
    from speechssl.models import HubertPretrainModel, hubert_tiny, save_model
    from speechssl.units.kmeans import fit_store, label_store

    root = tmp_path_factory.mktemp("bad_inputs")
    data, ctm = _data_dir(root, "data", 6, 0)
    (root / "other.ctm").write_text(_other_audio_ctm(ctm))
    mfcc = root / "mfcc"
    dump_features(data, mfcc, kind="mfcc", nshard=1, workers=1)
    km = root / "km"
    fit_store(mfcc, km, k=3, sample_frac=1.0, niter=5, report=lambda s: None)
    labels = root / "labels"
    label_store(mfcc, km, labels, device="cpu")
    torch.manual_seed(0)
    cfg = hubert_tiny(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      conv_layers=[(32, 3, 2)], num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                      final_dim=16, num_classes=[3])
    ckpt = root / "ckpt"
    save_model(HubertPretrainModel(cfg), cfg, ckpt)
    # a pretraining config of that model on the data dir (the case names its label dir)
    pconf = root / "pretrain.yaml"
    pconf.write_text(json.dumps({
        "model": cfg.to_dict(), "exp_dir": "unset",
        "data": {"train": str(data), "num_workers": 0, "crop_min": 0.2, "crop_max": 0.6, "max_duration": 2.0,
                 "num_buckets": 1},
        "optim": {"max_steps": 2}, "device": "cpu", "progress": False}))
    # SUPERB root: train/dev/test, pr labels from phones.ctm (train's of other audio)
    superb = root / "superb"
    for i, split in enumerate(("train", "dev", "test")):
        d, c = _data_dir(superb, split, 4, 10 + i)
        (d / "utt2phones").unlink()
        if split == "train":
            (d / "phones.ctm").write_text(_other_audio_ctm(c))
    # a file where a directory is expected
    (root / "blocker").write_text("a file, not a directory\n")
    return {"root": str(root), "data": str(data), "ctm": str(data / "phones.ctm"), "other_ctm": str(root / "other.ctm"),
            "mfcc": str(mfcc), "km": str(km), "labels": str(labels), "ckpt": str(ckpt), "superb": str(superb),
            "blocker": str(root / "blocker"), "pretrain_conf": str(pconf)}


# ------------------------------------------------------------------------------------------- per-case inputs
def _copy_data(env: dict, tmp: Path) -> Path:
    d = tmp / "d"
    shutil.copytree(env["data"], d)
    return d


def dup_ids(env, tmp):
    d = _copy_data(env, tmp)
    lines = (d / "wav.scp").read_text().splitlines()
    (d / "wav.scp").write_text("\n".join([lines[0], lines[0]] + lines[1:]) + "\n")


def non_utf8_text(env, tmp):
    d = _copy_data(env, tmp)
    lines = (d / "text").read_bytes().split(b"\n")
    lines[1] = lines[1].split(b" ")[0] + b" caf\xe9"
    (d / "text").write_bytes(b"\n".join(lines))


def empty_wav(env, tmp):
    d = _copy_data(env, tmp)
    first = sorted((d / "wav.scp").read_text().splitlines())[0].split()
    empty = tmp / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR, subtype="PCM_16")  # a header, no samples
    rows = (d / "wav.scp").read_text().replace(first[1], str(empty))
    (d / "wav.scp").write_text(rows)
    (d / "utt2dur").unlink()


def missing_wav(env, tmp):
    d = _copy_data(env, tmp)
    first = sorted((d / "wav.scp").read_text().splitlines())[0].split()
    (d / "wav.scp").write_text((d / "wav.scp").read_text().replace(first[1], str(tmp / "gone.wav")))
    (d / "utt2dur").unlink()


def no_phones(env, tmp):
    d = _copy_data(env, tmp)
    (d / "utt2phones").unlink()
    (d / "phones.ctm").unlink()


def readonly_dir(env, tmp):
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)


def readonly_data(env, tmp):
    d = tmp / "ro"
    shutil.copytree(env["data"], d)
    d.chmod(0o555)


def labels_k5(env, tmp):
    """A label dir whose meta.json says k=5 (the tiny model has num_classes [3])."""
    lab = tmp / "lab5"
    shutil.copytree(env["labels"], lab)
    meta = json.loads((lab / "meta.json").read_text())
    (lab / "meta.json").write_text(json.dumps(dict(meta, k=5)))


def wrong_rate(env, tmp):
    """The data dir with every wav's header saying 8 kHz (the same samples): twice as long as its labels say."""
    d = tmp / "d8k"
    shutil.copytree(env["data"], d)
    rows = []
    for line in (d / "wav.scp").read_text().splitlines():
        utt, path = line.split()
        x, _ = sf.read(path, dtype="float32")
        sf.write(tmp / f"{utt}.wav", x, 8000, subtype="PCM_16")
        rows.append(f"{utt} {tmp / f'{utt}.wav'}")
    (d / "wav.scp").write_text("\n".join(rows) + "\n")
    (d / "utt2dur").unlink()


def unfinished_labels(env, tmp):
    lab = tmp / "lab"
    shutil.copytree(env["labels"], lab)
    (lab / "meta.json").unlink()


def existing_file(env, tmp):
    (tmp / "model.pt").write_text("an earlier export\n")


def foreign_json(env, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "results.json").write_text(json.dumps({"hello": "world"}))


def other_audio_phones(env, tmp):
    """The data dir's phones only in a phones.ctm timed for other audio (5x as long)."""
    d = _copy_data(env, tmp)
    (d / "utt2phones").unlink()
    (d / "phones.ctm").write_text(Path(env["other_ctm"]).read_text())


def pretrained_run(env, tmp):
    """A finished 2-update pretraining run in {tmp}/exp (seed 1)."""
    assert main(["pretrain", "--config", env["pretrain_conf"], f"exp_dir={tmp}/exp",
                 f"data.train_labels=[{env['labels']}]"]) == 0


def old_run_dirs(env, tmp):
    """Run dirs of every trainer that hold a run made before run.json (a checkpoint or a result, no record)."""
    (tmp / "exp" / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp / "ft" / "best").mkdir(parents=True)
    (tmp / "pr").mkdir()
    (tmp / "pr" / "results.json").write_text("{}")


def superb_run(env, tmp):
    """A finished one-step SUPERB PR run on fbank in {tmp}/pr (seed 0)."""
    assert main(["superb", "--task", "pr", "--upstream", "fbank", "--data", env["superb"], "--train",
                 f"{env['superb']}/dev", "--out", f"{tmp}/pr", "--max-steps", "1", "--no-progress"]) == 0


def truncated_ckpt(env, tmp):
    shutil.copytree(env["ckpt"], tmp / "ckpt")
    w = tmp / "ckpt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])


# ------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    argv: str  # split on blanks after formatting; {tmp} and the keys of env()
    expect: str  # substring of the error line (formatted like argv)
    absent: tuple[str, ...] = ()  # outputs that must not exist afterwards (formatted like argv; globs allowed)
    setup: Callable | None = None
    group: str | None = None  # the error line's prefix after "speechssl " (default: argv's first word)
    subprocess: bool = False  # run `python -m speechssl` (end to end) instead of main() in this process



CASES = [
    # --- data
    Case("validate-duplicate-id", "data validate {tmp}/d", "d/wav.scp:2: duplicate id 'spk0-data00'", setup=dup_ids),
    Case("validate-non-utf8", "data validate {tmp}/d", "d/text:2: not valid UTF-8", setup=non_utf8_text),
    Case("validate-missing-dir", "data validate {tmp}/nowhere", "{tmp}/nowhere"),
    Case("fix-readonly", "data fix {tmp}/ro", "{tmp}/ro", setup=readonly_data, absent=("{tmp}/ro/.backup",)),
    Case("subset-minutes-zero", "data subset-minutes --data {data} --minutes 0 --out {tmp}/sub", "--minutes",
         absent=("{tmp}/sub",)),
    Case("subset-minutes-negative", "data subset-minutes --data {data} --minutes -5 --out {tmp}/sub", "--minutes",
         absent=("{tmp}/sub",)),
    Case("subset-minutes-blocked", "data subset-minutes --data {data} --minutes 1 --out {blocker}/sub", "--out {blocker}/sub"),
    Case("filter-negative", "data filter {data} {tmp}/f --max-duration -1", "--max-duration", absent=("{tmp}/f",)),
    Case("filter-blocked", "data filter {data} {blocker}/f --max-duration 10", "OUT {blocker}/f"),
    Case("to-lhotse-blocked", "data to-lhotse {data} {blocker}/lh", "OUT {blocker}/lh", subprocess=True),
    Case("durations-empty-wav", "data durations {tmp}/d", "utt spk0-data00 (path {tmp}/empty.wav)", setup=empty_wav,
         absent=("{tmp}/d/utt2dur",)),
    Case("subset-first-zero", "data subset {data} {tmp}/s --first 0", "--first", absent=("{tmp}/s",)),
    Case("librilight-nj-0", "data librilight-limited --root {tmp} --split 1h --out {tmp}/ll --nj 0", "--nj",
         absent=("{tmp}/ll",)),
    # --- features
    Case("dump-blocked", "features dump --data {data} --out {blocker}/st", "--out {blocker}/st", subprocess=True),
    Case("dump-missing-wav", "features dump --data {tmp}/d --out {tmp}/st", "utt spk0-data00 (path {tmp}/gone.wav)", setup=missing_wav,
         absent=("{tmp}/st/shard.*.done",)),
    Case("dump-empty-wav", "features dump --data {tmp}/d --out {tmp}/st", "utt spk0-data00 (path {tmp}/empty.wav)", setup=empty_wav,
         absent=("{tmp}/st/shard.*.done",)),
    Case("dump-batch-seconds", "features dump --data {data} --out {tmp}/st --batch-seconds 0", "--batch-seconds",
         absent=("{tmp}/st/shard.*.done",)),
    # --- kmeans
    Case("kmeans-fit-k0", "kmeans fit --feats {mfcc} --k 0 --out {tmp}/km", "--k must be >= 1",
         absent=("{tmp}/km/kmeans.json",)),
    Case("kmeans-fit-niter0", "kmeans fit --feats {mfcc} --k 2 --niter 0 --out {tmp}/km", "--niter",
         absent=("{tmp}/km/kmeans.json",)),
    Case("kmeans-fit-sample-frac", "kmeans fit --feats {mfcc} --k 2 --sample-frac 2 --out {tmp}/km", "--sample-frac",
         absent=("{tmp}/km/kmeans.json",), subprocess=True),
    Case("kmeans-fit-missing-store", "kmeans fit --feats {tmp}/nostore --k 2 --out {tmp}/km", "{tmp}/nostore",
         absent=("{tmp}/km/kmeans.json",)),
    Case("kmeans-fit-blocked", "kmeans fit --feats {mfcc} --k 2 --out {blocker}/km", "--out {blocker}/km"),
    Case("kmeans-fit-readonly", "kmeans fit --feats {mfcc} --k 2 --out {tmp}/ro/km", "{tmp}/ro", setup=readonly_dir,
         absent=("{tmp}/ro/km",)),
    Case("kmeans-label-blocked", "kmeans label --feats {mfcc} --km {km} --out {blocker}/lab", "--out {blocker}/lab"),
    Case("kmeans-label-batch-frames", "kmeans label --feats {mfcc} --km {km} --out {tmp}/lab --batch-frames 0",
         "--batch-frames", absent=("{tmp}/lab/meta.json",)),
    Case("kmeans-label-missing-km", "kmeans label --feats {mfcc} --km {tmp}/nokm --out {tmp}/lab", "{tmp}/nokm",
         absent=("{tmp}/lab/meta.json",)),
    # --- units
    Case("quality-other-audio", "units quality --labels {labels} --alignments {other_ctm} --out {tmp}/q.json",
         "utt spk0-data00: 58 labels", absent=("{tmp}/q.json",)),
    Case("quality-out-blocked", "units quality --labels {labels} --alignments {ctm} --out {blocker}/q.json",
         "--out {blocker}/q.json"),
    Case("quality-unfinished-labels", "units quality --labels {tmp}/lab --alignments {ctm}", "{tmp}/lab/meta.json",
         setup=unfinished_labels),
    Case("quality-plot-blocked", "units quality --labels {labels} --alignments {ctm} --plot {blocker}/q.png",
         "--plot {blocker}/q.png"),
    Case("layers-blocked", "units layers --ckpt {ckpt} --data {data} --alignments {ctm} --k 2 --out {blocker}/lay",
         "--out {blocker}/lay"),
    Case("layers-k0", "units layers --ckpt {ckpt} --data {data} --alignments {ctm} --k 0 --out {tmp}/lay",
         "--k must be >= 1", absent=("{tmp}/lay/layers.json",)),
    Case("layers-max-utts", "units layers --ckpt {ckpt} --data {data} --alignments {ctm} --k 2 --max-utts 0 "
         "--out {tmp}/lay", "--max-utts", absent=("{tmp}/lay/layers.json",)),
    Case("layers-other-audio", "units layers --ckpt {ckpt} --data {data} --alignments {other_ctm} --k 2 "
         "--no-baseline --out {tmp}/lay", "{other_ctm}", absent=("{tmp}/lay/layers.json",)),
    # --- pretrain
    Case("pretrain-labels-k", "pretrain --config {pretrain_conf} exp_dir={tmp}/exp data.train_labels=[{tmp}/lab5]",
         "{tmp}/lab5: k=5", setup=labels_k5, absent=("{tmp}/exp/checkpoints/*", "{tmp}/exp/best")),
    Case("pretrain-wrong-sample-rate", "pretrain --config {pretrain_conf} exp_dir={tmp}/exp data.train={tmp}/d8k "
         "data.train_labels=[{labels}]", "{tmp}/d8k: 6 utterance(s) with missing or misaligned labels: utt spk",
         setup=wrong_rate, absent=("{tmp}/exp/checkpoints/*", "{tmp}/exp/best")),
    Case("pretrain-exp-blocked", "pretrain --config {pretrain_conf} exp_dir={blocker}/exp data.train_labels=[{labels}]",
         "exp_dir {blocker}/exp"),
    Case("pretrain-rerun-without-resume", "pretrain --config {pretrain_conf} exp_dir={tmp}/exp "
         "data.train_labels=[{labels}]", "{tmp}/exp holds a pretrain run already: --resume continues it",
         setup=old_run_dirs),
    Case("pretrain-resume-other-seed", "pretrain --config {pretrain_conf} exp_dir={tmp}/exp --resume auto "
         "data.train_labels=[{labels}] seed=9", "--resume with seed = 9, but the run was made with 1",
         setup=pretrained_run, absent=("{tmp}/exp/checkpoints/step-00000003",)),
    Case("pretrain-resume-and-overwrite", "pretrain --config {pretrain_conf} exp_dir={tmp}/exp --resume auto "
         "--overwrite data.train_labels=[{labels}]", "choose one", setup=pretrained_run),
    Case("pretrain-init-from-truncated", "pretrain --config {pretrain_conf} exp_dir={tmp}/exp "
         "data.train_labels=[{labels}] ckpt.init_from={tmp}/ckpt", "{tmp}/ckpt/model.safetensors: corrupt or "
         "truncated", setup=truncated_ckpt, absent=("{tmp}/exp/checkpoints/*",)),
    # --- finetune
    Case("finetune-phones-of-other-audio", "finetune --init {ckpt} --train {tmp}/d --units phone --out {tmp}/ft "
         "optim.max_steps=1", "utt spk0-data00: its audio ({tmp}/d) lasts 0.60 s but the alignment "
         "({tmp}/d/phones.ctm) lasts 3 s", setup=other_audio_phones, absent=("{tmp}/ft/best", "{tmp}/ft/checkpoints/*")),
    Case("finetune-max-seconds-negative", "finetune --init {ckpt} --train {data} --units phone --out {tmp}/ft "
         "data.max_seconds=-1", "data.max_seconds must be > data.min_seconds", absent=("{tmp}/ft",)),
    Case("finetune-rerun-without-resume", "finetune --init {ckpt} --train {data} --units phone --out {tmp}/ft "
         "optim.max_steps=1", "{tmp}/ft holds a finetune run already", setup=old_run_dirs),
    Case("finetune-out-blocked", "finetune --init {ckpt} --train {data} --units phone --out {blocker}/ft "
         "optim.max_steps=1", "--out {blocker}/ft"),
    Case("finetune-missing-init", "finetune --init {tmp}/nowhere --train {data} --units char --out {tmp}/ft",
         "{tmp}/nowhere", absent=("{tmp}/ft/best",)),
    Case("finetune-no-transcripts", "finetune --init {ckpt} --train {tmp}/d --units phone --out {tmp}/ft "
         "optim.max_steps=1", "{tmp}/d", setup=no_phones, absent=("{tmp}/ft/best",)),
    # --- extract / export
    Case("extract-blocked", "extract --upstream {ckpt} --data {data} --layers 1 --out {blocker}/ex", "--out {blocker}/ex"),
    Case("extract-max-duration", "extract --upstream {ckpt} --data {data} --layers 1 --out {tmp}/ex --max-duration -1",
         "--max-duration", absent=("{tmp}/ex/layer_*/shard.*.done",)),
    Case("extract-sample-frac", "extract --upstream {ckpt} --data {data} --layers 1 --out {tmp}/ex --sample-frac 0",
         "--sample-frac", absent=("{tmp}/ex/layer_*/shard.*.done",)),
    Case("extract-layer", "extract --upstream {ckpt} --data {data} --layers 7 --out {tmp}/ex", "--layers",
         absent=("{tmp}/ex/layer_*/shard.*.done",)),
    Case("export-exists", "export --ckpt {ckpt} --to s3prl {tmp}/model.pt", "{tmp}/model.pt: exists",
         setup=existing_file),
    Case("export-blocked", "export --ckpt {ckpt} --to hf {blocker}/hf", "OUT {blocker}/hf"),
    # --- decode
    Case("decode-beam", "decode --ckpt {ckpt} --data {data} --out {tmp}/dec --beam -1", "--beam",
         absent=("{tmp}/dec",)),
    Case("decode-lm-weight", "decode --ckpt {ckpt} --data {data} --out {tmp}/dec --beam 4 --lm-weight nan",
         "--lm-weight", absent=("{tmp}/dec",)),
    Case("decode-batch-seconds", "decode --ckpt {ckpt} --data {data} --out {tmp}/dec --batch-seconds 0",
         "--batch-seconds", absent=("{tmp}/dec",)),
    Case("decode-out-blocked", "decode --ckpt {ckpt} --data {data} --out {blocker}/dec", "--out {blocker}/dec"),
    # --- superb
    Case("superb-pr-other-audio", "superb --task pr --upstream fbank --data {superb} --out {tmp}/pr --max-steps 2",
         "utt spk0-train00: its audio ({superb}/train) lasts 0.60 s but the alignment ({superb}/train/phones.ctm) "
         "lasts 3 s", absent=("{tmp}/pr/results.json",)),
    Case("superb-out-blocked", "superb --task pr --upstream fbank --data {superb} --out {blocker}/pr --max-steps 1 "
         "--train {superb}/dev", "--out {blocker}/pr"),
    Case("superb-missing-split", "superb --task pr --upstream fbank --data {data} --out {tmp}/pr", "{data}/train",
         absent=("{tmp}/pr/results.json",)),
    Case("superb-max-steps-0", "superb --task pr --upstream fbank --data {superb} --out {tmp}/pr --max-steps 0",
         "--max-steps (optim.max_steps) must be >= 1", absent=("{tmp}/pr/results.json",)),
    Case("superb-lr-sweep-negative", "superb --task pr --upstream fbank --data {superb} --out {tmp}/pr "
         "--lr-sweep=-1e-3", "--lr-sweep", absent=("{tmp}/pr/results.json",)),
    Case("superb-rerun-without-resume", "superb --task pr --upstream fbank --data {superb} --train {superb}/dev "
         "--out {tmp}/pr --max-steps 1", "{tmp}/pr holds a superb run already", setup=old_run_dirs),
    Case("superb-resume-other-seed", "superb --task pr --upstream fbank --data {superb} --train {superb}/dev "
         "--out {tmp}/pr --max-steps 1 --resume --seed 3", "--resume with seed = 3, but the run was made with 0",
         setup=superb_run),
    Case("superb-resume-other-upstream", "superb --task pr --upstream {ckpt} --data {superb} --train {superb}/dev "
         "--out {tmp}/pr --max-steps 1 --resume", "--resume with upstream (its contents changed)", setup=superb_run),
    Case("superb-truncated-upstream", "superb --task pr --upstream {tmp}/ckpt --data {superb} --train {superb}/dev "
         "--out {tmp}/pr --max-steps 1", "{tmp}/ckpt/model.safetensors: corrupt or truncated", setup=truncated_ckpt,
         absent=("{tmp}/pr/results.json", "{tmp}/pr/lr_*")),
    Case("extract-truncated-ckpt", "extract --upstream {tmp}/ckpt --data {data} --layers 1 --out {tmp}/ex",
         "{tmp}/ckpt/model.safetensors: corrupt or truncated", setup=truncated_ckpt,
         absent=("{tmp}/ex/layer_*/shard.*.done",)),
    Case("superb-trials-per-utt-0", "superb trials --data {data} --out {tmp}/trials --per-utt 0", "--per-utt",
         absent=("{tmp}/trials",)),
    Case("superb-trials-blocked", "superb trials --data {data} --out {blocker}/trials", "--out {blocker}/trials"),
    Case("superb-table-foreign", "superb table {tmp}/run/results.json --out {tmp}/table.md", "{tmp}/run/results.json",
         setup=foreign_json, absent=("{tmp}/table.md",)),
    Case("superb-prepare-blocked", "superb prepare fluent_speech_commands --corpus {tmp} --out {blocker}/fsc",
         "--out {blocker}/fsc", group="superb prepare fluent_speech_commands"),
    Case("superb-prepare-missing-corpus", "superb prepare fluent_speech_commands --corpus {tmp}/fsc --out {tmp}/out",
         "{tmp}/fsc", group="superb prepare fluent_speech_commands", absent=("{tmp}/out",)),
    Case("superb-prepare-nj-0", "superb prepare librispeech --corpus {tmp} --out {tmp}/ls --nj 0", "--nj",
         group="superb prepare librispeech", absent=("{tmp}/ls",)),
    # --- report
    Case("report-out-blocked", "report {root} --out {blocker}/report.md", "--out {blocker}/report.md"),
    Case("report-missing-exp", "report {tmp}/noexp", "{tmp}/noexp", absent=("{tmp}/noexp/report.md",)),
]


def _fmt(s: str, env: dict, tmp: Path) -> str:
    return s.format(**env, tmp=tmp)


def _is_log(line: str) -> bool:
    """Logging output (the CLI's format: 'date time LEVEL name: message'; corpus preparers: 'LEVEL name: ...')."""
    return any(f" {lvl} " in f" {line}" for lvl in ("DEBUG", "INFO", "WARNING"))


@pytest.fixture(autouse=True)
def no_progress(monkeypatch):
    """No progress bars on stderr (the error line is then all there is besides log lines)."""
    monkeypatch.setenv("SPEECHSSL_PROGRESS", "0")


@pytest.fixture
def as_non_root(monkeypatch):
    """Directories made read-only (0o555) are read-only to root too: os.access answers as for any other user."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, *a, **kw):
        p = Path(path)
        if mode & os.W_OK and p.exists() and p.is_dir() and not (p.stat().st_mode & 0o200):
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env, tmp_path, capsys, as_non_root):
    if case.setup is not None:
        case.setup(env, tmp_path)
    argv = _fmt(case.argv, env, tmp_path).split()
    if case.subprocess:
        r = subprocess.run([sys.executable, "-m", "speechssl", *argv], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "SPEECHSSL_PROGRESS": "0"})
        rc, err = r.returncode, r.stderr
    else:
        rc = main(argv)
        err = capsys.readouterr().err
    try:
        group = case.group or argv[0]
        lines = [ln for ln in err.splitlines() if ln.strip() and not _is_log(ln)]
        if os.environ.get("SHOW_ERRORS"):
            print(f"\n[{case.id}] rc={rc}: {lines[-1] if lines else ''}", file=sys.__stderr__)
        assert rc == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"speechssl {group}: error: "), lines[0]
        assert _fmt(case.expect, env, tmp_path) in lines[0], lines[0]
        for p in case.absent:
            assert not glob.glob(_fmt(p, env, tmp_path)), f"{p} left behind"
    finally:
        for p in tmp_path.rglob("*"):  # read-only dirs back to writable, so pytest can clean up
            if p.is_dir():
                p.chmod(0o755)


# ------------------------------------------------------------------------------------------- the safety net
def test_os_error_naming_a_path_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError about a path that slipped past every preflight (permission, file in the way, disk full) is one
    error line; any other exception, an OSError without a path included, stays an internal error with traceback."""
    import errno

    import speechssl.data.kaldi as kaldi

    def raising(exc):
        def f(*args, **kwargs):
            raise exc
        return f

    for exc, says in ((PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x")),
                       f"speechssl data: error: {tmp_path / 'x'}: Permission denied"),
                      (OSError(errno.ENOSPC, "No space left on device"),
                       "speechssl data: error: No space left on device")):
        monkeypatch.setattr(kaldi, "read_data_dir", raising(exc))
        assert main(["data", "validate", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [err.strip()] and err.startswith(says) and "Traceback" not in err, err
    for exc in (OSError(errno.EIO, "Input/output error"), FileNotFoundError(errno.ENOENT, "gone", "/x"),
                KeyError("k")):
        monkeypatch.setattr(kaldi, "read_data_dir", raising(exc))
        assert main(["data", "validate", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "internal error" in err, err


def test_preflight_helpers(tmp_path, as_non_root):
    from speechssl.errors import UserError
    from speechssl.fileio import check_writable_dir, check_writable_file

    assert check_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing created unless asked
    check_writable_dir(tmp_path / "a" / "b", "--out", create=True)
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        for call, says in ((lambda: check_writable_dir(tmp_path / "f", "--out"), "is a file, not a directory"),
                           (lambda: check_writable_dir(tmp_path / "f" / "x" / "y", "--out"), f"{tmp_path / 'f'} is a file"),
                           (lambda: check_writable_dir(tmp_path / "link" / "x", "--out"), "broken symbolic link"),
                           (lambda: check_writable_dir(tmp_path / "ro" / "x", "--out"), "is not writable"),
                           (lambda: check_writable_file(tmp_path / "a", "--plot"), "a directory is in the way"),
                           (lambda: check_writable_file(tmp_path / "ro" / "r.json", "--out"), "is not writable")):
            with pytest.raises(UserError, match=says) as e:
                call()
            assert "\n" not in str(e.value) and str(e.value).startswith(("--out ", "--plot ")), e.value
        check_writable_file(tmp_path / "a" / "b" / "r.json", "--out")
    finally:
        (tmp_path / "ro").chmod(0o755)
