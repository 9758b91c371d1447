"""Audio I/O: read a file or a Kaldi pipe command into a float32 mono 16 kHz array, and write 16-bit WAV.

Everything downstream (features, training, SUPERB) sees audio only through `load_audio`, so this is where
bad audio is caught: a missing or corrupt file, an empty or non-finite signal, a failing pipe command or a
segment that runs past the end of its recording each raise one `AudioError` naming the utterance and source.

Sources follow Kaldi's ``wav.scp`` conventions: either a path, or a shell command ending in ``|`` whose
standard output is an audio file (e.g. ``sox in.flac -t wav - |``); a WAV streamed without its lengths (sizes 0
or 0xFFFFFFFF in the header) is read to the end, as Kaldi's ``WaveData::Read`` does. Segment times (Kaldi
``segments``) are in seconds of the source recording; for files only the needed frames are read.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from speechssl.errors import UserError
from speechssl.fileio import atomic_open

__all__ = [
    "SAMPLE_RATE",
    "MAX_OVERSHOOT",
    "AudioError",
    "AudioInfo",
    "is_pipe",
    "segment_frames",
    "audio_info",
    "AudioFile",
    "open_audio",
    "load_audio",
    "save_audio",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""The sample rate every model in speechssl consumes."""

MAX_OVERSHOOT = 0.5
"""Seconds a segment end may exceed its recording and be truncated (Kaldi ``extract-segments --max-overshoot``)."""

_INTEGER_SUBTYPES = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "ULAW", "ALAW"})
"""libsndfile subtypes stored as integers (FLAC reports PCM_16/PCM_24): scaled to float, never NaN or inf."""


class AudioError(UserError):
    """Audio that cannot be used; the message names the utterance id (when known) and the source.

    ``source``, ``utt_id`` and ``problem`` (the message without the "utt X (path P): " prefix) are kept as
    attributes, so a caller collecting many problems (`speechssl data validate --audio`) can lay them out itself.
    """

    def __init__(self, message: str, *, source: str | None = None, utt_id: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.source = source
        self.utt_id = utt_id
        self.problem = message if problem is None else problem


@dataclass(frozen=True)
class AudioInfo:
    """Native properties of an audio source (before downmix/resampling)."""

    num_frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.sample_rate


def is_pipe(source: str) -> bool:
    """True for a Kaldi pipe source, ``"cmd args |"``."""
    return source.rstrip().endswith("|")


def _where(source: str, utt_id: str | None) -> str:
    kind = "command" if is_pipe(source) else "path"
    if utt_id is None:
        return f"{kind} {source}"
    return f"utt {utt_id} ({kind} {source})"


def _error(source: str, utt_id: str | None, problem: str) -> AudioError:
    return AudioError(f"{_where(source, utt_id)}: {problem}", source=source, utt_id=utt_id, problem=problem)


def _run_pipe(source: str, utt_id: str | None) -> bytes:
    """Run a pipe command through the shell and return its standard output (an audio file in memory)."""
    cmd = source.rstrip()[:-1].strip()
    if not cmd:
        raise _error(source, utt_id, "empty pipe command")
    try:
        proc = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except OSError as e:  # pragma: no cover - /bin/sh missing
        raise _error(source, utt_id, f"cannot run pipe command: {e}") from e
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = f": {err[-1]}" if err else ""
        raise _error(source, utt_id, f"pipe command failed with exit status {proc.returncode}{detail}")
    if not proc.stdout:
        raise _error(source, utt_id, "zero-length audio (pipe command wrote nothing)")
    return proc.stdout


def _streamed_wav(data: bytes) -> bytes:
    """A WAV streamed to a pipe may leave its length fields at 0 (Kaldi's "stream mode": RIFF and data sizes 0 or
    0xFFFFFFFF, read to EOF); libsndfile reads 0xFFFFFFFF to EOF but takes 0 at its word. Patch a zero data size
    that has samples after it to the true sizes, so such a pipe reads as it does in Kaldi."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"data":
            rest = len(data) - (pos + 8)
            if size != 0 or rest <= 0:
                return data
            out = bytearray(data)
            struct.pack_into("<I", out, 4, min(len(data) - 8, 0xFFFFFFFF))
            struct.pack_into("<I", out, pos + 4, min(rest, 0xFFFFFFFF))
            return bytes(out)
        pos += 8 + size + (size & 1)
    return data


def _open(source: str, utt_id: str | None) -> sf.SoundFile:
    """Open a path or the in-memory output of a pipe command with soundfile."""
    if is_pipe(source):
        data: str | io.BytesIO = io.BytesIO(_streamed_wav(_run_pipe(source, utt_id)))
    else:
        try:
            st = os.stat(source)  # one system call for the three checks (the loader opens thousands a second)
        except (OSError, ValueError):  # what os.path.exists reports as a missing file
            raise _error(source, utt_id, "no such file") from None
        if stat.S_ISDIR(st.st_mode):
            raise _error(source, utt_id, "is a directory, not an audio file")
        if st.st_size == 0:
            raise _error(source, utt_id, "zero-length audio (empty file)")
        data = source
    try:
        return sf.SoundFile(data)
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        raise _error(source, utt_id, f"unreadable or corrupt audio: {e}") from e


def audio_info(source: str | os.PathLike, *, utt_id: str | None = None) -> AudioInfo:
    """Frames, rate and channels of a source. Files: header only. Pipes: the command is run and decoded."""
    source = os.fspath(source)
    with _open(source, utt_id) as f:
        frames = f.frames
        if is_pipe(source) or frames <= 0:
            # Streamed WAV headers (e.g. `sox ... -t wav -`) may carry a bogus length: count what decodes.
            try:
                frames = sum(len(b) for b in f.blocks(blocksize=1 << 16, dtype="float32"))
            except (sf.SoundFileError, RuntimeError) as e:
                raise _error(source, utt_id, f"unreadable or corrupt audio: {e}") from e
        if frames <= 0:
            raise _error(source, utt_id, "zero-length audio")
        return AudioInfo(num_frames=int(frames), sample_rate=int(f.samplerate), channels=int(f.channels))


def segment_frames(
    start: float,
    end: float | None,
    num_frames: int,
    sample_rate: int,
    *,
    source: str = "<audio>",
    utt_id: str | None = None,
    max_overshoot: float = MAX_OVERSHOOT,
) -> tuple[int, int]:
    """Frames ``[first, last)`` of segment ``[start, end]`` s in a signal of ``num_frames`` at ``sample_rate``.

    The rules `load_audio` applies (and ``data validate --audio`` checks from headers alone): start finite and
    >= 0 and before the end of the audio, end > start, end at most ``max_overshoot`` s past the end of the audio
    (truncated there, as Kaldi's ``extract-segments``); ``end=None`` means to the end. Raises `AudioError`.
    """
    if not np.isfinite(start) or start < 0:
        raise _error(source, utt_id, f"invalid segment start {start!r} (must be a finite time >= 0 s)")
    duration = num_frames / sample_rate
    first = int(round(start * sample_rate))
    if end is None:
        last = num_frames
    else:
        if not np.isfinite(end) or end <= start:
            raise _error(source, utt_id, f"invalid segment [{start}, {end}] s (end must be > start)")
        if end > duration + max_overshoot:
            raise _error(
                source, utt_id,
                f"segment [{start:.3f}, {end:.3f}] s ends beyond the audio ({duration:.3f} s, tolerance {max_overshoot} s)",
            )
        last = min(int(round(end * sample_rate)), num_frames)
    if first >= num_frames:
        raise _error(source, utt_id, f"segment start {start:.3f} s is at or beyond the end of the audio ({duration:.3f} s)")
    if last <= first:
        raise _error(source, utt_id, f"zero-length segment [{start}, {end}] s")
    return first, last


def _check_args(sample_rate: int, out: np.ndarray | None) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if out is not None and (out.dtype not in (np.float32, np.int16) or out.ndim != 1 or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 1-D array (or int16), got {out.dtype} {out.shape}")


class AudioFile:
    """An open audio source (`open_audio`): its native ``sample_rate`` and ``channels``, whether it is a 16-bit PCM
    file (``pcm16``; pipes never are), and ``read(...)``, which is `load_audio` on it. A context manager.

    Opening first and reading after lets a caller choose where to decode by what the header says (the pretraining
    loader decodes every 16-bit mono crop at the model's rate as int16, see ``int16_at``) without opening twice.
    """

    __slots__ = ("source", "utt_id", "sample_rate", "channels", "pcm16", "_f", "_subtype")

    def __init__(self, source: str | os.PathLike, *, utt_id: str | None = None):
        self.source = os.fspath(source)
        self.utt_id = utt_id
        self._f = _open(self.source, utt_id)
        self.sample_rate = int(self._f.samplerate)
        self.channels = int(self._f.channels)
        self._subtype = self._f.subtype
        self.pcm16 = self._subtype == "PCM_16" and not is_pipe(self.source) and self._f.frames > 0

    def int16_at(self, sample_rate: int = SAMPLE_RATE) -> bool:
        """True when ``read(out=<int16 array>, sample_rate=sample_rate)`` decodes into ``out`` as int16: a mono
        16-bit PCM file at ``sample_rate``. ``int16 / 32768`` is then exactly its float32 decoding (libsndfile
        scales 16-bit PCM by 2^-15), bit for bit."""
        return self.pcm16 and self.channels == 1 and self.sample_rate == sample_rate

    @property
    def format(self) -> str:
        """libsndfile's major format: "WAV", "FLAC", ..."""
        return self._f.format

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "AudioFile":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def read(
        self,
        *,
        start: float = 0.0,
        end: float | None = None,
        sample_rate: int = SAMPLE_RATE,
        max_overshoot: float = MAX_OVERSHOOT,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """`load_audio` of this source (see there); call it once."""
        source, utt_id, f = self.source, self.utt_id, self._f
        _check_args(sample_rate, out)
        sr = self.sample_rate
        in_place = False
        integer = self._subtype in _INTEGER_SUBTYPES  # then the finiteness scan below is skipped: it cannot fail
        try:
            if is_pipe(source) or f.frames <= 0:
                # In-memory stream: decode everything (header lengths of streamed WAVs are unreliable), then cut.
                wav = f.read(dtype="float32", always_2d=True)
                if wav.shape[0] == 0:
                    raise _error(source, utt_id, "zero-length audio")
                first, last = segment_frames(
                    start, end, wav.shape[0], sr, source=source, utt_id=utt_id, max_overshoot=max_overshoot
                )
                wav = wav[first:last]
            else:
                first, last = segment_frames(
                    start, end, f.frames, sr, source=source, utt_id=utt_id, max_overshoot=max_overshoot
                )
                if first:
                    f.seek(first)
                n = last - first
                if out is not None and n <= len(out) and (
                        self.int16_at(sample_rate) if out.dtype == np.int16 else f.channels == 1 and sr == sample_rate):
                    wav = f.read(n, out=out[:n])[:, None]  # in place, in out's dtype, as [frames, 1]
                    in_place = True
                else:
                    wav = f.read(n, dtype="float32", always_2d=True)
                if wav.shape[0] != n:
                    raise _error(
                        source, utt_id,
                        f"truncated audio: header says {f.frames} frames but only {first + wav.shape[0]} could be read",
                    )
        except (sf.SoundFileError, RuntimeError) as e:
            raise _error(source, utt_id, f"unreadable or corrupt audio: {e}") from e
        if wav.shape[0] == 0:
            raise _error(source, utt_id, "zero-length audio")
        if not integer and not np.isfinite(wav).all():
            bad = int(np.argmax(~np.isfinite(wav).all(axis=1)))
            raise _error(source, utt_id, f"non-finite sample (NaN or inf) at frame {first + bad}")
        if in_place:
            return wav[:, 0]  # the view of out (int16 or float32), mono at the rate already
        mono = wav.mean(axis=1, dtype=np.float32) if wav.shape[1] > 1 else wav[:, 0]
        if sr != sample_rate:
            mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
            if mono.shape[0] == 0:
                raise _error(source, utt_id, f"zero-length audio after resampling {sr} -> {sample_rate} Hz")
        return np.ascontiguousarray(mono, dtype=np.float32)


def open_audio(source: str | os.PathLike, *, utt_id: str | None = None) -> AudioFile:
    """Open a path or run a pipe command (`AudioError` as `load_audio`); read it with ``AudioFile.read``."""
    return AudioFile(source, utt_id=utt_id)


def load_audio(
    source: str | os.PathLike,
    *,
    utt_id: str | None = None,
    start: float = 0.0,
    end: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    max_overshoot: float = MAX_OVERSHOOT,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Read ``source`` (path or ``"cmd |"``) as float32 mono at ``sample_rate``.

    ``start``/``end`` select a segment in seconds of the recording (Kaldi ``segments``); for files only those
    frames are read. An ``end`` up to ``max_overshoot`` seconds past the end is truncated, as Kaldi does; further
    is an error. Multi-channel audio is averaged to mono; other rates are resampled with soxr (HQ).

    ``out``: a C-contiguous 1-D array to decode into. float32: a mono file at ``sample_rate`` whose segment fits is
    read straight into ``out[:n]`` and that view is returned (no allocation, no copy: the pretraining loader passes
    a row of its batch tensor). int16: the same for a mono 16-bit PCM file at ``sample_rate`` (``AudioFile.int16_at``),
    and the view holds the int16 samples, whose float32 value is ``x / 32768`` exactly. Anything else is returned as
    a new float32 array, as without ``out``. Test with ``np.may_share_memory(result, out)`` (or the dtype). The
    samples are the same either way.
    """
    _check_args(sample_rate, out)
    with AudioFile(source, utt_id=utt_id) as a:
        return a.read(start=start, end=end, sample_rate=sample_rate, max_overshoot=max_overshoot, out=out)


def save_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``wav`` (float in [-1, 1], shape [S] or [S, C]) as 16-bit PCM WAV, atomically.

    The file is written to a temporary name in the same directory, fsynced and renamed, so a crash never leaves
    a truncated WAV under the final name. Samples outside [-1, 1] are clipped (with a warning); NaN/inf raise.
    """
    path = Path(path)
    arr = np.asarray(wav)
    if arr.ndim not in (1, 2) or arr.shape[0] == 0:
        raise AudioError(f"path {path}: cannot save audio of shape {arr.shape} (need [samples] or [samples, channels])")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype != np.int16:
            raise AudioError(f"path {path}: integer audio must be int16, got {arr.dtype}")
        data = arr
    else:
        arr = arr.astype(np.float64, copy=False)
        if not np.isfinite(arr).all():
            raise AudioError(f"path {path}: cannot save audio with NaN or inf samples")
        n_clip = int(np.count_nonzero(np.abs(arr) > 1.0))
        if n_clip:
            log.warning("path %s: clipping %d samples outside [-1, 1]", path, n_clip)
        # Scale by 2^15 so that reading back (int / 32768, as soundfile does) returns the same values.
        data = np.clip(np.round(arr * 32768.0), -32768, 32767).astype(np.int16)
    with atomic_open(path) as fh:
        sf.write(fh, data, sample_rate, subtype="PCM_16", format="WAV")
