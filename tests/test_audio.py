"""speechssl.audio: reading files and pipes, segments, downmix, resampling, validation, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from speechssl import audio
from speechssl.audio import AudioError, audio_info, load_audio, save_audio


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def _put(path, data) -> str:
    """Write bytes, or an array as a 16 kHz WAV, to ``path`` and return it as a string."""
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        sf.write(path, data, 16000)
    return str(path)


@pytest.fixture
def ramp16k(tmp_path):
    """1 s at 16 kHz whose sample i is int16 value (i - 8000): every sample is identifiable."""
    data = (np.arange(16000) - 8000).astype(np.int16)
    p = tmp_path / "ramp.wav"
    sf.write(p, data, 16000, subtype="PCM_16")
    return p, data.astype(np.float32) / 32768.0


def test_resample_22050_sine_keeps_frequency_and_length(tmp_path):
    x = _sine(1000.0, 22050, 1.0)
    p = tmp_path / "s.wav"
    sf.write(p, x, 22050, subtype="FLOAT")
    y = load_audio(str(p))
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == 16000
    assert abs(_peak_hz(y, 16000) - 1000.0) <= 1.0
    # independent reference: polyphase resampling by the exact ratio 320/441 (away from edge transients)
    ref = resample_poly(x.astype(np.float64), 320, 441)
    assert np.max(np.abs(y[500:-500] - ref[500:-500])) < 2e-3


def test_resample_8k_to_16k_length(tmp_path):
    p = tmp_path / "s8.wav"
    sf.write(p, _sine(440.0, 8000, 0.5), 8000)
    y = load_audio(str(p))
    assert len(y) == 8000
    assert abs(_peak_hz(y, 16000) - 440.0) <= 2.0


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = _sine(300.0, 16000, 0.5), _sine(700.0, 16000, 0.5, amp=0.25)
    p = tmp_path / "st.wav"
    sf.write(p, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    y = load_audio(str(p))
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-7)


def test_segment_reads_exact_samples(ramp16k):
    p, ref = ramp16k
    y = load_audio(str(p), start=0.25, end=0.5)
    np.testing.assert_array_equal(y, ref[4000:8000])
    np.testing.assert_array_equal(load_audio(str(p), start=0.9), ref[14400:])


def test_segment_overshoot_within_tolerance_is_truncated(ramp16k):
    p, ref = ramp16k
    np.testing.assert_array_equal(load_audio(str(p), start=0.5, end=1.3), ref[8000:])


def test_pipe_matches_file_and_honours_segments(ramp16k):
    p, ref = ramp16k
    np.testing.assert_array_equal(load_audio(f"cat {p} |"), ref)
    np.testing.assert_array_equal(load_audio(f"cat {p} |", start=0.1, end=0.2), ref[1600:3200])
    assert audio_info(f"cat {p} |") == audio_info(str(p)) == audio.AudioInfo(16000, 16000, 1)


def test_pipe_with_streamed_wav_header(tmp_path):
    """A WAV written to a non-seekable stream has an unknown length in its header: we count decoded frames."""
    x = _sine(200.0, 16000, 0.25)
    p = tmp_path / "x.raw"
    (x * 32767).astype("<i2").tofile(p)
    # python writes a WAV to stdout (non-seekable): the header length fields are placeholders
    cmd = (
        f"python3 -c \"import sys,wave; w=wave.open(sys.stdout.buffer,'wb'); w.setnchannels(1); w.setsampwidth(2); "
        f"w.setframerate(16000); w.writeframes(open('{p}','rb').read())\" |"
    )
    y = load_audio(cmd, utt_id="u")
    assert len(y) == len(x)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "missing.wav"), "no such file"),
        (lambda d: _put(d / "empty.wav", b""), "zero-length audio"),
        (lambda d: _put(d / "junk.wav", b"RIFF" + bytes(range(256)) * 8), "unreadable or corrupt"),
        (lambda d: _put(d / "z.wav", np.zeros(0, np.float32)), "zero-length audio"),
        (lambda d: "exit 3 |", "pipe command failed with exit status 3"),
        (lambda d: "echo not-audio |", "unreadable or corrupt"),
        (lambda d: "true |", "zero-length audio"),
    ],
    ids=["missing", "empty-file", "corrupt", "zero-frames", "pipe-fails", "pipe-garbage", "pipe-empty"],
)
def test_bad_sources_raise_one_clear_error(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(AudioError) as e:
        load_audio(source, utt_id="utt-7")
    msg = str(e.value)
    assert message in msg
    assert "utt utt-7" in msg and source in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_samples(tmp_path, bad):
    x = _sine(300.0, 16000, 0.1)
    x[777] = bad
    p = tmp_path / "nf.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"utt u1 \(path .*nf.wav\): non-finite sample .* at frame 777"):
        load_audio(str(p), utt_id="u1")


@pytest.mark.parametrize(
    "start, end, message",
    [(0.2, 3.0, "ends beyond the audio"), (1.0, None, "beyond the end"), (0.5, 0.5, "end must be > start"), (-1.0, None, ">= 0")],
)
def test_bad_segments(ramp16k, start, end, message):
    p, _ = ramp16k
    with pytest.raises(AudioError, match=message):
        load_audio(str(p), utt_id="s1", start=start, end=end)


def test_save_audio_roundtrip_16bit(tmp_path):
    x = _sine(440.0, 16000, 0.2, amp=0.9)
    p = tmp_path / "sub" / "o.wav"
    save_audio(p, x)
    info = sf.info(p)
    assert (info.samplerate, info.subtype, info.format) == (16000, "PCM_16", "WAV")
    np.testing.assert_allclose(load_audio(str(p)), x, atol=0.5 / 32768 + 1e-9)
    assert os.stat(p).st_mode & 0o777 == 0o644


def test_save_audio_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "keep.wav"
    save_audio(p, np.full(100, 0.25, np.float32))
    before = p.read_bytes()

    def boom(f, *a, **k):
        f.write(b"RIFF partial")
        raise OSError("disk full")

    monkeypatch.setattr(audio.sf, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        save_audio(p, np.zeros(100, np.float32))
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.wav"]
    with pytest.raises(AudioError, match="NaN"):
        save_audio(tmp_path / "n.wav", np.array([0.0, np.nan]))
    assert sorted(os.listdir(tmp_path)) == ["keep.wav"]
