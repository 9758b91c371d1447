#!/usr/bin/env python
"""Time, peak memory and disk of every stage of a HuBERT recipe, per hour of audio (docs/SCALE.md).

Runs a recipe stage by stage (``run.sh --stage N --stop-stage N``) in a scratch copy (``recipes/``, ``tools/`` and
the egs job dir copied into a temporary directory, without its data/dump/exp dirs, as
``tests/test_librispeech_recipe.py`` does), each stage under ``/usr/bin/time -f '%e %M'`` (wall seconds, and the
maximum RSS of the largest single process of the stage: GNU time reports the children's ``ru_maxrss``). Disk is
``du -sb`` of the job's ``data*/dump*/exp*`` before and after each stage, also per output directory. On a shared
machine other load inflates walls: ``--repeat N`` runs each per-hour stage N times from scratch and keeps the
fastest (all walls are in the JSON and the table). Audio hours
come from ``utt2dur``: train + dev (what stages 1.. read); stage 0 is divided by the hours of every data dir it
wrote (mini_synth also writes test and test_spk). Pretraining is a fixed number of updates, not a per-hour cost:
its rows give seconds per update and audio seconds per second (median of the trainer's logged
``audio_sec_per_sec``, the first logged update left out), the effective batch and the checkpoint sizes.

Recipes:

* ``librispeech``: ``egs/librispeech/hubert/run.sh --corpus TREE`` on a fake LibriSpeech tree built here
  (``tests/fake_librispeech.py``) of ``--minutes`` of train audio in utterances of 8-16 s (LibriSpeech's mean is
  12.3 s) over the three train parts, plus dev-clean/dev-other; ``--tiny true`` by default (the only models a CPU
  trains; stages 1-4 differ from the paper's settings only in k and the sample fraction: ``--paper-k``).
* ``mini_synth``: ``egs/mini_synth/hubert/run.sh`` (stage 0 synthesises the corpus with espeak-ng; ``--tiny``
  for its small version).

    python tools/bench/scale.py --recipe librispeech --minutes 20 --stages 0-10 --json /tmp/ls.json
    python tools/bench/scale.py --recipe mini_synth --stages 0-8 --opts "--iter1-opts optim.max_steps=60" \
        --json /tmp/ms.json
    python tools/bench/scale.py --recipe librispeech --nproc 2 ...      # parallel stages through torchrun
    python tools/bench/scale.py --table /tmp/ls.json /tmp/ms.json      # the markdown tables again
    python tools/bench/scale.py --project /tmp/ls15.json /tmp/ls.json --nproc 8   # per-hour stages at 960 h, 60 kh
    python tools/bench/scale.py --flops                                # training GFLOP per audio second, Base/Large

Which stages run on one process and which on every process (``--nproc``, the recipe's ``--ngpu``) is in the
``mode`` column. A stage that fails is retried ``--retries`` times after ``--retry-wait`` seconds (the outputs it
created are removed first, so the retry's figures are whole); the log tail is printed and kept under the workdir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# stage -> (what, mode); mode: "head" = one process on the head node, "parallel" = every process (--nproc)
STAGES = {
    0: ("data preparation (librispeech: lhotse prepare; mini_synth: espeak-ng synthesis)", "head (--nj procs)"),
    1: ("validate data dirs + read every audio header", "head (--nj procs)"),
    2: ("iteration-1 target features (MFCC / fbank store)", "parallel"),
    3: ("k-means fit on a frame sample (iteration 1)", "head"),
    4: ("iteration-1 unit labels (train + dev)", "parallel"),
    5: ("label quality vs alignments", "head"),
    6: ("pretraining, iteration 1", "parallel (DDP)"),
    7: ("per-layer PNMI report, iteration 1", "head"),
    8: ("iteration-2 units: hidden-layer sample, k-means, streamed labels", "parallel + head (k-means)"),
    9: ("pretraining, iteration 2", "parallel (DDP)"),
    10: ("per-layer report, iteration 2 + exp/report.md", "head"),
}
PRETRAIN_STAGES = {6: 1, 9: 2, 12: 3, 15: 4}
PER_HOUR = {0, 1, 2, 3, 4, 8}  # stages whose work grows with the corpus (3: the sampling read; 8: the labels pass)
SUBSTEP = re.compile(r"\[(?:hubert|run)\.sh\] (stage \d+: .*|report: .*)$")


# ------------------------------------------------------------------------------------------------ helpers
def parse_stages(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def du_bytes(paths: list[Path]) -> dict[str, int]:
    """``du -sb`` of each path (apparent bytes; a hard link is counted once, at its first path)."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return {}
    out = subprocess.run(["du", "-sb", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        n, p = line.split("\t", 1)
        res[p] = int(n)
    return res


def job_roots(job: Path) -> list[Path]:
    return sorted(p for p in job.iterdir() if p.is_dir() and re.match(r"(data|dump|exp)", p.name))


def output_dirs(job: Path) -> list[Path]:
    """Directories at depth 1-3 under data*/dump*/exp*: stage outputs (dump/mfcc/train, exp/hubert_iter1, ...)."""
    res = []
    for root in job_roots(job):
        res.append(root)
        for a in sorted(root.iterdir()):
            if a.is_dir():
                res.append(a)
                for b in sorted(a.iterdir()):
                    if b.is_dir() and root.name.startswith(("dump", "data")):
                        res.append(b)
    return res


def snapshot(job: Path) -> dict:
    roots = job_roots(job)
    total = sum(du_bytes(roots).values())
    per = {}
    for p in output_dirs(job):  # one du per dir: nested dirs must not share the hard-link accounting
        per[str(p.relative_to(job))] = du_bytes([p]).get(str(p), 0)
    return {"total": total, "dirs": per}


def hours_of(data_dirs: list[Path]) -> float:
    s = 0.0
    for d in data_dirs:
        f = d / "utt2dur"
        if f.is_file():
            s += sum(float(line.split()[1]) for line in f.read_text().splitlines() if line.strip())
    return s / 3600.0


def machine() -> dict:
    info = {"host_cpus": os.cpu_count(), "python": platform.python_version(),
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s+(.*)$", lscpu, re.M)
            if m:
                info[key] = m.group(1).strip()
        flags = re.search(r"^Flags:\s+(.*)$", lscpu, re.M)
        info["amx"] = sorted(f for f in (flags.group(1).split() if flags else []) if f.startswith("amx"))
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational only
        pass
    mem = Path("/proc/meminfo")
    if mem.is_file():
        m = re.search(r"MemTotal:\s+(\d+) kB", mem.read_text())
        if m:
            info["mem_gib"] = round(int(m.group(1)) / 2**20, 1)
    return info


# ------------------------------------------------------------------------------------------------ corpora
def fake_layout(minutes: float, mean_s: float = 12.0, utts_per_chapter: int = 10) -> dict:
    """Train parts in LibriSpeech's proportions (100 : 360 : 500 h), dev-clean/dev-other ~8% of train (>= 4 utts)."""
    n_train = max(6, round(minutes * 60 / mean_s))
    shares = {"train-clean-100": 100 / 960, "train-clean-360": 360 / 960}
    counts = {p: max(2, round(n_train * f)) for p, f in shares.items()}
    counts["train-other-500"] = max(2, n_train - sum(counts.values()))
    n_dev = max(4, round(0.08 * n_train))
    counts["dev-clean"] = (n_dev + 1) // 2
    counts["dev-other"] = n_dev // 2
    layout = {}
    for part, n in counts.items():
        spk = max(1, -(-n // utts_per_chapter))
        per = -(-n // spk)
        layout[part] = (spk, 1, per)
    return layout


def make_job(args, top: Path) -> tuple[Path, list[str], str]:
    """Copies the recipe into ``top``; returns (job dir, run.sh arguments, data dir name)."""
    shutil.copytree(ROOT / "recipes", top / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tools", top / "tools", ignore=shutil.ignore_patterns("bench", "__pycache__"))
    job = top / "egs" / args.recipe / "hubert"
    shutil.copytree(ROOT / "egs" / args.recipe / "hubert", job,
                    ignore=shutil.ignore_patterns("data*", "dump*", "exp*", "__pycache__"))
    run_args: list[str] = []
    if args.recipe == "librispeech":
        corpus = top / "corpus" / "LibriSpeech"
        if not corpus.exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from fake_librispeech import make_fake_librispeech

            layout = fake_layout(args.minutes)
            t0 = time.time()
            make_fake_librispeech(corpus, layout, seed=args.seed, min_seconds=8.0, max_seconds=16.0)
            print(f"[scale] fake LibriSpeech tree {layout} -> {corpus} ({time.time() - t0:.0f} s)", flush=True)
        run_args += ["--corpus", str(corpus), "--tiny", "true" if args.tiny else "false"]
        if args.nproc > 1:
            run_args += ["--ngpu", str(args.nproc), "--master-port", str(free_port())]
        data = "data_tiny" if args.tiny else "data"
    else:
        if args.nproc > 1:
            raise SystemExit("--nproc > 1: egs/mini_synth/hubert/run.sh has no --ngpu option "
                             "(use --recipe librispeech)")
        if args.tiny:
            run_args += ["--tiny", "true"]
        data = "data_tiny" if args.tiny else "data"
    if args.paper_k:
        if args.recipe != "librispeech":
            raise SystemExit("--paper-k is for --recipe librispeech")
        # not a run.sh option: the k and sample fraction go to recipes/hubert.sh through a patched copy of run.sh
        run_sh = job / "run.sh"
        text = run_sh.read_text()
        text = text.replace("ks=(20 20 20)", "ks=(100 500 500)").replace("sample_frac=0.5", "sample_frac=0.1")
        run_sh.write_text(text)
    run_args += shlex.split(args.opts)
    return job, run_args, data


# ------------------------------------------------------------------------------------------------ pretraining
def pretrain_figures(log: Path) -> dict:
    if not log.is_file():
        return {}
    text = log.read_text()
    res: dict = {}
    m = re.search(r"effective batch: .*= ([\d.]+) s of audio per update", text)
    if m:
        res["batch_seconds"] = float(m.group(1))
    m = re.search(r"; ([\d.]+)M parameters", text)
    if m:
        res["params_m"] = float(m.group(1))
    m = re.search(r"bf16 (True|False)", text)
    if m:
        res["bf16"] = m.group(1) == "True"
    rates = [float(x) for x in re.findall(r"audio_sec_per_sec=([\d.]+)", text)]
    m = re.findall(r"stopped at update (\d+) \((\w+)\) after ([\d.]+) min", text)
    if m:
        res["updates"], res["stop_reason"], res["train_min"] = int(m[-1][0]), m[-1][1], float(m[-1][2])
    if rates:
        steady = rates[1:] or rates
        res["audio_s_per_s"] = statistics.median(steady)
        res["rate_samples"] = len(steady)
        if "batch_seconds" in res:
            res["s_per_update"] = res["batch_seconds"] / res["audio_s_per_s"]
    return res


# ------------------------------------------------------------------------------------------------ running
def run_stage(job: Path, run_args: list[str], stage: int, logdir: Path, env: dict) -> dict:
    log_path = logdir / f"stage_{stage:02d}.log"
    time_path = logdir / f"stage_{stage:02d}.time"
    cmd = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(time_path), "bash", "run.sh",
           "--stage", str(stage), "--stop-stage", str(stage), *run_args]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    marks: list[tuple[float, str]] = []
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=job, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = SUBSTEP.search(line.rstrip())
            if m:
                marks.append((time.monotonic() - t0, m.group(1)))
        rc = proc.wait()
    wall = time.monotonic() - t0
    res = {"stage": stage, "rc": rc, "wall_s": wall, "load_before": load0, "load_after": os.getloadavg()[0],
           "log": str(log_path)}
    try:
        e, m, u, s = time_path.read_text().split()[-4:]
        res["wall_s"], res["peak_rss_mb"], res["cpu_s"] = float(e), int(m) / 1024, float(u) + float(s)
    except (OSError, ValueError):
        pass
    subs = []
    for i, (t, what) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else wall
        subs.append({"what": what, "wall_s": round(end - t, 2)})
    res["substeps"] = subs
    res["skipped"] = bool(subs) and all(re.search(r"no alignments|no quality|no per-layer", s["what"]) for s in subs)
    return res


def remove_new(job: Path, before: dict) -> None:
    for rel in sorted(set(snapshot(job)["dirs"]) - set(before["dirs"]), key=len):
        p = job / rel
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def bench(args) -> dict:
    top = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"speechssl_scale_{args.recipe}_"))
    top.mkdir(parents=True, exist_ok=True)
    if (top / "egs").exists():  # re-use: a later --stages run in the same workdir continues the chain
        job = top / "egs" / args.recipe / "hubert"
        saved = json.loads((top / "scale_job.json").read_text())
        run_args, data = saved["run_args"], saved["data"]
    else:
        job, run_args, data = make_job(args, top)
        (top / "scale_job.json").write_text(json.dumps({"run_args": run_args, "data": data}))
    logdir = top / "logs"
    logdir.mkdir(exist_ok=True)
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", SPEECHSSL_PROGRESS="0")
    print(f"[scale] {args.recipe}: {job} run.sh {shlex.join(run_args)}", flush=True)
    rows = []
    for stage in parse_stages(args.stages):
        repeats = args.repeat if stage in PER_HOUR else 1
        walls = []
        for rep in range(repeats):
            if rep:  # the repeat redoes the stage from scratch: its outputs go first
                remove_new(job, before)
            for attempt in range(args.retries + 1):
                before = snapshot(job)
                print(f"[scale] stage {stage} (run {rep + 1}/{repeats}, attempt {attempt + 1}) ...", flush=True)
                r = run_stage(job, run_args, stage, logdir, env)
                if r["rc"] == 0:
                    break
                tail = Path(r["log"]).read_text().splitlines()[-25:]
                print(f"[scale] stage {stage} failed (rc {r['rc']}); log {r['log']}:\n" + "\n".join(tail), flush=True)
                remove_new(job, before)
                if attempt < args.retries:
                    print(f"[scale] retrying in {args.retry_wait} s", flush=True)
                    time.sleep(args.retry_wait)
            r["attempts"] = attempt + 1
            if r["rc"] != 0:
                break
            walls.append((r["wall_s"], r.get("peak_rss_mb"), r["substeps"], r["load_before"], r["load_after"],
                          r.get("cpu_s")))
        if walls:  # the fastest run (least disturbed by other load on a shared machine); all walls kept
            best = min(walls, key=lambda w: w[0])
            r["wall_s"], r["peak_rss_mb"], r["substeps"], r["load_before"], r["load_after"], r["cpu_s"] = best
            r["walls"] = [w[0] for w in walls]
            r["cpu_walls"] = [w[5] for w in walls]
            r["peak_rss_mb"] = max(w[1] or 0 for w in walls)
        after = snapshot(job)
        r["disk_mb"] = (after["total"] - before["total"]) / 1e6
        r["outputs"] = {k: round((v - before["dirs"].get(k, 0)) / 1e6, 4) for k, v in after["dirs"].items()
                        if v != before["dirs"].get(k, 0)}
        data_dir = job / data
        if stage == 0:
            r["hours"] = hours_of(sorted(p for p in data_dir.iterdir() if p.is_dir())) if data_dir.exists() else 0.0
        else:
            r["hours"] = hours_of([data_dir / "train", data_dir / "dev"])
        r["what"], r["mode"] = STAGES.get(stage, (f"stage {stage}", ""))
        exp = "exp_tiny" if data.endswith("_tiny") else "exp"
        if stage in PRETRAIN_STAGES:
            it = PRETRAIN_STAGES[stage]
            r["pretrain"] = pretrain_figures(job / exp / f"hubert_iter{it}" / "train.log")
            best = job / exp / f"hubert_iter{it}" / "best" / "model.safetensors"
            ck = sorted((job / exp / f"hubert_iter{it}" / "checkpoints").glob("step-*"))
            if best.is_file():
                r["pretrain"]["model_mb"] = best.stat().st_size / 1e6
            if ck:
                r["pretrain"]["checkpoint_mb"] = sum(f.stat().st_size for f in ck[-1].iterdir()) / 1e6
        rows.append(r)
        print(f"[scale] stage {stage}: {r['wall_s']:.1f} s, {r.get('peak_rss_mb', 0):.0f} MB RSS, "
              f"{r['disk_mb']:.2f} MB disk, {r['hours']:.3f} h, load {r['load_before']:.1f}->{r['load_after']:.1f}",
              flush=True)
        if r["rc"] != 0:
            break
    res = {"recipe": args.recipe, "tiny": args.tiny, "minutes": args.minutes if args.recipe == "librispeech" else None,
           "paper_k": args.paper_k, "nproc": args.nproc, "opts": args.opts, "workdir": str(top),
           "run_args": run_args, "machine": machine(), "rows": rows}
    if not args.keep and all(r["rc"] == 0 for r in rows) and not args.workdir:
        shutil.rmtree(top, ignore_errors=True)
        res["workdir"] = None
    return res


# ------------------------------------------------------------------------------------------------ tables
def fmt(x, nd=1):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def table(res: dict) -> str:
    m = res["machine"]
    hours = max((r["hours"] for r in res["rows"] if r["stage"] != 0), default=0.0)
    shown = res["run_args"][2:] if res["recipe"] == "librispeech" else res["run_args"]  # not the scratch corpus path
    head = (f"**{res['recipe']}**{' (tiny)' if res['tiny'] else ''}"
            f"{' paper k' if res.get('paper_k') else ''}, {hours * 60:.1f} min train+dev "
            f"({hours:.4f} h), {res['nproc']} process(es); {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, "
            f"{' '.join(m.get('amx', []))}; {m['date_utc']}; run.sh {' '.join(shown)}")
    lines = [head, "",
             "| stage | what | mode | wall s | s / audio h | CPU s / audio h | peak RSS MB | disk MB | MB / audio h "
             "| load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        h = r["hours"] or float("nan")
        load = f"{r['load_before']:.1f}→{r['load_after']:.1f}"
        what = r["what"] + (" (skipped)" if r.get("skipped") else "")
        what += "" if r["rc"] == 0 else f" FAILED rc {r['rc']}"
        if "pretrain" in r:
            p = r["pretrain"]
            rate = (f"{p.get('updates', '?')} upd × {fmt(p.get('batch_seconds'))} s: "
                    f"{fmt(p.get('s_per_update'), 2)} s/upd, {fmt(p.get('audio_s_per_s'))} audio-s/s")
            per_h = f"ckpt {fmt(p.get('checkpoint_mb'), 2)} MB ({fmt(p.get('params_m'), 2)}M params)"
            cpu = "—"
        else:
            rate = fmt(r["wall_s"] / h)
            per_h = fmt(r["disk_mb"] / h, 2)
            cpu = fmt(r["cpu_s"] / h) if r.get("cpu_s") is not None else "—"
        walls = r.get("walls", [])
        wall = fmt(r["wall_s"]) + (f" (of {', '.join(fmt(w) for w in walls)})" if len(walls) > 1 else "")
        lines.append(f"| {r['stage']} | {what} | {r['mode']} | {wall} | {rate} | {cpu} | "
                     f"{fmt(r.get('peak_rss_mb'), 0)} | {fmt(r['disk_mb'], 2)} | {per_h} | {load} |")
    subs = [(r["stage"], s) for r in res["rows"] for s in r.get("substeps", []) if len(r.get("substeps", [])) > 1]
    if subs:
        lines += ["", "Sub-steps (from the recipe's log lines): ", "", "| stage | step | wall s |", "|---|---|---|"]
        lines += [f"| {st} | {s['what']} | {fmt(s['wall_s'])} |" for st, s in subs]
    outs = [(r["stage"], k, v, r["hours"]) for r in res["rows"] for k, v in r.get("outputs", {}).items()
            if v > 0 and not any(o.startswith(k + "/") for o in r["outputs"])]  # the deepest dirs only
    if outs:
        lines += ["", "Disk by output directory:", "", "| stage | directory | MB | MB / audio h |", "|---|---|---|---|"]
        lines += [f"| {st} | `{k}` | {fmt(v, 3)} | {fmt(v / h if h else None, 2)} |" for st, k, v, h in outs]
    return "\n".join(lines)


def _fit(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed, rate) of y = fixed + rate x h by least squares; one size only: (0, mean y/h), an upper bound."""
    hs = [h for h, _ in pts]
    if len(set(round(h, 6) for h in hs)) < 2:
        return 0.0, statistics.mean(y / h for h, y in pts)
    mh, my = statistics.mean(hs), statistics.mean(y for _, y in pts)
    rate = sum((h - mh) * (y - my) for h, y in pts) / sum((h - mh) ** 2 for h in hs)
    return my - rate * mh, rate


def project(results: list[dict], targets: list[float], nproc: int) -> str:
    """Per-hour stages fitted as cost = fixed + rate x hours over runs of different sizes (least squares), for wall
    seconds and for CPU seconds (user + sys of every process: less sensitive than wall to other load on a shared
    machine); then wall rate x H / nproc and CPU core-hours rate x H for each target H."""
    by_stage: dict[int, list[dict]] = {}
    for res in results:
        for r in res["rows"]:
            if r["rc"] == 0 and r["stage"] in PER_HOUR and not r.get("skipped") and r["hours"] > 0:
                by_stage.setdefault(r["stage"], []).append(r)
    cols = " | ".join(f"{h:,.0f} h: wall h ({nproc} proc) | {h:,.0f} h: CPU core-h | {h:,.0f} h: disk GB"
                      for h in targets)
    lines = [f"| stage | what | runs | wall: fixed s + s / audio h | CPU: fixed s + s / audio h | MB / audio h "
             f"| {cols} |",
             "|---|---|---|---|---|---|" + "---|---|---|" * len(targets)]
    for stage in sorted(by_stage):
        rows = by_stage[stage]
        wf, wr = _fit([(r["hours"], r["wall_s"]) for r in rows])
        cpu_rows = [(r["hours"], r["cpu_s"]) for r in rows if r.get("cpu_s") is not None]
        cf, cr = _fit(cpu_rows) if cpu_rows else (None, None)
        disk = statistics.mean(r["disk_mb"] / r["hours"] for r in rows)  # linear, no fixed part worth fitting
        proj = " | ".join(f"{fmt(wr * h / nproc / 3600, 2)} | {fmt(cr * h / 3600 if cr is not None else None, 2)} | "
                          f"{fmt(disk * h / 1e3, 2)}" for h in targets)
        cpu = f"{fmt(cf)} + {fmt(cr)}" if cr is not None else "—"
        lines.append(f"| {stage} | {rows[0]['what']} | {len(rows)} | {fmt(wf)} + {fmt(wr)} | {cpu} | {fmt(disk, 2)} | "
                     f"{proj} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ FLOPs
def flops(args) -> dict:
    """FLOPs per audio second of the paper's Base and Large (egs/librispeech/hubert/conf), counted by
    ``FlopCounterMode`` (matmuls, convs, attention; its dense count of the grouped positional conv's weight gradient
    is corrected to 2x that conv's forward, and attention run by the CPU flash kernel, which it does not count, is
    added as 4 T^2 d per layer forward, 3x that for training): one training step (forward + masked-unit loss + backward,
    LayerDrop off) and the inference forward up to a layer (what ``extract`` / streamed labels run), on one
    utterance of each ``--flops-seconds``. Also the wall time of two more training steps on this machine (bf16
    autocast where the CPU has AMX / AVX512-BF16, else fp32): a measured CPU rate, not a GPU one."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from speechssl.config import load_config
    from speechssl.models import HubertPretrainModel
    from speechssl.train import PretrainConfig

    torch.manual_seed(0)
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    bf16 = "amx_bf16" in cpu_flags or "avx512_bf16" in cpu_flags
    out = {"bf16_timing": bf16, "threads": torch.get_num_threads()}
    confs = {"base": ("hubert_base_iter1.yaml", (6, 9, 12)), "large": ("hubert_large.yaml", (12, 24))}

    def cnn_flops(counts: dict) -> int:
        return sum(sum(v.values()) for k, v in counts.items() if k.endswith("feature_extractor"))

    def grouped_conv_excess(counts: dict) -> int:
        """FlopCounterMode counts the weight gradient of a grouped convolution as if it were dense (groups x too
        many: the positional conv, 16 groups, shows 17x its forward instead of 2x); the excess over 2x forward."""
        return sum(max(0, v.get(torch.ops.aten.convolution_backward, 0) - 2 * v.get(torch.ops.aten.convolution, 0))
                   for k, v in counts.items() if k.endswith("pos_conv_embed"))

    def attention_missing(counts: dict, T: int, d: int, n_layers: int, factor: int) -> int:
        """Attention scores and weighted values (4 T^2 d per layer forward) when FlopCounterMode saw none: the CPU
        flash kernel of scaled_dot_product_attention has no FLOP formula (the math path's bmm is counted)."""
        seen = sum(x for k, v in counts.items() if k.endswith(".attention")
                   for op, x in v.items() if str(op) not in ("aten.mm", "aten.addmm"))
        return 0 if seen else factor * 4 * T * T * d * n_layers

    for name, (yaml, layers) in confs.items():
        cfg = load_config(PretrainConfig, ROOT / "egs/librispeech/hubert/conf" / yaml).model
        cfg.layerdrop = 0.0
        model = HubertPretrainModel(cfg)
        nparams = sum(p.numel() for p in model.parameters())
        cnn = sum(p.numel() for n, p in model.named_parameters() if "feature_extractor" in n)
        res: dict = {"params_m": nparams / 1e6, "cnn_params_m": cnn / 1e6, "train": {}, "forward": {}}
        for seconds in args.flops_seconds:
            n = int(seconds * 16000)
            wav, lens = 0.1 * torch.randn(1, n), torch.tensor([n])
            T = int(model.hubert.num_frames(n))
            labels = [torch.randint(0, k, (1, T)) for k in cfg.num_classes]
            model.train()
            with FlopCounterMode(display=False) as fc:
                model(wav, lens, labels)["loss"].backward()
            model.zero_grad(set_to_none=True)
            raw = fc.get_total_flops()
            attn = attention_missing(fc.get_flop_counts(), T, cfg.hidden_size, cfg.num_hidden_layers, 3)
            tot = raw - grouped_conv_excess(fc.get_flop_counts()) + attn
            res["train"][seconds] = {"gflop_per_s": tot / seconds / 1e9, "raw_gflop_per_s": raw / seconds / 1e9,
                                     "attention_added_gflop_per_s": attn / seconds / 1e9,
                                     "cnn_gflop_per_s": cnn_flops(fc.get_flop_counts()) / seconds / 1e9}
            model.eval()
            for L in layers:
                with torch.no_grad(), FlopCounterMode(display=False) as fc:
                    model.hubert(wav, lens, num_layers=L)
                f = fc.get_total_flops() + attention_missing(fc.get_flop_counts(), T, cfg.hidden_size, L, 1)
                res["forward"].setdefault(L, {})[seconds] = f / seconds / 1e9
            print(f"[flops] {name} ({nparams / 1e6:.1f}M params, CNN {cnn / 1e6:.1f}M), {seconds} s utterance: "
                  f"training {tot / seconds / 1e9:.1f} GFLOP per audio s "
                  f"(CNN {res['train'][seconds]['cnn_gflop_per_s']:.1f}; "
                  f"{raw / seconds / 1e9:.1f} as FlopCounterMode counts the grouped pos-conv backward); "
                  + ", ".join(f"forward to layer {L} {res['forward'][L][seconds]:.1f}" for L in layers), flush=True)
        # measured CPU rate: two timed steps after one warm-up, the longest utterance, autocast as the trainer does
        seconds = max(args.flops_seconds)
        n = int(seconds * 16000)
        wav, lens = 0.1 * torch.randn(1, n), torch.tensor([n])
        labels = [torch.randint(0, k, (1, int(model.hubert.num_frames(n)))) for k in cfg.num_classes]
        model.train()
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(wav, lens, labels)["loss"]
            loss.float().backward()
            model.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        step = min(times)
        res["cpu_step_s"] = step
        res["cpu_audio_s_per_s"] = seconds / step
        res["cpu_tflops"] = res["train"][seconds]["gflop_per_s"] * seconds / step / 1e3
        print(f"[flops] {name}: one training step of {seconds} s on this CPU ({'bf16' if bf16 else 'fp32'}, "
              f"{torch.get_num_threads()} threads): {step:.2f} s = {seconds / step:.2f} audio s/s, "
              f"{res['cpu_tflops']:.2f} TFLOP/s achieved", flush=True)
        out[name] = res
        del model
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--recipe", choices=["librispeech", "mini_synth"], default="librispeech")
    ap.add_argument("--minutes", type=float, default=20.0, help="librispeech: minutes of fake train audio")
    ap.add_argument("--tiny", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                    help="--tiny true|false (default: true for librispeech, false for mini_synth)")
    ap.add_argument("--paper-k", action="store_true",
                    help="librispeech --tiny: the paper's k (100, 500) and sample fraction 0.1 (stages 3, 8)")
    ap.add_argument("--stages", default="0-10", help="e.g. 0-5,8 (default 0-10)")
    ap.add_argument("--nproc", type=int, default=1, help="processes of the parallel stages (the recipe's --ngpu)")
    ap.add_argument("--opts", default="", help="extra run.sh options, e.g. \"--iter1-opts 'optim.max_steps=60'\"")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="scratch dir (kept; re-used to run later stages of the same job)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each per-hour stage (0-4, 8) N times from scratch; the fastest wall is reported")
    ap.add_argument("--retries", type=int, default=0)
    ap.add_argument("--retry-wait", type=float, default=300.0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the tables of saved results")
    ap.add_argument("--project", nargs="+", default=None, metavar="JSON",
                    help="per-hour stages of saved runs (several sizes: fixed + rate fit) projected to --hours")
    ap.add_argument("--hours", type=float, nargs="+", default=[960.0, 60000.0], help="projection targets")
    ap.add_argument("--flops", action="store_true", help="count Base/Large training FLOPs per audio second")
    ap.add_argument("--flops-seconds", type=float, nargs="+", default=[5.0, 15.625])
    args = ap.parse_args()
    if args.table:
        for f in args.table:
            print(table(json.loads(Path(f).read_text())) + "\n")
        return
    if args.project:
        print(project([json.loads(Path(f).read_text()) for f in args.project], args.hours, args.nproc))
        return
    if args.flops:
        res = {"flops": flops(args), "machine": machine()}
    else:
        if args.tiny is None:
            args.tiny = args.recipe == "librispeech"
        res = bench(args)
        print("\n" + table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"[scale] wrote {args.json}")
    if not args.flops and any(r["rc"] != 0 for r in res["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
