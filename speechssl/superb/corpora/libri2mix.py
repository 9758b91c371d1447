"""Libri2Mix for SUPERB SD (speaker diarization): two-speaker mixtures of LibriSpeech utterances with RTTMs.

Input: LibriSpeech (``--corpus``, the released layout) and the ``metadata/`` folder of the LibriMix repository
(``--metadata``; s3prl uses its fork github.com/s3prl/LibriMix, whose metadata adds the RTTMs)::

    METADATA/Libri2Mix/libri2mix_{train-clean-100,dev-clean,test-clean}.csv
        mixture_ID,source_1_path,source_1_gain,source_2_path,source_2_gain,noise_path,noise_gain
        (source paths relative to LibriSpeech, noise paths relative to WHAM! noise)
    METADATA/LibriSpeech/{train_clean_100,dev_clean,test_clean}.rttm     (the s3prl fork only)
        per source utterance "<chapter>-<utt>", speaker = reader: its speech regions (VAD)

What s3prl does (docs/superb.md "SD", LibriMix ``generate_librimix_sd.sh`` + ``scripts/prepare_diarization.py``):
LibriMix's ``create_librimix_from_metadata.py`` writes 16 kHz ``max``-mode ``mix_both`` mixtures (each source
times its gain, both starting at 0, the shorter one zero-padded, plus WHAM! noise times its gain), and the Kaldi
dirs get one RTTM turn per VAD segment of each source (the source's speaker), at the same times in the mixture.

The same here, written by this module: the mixtures are made from the sources (``mix_both`` with ``--wham``,
else ``mix_clean``, sources only), ``OUT/wav/<split>/<mixture_ID>.wav`` (16-bit), and the turns come from the
fork's RTTMs when ``METADATA/LibriSpeech/<part>.rttm`` exists, else from an energy VAD of each source (frames
above -40 dB of its loudest frame, gaps < 0.3 s bridged). Output: ``OUT/{train,dev,test}/`` with ``wav.scp
utt2spk spk2utt utt2dur rttm`` (utterance = mixture, its own "speaker"), ``OUT/prepare.json``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from speechssl.audio import SAMPLE_RATE, AudioError, load_audio, save_audio
from speechssl.data.kaldi import DataDir
from speechssl.progress import progress_bar
from speechssl.superb.corpora.common import (CorpusError, check_listed_audio, corpus_parser, fresh_output, need_dir,
                                             need_file, output_tree, run_main, write_split, write_summary)
from speechssl.superb.der import Turn, merge_intervals, read_rttm, write_rttm

__all__ = ["DEFAULT_PARTS", "Mixture", "mix_sources", "energy_vad", "write_mixture_split", "read_mixture_csv",
           "prepare_libri2mix", "main"]

log = logging.getLogger(__name__)

DEFAULT_PARTS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}
_SOURCE = re.compile(r"source_(\d+)_path$")


@dataclass
class Mixture:
    mix_id: str
    wav: Path            # where the data dir points (final location)
    duration: float      # seconds
    turns: list[Turn]    # reference speaker turns in the mixture


def mix_sources(sources: Sequence[np.ndarray], gains: Sequence[float],
                offsets: Sequence[int] | None = None) -> np.ndarray:
    """LibriMix ``max`` mode: each source times its gain, starting at its offset in samples (LibriMix: all 0),
    summed; as long as the latest-ending source."""
    offsets = list(offsets) if offsets is not None else [0] * len(sources)
    out = np.zeros(max(o + len(s) for s, o in zip(sources, offsets)), dtype=np.float64)
    for s, g, o in zip(sources, gains, offsets):
        out[o:o + len(s)] += float(g) * np.asarray(s, dtype=np.float64)
    return out.astype(np.float32)


def energy_vad(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, *, floor_db: float = -40.0,
               min_gap: float = 0.3) -> np.ndarray:
    """``[K, 2]`` seconds of speech: 25 ms frames every 10 ms whose energy is within ``floor_db`` of the
    loudest frame, gaps shorter than ``min_gap`` bridged."""
    n, hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
    if len(wav) < n:
        return np.zeros((0, 2))
    idx = np.arange(0, len(wav) - n + 1, hop)[:, None] + np.arange(n)[None, :]
    db = 10 * np.log10(np.mean(np.asarray(wav, dtype=np.float64)[idx] ** 2, axis=1) + 1e-12)
    on = db > db.max() + floor_db
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
    iv = [(b * hop / sample_rate, ((e - 1) * hop + n) / sample_rate) for b, e in zip(edges[::2], edges[1::2])]
    return merge_intervals(iv, min_gap)


def write_mixture_split(root: Path, name: str, mixtures: Sequence[Mixture]) -> int:
    """``root/name``: the mixtures as a Kaldi data dir (each its own speaker) plus their ``rttm``."""
    ids = [m.mix_id for m in mixtures]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"{name}: mixture ids repeat")
    dd = DataDir(wav_scp={m.mix_id: str(m.wav) for m in mixtures}, utt2spk={m.mix_id: m.mix_id for m in mixtures},
                 utt2dur={m.mix_id: round(m.duration, 6) for m in mixtures})
    n = write_split(root, name, dd)
    write_rttm(root / name / "rttm", {m.mix_id: m.turns for m in mixtures})
    return n


def read_mixture_csv(path: Path) -> list[tuple[str, list[tuple[str, float]], tuple[str, float] | None, str]]:
    """(mixture_ID, [(source path, gain)], (noise path, gain) or None, "file:line") per row of a LibriMix CSV."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 ({e.reason}); is this a LibriMix metadata CSV?") from None
    if not rows:
        raise CorpusError(f"{path}: empty file; expected the header mixture_ID,source_1_path,source_1_gain,...")
    header = [h.strip() for h in rows[0]]
    srcs = sorted((int(m.group(1)), i) for i, h in enumerate(header) if (m := _SOURCE.match(h)))
    if "mixture_ID" not in header or not srcs:
        raise CorpusError(f"{path}:1: header lacks mixture_ID or source_1_path; is this a LibriMix metadata CSV?")
    col = {h: i for i, h in enumerate(header)}
    for k, _ in srcs:
        if f"source_{k}_gain" not in col:
            raise CorpusError(f"{path}:1: header has source_{k}_path but no source_{k}_gain")
    out = []
    for n, row in enumerate(rows[1:], 2):
        if not any(x.strip() for x in row):
            continue
        where = f"{path}:{n}"
        if len(row) != len(header):
            raise CorpusError(f"{where}: {len(row)} fields, the header has {len(header)}")
        try:
            sources = [(row[i], float(row[col[f"source_{k}_gain"]])) for k, i in srcs]
            noise = (row[col["noise_path"]], float(row[col["noise_gain"]])) if "noise_gain" in col else None
        except ValueError as e:
            raise CorpusError(f"{where}: a gain is not a number ({e})") from None
        out.append((row[col["mixture_ID"]].strip(), sources, noise, where))
    return out


def _noise(path: Path, length: int, where: str) -> np.ndarray:
    """WHAM! noise as LibriMix reads it: first channel, extended with Hanning cross-fades if too short."""
    try:
        noise, _ = sf.read(str(check_listed_audio(path, where)), dtype="float32", stop=length)
    except RuntimeError as e:
        raise CorpusError(f"{where}: cannot read {path}: {e}") from None
    noise = noise[:, 0] if noise.ndim > 1 else noise
    win = np.hanning(SAMPLE_RATE + 1)
    up, down = win[: len(win) // 2 + 1], win[len(win) // 2::-1]
    ext = noise
    while len(ext) < length:  # LibriMix extend_noise
        ext = np.concatenate((ext[: len(ext) - len(down)], ext[len(ext) - len(down):] * down + noise[: len(up)] * up,
                              noise[len(up):]))
    return ext[:length]


def _source_turns(speaker: str, source_id: str, wav: np.ndarray, rttm: dict[str, list[Turn]] | None,
                  rttm_path: Path | None, where: str) -> list[Turn]:
    if rttm is None:
        return [Turn(speaker, float(s), float(e)) for s, e in energy_vad(wav)]
    key = source_id[len(speaker) + 1:]   # the fork's RTTM ids drop the reader: 105575-0000 (speaker 7976)
    if key not in rttm:
        raise CorpusError(f"{where}: source {source_id} has no turns in {rttm_path} (id {key})")
    bad = next((t.speaker for t in rttm[key] if t.speaker != speaker), None)
    if bad is not None:
        raise CorpusError(f"{rttm_path}: id {key} has speaker {bad}, but {where} says {source_id} is read by {speaker}")
    return [Turn(speaker, t.start, t.end) for t in rttm[key]]


def prepare_libri2mix(librispeech_dir: str | Path, metadata_dir: str | Path, out_dir: str | Path, *,
                      wham_dir: str | Path | None = None, parts: dict[str, str] | None = None) -> dict:
    """Write ``out_dir/{train,dev,test}`` (mixtures + rttm) and ``out_dir/wav``; see the module docstring."""
    out_dir = fresh_output(out_dir)
    corpus = need_dir(librispeech_dir, "LibriSpeech directory")
    meta = need_dir(metadata_dir, "LibriMix metadata directory")
    wham = need_dir(wham_dir, "WHAM! noise directory") if wham_dir is not None else None
    parts = dict(parts or DEFAULT_PARTS)
    tables = {s: read_mixture_csv(need_file(meta / "Libri2Mix" / f"libri2mix_{p}.csv", f"Libri2Mix {s} metadata"))
              for s, p in parts.items()}
    counts: dict[str, dict] = {}
    activity: dict[str, str] = {}
    final = out_dir.resolve()
    with output_tree(out_dir) as tmp:
        for split, rows in tables.items():
            rttm_path = meta / "LibriSpeech" / f"{parts[split].replace('-', '_')}.rttm"
            rttm = read_rttm(rttm_path) if rttm_path.is_file() else None
            activity[split] = str(rttm_path) if rttm is not None else "energy VAD"
            (tmp / "wav" / split).mkdir(parents=True)
            mixtures = []
            for mix_id, sources, noise, where in progress_bar(rows, desc=f"{split} mixtures", unit="mix"):
                wavs, turns = [], []
                for rel, _gain in sources:
                    src = check_listed_audio(corpus / rel, where)
                    try:
                        wavs.append(load_audio(src))
                    except AudioError as e:
                        raise CorpusError(f"{where}: {e}") from None
                    sid = Path(rel).name.split(".")[0]
                    turns += _source_turns(sid.split("-")[0], sid, wavs[-1], rttm, rttm_path, where)
                gains = [g for _, g in sources]
                if wham is not None:
                    if noise is None:
                        raise CorpusError(f"{where}: --wham given but the CSV has no noise_path/noise_gain columns")
                    wavs.append(_noise(wham / noise[0], max(len(w) for w in wavs), where))
                    gains.append(noise[1])
                mix = mix_sources(wavs, gains)
                save_audio(tmp / "wav" / split / f"{mix_id}.wav", mix)
                mixtures.append(Mixture(mix_id, final / "wav" / split / f"{mix_id}.wav", len(mix) / SAMPLE_RATE,
                                        sorted(turns, key=lambda t: (t.start, t.speaker))))
            write_mixture_split(tmp, split, mixtures)
            counts[split] = {"mixtures": len(mixtures), "hours": round(sum(m.duration for m in mixtures) / 3600, 4)}
        return write_summary(tmp, "libri2mix", {"librispeech_dir": corpus, "metadata_dir": meta, "parts": parts,
                                                "noise": str(wham) if wham else "none (mix_clean)",
                                                "activity": activity}, counts)


def _parser() -> argparse.ArgumentParser:
    p = corpus_parser("libri2mix", __doc__, "LibriSpeech directory (holding train-clean-100, dev-clean, test-clean)")
    p.add_argument("--metadata", required=True, help="the LibriMix repository's metadata/ directory")
    p.add_argument("--wham", default=None, help="WHAM! noise directory: mix_both mixtures (default: sources only)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_parser, lambda a: prepare_libri2mix(a.corpus, a.metadata, a.out, wham_dir=a.wham), argv)


if __name__ == "__main__":
    raise SystemExit(main())
