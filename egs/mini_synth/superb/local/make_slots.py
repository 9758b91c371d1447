#!/usr/bin/env python3
"""Slot-filling data for mini_synth (SUPERB SF): SNIPS-style spoken commands with slot tags, rendered with the
hubert recipe's espeak renderer by the corpus' own speakers.

    python egs/mini_synth/superb/local/make_slots.py --corpus ../hubert/data --out exp/data/sf \
        [--seed 0] [--nj 2] [--train 440] [--dev 80] [--test 160] [--force]

Output (the whole tree appears by one rename when everything is written)::

    OUT/{train,dev,test}/   Kaldi data dirs: wav.scp utt2spk spk2utt text utt2dur utt2slots
    OUT/wav/<split>/*.wav   16 kHz 16-bit mono
    OUT/slots.json          summary: counts, slot types, templates, seed, seconds

``utt2slots`` holds the transcript with slot tags, ``text`` the same words without them::

    spk07-sf00012 PLAY <artist> ABBA </artist> IN THE <room> KITCHEN </room>

Five intents (play music, add to playlist, weather, alarm, lights), 12 phrasings of one or two slots over six slot
types with 4-5 values each: a closed vocabulary of short commands (about 1.6 s with 0.05-0.25 s of silence each
side), so that a CTC head trained for a few hundred steps learns it. Defaults: 440 / 80 / 160 utterances
(11.9 / 2.0 / 4.1 minutes).

Splits share the corpus' 40 training speakers (as train/dev/test of the corpus do); a template with two or more
slots takes its value combination from a pool fixed by a hash of the combination (70 % train, 10 % dev, 20 %
test), so no test utterance repeats a training utterance's combination (SNIPS' splits hold different sentences);
one-slot templates draw from every value. Audio goes through the corpus' realism transforms (noise, reverberation,
band limitation, speed, prosody; the babble noise is replaced by pink noise: no babble bank is built). Everything
is a function of --seed: every utterance is rendered from its own generator seeded by (seed, utterance index), so
--nj does not change a byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

_HUBERT_LOCAL = Path(__file__).resolve().parents[2] / "hubert" / "local"
if str(_HUBERT_LOCAL) not in sys.path:
    sys.path.insert(0, str(_HUBERT_LOCAL))

from grammar import Prompt  # noqa: E402
from make_corpus import write_wav  # noqa: E402
from render import SR, RenderOptions, Speaker, render  # noqa: E402

from speechssl.data.kaldi import DataDir, write_data_dir  # noqa: E402
from speechssl.errors import UserError  # noqa: E402
from speechssl.fileio import atomic_dir, atomic_write_text  # noqa: E402

log = logging.getLogger("make_slots")

SPLITS = ("train", "dev", "test")
VALUES: dict[str, tuple[str, ...]] = {
    "artist": ("adele", "queen", "madonna", "abba", "elvis"),
    "room": ("kitchen", "bedroom", "garage", "office", "hallway"),
    "playlist": ("workout", "party", "chill", "sleep"),
    "city": ("paris", "london", "tokyo", "berlin", "sydney"),
    "date": ("today", "tomorrow", "tonight", "monday"),
    "time": ("six am", "noon", "eight pm", "ten thirty"),
}
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("play_music", "play {artist}"),
    ("play_music", "play {artist} in the {room}"),
    ("play_music", "put on {artist} in the {room}"),
    ("add_to_playlist", "add {artist} to {playlist}"),
    ("add_to_playlist", "add {artist} to my {playlist} playlist"),
    ("get_weather", "weather in {city}"),
    ("get_weather", "weather in {city} {date}"),
    ("get_weather", "will it rain in {city} {date}"),
    ("set_alarm", "wake me at {time}"),
    ("set_alarm", "set an alarm at {time} {date}"),
    ("lights", "lights on in the {room}"),
    ("lights", "turn off the {room} lights"),
)
# shorter silences around the speech than the corpus' (0.05-0.5 s lead, 0.05-0.4 s trail): less audio to process
LEAD, TRAIL = (0.05, 0.25), (0.05, 0.25)


def slot_names(template: str) -> list[str]:
    return [w[1:-1] for w in template.split() if w.startswith("{")]


def pool(values: dict[str, str]) -> str:
    """The split a value combination belongs to (templates with >= 2 slots): a stable hash, 7:1:2."""
    key = "|".join(f"{k}={values[k]}" for k in sorted(values))
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10
    return "test" if h < 2 else "dev" if h == 2 else "train"


def fill(template: str, values: dict[str, str]) -> tuple[str, str, str]:
    """(espeak text, text, slot-tagged text) of a template filled with ``values``."""
    speak, plain, tagged = [], [], []
    for w in template.split():
        if w.startswith("{"):
            name, v = w[1:-1], values[w[1:-1]]
            speak.append(v)
            plain.append(v.upper())
            tagged += [f"<{name}>", v.upper(), f"</{name}>"]
        else:
            speak.append(w)
            plain.append(w.upper())
            tagged.append(w.upper())
    return " ".join(speak), " ".join(plain), " ".join(tagged)


def draw(rng: np.random.Generator, split: str) -> tuple[str, dict[str, str]]:
    """A template and slot values for ``split`` (rejection sampling on the combination's pool)."""
    while True:
        _, template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        values = {s: VALUES[s][int(rng.integers(len(VALUES[s])))] for s in slot_names(template)}
        if len(values) < 2 or pool(values) == split:
            return template, values


def read_speakers(corpus: Path) -> list[Speaker]:
    """The corpus' training speakers (shared by its train/dev/test) from its corpus.json."""
    info_path = corpus / "corpus.json"
    if not info_path.is_file():
        raise UserError(f"{info_path}: no such file; make the mini_synth corpus first (hubert/run.sh stage 0)")
    info = json.loads(info_path.read_text())
    try:
        return [Speaker(**info["speakers"][s]) for s in info["splits"]["train"]["speakers"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{info_path}: not a mini_synth corpus summary (speakers: {e})") from None


def plan(speakers: list[Speaker], counts: dict[str, int], seed: int) -> list[dict]:
    out, index = [], 0
    for s_i, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 11, s_i])
        cycle: list[Speaker] = []
        for _ in range(counts[split]):
            if not cycle:
                cycle = [speakers[i] for i in rng.permutation(len(speakers))]
            spk = cycle.pop()
            template, values = draw(rng, split)
            speak, plain, tagged = fill(template, values)
            out.append({"index": index, "split": split, "utt": f"{spk.spk_id}-sf{index:05d}", "speaker": spk,
                        "speak": speak, "text": plain, "slots": tagged})
            index += 1
    return out


_WORKER: dict = {}


def _init(seed: int, clean: bool, root: str) -> None:
    _WORKER.update(seed=seed, opts=RenderOptions(clean=clean, lead=LEAD, trail=TRAIL), root=Path(root))


def _render(p: dict) -> int:
    rng = np.random.default_rng([_WORKER["seed"], 12, p["index"]])
    out = render(Prompt("intent", p["speak"], p["text"]), p["speaker"], _WORKER["opts"], rng, None)
    write_wav(_WORKER["root"] / "wav" / p["split"] / f"{p['utt']}.wav", out.audio)
    return len(out.audio)


def make_slots(corpus: str | Path, out: str | Path, *, counts: dict[str, int], seed: int = 0, nj: int = 2,
               force: bool = False) -> dict:
    t0 = time.time()
    corpus, final = Path(corpus), Path(out).absolute()
    if final.exists() and not force:
        raise UserError(f"{final}: already exists; remove it or pass --force to replace it")
    if any(n < 1 for n in counts.values()) or nj < 1:
        raise UserError(f"utterance counts and --nj must be >= 1, got {counts}, nj {nj}")
    speakers = read_speakers(corpus)
    clean = bool(json.loads((corpus / "corpus.json").read_text()).get("options", {}).get("clean", False))
    plans = plan(speakers, counts, seed)
    with atomic_dir(final, replace=force) as tmp:
        for split in SPLITS:
            (tmp / "wav" / split).mkdir(parents=True)
        if nj == 1:
            _init(seed, clean, str(tmp))
            samples = [_render(p) for p in plans]
        else:
            with mp.get_context("spawn").Pool(nj, initializer=_init, initargs=(seed, clean, str(tmp))) as workers:
                samples = workers.map(_render, plans, chunksize=8)
        summary: dict = {"seed": seed, "corpus": str(corpus), "clean": clean, "splits": {},
                         "slot_types": sorted(VALUES), "templates": [list(t) for t in TEMPLATES]}
        for split in SPLITS:
            idx = [i for i, p in enumerate(plans) if p["split"] == split]
            rows = {plans[i]["utt"]: (plans[i], samples[i]) for i in idx}
            dd = DataDir(wav_scp={u: str(final / "wav" / split / f"{u}.wav") for u in rows},
                         utt2spk={u: p["speaker"].spk_id for u, (p, _) in rows.items()},
                         text={u: p["text"] for u, (p, _) in rows.items()},
                         utt2dur={u: n / SR for u, (_, n) in rows.items()},
                         extra={"utt2slots": {u: p["slots"] for u, (p, _) in rows.items()}})
            write_data_dir(dd, tmp / split)
            summary["splits"][split] = {"utterances": len(rows), "seconds": round(sum(dd.utt2dur.values()), 2),
                                        "speakers": len(set(dd.utt2spk.values()))}
        summary["generation_seconds"] = round(time.time() - t0, 1)
        atomic_write_text(tmp / "slots.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="the mini_synth corpus (hubert recipe's data/)")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nj", type=int, default=2, help="parallel synthesis processes")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    for split, n in (("train", 440), ("dev", 80), ("test", 160)):
        ap.add_argument(f"--{split}", type=int, default=n, help=f"{split} utterances (default {n})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [make_slots] %(message)s")
    try:
        s = make_slots(args.corpus, args.out, counts={k: getattr(args, k) for k in SPLITS}, seed=args.seed,
                       nj=args.nj, force=args.force)
    except UserError as e:
        print(f"make_slots.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: " + ", ".join(f"{k} {v['utterances']} utts {v['seconds'] / 60:.1f} min"
                                      for k, v in s["splits"].items()) + f"; {s['generation_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
