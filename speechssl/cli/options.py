"""Range checks of numeric command-line options, run by each verb before any work (floor 0: imports only
``speechssl.errors``, so ``--help`` stays fast).

Each check raises a one-line :class:`~speechssl.errors.UserError` naming the option, the rule and the value given,
e.g. ``--k must be >= 1, got 0``. ``None`` (an option left out) always passes. NaN fails every check.
"""

from __future__ import annotations

import math

from speechssl.errors import UserError

__all__ = ["at_least", "positive", "non_negative", "finite", "fraction"]


def _fail(option: str, rule: str, value) -> UserError:
    return UserError(f"{option} must be {rule}, got {value:g}" if isinstance(value, float)
                     else f"{option} must be {rule}, got {value}")


def at_least(option: str, value: int | float | None, low: int) -> None:
    """An integer count: ``value >= low`` (``--k``, ``--niter``, ``--workers`` ...)."""
    if value is not None and not value >= low:
        raise _fail(option, f">= {low}", value)


def positive(option: str, value: float | None) -> None:
    """A finite amount above 0 (seconds, minutes, learning rates)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise _fail(option, "> 0", value)


def non_negative(option: str, value: float | None) -> None:
    """A finite amount of at least 0."""
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise _fail(option, ">= 0", value)


def finite(option: str, value: float | None) -> None:
    """Any finite number (weights, scores)."""
    if value is not None and not math.isfinite(value):
        raise _fail(option, "a finite number", value)


def fraction(option: str, value: float | None) -> None:
    """A fraction in (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise _fail(option, "in (0, 1]", value)
