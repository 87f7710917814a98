"""Progress lines: finished stages in logs, a rewritten line with counts, rate, ETA and elapsed time on a terminal."""

from __future__ import annotations

import io
import re
import time

import pytest

from slimx._core.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_only_finished_stages_and_their_notes_are_printed():
    log = io.StringIO()
    p = Progress(total=2, stream=log)
    with p.stage("compile", "tflite"):
        p.tick("steps", 5, 10)
        p.note("int8 weights")
    assert log.getvalue().startswith("[1/2] compile tflite done (")
    assert log.getvalue().endswith("      int8 weights\n") and "5/10" not in log.getvalue()


@pytest.mark.timing
def test_on_a_terminal_ticks_show_the_count_rate_and_eta():
    term = _Terminal()
    p = Progress(total=1, stream=term)
    with p.stage("recover"):
        p.tick("distill", 1, 4)
        time.sleep(0.15)
        p.tick("distill", 2, 4)
    text = term.getvalue()
    assert "[1/1] recover ... distill 2/4 (" in text and "ETA 0:00" in text
    assert re.search(r"\[1/1\] recover done \(0\.\d s\)\n$", text)


@pytest.mark.timing
def test_a_long_call_without_ticks_shows_its_elapsed_time_and_nothing_after_the_stage():
    term = _Terminal()
    p = Progress(total=1, stream=term)
    with p.stage("compile", "tflite int8"):
        time.sleep(1.3)
    text = term.getvalue()
    assert "[1/1] compile tflite int8 ... 0:01" in text
    time.sleep(1.1)  # the heartbeat has stopped: nothing is written after the finished line
    assert term.getvalue() == text and re.search(r"done \(1\.\d s\)\n$", text)


def test_a_failed_stage_leaves_no_line_for_the_error_to_share():
    term = _Terminal()
    p = Progress(total=1, stream=term)
    with pytest.raises(RuntimeError), p.stage("export"):
        raise RuntimeError("boom")
    assert term.getvalue().endswith("\r\x1b[K") and "done" not in term.getvalue()
