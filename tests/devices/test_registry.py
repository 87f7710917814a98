import re
import tomllib

import pytest

from slimx._core.errors import UsageError
from slimx.devices import device_names, load_device
from slimx.devices.registry import PROFILE_DIR, check_sources, parse_profile

REQUIRED = {"host": "onnx", "iphone12": "coreml", "iphone15pro": "coreml", "pixel7": "tflite",
            "jetson-orin-nano": "tensorrt", "jetson-agx-orin": "tensorrt", "jetson-xavier-nx": "tensorrt",
            "raspberry-pi-5": "tflite"}


def test_required_devices_and_default_formats():
    assert set(REQUIRED) <= set(device_names())
    for name, fmt in REQUIRED.items():
        assert load_device(name).default_format == fmt


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_figure_has_a_source(path):
    data = tomllib.loads(path.read_text())
    assert check_sources(data) == []
    assert path.stem == data["name"], "file named after the device"
    for unit in data.get("compute_units", []):
        assert {"name", "kind"} <= set(unit)


def test_a_figure_without_source_is_refused():
    data = {"name": "x", "display_name": "X", "kind": "phone", "default_format": "onnx",
            "memory": {"mem_bandwidth_gbs": 10}}
    with pytest.raises(ValueError, match=r"memory\.mem_bandwidth_gbs"):
        parse_profile(data, "x.toml")


def test_iphone12_compute_units():
    dev = load_device("a14")  # alias
    assert dev.name == "iphone12"
    assert [cu.name for cu in dev.compute_units] == ["cpu", "gpu", "ane"]
    assert dev.peak("ane", "fp16") == 11000
    assert dev.format_options["coreml"]["minimum_deployment_target"] == "iOS14"


def test_host_figures_are_measured_here():
    host = load_device("host")
    assert host.measured
    cpu = host.compute_units[0]
    assert cpu.peak_gflops_fp32 > 1 and "measured by slimx" in cpu.sources["peak_gflops_fp32"]
    assert host.memory["mem_bandwidth_gbs"] > 0.5
    assert "onnx" in host.runtimes


def test_unknown_device():
    with pytest.raises(UsageError, match="unknown device"):
        load_device("iphone99")


@pytest.mark.parametrize("where,table,needle", [
    ("top", {"peak_tflops": 1, "peak_tflops_source": "x"}, "unknown key(s) peak_tflops"),
    ("unit", {"name": "cpu", "kind": "cpu", "peak_gflop_fp32": 5, "peak_gflop_fp32_source": "x"},
     "unknown key(s) peak_gflop_fp32"),
    ("setting", {"runtime": "onnx", "eff_matmull": 0.5, "eff_matmull_source": "x"}, "unknown key(s) eff_matmull"),
])
def test_unknown_keys_in_a_profile_are_refused(where, table, needle):
    """A typo in a profile is an error on load, not a figure silently ignored."""
    data = {"name": "x", "display_name": "X", "kind": "phone", "default_format": "onnx"}
    if where == "top":
        data.update(table)
    elif where == "unit":
        data["compute_units"] = [table]
    else:
        data["estimator"] = {"onnx-cpu-fp32": table}
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse_profile(data, "x.toml")


def test_profiles_load_as_typed_records():
    from slimx.devices.records import ComputeUnit, EstimatorSetting

    for name in device_names():
        device = load_device(name, measure_host=False)
        assert all(isinstance(cu, ComputeUnit) for cu in device.compute_units)
        assert all(isinstance(s, EstimatorSetting) for s in device.estimator.values())
        assert device.estimator_default is None or device.estimator_default in device.estimator


def test_pixel4_is_a_sourced_member_of_the_pixel_family():
    from slimx.devices.estimator import default_setting
    from slimx.devices.setups import family_of_device

    pixel4 = load_device("sm8150")
    assert pixel4.name == "pixel4" and family_of_device("pixel4").name == "pixel"
    assert pixel4.peak("cpu", "fp32") == pytest.approx(161.6) and pixel4.memory["mem_bandwidth_gbs"] == 34.1
    setting = default_setting(pixel4)
    assert setting.key == "tflite-cpu-fp32" and setting.model == "baseline" and setting.setup == "4 threads"
    assert "pixel family fit" in pixel4.raw["estimator"]["tflite-cpu-fp32"]["model_source"]
    # the family fit at its specs: between the Pixel 1 (Snapdragon 821) and the Pixel 7 (Tensor G2)
    ms = {d: default_setting(load_device(d)).baseline["ms_per_gmac"] for d in ("pixel1", "pixel4", "pixel7")}
    assert ms["pixel7"] < ms["pixel4"] < ms["pixel1"]
