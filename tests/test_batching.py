"""The shared per-utterance helpers: padded-duration batching, read-ahead, durations, and the one atomic directory
writer (speechssl.data.batching, speechssl.data.durations, speechssl.fileio)."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from speechssl.data.batching import duration_batches, padded_batches, prefetch
from speechssl.data.durations import durations_of
from speechssl.data.kaldi import DataDir
from speechssl.fileio import atomic_dir


def _brute_greedy(sizes, limit):
    """Reference: grow each batch while rows x largest <= limit, written as index arithmetic."""
    out, start = [], 0
    while start < len(sizes):
        end = start + 1
        while end < len(sizes) and (end - start + 1) * max(sizes[start:end + 1]) <= limit:
            end += 1
        out.append(list(range(start, end)))
        start = end
    return out


@pytest.mark.parametrize("seed", range(5))
def test_padded_batches_equal_the_greedy_reference(seed):
    rng = np.random.default_rng(seed)
    sizes = [float(x) for x in rng.uniform(0.1, 5.0, size=40)]
    for limit in (0.5, 4.0, 9.0, 100.0):
        got = list(padded_batches(range(len(sizes)), lambda i: sizes[i], limit))
        assert got == _brute_greedy(sizes, limit)
        assert all(len(b) == 1 or len(b) * max(sizes[i] for i in b) <= limit for b in got)


def test_padded_batches_are_lazy_and_keep_infinite_items_alone():
    sizes = [1.0, 1.0, float("inf"), 1.0, 1.0]
    assert list(padded_batches(range(5), lambda i: sizes[i], 10.0)) == [[0, 1], [2], [3, 4]]
    stream = padded_batches(itertools.count(), lambda i: 1.0, 3.0)   # an endless stream
    assert next(stream) == [0, 1, 2] and next(stream) == [3, 4, 5]


def test_duration_batches_cover_everything_once_and_depend_on_the_epoch():
    durs = [0.5, 3.0, 1.0, 2.0, 0.7, 4.0, 1.2, 2.5]
    for shuffle in (True, False):
        batches = duration_batches(durs, 4.0, num_buckets=2, seed=1, shuffle=shuffle)
        assert sorted(i for b in batches for i in b) == list(range(len(durs)))
        assert all(len(b) == 1 or max(durs[i] for i in b) * len(b) <= 4.0 for b in batches)
    assert duration_batches(durs, 4.0, shuffle=False) == [[0, 4, 2], [6, 3], [7], [1], [5]]   # by hand
    assert duration_batches(durs, 4.0, seed=1, epoch=0) == duration_batches(durs, 4.0, seed=1, epoch=0)
    assert duration_batches(durs, 4.0, seed=1, epoch=0) != duration_batches(durs, 4.0, seed=1, epoch=1)


def test_prefetch_keeps_order_reads_ahead_and_raises_at_the_item():
    started: list[int] = []
    lock = threading.Lock()

    def slow_square(x):
        with lock:
            started.append(x)
        time.sleep(0.01 * (5 - x % 5))   # later items finish first
        return x * x

    got = []
    for x, y in prefetch(slow_square, list(range(10)), workers=3, ahead=4):
        got.append((x, y))
        if x == 0:
            time.sleep(0.05)
            assert len(started) == 4   # at most `ahead` submitted while the first is consumed
    assert got == [(x, x * x) for x in range(10)]

    def fails_at_3(x):
        if x == 3:
            raise ValueError("item 3")
        return x

    seen = []
    with pytest.raises(ValueError, match="item 3"):
        for x, _ in prefetch(fails_at_3, list(range(6)), workers=2):
            seen.append(x)
    assert seen == [0, 1, 2]


def test_durations_of_prefers_utt2dur_and_truncates_segments_at_the_recording_end(tmp_path):
    import soundfile as sf

    wav = tmp_path / "r.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)   # 1.0 s
    dd = DataDir(wav_scp={"r": str(wav)}, utt2spk={"s-a": "s", "s-b": "s"},
                 segments={"s-a": ("r", 0.0, 0.4), "s-b": ("r", 0.5, 1.7)})
    assert durations_of(dd) == pytest.approx({"s-a": 0.4, "s-b": 0.5})   # 1.7 s past the end: cut at 1.0
    assert durations_of(DataDir(wav_scp=dd.wav_scp, utt2spk=dd.utt2spk, segments=dd.segments,
                                utt2dur={"s-a": 9.0, "s-b": 8.0})) == {"s-a": 9.0, "s-b": 8.0}


def test_atomic_dir_replaces_an_existing_directory_whole_or_not_at_all(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OSError):   # without replace=True an existing directory is never touched
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in out.iterdir()) == ["a"]          # the old one, untouched
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]          # the new one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]     # no temp or old directory left beside it
