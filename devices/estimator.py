"""Per-op latency estimator: a roofline per op, with per-op-class efficiency and a fixed per-op overhead.

For one op of class ``c`` on compute unit ``u``, with ``compute = flops / (peak[u, dtype] * eff[c])`` and
``memory = bytes / (bandwidth * mem_eff)``::

    t = overhead + max(compute, memory) + (1 - overlap) * min(compute, memory)

(``overlap`` = 1 is the pure roofline; below 1, compute and memory traffic overlap only partly, as on
small CPU kernels.)
and the model's total is ``fixed + sum(t)`` plus ``switch`` for every hand-over between compute units
(an op the fast unit cannot run falls back, e.g. a gather leaves the Neural Engine). The efficiencies
and overheads are per device and per *setting* (runtime + compute unit + dtype): they are fitted from
measurements (``slimx devices calibrate``) by least squares on log latency, and each fit stores its
cross-validated error, which the estimate quotes as its expected error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slimx._core.errors import UsageError
from slimx.devices.opmix import COMPUTE_CLASSES, OP_CLASSES, OpCost
from slimx.devices.records import PARAMS, EstimatorSetting
from slimx.targets.coreml import NPU_FALLBACK_OPS

Setting = EstimatorSetting  # the name the estimator's callers know
_DTYPE_SCALE = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}


def settings_of(device) -> dict[str, Setting]:
    """The estimator settings a device profile declares (``[estimator.<key>]`` tables, checked on load)."""
    return dict(device.estimator)


def default_setting(device, precision: str | None = None) -> Setting:
    """The setting an export for this device would run in: the profile's default, or one of that precision."""
    settings = settings_of(device)
    if not settings:
        raise UsageError(f"device {device.name}", "its profile has no [estimator] settings, so no estimate is possible",
                         f"run `slimx devices calibrate {device.name} --measurements CSV` first")
    default = device.estimator_default
    if precision:
        match = [s for s in settings.values() if s.dtype == precision and s.runtime == device.default_format]
        if default in settings and settings[default].dtype == precision:
            return settings[default]
        if match:
            return match[0]
    return settings.get(default) or next(iter(settings.values()))


def setting_for_format(device, target, precision: str | None = None) -> tuple[Setting, str | None]:
    """The setting an artifact of ``target`` (a ``Target``) for ``device`` is estimated with, and a note when it is
    another format's: a setting of the format's own where the profile has one, else the setting of the format the
    target ``estimates_from`` (its note says how far the transfer holds), else ``default_setting``."""
    settings = settings_of(device)

    def of(fmt):
        mine = [s for s in settings.values() if s.runtime == fmt]
        return next((s for s in mine if s.dtype == precision), None) or next(
            (s for s in mine if s.dtype == "fp32"), None) or (mine[0] if mine else None)

    own = of(target.name) if target.name != device.default_format else None
    if own is not None:
        return own, None
    via = getattr(target, "estimates_from", None)
    if via and target.name != device.default_format:
        fmt, note = via
        carried = of(fmt)
        if carried is None:
            raise UsageError(f"device {device.name}", f"has no estimator setting for {target.name} or for {fmt}, "
                             f"whose kernels {target.name} shares",
                             f"calibrate a {fmt} setting for it, or measure through an agent")
        return carried, note
    return default_setting(device, precision), None


def peak_gops(device, unit: str, dtype: str) -> float:
    """Peak rate of ``unit`` in GOP/s for ``dtype``, falling back to a neighbouring dtype's figure."""
    order = {"fp32": ("fp32", "fp16", "int8"), "fp16": ("fp16", "fp32", "int8"), "int8": ("int8", "fp16", "fp32")}
    scale = {("fp16", "fp32"): 1.0, ("int8", "fp16"): 1.0, ("int8", "fp32"): 1.0, ("fp32", "fp16"): 0.5,
             ("fp32", "int8"): 0.25, ("fp16", "int8"): 0.5}
    for have in order.get(dtype, ("fp32",)):
        value = device.peak(unit, have)
        if value:
            return float(value) * scale.get((dtype, have), 1.0)
    raise UsageError(f"device {device.name}", f"compute unit {unit!r} has no peak rate",
                     "add peak_gflops_fp32/fp16 or peak_gops_int8 to the profile")


def bandwidth_gbs(device) -> float:
    value = device.memory.get("mem_bandwidth_gbs")
    if not value:
        raise UsageError(f"device {device.name}", "the profile has no memory.mem_bandwidth_gbs",
                         "add the memory bandwidth with its source")
    return float(value)


@dataclass
class Features:
    """A model's op mix as arrays, ready to be priced for one setting (fast enough to refit thousands of times)."""

    cls: np.ndarray  # op class index into OP_CLASSES
    flops: np.ndarray
    bytes: np.ndarray
    fallback: np.ndarray  # True where the op leaves the setting's main unit
    switches: int
    costs: list  # the ops priced (fused ones dropped), in order

    @classmethod
    def of(cls, costs: list[OpCost], setting: Setting) -> Features:
        scale = _DTYPE_SCALE.get(setting.dtype, 1.0)
        if setting.fuse_add:  # fused into the conv before it: no work of its own, no launch
            costs = [c for c in costs if not c.fusable]
        idx = np.array([OP_CLASSES.index(c.op_class) for c in costs], dtype=np.int64)
        flops = np.array([c.flops for c in costs], dtype=np.float64)
        nbytes = np.array([c.bytes - c.float_bytes * (1 - scale) for c in costs], dtype=np.float64)
        fallback = np.array([bool(setting.fallback_unit) and (c.op in NPU_FALLBACK_OPS or
                                                              c.op_class in setting.fallback_classes)
                             for c in costs], dtype=bool)
        switches = int(np.count_nonzero(fallback[1:] != fallback[:-1])) if len(costs) > 1 else 0
        return cls(idx, flops, nbytes, fallback, switches, costs)


def _class_eff(params: dict) -> np.ndarray:
    eff = np.empty(len(OP_CLASSES))
    for i, name in enumerate(OP_CLASSES):
        eff[i] = params[f"eff_{name}"] if name in COMPUTE_CLASSES else params["eff_vector"]
    return eff


def _sides(features: Features, params: dict, peak: float, fallback_peak: float, bw: float):
    """Each op's compute time and memory time in seconds, the two sides of its roofline."""
    eff = _class_eff(params)[features.cls]
    peaks = np.where(features.fallback, fallback_peak, peak)
    return features.flops / (peaks * 1e9 * eff), features.bytes / (bw * 1e9 * params["mem_eff"])


def price(features: Features, params: dict, peak: float, fallback_peak: float, bw: float) -> np.ndarray:
    """Per-op milliseconds (without the fixed per-inference overhead)."""
    compute, memory = _sides(features, params, peak, fallback_peak, bw)
    roof = np.maximum(compute, memory) + (1.0 - params["overlap"]) * np.minimum(compute, memory)
    return (roof + params["op_overhead_us"] * 1e-6) * 1e3


def total_ms(features: Features, params: dict, peak: float, fallback_peak: float, bw: float) -> float:
    per_op = price(features, params, peak, fallback_peak, bw)
    return float(per_op.sum() + params["fixed_overhead_us"] * 1e-3 + features.switches * params["switch_us"] * 1e-3)


def split_parts(features: Features, params: dict, peak: float, fallback_peak: float, bw: float,
                fixed_ms: float) -> np.ndarray:
    """A per-op estimate's milliseconds split three ways: compute, memory, per-layer (each op's launch cost, the
    fixed overhead and the unit switches). Each op's roofline time goes to the side that bounds it, and the
    non-overlapped part of the other side to that other side.

    Example:
        >>> f = Features(np.array([0]), np.array([2e9]), np.array([1e6]), np.array([False]), 0, [])
        >>> p = {**{f"eff_{c}": 1.0 for c in COMPUTE_CLASSES}, "eff_vector": 1.0, "mem_eff": 1.0,
        ...      "overlap": 1.0, "op_overhead_us": 10.0}
        >>> [round(float(v), 3) for v in split_parts(f, p, 1000.0, 1000.0, 100.0, 0.5)]
        [2.0, 0.0, 0.51]
    """
    compute, memory = (side * 1e3 for side in _sides(features, params, peak, fallback_peak, bw))
    rest = 1.0 - params["overlap"]
    bound = compute >= memory
    return np.array([float(np.sum(np.where(bound, compute, rest * compute))),
                     float(np.sum(np.where(bound, rest * memory, memory))),
                     float(len(features.cls) * params["op_overhead_us"] * 1e-3 + fixed_ms)])


def rates(device, setting: Setting) -> tuple[float, float, float]:
    peak = peak_gops(device, setting.unit, setting.dtype)
    fallback = peak_gops(device, setting.fallback_unit, "fp32" if setting.dtype == "int8" else setting.dtype) \
        if setting.fallback_unit else peak
    return peak, fallback, bandwidth_gbs(device)


def full_params(setting: Setting) -> dict:
    return {p: setting.param(p) for p in (*PARAMS, "switch_us")}


def estimate_latency(costs: list[OpCost], device, setting: Setting | None = None, top: int = 15,
                     anchored: bool = True) -> dict:
    """Estimate a program's latency on ``device``: per op, per module path and total, with the expected error.
    ``anchored``: put it on the user's own setup where the device has anchors (``devices.anchors``).

    Example:
        >>> import torch
        >>> from slimx.devices import load_device
        >>> from slimx.devices.opmix import op_mix
        >>> ep = torch.export.export(torch.nn.Linear(384, 1536), (torch.randn(1, 128, 384),))
        >>> est = estimate_latency(op_mix(ep), load_device("iphone12"))
        >>> est["kind"], est["total_ms"] > 0
        ('estimated', True)
    """
    setting = setting or default_setting(device)
    params = full_params(setting)
    peak, fallback_peak, bw = rates(device, setting)
    feats = Features.of(costs, setting)
    costs = feats.costs
    per_op_ms = price(feats, params, peak, fallback_peak, bw) if costs else np.zeros(0)
    fixed_ms = params["fixed_overhead_us"] * 1e-3 + feats.switches * params["switch_us"] * 1e-3
    total = float(per_op_ms.sum() + fixed_ms)
    from slimx.devices.validation import baseline_features, baseline_parts, predict_baseline

    mix = baseline_features(feats)  # [GMACs, op count, GB moved, 1]
    if setting.model == "baseline" and setting.baseline:  # the fit that generalised better: its total
        base = float(predict_baseline(mix[None, :], setting.baseline)[0])
        scale = base / total if total else 1.0  # per-op shares scaled to it
        per_op_ms, fixed_ms, total = per_op_ms * scale, fixed_ms * scale, base
        parts = baseline_parts(mix[None, :], setting.baseline)[0]
    else:
        parts = split_parts(feats, params, peak, fallback_peak, bw, fixed_ms)
    by_class: dict[str, dict] = {}
    by_module: dict[str, float] = {}
    rows = []
    for cost, ms, fb in zip(costs, per_op_ms, feats.fallback, strict=True):
        entry = by_class.setdefault(cost.op_class, {"op": cost.op_class, "ms": 0.0, "count": 0})
        entry["ms"] += float(ms)
        entry["count"] += 1
        key = _module_group(cost.module)
        by_module[key] = by_module.get(key, 0.0) + float(ms)
        rows.append({"node": cost.node, "op": cost.op, "class": cost.op_class, "module": cost.module,
                     "unit": setting.fallback_unit if fb else setting.unit, "gflop": cost.flops / 1e9,
                     "mbytes": cost.bytes / 1e6, "ms": float(ms)})
    per_op = [{**e, "ms": round(e["ms"], 4), "share": round(e["ms"] / total, 4) if total else 0.0}
              for e in sorted(by_class.values(), key=lambda e: -e["ms"])]
    per_module = [{"module": m, "ms": round(v, 4)} for m, v in sorted(by_module.items(), key=lambda kv: -kv[1])]
    rows.sort(key=lambda r: -r["ms"])
    prior_ms = sum(e["ms"] for e in by_class.values() if e["op"] not in setting.fit_classes)
    error = setting.expected_error_pct
    est = {
        "device": device.name,
        "kind": "estimated",
        "measured": False,
        "setting": setting.key,
        "runtime": setting.runtime,
        "unit": setting.unit,
        "dtype": setting.dtype,
        "total_ms": round(total, 4),
        "median_ms": round(total, 4),
        "fixed_ms": round(fixed_ms, 4),
        "expected_error_pct": None if error is None else round(float(error), 1),
        "expected_error_source": setting.expected_error_source,
        "interval_ms": interval_of(total, setting),
        "model": setting.model,
        "cv_method": setting.cv_method,
        "setup": setting.setup,
        "calibrated": setting.calibrated,
        "unfitted_share": round(prior_ms / total, 3) if total else 0.0,
        "fit_host": setting.fit_host,
        "scaled_from": setting.scaled_from,
        "fit": setting.fit,
        "ops": len(costs),
        "gflops": round(sum(c.flops for c in costs) / 1e9, 4),
        "gmacs": round(float(mix[0]), 6),  # the op density anchors read
        # the time's split into compute, memory and per-layer work as this fit prices it (anchors read it)
        "shares": [round(float(v), 6) for v in parts / max(float(parts.sum()), 1e-12)],
        "per_op": per_op,
        "per_module": per_module[:top],
        "per_node": [{**r, "gflop": round(r["gflop"], 5), "mbytes": round(r["mbytes"], 4), "ms": round(r["ms"], 5)}
                     for r in rows[:top]],
    }
    if anchored:
        from slimx.devices.anchors import apply

        est = apply(est, device, setting)
    return est


def interval_of(total_ms: float, setting: Setting) -> list[float] | None:
    """The estimate's interval: the fit's held-out measured/estimated factors (sized to cover 80% of unseen
    models), else the stated error either side, else None (not calibrated)."""
    if setting.interval is not None:
        lo, hi = setting.interval
    elif setting.expected_error_pct is not None:
        lo, hi = 1 - setting.expected_error_pct / 100, 1 + setting.expected_error_pct / 100
    else:
        return None
    return [round(total_ms * max(lo, 0.0), 4), round(total_ms * hi, 4)]


class EstimatorLatencyModel:
    """The per-op estimator as a ``slim.base.LatencyModel``: a module's latency on a device not at hand.

    Example:
        >>> import torch
        >>> from slimx.devices import load_device
        >>> model = EstimatorLatencyModel.for_device(load_device("iphone12"), "fp16")
        >>> got = model.latency(torch.nn.Linear(64, 64), (torch.randn(1, 64),))
        >>> got["kind"], got["ms"] > 0, got["interval_ms"][0] < got["ms"] < got["interval_ms"][1]
        ('estimated', True, True)
    """

    kind = "estimated"

    def __init__(self, device, setting: Setting) -> None:
        self.profile = device
        self.device = device.name
        self.setting = setting

    @classmethod
    def for_device(cls, device, precision: str | None = None) -> EstimatorLatencyModel:
        """The device's setting for ``precision`` (UsageError when its profile has no estimator settings)."""
        return cls(device, default_setting(device, precision))

    def latency(self, module, example_inputs: tuple) -> dict:
        from slimx.devices.opmix import op_mix
        from slimx.export.program import export_program

        est = estimate_latency(op_mix(export_program(module, example_inputs)), self.profile, self.setting, top=0)
        out = {"ms": est["total_ms"], "kind": self.kind, "device": self.device, "setting": self.setting.key}
        if est["interval_ms"] is not None:
            out["interval_ms"] = est["interval_ms"]
        return out

    def breakdown(self, module, example_inputs: tuple) -> dict:
        """``latency`` plus ``per_module``: milliseconds per full module path (each op priced where it runs, the
        fixed overhead left out), so that a pass can price removing any module from one estimate."""
        from slimx.devices.opmix import op_mix
        from slimx.export.program import export_program

        costs = op_mix(export_program(module, example_inputs))
        est = estimate_latency(costs, self.profile, self.setting, top=0)
        feats = Features.of(costs, self.setting)
        per_op = price(feats, full_params(self.setting), *rates(self.profile, self.setting)) if feats.costs else []
        scale = est["total_ms"] / (float(np.sum(per_op)) + est["fixed_ms"]) if len(per_op) else 1.0
        per_module: dict[str, float] = {}
        for cost, ms in zip(feats.costs, per_op, strict=True):
            path = cost.module.rsplit(" (", 1)[0]  # "layer.0.attention.self (BertSelfAttention)" -> the path
            per_module[path] = per_module.get(path, 0.0) + float(ms) * scale
        out = {"ms": est["total_ms"], "kind": self.kind, "device": self.device, "setting": self.setting.key,
               "fixed_ms": est["fixed_ms"], "per_module": per_module}
        if est["interval_ms"] is not None:
            out["interval_ms"] = est["interval_ms"]
        return out


def _module_group(path: str, depth: int = 3) -> str:
    """Group module paths a few levels deep (``stages.2.blocks.1``), which is where users look for cost."""
    if not path:
        return "(model)"
    parts = path.split(".")
    return ".".join(parts[:depth])


def describe(est: dict, device) -> str:
    """One line saying what the estimate is and how far to trust it."""
    from slimx.devices.anchors import describe as anchored

    error = est.get("expected_error_pct")
    anchors = est.get("anchors") or {}
    err = f"expected error ±{error:.0f}%" if error is not None else "expected error unknown (not calibrated)"
    interval = est.get("interval_ms")
    if anchors.get("count"):  # the anchors' interval, not the profile's stated error
        err = f"80% interval {interval[0]:.3f}-{interval[1]:.3f} ms (spread: {anchors['prior_basis']} and the anchors)"
    elif interval and error is not None:
        cv = est.get("cv_method") or "held-out rows"
        err = f"80% interval {interval[0]:.3f}-{interval[1]:.3f} ms, expected error ±{error:.0f}% ({cv})"
        if est.get("unanchored"):  # the interval is for a setup the fit never saw (devices.anchors.unanchored)
            u = est["unanchored"]
            own = u["profile_setup_interval_ms"]
            err = (f"80% interval {interval[0]:.3f}-{interval[1]:.3f} ms for a setup not anchored (a setup's own "
                   f"factor: x{math.exp(u['setup_sd']):.2f} either way, 1 sd, in {u['basis']}), "
                   f"{own[0]:.3f}-{own[1]:.3f} ms in the profile's own setup, expected error ±{error:.0f}% ({cv})")
    how = f", scaled from {est['scaled_from']} by peak rates" if est.get("scaled_from") else ""
    if est.get("setup"):
        how += f"; for the setup {est['setup'][:70]}" + (
            "" if anchors.get("count") else f" (anchor yours: slimx devices anchor {device.name})")
    basis = f" [{est['expected_error_source']}]" if est.get("expected_error_source") and not anchors.get("count") \
        else ""
    if est.get("fit_host") and device.measured:
        from slimx.devices.host import cpu_model

        if est["fit_host"] != cpu_model():
            basis += (f"; fitted on another CPU ({est['fit_host']}): add --calibrate (about two minutes) to fit this "
                      "machine's own figures first")
    if est.get("calibrated") and est.get("unfitted_share", 0) >= 0.1:
        basis += (f"; {est['unfitted_share'] * 100:.0f}% of this estimate comes from op classes absent from the "
                  "fit's data, so the error can be larger")
    return (f"estimated for {device.display_name} ({est['setting']}{how}): {est['total_ms']:.3f} ms, {err}{basis}"
            + anchored(est))


def device_floor_ms(device, precision: str | None = None) -> float | None:
    """The device's fixed per-inference overhead in its calibrated estimator setting (a budget below it cannot
    be met), or None where the profile has no calibrated setting."""
    try:
        setting = default_setting(device, precision)
    except UsageError:
        return None
    if not setting.calibrated:
        return None
    if setting.model == "baseline" and setting.baseline:
        return float(setting.baseline.get("fixed_ms", 0.0)) or None
    return float(setting.param("fixed_overhead_us")) * 1e-3 or None
