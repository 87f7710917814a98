"""``slimx gate``: budgets measured on the host (candidate and baseline interleaved), estimated for devices not at
hand, baselines recorded and re-measured, the JUnit / Markdown / JSON / HTML outputs, and one clear line for every
bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from junitparser import Failure, JUnitXml

from slimx.cli import main


def _gate_file(tmp_path: Path, body: str, name: str = "gate.toml", rounds: int = 5) -> Path:
    path = tmp_path / name
    path.write_text(f"version = 1\n[settings]\nrounds = {rounds}\nruns = 20\nwarmup = 2\n" + body)
    return path


@pytest.mark.timing
def test_loose_budget_passes_and_tight_fails_with_junit_and_markdown(tmp_path, capsys, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    gate = _gate_file(tmp_path, """
[[gate]]
name = "mlp-loose"
model = "tests.models:tiny_mlp"
max_ms = 500.0
[[gate]]
name = "mlp-tight"
model = "tests.models:gate_mlp"
max_ms = 0.011
statistic = "p90"
""")
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    code = main(["gate", str(gate), "--junit", str(junit), "--markdown", str(md), "--html", str(tmp_path / "g.html"),
                 "-q"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "mlp-loose" in out and "PASS" in out and "FAIL" in out and "slimx gate: FAIL" in out
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    cases = {case.name: case for case in suite}
    assert suite.tests == 2 and suite.failures == 1
    assert not cases["mlp-loose"].result, "the loose entry passed"
    failure = cases["mlp-tight"].result[0]
    assert isinstance(failure, Failure) and "p90 ms" in failure.message and "0.0110" in failure.message
    text = md.read_text()
    assert "slimx gate **failed**" in text and "| mlp-tight | host | measured | p90 ms |" in text
    assert summary.read_text() == text, "the job summary gets the same Markdown"
    page = (tmp_path / "g.html").read_text()
    assert "slimx gate FAILED" in page and "<script" not in page

    one = _gate_file(tmp_path, """
[[gate]]
name = "mlp"
model = "tests.models:tiny_mlp"
max_ms = 500.0
""", "one.toml")
    assert main(["gate", str(one), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    check = result["entries"][0]["checks"][0]
    assert result["passed"] and check["verdict"] == "pass" and check["interval"][0] <= check["value"] <= \
        check["interval"][1]
    assert len(result["entries"][0]["candidate"]["rounds_median_ms"]) == 5


@pytest.mark.timing
def test_a_baseline_is_recorded_then_re_measured_and_a_slower_model_fails(tmp_path, capsys):
    gate = _gate_file(tmp_path, """
[[gate]]
name = "mlp"
model = "tests.models:gate_mlp"
max_regression_pct = 5
""")
    assert main(["gate", str(gate), "--update-baseline", "-q"]) == 0
    assert "baseline written" in capsys.readouterr().out
    record = json.loads((tmp_path / "gate-baseline.json").read_text())["entries"]["mlp"]
    stored = tmp_path / record["artifact"]["path"]
    assert stored.is_file() and len(record["latency"]["rounds_median_ms"]) == 5 and record["versions"]["slimx"]

    assert main(["gate", str(gate), "--json", "-q"]) == 0, "the same model against its own baseline passes"
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert "re-measured" in entry["baseline"]["how"] and entry["checks"][0]["what"] == "candidate / baseline"

    slower = _gate_file(tmp_path, """
[[gate]]
name = "mlp"
model = "tests.models:gate_mlp_wide"
max_regression_pct = 5
""", "slower.toml")
    assert main(["gate", str(slower), "--baseline-file", str(tmp_path / "gate-baseline.json"), "--json",
                 "-q"]) == 1
    check = json.loads(capsys.readouterr().out)["entries"][0]["checks"][0]
    assert check["verdict"] == "fail" and check["interval"][0] > 1.05, check

    stored.unlink()  # the artifact gone: compared with the recorded latency, with a warning
    assert main(["gate", str(gate), "--json", "-q"]) in (0, 1)  # across jobs: the verdict may go either way
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert "not re-measured" in entry["baseline"]["how"] and any("drift" in w for w in entry["warnings"])


def test_a_device_not_at_hand_is_estimated_and_fails_only_past_its_interval(capsys):
    model = ["gate", "timm:mobilenetv2_050", "--device", "iphone12", "-q"]
    assert main([*model, "--budget-ms", "50", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    check = entry["checks"][0]
    assert entry["kind"] == "estimated" and "interval" in check["how"]
    assert any("estimated, not measured" in w and "setup not anchored" in w for w in entry["warnings"])
    est, (lo, hi) = entry["candidate"]["estimate_ms"], entry["candidate"]["interval_ms"]
    assert lo < est < hi
    # no anchor: the interval is for a setup the profile never saw, wider than the profile's own setup's
    own = entry["candidate"]["unanchored"]["profile_setup_interval_ms"]
    assert lo < own[0] < est < own[1] < hi
    from slimx.devices import load_device
    from slimx.devices.estimator import device_floor_ms

    floor = device_floor_ms(load_device("iphone12"))
    inside = (max(lo, floor * 1.05) + est) / 2  # below the estimate, above its interval's lower end and the floor
    assert main([*model, "--budget-ms", f"{inside}"]) == 0, "inside the interval: not a failure"
    assert main([*model, "--budget-ms", f"{inside}", "--strict"]) == 1, "--strict judges the point estimate"
    if lo * 0.95 > floor * 1.05:  # a budget between the device's floor and lo fails outright
        assert main([*model, "--budget-ms", f"{lo * 0.95}"]) == 1
    capsys.readouterr()


@pytest.mark.parametrize("body, needle", [
    ("[[gate]]\nname = \"a\"\nmodel = \"tests.models:tiny_mlp\"\nmax_ms = 1.0\ncolour = \"red\"\n",
     "unknown option(s) colour"),
    ("[[gate]]\nname = \"a\"\nmodel = \"tests.models:tiny_mlp\"\ndevice = \"iphone99\"\nmax_ms = 1.0\n",
     "iphone99"),
    ("[[gate]]\nname = \"a\"\nmodel = \"timm:no_such_net\"\nmax_ms = 1.0\n", "not in timm's registry"),
    ("[[gate]]\nname = \"a\"\nmodel = \"tests.models:tiny_mlp\"\n", "has no budget"),
    ("[[gate]]\nname = \"a\"\nmodel = \"tests.models:tiny_mlp\"\nmax_regression_pct = 5\n", "no baseline"),
    ("[[gate]]\nname = \"a\"\nmodel = \"tests.models:tiny_mlp\"\ndevice = \"iphone12\"\nmax_ms = 0.01\n",
     "fixed per-inference overhead"),
    ("wrong = 1\n[[gate]]\nname = \"a\"\nmodel = \"tests.models:tiny_mlp\"\nmax_ms = 1.0\n", "unknown key(s) wrong"),
])
def test_bad_gate_files_are_one_line_and_exit_2(tmp_path, capsys, body, needle):
    gate = tmp_path / "g.toml"
    gate.write_text("version = 1\n" + body)
    assert main(["gate", str(gate)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_gate_usage_errors(tmp_path, capsys):
    assert main(["gate", "tests.models:tiny_mlp"]) == 2
    assert "has no budget" in capsys.readouterr().err
    assert main(["gate", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["gate", "tests.models:tiny_mlp", "--budget-ms", "5", "--junit", str(tmp_path / "no/x.xml")]) == 2
    assert "does not exist" in capsys.readouterr().err
