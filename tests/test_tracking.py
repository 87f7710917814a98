"""`--track mlflow[:URI]`: an export, a gate and a sweep's trials logged to a real local MLflow store, read back."""

import json

import pytest

from slimx.cli import main

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra (slimx-edge[track])")


def _runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("slimx")
    return client, client.search_runs([experiment.experiment_id])


def test_an_export_is_one_run_with_its_config_metrics_and_files(tmp_path, capsys):
    store, out = tmp_path / "mlruns", tmp_path / "out"
    args = ["export", "tests.models:tiny_mlp", "--input-shape", "2x16", "--target", "pixel7", "--format", "onnx",
            "--out", str(out), "--track", f"mlflow:{store}", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    client, runs = _runs(store)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model"] == "tests.models:tiny_mlp" and run.data.params["target"] == "pixel7"
    assert run.data.metrics["parity_cosine"] == pytest.approx(report["parity"]["cosine"])
    assert run.data.metrics["latency_ms"] == pytest.approx(report["latency"]["total_ms"])
    assert run.data.metrics["latency_measured"] == 0.0 and run.data.metrics["artifact_bytes"] > 0
    assert run.data.tags["slimx.format"] == "onnx" and run.data.tags["slimx.latency"] == "estimated"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.html", "README.md"} <= files
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "report.json", str(tmp_path))).read())
    assert logged["parity"]["cosine"] == report["parity"]["cosine"]


def test_a_gate_is_one_run_and_an_unknown_tracker_is_one_line(tmp_path, capsys):
    store = tmp_path / "mlruns"
    args = ["gate", "tests.models:tiny_mlp", "--input-shape", "2x16", "--device", "pixel7", "--budget-ms", "50",
            "--track", f"mlflow:{store}", "-q"]
    assert main(args) == 0
    _, runs = _runs(store)
    assert len(runs) == 1 and runs[0].data.metrics["passed"] == 1.0
    assert runs[0].data.tags["slimx.kind"] == "gate"
    capsys.readouterr()
    assert main(["export", "tests.models:tiny_mlp", "--out", str(tmp_path / "x"), "--track", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a tracker slimx knows" in err
    assert not (tmp_path / "x").exists()  # refused before any work
