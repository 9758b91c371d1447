"""Utterance durations (utt2dur / reco2dur) and filtering a data dir by duration.

Durations come from audio headers (``soundfile.info``: no decoding) for files, and from decoding for pipe
commands, whose streamed headers cannot be trusted. With a segments file, an utterance lasts from its start to
its end, truncated at the end of its recording (as Kaldi's ``extract-segments`` does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from speechssl.audio import AudioError, audio_info
from speechssl.data.kaldi import DataDir, DataDirError, c_sorted, read_data_dir, write_data_dir
from speechssl.errors import UserError
from speechssl.progress import progress_bar

__all__ = ["map_audio", "recording_durations", "utterance_durations", "durations_of", "compute_durations", "filter_data_dir"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


def map_audio(
    fn: Callable[[_T], _R], items: Sequence[_T], *, nj: int = 1, desc: str = "audio", unit: str = "rec", progress: bool = True
) -> list[_R]:
    """``[fn(x) for x in items]``, ``nj`` at a time in threads (header reads, decoding and pipes are I/O or release
    the GIL), in order, with a progress bar. The first exception ``fn`` raises is raised here."""
    bar = progress_bar(total=len(items), desc=desc, unit=unit, disable=not progress)
    out: list[_R] = []
    with ThreadPoolExecutor(max_workers=max(1, nj)) as ex:
        for r in ex.map(fn, items):
            out.append(r)
            bar.update()
    bar.close()
    return out


def recording_durations(dd: DataDir, *, nj: int = 1, progress: bool = True) -> dict[str, float]:
    """Duration in seconds of every wav.scp entry, read ``nj`` at a time (threads: header reads and pipes are I/O)."""
    recs = dd.rec_ids()
    # Without segments a recording id is an utterance id: name it so errors say "utt X (path P)".
    label = (lambda r: None) if dd.segments is not None else (lambda r: r)

    def one(rec: str) -> float:
        try:
            return audio_info(dd.wav_scp[rec], utt_id=label(rec)).duration
        except AudioError as e:
            if dd.segments is not None:
                raise AudioError(f"recording {rec}: {e}") from e
            raise

    return dict(zip(recs, map_audio(one, recs, nj=nj, desc="durations", progress=progress)))


def utterance_durations(dd: DataDir, reco2dur: dict[str, float]) -> dict[str, float]:
    """utt -> seconds, from recording durations and (if present) segments, truncated at the recording end."""
    if dd.segments is None:
        return {u: reco2dur[u] for u in dd.utt_ids()}
    out = {}
    for utt in dd.utt_ids():
        rec, start, end = dd.segments[utt]
        dur = min(end, reco2dur[rec]) - start
        if dur <= 0:
            raise DataDirError(f"segments: utterance {utt!r} starts at {start} s, after the end of recording {rec!r} ({reco2dur[rec]:.3f} s)")
        out[utt] = dur
    return out


def durations_of(dd: DataDir, ids: Sequence[str] | None = None, *, nj: int = 4) -> dict[str, float]:
    """Seconds of each utterance of ``ids`` (default: all): ``utt2dur`` where it covers them, else audio headers
    and segments (:func:`utterance_durations`: truncated at the recording end). The one way a reader asks how long
    an utterance is."""
    ids = dd.utt_ids() if ids is None else list(ids)
    if dd.utt2dur is not None and all(u in dd.utt2dur for u in ids):
        return {u: float(dd.utt2dur[u]) for u in ids}
    sub = dd.subset(ids) if len(ids) != len(dd) else dd
    return utterance_durations(sub, recording_durations(sub, nj=nj, progress=False))


def compute_durations(data_dir: str | os.PathLike, *, nj: int = 1, progress: bool = True) -> DataDir:
    """Compute and write ``utt2dur`` and ``reco2dur`` for ``data_dir`` (in place, atomically per file)."""
    dd = read_data_dir(data_dir)
    reco2dur = recording_durations(dd, nj=nj, progress=progress)
    dd = replace(dd, utt2dur=utterance_durations(dd, reco2dur), reco2dur=reco2dur)
    write_data_dir(dd, data_dir)
    return dd


def filter_data_dir(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    min_duration: float | None = None,
    max_duration: float | None = None,
    nj: int = 1,
    progress: bool = True,
) -> tuple[int, int]:
    """Write to ``out`` the utterances of ``src`` with ``min_duration <= duration <= max_duration`` seconds.

    Uses ``src/utt2dur`` when present, otherwise reads durations from the audio. Returns (kept, dropped).
    """
    if min_duration is not None and max_duration is not None and min_duration > max_duration:
        raise UserError(f"min duration {min_duration} > max duration {max_duration}")
    dd = read_data_dir(src)
    if dd.utt2dur is None:
        reco2dur = recording_durations(dd, nj=nj, progress=progress)
        dd = replace(dd, utt2dur=utterance_durations(dd, reco2dur), reco2dur=reco2dur)
    lo = float("-inf") if min_duration is None else min_duration
    hi = float("inf") if max_duration is None else max_duration
    keep = [u for u in c_sorted(dd.utt2dur) if lo <= dd.utt2dur[u] <= hi]  # type: ignore[union-attr]
    if not keep:
        raise DataDirError(f"{src}: no utterance has a duration in [{lo}, {hi}] s")
    write_data_dir(dd.subset(keep), out)
    dropped = len(dd) - len(keep)
    log.info("%s -> %s: kept %d utterances, dropped %d outside [%s, %s] s", src, out, len(keep), dropped, lo, hi)
    return len(keep), dropped
