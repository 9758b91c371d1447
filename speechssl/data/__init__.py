"""Data layer (floor 2): Kaldi data dirs, their validation and repair, durations, and the lhotse bridge.

The structural checks live in `speechssl.data.kaldi`; `speechssl.data.audio_check` opens the audio (headers, or
every sample) and lists every unusable utterance (`speechssl data validate --audio`).

Imports only `speechssl.audio`. The lhotse bridge lives in `speechssl.data.lhotse_io` and is imported lazily
(lhotse is a heavy import), so ``import speechssl.data`` stays cheap.
"""

from speechssl.data.kaldi import (
    DataDir,
    DataDirError,
    Utterance,
    c_sorted,
    fix_data_dir,
    format_seconds,
    load_utterance,
    read_data_dir,
    subset_data_dir,
    validate_data_dir,
    write_data_dir,
)

__all__ = [
    "DataDir",
    "DataDirError",
    "Utterance",
    "c_sorted",
    "fix_data_dir",
    "format_seconds",
    "load_utterance",
    "read_data_dir",
    "subset_data_dir",
    "validate_data_dir",
    "write_data_dir",
]
