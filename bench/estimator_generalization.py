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
          ("jetson-agx-xavier", "jetson_netspresso_tensorrt_fp16.csv"), ("pixel3", "pixel3_tflite.csv"),
          ("iphone11pro", "iphone11pro_iphone7_coreml.csv"), ("iphone7", "iphone11pro_iphone7_coreml.csv"),
          # its fp16 rows are the jetson family's (below); its fp32 ones calibrate the TX2's fp32 setting alone
          ("jetson-tx2", "jetson_tx2_tensorrt.csv", ("tensorrt-gpu-fp32",)))
FAMILY_TABLES = (("jetson", ("jetson_tensorrt_fp16.csv", "jetson_netspresso_tensorrt_fp16.csv",
                             "jetson_tx2_tensorrt.csv")),
                 ("apple-ane", ("iphone12_coreml.csv", "iphone11pro_iphone7_coreml.csv", "iphone13_coreml.csv",
                                "iphone14_coreml.csv")),
                 ("apple-gpu", ("iphone11pro_iphone7_coreml.csv",)), ("apple-cpu", ("iphone11pro_iphone7_coreml.csv",)),
                 ("pixel", ("pixel3_tflite.csv", "pixel1_2_3_mobilenet_tflite.csv", "pixel1_mnasnet_tflite.csv")))


def run(data_dir: Path) -> dict:
    from slimx._core.errors import UsageError
    from slimx._core.progress import Progress
    from slimx.devices import load_device
    from slimx.devices.calibrate import calibrate_device, read_rows
    from slimx.devices.family import calibrate_family

    rows, skipped = [], []
    progress = Progress(total=1, enabled=True)
    for device_name, table, *only in TABLES:
        print(f"{device_name} on {table} ...", file=sys.stderr)
        try:
            result = calibrate_device(load_device(device_name), read_rows(data_dir / table), table,
                                      progress=progress, nested=True, only=only[0] if only else None)
        except UsageError as exc:  # a table whose rows calibrate none of this device's settings
            skipped.append({"device": device_name, "data": table, "why": exc.line()})
            continue
        for key, fit in result["fits"].items():
            rows.append({"device": device_name, "setting": key, "data": table, "rows": fit["rows"],
                         "families": fit["families"], "model": fit["model"], "per_op": fit["cv_per_op"],
                         "baseline": fit["cv_baseline"], "coverage": fit.get("coverage", {}),
                         "held_out": [{k: r[k] for k in ("label", "family", "measured_ms", "held_out_error_pct")}
                                      for r in fit["table"]]})
    families = []
    for name, tables in FAMILY_TABLES:
        print(f"family {name} ...", file=sys.stderr)
        result = calibrate_family(name, [(t, read_rows(data_dir / t)) for t in tables], progress,
                                  nested_coverage=True)
        families.append({k: v for k, v in result.items()} | {"tables": list(tables)})
    import anchoring

    structures = {f["family"]: (f["setup_offsets"], f["per_layer_speed"]) for f in families}
    return {"fits": rows, "skipped": skipped, "families": families,
            "anchoring": anchoring.run(data_dir, structures)}


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
    lines += render_families(result.get("families", []))
    if result.get("anchoring"):
        import anchoring

        lines += anchoring.render(result["anchoring"])
    return "\n".join(lines)


def render_families(families: list[dict]) -> list[str]:
    lines = ["", "## Device families: one fit over every device of a family, tied to their specs", "",
             "t = setup factor x device factor x [a G (P0/P)^alpha + w B (W0/W)^gamma + (b O + c) (K0/K)^beta] "
             "(+ the setup's fixed time), least squares on log "
             "latency with a soft-L1 loss (`devices/family.py`). Setups are the timing tool and the versions a row "
             "states (the iPhone 14's and the iPhone 12's Xcode 14 / iOS 16 rows share one). A device with rows is "
             "scored leave-one-family-out inside the family fit (its families' rows left out on every device); a "
             "device without rows states the leave-one-device-out error (each device with rows predicted by a fit "
             "without it, no device factor, its setup's factor only where another device was timed in that setup; each "
             "device weighted equally, whatever its row count). "
             "Coverage: nested, the interval cut from a grouped CV that did not see the held-out group either, the "
             "way the device states it (from its own rows where they span 4 or more families, else from the "
             "family's pooled rows; `-`: not measurable, as with two devices, where leaving one out leaves a "
             "single device and no grouped CV to cut the interval from). A "
             "member keeps its own fit where its own grouped error is lower.", ""]
    for fam in families:
        lodo = fam["lodo"]
        exps = ", ".join(f"{k} {v:.2f}" for k, v in fam["exponents"].items())
        lines += [f"### {fam['family']} ({fam['rows']} rows from {', '.join(fam['tables'])})", "",
                  f"Spec exponents {exps}; estimates for the setup `{fam['reference_setup']}`; setup factors: " +
                  "; ".join(f"`{u['setup']}` x{u['factor']:.2f}" + (f" +{u['offset_ms']:.2f} ms" if "offset_ms" in u
                                                                    else "") + f" ({u['rows']} rows)"
                            for u in fam["setups"]) +
                  (f". Structure, chosen by the leave-one-device-out mean error: setup fixed times "
                   f"{'fitted' if fam['setup_offsets'] else 'not fitted'}, per-layer speed = the unit's "
                   f"{fam['per_layer_speed']} (tried: " +
                   ", ".join(f"{'with' if t['setup_offsets'] else 'without'} fixed times and the {t['per_layer_speed']}"
                             f" {t['lodo_mape_pct']:.1f}%" for t in fam["structures"]) + ")"
                   if "structures" in fam else "") +
                  (f". Left out, no model timed in them was timed in another setup: "
                   f"{'; '.join(f'`{u}`' for u in fam['unlinked_setups'])}" if fam.get("unlinked_setups") else ""),
                  "",
                  "| device | rows | validated by | mean / median error | Spearman | 80% interval | coverage (nested) "
                  "| ships |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in fam["members"].items():
            cv = m["cv"]
            cov = cv.get("coverage")
            lo, hi = cv["interval_factors"]
            ships = "yes" if m["ships"] else f"no (own fit ±{m['own_error_pct']:.1f}%)"
            lines.append(f"| {name} | {m['rows']} | {cv['method']} | {cv['mape_pct']:.1f}% / "
                         f"{cv['median_abs_pct']:.1f}% | {cv['spearman']:.2f} | x{lo:.2f}-x{hi:.2f} | "
                         f"{'-' if cov is None else f'{cov * 100:.0f}%'} | {ships} |")
        lines += ["", f"Leave-one-device-out over {', '.join(lodo['groups'])}: mean {lodo['mape_pct']:.1f}%, median "
                  f"{lodo['median_abs_pct']:.1f}%, within ±15% {lodo['within_15pct'] * 100:.0f}% of rows, Spearman "
                  f"{lodo['spearman']:.2f}.", ""]
    return lines


def main() -> int:
    result = run(DATA)
    write_results("estimator_generalization", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
