"""The slimx command: every MODEL form end to end, and every bad input as one line with its exit code."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimx.cli import main
from tests.models import TinyMLP

FAST = ["--runs", "30", "--warmup", "1", "-q"]
SCHEMA_KEYS = {"schema_version", "model", "device", "target", "artifacts", "parity", "latency", "passes", "versions"}


def export(capsys, *args):
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "report.json").read_text())


def assert_one_line_error(err: str, *needles: str):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("slimx: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_clean(out_dir: Path):
    """A failed run leaves no folder it created and no staging or partial file."""
    if out_dir.exists():
        leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers


# --------------------------------------------------------------------------- MODEL forms


def test_factory_model(tmp_path, capsys):
    code, out, _ = export(capsys, "tests.models:tiny_mlp", "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, out
    rep = report_of(tmp_path / "o")
    assert SCHEMA_KEYS <= set(rep) and rep["schema_version"] == "1.0"
    assert rep["model"]["params"] == 16 * 32 + 32 + 32 * 8 + 8
    assert rep["model"]["macs"] == 2 * (16 * 32 + 32 * 8)
    assert rep["artifacts"] == [{"format": "onnx", "path": "model.onnx", "bytes": rep["artifacts"][0]["bytes"]}]
    assert rep["compile"]["opset"] == 18 and rep["target"]["precision"] == "fp32"
    assert rep["parity"]["passed"] and rep["parity"]["n_inputs"] == 8 and rep["parity"]["cosine"] > 0.9999
    lat = rep["latency"]
    assert lat["device"] == "host" and lat["kind"] == "measured" and lat["runs"] == 30
    assert lat["median_ms"] > 0 and lat["p90_ms"] >= lat["median_ms"] and lat["threads"] >= 1 and lat["per_op"]
    assert rep["versions"]["onnxruntime"] and rep["versions"]["torch"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.onnx", "report.html", "report.json"]
    assert "parity    PASS" in out and "median" in out


def test_timm_model_with_input_shape_and_bn_folding(tmp_path, capsys):
    code, _, err = export(capsys, "timm:test_efficientnet", "--input-shape", "1x3x96x96", "--out",
                          str(tmp_path / "o"), *FAST)
    assert code == 0, err
    rep = report_of(tmp_path / "o")
    assert rep["model"]["inputs"][0]["shape"] == [1, 3, 96, 96]
    assert len(rep["deploy"]["bn_folded"]) > 5 and rep["deploy"]["vs_original"]["cosine"] > 0.9999
    assert rep["parity"]["passed"]


def test_hf_dir_with_text_calibration(tmp_path, capsys, tiny_st_dir):
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat\nthe dog runs fast\na small phone\n")
    code, _, err = export(capsys, f"hf:{tiny_st_dir}", "--input-shape", "1x16", "--calib", str(text),
                          "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, err
    rep = report_of(tmp_path / "o")
    assert rep["model"]["outputs"] == ["embedding"]
    assert rep["parity"]["calibration"]["n_inputs"] == 3 and rep["parity"]["calibration"]["passed"]


def test_text_past_the_longest_sequence_needs_truncate(tmp_path, capsys, tiny_st_dir):
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat\n" + " ".join(["dog"] * 40) + "\n")
    args = ("--input-shape", "1x16", "--seq-len", "1..32", "--calib", str(text), "--out", str(tmp_path / "o"), *FAST)
    code, _, err = export(capsys, f"hf:{tiny_st_dir}", *args)
    assert code == 2 and "line 2 has 42 tokens, more than the 32" in err and "--truncate" in err, err
    assert not (tmp_path / "o").exists(), "a refused run leaves no folder"
    code, _, err = export(capsys, f"hf:{tiny_st_dir}", *args, "--truncate")
    assert code == 0, err
    assert report_of(tmp_path / "o")["config"]["truncate"] is True
    assert main(["eval", str(tmp_path / "o"), "--data", str(text), "--runs", "30"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "o"), "--data", str(text), "--runs", "30", "--truncate"]) == 0


def test_pt2_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    torch.export.save(torch.export.export(model, model.example_inputs()), str(tmp_path / "m.pt2"))
    code, _, err = export(capsys, str(tmp_path / "m.pt2"), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, err
    rep = report_of(tmp_path / "o")
    assert rep["model"]["source"] == "pt2" and rep["parity"]["passed"]


def test_onnx_model_starts_after_export(tmp_path, capsys):
    code, _, _ = export(capsys, "tests.models:tiny_mlp", "--out", str(tmp_path / "a"), *FAST)
    assert code == 0
    code, out, err = export(capsys, str(tmp_path / "a" / "model.onnx"), "--out", str(tmp_path / "b"), *FAST)
    assert code == 0, err
    rep = report_of(tmp_path / "b")
    assert rep["parity"] == {"measured": False,
                             "reason": "the input was ONNX: there is no PyTorch model to compare against"}
    assert rep["latency"]["kind"] == "measured"
    assert rep["model"]["params"] == report_of(tmp_path / "a")["model"]["params"]
    assert "not measured" in out


def test_onnx_input_cannot_feed_a_pytorch_converter(tmp_path, capsys):
    assert export(capsys, "tests.models:tiny_mlp", "--out", str(tmp_path / "a"), *FAST)[0] == 0
    code, _, err = export(capsys, str(tmp_path / "a" / "model.onnx"), "--target", "pixel7", "--out",
                          str(tmp_path / "b"), *FAST)
    assert code == 2
    assert_one_line_error(err, "converts from the PyTorch program")
    code, _, err = export(capsys, str(tmp_path / "a" / "model.onnx"), "--pass", "lowrank", "--out",
                          str(tmp_path / "c"), *FAST)
    assert code == 2
    assert_one_line_error(err, "compression passes change a PyTorch model")


def test_json_flag_prints_the_report(tmp_path, capsys):
    code, out, _ = export(capsys, "tests.models:tiny_mlp", "--out", str(tmp_path / "o"), "--json", *FAST)
    assert code == 0
    assert json.loads(out) == report_of(tmp_path / "o")


def test_non_host_target_is_estimated_and_says_so(tmp_path, capsys):
    code, out, err = export(capsys, "tests.models:tiny_mlp", "--target", "iphone12", "--format", "onnx",
                            "--out", str(tmp_path / "o"), *FAST[:-1])
    assert code == 0, err
    rep = report_of(tmp_path / "o")
    lat = rep["latency"]
    assert lat["device"] == "iphone12" and lat["measured"] is False and lat["kind"] == "estimated"
    assert lat["label"].startswith("estimated for Apple iPhone 12") and "no iphone12 is attached" in lat["not_measured"]
    assert lat["total_ms"] > 0 and lat["per_op"] and lat["expected_error_pct"] is not None
    assert "iphone12 estimated:" in out
    assert rep["host_latency"]["kind"] == "measured"


def test_rerun_replaces_files_in_place(tmp_path, capsys):
    out_dir = tmp_path / "o"
    for _ in range(2):
        assert export(capsys, "tests.models:tiny_mlp", "--out", str(out_dir), *FAST)[0] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "report.html", "report.json"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,code,needles", [
    (["nosuchmodel"], 2, ["model 'nosuchmodel'", "minilm, timm:NAME"]),
    (["timm:no_such_net"], 2, ["timm's registry"]),
    (["tests.models:tiny_mlp", "--target", "iphone99"], 2, ["unknown device 'iphone99'"]),
    (["tests.models:tiny_mlp", "--format", "tfjs"], 2, ["unknown format 'tfjs'"]),
    (["tests.models:tiny_mlp", "--target", "jetson-orin-nano", "--precision", "int8-weights"], 2,
     ["TensorRT has no weight-only int8"]),
    (["tests.models:tiny_mlp", "--target", "iphone12", "--precision", "int8"], 2, ["cannot quantize activations"]),
    (["tests.models:tiny_mlp", "--target", "iphone12", "--deployment-target", "fourteen"], 2, ["not an iOS version"]),
    (["tests.models:tiny_mlp", "--target", "iphone15pro", "--deployment-target", "iOS15", "--precision",
      "int8-weights"], 2, ["need iOS 16 or later"]),
    (["tests.models:tiny_mlp", "--input-shape", "1x15"], 2, ["do not fit the model", "--input-shape"]),
    (["tests.models:tiny_mlp", "--input-shape", "1xq"], 2, ["is not a shape"]),
    (["tests.models:tiny_mlp", "--runs", "5"], 2, ["--runs"]),
    (["tests.models:eigh_model"], 1, ["aten._linalg_eigh", "Eigh", "onnx format cannot express it"]),
    (["tests.models:data_dependent"], 1, ["torch.export", "models.py"]),
    (["tests.models:tiny_no_examples"], 2, ["no example inputs", "--input-shape"]),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, code, needles):
    out_dir = tmp_path / "o"
    got, _, err = export(capsys, *FAST, *args, "--out", str(out_dir))  # args last: they override FAST
    assert got == code, err
    assert_one_line_error(err, *needles)
    assert not out_dir.exists(), "a failed run leaves no folder behind"


@pytest.mark.parametrize("name,content,needle", [
    ("missing.onnx", None, "no such file"),
    ("bad.onnx", b"\x08\x01garbage", "not a valid ONNX model"),
    ("missing.pt2", None, "no such file"),
    ("bad.pt2", b"PK\x03\x04broken", "not a torch.export archive"),
])
def test_missing_or_corrupt_model_files(tmp_path, capsys, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, _, err = export(capsys, str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2
    assert_one_line_error(err, needle)


@pytest.mark.parametrize("name,content,needle", [
    ("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a readable safetensors file"),
    ("w.pt", b"\x00\x01\x02 not a pickle", "not a readable torch checkpoint"),
    ("nope.safetensors", None, "no such file"),
])
def test_bad_weights(tmp_path, capsys, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, _, err = export(capsys, "tests.models:tiny_mlp", "--weights", str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2
    assert_one_line_error(err, needle)


def test_weights_report_keys(tmp_path, capsys):
    state = TinyMLP().state_dict()
    state.pop("fc2.bias")
    save_file(state, str(tmp_path / "w.safetensors"))
    code, _, _ = export(capsys, "tests.models:tiny_mlp", "--weights", str(tmp_path / "w.safetensors"),
                        "--out", str(tmp_path / "o"), *FAST)
    assert code == 0
    assert report_of(tmp_path / "o")["model"]["weights"]["missing"] == ["fc2.bias"]


def test_failed_run_keeps_an_existing_folder_clean(tmp_path, capsys):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("user file")
    code, _, _ = export(capsys, "tests.models:eigh_model", "--out", str(out_dir), *FAST)
    assert code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]


def test_parity_past_tolerance_fails_but_keeps_the_evidence(tmp_path, capsys):
    # a relative-error ceiling that no float path can meet fails the run
    code, _, err = export(capsys, "tests.models:tiny_mlp", "--max-rel-err", "1e-12", "--out", str(tmp_path / "o"),
                          *FAST)
    assert code == 1
    assert_one_line_error(err, "past the tolerance", "report.json")
    assert report_of(tmp_path / "o")["parity"]["passed"] is False


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--no-such-flag"])
    assert info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "unrecognized arguments")


def test_debug_shows_the_traceback(tmp_path):
    from slimx._core.errors import UsageError

    with pytest.raises(UsageError):
        main(["export", "nosuchmodel", "--debug", "--out", str(tmp_path / "o")])
    with pytest.raises(UsageError):  # before the command too
        main(["--debug", "export", "nosuchmodel", "--out", str(tmp_path / "o")])


def test_console_script_exit_code_and_stderr(tmp_path):
    exe = shutil.which("slimx", path=str(Path(sys.executable).parent))
    assert exe, "the slimx console script is installed beside python"
    proc = subprocess.run([exe, "export", "nosuchmodel", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "nosuchmodel")


# --------------------------------------------------------------------------- devices


def test_devices_table_and_show(capsys):
    assert main(["devices"]) == 0
    table = capsys.readouterr().out
    for name in ("host", "iphone12", "iphone15pro", "pixel7", "jetson-orin-nano", "jetson-agx-orin",
                 "jetson-xavier-nx", "raspberry-pi-5"):
        assert f"\n{name} " in table
    assert main(["devices", "show", "iphone12"]) == 0
    shown = capsys.readouterr().out
    assert "16-core Neural Engine" in shown and "11 trillion" in shown
    assert main(["devices", "show", "jetson-orin-nano", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default_format"] == "tensorrt"
    assert main(["devices", "show", "nope"]) == 2
    assert_one_line_error(capsys.readouterr().err, "unknown device")


@pytest.mark.parametrize("args,needles", [
    (["tests.models:sort_model", "--target", "pixel7"],
     ["aten.sort", "SortTokens", "tflite format cannot express"]),
    (["tests.models:eigh_model", "--target", "iphone12"],
     ["aten._linalg_eigh", "Eigh", "coreml format cannot express"]),
])
def test_op_a_format_cannot_express(tmp_path, capsys, args, needles):
    out_dir = tmp_path / "o"
    code, _, err = export(capsys, *FAST, *args, "--out", str(out_dir))
    assert code == 1
    assert_one_line_error(err, *needles, "--format")
    assert not out_dir.exists()


def test_compression_pass_end_to_end(tmp_path, capsys, tiny_st_dir):
    from slimx.export.textdata import stdlib_sentences

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(stdlib_sentences(24)))
    code, _, err = export(capsys, f"hf:{tiny_st_dir}", "--input-shape", "1x16", "--calib", str(text),
                            "--calib-samples", "24", "--pass", "lowrank:rank_ratio=0.25,min_features=16",
                            "--recover", "steps=20,lr=1e-3", "--min-fidelity", "0.5", "--out", str(tmp_path / "o"),
                            *FAST)
    assert code == 0, err
    rep = report_of(tmp_path / "o")
    (entry,) = rep["passes"]
    assert entry["name"] == "lowrank" and entry["summary"]["factorized"] > 0
    assert all("rank" in layer or "skipped" in layer for layer in entry["layers"])
    comp = rep["compression"]
    assert comp["calibration"]["synthetic"] is False and comp["calibration"]["heldout_samples"] == 6
    assert "after_recover" in comp["fidelity"] and comp["recover"]["steps_run"] >= 10
    assert comp["speedup"]["measured"] and comp["speedup"]["ratio"] > 0
    on_data = comp["speedup"]["on_data"]  # the headline speed-up is at the data's real lengths
    assert on_data["ratio"] == comp["speedup"]["ratio"] and comp["speedup"]["at_export_shape"]["ratio"] > 0
    assert rep["model"]["params"] < rep["model"]["original"]["params"]
    assert '[[pass]]\nname = "lowrank"' in comp["recipe"]

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(stdlib_sentences(12, offset=500)))
    assert main(["eval", str(tmp_path / "o"), "--against", f"hf:{tiny_st_dir}", "--data", str(heldout),
                 "--runs", "30", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fidelity"]["samples"] == 12 and 0 < result["fidelity"]["cosine_mean"] <= 1
    assert "nn_agreement" in result["fidelity"] and result["latency"]["ratio"] > 0
    assert result["latency"]["runtime"] == "onnxruntime" and "real length" in result["latency"]["method"]


def test_fidelity_is_gated_like_parity(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    args = ("tests.models:tiny_mlp", "--input-shape", "1x16", "--calib", str(tmp_path / "data.npz"), "--pass",
            "lowrank:rank_ratio=0.1,min_features=8,multiple=1", "--out", str(tmp_path / "o"), *FAST)
    code, out, err = export(capsys, *args, "--min-fidelity", "0.9999")
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert "fidelity of the compressed model" in line and "below --min-fidelity 0.9999" in line
    assert "lowrank lost the most" in line and "rank_ratio" in line and "--recover" in line
    rep = report_of(tmp_path / "o")  # the report is kept
    gate = rep["compression"]["gate"]
    assert gate["passed"] is False and gate["floor"] == 0.9999 and gate["lost_most"]["pass"] == "lowrank"
    assert gate["value"] < 0.999
    assert rep["compression"]["calibration"]["fit_samples"] + rep["compression"]["calibration"][
        "heldout_samples"] == 40, "with a pass, all the calibration data is used (up to 1024), not 16"
    code, out, err = export(capsys, *args, "--min-fidelity", "0.05")
    assert code == 0, err
    assert "fidelity  PASS held-out cosine" in out and "(floor 0.05)" in out


def test_fidelity_with_labels_is_accuracy(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    from tests.models import tiny_mlp

    with torch.no_grad():  # labels the model gets right: accuracy starts at 1.0
        labels = tiny_mlp()(torch.from_numpy(x)).argmax(1).tolist()
    (tmp_path / "labels.txt").write_text(" ".join(map(str, labels)))
    args = ("tests.models:tiny_mlp", "--input-shape", "1x16", "--calib", str(tmp_path / "data.npz"), "--labels",
            str(tmp_path / "labels.txt"),
            "--pass", "lowrank:rank_ratio=0.1,min_features=8,multiple=1", "--out", str(tmp_path / "o"), *FAST)
    code, out, err = export(capsys, *args, "--max-accuracy-drop", "100")
    assert code == 0, err
    gate = report_of(tmp_path / "o")["compression"]["gate"]
    assert gate["metric"].startswith("held-out accuracy") and gate["accuracy_reference"] == 1.0
    assert "held-out accuracy" in out
    (tmp_path / "short.txt").write_text("1 2 3")
    code, _, err = export(capsys, *args[:-len(FAST) - 2], "--labels", str(tmp_path / "short.txt"), "--out",
                          str(tmp_path / "p"), *FAST)
    assert code == 2 and "has 3 labels for the 40 samples" in err


def test_passes_without_calib_run_on_a_few_synthetic_inputs_and_are_not_gated(tmp_path, capsys):
    code, _, err = export(capsys, "tests.models:tiny_mlp", "--input-shape", "1x16", "--pass",
                          "lowrank:rank_ratio=0.5,min_features=8,multiple=1", "--out", str(tmp_path / "o"), *FAST)
    assert code == 0 and "SYNTHETIC" in err
    comp = report_of(tmp_path / "o")["compression"]
    assert comp["calibration"]["synthetic"] is True and comp["gate"]["gated"] is False
    assert comp["calibration"]["fit_samples"] + comp["calibration"]["heldout_samples"] == 64, "not the 1024 cap"


def test_eval_needs_an_export_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--against", "minilm", "--data", str(tmp_path / "x.txt")]) == 2
    assert_one_line_error(capsys.readouterr().err, "has no report.json")


def test_recover_without_a_pass_is_refused(tmp_path, capsys):
    code, _, err = export(capsys, "tests.models:tiny_mlp", "--recover", "steps=5", "--out", str(tmp_path / "o"),
                          *FAST)
    assert code == 2
    assert_one_line_error(err, "--recover", "--pass")
