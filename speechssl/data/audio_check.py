"""Audio checks of a data dir (`speechssl data validate --audio`): every problem, named by utterance id.

The structural checks (`speechssl.data.kaldi.validate_data_dir`) never open audio, so a data dir whose files are
missing, empty, corrupt or hold NaN passes them, and only the feature dump (or training) notices, hours later and
one utterance at a time. This module opens the audio up front and lists *every* bad utterance:

``header``
    every wav.scp entry is opened once (files: the header only, no decoding; pipes: the command is run and its
    output decoded, as `speechssl.audio.audio_info` does): a missing file, an empty file, a corrupt or
    unreadable header, a failing pipe, zero frames; with a segments file, every segment must lie within its
    recording: start before the end, end at most `speechssl.audio.MAX_OVERSHOOT` s past it (Kaldi's
    ``extract-segments --max-overshoot``; the rule `speechssl.audio.segment_frames` applies when reading).
``full``
    the header checks, then every utterance that passed them is read exactly as the feature dump reads it
    (`speechssl.data.kaldi.load_utterance`: decoded, cut to its segment, resampled to 16 kHz): samples that
    cannot be decoded (truncated or corrupt data), an empty segment, NaN or infinite samples.

Work is spread over ``nj`` threads with the same machinery as the duration reader (`durations.map_audio`).
A problem of a recording is reported once for each utterance it holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from speechssl.audio import AudioError, AudioInfo, audio_info, segment_frames
from speechssl.data.durations import map_audio
from speechssl.data.kaldi import DataDir, Utterance, load_utterance, read_data_dir
from speechssl.errors import UserError

__all__ = ["AUDIO_CHECKS", "AudioProblem", "check_audio", "summarise"]

AUDIO_CHECKS = ("header", "full")


@dataclass(frozen=True)
class AudioProblem:
    """One unusable utterance: its id, its wav.scp source (path or ``cmd |``) and what is wrong."""

    utt_id: str
    source: str
    problem: str

    def __str__(self) -> str:
        return f"utt {self.utt_id}: {self.source}: {self.problem}"


def _problem(utt: Utterance, e: AudioError) -> AudioProblem:
    return AudioProblem(utt.utt_id, utt.source, e.problem)


def check_audio(
    data: str | os.PathLike | DataDir, *, mode: str = "header", nj: int = 1, progress: bool = True
) -> list[AudioProblem]:
    """Every audio problem of a data dir (a path, read and validated first, or a `DataDir`), in utterance order.

    ``mode`` is ``"header"`` or ``"full"`` (see the module docstring); ``nj`` threads read in parallel.
    An empty list means every utterance can be read.
    """
    if mode not in AUDIO_CHECKS:
        raise UserError(f"audio check must be one of {', '.join(AUDIO_CHECKS)}, got {mode!r}")
    dd = data if isinstance(data, DataDir) else read_data_dir(data)
    recs = dd.rec_ids()

    def info(rec: str) -> AudioInfo | AudioError:
        try:
            return audio_info(dd.wav_scp[rec])
        except AudioError as e:
            return e

    infos = dict(zip(recs, map_audio(info, recs, nj=nj, desc="audio headers", progress=progress)))
    problems: dict[str, AudioProblem] = {}
    good: list[Utterance] = []
    for utt in dd.utterances():
        rec = infos[utt.rec_id]
        if isinstance(rec, AudioError):
            problems[utt.utt_id] = _problem(utt, rec)
            continue
        if dd.segments is not None:
            try:
                segment_frames(utt.start, utt.end, rec.num_frames, rec.sample_rate, source=utt.source, utt_id=utt.utt_id)
            except AudioError as e:
                problems[utt.utt_id] = _problem(utt, e)
                continue
        good.append(utt)

    if mode == "full":

        def decode(utt: Utterance) -> AudioProblem | None:
            try:
                load_utterance(utt)
            except AudioError as e:
                return _problem(utt, e)
            return None

        for utt, p in zip(good, map_audio(decode, good, nj=nj, desc="audio samples", unit="utt", progress=progress)):
            if p is not None:
                problems[utt.utt_id] = p
    return [problems[u] for u in dd.utt_ids() if u in problems]


def summarise(problems: Sequence[AudioProblem], dd: DataDir, mode: str) -> str:
    """One line: how many utterances (and recordings) have problems, and which check found them."""
    recs = {dd.utterance(p.utt_id).rec_id for p in problems}
    seg = f" ({len(recs)} of {len(dd.wav_scp)} recordings)" if dd.segments is not None else ""
    return f"{len(problems)} of {len(dd)} utterances{seg} have unusable audio ({mode} check)"
