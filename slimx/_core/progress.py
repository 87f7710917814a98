"""A per-stage progress display on stderr that never surrounds an error line.

On a terminal the running stage shows as one line that is rewritten when it ends (and cleared if it
fails, so the error stands alone); inside it, long work with steps shows a count, a rate and an ETA (``tick``),
and a single long call (a converter that reports nothing) its elapsed time, once a second. Off a terminal (logs,
CI) only finished stages are printed.
"""

from __future__ import annotations

import sys
import threading
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
        self._started: dict[str, float] = {}
        self._last_tick = 0.0
        self._lock = threading.Lock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()

    def _heartbeat(self, line: str, start: float, stop: threading.Event) -> None:
        """While a stage runs on a terminal: its elapsed time, each second no ``tick`` has shown anything."""
        while not stop.wait(1.0):
            now = time.perf_counter()
            with self._lock:  # checked under the lock: nothing is written once the stage has ended
                if not stop.is_set() and self._open == line and now - self._last_tick >= 1.0:
                    self.stream.write(f"{_CLEAR}{line} {_clock(now - start)}")
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

    def tick(self, label: str, done: int, total: int, detail: str = "") -> None:
        """Progress inside a long step (distillation steps, search rounds, timing rounds, sweep trials): on a
        terminal the running stage's line shows ``label done/total``, the rate and an ETA (rewritten at most ten
        times a second, and at the end); in logs and CI nothing (the stage's finished line says what it did).

        Example:
            >>> p = Progress(total=1, enabled=False)
            >>> p.tick("recover", 1, 100)
            >>> p.eta("recover", 1, 100) is not None
            True
        """
        now = time.perf_counter()
        start = self._started.setdefault(label, now)
        if done <= 1 and now - start > 1.0:  # the same label starting over (a second distillation)
            self._started[label] = start = now
        if not (self.enabled and self.tty) or (done < total and now - self._last_tick < 0.1):
            return
        self._last_tick = now
        eta = self.eta(label, done, total)
        rate = done / (now - start) if now > start and done else 0.0
        speed = f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s each" if rate else "-"
        text = f"{label} {done}/{total} ({speed}, ETA {_clock(eta)})" + (f" {detail}" if detail else "")
        head = (self._open or "").removesuffix(" ...")
        self._write(_CLEAR + (f"{head} ... {text}" if head else text)[:200])
        if done >= total:
            self._started.pop(label, None)
            if not head:
                self._write("\n")

    def eta(self, label: str, done: int, total: int) -> float | None:
        """Seconds left for ``label`` at the rate so far, or None before anything is done."""
        start = self._started.get(label)
        if start is None or done <= 0:
            return None
        return (time.perf_counter() - start) / done * max(0, total - done)

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        self.index += 1
        label = f"[{self.index}/{self.total}] {name}" + (f" {detail}" if detail else "")
        self._notes = []
        if self.enabled and self.tty:
            self._open = f"{label} ..."
            self._write(self._open)
        start = time.perf_counter()
        stop = threading.Event()
        if self.enabled and self.tty:
            threading.Thread(target=self._heartbeat, args=(self._open, start, stop), daemon=True).start()
        ok = False
        try:
            yield self
            ok = True
        finally:
            stop.set()
            elapsed = time.perf_counter() - start
            self.timings[name] = round(elapsed, 3)
            if self.enabled:
                if self.tty:
                    self._write(_CLEAR)
                if ok:
                    lines = [f"{label} done ({elapsed:.1f} s)", *(f"      {n}" for n in self._notes)]
                    self._write("\n".join(lines) + "\n")
            self._open = None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
