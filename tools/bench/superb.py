#!/usr/bin/env python
"""SUPERB head training: features from the cache vs the upstream re-run every step, ours and s3prl's runner step.

All modes train a featurizer + head (task ``--task``, default SID: mean-pool + linear, so the upstream is what
differs) for the same ``--steps`` on the same duration-bucketed batches (``optim.max_duration`` seconds of audio),
from the same seed, with the same torch threads, the same frozen upstream and the same audio reading:

* ``cached``: ours, layers read from the float16 feature cache (``speechssl.superb.cache.build_cache``, built once
  before timing; its build time and size are reported as well, with the number of steps after which it has paid
  for itself);
* ``live``: ours with ``--cache none``: every step loads the batch's audio and runs the frozen upstream
  (``LiveFeatures``), as s3prl's runner does (s3prl#390);
* ``s3prl`` (SID only): s3prl's runner path on the same batches: the training step of
  ``s3prl/downstream/runner.py`` (``Runner.train``: upstream forward under ``no_grad``, ``featurizer(wavs,
  features)``, the downstream's loss, backward, ``clip_grad_norm_``, ``optimizer.step``, ``zero_grad``) around
  s3prl's own ``Featurizer`` (``s3prl.upstream.interfaces``) and its voxceleb1 downstream as its ``config.yaml``
  builds it (``projector = nn.Linear(upstream_dim, 256)`` and ``s3prl.downstream.model.UtteranceLevel`` with
  ``MeanPooling``, cross-entropy; ``DownstreamExpert.forward`` written out). ``Runner`` and the voxceleb1
  ``DownstreamExpert`` class themselves do not import here (they import torchaudio and tensorboardX), and s3prl has
  no loader for a speechssl checkpoint: its upstream slot holds ours, behind s3prl's upstream interface
  (``{"hidden_states": [...]}``, every layer), so the upstream is the same model in every mode.

``live`` and ``s3prl`` do the same work (the upstream every step): their ratio is the equal-work one (the
headline for implementation speed); ``cached`` does less work per step (no upstream), and live/cached is what the
cache buys. Each mode runs in its own subprocess (peak memory = the process' VmHWM; CUDA:
``max_memory_allocated``); 3 warm-up steps, then ``--steps`` timed steps; ``--repeat`` rounds run the modes
round-robin, medians and per-round ratios reported. If s3prl's ``Featurizer`` cannot be imported, the ``s3prl`` mode
is left out and the output says so: the run is then an ablation of our own cache, not a peer comparison. The
upstream defaults to an untrained model of the mini_synth iteration-1 config (6 x 256, fbank frontend; same cost
as the trained one), the data to the mini_synth dev split (12 minutes).

    python tools/bench/superb.py [--upstream CKPT|random:CKPT|fbank] [--data DIR] [--task sid] [--steps 20]
                                 [--max-duration 60] [--device cpu|cuda] [--threads N] [--repeat 2]
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
    # max_steps one past the last timed step: HeadTrainer validates on dev and saves at step == max_steps, which
    # is not a training step (with max_steps = 3 + steps the live mode ran the upstream over all of dev, timed)
    cfg = load_superb_config(args.task, None, [f"optim.max_duration={args.max_duration}", "optim.eval_every=1000000",
                                               "optim.save_every=1000000", f"optim.max_steps={args.steps + 4}"])
    task = make_task(cfg)
    split = task.make_split("train", Path(args.data), dd, dd.utt2dur or {})
    task.fit(split)
    tr = HeadTrainer(task, cfg, split, split, {"train": src, "dev": src}, 1e-3, Path(args.run_dir) / source_kind,
                     progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return tr


def s3prl_importable() -> str | None:
    """None if s3prl's Featurizer and voxceleb1 model import here, else the error."""
    try:
        from s3prl.downstream.model import UtteranceLevel  # noqa: F401
        from s3prl.upstream.interfaces import Featurizer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means: no peer
        return f"{type(e).__name__}: {e}"
    return None


def s3prl_runner_missing() -> str:
    """Why s3prl's own Runner cannot run here (its import error), or '' if it imports."""
    try:
        import s3prl.downstream.runner  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


class _S3prlSteps:
    """s3prl's runner training step on our batches (see the module docstring). ``run(stop_after)`` mirrors
    ``HeadTrainer.run``: the same batch sequence (``duration_batches`` of the task's train split, seed 0, epoch by
    epoch), one optimizer step per batch."""

    def __init__(self, args):
        import torch
        from s3prl.downstream.model import UtteranceLevel
        from s3prl.upstream.interfaces import Featurizer
        from torch import nn

        from speechssl.data.kaldi import read_data_dir
        from speechssl.superb.config import load_superb_config
        from speechssl.superb.tasks import make_task
        from speechssl.superb.upstreams import resolve_upstream

        self.dd = read_data_dir(args.data)
        self.device = args.device
        up = resolve_upstream(args.upstream, "all", device=args.device)
        layers = list(up.layers)

        class Upstream(nn.Module):
            """s3prl's upstream interface over ours: a list of waveforms -> ``{"hidden_states": [B, T, D] each}``,
            every layer (what s3prl's hub experts return; ``LiveFeatures`` runs the same ``num_layers``)."""

            def __init__(self, module):
                super().__init__()
                self.module = module

            def get_downsample_rates(self, key: str) -> int:
                return round(16000 / float(self.module.frame_rate))

            def forward(self, wavs):
                hidden, _ = self.module(wavs, num_layers=max(layers) if max(layers) > 0 else None)
                return {"hidden_states": [hidden[i] for i in layers]}

        self.cfg = load_superb_config(args.task, None, [f"optim.max_duration={args.max_duration}"])
        task = make_task(self.cfg)
        if task.name != "sid":
            raise SystemExit(f"the s3prl mode is SID only (s3prl's voxceleb1 downstream), not {task.name}")
        self.split = task.make_split("train", Path(args.data), self.dd, self.dd.utt2dur or {})
        task.fit(self.split)
        self.index = {c: i for i, c in enumerate(task.classes[0])}
        torch.manual_seed(0)
        self.upstream = Upstream(up.module).eval()
        # runner.py: Featurizer(upstream, args.upstream_feature_selection, ...,
        #                       normalize=args.upstream_feature_normalize)
        self.featurizer = Featurizer(self.upstream, "hidden_states", upstream_device=args.device,
                                     normalize=self.cfg.featurizer.layer_norm).to(args.device)
        # voxceleb1/expert.py: projector + model_cls(input_dim=projector_dim, output_dim=speaker_num, **modelrc)
        proj = self.cfg.head.proj_dim
        self.projector = nn.Linear(self.featurizer.output_dim, proj).to(args.device)
        self.model = UtteranceLevel(input_dim=proj, output_dim=len(self.index), pooling="MeanPooling").to(args.device)
        self.objective = nn.CrossEntropyLoss()
        self.params = (list(self.featurizer.parameters()) + list(self.projector.parameters())
                       + list(self.model.parameters()))
        o = self.cfg.optim
        cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        self.opt = cls(self.params, lr=1e-3, weight_decay=o.weight_decay)  # lr as HeadTrainer gets it below
        self.step = self.epoch = self.pos = 0
        self.losses: list[float] = []

    def expert_forward(self, features, labels, records):
        """s3prl/downstream/voxceleb1/expert.py ``DownstreamExpert.forward`` (train), bookkeeping included."""
        import torch
        from torch.nn.utils.rnn import pad_sequence

        device = features[0].device
        features_len = torch.IntTensor([len(feat) for feat in features]).to(device=device)
        features = pad_sequence(features, batch_first=True)
        features = self.projector(features)
        predicted, _ = self.model(features, features_len)
        labels = torch.LongTensor(labels).to(features.device)
        loss = self.objective(predicted, labels)
        predicted_classid = predicted.max(dim=-1).indices
        records["acc"] += (predicted_classid == labels).view(-1).cpu().float().tolist()
        records["loss"].append(loss.item())
        return loss

    def run(self, stop_after: int) -> None:
        import math
        from collections import defaultdict

        import torch

        from speechssl.audio import SAMPLE_RATE
        from speechssl.data.batching import duration_batches
        from speechssl.data.kaldi import load_utterance

        o = self.cfg.optim
        durs = [e.duration for e in self.split.examples]
        records = defaultdict(list)
        self.featurizer.train()
        self.projector.train()
        self.model.train()
        while self.step < stop_after:
            batches = duration_batches(durs, o.max_duration, num_buckets=o.num_buckets, seed=0, epoch=self.epoch)
            while self.pos < len(batches) and self.step < stop_after:
                exs = [self.split.examples[i] for i in batches[self.pos]]
                # audio read as LiveFeatures reads it (s3prl's dataset: torchaudio.load in DataLoader workers)
                wavs = [load_utterance(self.dd.utterance(e.utt), SAMPLE_RATE) for e in exs]
                labels = [self.index[e.target[0]] for e in exs]
                # s3prl/downstream/runner.py, Runner.train, one step (fp32, gradient_accumulate_steps 1)
                wavs = [torch.FloatTensor(wav).to(self.device) for wav in wavs]
                with torch.no_grad():
                    features = self.upstream(wavs)
                features = self.featurizer(wavs, features)
                loss = self.expert_forward(features, labels, records)
                self.losses.append(float(loss.detach()))
                loss.backward()
                del loss
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip)
                if math.isnan(grad_norm):
                    print(f"[Runner] - grad norm is NaN at step {self.step + 1}")
                else:
                    self.opt.step()
                self.opt.zero_grad()
                self.pos += 1
                self.step += 1
            if self.pos >= len(batches):
                self.epoch += 1
                self.pos = 0


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    tr = _S3prlSteps(args) if args.child == "s3prl" else _trainer(args, args.child)
    tr.run(stop_after=3)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    c0, t0 = time.process_time(), time.perf_counter()
    tr.run(stop_after=3 + args.steps)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"mode": args.child, "seconds": dt, "ms_per_step": 1000 * dt / args.steps,
           "cpu_ms_per_step": 1000 * cpu / args.steps, "peak_rss_mb": _peak_rss_mb(), "losses": tr.losses}
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream",
                   help="checkpoint | random:CKPT | fbank (default: untrained mini_synth iteration-1 model)")
    p.add_argument("--data", default=str(ROOT / "egs/mini_synth/hubert/data/dev"))
    p.add_argument("--task", default="sid")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-duration", type=float, default=60.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--repeat", type=int, default=2, help="round-robin rounds of all modes (median reported)")
    p.add_argument("--modes", default="cached,live,s3prl", help="comma list of cached, live, s3prl")
    p.add_argument("--child", choices=["cached", "live", "s3prl"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    modes = args.modes.split(",")
    why_no_peer = s3prl_importable() if "s3prl" in modes else None
    if why_no_peer or ("s3prl" in modes and args.task != "sid"):
        modes.remove("s3prl")
        why_no_peer = why_no_peer or f"task {args.task}: the s3prl mode is SID only"
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_superb_") as tmp:
        tmp = Path(tmp)
        if args.upstream is None:
            args.upstream = _default_upstream(tmp)
        from speechssl.superb.cache import build_cache

        t0 = time.perf_counter()
        cache = build_cache(args.upstream, args.data, "all", tmp / "cache", device=args.device, progress=False)
        build_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in cache.cache_dir.rglob("*") if f.is_file())
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", mode, "--upstream", args.upstream, "--data", args.data,
                       "--task", args.task, "--steps", str(args.steps), "--max-duration", str(args.max_duration),
                       "--device", args.device, "--threads", str(args.threads), "--cache-dir", str(tmp / "cache"),
                       "--run-dir", str(tmp / f"runs{len(runs[mode])}")]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
                if r.returncode or line is None:
                    sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
                runs[mode].append(json.loads(line[len("RESULT "):]))
    load1 = os.getloadavg()

    def ms(mode: str, key: str = "ms_per_step") -> float:
        return statistics.median(x[key] for x in runs[mode])

    def ratio(slow: str, fast: str, key: str = "ms_per_step") -> float:
        """Median over rounds of ``slow``'s ms/step (or CPU ms/step) / ``fast``'s in the same round."""
        return statistics.median(a[key] / b[key] for a, b in zip(runs[slow], runs[fast]))

    print(f"SUPERB head training, task {args.task}, upstream {args.upstream}, data {args.data}, "
          f"{args.steps} steps of {args.max_duration:g} s, {args.device}, {args.threads} thread(s) for every mode, "
          f"median of {args.repeat} round-robin round(s); load average {load0[0]:.2f} -> {load1[0]:.2f}")
    cuda = "cuda_peak_mb" in runs[modes[0]][0]
    print("| mode | ms/step | CPU ms/step | peak RSS MB |" + (" CUDA peak MB |" if cuda else "")
          + " all rounds ms/step |")
    print("|---|---|---|---|" + ("---|" if cuda else "") + "---|")
    for m in modes:
        last = runs[m][-1]
        print(f"| {m} | {ms(m):.1f} | {ms(m, 'cpu_ms_per_step'):.1f} | {max(x['peak_rss_mb'] for x in runs[m]):.0f} |"
              + (f" {last['cuda_peak_mb']:.0f} |" if cuda else "")
              + " " + " ".join(f"{x['ms_per_step']:.1f}" for x in runs[m]) + " |")
    if "s3prl" in modes and "live" in modes:
        print(f"equal work (upstream every step), s3prl runner step / ours live: {ratio('s3prl', 'live'):.2f}x "
              f"(CPU time {ratio('s3prl', 'live', 'cpu_ms_per_step'):.2f}x; > 1: ours faster)")
    if "s3prl" in modes and "cached" in modes:
        print(f"as each is used (s3prl re-runs the upstream every step; ours reads the cache), s3prl / ours cached: "
              f"{ratio('s3prl', 'cached'):.1f}x")
    if "live" in modes and "cached" in modes:
        c, lv = runs["cached"][0], runs["live"][0]
        rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(c["losses"][:3], lv["losses"][:3]))
        print(f"cache / live speed-up (ours, less work per step): {ratio('live', 'cached'):.1f}x; cache built in "
              f"{build_s:.1f} s ({size / 1e6:.0f} MB float16), paid back after "
              f"{build_s / max(1e-9, (ms('live') - ms('cached')) / 1000):.0f} steps; first 3 losses differ by at "
              f"most {rel:.1e} (relative; float16 storage)")
    if why_no_peer:
        print(f"NO PEER: s3prl's runner step could not run ({why_no_peer}). This run is an ablation of our own cache "
              "(cache vs no cache of our pipeline), not a peer comparison.")
    else:
        missing = s3prl_runner_missing()
        if missing and "s3prl" in modes:
            print(f"s3prl: its Runner does not import here ({missing}); the s3prl row is Runner.train's step written "
                  "out around s3prl's Featurizer and voxceleb1 UtteranceLevel/MeanPooling model, with our upstream in "
                  "its upstream slot")


if __name__ == "__main__":
    main()
