"""Anchoring, validated leave-one-setup-out on the published tables (``../shared/data``).

For each device family and each measurement setup in its data: the family is fitted without any row of that setup
(on any device), which is what a user whose own setup is not in the data gets (k = 0); then, for each device timed
in that setup, k = 1, 2, 3 of its rows are taken as the user's anchors (every choice of k, or 200 random ones
where there are more) and the device's other rows of that setup are predicted, anchored (``devices.anchors``:
a factor for each part of the estimate, compute, memory and per-layer work, each shrunk toward the profile's by
the spread the family's other setups show; the interval from the scatter around each setup's own line and the
parts' uncertainty). The scatter and the parts' spread each left-out setup uses are measured on the *other*
setups only (nested). Beside it, the same anchors on a line in op density and as one factor (slimx before), and a
naive baseline of the same shape: non-negative least squares of latency on GMACs, op count and a constant over
the same training rows, anchored the same way (its split: the GMACs term, the op and constant terms).

    python bench/anchoring.py          # also run by bench/estimator_generalization.py; writes into its results
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_DRAWS = 200
KS = (0, 1, 2, 3)


def naive_leave_one_setup_out(data) -> tuple[np.ndarray, np.ndarray]:
    """The naive baseline: t = a GMACs + b ops + c (non-negative, relative error), fitted on the other setups'
    rows of every device of the family, no device specs, no setup factors; with its split (compute a GMACs, no
    memory term, per-layer b ops + c)."""
    from slimx.devices.validation import baseline_parts, fit_baseline, predict_baseline

    x = np.column_stack([data.x[:, 0], data.x[:, 2], np.zeros(len(data.y)), data.x[:, 3]])  # [G, O, 0, 1]
    pred = np.full(len(data.y), np.nan)
    parts = np.full((len(data.y), 3), np.nan)
    for u in sorted(set(data.setups)):
        test = np.array([s == u for s in data.setups])
        if (~test).sum() < 5:
            continue
        coef = fit_baseline(x[~test], data.y[~test])
        pred[test] = predict_baseline(x[test], coef)
        parts[test] = baseline_parts(x[test], coef)
    return pred, parts


def cells_of(data, pred: np.ndarray) -> dict:
    """(setup, device) -> row indices with a prediction."""
    cells: dict = {}
    for i, (u, d) in enumerate(zip(data.setups, data.devices, strict=True)):
        if np.isfinite(pred[i]):
            cells.setdefault((u, d), []).append(i)
    return cells


def densities_of(data) -> np.ndarray:
    """Each row's op density (``devices.anchors.op_density``: thousands of ops per GMAC, log)."""
    from slimx.devices.anchors import op_density

    return np.array([op_density(round(o * 1e3), g) for g, o in zip(data.x[:, 0], data.x[:, 2], strict=True)])


def shares_of(parts: np.ndarray) -> np.ndarray:
    """Each row's [compute, memory, per-layer] split as fractions of its prediction."""
    return parts / parts.sum(axis=1, keepdims=True)


def score(data, pred: np.ndarray, how: str = "parts", parts: np.ndarray | None = None, seed: int = 0,
          bands: dict | None = None) -> dict:
    """Per k: the (cell, draw, row) errors and whether each row fell in its stated interval. ``how``: ``parts``
    (a factor per part of the estimate, each shrunk by the spread the other setups' cells show; ``parts``: each
    prediction's split), ``line`` (a line in op density, the scatter and slope spread from the other setups'
    cells) or ``one`` (one factor). k = 0: the interval a setup not anchored is stated (``unanchored_interval``),
    the device's profile interval (``bands``: device -> its shipped interval factors; a device without one: the
    other setups' within-setup scatter) in quadrature with the other setups' spread between setups."""
    from scipy.stats import t

    from slimx.devices.anchors import (
        PRIOR_WEIGHT,
        between_setup_sd,
        combine,
        combine_parts,
        part_spread,
        setup_spread,
        unanchored_interval,
        within_setup_sd,
    )
    from slimx.devices.validation import INTERVAL_COVERAGE, spearman

    rng = np.random.default_rng(seed)
    logr = np.log(data.y / pred)
    z = densities_of(data)
    shares = shares_of(parts) if parts is not None else None
    cells = cells_of(data, pred)
    out = {k: {"err": [], "w": [], "inside": [], "device": [], "setup": []} for k in KS}
    spearmans = []
    spreads: dict = {}  # left-out setup -> what its other setups' cells show (the same for each of its devices)
    before = []  # k = 0 under the profile's interval alone: (inside, weight)
    for (u, d), idx in sorted(cells.items()):
        others = {c: v for c, v in cells.items() if c[0] != u}
        if u not in spreads:
            groups = [logr[v] for v in others.values()]
            if how == "one":
                sd0, tau = within_setup_sd(groups), 0.0
            else:
                spread = setup_spread([(logr[v], z[v]) for v in others.values()])
                sd0, tau = spread["line_sd"], spread["slope_sd"]
            part_sd = (part_spread([(logr[v], shares[v]) for v in others.values()], sd0)["part_sd"]
                       if how == "parts" else None)
            spreads[u] = (sd0, tau, part_sd, between_setup_sd(groups), within_setup_sd(groups),
                          len({c[0] for c in others}))
        sd0, tau, part_sd, setup_sd, scatter, n_setups = spreads[u]
        # k = 0: what the estimate states for a setup not anchored (devices.anchors.unanchored); before: the
        # profile's interval alone
        half = float(t.ppf(0.5 + INTERVAL_COVERAGE / 2, PRIOR_WEIGHT)) * scatter
        band = (bands or {}).get(d) or [math.exp(-half), math.exp(half)]
        lo, hi = unanchored_interval(band, setup_sd, n_setups)
        before += [(band[0] <= math.exp(logr[i]) <= band[1], 1.0 / len(idx)) for i in idx]
        if len(idx) >= 3:
            spearmans.append((spearman(pred[idx], data.y[idx]), len(idx)))
        for k in KS:
            if k and len(idx) <= k:
                continue
            draws = [()] if k == 0 else list(itertools.combinations(idx, k))
            if len(draws) > MAX_DRAWS:
                draws = [draws[j] for j in rng.choice(len(draws), MAX_DRAWS, replace=False)]
            pairs = []
            for anchors in draws:
                rest = [i for i in idx if i not in anchors]
                for i in rest:
                    if k == 0:
                        f, band = 1.0, (lo, hi)
                    elif how == "parts":
                        got = combine_parts(list(logr[list(anchors)]), shares[list(anchors)], shares[i], sd0,
                                            part_sd, PRIOR_WEIGHT)
                        f, band = got["factor"], got["interval_factors"]
                    else:
                        got = combine(list(logr[list(anchors)]), sd0, PRIOR_WEIGHT, densities=list(z[list(anchors)]),
                                      target=float(z[i]), slope_sd=tau)
                        f, band = got["factor"], got["interval_factors"]
                    ratio = data.y[i] / (pred[i] * f)
                    pairs.append((abs(1 / ratio - 1) * 100, band[0] <= ratio <= band[1]))
            for err, inside in pairs:
                out[k]["err"].append(err)
                out[k]["w"].append(1.0 / len(pairs))
                out[k]["inside"].append(inside)
                out[k]["device"].append(d)
                out[k]["setup"].append(u)
    every = setup_spread([(logr[v], z[v]) for v in cells.values()])
    every_groups = [logr[v] for v in cells.values()]
    seen = z[[i for v in cells.values() for i in v]]
    every_parts = (part_spread([(logr[v], shares[v]) for v in cells.values()], every["line_sd"])["part_sd"]
                   if shares is not None else None)
    return {"by_k": out, "within_setup_sd": within_setup_sd(every_groups),
            "setup_sd": between_setup_sd(every_groups),
            "k0_coverage_before": sum(i * w for i, w in before) / sum(w for _, w in before) if before else None,
            "line_sd": every["line_sd"], "slope_sd": every["slope_sd"], "part_sd": every_parts,
            "density_range": [round(float(seen.min()), 2), round(float(seen.max()), 2)],
            "spearman": (sum(s * n for s, n in spearmans) / sum(n for _, n in spearmans)
                         if spearmans else float("nan")),
            "cells": {f"{u} / {d}": len(v) for (u, d), v in cells.items()}}


def summarise(scored: dict) -> dict:
    from slimx.devices.validation import weighted_median

    rows = {}
    for k, part in scored["by_k"].items():
        if not part["err"]:
            continue
        err, w, inside = np.array(part["err"]), np.array(part["w"]), np.array(part["inside"], dtype=float)
        w = w / w.sum()
        per_device = {}
        for d in sorted(set(part["device"])):
            on = np.array([dd == d for dd in part["device"]])
            per_device[d] = {"median_abs_pct": round(weighted_median(err[on], w[on]), 1),
                             "coverage": round(float(np.sum(w[on] * inside[on]) / np.sum(w[on])), 3),
                             "cells": len({s for s, dd in zip(part["setup"], part["device"], strict=True) if dd == d})}
        cells = len(set(zip(part["setup"], part["device"], strict=True)))
        rows[k] = {"median_abs_pct": round(weighted_median(err, w), 1),
                   "within_15pct": round(float(np.sum(w * (err <= 15))), 3),
                   "coverage": round(float(np.sum(w * inside)), 3), "cells": cells, "per_device": per_device}
    return rows


def profile_bands(family: str, devices: list[str]) -> dict:
    """Each device's stated interval factors as its shipped profile gives them in the family's setting (what an
    un-anchored estimate starts from); devices without one are left out."""
    from slimx._core.errors import UsageError
    from slimx.devices import load_device
    from slimx.devices.estimator import settings_of
    from slimx.devices.setups import FAMILIES

    out = {}
    for d in devices:
        try:
            setting = settings_of(load_device(d)).get(FAMILIES[family].setting)
        except UsageError:  # a device the profiles do not ship: no band of its own
            continue
        if setting is not None and setting.interval is not None:
            out[d] = [float(v) for v in setting.interval]
    return out


def run(data_dir: Path = DATA, families: dict | None = None) -> dict:
    """``families``: name -> (tables, structure) where ``structure`` is the (setup offsets, per-layer speed) the
    family's calibration chose (default: without offsets, the fp32 peak)."""
    from estimator_generalization import FAMILY_TABLES

    from slimx.devices.anchors import PRIOR_WEIGHT
    from slimx.devices.calibrate import read_rows
    from slimx.devices.family import family_data, leave_one_setup_out

    out = {"prior_weight": PRIOR_WEIGHT, "families": []}
    for name, tables in FAMILY_TABLES:
        structure = (families or {}).get(name, (False, "fp32 peak"))
        print(f"anchoring: family {name} ...", file=sys.stderr)
        data = family_data(name, [(t, read_rows(data_dir / t)) for t in tables])
        entry = {"family": name, "tables": list(tables), "setups": sorted(set(data.setups)), "rows": len(data.y)}
        if len(set(data.setups)) < 2:
            entry["why"] = f"one measurement setup in its data ({data.setups[0]}): no setup to leave out"
            out["families"].append(entry)
            continue
        slimx, parts = leave_one_setup_out(data, *structure, with_parts=True)
        naive, naive_parts = naive_leave_one_setup_out(data)
        bands = profile_bands(name, sorted(set(data.devices)))
        for method, pred, how, split in (("slimx", slimx, "parts", parts), ("slimx_line", slimx, "line", None),
                                         ("slimx_one_factor", slimx, "one", None),
                                         ("naive", naive, "parts", naive_parts)):
            print(f"anchoring: family {name}, {method} ...", file=sys.stderr)
            scored = score(data, pred, how, split, bands=None if method == "naive" else bands)
            entry[method] = {"by_k": summarise(scored), "spearman": round(scored["spearman"], 3),
                             "cells": scored["cells"], "within_setup_sd": round(scored["within_setup_sd"], 4),
                             "line_sd": round(scored["line_sd"], 4), "slope_sd": round(scored["slope_sd"], 4),
                             "part_sd": None if scored["part_sd"] is None else [round(v, 4) for v in
                                                                                 scored["part_sd"]],
                             "density_range": scored["density_range"], "setup_sd": round(scored["setup_sd"], 4),
                             "k0_coverage_before": scored["k0_coverage_before"]}
        out["families"].append(entry)
    return out


def at_k(method: dict, k: int) -> dict | None:
    """A method's summary at k anchors, whether the result is fresh (integer keys) or read back from its JSON
    (string keys)."""
    by_k = method.get("by_k", {})
    return by_k.get(k, by_k.get(str(k)))


def render(result: dict) -> list[str]:
    lines = ["", "## Anchoring: a setup the fit never saw, and k of its own rows as anchors", "",
             "Leave-one-setup-out (`bench/anchoring.py`): each measurement setup's rows (every device) are predicted "
             "by a family fit without any of them (k = 0: what a user whose setup is not in the data gets); then, per "
             "device timed in that setup, k of its rows are the anchors (every choice, at most "
             f"{MAX_DRAWS} random ones) and its other rows of that setup are predicted (`devices/anchors.py`). "
             "slimx anchors each part of the estimate (compute, memory, per-layer work, as the fit prices them) with "
             "a factor of its own: a setup's kernels, memory traffic and per-layer dispatch each cost what they cost "
             "there; the factors are the anchors' least squares with each part's log factor shrunk toward 0 (the "
             "profile's) by how far the family's other setups move it, the 80% interval from the scatter around each "
             "setup's line (both measured on the other setups only; Student's t at prior weight "
             f"{result['prior_weight']}) and the parts' uncertainty at the model estimated. `line in op density`: "
             "the same anchors' mean log ratio plus a slope in log ops per GMAC shrunk by the other setups' slope "
             "spread (slimx before the parts). `one factor`: one mean log ratio (slimx before the line). Each "
             "(setup, device) cell counts equally. Naive: non-negative least squares on GMACs, op count and a "
             "constant over the same training rows, no specs, anchored by parts the same way. Spearman: within "
             "each cell (a constant factor does not change it), weighted by the cell's rows. k = 0 coverage: the "
             "interval an estimate states for a setup not anchored (`devices.anchors.unanchored`): the device's "
             "shipped profile interval (a model family unseen, its setup the profile's) in quadrature with the spread "
             "between setups (the root mean square of each cell's median log ratio) times Student's t at as many "
             "degrees of freedom as setups it was measured on, both from the other setups only; the naive "
             "baseline, which has no profile interval, takes the other setups' within-setup scatter in its place.",
             "",
             "| family | setups left out | k | slimx median error | within ±15% | coverage (80% stated) | line in op "
             "density: median error / coverage | one factor: median error / coverage | naive median error | naive "
             "coverage |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fam in result["families"]:
        if "why" in fam:
            lines.append(f"| {fam['family']} | - | - | not measurable: {fam['why']} | | | | | |")
            continue
        for k in KS:
            s, n = at_k(fam["slimx"], k), at_k(fam["naive"], k)
            one, line = at_k(fam.get("slimx_one_factor", {}), k), at_k(fam.get("slimx_line", {}), k)
            if s is None:
                continue
            lines.append(f"| {fam['family']} | {len(fam['setups'])} ({s['cells']} cells) | {k} | "
                         f"{s['median_abs_pct']:.1f}% | {s['within_15pct'] * 100:.0f}% | {s['coverage'] * 100:.0f}% | "
                         + (f"{line['median_abs_pct']:.1f}% / {line['coverage'] * 100:.0f}% | " if line else "- | ")
                         + (f"{one['median_abs_pct']:.1f}% / {one['coverage'] * 100:.0f}% | " if one else "- | ")
                         + (f"{n['median_abs_pct']:.1f}% | {n['coverage'] * 100:.0f}% |" if n else "- | - |"))
    lines += ["", "Spearman within a setup (slimx / naive): " + "; ".join(
        f"{f['family']} {f['slimx']['spearman']:.2f} / {f['naive']['spearman']:.2f}" for f in result["families"]
        if "why" not in f) + ". Within-setup spread (sd of log measured/estimated after each cell's own factor, "
        "all setups): " + "; ".join(f"{f['family']} {f['slimx']['within_setup_sd']:.3f}" for f in result["families"]
                                    if "why" not in f) + ". Around each setup's own line in op density (scatter / "
        "slope spread, all setups; `devices/anchoring.toml`): " + "; ".join(
            f"{f['family']} {f['slimx']['line_sd']:.3f} / {f['slimx']['slope_sd']:.3f} over densities "
            f"{f['slimx']['density_range'][0]:.2f} to {f['slimx']['density_range'][1]:.2f}" for f in result["families"]
            if "why" not in f and "line_sd" in f["slimx"]) + ". The parts' spread between setups (sd of each part's "
        "log factor, compute / memory / per-layer, by expectation-maximisation over all setups' cells; "
        "`devices/anchoring.toml` part_log_sd): " + "; ".join(
            f"{f['family']} " + " / ".join(f"{v:.3f}" for v in f["slimx"]["part_sd"]) for f in result["families"]
            if "why" not in f and f["slimx"].get("part_sd")) + ". Between setups (root mean square of each cell's "
        "median log ratio, all setups; `devices/anchoring.toml` setup_log_sd): " + "; ".join(
            f"{f['family']} {f['slimx']['setup_sd']:.3f}" for f in result["families"]
            if "why" not in f and f["slimx"].get("setup_sd") is not None) + ". k = 0 coverage with the profile's "
        "interval alone (slimx before it stated a setup not anchored): " + "; ".join(
            f"{f['family']} {f['slimx']['k0_coverage_before'] * 100:.0f}%" for f in result["families"]
            if "why" not in f and f["slimx"].get("k0_coverage_before") is not None) + ".", "",
              "Per device (slimx; median error / coverage, per k):", ""]
    for fam in result["families"]:
        if "why" in fam:
            continue
        devices = sorted({d for part in fam["slimx"]["by_k"].values() for d in part["per_device"]})
        for d in devices:
            cells = []
            for k in KS:
                part = (at_k(fam["slimx"], k) or {}).get("per_device", {}).get(d)
                if part:
                    cells.append(f"k={k} {part['median_abs_pct']:.1f}% / {part['coverage'] * 100:.0f}%")
            lines.append(f"- {fam['family']} / {d}: " + "; ".join(cells))
    lines += ["", "Cells (setup / device: rows): " + "; ".join(
        f"{c}: {n}" for f in result["families"] if "why" not in f for c, n in f["slimx"]["cells"].items()) + "."]
    return lines


def main() -> int:
    import json

    from _results import write_results
    from estimator_generalization import render as render_all

    path = Path(__file__).parent / "results" / "estimator_generalization.json"
    result = json.loads(path.read_text()) if path.is_file() else {"fits": [], "families": []}
    structures = {f["family"]: (f["setup_offsets"], f["per_layer_speed"]) for f in result.get("families", [])
                  if "setup_offsets" in f}
    result["anchoring"] = run(DATA, structures)
    write_results("estimator_generalization", result, render_all(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
