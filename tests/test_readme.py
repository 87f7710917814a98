"""Every Python block of the README's quickstart runs, as a user would paste it (a fresh namespace each)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_two_quickstarts_and_stays_short():
    assert len(BLOCKS) == 2
    assert "slimx.export(model, device" in BLOCKS[0] and "slimx.compress(" in BLOCKS[1]
    assert README.stat().st_size <= 12 * 1024


@pytest.fixture
def _user_temp(tmp_path, monkeypatch):
    """The quickstarts keep their outputs in ``tempfile.mkdtemp()`` folders for the user to look at; here those
    folders are the test's own."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_quickstart_exports_an_inline_module(capsys, _user_temp):
    exec(compile(BLOCKS[0], "README.md quickstart 1", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "pixel7 tflite model.tflite" in out and "iphone12 coreml model.mlpackage" in out
    assert "estimated" in out  # neither phone is here: the latency is the estimate, with its interval


@pytest.mark.slow
def test_quickstart_compresses_minilm_trains_a_step_and_exports(capsys, _user_temp):
    exec(compile(BLOCKS[1], "README.md quickstart 2", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "['lowrank'] held-out cosine" in out and "onnx" in out and "host measured" in out
