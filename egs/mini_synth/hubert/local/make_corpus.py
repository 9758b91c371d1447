#!/usr/bin/env python3
"""Generate the built-in mini_synth corpus: synthetic English speech (espeak-ng, offline) with exact phone
alignments, keyword and intent labels, in Kaldi + lhotse form.

    python egs/mini_synth/hubert/local/make_corpus.py --out DIR [--tiny] [--clean] [--seed N] [--nj N] [--hours H]

Output (see docs/CONTRACTS.md, "Built-in corpus"):

    DIR/{train,dev,test,test_spk}/   Kaldi data dir (wav.scp text utt2spk spk2utt utt2dur utt2kw utt2intent
                                     utt2type utt2gender utt2aug), lhotse manifests, phones.ctm
    DIR/wav/<split>/<utt>.wav        16 kHz 16-bit mono
    DIR/phones.txt                   the phone set ("phone index", sil = 0)
    DIR/corpus.json                  summary (hours, speakers, utterances, phone counts, options, seed); written
                                     last: a directory with corpus.json is a finished corpus.

Splits: train/dev/test share speakers, and their read sentences come from disjoint text pools; test_spk has
speakers never seen in train (speaker verification). Everything is a function of --seed: every utterance
is rendered from its own generator seeded by (seed, utterance index), so --nj does not change a byte.
The corpus is built in a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
import wave
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from speechssl.progress import progress_bar

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import grammar  # noqa: E402
from grammar import Prompt  # noqa: E402
from phoneset import PHONES, SIL  # noqa: E402
from render import SR, RenderOptions, Speaker, make_babble_bank, render  # noqa: E402

log = logging.getLogger("make_corpus")

SPLITS = ("train", "dev", "test", "test_spk")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
_FINISHED = "corpus.json"
_PARTIAL = ".mini_synth_partial"


class CorpusError(RuntimeError):
    """The corpus cannot be generated as asked (bad options, existing output, ...)."""


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate. Durations are targets in seconds of audio (the plan uses a duration estimate)."""

    seed: int = 0
    clean: bool = False
    n_speakers: int = 40  # shared by train/dev/test
    n_test_spk: int = 10  # only in test_spk
    train_seconds: float = 7200.0
    dev_seconds: float = 720.0
    test_seconds: float = 720.0
    test_spk_seconds: float = 720.0
    mix: tuple[float, float, float] = (0.7, 0.15, 0.15)  # share of audio: read, intent, kw
    tiny: bool = False

    @staticmethod
    def make(*, seed: int = 0, clean: bool = False, tiny: bool = False, hours: float | None = None) -> "CorpusConfig":
        if tiny:
            cfg = CorpusConfig(seed=seed, clean=clean, n_speakers=4, n_test_spk=2, train_seconds=60.0,
                               dev_seconds=15.0, test_seconds=15.0, test_spk_seconds=15.0, tiny=True)
        else:
            cfg = CorpusConfig(seed=seed, clean=clean)
        if hours is not None:
            if not hours > 0:
                raise CorpusError(f"--hours must be > 0, got {hours}")
            s = hours * 3600.0
            cfg = replace(cfg, train_seconds=s, dev_seconds=max(0.1 * s, 15.0), test_seconds=max(0.1 * s, 15.0),
                          test_spk_seconds=max(0.1 * s, 15.0))
        return cfg

    def seconds(self, split: str) -> float:
        return {"train": self.train_seconds, "dev": self.dev_seconds, "test": self.test_seconds,
                "test_spk": self.test_spk_seconds}[split]


@dataclass(frozen=True)
class UttPlan:
    """One utterance to render. ``index`` (unique over the corpus) seeds its generator."""

    index: int
    utt_id: str
    split: str
    speaker: Speaker
    prompt: Prompt


# --------------------------------------------------------------------------------------------- planning

def make_speakers(cfg: CorpusConfig) -> tuple[list[Speaker], list[Speaker]]:
    """Distinct (accent, variant) voices with random base pitch/range/rate/word gap: (main, test_spk)."""
    rng = np.random.default_rng([cfg.seed, 1])
    combos = [(a, v) for a in ACCENTS for v in VARIANTS]
    n = cfg.n_speakers + cfg.n_test_spk
    if n > len(combos):
        raise CorpusError(f"at most {len(combos)} distinct voices, asked for {n} speakers")
    # spread accents evenly: take combos round-robin over accents in a random order
    order = rng.permutation(len(combos))
    by_accent: dict[str, list[tuple[str, str]]] = {a: [] for a in ACCENTS}
    for i in order:
        by_accent[combos[i][0]].append(combos[i])
    accents = list(rng.permutation(ACCENTS))
    chosen: list[tuple[str, str]] = []
    while len(chosen) < n:
        for a in accents:
            if by_accent[a] and len(chosen) < n:
                chosen.append(by_accent[a].pop())
    speakers = []
    for k, (accent, variant) in enumerate(chosen, 1):
        female = variant.startswith("f")
        speakers.append(Speaker(
            spk_id=f"spk{k:02d}", voice=f"{accent}+{variant}", gender="f" if female else "m",
            pitch=int(rng.integers(40, 81) if female else rng.integers(20, 61)), range=int(rng.integers(25, 91)),
            rate=int(rng.integers(135, 211)), wordgap=int(rng.choice([0, 0, 0, 1, 2]))))
    return speakers[: cfg.n_speakers], speakers[cfg.n_speakers:]


def estimate_seconds(prompt: Prompt, speaker: Speaker, cfg: CorpusConfig) -> float:
    """Rough duration of a rendered prompt (for planning only): characters / speaking rate + silences."""
    if prompt.kind == "kw":
        return 1.0
    speech = len(prompt.speak) * 0.053 * 175.0 / speaker.rate + 0.03 * speaker.wordgap * len(prompt.speak.split())
    return speech + 0.40


def _draw_read(rng: np.random.Generator, split: str) -> Prompt:
    pool = "test" if split == "test_spk" else split
    while True:
        p = grammar.read_sentence(rng)
        if grammar.text_pool(p.words) == pool:
            return p


def plan_corpus(cfg: CorpusConfig, main: list[Speaker], held_out: list[Speaker]) -> list[UttPlan]:
    """Every utterance of every split: type mix by duration, speakers in turn (random order), prompts."""
    plans: list[UttPlan] = []
    index = 0
    for s_i, split in enumerate(SPLITS):
        rng = np.random.default_rng([cfg.seed, 2, s_i])
        speakers = held_out if split == "test_spk" else main
        target = cfg.seconds(split)
        kinds = ("read", "intent", "kw")
        budget = {k: target * share for k, share in zip(kinds, cfg.mix)}
        spent = {k: 0.0 for k in kinds}
        spk_cycle: list[Speaker] = []
        while True:
            open_kinds = [k for k in kinds if spent[k] < budget[k] or spent[k] == 0.0]
            if not open_kinds:
                break
            # the kind furthest behind its share goes next
            kind = min(open_kinds, key=lambda k: spent[k] / budget[k])
            if not spk_cycle:
                spk_cycle = [speakers[i] for i in rng.permutation(len(speakers))]
            spk = spk_cycle.pop()
            prompt = (_draw_read(rng, split) if kind == "read" else
                      grammar.intent_prompt(rng) if kind == "intent" else grammar.keyword_prompt(rng))
            spent[kind] += estimate_seconds(prompt, spk, cfg)
            plans.append(UttPlan(index, f"{spk.spk_id}-{kind}-{index:06d}", split, spk, prompt))
            index += 1
    return plans


# --------------------------------------------------------------------------------------------- rendering

def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SR) -> None:
    """16-bit mono PCM WAV (44-byte header). No per-file fsync: the whole corpus is renamed into place at the
    end, so an interrupted run never leaves a directory that looks finished."""
    if audio.dtype != np.int16 or audio.ndim != 1:
        raise ValueError(f"{path}: expected 1-d int16 audio, got {audio.dtype} {audio.shape}")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(audio.astype("<i2", copy=False).tobytes())


_WORKER: dict = {}


def _init_worker(cfg: CorpusConfig, main: list[Speaker], root: str) -> None:
    """Per process: options and the babble bank (identical in every process)."""
    _WORKER["cfg"] = cfg
    _WORKER["opts"] = RenderOptions(clean=cfg.clean)
    _WORKER["root"] = Path(root)
    if cfg.clean:
        _WORKER["bank"] = None
    else:
        rng = np.random.default_rng([cfg.seed, 3])
        n_clips, talkers = (2, 4) if cfg.tiny else (8, 5)
        prompts = [[_draw_read(rng, "train") for _ in range(talkers)] for _ in range(n_clips)]
        _WORKER["bank"] = make_babble_bank(main, prompts, cfg.seed)


def _render_one(plan: UttPlan) -> dict:
    """Render one utterance, write its WAV under the corpus root, return its metadata."""
    cfg: CorpusConfig = _WORKER["cfg"]
    rng = np.random.default_rng([cfg.seed, 4, plan.index])
    out = render(plan.prompt, plan.speaker, _WORKER["opts"], rng, _WORKER["bank"])
    path = _WORKER["root"] / "wav" / plan.split / f"{plan.utt_id}.wav"
    write_wav(path, out.audio)
    return {"utt_id": plan.utt_id, "num_samples": len(out.audio), "segments": out.segments, "info": out.info}


def render_all(plans: list[UttPlan], cfg: CorpusConfig, main: list[Speaker], root: Path, nj: int) -> list[dict]:
    """Render every plan with ``nj`` processes (results in plan order)."""
    for split in SPLITS:
        (root / "wav" / split).mkdir(parents=True, exist_ok=True)
    bar = dict(total=len(plans), desc="synthesising", unit="utt", mininterval=1.0)
    if nj <= 1:
        _init_worker(cfg, main, str(root))
        return [_render_one(p) for p in progress_bar(plans, **bar)]
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited threads or locks
    with ctx.Pool(nj, initializer=_init_worker, initargs=(cfg, main, str(root))) as pool:
        return list(progress_bar(pool.imap(_render_one, plans, chunksize=16), **bar))


# --------------------------------------------------------------------------------------------- writing

def _tenth_ms(samples: int) -> int:
    """Sample index at 16 kHz -> time in units of 0.1 ms (so CTM times are exact and contiguous in text)."""
    return int(round(samples * 10000 / SR))


def ctm_lines(utt_id: str, segments: list[tuple[int, int, str]]) -> list[str]:
    """``utt 1 start dur phone`` lines with 4-decimal times; contiguous by construction."""
    lines = []
    for s, e, p in segments:
        a, b = _tenth_ms(s), _tenth_ms(e)
        if b > a:
            lines.append(f"{utt_id} 1 {a // 10000}.{a % 10000:04d} {(b - a) // 10000}.{(b - a) % 10000:04d} {p}")
    return lines


def write_split(split: str, plans: list[UttPlan], results: list[dict], root: Path, final_root: Path) -> dict:
    """Kaldi data dir (+ extras) and phones.ctm for one split; returns its summary."""
    from speechssl.data.kaldi import DataDir, write_data_dir

    wav_scp, utt2spk, text, utt2dur = {}, {}, {}, {}
    extra: dict[str, dict[str, str]] = {n: {} for n in ("utt2kw", "utt2intent", "utt2type", "utt2gender", "utt2aug")}
    ctm: list[str] = []
    phone_counts: Counter = Counter()
    for plan, res in zip(plans, results):
        u = plan.utt_id
        wav_scp[u] = str(final_root / "wav" / split / f"{u}.wav")
        utt2spk[u] = plan.speaker.spk_id
        text[u] = plan.prompt.words
        utt2dur[u] = res["num_samples"] / SR
        extra["utt2type"][u] = plan.prompt.kind
        extra["utt2gender"][u] = plan.speaker.gender
        extra["utt2aug"][u] = ",".join(f"{k}={v}" for k, v in res["info"].items()) or "clean"
        if plan.prompt.kind == "kw":
            extra["utt2kw"][u] = plan.prompt.label
        if plan.prompt.kind == "intent":
            extra["utt2intent"][u] = plan.prompt.label
        ctm += ctm_lines(u, res["segments"])
        for s, e, p in res["segments"]:
            phone_counts[p] += 1
    # utt2kw / utt2intent must list every utterance of the dir: "-" marks "not this task"
    for u in utt2spk:
        extra["utt2kw"].setdefault(u, "-")
        extra["utt2intent"].setdefault(u, "- - -")
    write_data_dir(DataDir(wav_scp=wav_scp, utt2spk=utt2spk, text=text, utt2dur=utt2dur, extra=extra), root / split)
    ctm.sort(key=lambda line: line.split(" ", 1)[0].encode())  # utterances LC_ALL=C, times in order within
    (root / split / "phones.ctm").write_text("\n".join(ctm) + "\n")
    types = Counter(p.prompt.kind for p in plans)
    return {"utterances": len(plans), "hours": round(sum(utt2dur.values()) / 3600.0, 4),
            "speakers": sorted({p.speaker.spk_id for p in plans}), "types": dict(sorted(types.items())),
            "phone_segments": dict(sorted(phone_counts.items()))}


def _prepare_out(out: Path, force: bool) -> None:
    if out.is_symlink() or out.exists():
        if (out / _FINISHED).exists() and not force:
            raise CorpusError(f"{out} already holds a finished corpus ({_FINISHED}); use --force to replace it")
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not (out / _PARTIAL).exists() \
                and not (out / _FINISHED).exists():
            raise CorpusError(f"{out} exists, is not empty and is not a mini_synth corpus; refusing to touch it")
        if out.is_symlink() or out.is_file():
            out.unlink()
        else:
            shutil.rmtree(out)


def _remove_stale_temps(final: Path) -> None:
    """Remove ``.NAME.tmp-PID`` siblings left by interrupted runs (their process is gone)."""
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if p.is_dir() and (p / _PARTIAL).exists():
            log.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)


def make_corpus(out: str | os.PathLike, cfg: CorpusConfig, *, nj: int = 2, force: bool = False) -> dict:
    """Generate the corpus into ``out`` (see module docstring); returns the corpus.json summary."""
    from speechssl.data.lhotse_io import data_dir_to_lhotse

    t0 = time.time()
    final = Path(out).absolute()
    _prepare_out(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / _PARTIAL).write_text("mini_synth corpus under construction\n")
    try:
        main, held_out = make_speakers(cfg)
        plans = plan_corpus(cfg, main, held_out)
        log.info("planned %d utterances, %d + %d speakers", len(plans), len(main), len(held_out))
        results = render_all(plans, cfg, main, tmp, nj)
        t_synth = time.time() - t0
        summary: dict = {"splits": {}}
        for split in SPLITS:
            idx = [i for i, p in enumerate(plans) if p.split == split]
            summary["splits"][split] = write_split(split, [plans[i] for i in idx], [results[i] for i in idx],
                                                   tmp, final)
        (tmp / "phones.txt").write_text("".join(f"{p} {i}\n" for i, p in enumerate(PHONES)))
        # lhotse manifests read the audio headers at their final paths: expose the temp dir there meanwhile
        os.symlink(tmp.name, final)
        try:
            for split in SPLITS:
                data_dir_to_lhotse(final / split, final / split, progress=False)
        finally:
            final.unlink()
        summary.update(
            seed=cfg.seed, options=asdict(cfg), render_options=asdict(RenderOptions(clean=cfg.clean)),
            phones=list(PHONES), speakers={s.spk_id: asdict(s) for s in main + held_out},
            hours={s: summary["splits"][s]["hours"] for s in SPLITS},
            total_hours=round(sum(summary["splits"][s]["hours"] for s in SPLITS), 4),
            generation_seconds={"synthesis": round(t_synth, 1), "total": round(time.time() - t0, 1), "nj": nj})
        (tmp / _PARTIAL).unlink()
        (tmp / _FINISHED).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (e.g. data)")
    ap.add_argument("--tiny", action="store_true", help="a few speakers, ~1.5 minutes of audio (for tests)")
    ap.add_argument("--clean", action="store_true", help="no prosody jitter, speed perturbation, noise, reverb, "
                                                         "band limitation or gain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nj", type=int, default=2, help="parallel synthesis processes")
    ap.add_argument("--hours", type=float, default=None, help="hours of train audio (default 2; dev/test/test_spk "
                                                              "get 10%% each)")
    ap.add_argument("--force", action="store_true", help="replace a finished corpus in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [make_corpus] %(message)s")
    try:
        cfg = CorpusConfig.make(seed=args.seed, clean=args.clean, tiny=args.tiny, hours=args.hours)
        if args.nj < 1:
            raise CorpusError(f"--nj must be >= 1, got {args.nj}")
        s = make_corpus(args.out, cfg, nj=args.nj, force=args.force)
    except CorpusError as e:
        print(f"make_corpus.py: error: {e}", file=sys.stderr)
        return 2
    h = s["hours"]
    print(f"{args.out}: " + ", ".join(f"{k} {h[k]:.3f} h" for k in SPLITS) +
          f"; {len(s['speakers'])} speakers; {s['generation_seconds']['total']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
