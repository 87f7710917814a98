"""Fit a device's estimator settings to measured latencies: least squares on log latency, cross-validated.

Measurements come as a CSV in one of two shapes:

- a microbenchmark CSV from ``slimx devices microbench`` (columns ``case``, ``setting``, ``median_ms``): each
  case is rebuilt from the suite by name to get its op mix;
- a published table (columns ``timm_name``, ``input_size``, ``device``, ``runtime``, ``latency_ms``, as in
  ``shared/data``): each row's op mix comes from the timm model's exported graph, and the row is given to
  the profile setting whose ``match`` keywords all appear in its ``runtime`` text (and, where the profile
  says ``match_device``, whose ``device`` text contains it). Rows without a timm model are skipped and counted.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimx._core.errors import UsageError
from slimx.devices.estimator import Features, Setting, rates, settings_of, total_ms
from slimx.devices.opmix import OP_CLASSES, OpCost, cached_op_mix, op_mix
from slimx.devices.records import BASELINE_KEYS, PARAMS, PRIOR

RIDGE = 0.02  # pull of the prior, per parameter, in log space (keeps parameters sane where data cannot tell)
BOUNDS = {"eff": (1e-4, 4.0), "mem_eff": (1e-3, 4.0), "overlap": (1e-3, 1.0), "op_overhead_us": (0.01, 5e4),
          "fixed_overhead_us": (0.1, 5e5)}


@dataclass
class Sample:
    label: str
    spec: str  # "case:NAME" or "timm:NAME@SIZE"
    measured_ms: float
    costs: list[OpCost]


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--measurements {path}", "does not exist", "give the CSV written by `slimx devices "
                         "microbench` or a published table such as shared/data/iphone12_coreml.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise UsageError(f"--measurements {path}", "has no rows", "give a CSV with a header and measurements")
    cols = set(rows[0])
    if not ({"case", "median_ms"} <= cols or {"timm_name", "latency_ms", "runtime"} <= cols):
        raise UsageError(f"--measurements {path}", f"has columns {sorted(cols)}, neither a microbench CSV "
                         "(case, setting, median_ms) nor a published table (timm_name, input_size, runtime, "
                         "latency_ms)", "use `slimx devices microbench` to write one")
    return rows


def assign_rows(rows: list[dict], device) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Group measurement rows by the device setting they calibrate; count what was skipped and why."""
    settings = device.estimator
    groups: dict[str, list[dict]] = {}
    skipped: dict[str, int] = {}

    def skip(why):
        skipped[why] = skipped.get(why, 0) + 1

    for row in rows:
        if "case" in row:
            key = row.get("setting") or ""
            if key not in settings:
                skip(f"setting {key!r} not in the {device.name} profile")
                continue
            groups.setdefault(key, []).append(row)
            continue
        if not (row.get("timm_name") or "").strip():
            skip("no timm model for the row")
            continue
        runtime = (row.get("runtime") or "").lower()
        placed = False
        for key, setting in settings.items():
            words = [w.lower() for w in setting.match]
            if not words or not all(w in runtime for w in words):
                continue
            if any(w.lower() in runtime for w in setting.exclude):
                continue
            want_device = setting.match_device or device.match_device
            if want_device and want_device.lower() not in (row.get("device") or "").lower():
                continue
            groups.setdefault(key, []).append(row)
            placed = True
            break
        if not placed:
            skip("runtime/device matches no setting of this profile")
    return groups, skipped


def model_op_mix(spec: str, input_shapes: list[str] | None = None, weights=None, program=None) -> list[OpCost]:
    """Op mix of a MODEL spec in its deployment form (cached for timm/builtin specs given without weights).

    ``program``: the spec's Program when the caller has already prepared it (saves a second export).
    """
    from slimx.export.program import prepare_program

    def make():
        nonlocal program
        if program is None:
            _, program, _ = prepare_program(spec, input_shapes=input_shapes, weights=weights)
        if program.exported is None:
            raise UsageError(f"model {spec}", "the estimator reads the PyTorch graph, and an ONNX file has none",
                             "pass the PyTorch model, or measure the file with --measure")
        return op_mix(program.exported)

    cacheable = weights is None and (spec.startswith("timm:") or spec == "minilm")
    return cached_op_mix(f"{spec}|{input_shapes}", make) if cacheable else make()


def case_op_mix(name: str) -> list[OpCost]:
    from slimx.devices.microbench import case_by_name, case_program

    def make():
        program, _ = case_program(case_by_name(name))
        return op_mix(program.exported)

    return cached_op_mix(f"case:{name}", make)


def samples_for(rows: list[dict], progress=None) -> list[Sample]:
    out = []
    for i, row in enumerate(rows):
        if "case" in row:
            label, spec = row["case"], f"case:{row['case']}"
            try:
                costs = case_op_mix(row["case"])
            except KeyError:
                raise UsageError(f"case {row['case']!r}", "is not in this slimx version's microbench suite",
                                 "re-run `slimx devices microbench` with this version") from None
            measured = float(row["median_ms"])
        else:
            size = int(row.get("input_size") or 224)
            label = f"{row.get('model') or row['timm_name']}"
            spec = f"timm:{row['timm_name']}@{size}"
            if progress is not None:
                progress.note(f"[{i + 1}/{len(rows)}] op mix of {row['timm_name']} at {size}")
            costs = model_op_mix(f"timm:{row['timm_name']}", [f"1x3x{size}x{size}"])
            measured = float(row["latency_ms"])
        out.append(Sample(label, spec, measured, costs))
    return out


def setup_groups(rows: list[dict], table: str = "") -> tuple[np.ndarray, list[str], list[str]]:
    """Measurement setups of one table's published rows, the reference (index 0) being the newest.

    The setups, the reference and which setups are tied to it are a family fit's (``family.family_setups``: the
    timing tool a row names with the versions it states, else the table and its runtime text; the newest by the
    years its sources name, ties: more rows; tied where a model was timed in both, directly or through another
    setup). A setup not tied to the reference gets no factor (it could not be told apart from its models'
    families): here its rows join the reference, where a family fit, with other devices' rows, leaves them out.
    Microbench rows share one setup.

    Returns the setup index of each row (0: the reference), the kept setups' names (in the order the table
    first uses them) and the names of the setups pooled into the reference.
    """
    from slimx.devices.setups import family_setups

    keys, reference, pooled = family_setups([{**row, "table": table} for row in rows])
    kept = [reference] + [k for k in dict.fromkeys(keys) if k != reference and k not in pooled]
    return np.asarray([kept.index(k) if k in kept else 0 for k in keys], dtype=int), kept, pooled


def _bounds(name: str) -> tuple[float, float]:
    if name.startswith("eff_"):
        return BOUNDS["eff"]
    return BOUNDS[name]


def fit_params(features: list[Features], measured: np.ndarray, device, setting: Setting,
               free: tuple[str, ...] = PARAMS, prior: dict | None = None, ridge: float = RIDGE,
               setups: np.ndarray | None = None) -> dict:
    """Least squares on log latency over ``free`` parameters (log-parameterized, bounded), ridge to the prior.

    ``setups`` (one integer per row, 0 = the reference) marks rows timed with another measurement setup
    (app, OS, converter version); each other setup gets a fitted log-offset, a nuisance parameter reported as
    ``setup_offsets`` and not used when estimating (estimates are for the reference setup).
    """
    from scipy.optimize import least_squares

    prior = {**PRIOR, **(prior or {})}
    peak, fallback_peak, bw = rates(device, setting)
    fixed = {p: prior[p] for p in (*PARAMS, "switch_us") if p not in free}
    setups = np.zeros(len(measured), dtype=int) if setups is None else np.asarray(setups)
    n_off = int(setups.max()) if len(setups) else 0
    present = [k for k in range(1, n_off + 1) if np.any(setups == k)]
    x0 = np.concatenate([np.log([prior[p] for p in free]), np.zeros(len(present))])
    lo = np.concatenate([np.log([_bounds(p)[0] for p in free]), np.full(len(present), -1.0)])
    hi = np.concatenate([np.log([_bounds(p)[1] for p in free]), np.full(len(present), 1.0)])
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
    log_meas = np.log(measured)
    n_free = len(free)

    def params_of(x):
        return {**fixed, **dict(zip(free, np.exp(x[:n_free]), strict=True))}

    def offsets_of(x):
        off = np.zeros(n_off + 1)
        off[present] = x[n_free:]
        return off[setups]

    def residuals(x):
        params = params_of(x)
        pred = np.array([total_ms(f, params, peak, fallback_peak, bw) for f in features])
        return np.concatenate([np.log(pred) + offsets_of(x) - log_meas, math.sqrt(ridge) * (x - x0)])

    result = least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0, diff_step=1e-3, max_nfev=400)
    params = params_of(result.x)
    offsets = np.zeros(n_off + 1)
    offsets[present] = result.x[n_free:]
    params["setup_offsets"] = offsets.tolist()
    return params


def predict(features: list[Features], params: dict, device, setting: Setting,
            setups: np.ndarray | None = None) -> np.ndarray:
    peak, fallback_peak, bw = rates(device, setting)
    pred = np.array([total_ms(f, params, peak, fallback_peak, bw) for f in features])
    offsets = params.get("setup_offsets")
    if setups is not None and offsets:
        pred = pred * np.exp(np.asarray(offsets)[np.asarray(setups)])
    return pred


def cross_validate(features: list[Features], measured: np.ndarray, device, setting: Setting,
                   free: tuple[str, ...] = PARAMS, folds: int | None = None, seed: int = 0,
                   setups: np.ndarray | None = None) -> dict:
    """Held-out error: leave-one-out up to 30 rows, else ``folds``-fold (default 5); signed % per row."""
    n = len(measured)
    if n < 3:
        return {"method": "none (fewer than 3 rows)", "errors_pct": []}
    k = n if (folds is None and n <= 30) else (folds or 5)
    order = np.random.default_rng(seed).permutation(n)
    errors = np.empty(n)
    for fold in range(k):
        test = order[fold::k]
        train = np.setdiff1d(order, test)
        sub = None if setups is None else np.asarray(setups)[train]
        params = fit_params([features[i] for i in train], measured[train], device, setting, free, setups=sub)
        pred = predict([features[i] for i in test], params, device, setting,
                       None if setups is None else np.asarray(setups)[test])
        errors[test] = (pred / measured[test] - 1.0) * 100.0
    from slimx.devices.validation import summarize

    return summarize(measured * (1 + errors / 100.0), measured, "leave-one-out" if k == n else f"{k}-fold")


def classes_in(features: list[Features]) -> list[str]:
    """The op classes that have work in at least one row."""
    return sorted({OP_CLASSES[i] for f in features for i in np.unique(f.cls)})


def free_params_for(n_rows: int, classes: list[str]) -> tuple[str, ...]:
    """Which parameters the data can pin down: classes with no work in any row stay at the prior."""
    free = [p for p in PARAMS if not p.startswith("eff_") or p == "eff_vector" or p[4:] in classes]
    if n_rows < 20:  # few rows: fit the dominant terms only, keep the rest at the prior
        free = [p for p in free if p in ("eff_matmul", "eff_conv", "eff_depthwise", "mem_eff", "op_overhead_us",
                                         "fixed_overhead_us")]
    return tuple(free)


def calibrate_device(device, rows: list[dict], data_name: str, progress=None, nested: bool = False,
                     only: list[str] | None = None) -> dict:
    """Fit every setting that has rows; return {setting: {params, cv, rows, ...}} and the skipped counts.

    Each setting gets the per-op model and the baseline (``validation``), both scored by leave-one-family-out;
    the one with the lower grouped error ships (the per-op model on a tie), and its grouped error and interval
    are what estimates state. Fewer than 3 families: leave-one-out, per-op model, and the report says so.
    ``nested``: also measure each model's interval coverage on unseen families (``nested_coverage``; slower).
    ``only``: fit just these settings (the rows of the others are counted as skipped).
    """
    from slimx.devices.validation import (
        baseline_features,
        family_of,
        fit_baseline,
        grouped_cv,
        nested_coverage,
        predict_baseline,
    )

    groups, skipped = assign_rows(rows, device)
    settings = settings_of(device)
    if only:
        unknown = sorted(set(only) - set(settings))
        if unknown:
            raise UsageError(f"--setting {', '.join(unknown)}", f"is not an estimator setting of {device.name}",
                             f"use one of {', '.join(settings)}")
        for key in sorted(set(groups) - set(only)):
            skipped[f"for setting {key}, not asked for"] = len(groups.pop(key))
    if not groups:
        why = "; ".join(f"{n} row(s): {w}" for w, n in skipped.items()) or "no rows"
        raise UsageError(f"measurements for {device.name}", f"no row calibrates any of its settings ({why})",
                         "check the runtime/device columns against the profile's [estimator] match keywords")
    fits = {}
    for key, group in groups.items():
        setting = settings[key]
        samples = samples_for(group, progress)
        feats = [Features.of(s.costs, setting) for s in samples]
        measured = np.array([s.measured_ms for s in samples])
        setups, setup_names, pooled = setup_groups(group, data_name)
        classes = classes_in(feats)
        free = free_params_for(len(samples), classes)
        params = fit_params(feats, measured, device, setting, free, setups=setups)
        pred = predict(feats, params, device, setting, setups)
        offsets = params.pop("setup_offsets")
        families = [family_of(s.spec) for s in samples]
        factor = np.exp(np.asarray(offsets)[setups])  # measured / reference-setup latency, per row

        def per_op(train, test, feats=feats, measured=measured, setting=setting, free=free, setups=setups):
            fit = fit_params([feats[i] for i in train], measured[train], device, setting, free, setups=setups[train])
            offs, held = np.asarray(fit["setup_offsets"]), setups[test]
            off = np.where(held < len(offs), offs[np.minimum(held, len(offs) - 1)], 0.0)  # unseen setup: none
            return predict([feats[i] for i in test], fit, device, setting) * np.exp(off)

        x = np.array([baseline_features(f) for f in feats])

        def baseline(train, test, x=x, measured=measured, factor=factor):
            return predict_baseline(x[test], fit_baseline(x[train], measured[train] / factor[train])) * factor[test]

        cv_op = grouped_cv(len(samples), families, per_op, measured)
        cv_base = grouped_cv(len(samples), families, baseline, measured)
        coef = fit_baseline(x, measured / factor)
        if cv_op.get("errors_pct"):
            model = "per-op" if cv_op["mape_pct"] <= cv_base["mape_pct"] else "baseline"
            cv = cv_op if model == "per-op" else cv_base
        else:  # too few families to leave one out: leave-one-row-out, the per-op model
            model, cv = "per-op", cross_validate(feats, measured, device, setting, free, setups=setups)
        fitted = pred if model == "per-op" else predict_baseline(x, coef) * factor
        fits[key] = {"params": params, "free": list(free), "cv": cv, "rows": len(samples), "data": data_name,
                     "classes": classes, "model": model, "baseline": coef,
                     "cv_per_op": {k: v for k, v in cv_op.items() if k != "errors_pct"},
                     "cv_baseline": {k: v for k, v in cv_base.items() if k != "errors_pct"},
                     "families": sorted(set(families)),
                     "setup": setup_names[0] if setup_names else "",
                     "pooled_setups": pooled,
                     "setups": [{"setup": name, "factor": round(math.exp(off), 4), "rows": int(np.sum(setups == i))}
                                for i, (name, off) in enumerate(zip(setup_names, offsets, strict=True))],
                     "table": [{"label": s.label, "family": fam, "measured_ms": round(s.measured_ms, 4),
                                "fitted_ms": round(float(p), 4),
                                "held_out_error_pct": cv["errors_pct"][i] if cv["errors_pct"] else None}
                               for i, (s, fam, p) in enumerate(zip(samples, families, fitted, strict=True))]}
        if nested:
            fits[key]["coverage"] = {"per-op": nested_coverage(families, per_op, measured),
                                     "baseline": nested_coverage(families, baseline, measured)}
        if progress is not None:
            progress.note(f"{key}: {len(samples)} rows, {len(set(families))} families; {cv['method']} error: "
                          f"per-op {cv_op.get('mape_pct', float('nan')):.1f}%, baseline "
                          f"{cv_base.get('mape_pct', float('nan')):.1f}%; ships {model}")
    return {"fits": fits, "skipped": skipped}


# --- writing the profile ---------------------------------------------------------------------------------

BEGIN = ">>> estimator settings: written by `slimx devices calibrate`; hand edits to match/unit/dtype are kept"


def _plain(value):
    """A value as TOML writes it here: floats to 6 decimals, tuples as arrays."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def estimator_table(estimator: dict, default: str | None):
    """The ``[estimator]`` table (a tomlkit table: written into a profile file, its comments kept)."""
    import tomlkit

    table = tomlkit.table()
    if default:
        table.add("default", default)
    for key, settings in estimator.items():
        sub = tomlkit.table()
        for name, value in settings.items():
            sub.add(name, _plain(value))
        table.add(key, sub)
    return table


_FIT_KEYS = (*PARAMS, "switch_us", "expected_error_pct", "fit_rows", "fit_classes", "fit_setups", "fit_host",
             "model", *BASELINE_KEYS, "interval_low", "interval_high", "cv_method", "fit_families", "setup",
             "per_op_error_pct", "baseline_error_pct", "spearman")


def merged_estimator(device, fits: dict) -> dict:
    """The profile's estimator tables with the new fits written in (every figure with its source)."""
    today = _dt.date.today().isoformat()
    out = {}
    for key, table in device.raw.get("estimator", {}).items():
        if not isinstance(table, dict):
            continue
        table = dict(table)
        fit = fits.get(key)
        if fit is not None:
            for name in [n for n in table if n.split("_source")[0] in _FIT_KEYS]:
                table.pop(name)
            table.pop("scaled_from", None)
            where = f"fitted by `slimx devices calibrate` on {fit['data']} ({fit['rows']} rows, {today})"
            for name, value in fit["params"].items():
                table[name] = round(float(value), 6)
                table[f"{name}_source"] = where if name in fit["free"] else PRIOR_NOTE
            cv = fit["cv"]
            if cv.get("mape_pct") is not None:
                table["expected_error_pct"] = cv["mape_pct"]
                table["expected_error_pct_source"] = (f"{cv['method']} mean absolute error of the {fit['model']} "
                                                      f"fit on {fit['data']} ({today}); median "
                                                      f"{cv['median_abs_pct']:.1f}%, within ±15%: "
                                                      f"{cv['within_15pct'] * 100:.0f}% of rows")
                table["cv_method"] = cv["method"]
            if "model" in fit:
                table["model"] = fit["model"]
                table["model_source"] = (
                    f"the fit with the lower {cv['method']} error on {fit['data']} ({today}): per-op "
                    f"{fit['cv_per_op'].get('mape_pct', 'n/a')}%, baseline {fit['cv_baseline'].get('mape_pct', 'n/a')}%"
                    if fit["cv_per_op"].get("mape_pct") is not None else
                    "per-op (too few families in the data to compare it with the baseline by grouped CV)")
                for name in BASELINE_KEYS:
                    table[name] = round(float(fit["baseline"][name]), 6)
                    table[f"{name}_source"] = f"baseline fitted by `slimx devices calibrate` on {fit['data']} ({today})"
                table["fit_families"] = fit["families"]
                for name, part in (("per_op_error_pct", "cv_per_op"), ("baseline_error_pct", "cv_baseline")):
                    if fit[part].get("mape_pct") is not None:
                        table[name] = fit[part]["mape_pct"]
                        table[f"{name}_source"] = (f"{fit[part]['method']} mean absolute error on {fit['data']} "
                                                   f"({today})")
            if fit.get("setup"):
                table["setup"] = fit["setup"][:160]
                table["setup_source"] = (
                    f"the newest measurement setup in {fit['data']}: estimates are for it"
                    + (f"; pooled with it (no model timed in both, so no factor can be told apart from the "
                       f"families): {'; '.join(p[:80] for p in fit['pooled_setups'])}" if fit["pooled_setups"] else ""))
            if cv.get("interval_factors"):
                table["interval_low"], table["interval_high"] = cv["interval_factors"]
                table["interval_low_source"] = table["interval_high_source"] = (
                    f"conformal ranks of measured / estimated over the {cv['method']} held-out rows of "
                    f"{fit['data']} ({today}): sized to cover 80% of unseen models")
                table["spearman"] = cv["spearman"]
                table["spearman_source"] = (f"rank correlation of the {cv['method']} held-out estimates with the "
                                            f"measurements of {fit['data']} ({today})")
            table["fit_rows"] = fit["rows"]
            table["fit_rows_source"] = where
            table["fit_classes"] = fit["classes"]
            if device.measured:  # the host's figures are per machine: say which one this fit is from
                from slimx.devices.host import cpu_model

                table["fit_host"] = cpu_model()
            if len(fit.get("setups", [])) > 1:  # nuisance factors: how the other setups' timings compare
                table["fit_setups"] = [f"x{s['factor']:.3f} ({s['rows']} rows): {s['setup'][:90]}"
                                       for s in fit["setups"]]
        out[key] = table
    return out


PRIOR_NOTE = "slimx prior, not fitted (the data has too few rows or no work of this kind to pin it down)"


def write_profile(path: Path, source_text: str, estimator: dict, default: str | None) -> Path:
    """Replace (or add) the estimator tables of a profile file, keeping every other line and comment (tomlkit);
    written atomically."""
    import tomllib

    import tomlkit

    tomllib.loads(source_text)  # a broken profile is refused as TOML's own error, before anything is written
    doc = tomlkit.parse(source_text)
    if "estimator" not in doc:
        doc.add(tomlkit.nl())
        doc.add(tomlkit.comment(BEGIN))
    doc["estimator"] = estimator_table(estimator, default)
    text = tomlkit.dumps(doc)
    tomllib.loads(text)  # never write a profile that does not parse
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def calibrate(device_name: str, measurements: Path, out: Path | None = None, progress=None,
              only: list[str] | None = None) -> dict:
    """Fit ``device_name`` on a measurements CSV and write the fitted settings into its profile.

    The profile is written to ``out`` if given; else, for the measured host (figures differ per machine)
    or a profile that cannot be written in place, to the user profile folder; else in place.
    Returns the fits, the skipped-row counts and the path written. ``only``: fit just these settings.
    """
    import os

    from slimx.devices.registry import load_device, profile_path, reload_profiles, user_profile_dir

    device = load_device(device_name)
    source_path = profile_path(device.name)
    result = calibrate_device(device, read_rows(measurements), Path(measurements).name, progress, only=only)
    estimator = merged_estimator(device, result["fits"])
    default = device.estimator_default
    if out is None:
        in_place_ok = not device.measured and os.access(source_path, os.W_OK)
        out = source_path if in_place_ok else user_profile_dir() / source_path.name
    result["path"] = write_profile(Path(out), source_path.read_text(), estimator, default)
    reload_profiles()
    return result


def scale_from(device_name: str, base_name: str, extra_error_pct: float = 15.0, out: Path | None = None) -> dict:
    """Give ``device_name`` the fitted efficiencies of ``base_name`` (same family), with its own peak rates.

    The efficiencies and overheads carry over; the peaks and bandwidth are the newer device's. The stated
    error is the base fit's held-out error plus ``extra_error_pct``, because the transfer itself is not measured.
    """
    from slimx.devices.registry import load_device, profile_path, reload_profiles
    from slimx.devices.setups import family_of_device

    device, base = load_device(device_name), load_device(base_name)
    family = family_of_device(device.name)
    if family is not None:
        raise UsageError(f"--scale-from {base_name}", f"{device.name} belongs to the {family.name} family, whose fit "
                         "measures the transfer to a device without rows (leave-one-device-out) instead of adding a "
                         "flat margin", f"run `slimx devices calibrate --family {family.name} --measurements CSV ...`")
    base_settings = {k: v for k, v in base.raw.get("estimator", {}).items() if isinstance(v, dict)}
    estimator = {}
    copied = []
    for key, table in device.raw.get("estimator", {}).items():
        if not isinstance(table, dict):
            continue
        table = {k: v for k, v in table.items()
                 if k.split("_source")[0] not in _FIT_KEYS}
        src = base_settings.get(table.get("scale_setting", key))
        if src and "expected_error_pct" in src:
            for name in (*PARAMS, "switch_us"):
                if name in src:
                    table[name] = src[name]
                    table[f"{name}_source"] = f"scaled from {base.name} ({src.get(name + '_source', '')})"
            # the per-op model is what carries over by peak rates: its own held-out error, whichever model the
            # base ships
            base_error = float(src.get("per_op_error_pct", src["expected_error_pct"]))
            table["expected_error_pct"] = round(base_error + extra_error_pct, 1)
            how = f", {src['cv_method']}" if "cv_method" in src else ""
            table["expected_error_pct_source"] = (
                f"{base.name}'s per-op held-out error ({base_error}%{how}) plus {extra_error_pct:g} points for "
                f"carrying its efficiencies over to {device.name} by peak rates (not measured on {device.name})")
            table["cv_method"] = (
                f"{src['cv_method']} on {base.name}, + {extra_error_pct:g} points for the transfer"
                if "cv_method" in src else f"{base.name}'s held-out error + {extra_error_pct:g} points")
            table["scaled_from"] = base.name
            table["fit_classes"] = src.get("fit_classes", [])
            copied.append(key)
        estimator[key] = table
    if not copied:
        raise UsageError(f"--scale-from {base_name}", f"has no calibrated setting that {device_name} declares",
                         f"calibrate {base_name} first, or give the settings a scale_setting key")
    path = Path(out) if out else profile_path(device.name)
    default = device.estimator_default
    write_profile(path, profile_path(device.name).read_text(), estimator, default)
    reload_profiles()
    return {"settings": copied, "path": path}
