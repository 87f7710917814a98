"""slimx sweep on a local Ray started by the test: the grid's trials run as Ray tasks, the table and front are
written, a rerun skips finished trials, bad sweep files are one line."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from slimx.cli import main

pytest.importorskip("ray", reason="ray is not installed (pip install 'slimx[sweep]')")


def _sweep_file(tmp_path, body: str = ""):
    path = tmp_path / "sweep.toml"
    path.write_text('version = 1\nmodels = ["tests.models:tiny_mlp"]\ndevices = ["host", "iphone12"]\nruns = 30\n'
                    '[[recipe]]\nname = "plain"\n' + body)
    return path


@pytest.fixture(autouse=True)
def _ray_temp(monkeypatch):
    """Ray keeps its session folders (logs, sockets) under /tmp/ray for good; here under a short folder of the
    test's own, removed after it (socket paths must stay under 108 characters)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield
    shutil.rmtree(folder, ignore_errors=True)


def test_a_two_trial_sweep_on_local_ray(tmp_path, capsys):
    sweep = _sweep_file(tmp_path)
    out = tmp_path / "run"
    assert main(["sweep", str(sweep), "--out", str(out), "--workers", "2", "-q", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ran"] == 2 and len(result["trials"]) == 2
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["device"] for r in rows} == {"host", "iphone12"} and all(r["status"] == "ok" for r in rows)
    kinds = {r["device"]: r["latency_kind"] for r in rows}
    assert kinds == {"host": "measured", "iphone12": "estimated"}
    assert all(float(r["latency_ms"]) > 0 and float(r["fidelity"]) == 1.0 for r in rows)
    for r in rows:  # each trial is an ordinary export folder (slimx gate can take it)
        assert (out / "trials" / r["key"] / "report.json").is_file()
    assert set(result["front"]) == {"host", "iphone12"} and all(result["front"].values())
    page = (out / "report.html").read_text()
    assert "latency against fidelity" in page and "<script" not in page
    front_card = (out / "README.md").read_text()  # the card of the sweep's front, linking each trial's own card
    assert front_card.startswith("---\nlibrary_name: slimx") and front_card.count("[card](trials/") == 2
    track = ["--track", f"mlflow:{tmp_path / 'mlruns'}"] if importlib.util.find_spec("mlflow") else []
    assert main(["sweep", str(sweep), "--out", str(out), "-q", "--json", *track]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["ran"] == 0 and again["skipped_finished"] == 2, "a rerun skips the finished trials"
    if track:  # one MLflow run per trial, read back from the store
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
        runs = client.search_runs([client.get_experiment_by_name("slimx").experiment_id])
        assert sorted(r.data.tags["slimx.device"] for r in runs) == ["host", "iphone12"]
        assert {r.info.run_id for r in runs} == {t["tracked"]["run_id"] for t in again["trials"]}
    for r in rows:  # slimx gate takes a chosen trial as its candidate, on the device the trial was exported for
        assert main(["gate", str(out / "trials" / r["key"]), "--budget-ms", "500", "-q", "--rounds", "3",
                     "--runs", "5", "--json"]) == 0
        gated = json.loads(capsys.readouterr().out)["entries"][0]
        assert gated["device"] == r["device"] and gated["kind"] == r["latency_kind"]


@pytest.mark.parametrize("body, needle", [
    ("colour = 1\n", "unknown key(s) colour"),
    ('[[recipe]]\nname = "x"\npasses = ["nope:a=1"]\n', "unknown pass"),
    ('[[recipe]]\nname = "plain"\n', "names two recipes alike"),
])
def test_bad_sweep_files_are_one_line(tmp_path, capsys, body, needle):
    assert main(["sweep", str(_sweep_file(tmp_path, body)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
