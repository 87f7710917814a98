"""How well the latency estimator generalises to model families it never saw, per device and setting.

For each published table in shared/data and each device setting it calibrates: the per-op model and the
baseline (GMACs + op count + bytes + intercept, non-negative, relative-error weighted), both scored by
leave-one-family-out (every architecture family predicted by a fit that saw none of it); which one
`slimx devices calibrate` ships; and the coverage of the 80% interval on unseen families, measured by nested
grouped CV (the interval for a family is cut from a grouped CV over the other families only).

    python bench/estimator_generalization.py     # a few minutes the first time (timm exports), then cached

Writes bench/results/estimator_generalization.{md,json}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TABLES = (("iphone12", "iphone12_coreml.csv"), ("jetson-nano", "jetson_tensorrt_fp16.csv"),
          ("jetson-nano", "jetson_netspresso_tensorrt_fp16.csv"),
          ("jetson-agx-xavier", "jetson_tensorrt_fp16.csv"),
          ("jetson-agx-xavier", "jetson_netspresso_tensorrt_fp16.csv"), ("pixel3", "pixel3_tflite.csv"))


def run(data_dir: Path) -> dict:
    from slimx._core.errors import UsageError
    from slimx._core.progress import Progress
    from slimx.devices import load_device
    from slimx.devices.calibrate import calibrate_device, read_rows

    rows, skipped = [], []
    progress = Progress(total=1, enabled=True)
    for device_name, table in TABLES:
        print(f"{device_name} on {table} ...", file=sys.stderr)
        try:
            result = calibrate_device(load_device(device_name), read_rows(data_dir / table), table,
                                      progress=progress, nested=True)
        except UsageError as exc:  # a table whose rows calibrate none of this device's settings
            skipped.append({"device": device_name, "data": table, "why": exc.line()})
            continue
        for key, fit in result["fits"].items():
            rows.append({"device": device_name, "setting": key, "data": table, "rows": fit["rows"],
                         "families": fit["families"], "model": fit["model"], "per_op": fit["cv_per_op"],
                         "baseline": fit["cv_baseline"], "coverage": fit.get("coverage", {}),
                         "held_out": [{k: r[k] for k in ("label", "family", "measured_ms", "held_out_error_pct")}
                                      for r in fit["table"]]})
    return {"fits": rows, "skipped": skipped}


def _pct(cv: dict, key: str) -> str:
    value = cv.get(key)
    return "-" if value is None else f"{value:.1f}%"


def render(result: dict) -> str:
    lines = ["# Latency estimator: generalisation to unseen model families", "",
             "Grouped cross-validation: each architecture family is predicted by a fit that never saw it "
             "(leave-one-family-out). `per-op` is slimx's roofline-per-op model, `baseline` a linear fit on GMACs, "
             "op count and bytes moved. The shipped model is the one with the lower grouped mean error. "
             "Coverage: share of unseen-family rows inside the stated 80% interval, the interval cut from a "
             "grouped CV over the other families only (nested).", "",
             "| device | setting | data | rows | families | per-op mean / median | baseline mean / median | "
             "Spearman per-op / baseline | ships | coverage per-op / baseline |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in result["fits"]:
        po, ba, cov = f["per_op"], f["baseline"], f["coverage"]

        def covered(name, cov=cov):
            value = (cov.get(name) or {}).get("coverage")
            return "-" if value is None else f"{value * 100:.0f}%"

        lines.append(f"| {f['device']} | {f['setting']} | {f['data']} | {f['rows']} | {len(f['families'])} | "
                     f"{_pct(po, 'mape_pct')} / {_pct(po, 'median_abs_pct')} | "
                     f"{_pct(ba, 'mape_pct')} / {_pct(ba, 'median_abs_pct')} | "
                     f"{po.get('spearman', float('nan')):.2f} / {ba.get('spearman', float('nan')):.2f} | "
                     f"{f['model']} | "
                     f"{covered('per-op')} / {covered('baseline')} |")
    lines += ["", "Families left out, per table:", ""]
    seen = set()
    for f in result["fits"]:
        key = (f["device"], f["data"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {f['device']} / {f['data']}: {', '.join(f['families'])}")
    for s in result.get("skipped", []):
        lines.append(f"- {s['device']} / {s['data']}: not used ({s['why']})")
    return "\n".join(lines)


def main() -> int:
    result = run(DATA)
    write_results("estimator_generalization", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
