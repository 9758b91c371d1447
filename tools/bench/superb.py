#!/usr/bin/env python
"""SUPERB head training: features from the cache vs the upstream re-run every step (s3prl's way).

Both modes train the same featurizer + head (task ``--task``, default SID: mean-pool + linear, so the upstream
is what differs) for the same ``--steps`` on the same duration-bucketed batches (``optim.max_duration`` seconds of
audio), from the same seed:

* ``cached``: layers read from the float16 feature cache (``speechssl.superb.cache.build_cache``, built once
  before timing; its build time and size are reported as well, with the number of steps after which it has
  paid for itself);
* ``live``: every step loads the batch's audio and runs the frozen upstream (``LiveFeatures``), as s3prl's
  runner does (s3prl#390).

Each mode runs in its own subprocess (peak memory = the process' VmHWM; CUDA: ``max_memory_allocated``); 3
warm-up steps, then ``--steps`` timed steps; one run. The upstream defaults to an untrained model of the
mini_synth iteration-1 config (6 x 256, fbank frontend; same cost as the trained one), the data to the
mini_synth dev split (12 minutes).

    python tools/bench/superb.py [--upstream CKPT|random:CKPT|fbank] [--data DIR] [--task sid] [--steps 30]
                                 [--max-duration 60] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _default_upstream(tmp: Path) -> str:
    from speechssl.config import load_config
    from speechssl.models import HubertModel, save_model
    from speechssl.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, ROOT / "egs/mini_synth/hubert/conf/pretrain_iter1.yaml").model
    save_model(HubertModel(cfg), cfg, tmp / "tiny")
    return f"random:{tmp / 'tiny'}"


def _trainer(args, source_kind: str):
    import torch

    from speechssl.data.kaldi import read_data_dir
    from speechssl.superb.cache import LiveFeatures, build_cache
    from speechssl.superb.config import load_superb_config
    from speechssl.superb.tasks import make_task
    from speechssl.superb.trainer import HeadTrainer
    from speechssl.superb.upstreams import resolve_upstream

    dd = read_data_dir(args.data)
    up = resolve_upstream(args.upstream, "all", device=args.device)
    if source_kind == "cached":
        src = build_cache(up, args.data, cache_root=args.cache_dir, dd=dd, progress=False)
    else:
        src = LiveFeatures(up.module, dd, up.layers)
    cfg = load_superb_config(args.task, None, [f"optim.max_duration={args.max_duration}", "optim.eval_every=1000000",
                                               "optim.save_every=1000000", f"optim.max_steps={args.steps + 3}"])
    task = make_task(cfg)
    split = task.make_split("train", Path(args.data), dd, dd.utt2dur or {})
    task.fit(split)
    tr = HeadTrainer(task, cfg, split, split, {"train": src, "dev": src}, 1e-3, Path(args.run_dir) / source_kind,
                     progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return tr


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    tr = _trainer(args, args.child)
    tr.run(stop_after=3)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tr.run(stop_after=3 + args.steps)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"mode": args.child, "seconds": dt, "ms_per_step": 1000 * dt / args.steps, "peak_rss_mb": _peak_rss_mb(),
           "losses": tr.losses}
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream",
                   help="checkpoint | random:CKPT | fbank (default: untrained mini_synth iteration-1 model)")
    p.add_argument("--data", default=str(ROOT / "egs/mini_synth/hubert/data/dev"))
    p.add_argument("--task", default="sid")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-duration", type=float, default=60.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--child", choices=["cached", "live"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="bench_superb_") as tmp:
        tmp = Path(tmp)
        if args.upstream is None:
            args.upstream = _default_upstream(tmp)
        from speechssl.superb.cache import build_cache

        t0 = time.perf_counter()
        cache = build_cache(args.upstream, args.data, "all", tmp / "cache", device=args.device, progress=False)
        build_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in cache.cache_dir.rglob("*") if f.is_file())
        results = {}
        for mode in ("cached", "live"):
            cmd = [sys.executable, __file__, "--child", mode, "--upstream", args.upstream, "--data", args.data,
                   "--task", args.task, "--steps", str(args.steps), "--max-duration", str(args.max_duration),
                   "--device", args.device, "--threads", str(args.threads), "--cache-dir", str(tmp / "cache"),
                   "--run-dir", str(tmp / "runs")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode or line is None:
                sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
            results[mode] = json.loads(line[len("RESULT "):])
    c, lv = results["cached"], results["live"]
    ratio = lv["ms_per_step"] / c["ms_per_step"]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(c["losses"][:3], lv["losses"][:3]))
    print(f"SUPERB head training, task {args.task}, upstream {args.upstream}, data {args.data}, "
          f"{args.steps} steps of {args.max_duration:g} s, {args.device}, {args.threads} thread(s)")
    print("| mode | ms/step | peak RSS MB |" + (" CUDA peak MB |" if "cuda_peak_mb" in c else ""))
    print("|---|---|---|" + ("---|" if "cuda_peak_mb" in c else ""))
    for m in (c, lv):
        print(f"| {m['mode']} | {m['ms_per_step']:.1f} | {m['peak_rss_mb']:.0f} |"
              + (f" {m['cuda_peak_mb']:.0f} |" if "cuda_peak_mb" in m else ""))
    print(f"cache / live speed-up: {ratio:.1f}x; cache built in {build_s:.1f} s ({size / 1e6:.0f} MB float16), "
          f"paid back after {build_s / max(1e-9, (lv['ms_per_step'] - c['ms_per_step']) / 1000):.0f} steps; "
          f"first 3 losses differ by at most {rel:.1e} (relative; float16 storage)")


if __name__ == "__main__":
    main()
