"""Devices of a family learn from each other: one latency model over every device of a family that has published
measurements, with per-device terms tied to the devices' published specs, so that a device without rows (Jetson
Orin, iPhone 15 Pro) is predicted from how latency moved between the devices that have them.

For model m on device d (GMACs G, priced op count O, GB moved B from the model's op mix)::

    t(d, m) = f_d * [ a * G * (P0 / P_d)^alpha  +  w * B * (W0 / W_d)^gamma  +  (b * O + c) * (K0 / K_d)^beta ]

P_d is the compute unit's peak for the setting's dtype (fp16 for TensorRT and the Neural Engine), W_d the memory
bandwidth, K_d the speed of the unit's per-layer work (the fp32 peak, cores x clock, or the dtype's peak, whichever
gives the family the lower leave-one-device-out error; on the Neural Engine both are its own peak); a, w, b,
c >= 0 and the exponents fitted together (soft-L1 least squares on log latency), and f_d a per-device factor for
devices with rows (shrunk towards 1 by their row count; 1 for a device without rows). The fit replaces
``--scale-from``'s flat +15 points with measured ones:

Rows are timed in measurement setups (``setup_of``: the timing tool and the OS / app / converter versions a row
states, so the iPhone 14's Xcode 14 report rows share the iPhone 12's setup); a row in setup s is predicted as
``g_s * t(d, m) + o_s``, the reference setup (the configuration the family's settings describe where it names one,
else the newest) having g = 1, o = 0. The fixed times o_s are fitted only
where they lower the family's leave-one-device-out error (they do for Jetson, where torch2trt adds about half a
millisecond per call whatever the device; they do not for the Apple tables): the family's model structure (fixed
times or not, which per-layer speed) is the one of four with the lowest such error.

- a device without rows states the **leave-one-device-out** error: each device with rows predicted by a family
  fit that never saw it (f = 1), each device weighted equally whatever its row count, the interval from those
  residuals;
- a device with rows states the **leave-one-family-out** error of its own rows under the family fit (its rows'
  model families left out in turn, all devices' rows of that family with them).

The result for each member is an ordinary ``baseline`` setting (its coefficients evaluated at that device's
specs), so the estimator needs nothing new.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

from slimx._core.errors import UsageError
from slimx.devices.setups import (  # noqa: F401  (the family names, re-exported)
    FAMILIES,
    Family,
    Member,
    family_of_device,
    family_setups,
    setup_of,
)

EXPONENT_MAX = 1.5  # the spec exponents' upper bound (1: latency inversely proportional to the spec)
ROBUST_SCALE = 0.3  # soft-L1 loss scale on log latency: residuals beyond about 30% count linearly
SHRINK_ROWS = 4  # a device factor from n rows is pulled towards 1 as n / (n + SHRINK_ROWS)
# a device with rows cuts its interval from its own held-out rows only when they span this many model families:
# with two (Pixel 1: MobileNetV2 and V3), leaving one out leaves the other's narrow spread to speak for it
OWN_BAND_FAMILIES = 4


# what the per-layer speed K of a device is taken to be: its unit's fp32 peak (cores x clock), or the peak for the
# setting's dtype (on Volta and Ampere the tensor cores'); each family keeps the one its leave-one-device-out error
# prefers
PER_LAYER_SPEEDS = ("fp32 peak", "dtype peak")


def specs(device, setting, per_layer: str = "fp32 peak") -> tuple[float, float, float]:
    """(P, W, K): the unit's peak for the setting's dtype, the memory bandwidth, and the per-layer speed proxy."""
    from slimx.devices.estimator import bandwidth_gbs, peak_gops

    peak = peak_gops(device, setting.unit, setting.dtype)
    fp32 = next((cu.peak("fp32") for cu in device.compute_units if cu.name == setting.unit), None)
    return peak, bandwidth_gbs(device), float(fp32 or peak) if per_layer == "fp32 peak" else float(peak)


@dataclass
class FamilyFit:
    coef: np.ndarray  # a, w, b, c
    exponents: tuple[float, float, float]  # alpha, gamma, beta
    ref: tuple[float, float, float]  # P0, W0, K0
    device_factor: dict  # device -> f_d
    setup_factor: dict = field(default_factory=dict)  # measurement setup -> its factor (the reference's is 1)
    setup_offset_ms: dict = field(default_factory=dict)  # measurement setup -> the time it adds (host-side work)
    reference_setup: str = ""

    def terms(self, spec: tuple[float, float, float]) -> np.ndarray:
        """The multipliers of [G, B, O, 1] on a device with ``spec`` (P, W, K)."""
        (p0, w0, k0), (alpha, gamma, beta) = self.ref, self.exponents
        p, w, k = spec
        over = (k0 / k) ** beta
        return np.array([(p0 / p) ** alpha, (w0 / w) ** gamma, over, over])

    def predict(self, x: np.ndarray, spec: tuple, device: str | None = None, setup: str | None = None) -> np.ndarray:
        """x: rows of [G, B, O, 1]; for the reference setup unless ``setup`` names one the fit has a factor for."""
        f = self.device_factor.get(device, 1.0) if device is not None else 1.0
        f *= self.setup_factor.get(setup, 1.0) if setup is not None else 1.0
        extra = self.setup_offset_ms.get(setup, 0.0) if setup is not None else 0.0
        return np.maximum((x * self.terms(spec)) @ self.coef * f + extra, 1e-6)

    def baseline(self, spec: tuple, device: str | None) -> dict:
        """The fit at one device's specs, for the reference setup, as the estimator's baseline coefficients (ms
        per GMAC, us per op, ms per GB, fixed ms)."""
        t = self.terms(spec) * self.coef * (self.device_factor.get(device, 1.0) if device else 1.0)
        return {"ms_per_gmac": float(t[0]), "ms_per_gb": float(t[1]), "us_per_op": float(t[2]),
                "fixed_ms": float(t[3])}


def fit_family(x: np.ndarray, y: np.ndarray, spec: np.ndarray, devices: list[str], setups: list[str] | None = None,
               reference: str | None = None, offsets: bool = False) -> FamilyFit:
    """Fit the family model to rows x = [G, B, O (thousands), 1], latencies y, per-row device specs (P, W, K).

    ``setups``: each row's measurement setup (``setup_of``); every setup but ``reference`` gets a factor (setups
    are data: the same model timed by two protocols differs by its factor), and with ``offsets`` also a fixed time
    it adds (a framework's per-call overhead, copies: torch2trt's Python call costs the same half millisecond on
    a Nano as on a Xavier, a tenth of one's time and half of the other's); estimates are for the reference.
    The fit is least squares on log latency with a robust (soft-L1) loss, so that one row far off the model (a
    network whose ops fall off the accelerator) does not bend the rest; the exponents are fitted with the
    coefficients, from several starting points.
    """
    from scipy.optimize import least_squares, nnls

    n = len(y)
    setups = list(setups) if setups is not None else ["-"] * n
    names = sorted(set(setups))
    reference = reference if reference in names else names[0]
    others = [s for s in names if s != reference]
    which = np.array([others.index(s) if s != reference else -1 for s in setups])
    ref = tuple(float(np.exp(np.mean(np.log(spec[:, i])))) for i in range(3))  # geometric means: well scaled
    ratio = np.asarray(ref)[None, :] / spec  # (P0/P, W0/W, K0/K) per row
    logy = np.log(y)

    m = len(others)
    # a spec that does not vary between the devices with rows (the A13, A14 and A15 have one memory bandwidth)
    # cannot teach its exponent: it is held at 1, the roofline's own assumption (time inversely proportional)
    fixed = np.array([bool(np.ptp(np.log(spec[:, i])) < 1e-9) for i in range(3)])
    # with ``offsets`` a setup may also add fixed time (host-side work: a framework's call overhead, copies on
    # every call), told from its factor by models of different sizes timed in it
    k = m if offsets else 0

    def unpack(p):
        extra = np.concatenate([p[7 + m:7 + m + k], np.zeros(m - k + 1)])[which]
        return p[:4], np.where(fixed, 1.0, p[4:7]), np.concatenate([p[7:7 + m], [0.0]])[which], extra

    def residual(p):
        coef, (alpha, gamma, beta), off, extra = unpack(p)
        mult = np.column_stack([ratio[:, 0] ** alpha, ratio[:, 1] ** gamma, ratio[:, 2] ** beta,
                                ratio[:, 2] ** beta])
        return np.log(np.maximum((x * mult) @ coef * np.exp(off) + extra, 1e-9)) - logy

    best = None
    for start in itertools.product((0.5, 1.0), (0.25, 0.75), (0.5, 1.0)):
        start = tuple(1.0 if f else v for f, v in zip(fixed, start, strict=True))
        mult = np.column_stack([ratio[:, 0] ** start[0], ratio[:, 1] ** start[1], ratio[:, 2] ** start[2],
                                ratio[:, 2] ** start[2]])
        coef0, _ = nnls(x * mult / y[:, None], np.ones(n))
        p0 = np.concatenate([np.maximum(coef0, 1e-6), start, np.zeros(m), np.zeros(k)])
        lo = np.concatenate([np.zeros(4), np.zeros(3), np.full(m, -3.0), np.zeros(k)])
        hi = np.concatenate([np.full(4, np.inf), np.full(3, EXPONENT_MAX), np.full(m, 3.0), np.full(k, np.inf)])
        sol = least_squares(residual, p0, bounds=(lo, hi), loss="soft_l1", f_scale=ROBUST_SCALE)
        if best is None or sol.cost < best.cost:
            best = sol
    coef, exps, _, _ = unpack(best.x)
    setup_factor = {reference: 1.0, **{s: float(np.exp(best.x[7 + i])) for i, s in enumerate(others)}}
    fit = FamilyFit(np.asarray(coef, dtype=float), tuple(float(e) for e in exps), ref, {}, setup_factor,
                    {s: float(best.x[7 + m + i]) for i, s in enumerate(others) if i < k}, reference)
    pred = np.array([fit.predict(x[i:i + 1], tuple(spec[i]), setup=setups[i])[0] for i in range(n)])
    for d in sorted(set(devices)):
        idx = [i for i, dv in enumerate(devices) if dv == d]
        shift = float(np.median(np.log(y[idx] / pred[idx])))
        fit.device_factor[d] = float(np.exp(shift * len(idx) / (len(idx) + SHRINK_ROWS)))
    return fit


def family_rows(family: Family, tables: list[tuple[str, list[dict]]]) -> list[dict]:
    """The published rows of the family's members with a timm model, tagged with the member profile."""
    out = []
    for name, rows in tables:
        for row in rows:
            if not (row.get("timm_name") or "").strip():
                continue
            text = (row.get("runtime") or "").lower()
            if not any(w in text for w in family.runtime_match) or any(w in text for w in family.runtime_exclude):
                continue
            member = next((m for m in family.members if re.search(m.data_device, row.get("device") or "")), None)
            if member is None:
                continue
            out.append({**row, "profile": member.profile, "table": name})
    return out


@dataclass
class FamilyData:
    """A family's published rows made ready to fit: each row's device, setup, model family and op-mix terms."""

    family: Family
    setups: list  # each row's measurement setup
    reference: str  # the setup estimates are for
    unlinked: list  # setups left out (no model shared with another setup)
    profiles: dict
    settings: dict
    samples: list
    devices: list  # each row's member profile
    families: list  # each row's model family
    feats: list
    x: np.ndarray  # [G, B, O (thousands), 1] per row
    y: np.ndarray  # measured ms
    spec_by: dict  # per-layer speed proxy -> device -> (P, W, K)

    def spec(self, per_layer: str) -> np.ndarray:
        return np.array([self.spec_by[per_layer][d] for d in self.devices])


def family_data(family_name: str, tables: list[tuple[str, list[dict]]], progress=None) -> FamilyData:
    """The family's rows (``family_rows``) with their setups, op mixes and device specs."""
    from slimx.devices import load_device
    from slimx.devices.calibrate import samples_for
    from slimx.devices.estimator import Features, settings_of
    from slimx.devices.validation import baseline_features, family_of

    if family_name not in FAMILIES:
        raise UsageError(f"--family {family_name}", f"is not a device family slimx knows ({', '.join(FAMILIES)})",
                         "use one of them")
    family = FAMILIES[family_name]
    rows = family_rows(family, tables)
    if not rows:
        raise UsageError(f"--family {family_name}", "no row of the measurements belongs to its devices",
                         "give the published tables of its devices (shared/data)")
    setups, reference, unlinked = family_setups(rows, family.configuration)
    rows = [r for r, u in zip(rows, setups, strict=True) if u not in unlinked]
    setups = [u for u in setups if u not in unlinked]
    profiles = {m.profile: load_device(m.profile, measure_host=False) for m in family.members}
    settings = {name: settings_of(p)[family.setting] for name, p in profiles.items()}
    samples = samples_for(rows, progress)
    devices = [r["profile"] for r in rows]
    feats = [Features.of(s.costs, settings[d]) for s, d in zip(samples, devices, strict=True)]
    x = np.array([baseline_features(f) for f in feats])[:, [0, 2, 1, 3]]  # [G, B, O, 1]
    y = np.array([s.measured_ms for s in samples])
    spec_by = {k: {name: specs(profiles[name], settings[name], k) for name in profiles} for k in PER_LAYER_SPEEDS}
    return FamilyData(family, setups, reference, unlinked, profiles, settings, samples, devices,
                      [family_of(s.spec) for s in samples], feats, x, y, spec_by)


def leave_one_setup_out(data: FamilyData, offsets: bool = False, per_layer: str = PER_LAYER_SPEEDS[0],
                        with_parts: bool = False):
    """Each row predicted by a family fit that never saw its measurement setup (on any device): what a user whose
    own setup is not in the data gets before anchoring (the reference setup's scale, the device's factor where
    its other setups' rows gave it one). NaN where no other setup is left to fit on. ``with_parts``: also each
    prediction's [compute, memory, per-layer] milliseconds (the GMACs term, the bytes term, the op and fixed
    terms; they sum to it), the split anchors read (``estimator.split_parts`` for a per-op fit)."""
    spec = data.spec(per_layer)
    pred = np.full(len(data.y), np.nan)
    parts = np.full((len(data.y), 3), np.nan)
    for u in sorted(set(data.setups)):
        test = np.array([s == u for s in data.setups])
        train = ~test
        if train.sum() < 5:
            continue
        sub = fit_family(data.x[train], data.y[train], spec[train],
                         [d for d, t in zip(data.devices, train, strict=True) if t],
                         [s for s, t in zip(data.setups, train, strict=True) if t], data.reference, offsets)
        pred[test] = [sub.predict(data.x[i:i + 1], tuple(spec[i]), data.devices[i])[0] for i in np.flatnonzero(test)]
        for i in np.flatnonzero(test):
            terms = data.x[i] * sub.terms(tuple(spec[i])) * sub.coef * sub.device_factor.get(data.devices[i], 1.0)
            parts[i] = [terms[0], terms[1], terms[2] + terms[3]]
    return (pred, parts) if with_parts else pred


def calibrate_family(family_name: str, tables: list[tuple[str, list[dict]]], progress=None,
                     nested_coverage: bool = False) -> dict:
    """Fit the family on its members' rows; return per member the baseline setting values, the errors they
    state and how they were measured, plus the family's own figures. ``nested_coverage``: also measure how often
    the stated 80% intervals cover a held-out device or family, each interval cut from a grouped CV that did not
    see it either (slower)."""
    from slimx.devices.calibrate import classes_in
    from slimx.devices.validation import summarize

    data = family_data(family_name, tables, progress)
    family, setups, reference, unlinked = data.family, data.setups, data.reference, data.unlinked
    profiles, settings, samples, devices = data.profiles, data.settings, data.samples, data.devices
    feats, x, y, spec_by = data.feats, data.x, data.y, data.spec_by
    with_rows = sorted(set(devices))
    # the model structure the family's leave-one-device-out error picks (below)
    chosen = {"offsets": False, "per_layer": PER_LAYER_SPEEDS[0]}

    families = data.families

    def held_out(keep: np.ndarray, groups: list[str], with_device: bool, only: str | None = None,
                 structure: tuple[bool, str] | None = None) -> np.ndarray:
        """Predictions for the rows in ``keep``, each group predicted by a fit on the other kept rows: a row gets
        its setup's factor where the fit has one, and its device's factor only ``with_device`` (leave-one-family-
        out; a device left out has none)."""
        offsets, per_layer = structure or (chosen["offsets"], chosen["per_layer"])
        spec_of = spec_by[per_layer]
        spec = np.array([spec_of[d] for d in devices])
        pred = np.full(len(y), np.nan)
        names = [only] if only is not None else sorted({g for g, k in zip(groups, keep, strict=True) if k})
        for g in names:
            test = keep & np.array([gg == g for gg in groups])
            train = keep & ~test
            if not train.any():
                continue
            sub = fit_family(x[train], y[train], spec[train], [d for d, t in zip(devices, train, strict=True) if t],
                             [u for u, t in zip(setups, train, strict=True) if t], reference, offsets)
            pred[test] = [sub.predict(x[i:i + 1], spec_of[devices[i]], devices[i] if with_device else None,
                                      setups[i])[0] for i in np.flatnonzero(test)]
        return pred

    def nested(groups: list[str], with_device: bool) -> np.ndarray:
        """Whether each row lies inside the 80% interval cut from a grouped CV over the *other* groups only (NaN
        where the other groups are too few to cut one: of two devices, leaving one out leaves a single device,
        which no fit without it can predict)."""
        inside = np.full(len(y), np.nan)
        everything = np.ones(len(y), dtype=bool)
        for g in sorted(set(groups)):
            test = np.array([gg == g for gg in groups])
            inner = held_out(everything & ~test, groups, with_device)
            ok = ~np.isnan(inner)
            if ok.sum() < 3:
                continue
            outer = held_out(everything, groups, with_device, only=g)
            if not with_device:  # a device without rows states the pooled interval, each device weighted equally
                lo, hi = summarize(inner[ok], y[ok], "inner", weights=per_device[ok])["interval_factors"]
                inside[test] = (y[test] >= outer[test] * lo) & (y[test] <= outer[test] * hi)
                continue
            # a device with rows states the interval of its own held-out rows where they span OWN_BAND_FAMILIES
            # families, else the family's pooled one: cut each the same way, from the other families' rows
            for d in sorted({devices[i] for i in np.flatnonzero(test)}):
                on_d = np.array([dd == d for dd in devices])
                own_band = d in own_band_devices and (ok & on_d).sum() >= 3
                use = ok & on_d if own_band else ok
                lo, hi = summarize(inner[use], y[use], "inner", weights=None if own_band else per_device[use]
                                   )["interval_factors"]
                rows = test & on_d
                inside[rows] = (y[rows] >= outer[rows] * lo) & (y[rows] <= outer[rows] * hi)
        return inside

    everything = np.ones(len(y), dtype=bool)
    own_band_devices = {d for d in with_rows
                        if len({f for f, dd in zip(families, devices, strict=True) if dd == d}) >= OWN_BAND_FAMILIES}
    # a device without rows is one device: each device with rows speaks for it equally, whatever its row count
    per_device = np.array([1.0 / devices.count(d) for d in devices])
    # leave-one-device-out: what a device without rows can expect (its rows get the factor of their setup where
    # another device was timed in it, else none)
    # (setups that add fixed time besides their factor, and the per-layer speed proxy, are the ones that lower
    # this error: a choice among four model structures by grouped CV)
    method = f"leave-one-device-out ({len(with_rows)} devices: {', '.join(with_rows)}; each device weighted equally)"
    tried = {}
    for structure in itertools.product((False, True), PER_LAYER_SPEEDS):
        pred = held_out(everything, devices, with_device=False, structure=structure)
        tried[structure] = (summarize(pred, y, method, with_rows, weights=per_device), pred)
    # ties (the two speeds are one figure on a Neural Engine or a CPU): no fixed times, then the fp32 peak
    best = min(tried, key=lambda k: (tried[k][0]["mape_pct"], k[0], PER_LAYER_SPEEDS.index(k[1])))
    chosen["offsets"], chosen["per_layer"] = best
    lodo_cv, lodo = tried[best]
    spec_of = spec_by[chosen["per_layer"]]
    spec = np.array([spec_of[d] for d in devices])
    fit = fit_family(x, y, spec, devices, setups, reference, chosen["offsets"])
    # leave-one-family-out over the model families: what a device with rows can expect on an unseen family
    lofo = held_out(everything, families, with_device=True)
    lofo = np.where(np.isnan(lofo), fit.predict(x, spec[0]), lofo)
    if nested_coverage:
        inside = nested(devices, False)
        tested = ~np.isnan(inside)
        if tested.any():  # else not measurable: no device left out leaves two to cut an interval from
            lodo_cv["coverage"] = round(float(np.sum(inside[tested] * per_device[tested])
                                              / np.sum(per_device[tested])), 3)
        lofo_inside = nested(families, True)
    pooled_band = summarize(lofo, y, "pooled", weights=per_device)["interval_factors"]
    members = {}
    for name in profiles:
        idx = [i for i, d in enumerate(devices) if d == name]
        if len(idx) >= 3 and len({families[i] for i in idx}) >= 2:
            cv = summarize(lofo[idx], y[idx], f"leave-one-family-out within the {family.name} family fit "
                                              f"({len({families[i] for i in idx})} families on this device)")
            basis = f"its {len(idx)} rows"
            if name not in own_band_devices:  # too few families for a band of its own: the family's pooled one
                cv["interval_factors"] = pooled_band
                cv["interval_basis"] = (f"the {family.name} family's leave-one-family-out rows, each device weighted "
                                        f"equally (fewer than {OWN_BAND_FAMILIES} families on this device)")
            if nested_coverage and not np.isnan(lofo_inside[idx]).all():
                cv["coverage"] = round(float(np.nanmean(lofo_inside[idx])), 3)
        else:
            cv = lodo_cv
            basis = "no rows of its own" if not idx else f"{len(idx)} rows of its own, too few to validate on"
        own = settings[name]
        written = profiles[name].raw.get("estimator", {}).get(family.setting, {})
        # no fit of its own to keep: one scaled from another device, or one an earlier family fit wrote
        by_family = "family fit" in str(written.get("model_source", "")) if isinstance(written, dict) else False
        own_error = None if own.scaled_from or by_family else own.expected_error_pct
        ships = own_error is None or cv["mape_pct"] <= own_error
        members[name] = {"baseline": fit.baseline(spec_of[name], name if idx else None), "cv": cv,
                         "rows": len(idx), "basis": basis, "factor": fit.device_factor.get(name),
                         "own_error_pct": own_error, "ships": ships}
        if progress is not None:
            progress.note(f"{family.name}: {name}: {basis}; {cv['method']}: mean {cv['mape_pct']:.1f}%, median "
                          f"{cv['median_abs_pct']:.1f}%; " + (
                              "ships" if ships else f"its own fit ({own_error:.1f}%) stays"))
    return {"family": family.name, "setting": family.setting, "rows": len(y), "devices_with_rows": with_rows,
            "exponents": dict(zip(("compute", "memory", "per_layer"), fit.exponents, strict=True)),
            "coef": dict(zip(("a_ms_per_gmac", "w_ms_per_gb", "b_us_per_op", "c_fixed_ms"), map(float, fit.coef),
                             strict=True)),
            "reference_specs": dict(zip(("peak_gops", "bandwidth_gbs", "per_layer_gops"), fit.ref, strict=True)),
            "reference_setup": reference, "unlinked_setups": unlinked, "classes": classes_in(feats),
            "setups": [{"setup": k, "factor": round(v, 4), "rows": setups.count(k)}
                       | ({"offset_ms": round(fit.setup_offset_ms[k], 4)}
                          if chosen["offsets"] and k in fit.setup_offset_ms else {})
                       for k, v in fit.setup_factor.items()],
            "setup_offsets": chosen["offsets"], "per_layer_speed": chosen["per_layer"],
            "structures": [{"setup_offsets": o, "per_layer_speed": k, "lodo_mape_pct": v[0]["mape_pct"],
                            "lodo_median_pct": v[0]["median_abs_pct"]} for (o, k), v in tried.items()],
            "lodo": {k: v for k, v in lodo_cv.items() if k != "errors_pct"}, "members": members,
            "table": [{"label": s.label, "device": d, "family": f, "setup": u, "measured_ms": round(float(m), 4),
                       "lodo_ms": round(float(a), 4), "lofo_ms": round(float(b), 4)}
                      for s, d, f, u, m, a, b in zip(samples, devices, families, setups, y, lodo, lofo, strict=True)]}


# what a family fit writes into a member's setting (the rest of the setting, per-op figures included, stays)
FAMILY_KEYS = ("model", "ms_per_gmac", "us_per_op", "ms_per_gb", "fixed_ms", "expected_error_pct", "cv_method",
               "interval_low", "interval_high", "spearman", "fit_rows", "setup", "fit_setups", "fit_families",
               "per_op_error_pct", "baseline_error_pct", "fit_classes")


def write_family(result: dict, out_dir=None) -> list:
    """Write each member's setting (model ``baseline``, the family fit at its specs, for the reference setup) into
    its profile, every figure with its source, where it ships: a device without a fit of its own (or one scaled
    from another device), or one whose own grouped error is higher than the family's on its rows. Returns the
    paths written."""
    import datetime

    from slimx.devices.calibrate import write_profile
    from slimx.devices.registry import load_device, profile_path, reload_profiles
    from slimx.devices.validation import BASELINE_TERMS

    today = datetime.date.today().isoformat()
    key = result["setting"]
    fam = result["family"]
    exps = result["exponents"]
    how = (f"the {fam} family fit (`slimx devices calibrate --family {fam}`, {result['rows']} rows on "
           f"{', '.join(result['devices_with_rows'])}; exponents compute {exps['compute']:g}, memory "
           f"{exps['memory']:g}, per-layer {exps['per_layer']:g}; {today})")
    paths = []
    for name, member in result["members"].items():
        if not member.get("ships", True):  # the device's own grouped error is lower: its own fit stays
            continue
        device = load_device(name, measure_host=False)
        estimator = {k: dict(v) for k, v in device.raw.get("estimator", {}).items() if isinstance(v, dict)}
        # the per-op figures stay: they split the family's total over ops and modules (what slimming reads)
        table = {k: v for k, v in estimator.get(key, {}).items()
                 if k.split("_source")[0] not in FAMILY_KEYS and k not in ("scaled_from",)}
        cv = member["cv"]
        table["model"] = "baseline"
        table["model_source"] = f"evaluated at this device's specs from {how}"
        for term in BASELINE_TERMS:
            table[term] = round(float(member["baseline"][term]), 6)
            table[f"{term}_source"] = f"{how}, at {name}'s peak rate, bandwidth and per-layer speed" + (
                f", times its device factor {member['factor']:.3f} (from {member['rows']} rows)"
                if member["factor"] is not None else " (no rows of its own: no device factor)")
        table["expected_error_pct"] = cv["mape_pct"]
        table["expected_error_pct_source"] = (f"{cv['method']} mean absolute error ({member['basis']}); median "
                                              f"{cv['median_abs_pct']:.1f}%, within ±15%: "
                                              f"{cv['within_15pct'] * 100:.0f}% of rows ({today})")
        table["cv_method"] = cv["method"]
        table["interval_low"], table["interval_high"] = cv["interval_factors"]
        band = cv.get("interval_basis") or f"the {cv['method']} held-out rows"
        table["interval_low_source"] = table["interval_high_source"] = (
            f"conformal ranks of measured / estimated over {band} ({today}): sized to cover 80% of unseen models")
        table["spearman"] = cv["spearman"]
        table["spearman_source"] = f"rank correlation of the {cv['method']} held-out estimates ({today})"
        table["fit_rows"] = member["rows"]
        table["fit_rows_source"] = how
        # the op classes with work in the family's rows: an estimate's share outside them is what it flags
        table["fit_classes"] = result["classes"]
        others = ", ".join(f"{u['setup']} x{u['factor']:.2f}" + (f" +{u['offset_ms']:.2f} ms" if u.get("offset_ms")
                                                                   else "")
                           for u in result["setups"] if u["setup"] != result["reference_setup"])
        table["setup"] = result["reference_setup"]
        which = (f"the configuration the {fam} family's settings describe" if FAMILIES[fam].configuration
                 and FAMILIES[fam].configuration in result["reference_setup"]
                 else f"the newest measurement setup in the {fam} family's data")
        table["setup_source"] = (f"{which} (estimates are for it); "
                                 f"the other setups' fitted factors: {others or 'none'}")
        estimator[key] = table
        path = profile_path(name) if out_dir is None else out_dir / profile_path(name).name
        paths.append(write_profile(path, profile_path(name).read_text(), estimator, device.estimator_default))
    reload_profiles()
    return paths
