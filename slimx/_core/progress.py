"""A per-stage progress display on stderr that never surrounds an error line.

On a terminal the running stage shows as one line that is rewritten when it ends (and cleared if it
fails, so the error stands alone). Off a terminal (logs, CI) only finished stages are printed.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_CLEAR = "\r\x1b[K"


class Progress:
    """Prints ``[i/n] stage done (1.2 s)`` lines to stderr.

    Example:
        >>> p = Progress(total=1, enabled=False)
        >>> with p.stage("export"):
        ...     pass
        >>> p.timings["export"] >= 0
        True
    """

    def __init__(self, total: int, enabled: bool = True, stream=None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.index = 0
        self.timings: dict[str, float] = {}
        self._open: str | None = None
        self._notes: list[str] = []
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def note(self, text: str) -> None:
        """A detail line under the current stage (shown once the stage ends well)."""
        if self.enabled:
            self._notes.append(text)

    def warn(self, text: str) -> None:
        """Warnings are always shown, even when progress lines are not."""
        if self._open and self.tty:
            self._write(_CLEAR)
        self._write(f"slimx: warning: {text}\n")
        if self._open and self.tty:
            self._write(self._open)

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        self.index += 1
        label = f"[{self.index}/{self.total}] {name}" + (f" {detail}" if detail else "")
        self._notes = []
        if self.enabled and self.tty:
            self._open = f"{label} ..."
            self._write(self._open)
        start = time.perf_counter()
        ok = False
        try:
            yield self
            ok = True
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = round(elapsed, 3)
            if self.enabled:
                if self.tty:
                    self._write(_CLEAR)
                if ok:
                    lines = [f"{label} done ({elapsed:.1f} s)", *(f"      {n}" for n in self._notes)]
                    self._write("\n".join(lines) + "\n")
            self._open = None
