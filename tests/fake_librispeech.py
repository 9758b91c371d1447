"""A fake LibriSpeech tree in the released layout, for the recipe's tests (no download):

    ROOT/<part>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   "<utt> WORD WORD ..." per line
    ROOT/<part>/<speaker>/<chapter>/<utt>.flac                      16 kHz, 16-bit FLAC

Utterances are strings of "phones": 60-180 ms segments, each a fixed chord of three partials (one of 12) with a
pitch contour and noise, so MFCC k-means finds structure, as in speech. Transcripts are the phones' names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
PHONES = [f"P{i}" for i in range(12)]
# part -> (speakers, chapters per speaker, utterances per chapter)
DEFAULT_LAYOUT = {
    "train-clean-100": (3, 1, 4),
    "train-clean-360": (2, 1, 3),
    "train-other-500": (2, 1, 3),
    "dev-clean": (2, 1, 2),
    "dev-other": (2, 1, 2),
}


def _utterance(rng: np.random.Generator, chords: np.ndarray, seconds: float) -> tuple[np.ndarray, list[str]]:
    out, words, n = [], [], int(seconds * SR)
    f0 = rng.uniform(0.8, 1.25)
    while sum(len(x) for x in out) < n:
        p = int(rng.integers(len(PHONES)))
        m = int(rng.uniform(0.06, 0.18) * SR)
        t = np.arange(m) / SR
        seg = sum(np.sin(2 * np.pi * f * f0 * (1 + 0.05 * t) * t + rng.uniform(0, 6.3)) / (j + 1)
                  for j, f in enumerate(chords[p]))
        env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        out.append(0.2 * seg * env + 0.01 * rng.standard_normal(m))
        words.append(PHONES[p])
    return np.concatenate(out)[:n].astype(np.float32), words


def make_fake_librispeech(root: str | Path, layout: dict[str, tuple[int, int, int]] | None = None, *,
                          seed: int = 0, min_seconds: float = 1.6, max_seconds: float = 3.2) -> Path:
    """Write the tree under ``root`` (created); returns it. Speaker ids are unique across parts, as in LibriSpeech."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    chords = rng.uniform(150, 3500, size=(len(PHONES), 3))
    speaker = 100
    for part, (n_spk, n_chap, n_utt) in (layout or DEFAULT_LAYOUT).items():
        for _ in range(n_spk):
            speaker += 1
            for c in range(n_chap):
                chapter = 1000 + 10 * speaker + c
                d = root / part / str(speaker) / str(chapter)
                d.mkdir(parents=True)
                lines = []
                for u in range(n_utt):
                    utt = f"{speaker}-{chapter}-{u:04d}"
                    wav, words = _utterance(rng, chords, rng.uniform(min_seconds, max_seconds))
                    sf.write(d / f"{utt}.flac", wav, SR, subtype="PCM_16", format="FLAC")
                    lines.append(f"{utt} {' '.join(words)}\n")
                (d / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return root
