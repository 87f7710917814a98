"""Fit the estimator to the published on-device latency tables in shared/data and report held-out error.

For each table and device: the fit (least squares on log latency, the op mix of each model taken from its
timm graph), the held-out error of every row (leave-one-family-out; see estimator_generalization.py), and
the estimate for EfficientFormer-L1 on the iPhone 12 against its published 1.6 ms. The fits are written to
a scratch copy of the profiles; the committed profiles
are refreshed with `slimx devices calibrate DEVICE --measurements CSV`.

    python bench/estimator_published.py     # about 2 minutes the first time (exports), seconds after (cache)
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TABLES = (("iphone12", "iphone12_coreml.csv"), ("jetson-nano", "jetson_tensorrt_fp16.csv"),
          ("jetson-agx-xavier", "jetson_tensorrt_fp16.csv"), ("pixel3", "pixel3_tflite.csv"))


def run(data_dir: Path) -> dict:
    from slimx.devices import load_device
    from slimx.devices.calibrate import calibrate, model_op_mix
    from slimx.devices.estimator import default_setting, estimate_latency
    from slimx.devices.registry import reload_profiles

    out = {"fits": []}
    with tempfile.TemporaryDirectory(prefix="slimx-profiles-") as scratch:
        os.environ["SLIMX_DEVICES_DIR"] = scratch
        reload_profiles()
        for device, table in TABLES:
            path = data_dir / table
            print(f"fit {device} on {table} ...", file=sys.stderr)
            result = calibrate(device, path, out=Path(scratch) / f"{device}.toml")
            for key, fit in result["fits"].items():
                out["fits"].append({"device": device, "setting": key, "data": table, "rows": fit["rows"],
                                    "free": fit["free"],
                                    "cv": {k: v for k, v in fit["cv"].items() if k != "errors_pct"},
                                    "setups": fit.get("setups", []), "table": fit["table"]})
            out.setdefault("skipped", {})[device] = result["skipped"]
        dev = load_device("iphone12")
        est = estimate_latency(model_op_mix("timm:efficientformer_l1"), dev, default_setting(dev))
        out["efficientformer_l1_iphone12"] = {"estimated_ms": est["total_ms"], "published_ms": 1.6,
                                              "error_pct": round((est["total_ms"] / 1.6 - 1) * 100, 1),
                                              "expected_error_pct": est["expected_error_pct"]}
    reload_profiles()
    return out


def render(result: dict) -> str:
    lines = ["# Latency estimator fitted to published on-device tables (shared/data)", "",
             "Held-out error is leave-one-family-out (leave-one-out where a table has fewer than 3 families): each "
             "row is predicted by a fit that never saw its family. A second measurement setup gets its own factor "
             "only where a model was timed in both; estimates are for the newest setup.", "",
             "| device | setting | rows | held-out method | mean abs error | within ±15% | max |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in result["fits"]:
        lines.append(f"| {f['device']} | {f['setting']} | {f['rows']} | {f['cv']['method']} | "
                     f"{f['cv']['mape_pct']:.1f}% | {f['cv']['within_15pct'] * 100:.0f}% | "
                     f"{f['cv']['max_abs_pct']:.1f}% |")
    e = result["efficientformer_l1_iphone12"]
    lines += ["", f"EfficientFormer-L1 on iPhone 12: estimated {e['estimated_ms']:.3f} ms vs published "
              f"{e['published_ms']} ms ({e['error_pct']:+.1f}%; the fit's stated error "
              f"±{e['expected_error_pct']:.0f}%).",
              ""]
    for f in result["fits"]:
        lines += [f"## {f['device']} / {f['setting']} ({f['data']})", ""]
        if len(f["setups"]) > 1:
            lines += ["Setup factors: " + "; ".join(f"x{s['factor']:.3f} for {s['rows']} rows of "
                                                      f"'{s['setup'][:60]}'" for s in f["setups"]), ""]
        lines += ["| model | published ms | fitted ms | held-out error |", "| --- | --- | --- | --- |"]
        for row in f["table"]:
            held = row["held_out_error_pct"]
            lines.append(f"| {row['label']} | {row['measured_ms']:g} | {row['fitted_ms']:.3f} | "
                         f"{'-' if held is None else f'{held:+.1f}%'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    warnings.filterwarnings("ignore")
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA
    from _results import write_results

    result = run(data_dir)
    write_results("estimator_published", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
