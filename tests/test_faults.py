"""Output survives every way a run can end (issue 16, part 1): SIGTERM/SIGHUP mid-export leave OUT clean, a
killed run's staging folder is removed by the next run, a failed run leaves no folder it created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimx.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--runs", "30", "--warmup", "1", "-q"]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_mid_export_leaves_the_output_folder_clean(tmp_path, sig, code):
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "from slimx.cli import main; raise SystemExit(main())", "export",
                             "tests.models:tiny_vit_block", "--out", str(out), "--runs", "2000", "--warmup", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".slimx-staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be signalled"
    time.sleep(0.5)  # well inside the run (2000 timed runs), so the signal lands mid-work
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"terminated by {sig.name}" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_a_killed_runs_staging_is_removed_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "o"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that is no longer running
    stale = out / f".slimx-staging-{gone.pid}"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    assert main(["export", "tests.models:tiny_mlp", "--out", str(out), "--runs", "30", "--warmup", "1"]) == 0
    assert not stale.exists() and (out / "model.onnx").is_file()
    assert f"removed {stale.name}" in capsys.readouterr().err


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "tests.models:sort_model", "--format", "tflite", *FAST]) == 1  # does not load in LiteRT
    assert "slimx: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "the default ./out/MODEL-DEVICE and ./out/ are both gone"


@pytest.mark.parametrize("args,needle", [
    (["--opset", "3"], "outside the opsets onnx"),
    (["--opset", "99"], "outside the opsets onnx"),
    (["--opset", "17", "--format", "tflite"], "not written through ONNX"),
])
def test_opset_flags_that_cannot_be_honoured_are_refused(tmp_path, capsys, args, needle):
    assert main(["export", "tests.models:tiny_mlp", *args, "--out", str(tmp_path / "o"), *FAST]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_opset_asked_for_is_the_opset_written(tmp_path, capsys):
    import json

    import onnx

    out = tmp_path / "o"
    assert main(["export", "tests.models:tiny_mlp", "--opset", "17", "--out", str(out), *FAST]) == 0
    written = next(o.version for o in onnx.load(str(out / "model.onnx")).opset_import if o.domain in ("", "ai.onnx"))
    assert written == 17 and json.loads((out / "report.json").read_text())["target"]["opset"] == 17
