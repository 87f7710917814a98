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
    # at once: the staging folder appears before intake, seconds of torch.export and conversion ahead (a tiny
    # model's timed runs take well under a second, so waiting could let the run finish first)
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


def _one_line(err: str, needle: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("slimx: error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err and "error: error:" not in err, err


@pytest.mark.parametrize("args,needle", [
    (["export", "tests.models:tiny_mlp", "--input-shape", "100000000000x8"], "more than one input can hold"),
    (["export", "tests.models:tiny_mlp", "--pass", "lowrank:include=layer["], "not a regular"),
    (["export", "tests.models:tiny_mlp", "--out", "a" * 300], "longer than file systems allow"),
    (["export", "x" * 5000], "model"),
    (["agent", "serve", "--port", "99999", "--token-file", "t"], "is not a TCP port"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").write_text("a-long-enough-token-0123456789")
    assert main(args) == 2
    _one_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


def test_output_folder_problems_are_usage_errors(tmp_path, capsys):
    assert main(["data", "stdlib-text", "--out", str(tmp_path / "missing" / "x.txt")]) == 2
    _one_line(capsys.readouterr().err, "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: nothing to test
            pytest.skip("running as a user who can write to a read-only folder (root)")
        assert main(["export", "tests.models:tiny_mlp", "--out", str(locked / "o"), *FAST]) == 2
        _one_line(capsys.readouterr().err, "is not writable")
    finally:
        locked.chmod(0o700)


def test_eval_of_a_corrupt_report_and_of_bad_data_names_the_right_flag(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{not json")
    assert main(["eval", str(tmp_path), "--against", "tests.models:tiny_mlp", "--data", "x.txt"]) == 2
    _one_line(capsys.readouterr().err, "is not a slimx export report")
    out = tmp_path / "o"
    assert main(["export", "tests.models:tiny_mlp", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--against", "tests.models:tiny_mlp", "--data", str(tmp_path / "nope.npz")]) == 2
    _one_line(capsys.readouterr().err, "--data")


def test_pickled_hf_weights_are_refused_with_the_safe_fix(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert main(["export", f"hf:{folder}", "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    _one_line(err, "never unpickles")
    assert "safe_serialization=True" in err and "weights_only=False" not in err


def test_eval_compares_against_the_model_the_export_started_from(tmp_path, capsys):
    import json

    import numpy as np
    import torch
    from safetensors.torch import save_file

    from tests.models import tiny_mlp

    torch.manual_seed(123)
    other = tiny_mlp()
    for p in other.parameters():
        torch.nn.init.normal_(p)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    out = tmp_path / "o"
    assert main(["export", "tests.models:tiny_mlp", "--weights", str(weights), "--input-shape", "1x16", "--out",
                 str(out), *FAST]) == 0
    data = tmp_path / "d.npz"
    np.savez(data, **{json.loads((out / "report.json").read_text())["model"]["inputs"][0]["name"]:
                      np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)})
    capsys.readouterr()
    # no --against: the export's model and weights, from its report
    assert main(["eval", str(out), "--data", str(data), "--runs", "30", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fidelity"]["cosine_mean"] > 0.9999, "compared with the network that was exported"
    # the export's model with other weights is refused, not reported as a low cosine
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in other.state_dict().items()}, str(wrong))
    assert main(["eval", str(out), "--against", "tests.models:tiny_mlp", "--weights", str(wrong), "--data",
                 str(data)]) == 2
    _one_line(capsys.readouterr().err, "the export was made with")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc (a folder nothing can be created in)")
def test_an_out_that_cannot_be_created_or_dangles_is_one_line(tmp_path, capsys):
    assert main(["export", "tests.models:tiny_mlp", "--out", "/proc/slimx-out", *FAST]) == 2
    _one_line(capsys.readouterr().err, "cannot be created")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "gone")
    assert main(["export", "tests.models:tiny_mlp", "--out", str(link), *FAST]) == 2
    _one_line(capsys.readouterr().err, "which does not exist")


@pytest.mark.parametrize("content,needle", [("{not json", "cannot be read as JSON"),
                                            ("[1, 2]", "is not a slimx export report"),
                                            ('{"schema_version": "9.0", "artifacts": []}', "has schema 9.0")])
@pytest.mark.parametrize("command", [["gate", "--budget-ms", "5"], ["profile"]])
def test_gate_and_profile_on_a_corrupt_or_foreign_report_say_so_in_one_line(tmp_path, capsys, content, needle,
                                                                             command):
    (tmp_path / "report.json").write_text(content)
    assert main([command[0], str(tmp_path), *command[1:]]) == 2
    _one_line(capsys.readouterr().err, needle)


def test_a_text_length_past_the_models_positions_is_refused_not_clamped(tiny_bert_dir, tmp_path, capsys):
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x100000", "--out", str(tmp_path / "o"),
                 *FAST]) == 2
    _one_line(capsys.readouterr().err, "past the model's")
    assert not (tmp_path / "o").exists()


def test_names_longer_than_200_characters_are_shortened_in_the_line(tmp_path, capsys):
    name = "d" * 5000
    assert main(["export", f"hf:{tmp_path / name[:200] / name[:200] / name[:200]}", *FAST]) == 2
    err = capsys.readouterr().err
    _one_line(err, "more]")
    assert len(err.strip()) < 800, len(err)
