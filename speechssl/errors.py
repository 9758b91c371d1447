"""The one error type for problems the user can fix (floor 0: imports nothing of ours).

`UserError` is raised for bad input or options: a missing or malformed file, an utterance whose audio, labels or
alignment cannot be used, an option out of range. Its message is one line that names the file and line, or the
utterance id, and says what to do. The command line prints it as that one line (exit 1; `-v` adds the traceback).
Every other exception is a bug in speechssl or in a library below it, and the command line prints its traceback.

Each room's own error type (`AudioError`, `DataDirError`, `FeatureStoreError`, `LabelError`, `CheckpointError`,
`ConfigError`, ...) is a `UserError`. `UserError` is a `ValueError`, so callers that catch `ValueError` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or options; the message names the file/line or utterance id and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or directory the user named (or a stage should have written) does not exist."""
