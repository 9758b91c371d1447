#!/usr/bin/env python
"""Hidden-state extraction speed: ``speechssl extract`` against transformers and fairseq (s3prl's copy), same
weights, same corpus, same batch budget, same torch threads; each peer twice: given the same work as ours, and as
its docs' plain example uses it.

A Base-sized HuBERT (``speechssl.models.config.hubert_base``, random weights, seed 0, the same weights in all) extracts
hidden state 6 (``--layers 6,all``: also all 13 hidden states) of a synthetic corpus with a realistic length mix
(2-20 s, mostly 10-17 s as LibriSpeech; tones + noise under a syllable-rate envelope; ``--seconds`` of audio in all,
default 60) into feature stores (float32), fp32 and, with ``--dtypes fp32,bf16``, bf16 autocast (fast with AMX or on
CUDA):

* ``ours``: :func:`speechssl.upstream.extract.extract_with`: the ``speechssl extract`` path (durations from the
  audio headers, utterances sorted by duration, batches of at most ``--max-duration`` padded seconds, the model
  run only up to the deepest layer asked for, rows independent of their padding, audio read ahead by 2 threads,
  written through ``FeatureWriter``);
* ``hf`` (equal work): ``transformers.HubertModel.from_pretrained(dir, num_hidden_layers=6)`` for layer 6 (the
  model cut to the layer asked for; all 12 layers for all), ``(**inputs, output_hidden_states=True)`` on the same
  batches as ours (sorted by duration, ``padded_batches``, same budget), audio read the way ours is
  (``prefetch(load_utterance, workers=2, ahead=32)``);
* ``hf-doc`` (as documented): the docs' plain example: the whole model, batches in corpus order (same
  padded-seconds budget), audio read with ``soundfile`` in the loop. Both: ``Wav2Vec2FeatureExtractor`` padding
  (``attention_mask`` only where the config's extractor returns one: not for Base's group-norm CNN, whose docs say to
  zero-pad only); frames cut at ``_get_feat_extract_output_lengths``, written through the same store;
* ``fairseq`` (equal work): s3prl's vendored fairseq ``HubertModel``: ``extract_features(padded, padding_mask,
  output_layer=6)`` for one layer (fairseq's own early stop), s3prl's expert hooks (input of every layer + encoder
  output) for all; ours' batches and audio reading as ``hf``;
* ``fairseq-doc`` (as documented): layer 6 as fairseq's ``examples/hubert/simple_kmeans/dump_hubert_feature.py``:
  one utterance per ``extract_features(source, padding_mask=None, mask=False, output_layer=6)`` call, corpus order,
  audio read in the loop; all layers as s3prl's expert: corpus-order batches, hooks.

Every case gets the same ``torch.set_num_threads(--threads)``. Each case runs in its own subprocess after a warm-up
forward; ``--repeat`` rounds run every case round-robin (ours next to each peer in time), so the medians and the
per-round ratios see the same background load: wall seconds of the whole extraction (audio reading and store writing
included, model loading not), seconds of audio per second, ours/peer = median over rounds of the peer's wall / ours
in the same round (> 1: ours faster), the same on CPU seconds of the case's process (all threads; on a machine
shared with other jobs it moves less than wall time), peak memory (CPU: VmHWM minus the RSS before the model was
built; CUDA: ``max_memory_allocated``). The summary prints, per peer, the equal-work ratio (the headline: the same
work done faster or slower) beside the as-documented one (what a user following the peer's example sees; the gap
between the two is what sorting, stopping early and reading ahead are worth). Then every store is compared with ours
(max abs difference over all frames of every layer, and over the rows a peer did not pad: transformers and fairseq
let padding into the group norm, and transformers without an attention mask into attention too) and each bf16 store
with its fp32 one.

``--chunk SECONDS`` adds the chunked-inference check: one recording of that length (the corpus concatenated)
through :func:`speechssl.upstream.extract.chunked_forward` at 10/20/30 s chunks against the whole-utterance
forward, per layer (``--chunk-ckpt DIR``: also a trained checkpoint, e.g. the mini_synth iteration 2).

    python tools/bench/extract.py [--seconds 60] [--max-duration 40] [--dtypes fp32,bf16] [--threads N]
                                  [--repeat 2] [--impls ours,hf,hf-doc,fairseq,fairseq-doc] [--layers 6,all]
                                  [--device cpu|cuda] [--quick] [--chunk 60 [--chunk-ckpt DIR]] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

SR = 16000
LAYER = 6
IMPLS = ("ours", "hf", "hf-doc", "fairseq", "fairseq-doc")


# ----------------------------------------------------------------------------------------------------- helpers
def proc_status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast(device: torch.device, dtype: str):
    import contextlib

    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lengths_mix(total_seconds: float, seed: int = 0) -> list[float]:
    """Utterance lengths (s) summing to about ``total_seconds``: 60% in 10-17 s, 30% in 2-10 s, 10% in 17-20 s."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    while sum(out) < total_seconds:
        r = rng.random()
        lo, hi = (10.0, 17.0) if r < 0.6 else (2.0, 10.0) if r < 0.9 else (17.0, 20.0)
        out.append(round(float(rng.uniform(lo, hi)), 3))
    return out


def synth(seconds: float, seed: int) -> np.ndarray:
    """Tones gliding under a 4 Hz syllable-like envelope plus noise: speech-like level and spectrum spread."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 2
    wav = 0.08 * env * voiced + 0.01 * rng.standard_normal(n)
    return wav.astype(np.float32)


def make_corpus(root: Path, total_seconds: float) -> tuple[Path, list[float]]:
    from speechssl.audio import save_audio
    from speechssl.data.kaldi import DataDir, write_data_dir

    lengths = lengths_mix(total_seconds)
    scp = {}
    for i, sec in enumerate(lengths):
        utt = f"utt{i:04d}"  # ids unrelated to length: corpus order is a random length order
        path = root / "wav" / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_audio(path, synth(sec, i))
        scp[utt] = str(path)
    write_data_dir(DataDir(wav_scp=scp, utt2spk={u: u for u in scp}), root / "data")
    return root / "data", lengths


def make_models(root: Path) -> tuple[Path, Path]:
    """Base HuBERT, random weights (seed 0): a speechssl checkpoint and the same weights as a transformers dir."""
    from speechssl.models import HubertPretrainModel, hubert_base, save_model
    from speechssl.models.hf import export_hf

    torch.manual_seed(0)
    cfg = hubert_base()
    save_model(HubertPretrainModel(cfg), cfg, root / "ckpt")
    export_hf(root / "ckpt", root / "hf")
    return root / "ckpt", root / "hf"


def corpus_batches(lengths: list[int], max_samples: int) -> list[list[int]]:
    """Consecutive groups in corpus order with rows x longest row <= ``max_samples`` (a longer row alone): the
    peers get the same padded-audio budget as ours, without the sorting."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > max_samples:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


# -------------------------------------------------------------------------------------------------- one case
def _writers(out: Path, layers: list[int]):
    from speechssl.features.store import FeatureWriter

    return {layer: FeatureWriter(out / f"layer_{layer}", 0, 1, {"kind": f"hubert_l{layer}", "frame_rate": 50.0,
                                                                "dtype": "float32"}) for layer in layers}


def _write(writers: dict, ids: list[str], hidden: dict, frames: list[int], layers: list[int]) -> None:
    for j, utt in enumerate(ids):
        for layer in layers:
            writers[layer].add(utt, hidden[layer][j, : frames[j]].float().cpu().numpy())


def _documented_run(spec: dict, forward, per_utterance: bool = False) -> dict:
    """As a peer's docs show it: batches in corpus order (same padded-seconds budget as ours; one utterance per
    call with ``per_utterance``, as fairseq's ``dump_hubert_feature.py``), audio read with ``soundfile`` in the
    loop, one file after the other."""
    import soundfile as sf

    from speechssl.data.kaldi import read_data_dir

    dd = read_data_dir(spec["data"])
    ids = dd.utt_ids()
    paths = [dd.wav_scp[u] for u in ids]
    lens = [sf.info(p).frames for p in paths]
    batches = corpus_batches(lens, 0 if per_utterance else int(spec["max_duration"] * SR))
    layers = spec["layer_list"]
    writers = _writers(Path(spec["out"]), layers)
    unpadded: list[str] = []
    padded_samples = 0
    for b in batches:
        wavs = [sf.read(paths[i], dtype="float32")[0] for i in b]
        hidden, frames = forward(wavs, layers)
        _write(writers, [ids[i] for i in b], hidden, frames, layers)
        longest = max(lens[k] for k in b)
        unpadded += [ids[i] for i in b if lens[i] == longest]
        padded_samples += len(b) * longest
    for w in writers.values():
        w.close()
    return {"unpadded": unpadded, "batches": len(batches), "padded_s": padded_samples / SR}


def _equal_work_run(spec: dict, forward) -> dict:
    """What ours does, with the peer's model: utterances sorted by duration (``shard_utterances``, the order
    ``speechssl extract`` computes them in), batches of at most ``max_duration`` padded seconds
    (``padded_batches``, the same rule), audio read ahead by 2 threads (``prefetch(..., workers=2, ahead=32)``, as
    ``hidden_stream``): the same batches, padding and I/O as ours."""
    import functools

    from speechssl.data.batching import padded_batches, prefetch
    from speechssl.data.kaldi import load_utterance, read_data_dir
    from speechssl.upstream.extract import shard_utterances

    dd = read_data_dir(spec["data"])
    utts, _ = shard_utterances(dd, dd.utt_ids())
    layers = spec["layer_list"]
    writers = _writers(Path(spec["out"]), layers)
    unpadded: list[str] = []
    padded_samples = nbatch = 0
    audio = prefetch(functools.partial(load_utterance, sample_rate=SR), utts, workers=2, ahead=32)
    for batch in padded_batches(audio, lambda uw: len(uw[1]), int(spec["max_duration"] * SR)):
        wavs = [w for _, w in batch]
        hidden, frames = forward(wavs, layers)
        _write(writers, [u.utt_id for u, _ in batch], hidden, frames, layers)
        longest = max(len(w) for w in wavs)
        unpadded += [u.utt_id for u, w in batch if len(w) == longest]
        padded_samples += len(batch) * longest
        nbatch += 1
    for w in writers.values():
        w.close()
    return {"unpadded": unpadded, "batches": nbatch, "padded_s": padded_samples / SR}


def run_case(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    rss0 = proc_status_kib("VmRSS")
    impl, dtype = spec["impl"], spec["dtype"]
    warm = [np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32) * 0.05]

    if impl == "ours":
        from speechssl import upstream
        from speechssl.upstream.extract import extract_with, forward_rows

        up = upstream.load(spec["ckpt"], device=device)
        sha1 = upstream.checkpoint_sha1(spec["ckpt"])
        forward_rows(up, warm, spec["layer_list"], precision=dtype)

        def go() -> dict:
            extract_with(up, sha1, spec["data"], spec["out"], spec["layer_list"], max_duration=spec["max_duration"],
                         dtype="float32", precision=dtype, progress=False)
            return {"layers_run": max(spec["layer_list"])}

    elif impl in ("hf", "hf-doc"):
        import transformers

        doc = impl == "hf-doc"
        fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(spec["hf"])
        # equal work: a model cut to the deepest layer asked for (config.num_hidden_layers overridden at loading:
        # the layers above it are not built). Base (post-norm encoder) applies no norm after the last layer, so
        # hidden_states[L] of the cut model is hidden_states[L] of the whole one.
        cut = {} if doc or spec["layers"] == "all" else {"num_hidden_layers": max(spec["layer_list"])}
        model = transformers.HubertModel.from_pretrained(spec["hf"], **cut).to(device).eval()
        layers_run = model.config.num_hidden_layers

        def forward(wavs, layers):
            inputs = fe(wavs, sampling_rate=SR, padding=True, return_tensors="pt").to(device)
            with torch.no_grad(), autocast(device, dtype):
                out = model(**inputs, output_hidden_states=True)
            frames = model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in wavs])).tolist()
            return {layer: out.hidden_states[layer] for layer in layers}, frames

        forward(warm, spec["layer_list"])

        def go() -> dict:
            run = _documented_run(spec, forward) if doc else _equal_work_run(spec, forward)
            return {**run, "attention_mask": bool(fe.return_attention_mask), "layers_run": layers_run}

    elif impl in ("fairseq", "fairseq-doc"):
        from pretrain import FairseqPeer, fairseq_state

        from speechssl.models import load_model

        doc = impl == "fairseq-doc"
        ours = load_model(spec["ckpt"], pretrain_head=True)
        peer = FairseqPeer(ours.config)
        peer.model.load_state_dict(fairseq_state(ours.state_dict(), ours.config), strict=True)
        del ours
        model = peer.model.to(device).eval()
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        if spec["layers"] == "all":  # s3prl's expert: input of every layer (T, B, C) + the encoder's output
            for i, layer in enumerate(model.encoder.layers):
                hooks.append(layer.register_forward_hook(
                    lambda m, inp, out, i=i: captured.__setitem__(i, inp[0].transpose(0, 1))))
        # one layer: extract_features(..., output_layer=L) stops after layer L (fairseq's own truncation), both
        # as documented (dump_hubert_feature.py) and for equal work
        layers_run = len(model.encoder.layers) if spec["layers"] == "all" else max(spec["layer_list"])

        def forward(wavs, layers):
            lens = torch.tensor([len(w) for w in wavs])
            padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in wavs], batch_first=True)
            pad_mask = torch.arange(padded.shape[1])[None] >= lens[:, None]
            pad_mask = pad_mask.to(device) if bool(pad_mask.any()) else None  # dump_hubert_feature.py: None
            with torch.no_grad(), autocast(device, dtype):
                if spec["layers"] == "all":
                    x, _ = model.extract_features(padded.to(device), padding_mask=pad_mask, mask=False)
                    hidden = {**captured, len(model.encoder.layers): x}
                else:
                    x, _ = model.extract_features(padded.to(device), padding_mask=pad_mask, mask=False,
                                                  output_layer=layers[0])
                    hidden = {layers[0]: x}
            frames = lens.clone()
            for _, k, s in peer.cfg.conv_layers:
                frames = (frames - k) // s + 1
            return hidden, frames.tolist()

        forward(warm, spec["layer_list"])

        def go() -> dict:
            if doc:  # one layer: dump_hubert_feature.py, one utterance per call; all: s3prl's expert on batches
                run = _documented_run(spec, forward, per_utterance=spec["layers"] != "all")
            else:
                run = _equal_work_run(spec, forward)
            return {**run, "layers_run": layers_run}

    else:
        raise ValueError(f"unknown implementation {impl!r} ({', '.join(IMPLS)})")

    sync(device)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    extra = go()
    sync(device)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # all threads: less load-sensitive
    out = {"wall": wall, "cpu": cpu, **extra}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - mem0) / 2**20
    else:
        out["peak_mib"] = (proc_status_kib("VmHWM") - rss0) / 1024
    return out


def _case_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        out = run_case(spec)
    except Exception as e:  # a failed row; the run goes on
        import traceback

        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
    print("@@RESULT " + json.dumps(out), flush=True)


def spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--_case", json.dumps(spec)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (lower --seconds or raise --case-timeout)"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            out = json.loads(line[len("@@RESULT "):])
            if "error" in out:
                out["stderr"] = proc.stderr[-2000:]
            return out
    return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}


# ------------------------------------------------------------------------------------------------- comparison
def max_diff(a_dir: Path, b_dir: Path, layers: list[int], only: set[str] | None = None) -> float:
    from speechssl.features.store import FeatureReader

    worst = 0.0
    for layer in layers:
        a, b = FeatureReader(a_dir / f"layer_{layer}"), FeatureReader(b_dir / f"layer_{layer}")
        for u in a.ids:
            if only is None or u in only:
                worst = max(worst, float(np.abs(np.asarray(a[u], np.float32) - np.asarray(b[u], np.float32)).max()))
    return worst


def max_abs(a_dir: Path, layers: list[int]) -> float:
    from speechssl.features.store import FeatureReader

    return max(float(np.abs(d).max()) for layer in layers
               for _, _, d in FeatureReader(a_dir / f"layer_{layer}").shard_arrays())


# ------------------------------------------------------------------------------------------------ chunk check
def chunk_check(seconds: float, data: Path, ckpts: dict[str, str | None], threads: int) -> None:
    import soundfile as sf

    from speechssl import upstream
    from speechssl.data.kaldi import read_data_dir
    from speechssl.models import HubertModel, hubert_base
    from speechssl.upstream.extract import chunked_forward

    torch.set_num_threads(threads)
    dd = read_data_dir(data)
    pieces, total = [], 0
    for u in dd.utt_ids():
        w = sf.read(dd.wav_scp[u], dtype="float32")[0]
        pieces.append(w)
        total += len(w)
        if total >= seconds * SR:
            break
    wav = np.concatenate(pieces)[: int(seconds * SR)]
    print(f"\nchunked inference: one {len(wav) / SR:.1f} s recording ({data}), chunked vs whole-utterance forward")
    print("mean |diff| / mean |h| and min cosine per frame, over the layers (min .. max); max |diff|")
    for name, path in ckpts.items():
        if path is None:
            torch.manual_seed(0)
            up = upstream.Upstream(HubertModel(hubert_base()))
        else:
            up = upstream.load(path)
        whole, _ = up([torch.from_numpy(wav)])
        whole_np = [h[0].numpy() for h in whole]
        layers = list(range(up.num_layers))
        for chunk in (10.0, 20.0, 30.0):
            got = chunked_forward(up, wav, layers, chunk_seconds=chunk)
            rel, cos, mx = [], [], 0.0
            for layer in layers:
                a, b = got[layer], whole_np[layer]
                d = np.abs(a - b)
                rel.append(d.mean() / np.abs(b).mean())
                cos.append(float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min()))
                mx = max(mx, float(d.max()))
            print(f"  {name:<28} chunk {chunk:>4.0f} s: layer 0 {rel[0]:.1e}, layers 1..{layers[-1]} "
                  f"{min(rel[1:]):.3f} .. {max(rel[1:]):.3f}; min cos {min(cos[1:]):.4f} .. {max(cos[1:]):.4f}; "
                  f"max |diff| {mx:.3g}")


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="audio in the corpus (default 60)")
    p.add_argument("--max-duration", type=float, default=None,
                   help="padded seconds per batch for all (default: ours' default for the device)")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="comma list of " + ", ".join(IMPLS) + " (-doc: the peer as its docs' plain example uses "
                        "it; without: equal work)")
    p.add_argument("--layers", default="6", help="6 and/or all (default 6)")
    p.add_argument("--dtypes", default="fp32", help="fp32 and/or bf16 (bf16 autocast: with AMX or on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads for all (default torch.get_num_threads())")
    p.add_argument("--chunk", type=float, default=None, help="also check chunked inference on a recording this long")
    p.add_argument("--chunk-ckpt", default=None, help="a trained checkpoint for the chunk check too")
    p.add_argument("--chunk-data", default=None, help="data dir whose utterances make the chunk-check recording")
    p.add_argument("--repeat", type=int, default=2,
                   help="round-robin rounds of every case (default 2); medians and per-round ratios")
    p.add_argument("--quick", action="store_true", help="40 s corpus, layer 6 only, fp32, 2 rounds")
    p.add_argument("--keep", default=None, help="work dir to keep (default: a temp dir, removed)")
    p.add_argument("--case-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._case is not None:
        _case_main(args._case)
        return
    if args.quick:
        args.seconds, args.layers, args.dtypes, args.repeat = min(args.seconds, 40.0), "6", "fp32", 2

    from speechssl.upstream.extract import default_max_duration

    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    max_duration = args.max_duration or default_max_duration(device)
    dtypes = args.dtypes.split(",")
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"--impls: unknown {impl!r} (choose from {', '.join(IMPLS)})")
    if "bf16" in dtypes and device.type == "cpu" and not has_amx():
        print("note: this CPU has no AMX; bf16 autocast is emulated and slow")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data, lengths = make_corpus(work, args.seconds)
        ckpt, hf = make_models(work)
        audio = sum(lengths)
        print(f"corpus: {len(lengths)} utterances, {audio:.1f} s (2-20 s, mean {audio / len(lengths):.1f} s); "
              f"Base HuBERT, random weights; device {device}, {threads} torch threads for every case, AMX "
              f"{has_amx()}, batches <= {max_duration:g} padded s; setup {time.perf_counter() - t0:.0f} s")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        sorted_samples = sorted(int(x * SR) for x in lengths)
        sorted_batches = corpus_batches(sorted_samples, int(max_duration * SR))
        sorted_padded = sum(len(b) * max(sorted_samples[i] for i in b) for b in sorted_batches) / SR
        results: dict[tuple[str, str, str], dict] = {}
        for rep in range(args.repeat):  # round-robin: background load hits every case alike
            for layers in args.layers.split(","):
                layer_list = list(range(13)) if layers == "all" else [int(layers)]
                for dtype in dtypes:
                    for impl in impls:
                        out = work / f"out_{impl}_{layers}_{dtype}"
                        shutil.rmtree(out, ignore_errors=True)
                        spec = {"impl": impl, "dtype": dtype, "layers": layers, "layer_list": layer_list,
                                "device": args.device, "threads": threads, "data": str(data), "ckpt": str(ckpt),
                                "hf": str(hf), "out": str(out), "max_duration": max_duration}
                        r = spawn(spec, args.case_timeout)
                        if impl == "ours" and "error" not in r:
                            r.update(batches=len(sorted_batches), padded_s=sorted_padded)
                        key = (impl, layers, dtype)
                        if "error" in r:
                            print(f"{impl} {layers} {dtype}: FAILED {r['error']}\n{r.get('stderr', '')}")
                            results[key] = r
                            continue
                        print(f"round {rep + 1}: {impl:<12} layers {layers:<4} {dtype}: {r['wall']:.1f} s", flush=True)
                        prev = results.get(key)
                        if prev is not None and "error" not in prev:  # all walls, worst peak
                            r["walls"] = prev["walls"] + [r["wall"]]
                            r["cpus"] = prev["cpus"] + [r["cpu"]]
                            r["peak_mib"] = max(r["peak_mib"], prev["peak_mib"])
                        else:
                            r["walls"], r["cpus"] = [r["wall"]], [r["cpu"]]
                        r["wall"], r["cpu"] = statistics.median(r["walls"]), statistics.median(r["cpus"])
                        results[key] = r
        load_after = os.getloadavg()

        def ratio(key: tuple[str, str, str], what: str = "walls") -> float:
            """Median over rounds of the peer's wall (or CPU) seconds / ours in the same round (> 1: ours faster)."""
            ours = results.get(("ours",) + key[1:], {})
            peer = results.get(key, {})
            if what not in ours or what not in peer:
                return float("nan")
            return statistics.median(a / b for a, b in zip(peer[what], ours[what]))

        print(f"\nmedian of {args.repeat} round-robin run(s) per case; ours/peer = median over rounds of the peer's "
              f"wall / ours in the same round (> 1: ours faster); load average after: "
              f"{' '.join(f'{x:.2f}' for x in load_after)}")
        print(f"{'impl':<13}{'layers':<8}{'dtype':<6}{'wall s':>8}{'audio s/s':>11}{'ours/peer':>11}{'cpu s':>8}"
              f"{'cpu o/p':>9}{'peak MiB':>10}{'batches':>9}{'padded s':>10}{'run':>5}  walls")
        for (impl, layers, dtype), r in results.items():
            if "error" in r:
                continue
            print(f"{impl:<13}{layers:<8}{dtype:<6}{r['wall']:>8.1f}{audio / r['wall']:>11.2f}"
                  f"{ratio((impl, layers, dtype)):>11.2f}{r['cpu']:>8.1f}{ratio((impl, layers, dtype), 'cpus'):>9.2f}"
                  f"{r['peak_mib']:>10.0f}"
                  f"{r.get('batches', ''):>9}{r.get('padded_s', float('nan')):>10.1f}{r.get('layers_run', ''):>5}  "
                  + " ".join(f"{w:.1f}" for w in r["walls"]))
        print("run = transformer layers run; padded s = seconds of padded audio through the model; cpu s = CPU "
              "seconds of the case's process (all threads), cpu o/p = the same ratio on CPU seconds")

        peers = [x for x in ("hf", "fairseq") if x in impls or f"{x}-doc" in impls]
        if "ours" in impls and peers:
            print("\nours/peer: equal work (HEADLINE: the peer given ours' sorted batches, a model stopped at the "
                  "layer asked for, the same threads and audio reading) | as documented (corpus-order batches, "
                  "whole model for hf, audio read in the loop; fairseq layer 6: dump_hubert_feature.py, one "
                  "utterance per call); wall seconds, then CPU seconds (all threads of the case's process)")
            for what, unit in (("wall", "wall"), ("cpu", "CPU")):
                head = f"{'layers':<8}{'dtype':<6}{'ours ' + unit + ' s':>12}"
                for peer in peers:
                    head += f"{peer + ' equal':>17}{peer + ' doc':>15}"
                print(head)
                for layers in args.layers.split(","):
                    for dtype in dtypes:
                        o = results.get(("ours", layers, dtype), {})
                        if what not in o:
                            continue
                        line = f"{layers:<8}{dtype:<6}{o[what]:>12.1f}"
                        for peer in peers:
                            for impl, width in ((peer, 17), (f"{peer}-doc", 15)):
                                r = results.get((impl, layers, dtype), {})
                                cell = (f"{r[what]:.1f} s {ratio((impl, layers, dtype), what + 's'):.2f}x"
                                        if what in r else "-")
                                line += f"{cell:>{width}}"
                        print(line)

        print("\noutputs: max |peer - ours| over every frame of every layer (all rows; rows the peer did not pad); "
              "bf16: max |bf16 - fp32| of the same implementation (relative to max |h|)")
        for (impl, layers, dtype), r in results.items():
            if "error" in r:
                continue
            layer_list = list(range(13)) if layers == "all" else [int(layers)]
            here = work / f"out_{impl}_{layers}_{dtype}"
            parts = []
            if impl != "ours" and "error" not in results.get(("ours", layers, dtype), {"error": 1}):
                ref = work / f"out_ours_{layers}_{dtype}"
                parts.append(f"vs ours: all rows {max_diff(ref, here, layer_list):.2e}, unpadded rows "
                             f"{max_diff(ref, here, layer_list, set(r['unpadded'])):.2e} "
                             f"({len(r['unpadded'])} rows)")
                if impl.startswith("hf"):
                    parts.append(f"attention_mask {'given' if r['attention_mask'] else 'not given (Base)'}")
            if dtype == "bf16" and "error" not in results.get((impl, layers, "fp32"), {"error": 1}):
                ref = work / f"out_{impl}_{layers}_fp32"
                d = max_diff(ref, here, layer_list)
                parts.append(f"bf16 vs fp32 {d:.3g} ({d / max_abs(ref, layer_list):.2%} of max |h|)")
            if parts:
                print(f"  {impl:<12} layers {layers:<4} {dtype}: " + "; ".join(parts))
        if args.json:
            Path(args.json).write_text(json.dumps({f"{k[0]}:{k[1]}:{k[2]}": v for k, v in results.items()},
                                                  indent=1))
        if args.chunk:
            ckpts = {"Base, random weights": None}
            if args.chunk_ckpt:
                ckpts[f"{args.chunk_ckpt}"] = args.chunk_ckpt
            chunk_check(args.chunk, Path(args.chunk_data) if args.chunk_data else data, ckpts, threads)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
