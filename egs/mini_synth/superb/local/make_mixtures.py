#!/usr/bin/env python3
"""Speaker-diarization data for mini_synth (SUPERB SD): two-speaker mixtures of the corpus' read utterances with
partial overlap, Libri2Mix style, and their RTTMs.

    python egs/mini_synth/superb/local/make_mixtures.py --corpus ../hubert/data --out exp/data/sd \
        [--seed 0] [--train 200] [--dev 60] [--test 60] [--max-source 5]

Output (the whole tree appears by one rename when everything is written)::

    OUT/{train,dev,test}/   Kaldi data dirs of mixtures (wav.scp utt2spk spk2utt utt2dur; each mixture is its own
                            "speaker") and ``rttm``: the speaker turns (the format of speechssl.superb.diarization)
    OUT/wav/<split>/*.wav   16 kHz 16-bit mono
    OUT/prepare.json        options, counts, hours, overlap share

Design. Each split mixes only its own read utterances (``utt2type`` = read) of at most ``--max-source`` seconds
(short sources: more speaker changes per second of audio to extract features for). Train/dev/test share the 40
voices (Libri2Mix's splits do not, but the head must still tell the two voices of every mixture apart). The
utterances are shuffled and paired in order, skipping a partner of the same speaker; a split that needs more
mixtures than one pass gives reshuffles and pairs again (never the same pair twice). Libri2Mix sums the sources
with loudness gains, both starting at 0 (``max`` mode); here the second source starts later so the overlap is
partial: its first phone starts at a uniform 30-90 % of the first one's speech span. Gains set each source's RMS
over its speech to a uniform -33 to -25 dB (Libri2Mix draws its loudness from the same range), the sum scaled down
if it would clip. Speech turns: the non-silence phones of ``phones.ctm``, gaps shorter than 0.3 s bridged, moved by
the source's offset; the speaker is the source's ``utt2spk``. Mixture id: ``<utt1>_<utt2>`` (Libri2Mix's
``mixture_ID``). Everything is a function of --seed; ~7 s for the default 320 mixtures (0.4 h of audio).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from speechssl.audio import SAMPLE_RATE, load_audio, save_audio
from speechssl.data.kaldi import c_sorted, read_data_dir
from speechssl.superb.corpora.common import fresh_output, output_tree, run_main, write_summary
from speechssl.superb.corpora.libri2mix import Mixture, mix_sources, write_mixture_split
from speechssl.superb.der import Turn, merge_intervals
from speechssl.superb.tasks import SILENCE_PHONES
from speechssl.units.alignments import read_alignments
from speechssl.errors import UserError

log = logging.getLogger("make_mixtures")
MIN_GAP = 0.3          # seconds of silence inside one speaker's turn that do not end it
LEVEL_DB = (-33.0, -25.0)
START_AT = (0.3, 0.9)  # where the second speaker starts, as a share of the first one's speech span


def speech_intervals(ali, min_gap: float = MIN_GAP) -> np.ndarray:
    """``[K, 2]`` seconds: the non-silence phones of one alignment, gaps < ``min_gap`` bridged."""
    keep = [(s, e) for s, e, p in zip(ali.starts, ali.ends, ali.phones) if p not in SILENCE_PHONES]
    return merge_intervals(keep, min_gap)


def _pairs(utts: list[str], utt2spk: dict[str, str], n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` pairs of utterances of two speakers: the utterances shuffled and paired in order (a partner of the
    same speaker skipped); when a pass runs out, the next pass reshuffles them (no pair twice)."""
    pairs: list[tuple[str, str]] = []
    seen: set[frozenset[str]] = set()
    for _ in range(8):
        pool = [utts[i] for i in rng.permutation(len(utts))]
        while len(pool) >= 2 and len(pairs) < n:
            a = pool.pop(0)
            j = next((i for i, u in enumerate(pool)
                      if utt2spk[u] != utt2spk[a] and frozenset((a, u)) not in seen), None)
            if j is not None:
                pairs.append((a, pool.pop(j)))
                seen.add(frozenset(pairs[-1]))
        if len(pairs) >= n:
            break
    return pairs


def make_split(corpus: Path, split: str, n: int, seed: int, tmp: Path, final: Path,
               max_source: float = 0.0) -> tuple[list[Mixture], float]:
    """Mix ``n`` pairs of the split's read utterances (of at most ``max_source`` seconds; 0: any); returns the
    mixtures and the overlapped share of speech."""
    path = corpus / split
    dd = read_data_dir(path)
    types = dd.extra.get("utt2type")
    if types is None:
        raise UserError(f"{path / 'utt2type'}: no such file; mixtures are made of the read utterances")
    ali = read_alignments(path / "phones.ctm")
    reads = [u for u in c_sorted(types) if types[u].strip() == "read" and u in ali
             and (max_source <= 0 or ali[u].end <= max_source)]
    rng = np.random.default_rng([seed, ("train", "dev", "test").index(split)])
    pairs = _pairs(reads, dd.utt2spk, n, rng)
    if len(pairs) < n:
        raise UserError(f"{path}: only {len(pairs)} mixtures of two speakers from {len(reads)} read utterances; "
                        f"ask for fewer than {n}")
    (tmp / "wav" / split).mkdir(parents=True)
    mixtures, overlap, speech = [], 0.0, 0.0
    for a, b in pairs:
        wavs = [load_audio(dd.utterance(u).source, utt_id=u) for u in (a, b)]
        spans = [speech_intervals(ali[u]) for u in (a, b)]
        if not all(len(s) for s in spans):
            raise UserError(f"{path / 'phones.ctm'}: utterance {a if not len(spans[0]) else b} has no speech phones")
        a0, a1, b0 = spans[0][0, 0], spans[0][-1, 1], spans[1][0, 0]
        shift = a0 + rng.uniform(*START_AT) * (a1 - a0) - b0     # where source b starts, relative to a (s)
        offsets = [max(0, -int(round(shift * SAMPLE_RATE))), max(0, int(round(shift * SAMPLE_RATE)))]
        gains = []
        for w, sp in zip(wavs, spans):
            seg = np.concatenate([w[int(s * SAMPLE_RATE):int(e * SAMPLE_RATE)] for s, e in sp])
            rms = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))
            gains.append(10 ** (rng.uniform(*LEVEL_DB) / 20) / max(rms, 1e-6))
        mix = mix_sources(wavs, gains, offsets)
        peak = float(np.abs(mix).max())
        if peak > 0.95:
            mix *= 0.95 / peak
        mix_id = f"{a}_{b}"
        save_audio(tmp / "wav" / split / f"{mix_id}.wav", mix)
        turns = [Turn(dd.utt2spk[u], float(s) + o / SAMPLE_RATE, float(e) + o / SAMPLE_RATE)
                 for u, sp, o in zip((a, b), spans, offsets) for s, e in sp]
        mixtures.append(Mixture(mix_id, final / "wav" / split / f"{mix_id}.wav", len(mix) / SAMPLE_RATE,
                                sorted(turns, key=lambda t: (t.start, t.speaker))))
        shifted = [sp + o / SAMPLE_RATE for sp, o in zip(spans, offsets)]
        both = merge_intervals(np.concatenate(shifted))
        speech += float(np.sum(both[:, 1] - both[:, 0]))
        overlap += sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in shifted[0] for s2, e2 in shifted[1])
    return mixtures, overlap / max(speech, 1e-9)


def make_mixtures(corpus: str | Path, out: str | Path, *, counts: dict[str, int], seed: int = 0,
                  max_source: float = 0.0) -> dict:
    corpus, out = Path(corpus), fresh_output(out)
    if not (corpus / "corpus.json").is_file():
        raise UserError(f"{corpus}/corpus.json: no such file; build the mini_synth corpus first (../hubert/run.sh)")
    t0 = time.time()
    summary: dict[str, dict] = {}
    with output_tree(out) as tmp:
        for split, n in counts.items():
            mixtures, share = make_split(corpus, split, n, seed, tmp, out.resolve(), max_source)
            write_mixture_split(tmp, split, mixtures)
            summary[split] = {"mixtures": len(mixtures), "hours": round(sum(m.duration for m in mixtures) / 3600, 4),
                              "overlap_share_of_speech": round(share, 4)}
        opts = {"corpus": str(corpus), "seed": seed, "max_source": max_source, "min_gap": MIN_GAP,
                "level_db": LEVEL_DB, "start_at": START_AT,
                "seconds": round(time.time() - t0, 1)}
        return write_summary(tmp, "mini_synth_mixtures", opts, summary)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_mixtures.py", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="the mini_synth corpus (../hubert/data)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-source", type=float, default=5.0, help="longest read utterance mixed, seconds (0: any)")
    for split, n in (("train", 200), ("dev", 60), ("test", 60)):
        p.add_argument(f"--{split}", type=int, default=n, help=f"{split} mixtures (default {n})")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: make_mixtures(a.corpus, a.out, counts={"train": a.train, "dev": a.dev,
                                                                             "test": a.test}, seed=a.seed,
                                                       max_source=a.max_source), argv)


if __name__ == "__main__":
    sys.exit(main())
