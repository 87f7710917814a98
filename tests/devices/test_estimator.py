"""The per-op estimator and its calibration: known parameters are recovered, errors are cross-validated."""

import numpy as np
import pytest
import torch

from slimx._core.errors import UsageError
from slimx.devices import load_device
from slimx.devices.calibrate import cross_validate, fit_params, predict, setup_groups
from slimx.devices.estimator import Features, Setting, default_setting, estimate_latency, full_params
from slimx.devices.opmix import OpCost, op_mix
from tests.models import TinyConvBN, TinyMLP


def _costs(rng, n_ops=40):
    classes = ["matmul", "conv", "depthwise", "elementwise", "move", "activation"]
    return [OpCost(node=f"n{i}", op="x", op_class=classes[i % len(classes)], flops=float(rng.uniform(1e5, 5e8)),
                   bytes=float(rng.uniform(1e4, 5e6)), float_bytes=0.0, module=f"m.{i}") for i in range(n_ops)]


def test_estimate_has_per_op_module_and_total():
    ep = torch.export.export(TinyConvBN().eval(), (torch.randn(1, 3, 16, 16),))
    device = load_device("iphone12")
    est = estimate_latency(op_mix(ep), device)
    assert est["kind"] == "estimated" and est["setting"] == "coreml-ane-fp16"
    per_op = sum(e["ms"] for e in est["per_op"])
    assert est["total_ms"] == pytest.approx(per_op + est["fixed_ms"], rel=1e-3)
    assert est["expected_error_pct"] is not None and est["expected_error_source"]
    assert all(n["unit"] == "ane" for n in est["per_node"])
    assert {m["module"] for m in est["per_module"]} & {"conv1 (Conv2d)", "conv2 (Conv2d)"}


def test_gathers_fall_back_off_the_neural_engine():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 16))
    ep = torch.export.export(model.eval(), (torch.randint(0, 100, (1, 8)),))
    est = estimate_latency(op_mix(ep), load_device("iphone12"))
    units = {n["op"]: n["unit"] for n in est["per_node"]}
    assert units["embedding"] == "gpu" and units["linear"] == "ane"


def test_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    device = load_device("jetson-nano")
    setting = Setting("t", "tensorrt", "gpu", "fp16")
    truth = {**full_params(setting), "eff_matmul": 0.3, "eff_conv": 0.6, "op_overhead_us": 20.0,
             "fixed_overhead_us": 300.0}
    feats = [Features.of(_costs(rng, int(rng.integers(10, 60))), setting) for _ in range(30)]
    measured = predict(feats, truth, device, setting)
    free = ("eff_matmul", "eff_conv", "op_overhead_us", "fixed_overhead_us")
    fitted = fit_params(feats, measured, device, setting, free, ridge=1e-8)
    for name in free:
        assert fitted[name] == pytest.approx(truth[name], rel=0.05), name
    cv = cross_validate(feats, measured, device, setting, free)
    assert cv["method"] == "leave-one-out" and cv["mape_pct"] < 5


def test_setups_get_their_own_offset():
    # the newest setup (by the years its sources name) is the reference; another keeps its own factor only where
    # a model was timed in both, else it is pooled into the reference (its offset would be the family's)
    rows = [{"runtime": "app A", "timm_name": "m1", "source": "paper 2022"},
            {"runtime": "same setup as A", "timm_name": "m2", "source": "paper 2022"},
            {"runtime": "Xcode report", "timm_name": "m1", "source": "paper 2023"}]
    index, names, pooled = setup_groups(rows, "t.csv")
    # named as a family fit names them: the timing tool where the text names one, else table and runtime text
    assert index.tolist() == [1, 1, 0] and names == ["Xcode Core ML performance report", "t.csv: app A"]
    assert pooled == []
    rows[2]["timm_name"] = "m3"
    index, names, pooled = setup_groups(rows, "t.csv")
    assert index.tolist() == [0, 0, 0] and names == ["Xcode Core ML performance report"]
    assert pooled == ["t.csv: app A"]
    rng = np.random.default_rng(1)
    device = load_device("jetson-nano")
    setting = Setting("t", "tensorrt", "gpu", "fp16")
    feats = [Features.of(_costs(rng), setting) for _ in range(12)]
    setups = np.array([0, 1] * 6)
    measured = predict(feats, full_params(setting), device, setting) * np.where(setups == 1, 0.5, 1.0)
    fitted = fit_params(feats, measured, device, setting, ("eff_conv",), setups=setups, ridge=1e-8)
    assert np.exp(fitted["setup_offsets"][1]) == pytest.approx(0.5, rel=0.02)


def test_uncalibrated_device_says_so():
    device = load_device("host")
    setting = default_setting(device)
    ep = torch.export.export(TinyMLP().eval(), (torch.randn(2, 16),))
    est = estimate_latency(op_mix(ep), device, Setting(setting.key, "onnx", "cpu", "fp32"))
    assert est["expected_error_pct"] is None and est["calibrated"] is False


def test_profile_without_settings_is_a_usage_error():
    device = load_device("iphone12")
    bare = type(device)(name="x", display_name="X", kind="phone", default_format="onnx", raw={})
    with pytest.raises(UsageError, match="calibrate"):
        default_setting(bare)
