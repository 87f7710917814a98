"""A per-stage progress display on stderr, quiet when asked."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    """Prints ``[i/n] stage ... done (1.2 s)`` lines to stderr.

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

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"      {text}", file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        # warnings are always shown, even when progress lines are not
        print(f"slimx: warning: {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        self.index += 1
        label = f"[{self.index}/{self.total}] {name}" + (f" {detail}" if detail else "")
        if self.enabled:
            print(f"{label} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        ok = False
        try:
            yield self
            ok = True
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = round(elapsed, 3)
            if self.enabled:
                state = "done" if ok else "failed"
                print(f"[{self.index}/{self.total}] {name} {state} ({elapsed:.1f} s)",
                      file=self.stream, flush=True)
