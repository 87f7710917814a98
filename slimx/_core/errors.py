"""Errors that reach the user as one line: what is wrong, why, and how to fix it."""

from __future__ import annotations

import re


class SlimxError(Exception):
    """A failure the CLI turns into one line and an exit code.

    Args:
        what: the thing that is wrong (a path, a model name, an op).
        why: why it is a problem.
        fix: what the user can do about it.
    """

    exit_code = 1

    def __init__(self, what: str, why: str, fix: str = "") -> None:
        self.what, self.why, self.fix = what, why, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.what}: {self.why}"
        if self.fix:
            text += f"; {self.fix}"
        return _LONG.sub(_shorten, " ".join(text.split()))


_LONG = re.compile(r"\S{201,}")


def _shorten(match: re.Match) -> str:
    """A name over 200 characters, cut to its start and end (a 5,000-character path echoed whole buries the line).

    Example:
        >>> len(_shorten(_LONG.search("x" * 5000)))
        157
    """
    word = match.group(0)
    return f"{word[:100]}...[{len(word) - 140} more]...{word[-40:]}"


class UsageError(SlimxError):
    """The user asked for something that cannot be (bad flag, unknown name, bad file): exit 2."""

    exit_code = 2


class SlimxFailure(SlimxError):
    """A valid request that failed while running (export, conversion, parity): exit 1."""

    exit_code = 1


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for a one-line report."""
    lines = [ln for ln in _ANSI.sub("", str(exc)).strip().splitlines() if ln.strip()]
    return lines[0].strip()[:limit] if lines else type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain, where the real reason usually is.

    An explicit cause (``raise ... from err``) is followed; an implicit context only when it was not
    suppressed: ``raise X from None`` inside a handler means X replaces what was being handled (an
    ``inspect`` binding error raised while handling a ``StopIteration`` is the error, not the latter).

    Example:
        >>> try:
        ...     try:
        ...         next(iter(()))
        ...     except StopIteration:
        ...         raise TypeError("missing a required argument: 'x'") from None
        ... except TypeError as exc:
        ...     type(root_cause(exc)).__name__
        'TypeError'
    """
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def exception_chain(exc: BaseException, limit: int = 6) -> list[BaseException]:
    """``exc`` and the exceptions behind it (causes and contexts), outermost first, at most ``limit``."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < limit and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a timeout, a cancelled CI job, a closed terminal): unwinds like
    KeyboardInterrupt, so every ``finally`` and ``except BaseException`` cleanup runs, then exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


RECEIVED: list[int] = []  # termination signals received while ``terminate_on_signals`` was active


def terminate_on_signals():
    """A context manager: SIGTERM and SIGHUP raise ``Terminated`` in the main thread while it is active
    (elsewhere, or where a signal cannot be set, nothing changes); the previous handlers come back after."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def handlers():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        def raise_terminated(signum, _frame):
            RECEIVED.append(signum)  # a library may wrap the exception; the signal is remembered regardless
            raise Terminated(signum)

        RECEIVED.clear()

        saved = {}
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                saved[sig] = signal.signal(sig, raise_terminated)
        try:
            yield
        finally:
            for sig, old in saved.items():
                signal.signal(sig, old)

    return handlers()
