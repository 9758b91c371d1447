"""Speaker-balanced subsets of a data dir by amount of audio: the N-minute labelled sets of low-resource fine-tuning.

`subset_minutes` takes utterances in one seeded order and keeps a prefix of it. The order (`balanced_order`)
is a round robin over speakers weighted by audio: each speaker's utterances are shuffled (seeded), and the next
utterance always comes from the speaker with the least audio taken so far (ties broken by a seeded speaker
order), so at every prefix each speaker's total is within one utterance of every other's (as long as no speaker
has run out). Because the order is drawn once per seed and does not depend on the target, the subsets of one
seed are nested: the 10-minute subset is a prefix of, hence contained in, the 1-hour subset, as Libri-light's
10 min set is part of its 1 h set.

The prefix ends at the first utterance that would overshoot the target by more than half its own duration, so
the total is within half an utterance of the target; the exact total is logged, returned, and written to
``OUT/subset.json`` with the seed and the seconds per speaker.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from speechssl.data.durations import recording_durations, utterance_durations
from speechssl.data.kaldi import DataDir, c_sorted, read_data_dir, write_data_dir
from speechssl.data.lhotse_io import MANIFEST_NAMES, data_dir_to_lhotse
from speechssl.errors import UserError
from speechssl.fileio import atomic_dir, atomic_write_text

__all__ = ["balanced_order", "take_minutes", "subset_minutes"]

log = logging.getLogger(__name__)


def balanced_order(utt2spk: Mapping[str, str], utt2dur: Mapping[str, float], seed: int = 0) -> list[str]:
    """Every utterance once, in the speaker-balanced order of ``seed`` (see the module docstring).

    Depends only on the utterance ids, speakers, durations and ``seed`` (not on the order of the mappings), so
    the same data dir and seed always give the same order.
    """
    rng = np.random.default_rng(seed)
    speakers = c_sorted(set(utt2spk.values()))
    rank = rng.permutation(len(speakers))  # tie-break between speakers with equal audio (at the start: all)
    by_spk: dict[str, list[str]] = {s: [] for s in speakers}
    for utt in c_sorted(utt2spk):
        by_spk[utt2spk[utt]].append(utt)
    queues = {s: [us[i] for i in rng.permutation(len(us))] for s, us in by_spk.items()}
    heap = [(0.0, int(rank[i]), s) for i, s in enumerate(speakers)]
    heapq.heapify(heap)
    order: list[str] = []
    nxt = {s: 0 for s in speakers}
    while heap:
        taken, r, spk = heapq.heappop(heap)
        utt = queues[spk][nxt[spk]]
        nxt[spk] += 1
        order.append(utt)
        if nxt[spk] < len(queues[spk]):
            heapq.heappush(heap, (taken + utt2dur[utt], r, spk))
    return order


def take_minutes(order: list[str], utt2dur: Mapping[str, float], minutes: float) -> list[str]:
    """The prefix of ``order`` that makes about ``minutes`` of audio: it stops at the first utterance that would
    exceed the target by more than half its duration, so the total is within half an utterance of the target."""
    target = 60.0 * minutes
    total = 0.0
    for i, utt in enumerate(order):
        d = utt2dur[utt]
        if total + d - target > d / 2:
            return order[:i]
        total += d
    return list(order)


def subset_minutes(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    minutes: float,
    seed: int = 0,
    *,
    nj: int = 1,
    progress: bool = True,
) -> dict:
    """Write to ``out_dir`` (which must not exist) a speaker-balanced subset of ``data_dir`` holding about
    ``minutes`` of audio; with the same ``seed`` a smaller subset is always contained in a larger one.

    Durations come from ``utt2dur`` or, where the dir has none, from the audio headers (`recording_durations`,
    ``nj`` readers; the source dir is not modified). The subset is written by `write_data_dir` (every Kaldi check
    runs first) with utt2dur, plus lhotse manifests when the source has them, and ``subset.json``; it appears by
    one rename. Returns that summary: ``utterances``, ``speakers``, ``seconds``, ``minutes`` (exact totals), the
    target, the seed and the seconds per speaker. Asking for more audio than the dir holds is an error.
    """
    if not minutes > 0:
        raise UserError(f"--minutes must be > 0, got {minutes}")
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another output directory")
    dd = read_data_dir(data_dir)
    if dd.utt2dur is None:
        log.info("%s: no utt2dur; reading durations from the audio headers", data_dir)
        reco2dur = recording_durations(dd, nj=nj, progress=progress)
        dd = replace(dd, utt2dur=utterance_durations(dd, reco2dur), reco2dur=reco2dur)
    utt2dur: dict[str, float] = dd.utt2dur  # type: ignore[assignment]
    available = sum(utt2dur.values())
    if available < 60.0 * minutes:
        raise UserError(f"{data_dir}: holds {available / 60:.2f} minutes of audio, fewer than the {minutes:g} asked; "
                        "ask for less or use the whole dir")
    order = balanced_order(dd.utt2spk, utt2dur, seed)
    keep = take_minutes(order, utt2dur, minutes)
    if not keep:
        raise UserError(f"{data_dir}: utterance {order[0]} ({utt2dur[order[0]]:.2f} s), the first of the seed-{seed} "
                        f"order, is more than twice the {minutes:g} minutes asked; ask for more")
    sub: DataDir = dd.subset(keep)
    per_speaker: dict[str, float] = {}
    for utt in keep:
        per_speaker[sub.utt2spk[utt]] = per_speaker.get(sub.utt2spk[utt], 0.0) + utt2dur[utt]
    seconds = sum(per_speaker.values())
    summary = {
        "source": str(data_dir),
        "seed": seed,
        "target_minutes": minutes,
        "utterances": len(keep),
        "speakers": len(per_speaker),
        "seconds": round(seconds, 3),
        "minutes": round(seconds / 60, 3),
        "seconds_per_speaker": {s: round(per_speaker[s], 3) for s in c_sorted(per_speaker)},
    }
    manifests = all((Path(data_dir) / m).is_file() for m in MANIFEST_NAMES)
    with atomic_dir(out) as tmp:
        write_data_dir(sub, tmp)
        if manifests:  # the subset is as usable as its source: the trainer reads the cuts
            data_dir_to_lhotse(tmp, tmp, progress=False)
        atomic_write_text(tmp / "subset.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("%s -> %s: %d utterances, %d speakers, %.3f minutes (target %g, seed %d)", data_dir, out, len(keep),
             len(per_speaker), seconds / 60, minutes, seed)
    return summary
