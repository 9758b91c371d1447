"""Progress bars that read well on a terminal and in a log file (floor 0: imports only ``speechssl.errors``).

:func:`progress_bar` is what every long loop of speechssl uses instead of ``tqdm(...)``; it takes tqdm's arguments and
returns a tqdm object (``update``, ``set_postfix``, ``set_description``, ``close``, ``with``, iteration).

- **stderr is a terminal**: plain tqdm, redrawn in place as usual.
- **stderr is not a terminal** (``speechssl ... > log 2>&1``, a batch job): no carriage-return frames. One plain
  line at most every ``SPEECHSSL_PROGRESS_INTERVAL`` seconds (default 60; ``0`` turns the periodic lines off) and
  one final line when the bar closes, e.g.::

      features shard 0/1: 1200/5000 utt (24%), 41.3 utt/s, elapsed 00:29, eta 01:32, loss=3.21

  The rate is the one since the previous line (the whole run's average on the final line).
- ``SPEECHSSL_PROGRESS=0`` (or ``off``), or ``disable=True``: nothing at all. ``SPEECHSSL_PROGRESS=lines`` forces the
  line form on a terminal, ``SPEECHSSL_PROGRESS=bar`` forces tqdm's bar into a file.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Iterable

from tqdm import tqdm

from speechssl.errors import UserError

__all__ = ["progress_bar", "LineProgress", "progress_interval", "DEFAULT_INTERVAL"]

DEFAULT_INTERVAL = 60.0  # seconds between two lines of a bar in a log


def progress_interval() -> float:
    """Seconds between two lines of a bar when stderr is not a terminal (``$SPEECHSSL_PROGRESS_INTERVAL``)."""
    raw = os.environ.get("SPEECHSSL_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"SPEECHSSL_PROGRESS_INTERVAL={raw!r}: expected seconds (e.g. 60; 0 = no periodic lines)")
    if not value >= 0:  # also NaN
        raise UserError(f"SPEECHSSL_PROGRESS_INTERVAL={raw!r}: expected seconds >= 0")
    return value


class _Sink:
    """Where tqdm's own drawing goes in line mode: nowhere (so no '\\r', no cursor moves, no bare newlines)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


class LineProgress(tqdm):
    """tqdm that writes whole lines to ``file`` at most every ``interval`` seconds, plus one on close.

    tqdm's counting, rate and postfix logic is untouched; only its drawing is replaced (:meth:`display`,
    :meth:`clear`, :meth:`moveto` and tqdm's file, which becomes a sink).
    """

    def __init__(self, *args: Any, interval: float = DEFAULT_INTERVAL, file: Any = None, **kw: Any) -> None:
        # Set before tqdm's __init__, which calls display() once.
        self._out = file if file is not None else sys.stderr
        self._interval = float(interval)
        self._line_t = time.monotonic()
        self._line_n: float | None = None
        kw["dynamic_ncols"] = False
        kw.pop("position", None)  # no screen positions in a log
        if self._interval > 0:
            kw["mininterval"] = min(float(kw.get("mininterval", 0.1)), self._interval)
        super().__init__(*args, file=_Sink(), **kw)
        self._line_n = self.n

    # --- drawing -----------------------------------------------------------------------------------------------
    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None or self.disable or self._interval <= 0:  # msg="" is tqdm clearing the bar
            return True
        now = time.monotonic()
        if now - self._line_t >= self._interval:
            self._write(now, final=False)
        return True

    def clear(self, nolock: bool = False) -> None:
        pass

    def moveto(self, n: int) -> None:
        pass

    def close(self) -> None:
        if not getattr(self, "disable", True) and hasattr(self, "_out"):
            self._write(time.monotonic(), final=True)
        super().close()

    # --- the line ----------------------------------------------------------------------------------------------
    def _num(self, x: float) -> str:
        if self.unit_scale:
            return self.format_sizeof(x * (1 if self.unit_scale is True else self.unit_scale),
                                      divisor=self.unit_divisor)
        if isinstance(x, float) and not x.is_integer():
            return f"{x:.1f}"
        return str(int(x))

    def _rate(self, rate: float | None) -> str:
        unit = self.unit
        if not rate:
            return f"? {unit}/s"
        if self.unit_scale:
            return f"{self._num(rate)} {unit}/s"
        if rate >= 100:
            return f"{rate:.0f} {unit}/s"
        return f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}"

    def line(self, now: float | None = None, *, final: bool = False) -> str:
        """The text of one log line (without newline) for the bar's current state."""
        now = time.monotonic() if now is None else now
        elapsed = self._time() - self.start_t
        n, total = self.n, self.total
        if final or self._line_n is None:
            dn, dt = n - self.initial, elapsed
        else:
            dn, dt = n - self._line_n, now - self._line_t
        rate = dn / dt if dt > 0 and dn > 0 else None
        parts = []
        if total:
            pct = 100.0 * n / total
            parts.append(f"{self._num(n)}/{self._num(total)} {self.unit} ({pct:.0f}%)")
        else:
            parts.append(f"{self._num(n)} {self.unit}")
        parts.append(self._rate(rate))
        parts.append(f"elapsed {self.format_interval(elapsed)}")
        if not final and total and rate and n < total:
            parts.append(f"eta {self.format_interval((total - n) / rate)}")
        if self.postfix:
            parts.append(str(self.postfix).lstrip(", "))
        desc = (self.desc or "").rstrip(": ")
        return (f"{desc}: " if desc else "") + ", ".join(parts)

    _write_lock = threading.Lock()  # tqdm's monitor thread may refresh while the loop updates

    def _write(self, now: float, *, final: bool) -> None:
        with self._write_lock:
            if not final and now - self._line_t < self._interval:  # the other thread just wrote it
                return
            text = self.line(now, final=final)
            self._line_t, self._line_n = now, self.n
            try:
                self._out.write(text + "\n")
                getattr(self._out, "flush", lambda: None)()
            except ValueError:  # stream closed at interpreter exit
                pass


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", disable: bool = False, initial: float = 0, **kw: Any) -> tqdm:
    """A progress bar (tqdm's arguments); lines instead of redraws when stderr is not a terminal (module docstring)."""
    mode = os.environ.get("SPEECHSSL_PROGRESS", "").strip().lower()
    if mode in ("0", "off", "false", "no", "none"):
        disable = True
    file = kw.get("file")
    lines = mode == "lines" or (mode != "bar" and not _is_tty(file if file is not None else sys.stderr))
    if lines and not disable:
        return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=False, initial=initial,
                            interval=progress_interval(), **kw)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, **kw)
