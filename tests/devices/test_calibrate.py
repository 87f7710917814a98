"""Calibration end to end: microbench CSV -> fitted host profile; published table -> fitted phone profile."""

import csv
import tomllib

import pytest

from slimx._core.errors import UsageError
from slimx.devices import load_device
from slimx.devices.calibrate import calibrate, read_rows, scale_from, write_profile
from slimx.devices.estimator import settings_of
from slimx.devices.microbench import CSV_FIELDS, run_microbench, suite
from slimx.devices.registry import check_sources


def test_suite_covers_every_op_family():
    groups = {c.group for c in suite()}
    assert {"matmul", "conv", "depthwise", "attention", "norm", "activation", "softmax", "elementwise", "move",
            "reduce", "block"} <= groups
    assert len({c.name for c in suite()}) == len(suite()), "case names are unique"


def test_microbench_then_calibrate_host(tmp_path, scratch_profiles):
    out = tmp_path / "mb.csv"
    rows = run_microbench("onnxruntime", out, quick=True, runs=5, rounds=1, warmup=1)
    assert len(rows) == 12
    with out.open() as fh:
        read = list(csv.DictReader(fh))
    assert tuple(read[0]) == CSV_FIELDS and all(float(r["median_ms"]) > 0 for r in read)
    result = calibrate("host", out)
    assert result["path"].parent == scratch_profiles, "the host's fit goes to the user copy, not the package"
    fit = result["fits"]["onnxruntime-cpu-fp32"]
    assert fit["rows"] == 12 and fit["cv"]["method"] == "leave-one-case-out (12 cases)", "cases: each its own group"
    assert fit["model"] in ("per-op", "baseline") and fit["cv_baseline"]["mape_pct"] >= 0
    data = tomllib.loads(result["path"].read_text())
    assert check_sources(data) == []
    setting = settings_of(load_device("host"))["onnxruntime-cpu-fp32"]
    assert setting.calibrated and setting.expected_error_pct == fit["cv"]["mape_pct"]


def test_calibrate_from_a_published_table(tmp_path, scratch_profiles):
    table = tmp_path / "published.csv"
    table.write_text(
        "model,timm_name,input_size,params_m,gmacs,top1,device,runtime,latency_ms,source\n"
        "A,test_resnet,160,,,,iPhone 12,CoreML (app),0.9,made up for the test\n"
        "B,test_vit,160,,,,iPhone 12,CoreML (app),0.7,made up for the test\n"
        "C,test_efficientnet,160,,,,iPhone 12,CoreML (same setup as A),0.5,made up for the test\n"
        "D,,224,,,,iPhone 12,CoreML (app),1.0,no timm model: skipped\n"
        "E,test_convnext,160,,,,iPhone 12,TFLite GPU,1.0,another runtime: skipped\n")
    out = tmp_path / "iphone12.toml"
    result = calibrate("iphone12", table, out=out)
    assert result["skipped"] == {"no timm model for the row": 1, "runtime/device matches no setting of this profile": 1}
    fit = result["fits"]["coreml-ane-fp16"]
    assert fit["rows"] == 3 and len(fit["cv"]["errors_pct"]) == 3
    assert fit["cv"]["method"] == "leave-one-family-out (3 families)" and fit["families"] == ["efficientnet",
                                                                                             "resnet", "vit"]
    text = out.read_text()
    assert text.count("# >>> estimator settings") == 1 and "16-core Neural Engine" in text, "rest of the file kept"
    data = tomllib.loads(text)
    written = data["estimator"]["coreml-ane-fp16"]
    assert written["fit_rows"] == 3 and check_sources(data) == []
    assert written["model"] == fit["model"] and written["interval_low"] < 1 < written["interval_high"]


def test_calibrate_fits_only_the_settings_asked_for(tmp_path, scratch_profiles):
    table = tmp_path / "per_unit.csv"
    lines = ["model,timm_name,input_size,params_m,gmacs,top1,device,runtime,latency_ms,source"]
    for unit, scale in (("ANE", 1.0), ("GPU", 3.0)):
        for i, name in enumerate(("test_resnet", "test_vit", "test_efficientnet")):
            lines.append(f"{name},{name},160,,,,iPhone 12,\"CoreML, compute unit = {unit}, batch 1\","
                         f"{(i + 1) * scale},made up for the test")
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "iphone12.toml"
    before = load_device("iphone12").raw["estimator"]["coreml-ane-fp16"]
    result = calibrate("iphone12", table, out=out, only=["coreml-gpu-fp16"])
    assert set(result["fits"]) == {"coreml-gpu-fp16"} and result["fits"]["coreml-gpu-fp16"]["rows"] == 3
    assert result["skipped"] == {"for setting coreml-ane-fp16, not asked for": 3}
    written = tomllib.loads(out.read_text())["estimator"]
    assert written["coreml-ane-fp16"] == before, "a setting not asked for keeps its figures"
    assert written["coreml-gpu-fp16"]["fit_rows"] == 3
    with pytest.raises(UsageError, match="not an estimator setting of iphone12"):
        calibrate("iphone12", table, out=out, only=["coreml-npu-int4"])


def test_scale_from_carries_efficiencies_with_added_error(tmp_path):
    out = tmp_path / "raspberry-pi-5.toml"
    scale_from("raspberry-pi-5", "pixel3", extra_error_pct=15, out=out)
    data = tomllib.loads(out.read_text())
    base = load_device("pixel3").raw["estimator"]["tflite-cpu-fp32"]
    mine = data["estimator"]["tflite-cpu-fp32"]
    assert mine["eff_conv"] == base["eff_conv"] and mine["scaled_from"] == "pixel3"
    assert mine["expected_error_pct"] == pytest.approx(base["expected_error_pct"] + 15, abs=0.11)


def test_bad_measurements_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="neither a microbench CSV"):
        read_rows(bad)
    with pytest.raises(UsageError, match="does not exist"):
        read_rows(tmp_path / "none.csv")


def test_write_profile_never_writes_broken_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\n')
    with pytest.raises(tomllib.TOMLDecodeError):
        write_profile(path, 'name = "x"\n[broken\n', {}, None)
    assert path.read_text() == 'name = "x"\n'


def test_profile_calibrates_the_host_when_asked(capsys, scratch_profiles, monkeypatch):
    from slimx import profiling
    from slimx.cli import main

    # the quick suite keeps the test fast; the flag's own default is the full suite in about a minute
    monkeypatch.setattr(profiling, "HOST_CALIBRATION", {"runs": 3, "rounds": 1, "warmup": 1, "quick": True})
    assert main(["profile", "tests.models:tiny_mlp", "--device", "host", "--estimate", "--calibrate", "-q"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    written = tomllib.loads((scratch_profiles / "host.toml").read_text())["estimator"]["onnxruntime-cpu-fp32"]
    assert "microbench-onnxruntime" in written["fit_rows_source"] and written["fit_rows"] == 12
    assert first.startswith("estimated for") and "leave-one-case-out (12 cases)" in first
    assert main(["profile", "tests.models:tiny_mlp", "--device", "iphone12", "--calibrate"]) == 2
    assert "calibrates only the host" in capsys.readouterr().err


def test_scale_from_refuses_a_device_its_family_fit_covers(tmp_path):
    with pytest.raises(UsageError, match="jetson family"):
        scale_from("jetson-agx-orin", "jetson-agx-xavier", out=tmp_path / "orin.toml")
    assert not (tmp_path / "orin.toml").exists()
