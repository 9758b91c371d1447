#!/usr/bin/env python3
"""Emotion-recognition data for mini_synth (SUPERB ER, IEMOCAP-like): read sentences spoken by corpus voices in
four prosodic styles (ang, hap, neu, sad), rendered with the hubert recipe's espeak renderer.

    python egs/mini_synth/superb/local/make_emotions.py --hubert-data ../hubert/data --out exp/data/er \
        [--seed 0] [--nj 2] [--sentences 8] [--tiny]

Output (one Kaldi data dir, the input of ``speechssl superb --task er --data OUT``; it appears by one rename when
everything is written)::

    OUT/wav.scp utt2spk spk2utt text utt2dur   utterance ids ``<spk>-er-<index>`` (no label in them)
    OUT/utt2emo                                ang | hap | neu | sad
    OUT/utt2session                            Ses01 .. Ses05, two speakers each
    OUT/utt2aug                                what the renderer did (final espeak pitch/range/rate, speed, room,
                                               noise, peak level) and the style's strength
    OUT/er.json                                summary: seed, sessions, styles, counts, seconds of audio
    OUT/wav/<utt>.wav                          16 kHz 16-bit mono

Default: 5 sessions x 2 speakers x 8 sentences x 4 styles = 320 utterances, ~14 minutes (sad ones ~3.4 s, the
others ~2.2-2.6 s); ``--tiny`` (and the default for a ``--tiny`` corpus): 2 sessions x 2 sentences, 32 utterances.

Design. Sessions: the corpus' main speakers (corpus.json) in id order, the first five female and the first five
male paired as Ses01..Ses05 (one actress and one actor per session, as IEMOCAP). Every speaker reads ``--sentences``
statements of the corpus grammar's test text pool (never heard in pretraining), **each in all four styles**
(IEMOCAP's scripted sessions), so the text says nothing about the emotion. A style (table STYLES) is an offset from
the speaker's own espeak voice, scaled per utterance by a random strength in STRENGTH: base pitch and pitch range
(espeak units 0..100), a rate factor and extra pause between words (10 ms units); and a level: the renderer's
peak range (anger loud, sadness soft; espeak's own volume is not reachable through the renderer). sad: lower,
flat, slow, pauses, soft; hap: higher, wide range, faster; ang: higher, narrower range, fastest, loudest; neu: the
speaker's voice. The renderer adds the corpus' per-utterance prosody jitter (pitch sd 8, range sd 15, rate
x0.85..1.15, clause prosody, speed x0.9..1.1), so classes overlap, and a channel fixed per session (one room and
microphone per session, as IEMOCAP: one noise type at an SNR within +-3 dB, one reverberation, no band
limitation). Speakers' own base pitches span 20..80 espeak units, more than any style shift, so mean pitch alone
does not give the emotion of an unseen speaker. A clean corpus (``--clean``) gives clean renderings: no jitter, no
channel, no level cue; the styles alone (tests measure them there).

Everything is a function of --seed and the corpus (its speakers, options and seed): every utterance is rendered
from its own generator, so --nj does not change a byte.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

_HUBERT_LOCAL = Path(__file__).resolve().parents[2] / "hubert" / "local"
if str(_HUBERT_LOCAL) not in sys.path:
    sys.path.insert(0, str(_HUBERT_LOCAL))

from grammar import Prompt, transcript  # noqa: E402
from make_corpus import _draw_read, write_wav  # noqa: E402
from render import SR, RenderOptions, Speaker, make_babble_bank, render  # noqa: E402

from speechssl.data.kaldi import DataDir, write_data_dir  # noqa: E402
from speechssl.errors import UserError  # noqa: E402
from speechssl.fileio import atomic_dir, atomic_write_text  # noqa: E402

log = logging.getLogger("make_emotions")


@dataclass(frozen=True)
class Style:
    """An emotion as an offset from the speaker's voice (espeak units; scaled by the utterance's strength) and
    a level (the renderer's peak range: anger loud, sadness soft; the channel does not change it per session)."""

    pitch: float      # base pitch offset (0..100 scale)
    range: float      # pitch range offset (0..100 scale)
    rate: float       # speaking-rate factor (the strength scales its logarithm)
    wordgap: float    # extra pause between words, 10 ms units
    peak: tuple[float, float]   # peak level range (full scale 1)


STYLES = {
    "ang": Style(pitch=+15, range=-12, rate=1.22, wordgap=0, peak=(0.35, 0.9)),   # tense: higher, narrow, fast, loud
    "hap": Style(pitch=+16, range=+30, rate=1.12, wordgap=0, peak=(0.25, 0.75)),  # lively: higher, wide, faster
    "neu": Style(pitch=0, range=0, rate=1.0, wordgap=0, peak=(0.2, 0.65)),        # the speaker's own voice
    "sad": Style(pitch=-14, range=-30, rate=0.80, wordgap=3, peak=(0.12, 0.5)),   # low, flat, slow, pauses, soft
}
EMOTIONS = tuple(STYLES)
STRENGTH = (0.6, 1.3)            # per-utterance scale of the style offsets (uniform)
SENTENCE_CHARS = (22, 40)        # spoken characters per sentence: about 2-3 s at the speakers' rates
SESSIONS, TINY_SESSIONS = 5, 2
NOISES = ("white", "pink", "brown", "babble")


@dataclass(frozen=True)
class Plan:
    index: int
    utt: str
    session: str
    emotion: str
    strength: float
    base: Speaker       # the corpus voice
    voice: Speaker      # the styled voice given to the renderer
    opts: RenderOptions  # the session's channel, the emotion's level
    speak: str


def _sessions(info: dict, n: int) -> list[tuple[str, list[Speaker]]]:
    """``n`` sessions of two corpus main speakers: (female, male) pairs in speaker-id order where the corpus has
    ``n`` of each, else consecutive pairs; fewer sessions (at least 2) where it has fewer than ``2 n`` speakers."""
    held = set(info["splits"]["test_spk"]["speakers"])
    main = [Speaker(**info["speakers"][k]) for k in sorted(info["speakers"]) if k not in held]
    fem, mal = [s for s in main if s.gender == "f"], [s for s in main if s.gender == "m"]
    if min(len(fem), len(mal)) >= n:
        pairs = [[fem[i], mal[i]] for i in range(n)]
    else:
        pairs = [main[i:i + 2] for i in range(0, 2 * min(n, len(main) // 2), 2)]
    if len(pairs) < 2:
        raise UserError(f"corpus.json: {len(main)} main speakers; the sessions need at least 4")
    if len(pairs) < n:
        log.warning("corpus.json: %d main speakers: %d sessions instead of %d", len(main), len(pairs), n)
    return [(f"Ses{i + 1:02d}", pair) for i, pair in enumerate(pairs)]


def session_channel(opts: RenderOptions, rng: np.random.Generator) -> RenderOptions:
    """One recording setup per session (IEMOCAP: one room and microphone per session): the corpus' prosody jitter,
    but one noise type, SNR within +-3 dB and one room (rt60 +-0.05 s, DRR +-1 dB) for all of the session's
    utterances, no band limitation. A clean corpus stays clean."""
    if opts.clean:
        return opts
    snr, rt60, drr = rng.uniform(12.0, 24.0), rng.uniform(0.25, 0.6), rng.uniform(2.0, 8.0)
    noise = NOISES[int(rng.integers(len(NOISES)))]
    return replace(opts, p_noise=1.0, snr_db=(snr - 3.0, snr + 3.0), noise_types=(noise,), noise_probs=(1.0,),
                   p_reverb=1.0, rt60=(rt60 - 0.05, rt60 + 0.05), drr_db=(drr - 1.0, drr + 1.0),
                   p_telephone=0.0, p_lowpass=0.0)


def _styled(spk: Speaker, style: Style, strength: float) -> Speaker:
    return replace(spk, pitch=int(np.clip(round(spk.pitch + strength * style.pitch), 0, 100)),
                   range=int(np.clip(round(spk.range + strength * style.range), 0, 100)),
                   rate=int(np.clip(round(spk.rate * style.rate ** strength), 80, 450)),
                   wordgap=spk.wordgap + int(round(strength * style.wordgap)))


def _sentence(rng: np.random.Generator) -> str:
    """A statement of the test text pool with SENTENCE_CHARS spoken characters."""
    while True:
        p = _draw_read(rng, "test")
        if p.speak.endswith(".") and SENTENCE_CHARS[0] <= len(p.speak) <= SENTENCE_CHARS[1]:
            return p.speak


def plan(info: dict, seed: int, sessions: int, sentences: int) -> list[Plan]:
    """Every utterance: per speaker ``sentences`` sentences x 4 styles, in a random order per speaker."""
    out: list[Plan] = []
    corpus_opts = RenderOptions(clean=bool(info["options"]["clean"]))
    for s_i, (sess, speakers) in enumerate(_sessions(info, sessions)):
        channel = session_channel(corpus_opts, np.random.default_rng([info["seed"], 61, seed, s_i]))
        for p_i, spk in enumerate(speakers):
            rng = np.random.default_rng([info["seed"], 62, seed, s_i, p_i])
            texts = [_sentence(rng) for _ in range(sentences)]
            items = [(t, e) for t in texts for e in EMOTIONS]
            for j in rng.permutation(len(items)):
                text, emo = items[int(j)]
                k = float(rng.uniform(*STRENGTH))
                index = len(out)
                out.append(Plan(index, f"{spk.spk_id}-er-{index:04d}", sess, emo, round(k, 3), spk,
                                _styled(spk, STYLES[emo], k), replace(channel, peak=STYLES[emo].peak), text))
    return out


_WORKER: dict = {}


def _init_worker(info: dict, seed: int, root: str) -> None:
    """Per process: the corpus' babble bank (as make_corpus builds it; identical everywhere)."""
    bank = None
    if not info["options"]["clean"]:
        held = set(info["splits"]["test_spk"]["speakers"])
        main = [Speaker(**info["speakers"][k]) for k in sorted(info["speakers"]) if k not in held]
        rng = np.random.default_rng([info["seed"], 3])
        n_clips, talkers = (2, 4) if info["options"]["tiny"] else (8, 5)
        bank = make_babble_bank(main, [[_draw_read(rng, "train") for _ in range(talkers)] for _ in range(n_clips)],
                                info["seed"])
    _WORKER.update(bank=bank, root=Path(root), corpus_seed=int(info["seed"]), seed=seed)


def _render_one(p: Plan) -> dict:
    rng = np.random.default_rng([_WORKER["corpus_seed"], 63, _WORKER["seed"], p.index])
    out = render(Prompt("read", p.speak, transcript(p.speak)), p.voice, p.opts, rng, _WORKER["bank"])
    write_wav(_WORKER["root"] / "wav" / f"{p.utt}.wav", out.audio)
    return {"num_samples": len(out.audio), "info": out.info}


def _render_all(plans: list[Plan], info: dict, seed: int, root: Path, nj: int) -> list[dict]:
    (root / "wav").mkdir()
    if nj <= 1:
        _init_worker(info, seed, str(root))
        return [_render_one(p) for p in plans]
    with mp.get_context("spawn").Pool(nj, initializer=_init_worker, initargs=(info, seed, str(root))) as pool:
        return pool.map(_render_one, plans, chunksize=8)


def make_emotions(hubert_data: str | Path, out: str | Path, *, seed: int = 0, nj: int = 2,
                  sentences: int | None = None, tiny: bool = False) -> dict:
    """Write the ER data dir ``out`` (see the module docstring); returns the summary written to ``out/er.json``.
    ``sentences``: per speaker (default 8, tiny 2); ``tiny`` (or a tiny corpus): 2 sessions."""
    t0 = time.time()
    final = Path(out).absolute()
    if final.exists():  # (speechssl.superb.corpora.common.fresh_output, without importing torch: 4 s here)
        raise UserError(f"{final}: already exists; remove it or choose another --out")
    info_path = Path(hubert_data) / "corpus.json"
    if not info_path.is_file():
        raise UserError(f"{info_path}: no such file; build the corpus first (egs/mini_synth/hubert/run.sh)")
    info = json.loads(info_path.read_text())
    tiny = tiny or bool(info["options"]["tiny"])
    sentences = sentences if sentences is not None else (2 if tiny else 8)
    if sentences < 1 or nj < 1:
        raise UserError(f"--sentences and --nj must be >= 1, got {sentences} and {nj}")
    plans = plan(info, seed, TINY_SESSIONS if tiny else SESSIONS, sentences)
    with atomic_dir(final) as tmp:
        results = _render_all(plans, info, seed, tmp, nj)
        dd = DataDir(wav_scp={p.utt: str(final / "wav" / f"{p.utt}.wav") for p in plans},
                     utt2spk={p.utt: p.base.spk_id for p in plans},
                     text={p.utt: transcript(p.speak) for p in plans},
                     utt2dur={p.utt: r["num_samples"] / SR for p, r in zip(plans, results)},
                     extra={"utt2emo": {p.utt: p.emotion for p in plans},
                            "utt2session": {p.utt: p.session for p in plans},
                            "utt2aug": {p.utt: ",".join(f"{k}={v}" for k, v in r["info"].items()) + f",strength="
                                        f"{p.strength}" for p, r in zip(plans, results)}})
        write_data_dir(dd, tmp)
        sessions: dict[str, list[str]] = {}
        for p in plans:
            if p.base.spk_id not in sessions.setdefault(p.session, []):
                sessions[p.session].append(p.base.spk_id)
        summary = {"seed": seed, "corpus": str(hubert_data), "corpus_seed": info["seed"], "tiny": tiny,
                   "sessions": sessions, "sentences_per_speaker": sentences,
                   "styles": {e: asdict(s) for e, s in STYLES.items()}, "strength": list(STRENGTH),
                   "utterances": {e: sum(p.emotion == e for p in plans) for e in EMOTIONS},
                   "audio_seconds": round(sum(dd.utt2dur.values()), 1)}
        atomic_write_text(tmp / "er.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    log.info("wrote %s in %.1f s", final, time.time() - t0)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hubert-data", required=True, help="the mini_synth corpus (egs/mini_synth/hubert/data)")
    ap.add_argument("--out", required=True, help="output data dir (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nj", type=int, default=2, help="parallel synthesis processes (the output does not depend on it)")
    ap.add_argument("--sentences", type=int, default=None,
                    help="sentences per speaker, each spoken in the 4 styles (default 8; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="2 sessions (4 speakers), 2 sentences each: 32 utterances "
                                                        "(the default for a --tiny corpus)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [make_emotions] %(message)s")
    try:
        s = make_emotions(args.hubert_data, args.out, seed=args.seed, nj=args.nj, sentences=args.sentences,
                          tiny=args.tiny)
    except UserError as e:
        print(f"make_emotions.py: error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {v}" for k, v in s["utterances"].items())
    print(f"{args.out}: {sum(s['utterances'].values())} utterances ({counts}), {len(s['sessions'])} sessions, "
          f"{s['audio_seconds'] / 60:.1f} min of audio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
