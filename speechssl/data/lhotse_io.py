"""The lhotse bridge: a Kaldi data dir <-> lhotse manifests (recordings, supervisions, cuts as ``.jsonl.gz``).

One recording per wav.scp entry (sample rate, length and channels from the audio header; pipes are decoded),
one supervision per utterance (segment times, text, speaker; every ``utt2<name>`` file as ``custom[<name>]``,
e.g. ``utt2kw`` -> ``custom["kw"]``), one cut per utterance with the cut id = utterance id.
Kaldi -> lhotse -> Kaldi reproduces the files written by `write_data_dir` byte for byte.

Why not ``lhotse.kaldi.load_kaldi_data_dir`` / ``export_to_kaldi``: the importer assumes one sampling rate for
every recording and floors durations to milliseconds before deriving ``num_samples`` (so the sample counts are
wrong for most files), keeps no utt2* extras, and the exporter rewrites every non-WAV file into an ``ffmpeg``
pipe and always writes segments. Both round trips would change the data dir; we build the same lhotse objects
directly instead and use lhotse only for the manifest classes and their serialisation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from speechssl.audio import audio_info, is_pipe
from speechssl.data.durations import utterance_durations
from speechssl.data.kaldi import DataDir, DataDirError, c_sorted, read_data_dir, write_data_dir
from speechssl.fileio import atomic_path
from speechssl.progress import progress_bar

__all__ = ["MANIFEST_NAMES", "data_dir_to_lhotse", "lhotse_to_data_dir", "data_dir_to_manifests"]

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("recordings.jsonl.gz", "supervisions.jsonl.gz", "cuts.jsonl.gz")
# utt2<name> files <-> supervision.custom[<name>]
_EXTRA_PREFIX = "utt2"


def _recording(rec_id: str, source: str, *, utt_id: str | None):
    from lhotse import AudioSource, Recording

    info = audio_info(source, utt_id=utt_id)
    if is_pipe(source):
        src = AudioSource(type="command", channels=list(range(info.channels)), source=source.rstrip()[:-1].rstrip())
    else:
        src = AudioSource(type="file", channels=list(range(info.channels)), source=source)
    return Recording(
        id=rec_id, sources=[src], sampling_rate=info.sample_rate, num_samples=info.num_frames, duration=info.duration
    )


def data_dir_to_manifests(data_dir: str | os.PathLike, *, progress: bool = True):
    """Build (RecordingSet, SupervisionSet, CutSet) for a data dir, reading audio headers for the recordings."""
    from lhotse import CutSet, MonoCut, MultiCut, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.utils import fastcopy

    dd = read_data_dir(data_dir)
    recs = {}
    for rec in progress_bar(dd.rec_ids(), desc="recordings", unit="rec", disable=not progress):
        recs[rec] = _recording(rec, dd.wav_scp[rec], utt_id=None if dd.segments is not None else rec)
    durs = utterance_durations(dd, {r: recs[r].duration for r in recs})
    sups, cuts = [], []
    for utt in dd.utterances():
        rec = recs[utt.rec_id]
        channel: int | list[int] = 0 if rec.num_channels == 1 else list(rec.channel_ids)
        custom = {name[len(_EXTRA_PREFIX):]: d[utt.utt_id] for name, d in sorted(dd.extra.items())}
        sup = SupervisionSegment(
            id=utt.utt_id,
            recording_id=utt.rec_id,
            start=utt.start,
            duration=durs[utt.utt_id],
            channel=channel,
            text=utt.text,
            speaker=utt.speaker,
            custom=custom or None,
        )
        sups.append(sup)
        local = fastcopy(sup, start=0.0)
        cut_cls = MonoCut if isinstance(channel, int) else MultiCut
        cuts.append(cut_cls(id=utt.utt_id, start=utt.start, duration=sup.duration, channel=channel, supervisions=[local], recording=rec))
    return RecordingSet.from_recordings(recs.values()), SupervisionSet.from_segments(sups), CutSet.from_cuts(cuts)


def data_dir_to_lhotse(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True):
    """Write ``recordings/supervisions/cuts.jsonl.gz`` for ``data_dir`` into ``out_dir``; returns the CutSet.

    The three files are written under temporary names and renamed only once all are complete.
    """
    recordings, supervisions, cuts = data_dir_to_manifests(data_dir, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # all three written to temps first; renamed once all are complete
        for manifest, name in zip((recordings, supervisions, cuts), MANIFEST_NAMES):
            # the temp keeps ".jsonl" among its suffixes and ends in ".gz": lhotse picks the format from them
            manifest.to_file(stack.enter_context(atomic_path(out / name)))
    log.info("%s -> %s: %d recordings, %d utterances", data_dir, out, len(recordings), len(supervisions))
    return cuts


def _load(manifest_dir_or_cuts):
    """(RecordingSet, SupervisionSet) from a manifest dir, a cuts file or a CutSet."""
    from lhotse import CutSet, RecordingSet, SupervisionSet, load_manifest

    if isinstance(manifest_dir_or_cuts, CutSet):
        return _from_cuts(manifest_dir_or_cuts, "<CutSet>")
    p = Path(manifest_dir_or_cuts)
    if p.is_dir():
        r, s = p / MANIFEST_NAMES[0], p / MANIFEST_NAMES[1]
        if r.is_file() and s.is_file():
            return load_manifest(r, RecordingSet), load_manifest(s, SupervisionSet)
        c = p / MANIFEST_NAMES[2]
        if c.is_file():
            return _from_cuts(load_manifest(c, CutSet), str(c))
        raise DataDirError(f"{p}: no {MANIFEST_NAMES[0]} + {MANIFEST_NAMES[1]} or {MANIFEST_NAMES[2]}")
    if p.is_file():
        return _from_cuts(load_manifest(p, CutSet), str(p))
    raise DataDirError(f"{p}: no such manifest file or directory")


def _from_cuts(cuts, where: str):
    """Recordings and absolute-time supervisions of a CutSet (each supervision once, even if cuts overlap)."""
    from lhotse import RecordingSet, SupervisionSet
    from lhotse.utils import fastcopy

    recs, sups = {}, {}
    for cut in cuts:
        if cut.has_recording is False or getattr(cut, "recording", None) is None:
            raise DataDirError(f"{where}: cut {cut.id!r} has no recording")
        recs[cut.recording.id] = cut.recording
        for s in cut.supervisions:
            sups.setdefault(s.id, fastcopy(s, start=s.start + cut.start))
    return RecordingSet.from_recordings(recs.values()), SupervisionSet.from_segments(sups.values())


def _wav_entry(rec) -> str:
    if rec.transforms:
        raise DataDirError(f"recording {rec.id!r}: has lhotse transforms (e.g. resampling), which wav.scp cannot express")
    if len(rec.sources) != 1:
        raise DataDirError(f"recording {rec.id!r}: {len(rec.sources)} audio sources; wav.scp needs exactly one")
    src = rec.sources[0]
    if src.type == "file":
        return str(src.source)
    if src.type == "command":
        return f"{src.source} |"
    raise DataDirError(f"recording {rec.id!r}: audio source type {src.type!r} cannot be written to wav.scp")


def lhotse_to_data_dir(manifest_dir_or_cuts, out_dir: str | os.PathLike, *, durations: bool = True) -> DataDir:
    """Write a Kaldi data dir from lhotse manifests (a dir with recordings+supervisions, a cuts file, or a CutSet).

    One utterance per supervision. A segments file is written unless every supervision covers its whole
    recording and has the recording's id. ``custom`` string fields become ``utt2<name>`` files; ``durations``
    writes utt2dur and reco2dur (as `compute_durations` does). Every supervision needs a speaker.
    """
    recordings, supervisions = _load(manifest_dir_or_cuts)
    recs = {r.id: r for r in recordings}
    sups = sorted(supervisions, key=lambda s: s.id.encode("utf-8"))
    if not sups:
        raise DataDirError(f"{manifest_dir_or_cuts}: no supervisions")
    seen: set[str] = set()
    for s in sups:
        if s.id in seen:
            raise DataDirError(f"supervision {s.id!r}: duplicate id")
        seen.add(s.id)
        if s.recording_id not in recs:
            raise DataDirError(f"supervision {s.id!r}: recording {s.recording_id!r} is not in the recordings manifest")
        if not s.speaker:
            raise DataDirError(f"supervision {s.id!r}: no speaker (Kaldi utt2spk needs one)")

    def whole(s) -> bool:
        r = recs[s.recording_id]
        return s.id == r.id and abs(s.start) < 1e-6 and abs(s.duration - r.duration) < 1e-6

    use_segments = not all(whole(s) for s in sups)
    used = {s.recording_id for s in sups}
    wav_scp = {rid: _wav_entry(recs[rid]) for rid in c_sorted(used)}
    texts = [s.text for s in sups]
    extra_names = c_sorted({k for s in sups for k in (s.custom or {})})
    extra: dict[str, dict[str, str]] = {}
    for name in extra_names:
        values = {}
        for s in sups:
            v = (s.custom or {}).get(name)
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise DataDirError(f"supervision {s.id!r}: custom[{name!r}] = {v!r} is missing or not a plain value for utt2{name}")
            values[s.id] = str(v)
        extra[_EXTRA_PREFIX + name] = values
    dd = DataDir(
        wav_scp=wav_scp,
        utt2spk={s.id: s.speaker for s in sups},
        text=None if all(t is None for t in texts) else {s.id: (s.text or "") for s in sups},
        segments={s.id: (s.recording_id, s.start, s.start + s.duration) for s in sups} if use_segments else None,
        utt2dur={s.id: s.duration for s in sups} if durations else None,
        extra=extra,
        reco2dur={rid: recs[rid].duration for rid in wav_scp} if durations else None,
    )
    write_data_dir(dd, out_dir)
    return dd
