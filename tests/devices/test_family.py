"""Family fits: one latency model over the devices of a family, tied to their specs, predicting a device without
rows; its errors measured leave-one-device-out and leave-one-family-out; written as baseline settings."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from slimx.devices.family import fit_family


def _synthetic(seed: int = 0):
    """Rows on four devices whose latency follows the family model exactly (plus 3% noise)."""
    rng = np.random.default_rng(seed)
    specs = {"a": (500.0, 25.0, 250.0), "b": (1300.0, 60.0, 650.0), "c": (6800.0, 60.0, 850.0),
             "d": (11000.0, 137.0, 1400.0), "new": (42500.0, 205.0, 5300.0)}
    truth = {"coef": np.array([2.0, 0.5, 0.04, 0.3]), "alpha": 1.0, "gamma": 0.5, "beta": 0.75}
    ref = (2000.0, 60.0, 700.0)

    def latency(x, spec):
        p, w, k = spec
        mult = np.array([(ref[0] / p) ** truth["alpha"], (ref[1] / w) ** truth["gamma"], (ref[2] / k) ** truth["beta"],
                         (ref[2] / k) ** truth["beta"]])
        return (x * mult) @ truth["coef"]

    models = np.column_stack([rng.uniform(0.2, 8, 12), rng.uniform(0.01, 0.3, 12), rng.uniform(0.05, 1.0, 12),
                              np.ones(12)])
    rows = [(d, m) for d in "abcd" for m in range(12)]
    x = np.array([models[m] for _, m in rows])
    spec = np.array([specs[d] for d, _ in rows])
    y = np.array([latency(models[m], specs[d]) for d, m in rows]) * rng.lognormal(0, 0.03, len(rows))
    return x, y, spec, [d for d, _ in rows], models, specs, latency


def test_a_device_without_rows_is_predicted_from_the_others():
    x, y, spec, devices, models, specs, latency = _synthetic()
    fit = fit_family(x, y, spec, devices)
    truth = np.array([latency(m, specs["new"]) for m in models])
    got = fit.predict(models, specs["new"])
    errors = np.abs(got / truth - 1)
    assert np.median(errors) < 0.12, errors  # 4x faster than any device it saw, extrapolated from their specs
    # what a flat peak-rate scaling of the fastest device (per-layer cost kept) would say, for comparison
    flat = fit.predict(models, specs["d"], "d") * 11000.0 / 42500.0
    assert np.median(np.abs(flat / truth - 1)) > np.median(errors)
    assert set(fit.device_factor) == set("abcd") and all(0.8 < f < 1.25 for f in fit.device_factor.values())


def test_the_fit_at_a_device_is_an_ordinary_baseline():
    x, y, spec, devices, models, specs, _ = _synthetic()
    fit = fit_family(x, y, spec, devices)
    from slimx.devices.validation import predict_baseline

    coef = fit.baseline(specs["new"], None)
    as_baseline = predict_baseline(models[:, [0, 2, 1, 3]], coef)  # the estimator's [G, kops, GB, 1] order
    np.testing.assert_allclose(as_baseline, fit.predict(models, specs["new"]), rtol=1e-9)


@pytest.mark.slow
def test_calibrate_family_writes_every_member(tmp_path, monkeypatch):
    from slimx.devices import load_device
    from slimx.devices.estimator import default_setting
    from slimx.devices.family import calibrate_family, write_family

    table = tmp_path / "t.csv"
    names = ("test_vit", "test_efficientnet", "test_resnet", "test_convnext")
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "timm_name", "input_size", "device", "runtime", "latency_ms", "source"])
        for i, name in enumerate(names):
            for j, device in enumerate(("Jetson Nano", "Jetson TX2", "Jetson AGX Xavier")):
                writer.writerow([name, name, 160, device, "TensorRT FP16, batch 1", (i + 1) * (3 - j) * 1.3,
                                 "synthetic test table (2026)"])
    from slimx.devices.calibrate import read_rows

    result = calibrate_family("jetson", [("t.csv", read_rows(table))])
    assert result["devices_with_rows"] == ["jetson-agx-xavier", "jetson-nano", "jetson-tx2"]
    orin = result["members"]["jetson-agx-orin"]
    assert orin["basis"] == "no rows of its own" and orin["cv"]["method"].startswith("leave-one-device-out")
    # the model structure is the one of the four tried with the lowest leave-one-device-out error
    tried = result["structures"]
    assert len(tried) == 4 and result["lodo"]["mape_pct"] == min(t["lodo_mape_pct"] for t in tried)
    assert any(t["setup_offsets"] == result["setup_offsets"] and t["per_layer_speed"] == result["per_layer_speed"]
               and t["lodo_mape_pct"] == result["lodo"]["mape_pct"] for t in tried)
    paths = write_family(result, tmp_path)
    shipping = {n for n, m in result["members"].items() if m["ships"]}
    assert {p.stem for p in paths} == shipping and {"jetson-agx-orin", "jetson-orin-nano"} <= shipping
    for member in result["members"].values():  # a member keeps its own fit only where it is the better one
        if not member["ships"]:
            assert member["own_error_pct"] < member["cv"]["mape_pct"]
    from slimx.devices.registry import reload_profiles

    monkeypatch.setenv("SLIMX_DEVICES_DIR", str(tmp_path))
    reload_profiles()
    try:
        setting = default_setting(load_device("jetson-agx-orin"))
        assert setting.model == "baseline" and "leave-one-device-out" in setting.cv_method
        # the op classes the family's rows cover, not those of a fit the member carried before
        assert sorted(setting.fit_classes) == result["classes"] and "conv" in result["classes"]
        assert setting.interval is not None and setting.expected_error_pct is not None
    finally:
        monkeypatch.delenv("SLIMX_DEVICES_DIR")
        reload_profiles()


def test_setups_are_data_a_second_protocol_gets_its_own_factor():
    """Half the rows timed by a protocol 1.6x slower: the fit recovers the factor and predicts the reference."""
    x, y, spec, devices, models, specs, latency = _synthetic(seed=1)
    setups = ["new app" if i % 2 else "old app" for i in range(len(y))]
    y = np.where(np.array(setups) == "old app", y * 1.6, y)
    fit = fit_family(x, y, spec, devices, setups, reference="new app")
    assert fit.setup_factor["new app"] == 1.0 and abs(fit.setup_factor["old app"] / 1.6 - 1) < 0.08
    truth = np.array([latency(m, specs["new"]) for m in models])
    assert np.median(np.abs(fit.predict(models, specs["new"]) / truth - 1)) < 0.12


def test_one_row_far_off_does_not_bend_the_fit():
    """A network whose ops fall off the accelerator (MobileViT at 25.8 ms on an iPhone 13) is one outlier: the
    robust loss keeps the rest of the family's predictions where they were."""
    x, y, spec, devices, models, specs, _ = _synthetic(seed=2)
    clean = fit_family(x, y, spec, devices)
    y_bad = y.copy()
    y_bad[5] *= 20
    bent = fit_family(x, y_bad, spec, devices)
    for device in ("a", "d"):  # the devices it saw: their predictions move by a few percent at most
        a, b = clean.predict(models, specs[device]), bent.predict(models, specs[device])
        assert np.median(np.abs(b / a - 1)) < 0.04, device
    a, b = clean.predict(models, specs["new"]), bent.predict(models, specs["new"])
    assert np.median(np.abs(b / a - 1)) < 0.1  # plain least squares moved this one by 20% (checked by hand)


def test_a_setup_that_adds_fixed_time_is_told_from_one_that_scales():
    """torch2trt-like: a protocol adding 0.7 ms to every call, on slow and fast devices alike. With offsets the fit
    recovers the added time (and a factor near 1); without, a single factor cannot fit both devices."""
    x, y, spec, devices, *_ = _synthetic(seed=3)
    setups = ["python" if i % 2 else "native" for i in range(len(y))]
    y = np.where(np.array(setups) == "python", y + 0.7, y)
    fit = fit_family(x, y, spec, devices, setups, reference="native", offsets=True)
    assert abs(fit.setup_offset_ms["python"] - 0.7) < 0.15 and abs(fit.setup_factor["python"] - 1) < 0.1
    plain = fit_family(x, y, spec, devices, setups, reference="native")
    assert plain.setup_offset_ms == {}
    x_py = np.array([x[i] for i in range(len(y)) if setups[i] == "python"])

    def miss(f):
        pred = np.array([f.predict(x[i:i + 1], tuple(spec[i]), setup=setups[i])[0] for i in range(len(y))])
        return np.median(np.abs(pred / y - 1))

    assert len(x_py) and miss(fit) < miss(plain)


def test_a_spec_every_device_shares_keeps_exponent_one():
    """Bandwidth identical on every device with rows: its exponent cannot be learnt and stays at 1 (not at a bound
    the optimiser happened to stop at), so a new device with more bandwidth is predicted by the roofline's rule."""
    x, y, spec, devices, *_ = _synthetic(seed=4)
    spec = spec.copy()
    spec[:, 1] = 34.1
    fit = fit_family(x, y, spec, devices)
    assert fit.exponents[1] == 1.0
    assert fit.exponents[0] != 1.0  # the others are still fitted


def test_setups_are_keyed_by_tool_and_version():
    from slimx.devices.family import family_setups

    def row(table, device, runtime, source="", model="m1"):
        return {"table": table, "device": device, "runtime": runtime, "source": source, "timm_name": model,
                "input_size": "224"}

    rows = [row("a.csv", "iPhone 12 (A14)", "CoreML (coremltools 5.2; latency via coreml-performance app)",
                "paper 2022"),
            row("a.csv", "iPhone 12 (A14, iOS 16)", "CoreML (Xcode 14 Core ML performance report)", "paper 2023"),
            row("b.csv", "iPhone 14 (A15, iOS 16)", "CoreML, Neural Engine (Xcode 14 Core ML performance report)",
                "paper 2023", "m2"),
            row("a.csv", "iPhone 12 (A14)", "CoreML (same setup as EfficientFormer V1)", "paper 2022", "m3"),
            row("c.csv", "iPhone 11 Pro (A13)", "CoreML, compute unit = ANE", "model zoo (coreml-performance app)",
                "m3"),
            row("d.csv", "iPhone 13", "CoreML via some app", "paper 2021", "m9")]
    keys, reference, unlinked = family_setups(rows)
    assert keys[1] == keys[2] == reference == "Xcode Core ML performance report (Xcode 14, iOS 16)"
    assert keys[0] == keys[3] == "coreml-performance app (coremltools 5.2)"  # "same setup as" joins its table's
    assert keys[4] == "coreml-performance app"  # the same app without a converter version: another setup
    # m9 was timed in no other setup: its setup's factor could not be told from its device's, so it is left out
    assert unlinked == ["d.csv: CoreML via some app"] == [keys[5]]
    # a configuration the family's settings name (TFLite on 4 threads) is the reference whatever the years say;
    # the same thread count worded two ways is one setup
    cpu = [row("p.csv", "Pixel 3", "TFLite float, CPU 4 threads, batch 1", "2019", "m1"),
           row("q.csv", "Pixel 1 (large CPU core)", "TFLite float, single large core, batch 1", "2023", "m1"),
           row("q.csv", "Pixel 1", "TFLite float, Mobile CPU (large core), batch 1", "2023", "m2")]
    keys, reference, unlinked = family_setups(cpu, "4 threads")
    assert reference == keys[0] == "4 threads" and keys[1] == keys[2] == "1 large core" and unlinked == []


def test_the_per_layer_speed_is_the_fp32_or_the_dtype_peak():
    from slimx.devices import load_device
    from slimx.devices.estimator import settings_of
    from slimx.devices.family import specs

    orin = load_device("jetson-agx-orin", measure_host=False)
    setting = settings_of(orin)["tensorrt-gpu-fp16"]
    p, w, k32 = specs(orin, setting, "fp32 peak")
    assert (p, w) == (42500.0, 204.8) and k32 == 5320.0  # the profile's tensor-core fp16 and CUDA-core fp32 peaks
    assert specs(orin, setting, "dtype peak") == (p, w, p)


def test_apple_units_each_have_a_family_of_their_own():
    """The iPhone 7 and 11 Pro tables time Core ML on CPU, GPU and Neural Engine: each unit's rows go to its own
    family and setting, none to another's, and every Apple profile ships a setting for each unit it has."""
    from slimx.devices import load_device
    from slimx.devices.estimator import settings_of
    from slimx.devices.family import FAMILIES, family_rows

    rows = [{"timm_name": "resnet18", "input_size": "224", "device": device, "runtime": f"CoreML, compute unit = {u}, "
             "batch 1", "latency_ms": "9"} for device in ("iPhone 7 (A10)", "iPhone 11 Pro (A13)")
            for u in ("CPU", "GPU", "ANE")]
    rows = [r for r in rows if not (r["device"].startswith("iPhone 7") and r["runtime"].endswith("ANE, batch 1"))]
    got = {name: sorted((r["profile"], r["runtime"].split("= ")[1][:3]) for r in family_rows(FAMILIES[name],
                                                                                           [("t", rows)]))
           for name in ("apple-ane", "apple-gpu", "apple-cpu")}
    assert got == {"apple-ane": [("iphone11pro", "ANE")],
                   "apple-gpu": [("iphone11pro", "GPU"), ("iphone7", "GPU")],
                   "apple-cpu": [("iphone11pro", "CPU"), ("iphone7", "CPU")]}
    for member in FAMILIES["apple-gpu"].members:
        device = load_device(member.profile, measure_host=False)
        settings = settings_of(device)
        units = {cu.name for cu in device.compute_units}
        assert {"coreml-gpu-fp16", "coreml-cpu-fp32"} <= set(settings), member.profile
        assert ("coreml-ane-fp16" in settings) == ("ane" in units), member.profile  # the A10 has no Neural Engine
        for key in ("coreml-gpu-fp16", "coreml-cpu-fp32"):
            assert settings[key].calibrated and settings[key].interval is not None, (member.profile, key)
