"""Typed records of a device profile, checked when the file is read: a compute unit and an estimator setting.

Unknown keys are refused (a typo in a profile would otherwise pass silently and change nothing); every
figure keeps its ``<field>_source``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# the free parameters of an estimator setting, in fit order, with the prior each fit is pulled towards (weakly)
PARAMS = ("eff_matmul", "eff_conv", "eff_depthwise", "eff_attention", "eff_mask", "eff_vector", "mem_eff",
          "overlap", "op_overhead_us", "fixed_overhead_us")
PRIOR = {"eff_matmul": 0.5, "eff_conv": 0.4, "eff_depthwise": 0.05, "eff_attention": 0.2, "eff_mask": 0.02,
         "eff_vector": 0.05, "mem_eff": 0.5, "overlap": 0.5, "op_overhead_us": 5.0, "fixed_overhead_us": 50.0,
         "switch_us": 100.0}


def _split_sources(table: dict, known: set[str], where: str) -> tuple[dict, dict]:
    """(values, sources) of a profile table; ValueError naming any key that is neither known nor a source."""
    sources = {k[: -len("_source")]: v for k, v in table.items() if k.endswith("_source")}
    values = {k: v for k, v in table.items() if not k.endswith("_source")}
    unknown = sorted((set(values) | set(sources)) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return values, sources


@dataclass(frozen=True)
class ComputeUnit:
    """One compute unit of a device (CPU, GPU, NPU/DLA) with its peak rates, each figure with its source.

    Example:
        >>> cu = ComputeUnit.from_table({"name": "ane", "kind": "npu", "peak_gflops_fp16": 11000,
        ...                              "peak_gflops_fp16_source": "Apple"}, "iphone12")
        >>> cu.peak("fp16"), cu.sources["peak_gflops_fp16"]
        (11000, 'Apple')
    """

    name: str
    kind: str
    description: str = ""
    cores: int | None = None
    peak_gflops_fp32: float | None = None
    peak_gflops_fp16: float | None = None
    peak_gops_int8: float | None = None
    peak_gops_int8_sparse: float | None = None
    sources: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_table(cls, table: dict, where: str) -> ComputeUnit:
        known = {f.name for f in dataclasses.fields(cls)} - {"sources"}
        values, sources = _split_sources(table, known, f"{where} compute unit {table.get('name', '?')}")
        return cls(**values, sources=sources)

    def peak(self, dtype: str) -> float | None:
        """Peak rate in G(FL)OP/s for ``dtype`` (fp32, fp16, int8), if known."""
        return getattr(self, f"peak_gops_{dtype}" if dtype.startswith("int") else f"peak_gflops_{dtype}", None)


# keys of an estimator setting that are not fitted figures
_SETTING_KEYS = {"runtime", "unit", "dtype", "fallback_unit", "fallback_classes", "match", "exclude", "match_device",
                 "scale_setting", "scaled_from", "fuse_add", "expected_error_pct", "fit_rows", "fit_classes",
                 "fit_host", "fit_setups", "model", "interval_low", "interval_high", "cv_method", "fit_families",
                 "per_op_error_pct", "baseline_error_pct", "spearman", "setup"}
# the baseline's terms (``devices.validation``): latency = ms_per_gmac * GMACs + us_per_op * ops / 1000
# + ms_per_gb * GB moved + fixed_ms
BASELINE_KEYS = ("ms_per_gmac", "us_per_op", "ms_per_gb", "fixed_ms")


@dataclass
class EstimatorSetting:
    """How a device runs a model: which runtime, on which compute unit, in which dtype, and the fitted figures."""

    key: str
    runtime: str
    unit: str
    dtype: str
    fallback_unit: str | None = None
    params: dict = field(default_factory=dict)
    expected_error_pct: float | None = None
    expected_error_source: str = ""
    fit: dict = field(default_factory=dict)
    scaled_from: str | None = None
    fuse_add: bool = True  # conv + residual add fused (onnxruntime, TensorRT, CoreML); not in TFLite
    fit_classes: frozenset = frozenset()  # op classes that had work in the fit's data
    fit_host: str = ""  # for the measured host: the CPU the fit was made on
    fallback_classes: frozenset = frozenset()  # op classes the unit cannot run (they go to fallback_unit)
    match: tuple[str, ...] = ()  # words a published row's runtime text must contain to calibrate this setting
    exclude: tuple[str, ...] = ()  # words that keep a row out
    match_device: str | None = None  # the device name a published row must carry
    scale_setting: str | None = None  # the setting of another device this one is scaled from
    model: str = "per-op"  # which fit estimates: the per-op model, or the baseline where it generalised better
    baseline: dict = field(default_factory=dict)  # the baseline's coefficients (BASELINE_KEYS)
    interval: tuple[float, float] | None = None  # measured / estimated factors covering 80% of unseen models
    cv_method: str = ""  # how the expected error was measured (leave-one-family-out, ...)
    setup: str = ""  # the measurement setup estimates are for (the newest in the fit's data)

    @classmethod
    def from_table(cls, key: str, table: dict, default_runtime: str, where: str) -> EstimatorSetting:
        """A ``[estimator.<key>]`` table as a setting; unknown keys are refused."""
        values, sources = _split_sources(table, {*PARAMS, "switch_us", *_SETTING_KEYS, *BASELINE_KEYS},
                                         f"{where} estimator.{key}")
        model = values.get("model", "per-op")
        if model not in ("per-op", "baseline"):
            raise ValueError(f"{where} estimator.{key}: model {model!r} is neither 'per-op' nor 'baseline'")
        interval = ((float(values["interval_low"]), float(values["interval_high"]))
                    if "interval_low" in values and "interval_high" in values else None)
        runtime = values.get("runtime", default_runtime)
        return cls(key=key, runtime=runtime, unit=values.get("unit", "cpu"), dtype=values.get("dtype", "fp32"),
                   fallback_unit=values.get("fallback_unit"),
                   params={p: float(values[p]) for p in (*PARAMS, "switch_us") if p in values},
                   expected_error_pct=values.get("expected_error_pct"),
                   expected_error_source=sources.get("expected_error_pct", ""),
                   fit={"fit_rows": values["fit_rows"]} if "fit_rows" in values else {},
                   scaled_from=values.get("scaled_from"),
                   fuse_add=bool(values.get("fuse_add", runtime != "tflite")),
                   fit_classes=frozenset(values.get("fit_classes", ())), fit_host=values.get("fit_host", ""),
                   fallback_classes=frozenset(values.get("fallback_classes", ())),
                   match=tuple(values.get("match", ())), exclude=tuple(values.get("exclude", ())),
                   match_device=values.get("match_device"), scale_setting=values.get("scale_setting"),
                   model=model, baseline={k: float(values[k]) for k in BASELINE_KEYS if k in values},
                   interval=interval, cv_method=values.get("cv_method", ""), setup=values.get("setup", ""))

    def param(self, name: str) -> float:
        return float(self.params.get(name, PRIOR[name]))

    @property
    def calibrated(self) -> bool:
        """Fitted to measurements: per-op figures, or a baseline's coefficients (a family fit writes only those)."""
        return bool(self.params) or (self.model == "baseline" and bool(self.baseline))


@dataclass
class Latency:
    """One latency answer for a device, whichever way it was obtained: ``measured`` (a runner's distribution,
    here or through an agent), ``estimated`` (the per-op model, with its expected error) or ``none`` (with the
    reason). ``details`` holds the rest of the report's ``latency`` object (per-op breakdowns, fit figures);
    ``to_dict`` writes that object with the same keys as ever.

    Example:
        >>> lat = Latency.not_measured("iphone12", "no iphone12 is attached")
        >>> lat.line()
        'iphone12: not measured: no iphone12 is attached'
    """

    device: str
    kind: str  # "measured", "estimated" or "none"
    ms: float | None = None  # the median (measured) or the total (estimated)
    reason: str = ""
    details: dict = field(default_factory=dict)

    @classmethod
    def measured(cls, device: str, timing, **extra) -> Latency:
        """From a runner's ``Timing``; ``extra`` adds fields (where it was measured, a label)."""
        data = timing.to_dict()
        return cls(device, "measured", data["median_ms"], details={**data, **extra})

    @classmethod
    def estimated(cls, estimate: dict) -> Latency:
        """From ``devices.estimator.estimate_latency``'s answer."""
        details = {k: v for k, v in estimate.items() if k not in ("device", "kind", "measured")}
        return cls(estimate["device"], "estimated", estimate["total_ms"], details=details)

    @classmethod
    def not_measured(cls, device: str, reason: str) -> Latency:
        return cls(device, "none", reason=reason)

    @classmethod
    def from_dict(cls, data: dict) -> Latency:
        """A report's ``latency`` object read back."""
        kind = data.get("kind") or ("none" if not data.get("measured", True) else "measured")
        if kind == "estimated":
            return cls.estimated(data)
        if kind == "measured" and "median_ms" in data:
            details = {k: v for k, v in data.items() if k not in ("device", "kind", "measured")}
            return cls(data.get("device", ""), "measured", data["median_ms"], details=details)
        return cls.not_measured(data.get("device", ""), data.get("reason", ""))

    def to_dict(self) -> dict:
        if self.kind == "none":
            return {"device": self.device, "measured": False, "reason": self.reason}
        return {"device": self.device, "kind": self.kind, "measured": self.kind == "measured", **self.details}

    @property
    def per_op(self) -> list:
        return self.details.get("per_op") or []

    def line(self) -> str:
        """The terminal summary's line for this latency."""
        d = self.details
        if self.kind == "estimated":
            err = d.get("expected_error_pct")
            err_text = f"±{err:.0f}%" if err is not None else "error unknown"
            if d.get("interval_ms") and err is not None:
                lo, hi = d["interval_ms"]
                err_text = f"80% interval {lo:.3f}-{hi:.3f} ms, {err_text}"
                if d.get("unanchored"):  # no anchor: the interval is for a setup the profile never saw
                    own = d["unanchored"]["profile_setup_interval_ms"]
                    err_text = (f"80% interval {lo:.3f}-{hi:.3f} ms for a setup not anchored, {own[0]:.3f}-"
                                f"{own[1]:.3f} ms in the profile's own setup, ±{err:.0f}%")
            return (f"{self.device} estimated: {self.ms:.3f} ms ({err_text}, {d.get('setting')}; "
                    f"not measured: no device here)")
        if self.kind == "none":
            return f"{self.device}: not measured: {self.reason}"
        spread = f"p10-p90 {d['p10_ms']:.3f}-{d['p90_ms']:.3f} ms" if d.get("p10_ms") is not None else \
            f"p90 {d['p90_ms']:.3f} ms"
        line = (f"{self.device} measured: median {self.ms:.3f} ms, {spread} "
                f"({d['runs']} runs, {d['threads']} threads, {d['runtime']} {d['runtime_version']})")
        return line + (f"; NOTE {d['trust']}" if d.get("trust") else "")
