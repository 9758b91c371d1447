"""A minimal ctypes binding to libespeak-ng (from the ``espeakng-loader`` wheel) with phoneme events.

espeak-ng is initialised in synchronous retrieval mode with ``espeakINITIALIZE_PHONEME_EVENTS``; the synth
callback receives audio chunks and event lists. A phoneme event's ``sample`` field is the exact start sample of
that phoneme, counted from the start of the current ``espeak_Synth`` call, so one call per utterance gives a
sample-exact phone segmentation at espeak's native rate (22,050 Hz).

Pitfalls handled here (see /work/shared/REFERENCE.md, "Measured on these machines"):

* the event struct is 40 bytes on x86-64 (``user_data`` pointer at offset 24, the ``id`` union at 32);
* the phoneme mnemonic ``id.string`` is ``char[8]`` and may lack a terminating NUL;
* an event list ends with an event of type 0;
* the callback object must stay referenced from Python for as long as espeak may call it;
* ``espeak_Initialize`` wants the directory that *contains* ``espeak-ng-data``;
* without ``espeakENDPAUSE`` there is almost no trailing silence (we ask for it).

**Determinism.** espeak-ng keeps static state between calls (e.g. the phase of the glottal wave), so the same
text with the same voice comes out a few samples different depending on what was spoken before, even after
``espeak_Terminate`` + ``espeak_Initialize`` or ``espeak_ng_SetRandSeed``. `synthesize` therefore runs every
text in a freshly loaded library: a private copy of ``libespeak-ng.so`` (so that nobody else holds it) is
``dlopen``ed, initialised, used once and ``dlclose``d, which resets all static data (about 10 ms per call,
mostly loading the voice). The output is then a function of (text, voice) only, whatever ran before and in
whichever process. Some voices (the Klatt-based variants) also draw noise from the C library's ``rand()``,
whose state lives in libc; `synthesize` seeds it (``srand``) and espeak-ng's own generator
(``espeak_ng_SetRandSeed``) before every text. Use processes, not threads, for parallel synthesis.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

__all__ = ["EspeakError", "Voice", "Synthesis", "Espeak", "synthesize"]

# espeak_AUDIO_OUTPUT / options / flags / events / parameters, from espeak-ng's speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8 = 1
_SSML = 0x10
_ENDPAUSE = 0x1000
_POS_CHARACTER = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded, rejected a voice, or failed to synthesise a text."""


class _Event(ctypes.Structure):
    """``espeak_EVENT`` (40 bytes on LP64). The ``id`` union is read as its ``char string[8]`` member."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice and its speech parameters.

    name: language voice plus optional variant, e.g. ``"en-us+m3"`` or ``"en-gb-scotland+f2"``;
    pitch: base pitch 0..100 (50 normal); range: pitch range 0..100 (0 monotone, 50 normal);
    rate: words per minute 80..450 (175 normal); wordgap: extra pause between words in units of 10 ms.
    """

    name: str
    pitch: int = 50
    range: int = 50
    rate: int = 175
    wordgap: int = 0


@dataclass
class Synthesis:
    """espeak output for one text: int16 audio at ``sample_rate`` and phoneme starts.

    ``phones`` is a list of ``(start_sample, mnemonic)``, strictly increasing starts, the first at 0 (a leading
    stretch before the first phoneme event is labelled ``"_"``, espeak's short pause); phone i ends where
    phone i+1 starts, the last one at ``len(audio)``. Zero-length phoneme events are dropped.
    """

    audio: np.ndarray  # int16 [N]
    sample_rate: int
    phones: list[tuple[int, str]]

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def _mnemonic(raw: bytes) -> str:
    """Decode a ``char[8]`` phoneme name that may or may not be NUL-terminated."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="strict")


_PRIVATE_LIB: str | None = None


def _private_library() -> tuple[str, str]:
    """(path of this process's private copy of libespeak-ng, directory containing espeak-ng-data)."""
    global _PRIVATE_LIB
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EspeakError("espeakng-loader is not installed: pip install espeakng-loader") from e
    data_dir = os.path.dirname(os.path.normpath(espeakng_loader.get_data_path()))
    if _PRIVATE_LIB is None or not os.path.exists(_PRIVATE_LIB):
        src = str(espeakng_loader.get_library_path())
        tmp = tempfile.mkdtemp(prefix="espeak-ng-private-")
        atexit.register(shutil.rmtree, tmp, True)
        _PRIVATE_LIB = os.path.join(tmp, "libespeak-ng-private.so")
        try:
            shutil.copyfile(src, _PRIVATE_LIB)
        except OSError as e:
            raise EspeakError(f"cannot copy libespeak-ng from {src}: {e}") from e
    return _PRIVATE_LIB, data_dir


class Espeak:
    """One loaded and initialised instance of libespeak-ng; ``close()`` (or leaving a ``with`` block) unloads it.

    Several texts may be spoken in one instance, but then each depends on the ones before (see the module
    docstring); `synthesize` uses one instance per text.
    """

    def __init__(self) -> None:
        lib_path, data_dir = _private_library()
        try:
            self._lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {e}") from e
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir.encode(), _INITIALIZE_PHONEME_EVENTS)
        if rate <= 0:
            self._unload()
            raise EspeakError(f"espeak_Initialize failed (data path {data_dir!r} must contain espeak-ng-data)")
        self.sample_rate: int = rate
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, str]] = []
        self._callback = _CALLBACK(self._on_synth)  # keep a reference: espeak holds only the C pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._voice_name: str | None = None

    def _unload(self) -> None:
        if self._lib is not None:
            _ctypes.dlclose(self._lib._handle)
            self._lib = None

    def close(self) -> None:
        """Terminate espeak and unload the library (its static state goes with it)."""
        if self._lib is not None:
            self._lib.espeak_Terminate()
            self._unload()

    def seed(self, seed: int) -> None:
        """Seed libc's ``rand()`` (used by Klatt voices for noise) and espeak-ng's own generator."""
        _LIBC.srand(seed & 0xFFFFFFFF)
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed & 0x7FFFFFFF))

    def __enter__(self) -> "Espeak":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_synth(self, wav, num_samples: int, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.frombuffer(ctypes.string_at(wav, 2 * num_samples), dtype=np.int16))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                self._events.append((int(ev.sample), _mnemonic(bytes(ev.id))))
            i += 1
        return 0

    def set_voice(self, voice: Voice) -> None:
        """Select ``voice.name`` (raises `EspeakError` if espeak rejects it) and set its parameters."""
        if voice.name != self._voice_name:
            if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                self._voice_name = None
                raise EspeakError(f"espeak-ng rejected voice {voice.name!r} (try e.g. 'en-us+m3')")
            self._voice_name = voice.name
        for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range),
                             (_WORDGAP, voice.wordgap), (_VOLUME, 100)):
            if self._lib.espeak_SetParameter(param, int(value), 0) != 0:
                raise EspeakError(f"espeak_SetParameter({param}, {value}) failed for voice {voice.name!r}")

    def synthesize(self, text: str, voice: Voice, *, ssml: bool = False) -> Synthesis:
        """Speak ``text`` (UTF-8, SSML if ``ssml``) with ``voice``; one ``espeak_Synth`` call, end pause included."""
        if not text.strip():
            raise EspeakError("synthesize: empty text")
        self.set_voice(voice)
        self._chunks, self._events = [], []
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        flags = _CHARS_UTF8 | _ENDPAUSE | (_SSML if ssml else 0)
        err = self._lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, flags, None, None)
        if err != 0:
            raise EspeakError(f"espeak_Synth failed with error {err} for voice {voice.name!r}, text {text!r}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        if len(audio) == 0 or not self._events:
            raise EspeakError(f"espeak produced no audio/phonemes for voice {voice.name!r}, text {text!r}")
        return Synthesis(audio.astype(np.int16, copy=False), self.sample_rate, _clean_events(self._events, len(audio),
                                                                                            text, voice))


def _clean_events(events: list[tuple[int, str]], num_samples: int, text: str, voice: Voice) -> list[tuple[int, str]]:
    """Clamp to the audio, drop zero-length phonemes (keep the later one), label a leading gap as ``_``."""
    out: list[tuple[int, str]] = []
    for start, name in events:
        if out and start < out[-1][0]:
            raise EspeakError(f"non-monotonic phoneme events ({out[-1]} then {(start, name)}) for voice "
                              f"{voice.name!r}, text {text!r}")
        start = min(start, num_samples)
        if out and start == out[-1][0]:
            out[-1] = (start, name)  # the earlier one had zero length
        else:
            out.append((start, name))
    if out and out[-1][0] >= num_samples:
        out.pop()  # zero-length event at the very end
    if not out or out[0][0] > 0:
        out.insert(0, (0, "_"))
    return out


_LIBC = ctypes.CDLL(None)  # the process's C library (srand/rand)
_LIBC.srand.argtypes = [ctypes.c_uint]
_LIBC.srand.restype = None


def synthesize(text: str, voice: Voice, *, ssml: bool = False, seed: int = 0) -> Synthesis:
    """Speak ``text`` with ``voice`` in a fresh library instance with seeded random generators: the result
    depends on (text, voice, seed) only."""
    with Espeak() as e:
        e.seed(seed)
        return e.synthesize(text, voice, ssml=ssml)
