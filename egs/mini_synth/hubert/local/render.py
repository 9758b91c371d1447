"""Render one utterance: espeak-ng synthesis, phone alignment, realism transforms, 16 kHz int16 audio.

`render` is a pure function of (prompt, speaker, options, utterance seed, babble bank): the same inputs give
the same samples and the same alignment in any process, which makes the corpus reproducible under ``--nj``.

Alignment bookkeeping: espeak gives the start sample of every phoneme at 22,050 Hz. Leading/trailing pauses are
cut, the speech is resampled to 16 kHz with speed factor f (a boundary at input sample n moves to
``round(n * 16000 / (22050 f))``), random leading/trailing silence is added (boundaries shift by the lead),
reverberation keeps the direct path at lag 0 and is cut to the original length, noise/filters/gain do not move
anything. Segments are returned as integer sample boundaries at 16 kHz covering ``[0, len(audio))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.sax.saxutils import escape

import numpy as np

import augment
from espeak import Voice, synthesize
from grammar import Prompt
from phoneset import SIL, to_phone

__all__ = ["Speaker", "RenderOptions", "Rendered", "render", "make_babble_bank", "phone_segments", "SR"]

SR = 16000


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: an espeak voice (accent + variant) with its own base pitch, range, rate and word gap."""

    spk_id: str
    voice: str  # e.g. "en-gb-scotland+f2"
    gender: str  # "m" | "f"
    pitch: int
    range: int
    rate: int
    wordgap: int

    def espeak_voice(self, d_pitch: float = 0.0, d_range: float = 0.0, rate_mul: float = 1.0) -> Voice:
        """The espeak `Voice`, optionally with per-utterance pitch/range offsets and a rate multiplier."""
        return Voice(self.voice, pitch=int(np.clip(round(self.pitch + d_pitch), 0, 100)),
                     range=int(np.clip(round(self.range + d_range), 0, 100)),
                     rate=int(np.clip(round(self.rate * rate_mul), 80, 450)), wordgap=self.wordgap)


@dataclass(frozen=True)
class RenderOptions:
    """Realism knobs. ``clean=True`` turns every random transform off (speaker voices and silences remain)."""

    clean: bool = False
    # prosody (per utterance; per clause through SSML for read speech)
    pitch_jitter: float = 8.0  # std of the per-utterance base-pitch offset (espeak units 0..100)
    range_jitter: float = 15.0
    rate_jitter: tuple[float, float] = (0.85, 1.15)
    p_clause_prosody: float = 0.6
    # speed perturbation (resampling)
    speed: tuple[float, float] = (0.9, 1.1)
    # silences around speech (seconds)
    lead: tuple[float, float] = (0.05, 0.5)
    trail: tuple[float, float] = (0.05, 0.4)
    kw_clip: float = 1.0  # keyword clips are padded to this length (Speech Commands: 1 s)
    # reverberation
    p_reverb: float = 0.5
    rt60: tuple[float, float] = (0.2, 0.8)
    drr_db: tuple[float, float] = (-4.0, 10.0)
    # band limitation
    p_telephone: float = 0.1
    p_lowpass: float = 0.15
    # additive noise
    p_noise: float = 0.85
    snr_db: tuple[float, float] = (5.0, 25.0)
    noise_types: tuple[str, ...] = ("white", "pink", "brown", "babble")
    noise_probs: tuple[float, ...] = (0.15, 0.25, 0.2, 0.4)
    # level
    peak: tuple[float, float] = (0.05, 0.9)


@dataclass
class Rendered:
    """One rendered utterance: int16 audio at 16 kHz, phone segments in samples, and what was done to it."""

    audio: np.ndarray
    segments: list[tuple[int, int, str]]  # (start, end, phone), contiguous, covering [0, len(audio))
    info: dict[str, str] = field(default_factory=dict)


def phone_segments(starts: list[int], phones: list[str], n: int) -> list[tuple[int, int, str]]:
    """Turn phone starts into contiguous segments ending at ``n``; zero-length ones vanish, adjacent ``sil`` merge."""
    out: list[tuple[int, int, str]] = []
    for i, (s, p) in enumerate(zip(starts, phones)):
        e = starts[i + 1] if i + 1 < len(starts) else n
        s, e = min(max(s, 0), n), min(max(e, 0), n)
        if e <= s:
            continue
        if out and out[-1][1] != s:
            raise AssertionError(f"non-contiguous phone starts {starts}")
        if out and p == SIL and out[-1][2] == SIL:
            out[-1] = (out[-1][0], e, SIL)
        else:
            out.append((s, e, p))
    return out


def _ssml(text: str, rng: np.random.Generator) -> str:
    """Wrap each clause (split at commas) in its own <prosody> with random pitch and rate offsets."""
    clauses = text.split(", ")
    parts = []
    for i, c in enumerate(clauses):
        sep = ", " if i + 1 < len(clauses) else ""
        parts.append(f'<prosody pitch="{rng.uniform(-15, 15):+.0f}%" rate="{rng.uniform(85, 118):.0f}%">'
                     f"{escape(c + sep)}</prosody> ")
    return "<speak>" + "".join(parts).rstrip() + "</speak>"


def _speech(prompt: Prompt, speaker: Speaker, opts: RenderOptions, rng: np.random.Generator,
            info: dict[str, str]) -> tuple[np.ndarray, list[int], list[str]]:
    """Synthesise and resample; returns float audio at 16 kHz without leading/trailing pauses, phone starts, phones."""
    if opts.clean:
        voice, text, ssml, factor = speaker.espeak_voice(), prompt.speak, False, 1.0
    else:
        voice = speaker.espeak_voice(rng.normal(0, opts.pitch_jitter), rng.normal(0, opts.range_jitter),
                                     rng.uniform(*opts.rate_jitter))
        ssml = prompt.kind == "read" and rng.random() < opts.p_clause_prosody
        text = _ssml(prompt.speak, rng) if ssml else prompt.speak
        factor = float(rng.uniform(*opts.speed))
    info.update(pitch=str(voice.pitch), range=str(voice.range), rate=str(voice.rate), ssml=str(int(ssml)),
                speed=f"{factor:.4f}")
    syn = synthesize(text, voice, ssml=ssml, seed=int(rng.integers(2**31)))
    starts = [s for s, _ in syn.phones]
    phones = [to_phone(m, voice.name) for _, m in syn.phones]
    # cut espeak's own leading/trailing pauses (we add random ones later)
    speech = [i for i, p in enumerate(phones) if p != SIL]
    if not speech:
        raise RuntimeError(f"espeak produced only pauses for {prompt.speak!r} with voice {voice.name!r}")
    first, last = speech[0], speech[-1]
    a = starts[first]
    b = starts[last + 1] if last + 1 < len(starts) else len(syn.audio)
    x = augment.resample_speed(syn.audio[a:b].astype(np.float32) / 32768.0, syn.sample_rate, factor, SR)
    scale = SR / (syn.sample_rate * factor)
    out_starts = [int(round((s - a) * scale)) for s in starts[first:last + 1]]
    return x, out_starts, phones[first:last + 1]


def render(prompt: Prompt, speaker: Speaker, opts: RenderOptions, rng: np.random.Generator,
           babble_bank: list[np.ndarray] | None = None) -> Rendered:
    """Render one prompt for one speaker (see module docstring). ``rng`` is the utterance's own generator."""
    info: dict[str, str] = {}
    if prompt.speak:
        x, starts, phones = _speech(prompt, speaker, opts, rng, info)
    else:  # a silence/noise-only clip
        x, starts, phones = np.zeros(0, np.float32), [], []
    # silences around the speech
    if prompt.kind == "kw":
        total = max(int(opts.kw_clip * SR), len(x) + int(0.04 * SR))
        lead = int(rng.integers(int(0.02 * SR), max(int(0.02 * SR) + 1, total - len(x) - int(0.02 * SR))))
        trail = total - len(x) - lead
    else:
        lead, trail = int(rng.uniform(*opts.lead) * SR), int(rng.uniform(*opts.trail) * SR)
    y = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    segments = phone_segments([0] + [s + lead for s in starts] + [lead + len(x)],
                              [SIL] + phones + [SIL], len(y))
    if opts.clean:
        # no digital silence: a +-1 LSB dither floor, nothing else
        y = y + rng.standard_normal(len(y)).astype(np.float32) / 32768.0
        peak = float(np.max(np.abs(y)))
        if peak > 0.99:
            y *= 0.99 / peak
        return Rendered(augment.to_int16(y), segments, info)
    speech_power = float(np.mean(x.astype(np.float64) ** 2)) if len(x) else 1e-4
    if rng.random() < opts.p_reverb:
        rt60, drr = float(rng.uniform(*opts.rt60)), float(rng.uniform(*opts.drr_db))
        y = augment.reverberate(y, augment.synthetic_rir(rng, rt60, drr, SR))
        info.update(rt60=f"{rt60:.2f}", drr=f"{drr:.1f}")
    band = "none"
    r = rng.random()
    if r < opts.p_telephone:
        band = "telephone"
    elif r < opts.p_telephone + opts.p_lowpass:
        band = "lowpass"
    if band != "none":
        y = augment.band_limit(y, band, rng, SR)
    info["band"] = band
    noise_kind = "none"
    if rng.random() < opts.p_noise or not prompt.speak:
        noise_kind = str(rng.choice(opts.noise_types, p=opts.noise_probs))
        if noise_kind == "babble" and not babble_bank:
            noise_kind = "pink"
        n = (augment.babble(rng, len(y), babble_bank) if noise_kind == "babble"
             else augment.coloured_noise(rng, len(y), noise_kind, SR))
        snr = float(rng.uniform(*opts.snr_db))
        y = augment.add_noise(y, n, snr, ref_power=speech_power)  # SNR w.r.t. the active speech
        info.update(snr=f"{snr:.1f}")
    info["noise"] = noise_kind
    # a faint noise floor everywhere (no digital silence), then the level
    y = y + augment.coloured_noise(rng, len(y), "white", SR) * float(np.sqrt(max(speech_power, 1e-6))) * 10 ** (-55 / 20)
    peak = float(rng.uniform(*opts.peak))
    y = augment.peak_normalise(y, peak)
    info["peak"] = f"{peak:.2f}"
    return Rendered(augment.to_int16(y), segments, info)


def make_babble_bank(speakers: list[Speaker], prompts: list[list[Prompt]], seed: int,
                     clip_seconds: float = 6.0) -> list[np.ndarray]:
    """Babble clips: for each entry of ``prompts`` (one list of sentences per clip), every sentence spoken by a
    different speaker, the talkers overlaid with random offsets and levels. Deterministic given the inputs."""
    rng = np.random.default_rng([seed, 99173])
    bank = []
    n = int(clip_seconds * SR)
    for talks in prompts:
        mix = np.zeros(n, np.float32)
        for p in talks:
            spk = speakers[int(rng.integers(len(speakers)))]
            syn = synthesize(p.speak, spk.espeak_voice(), seed=int(rng.integers(2**31)))
            x = augment.resample_speed(syn.audio.astype(np.float32) / 32768.0, syn.sample_rate, 1.0, SR)
            x = np.resize(x, n)  # cyclic repeat/trim to the clip length
            x = np.roll(x, int(rng.integers(n)))
            mix += x / (x.std() + 1e-9) * float(rng.uniform(0.5, 1.0))
        bank.append(mix / (mix.std() + 1e-9))
    return bank
