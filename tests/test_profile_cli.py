"""slimx profile / devices calibrate / agent from the command line: labelled answers, one-line errors."""

import json
import re
import threading

import pytest

from slimx.cli import main
from tests.test_cli import assert_one_line_error

TOKEN = "cli-loopback-token-0123456789"


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    assert main(["export", "tests.models:tiny_mlp", "--out", str(out), "--runs", "30", "--warmup", "1", "-q"]) == 0
    return out


def test_efficientformer_on_iphone12_is_estimated_near_the_published_figure(capsys):
    # Estimates are for the family's newest measurement setup (Xcode 14's Core ML performance report), where the
    # EfficientFormerV2 paper timed V2-S2 at 1.6 ms on an iPhone 12.
    code, out, _ = run(capsys, "profile", "timm:efficientformerv2_s2", "--device", "iphone12")
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith("estimated for Apple iPhone 12") and "expected error ±" in first
    assert "leave-one-family-out" in first and "80% interval" in first, "the grouped error and its interval"
    assert "Xcode 14" in first, "the setup the estimate is for"
    ms = float(re.search(r": ([0-9.]+) ms", first).group(1))
    assert abs(ms / 1.6 - 1) <= 0.15, f"{ms} ms vs the published 1.6 ms"
    assert "per op class:" in out and "per module:" in out and "stages." in out


def test_an_older_setups_figure_lies_in_the_interval_carried_into_that_setup(capsys):
    # EfficientFormer-L1's published 1.6 ms is from the 2022 setup (coremltools 5.2, coreml-performance app); the
    # profile names that setup's fitted factor, and the interval times it covers the published figure.
    from slimx.devices.registry import PROFILE_DIR

    code, out, _ = run(capsys, "profile", "timm:efficientformer_l1", "--device", "iphone12", "--json")
    assert code == 0
    latency = json.loads(out)
    low, high = latency["interval_ms"]
    assert low < latency["total_ms"] < high
    source = (PROFILE_DIR / "iphone12.toml").read_text()
    factor = float(re.search(r"coremltools 5\.2[^)]*\) x([0-9.]+)", source).group(1))
    assert 1.1 < factor < 2.5, "the 2022 setup timed slower than Xcode 14's report"
    assert low * factor <= 1.6 <= high * factor, (low * factor, high * factor)


def test_host_artifact_is_measured(capsys, tiny_onnx):
    code, out, _ = run(capsys, "profile", str(tiny_onnx), "--device", "host", "--runs", "20", "--json")
    assert code == 0
    latency = json.loads(out)
    assert latency["kind"] == "measured" and latency["label"].startswith("measured on this host")
    assert latency["runtime"] == "onnxruntime" and latency["runs"] == 20 and latency["per_op"]


def test_tflite_artifact_is_measured_in_litert(capsys, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="LiteRT runtime not installed")
    out = tmp_path / "t"
    assert main(["export", "tests.models:tiny_mlp", "--format", "tflite", "--out", str(out), "--runs", "30",
                 "--warmup", "1", "-q"]) == 0
    capsys.readouterr()
    code, text, _ = run(capsys, "profile", str(out / "model.tflite"), "--runs", "10")
    assert code == 0 and text.startswith("measured on this host") and "litert" in text


def test_devices_show_lists_estimator_settings(capsys):
    code, text, _ = run(capsys, "devices", "show", "raspberry-pi-5")
    assert code == 0
    assert "estimator tflite-cpu-fp32 (default): tflite on cpu, fp32; scaled from pixel3" in text


def test_estimate_forced_on_the_host(capsys):
    code, out, _ = run(capsys, "profile", "tests.models:tiny_mlp", "--estimate", "--json")
    assert code == 0
    latency = json.loads(out)
    assert latency["kind"] == "estimated" and latency["device"] == "host" and latency["total_ms"] > 0


def test_a_precision_without_a_setting_is_named(capsys):
    """The TX2 has a TensorRT fp32 setting (its fp32 table); the Nano has none, and its fp16 estimate says so."""
    code, out, _ = run(capsys, "profile", "tests.models:tiny_mlp", "--device", "jetson-tx2", "--precision", "fp32",
                       "--json")
    latency = json.loads(out)
    assert code == 0 and latency["setting"] == "tensorrt-gpu-fp32" and "precision_note" not in latency
    code, out, _ = run(capsys, "profile", "tests.models:tiny_mlp", "--device", "jetson-nano", "--precision", "fp32")
    assert code == 0 and "jetson-nano has no fp32 estimator setting" in out and "tensorrt-gpu-fp16 estimate" in out


def test_measure_refuses_to_estimate(capsys):
    code, _, err = run(capsys, "profile", "tests.models:tiny_mlp", "--device", "iphone12", "--measure")
    assert code == 2
    assert_one_line_error(err, "no runner for that device", "--remote")


def test_artifact_cannot_be_estimated(capsys, tiny_onnx):
    code, _, err = run(capsys, "profile", str(tiny_onnx / "model.onnx"), "--device", "iphone12")
    assert code == 2
    assert_one_line_error(err, "compiled artifact has none")


def test_remote_needs_a_token_and_a_reachable_agent(capsys, tmp_path, tiny_onnx):
    code, _, err = run(capsys, "profile", str(tiny_onnx), "--remote", "http://127.0.0.1:9")
    assert code == 2
    assert_one_line_error(err, "needs the agent's token")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    code, _, err = run(capsys, "profile", str(tiny_onnx), "--remote", "http://127.0.0.1:9", "--token-file", str(token))
    assert code == 2
    assert_one_line_error(err, "can be read by other users")
    token.chmod(0o600)
    code, _, err = run(capsys, "profile", str(tiny_onnx), "--remote", "http://127.0.0.1:9", "--token-file", str(token))
    assert code == 1
    assert_one_line_error(err, "unreachable")


def test_profile_through_a_loopback_agent(capsys, tmp_path, tiny_onnx):
    from slimx.devices.agent import Agent, serve

    server = serve(Agent(TOKEN, log=lambda _m: None), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, out, _ = run(capsys, "profile", str(tiny_onnx), "--remote", url, "--token-file", str(token),
                           "--runs", "10", "--json")
        assert code == 0
        latency = json.loads(out)
        assert latency["measured"] and f"via agent {url}" in latency["where"] and latency["runs"] == 10
        bad = tmp_path / "bad"
        bad.write_text("x" * 20)
        bad.chmod(0o600)
        code, _, err = run(capsys, "profile", str(tiny_onnx), "--remote", url, "--token-file", str(bad))
        assert code == 2
        assert_one_line_error(err, "refused the token")
    finally:
        server.shutdown()
        server.server_close()


def test_calibrate_usage_errors(capsys, tmp_path):
    code, _, err = run(capsys, "devices", "calibrate", "iphone12")
    assert code == 2
    assert_one_line_error(err, "exactly one of --measurements")
    code, _, err = run(capsys, "devices", "calibrate", "iphone12", "--measurements", str(tmp_path / "none.csv"))
    assert code == 2
    assert_one_line_error(err, "does not exist")


def test_agent_refuses_a_weak_token(capsys, tmp_path):
    weak = tmp_path / "weak"
    weak.write_text("short")
    weak.chmod(0o600)
    code, _, err = run(capsys, "agent", "serve", "--token-file", str(weak), "--port", "0")
    assert code == 2
    assert_one_line_error(err, "shorter than 16")
    weak.write_text(TOKEN)
    weak.chmod(0o640)
    code, _, err = run(capsys, "agent", "serve", "--token-file", str(weak), "--port", "0")
    assert code == 2
    assert_one_line_error(err, "can be read by other users")
