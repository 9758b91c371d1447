#!/usr/bin/env python
"""Hidden-state extraction speed: ``speechssl extract`` against transformers and fairseq (s3prl's copy), same
weights, same corpus, same batch budget.

A Base-sized HuBERT (``speechssl.models.config.hubert_base``, random weights, seed 0, the same weights in all
three) extracts one layer (6) and all 13 hidden states of a synthetic corpus with a realistic length mix (2-20 s,
mostly 10-17 s as LibriSpeech; tones + noise under a syllable-rate envelope; ``--seconds`` of audio in all,
default 150) into feature stores (float32), fp32 and, where the CPU has AMX (or on CUDA), bf16 autocast:

* ``ours``: :func:`speechssl.upstream.extract.extract_with`: the ``speechssl extract`` path (durations from the
  audio headers, utterances sorted by duration, batches of at most ``--max-duration`` padded seconds, the model
  run only up to the deepest layer asked for, rows independent of their padding, audio read by 2 threads,
  written through ``FeatureWriter``);
* ``hf``: ``transformers.HubertModel(...)(**inputs, output_hidden_states=True)`` as its docs show: batches in
  corpus order (same padded-seconds budget), ``Wav2Vec2FeatureExtractor`` padding (so ``attention_mask`` only
  where the config's extractor returns one: not for Base's group-norm CNN, whose docs say to zero-pad only),
  every layer run; frames cut at ``_get_feat_extract_output_lengths`` and written through the same store;
* ``fairseq``: s3prl's vendored fairseq ``HubertModel``: ``extract_features(padded, padding_mask,
  output_layer=6)`` for one layer (fairseq stops after layer 6), s3prl's expert hooks (input of every layer +
  encoder output) for all; corpus-order batches as ``hf``.

Each case runs in its own subprocess after a warm-up forward: wall seconds of the whole extraction (audio
reading and store writing included, model loading not), seconds of audio per second, ratio ours / peer
(> 1: ours faster), peak memory (CPU: VmHWM minus the RSS before the model was built; CUDA:
``max_memory_allocated``). Then every store is compared with ours (max abs difference over all frames of every
layer, and over the rows a peer did not pad: transformers and fairseq let padding into the group norm, and
transformers without an attention mask into attention too) and each bf16 store with its fp32 one.

``--chunk SECONDS`` adds the chunked-inference check: one recording of that length (the corpus concatenated)
through :func:`speechssl.upstream.extract.chunked_forward` at 10/20/30 s chunks against the whole-utterance
forward, per layer (``--chunk-ckpt DIR``: also a trained checkpoint, e.g. the mini_synth iteration 2).

    python tools/bench/extract.py [--seconds 150] [--max-duration 40] [--dtypes fp32,bf16] [--threads N] [--repeat 2]
                                  [--impls ours,hf,fairseq] [--layers 6,all] [--device cpu|cuda]
                                  [--chunk 60 [--chunk-ckpt DIR]] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def _peer_run(spec: dict, forward) -> dict:
    """Corpus-order batches through ``forward(wavs) -> (hidden per layer [B, T, D], frames per row)``."""
    import soundfile as sf

    from speechssl.data.kaldi import read_data_dir

    dd = read_data_dir(spec["data"])
    ids = dd.utt_ids()
    paths = [dd.wav_scp[u] for u in ids]
    lens = [sf.info(p).frames for p in paths]
    batches = corpus_batches(lens, int(spec["max_duration"] * SR))
    layers = spec["layer_list"]
    writers = _writers(Path(spec["out"]), layers)
    unpadded: list[str] = []
    padded_samples = 0
    for b in batches:
        wavs = [sf.read(paths[i], dtype="float32")[0] for i in b]
        hidden, frames = forward(wavs, layers)
        for j, i in enumerate(b):
            for layer in layers:
                writers[layer].add(ids[i], hidden[layer][j, : frames[j]].float().cpu().numpy())
            if lens[i] == max(lens[k] for k in b):
                unpadded.append(ids[i])
        padded_samples += len(b) * max(lens[k] for k in b)
    for w in writers.values():
        w.close()
    return {"unpadded": unpadded, "batches": len(batches), "padded_s": padded_samples / SR}


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
            return {}

    elif impl == "hf":
        import transformers

        fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(spec["hf"])
        model = transformers.HubertModel.from_pretrained(spec["hf"]).to(device).eval()

        def forward(wavs, layers):
            inputs = fe(wavs, sampling_rate=SR, padding=True, return_tensors="pt").to(device)
            with torch.no_grad(), autocast(device, dtype):
                out = model(**inputs, output_hidden_states=True)
            frames = model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in wavs])).tolist()
            return {layer: out.hidden_states[layer] for layer in layers}, frames

        forward(warm, spec["layer_list"])

        def go() -> dict:
            return {**_peer_run(spec, forward), "attention_mask": bool(fe.return_attention_mask)}

    elif impl == "fairseq":
        from pretrain import FairseqPeer, fairseq_state

        from speechssl.models import load_model

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

        def forward(wavs, layers):
            lens = torch.tensor([len(w) for w in wavs])
            padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in wavs], batch_first=True)
            pad_mask = torch.arange(padded.shape[1])[None] >= lens[:, None]
            with torch.no_grad(), autocast(device, dtype):
                if spec["layers"] == "all":
                    x, _ = model.extract_features(padded.to(device), padding_mask=pad_mask.to(device), mask=False)
                    hidden = {**captured, len(model.encoder.layers): x}
                else:
                    x, _ = model.extract_features(padded.to(device), padding_mask=pad_mask.to(device), mask=False,
                                                  output_layer=layers[0])
                    hidden = {layers[0]: x}
            frames = lens.clone()
            for _, k, s in peer.cfg.conv_layers:
                frames = (frames - k) // s + 1
            return hidden, frames.tolist()

        forward(warm, spec["layer_list"])

        def go() -> dict:
            return _peer_run(spec, forward)

    else:
        raise ValueError(f"unknown implementation {impl!r} (ours, hf, fairseq)")

    sync(device)
    t0 = time.perf_counter()
    extra = go()
    sync(device)
    wall = time.perf_counter() - t0
    out = {"wall": wall, **extra}
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
    p.add_argument("--seconds", type=float, default=150.0, help="audio in the corpus (default 150)")
    p.add_argument("--max-duration", type=float, default=None,
                   help="padded seconds per batch for all three (default: ours' default for the device)")
    p.add_argument("--impls", default="ours,hf,fairseq")
    p.add_argument("--layers", default="6,all", help="6 and/or all")
    p.add_argument("--dtypes", default=None, help="fp32,bf16 (default: bf16 only with AMX or CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch.get_num_threads())")
    p.add_argument("--chunk", type=float, default=None, help="also check chunked inference on a recording this long")
    p.add_argument("--chunk-ckpt", default=None, help="a trained checkpoint for the chunk check too")
    p.add_argument("--chunk-data", default=None, help="data dir whose utterances make the chunk-check recording")
    p.add_argument("--repeat", type=int, default=1, help="run every case this many times round-robin; best wall")
    p.add_argument("--keep", default=None, help="work dir to keep (default: a temp dir, removed)")
    p.add_argument("--case-timeout", type=float, default=900.0)
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._case is not None:
        _case_main(args._case)
        return

    from speechssl.upstream.extract import default_max_duration

    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    max_duration = args.max_duration or default_max_duration(device)
    dtypes = (args.dtypes.split(",") if args.dtypes
              else ["fp32", "bf16"] if (device.type == "cuda" or has_amx()) else ["fp32"])
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data, lengths = make_corpus(work, args.seconds)
        ckpt, hf = make_models(work)
        audio = sum(lengths)
        print(f"corpus: {len(lengths)} utterances, {audio:.1f} s (2-20 s, mean {audio / len(lengths):.1f} s); "
              f"Base HuBERT, random weights; device {device}, {threads} threads, AMX {has_amx()}, "
              f"batches <= {max_duration:g} padded s; setup {time.perf_counter() - t0:.0f} s")
        sorted_batches = corpus_batches(sorted(int(x * SR) for x in lengths), int(max_duration * SR))
        sorted_padded = sum(len(b) * max(sorted(int(x * SR) for x in lengths)[i] for i in b)
                            for b in sorted_batches) / SR
        results: dict[tuple[str, str, str], dict] = {}
        for rep in range(args.repeat):  # round-robin: background load hits every case alike
            for layers in args.layers.split(","):
                layer_list = list(range(13)) if layers == "all" else [int(layers)]
                for dtype in dtypes:
                    for impl in args.impls.split(","):
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
                        print(f"{impl:<8} layers {layers:<4} {dtype}: {r['wall']:.1f} s", flush=True)
                        prev = results.get(key)
                        if prev is not None and "error" not in prev:  # best wall, worst peak, all walls
                            r["walls"] = prev["walls"] + [r["wall"]]
                            r["wall"] = min(r["wall"], prev["wall"])
                            r["peak_mib"] = max(r["peak_mib"], prev["peak_mib"])
                        else:
                            r["walls"] = [r["wall"]]
                        results[key] = r

        print(f"\nbest of {args.repeat} run(s) per case (round-robin); ours/peer = ours' speed / the peer's")
        print(f"{'impl':<9}{'layers':<8}{'dtype':<6}{'wall s':>8}{'audio s/s':>11}{'ours/peer':>11}"
              f"{'peak MiB':>10}{'batches':>9}{'padded s':>10}  walls")
        for (impl, layers, dtype), r in results.items():
            if "error" in r:
                continue
            ours = results.get(("ours", layers, dtype), {})
            ratio = r["wall"] / ours["wall"] if "wall" in ours else float("nan")  # = ours' speed / this one's
            print(f"{impl:<9}{layers:<8}{dtype:<6}{r['wall']:>8.1f}{audio / r['wall']:>11.2f}"
                  f"{ratio:>11.2f}{r['peak_mib']:>10.0f}"
                  f"{r.get('batches', ''):>9}{r.get('padded_s', float('nan')):>10.1f}  "
                  + " ".join(f"{w:.1f}" for w in r["walls"]))

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
                if impl == "hf":
                    parts.append(f"attention_mask {'given' if r['attention_mask'] else 'not given (Base)'}")
            if dtype == "bf16" and "error" not in results.get((impl, layers, "fp32"), {"error": 1}):
                ref = work / f"out_{impl}_{layers}_fp32"
                d = max_diff(ref, here, layer_list)
                parts.append(f"bf16 vs fp32 {d:.3g} ({d / max_abs(ref, layer_list):.2%} of max |h|)")
            if parts:
                print(f"  {impl:<8} layers {layers:<4} {dtype}: " + "; ".join(parts))
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
