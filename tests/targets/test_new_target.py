"""A new target is one file: a throwaway format registered by a plugin module is accepted by `slimx export
--format`, `slimx profile` and the device agent (its job child included), with no other file changed."""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap

import pytest

from slimx.cli import main
from slimx.targets import TARGETS, artifact_suffixes, target_for_path

PLUGIN = "slimx_onnxcopy_plugin"
# the whole target: an ONNX copy under another name, suffix and runner name
PLUGIN_SOURCE = textwrap.dedent('''
    """A throwaway target: the ONNX target's artifact under another name."""
    import os
    from dataclasses import dataclass, field, replace
    from pathlib import Path

    from slimx.targets.base import RunnerInfo, register_target
    from slimx.targets.onnx import OnnxTarget, OrtRunner


    @dataclass(frozen=True)
    class OnnxCopyOptions:
        fuse: bool = True  # the onnx target's own option, shared (one --no-fuse flag)
        note: str | None = field(default=None, metadata={"metavar": "TEXT",
                                                         "help": "onnxcopy: a note written beside the artifact"})


    @register_target
    class OnnxCopyTarget(OnnxTarget):
        name = "onnxcopy"
        suffixes = (".onnxc",)
        options_cls = OnnxCopyOptions
        model_form_suffixes = ()
        runners = (RunnerInfo("onnxcopy-ort", "onnxcopy", "onnxruntime-cpu-fp32", "onnxruntime on a renamed file",
                              make=lambda threads=None: OrtRunner(threads=threads)),)
        default_runner = "onnxcopy-ort"

        def compile(self, program, device, options, out_dir, calib_batches=None):
            artifact = super().compile(program, device, options, out_dir, calib_batches)
            path = Path(out_dir) / "model.onnxc"
            os.replace(artifact.path, path)
            if options.format_options.note:
                (Path(out_dir) / "note.txt").write_text(options.format_options.note)
            return replace(artifact, format=self.name, path=path)
''')


@pytest.fixture
def onnxcopy(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    # the agent's job runs in a child process: it finds the plugin the way a user's would, by environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SLIMX_PLUGINS", PLUGIN)
    importlib.import_module(PLUGIN)
    yield TARGETS.get("onnxcopy")
    TARGETS.remove("onnxcopy")
    sys.modules.pop(PLUGIN, None)


def test_registry_knows_the_new_format(onnxcopy):
    assert target_for_path("x/model.onnxc") is onnxcopy
    assert ".onnxc" in artifact_suffixes(include_model_forms=False)


def test_export_profile_and_agent_accept_the_new_format(onnxcopy, tmp_path, capsys):
    import threading

    from slimx._core.inputs import sample_inputs
    from slimx.devices.agent import Agent, RemoteRunner, serve
    from slimx.targets.base import Artifact

    out = tmp_path / "o"
    code = main(["export", "tests.models:tiny_mlp", "--format", "onnxcopy", "--out", str(out), "--runs", "30",
                 "--warmup", "1", "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out / "model.onnxc").is_file() and not (out / "model.onnx").exists()
    assert report["target"]["format"] == "onnxcopy"
    assert report["parity"]["measured"] and report["parity"]["passed"]
    assert report["parity"]["runtime"] == "onnxruntime"
    assert report["latency"]["kind"] == "measured"

    code = main(["profile", str(out / "model.onnxc"), "--runs", "5", "--warmup", "1", "--json", "-q"])
    latency = json.loads(capsys.readouterr().out)
    assert code == 0 and latency["kind"] == "measured" and latency["runs"] == 5
    code = main(["profile", str(out), "--runs", "5", "--warmup", "1", "--json", "-q"])  # the OUT folder too
    assert code == 0 and json.loads(capsys.readouterr().out)["kind"] == "measured"

    token = "new-target-token-0123456789"
    server = serve(Agent(token, log=lambda _m: None, job_timeout=120), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        runner = RemoteRunner(url, token, "onnxcopy-ort")
        assert "onnxcopy-ort" in runner.info()["runners"]
        specs = onnxcopy.read_inputs(out / "model.onnxc")
        artifact = Artifact("onnxcopy", out / "model.onnxc", specs, [])
        timing = runner.time(artifact, sample_inputs(specs, seed=1), warmup=1, runs=4)
        assert timing.runs == 4 and timing.median_ms > 0
        assert runner.last["outputs"] == [[2, 8]]
    finally:
        server.shutdown()
        server.server_close()


def test_options_of_another_format_are_refused(onnxcopy, tmp_path, capsys):
    code = main(["export", "tests.models:tiny_mlp", "--format", "onnxcopy", "--dla-core", "0",
                 "--out", str(tmp_path / "o"), "-q"])
    assert code == 2
    assert "onnxcopy format takes no such option" in capsys.readouterr().err


def test_a_new_targets_options_are_export_flags(onnxcopy, tmp_path, capsys):
    """The plugin's options class gives `slimx export` its flag: no CLI or config file names it."""
    from slimx.cli import build_parser

    assert "--note" in build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    out = tmp_path / "o"
    code = main(["export", "tests.models:tiny_mlp", "--format", "onnxcopy", "--note", "made by the test", "--no-fuse",
                 "--out", str(out), "--runs", "30", "--warmup", "1", "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (out / "note.txt").read_text() == "made by the test"
    assert report["config"]["note"] == "made by the test" and report["config"]["no_fuse"] is True

    code = main(["export", "tests.models:tiny_mlp", "--format", "onnx", "--note", "x", "--out", str(tmp_path / "p"),
                 "-q"])
    assert code == 2 and "onnx format takes no such option" in capsys.readouterr().err
