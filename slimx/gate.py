"""``slimx gate``: fail CI when a model got slower on its device, without failing on runner noise.

Shared CI runners drift 10-25% between runs, so a latency figure stored by one job and compared in another
fires false alarms (what users of single-baseline benchmark actions report). slimx re-measures the baseline
artifact in the same job, interleaved with the candidate in rounds, and judges the ratio by its bootstrap
interval over the rounds: a run fails only when the interval lies past the budget (``--strict``: when the
point estimate does). A device that is not at hand is estimated, and fails only when the estimate's whole
interval is past the budget. The budgets:

- ``max_ms`` (on the ``median`` or the ``p90``): the candidate's own latency;
- ``max_regression_pct``: the candidate against a baseline, either ``baseline = PATH`` (an artifact or export
  OUT folder built in the same job, e.g. from the base branch) or the entry's record in the baseline file
  (``--update-baseline`` writes it, with a copy of the artifact so that a later job can re-measure it).

A gate file (TOML, strict)::

    version = 1
    baseline_file = "gate-baseline.json"   # optional (default: beside the gate file)
    [settings]                             # optional: rounds, runs, warmup, threads, strict, confidence
    rounds = 15
    [[gate]]
    name = "minilm-host"
    model = "minilm"                       # any MODEL form, an export OUT folder or an artifact file
    device = "host"
    precision = "int8-weights"             # and/or format, recipe, input_shapes, weights
    max_ms = 12.0
    max_regression_pct = 5
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimx._core.config import config_from_dict, read_toml
from slimx._core.errors import UsageError
from slimx.devices.estimator import device_floor_ms

BOOTSTRAP = 2000
BASELINE_SCHEMA = 1


@dataclass(frozen=True)
class GateEntry:
    """One gated model on one device (a ``[[gate]]`` table).

    Attributes:
        name: the entry's name in tables, JUnit and the baseline file (letters, digits, ``-_.``).
        model: any MODEL form, an export OUT folder or an artifact file.
        device: the device (default: the one an OUT folder was exported for, else host).
        format, precision, recipe, input_shapes, weights: how the candidate is exported (as ``slimx
            export``); an OUT folder or artifact is taken as it is.
        max_ms: the most the candidate may take (``statistic``: its median or its p90).
        max_regression_pct: how much slower than the baseline it may be.
        baseline: an artifact or OUT folder to compare against, timed in the same job (else the baseline file's
            record of this entry).
    """

    name: str
    model: str
    device: str | None = None  # None: the device an export OUT folder was made for, else host
    format: str | None = None
    precision: str | None = None
    recipe: str | None = None
    input_shapes: tuple[str, ...] = ()
    weights: str | None = None
    max_ms: float | None = None
    statistic: str = "median"
    max_regression_pct: float | None = None
    baseline: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '-', '_' or '.' (100 at most)")
        if self.max_ms is None and self.max_regression_pct is None:
            raise ValueError(f"entry {self.name} has no budget: give max_ms and/or max_regression_pct")
        if self.max_ms is not None and self.max_ms <= 0:
            raise ValueError("max_ms must be positive")
        if self.max_regression_pct is not None and not 0 <= self.max_regression_pct <= 1000:
            raise ValueError("max_regression_pct must be in 0..1000")
        if self.statistic not in ("median", "p90"):
            raise ValueError(f"statistic must be median or p90, not {self.statistic!r}")


@dataclass(frozen=True)
class GateSettings:
    """How entries are timed and judged (``[settings]`` or flags).

    Attributes:
        rounds: interleaved rounds (candidate and baseline alternate, the order flipping each round).
        runs, warmup: timed and warm-up calls per artifact per round.
        strict: judge the point estimate instead of the interval.
        confidence: the interval's level (two-sided; its lower end must pass the budget to fail).
    """

    rounds: int = 15
    runs: int = 20
    warmup: int = 5
    threads: int | None = None
    strict: bool = False
    confidence: float = 0.9

    def __post_init__(self) -> None:
        if self.rounds < 3:
            raise ValueError("rounds must be at least 3 (an interval needs several)")
        if self.runs < 5 or self.warmup < 0:
            raise ValueError("runs must be at least 5 and warmup not negative")
        if not 0.5 <= self.confidence < 1:
            raise ValueError("confidence must be in [0.5, 1)")


@dataclass
class GatePlan:
    entries: list[GateEntry]
    settings: GateSettings
    baseline_file: Path
    source: str  # the gate file, or "command line"
    remote: str | None = None
    token: str | None = None
    remote_wait: float = 900.0  # seconds a busy agent (503) is waited out
    learn: bool = False  # measured MODEL entries become anchors of their devices (devices.anchors)
    notes: list[str] = field(default_factory=list)


def load_gate_file(path: str | Path, overrides: dict | None = None) -> GatePlan:
    """Read and check a gate file (unknown keys, devices, models: one UsageError each, before any work)."""
    path = Path(path)
    where = f"gate file {path}"
    data = read_toml(path, "gate file", {"baseline_file", "settings", "gate"},
                     "give a TOML file with [[gate]] tables (see slimx gate --help)")
    tables = data.get("gate")
    if not isinstance(tables, list) or not tables:
        raise UsageError(where, "has no [[gate]] tables", "add [[gate]] with name, model, device and a budget")
    settings = config_from_dict(GateSettings, {**dict(data.get("settings") or {}), **(overrides or {})},
                                f"{where} [settings]")
    entries = [config_from_dict(GateEntry, dict(t), f"{where} [[gate]] #{i + 1}") for i, t in enumerate(tables)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UsageError(where, "names two entries alike", "give every [[gate]] its own name")
    base = Path(data.get("baseline_file") or path.with_name(path.stem + "-baseline.json"))
    if not base.is_absolute():
        base = path.parent / base
    plan = GatePlan(entries, settings, base, str(path))
    check_plan(plan, relative_to=path.parent)
    return plan


def plan_from_flags(model: str, device: str | None, budget_ms: float | None, regression_pct: float | None,
                    statistic: str, precision: str | None, fmt: str | None, input_shapes: tuple, weights: str | None,
                    baseline: str | None, baseline_file: str | None, overrides: dict) -> GatePlan:
    """``slimx gate MODEL --device D --budget-ms X``: one entry, no file."""
    device = device or _exported_for(model) or "host"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(model).name or model}-{device}").strip("-")[:100] or "model"
    entry = config_from_dict(GateEntry, {k: v for k, v in {
        "name": name, "model": model, "device": device, "max_ms": budget_ms, "max_regression_pct": regression_pct,
        "statistic": statistic, "precision": precision, "format": fmt, "input_shapes": tuple(input_shapes),
        "weights": weights, "baseline": baseline}.items() if v is not None}, "slimx gate")
    settings = config_from_dict(GateSettings, overrides, "slimx gate")
    plan = GatePlan([entry], settings, Path(baseline_file or "gate-baseline.json"), "command line")
    check_plan(plan, relative_to=Path("."))
    return plan


def check_plan(plan: GatePlan, relative_to: Path) -> None:
    """Devices, models and budgets checked before anything is exported or timed."""
    from slimx.devices import load_device
    from slimx.export.intake import check_spec

    resolved = []
    for entry in plan.entries:
        model = _relative(entry.model, relative_to)
        entry = dataclasses.replace(entry, device=entry.device or _exported_for(model) or "host")
        device = load_device(entry.device, measure_host=False)
        baseline = _relative(entry.baseline, relative_to) if entry.baseline else None
        for what, spec in (("model", model), ("baseline", baseline)):
            if spec is None or _is_artifact_like(spec):
                continue
            if ("/" in spec or spec.startswith(".")) and ":" not in spec and not Path(spec).exists():
                raise UsageError(f"entry {entry.name}: {what} {spec}", "does not exist",
                                 "export it first (slimx export MODEL --out DIR), or fix the path")
            check_spec(spec)
        floor = device_floor_ms(device, entry.precision)
        if entry.max_ms is not None and floor is not None and entry.max_ms < floor:
            raise UsageError(f"entry {entry.name}: max_ms {entry.max_ms:g}", f"is below {device.name}'s fixed "
                             f"per-inference overhead ({floor:.3f} ms in its calibrated profile): no model can "
                             "meet it", f"give a budget above {floor:.3f} ms")
        resolved.append(dataclasses.replace(entry, model=model, baseline=baseline))
    plan.entries = resolved


def _exported_for(spec: str) -> str | None:
    """The device an export OUT folder was made for (its report's device), else None."""
    from slimx.report import read_report

    if not (Path(spec) / "report.json").is_file():
        return None
    device = read_report(spec, "slimx gate").get("device")  # a corrupt or foreign report: one line, not a guess
    return device.get("name") if isinstance(device, dict) else None


def _relative(spec: str | None, base: Path) -> str | None:
    """A path in a gate file is relative to the file; other MODEL forms are left as they are."""
    if spec is None or ":" in spec.split("/")[0] or Path(spec).is_absolute():
        return spec
    candidate = base / spec
    return str(candidate) if candidate.exists() or spec.endswith((".onnx", ".pt2", ".tflite")) else spec


def _is_artifact_like(spec: str) -> bool:
    from slimx.profiling import resolve_artifact

    path = Path(spec)
    if path.is_dir() and (path / "report.json").is_file():
        return True
    return resolve_artifact(spec) is not None if path.suffix else False


# --------------------------------------------------------------------------- running


def run_gate(plan: GatePlan, update_baseline: bool = False, progress=None) -> dict:
    """Judge (or, with ``update_baseline``, record) every entry; returns the result object."""
    from slimx._core.versions import tool_versions
    from slimx.devices.host import cpu_model

    stored = read_baselines(plan.baseline_file)
    for entry in plan.entries:  # a relative budget needs something to compare against, known before any work
        if (entry.max_regression_pct is not None and not update_baseline and entry.baseline is None
                and entry.name not in stored.get("entries", {})):
            raise UsageError(f"entry {entry.name}", f"has max_regression_pct but no baseline: {plan.baseline_file} "
                             f"{'has no record of it' if plan.baseline_file.exists() else 'does not exist'}",
                             "run `slimx gate ... --update-baseline` on the base branch first, or give baseline = "
                             "PATH (an artifact or export OUT folder built in this job)")
    started = time.time()
    results = []
    work = Path(tempfile.mkdtemp(prefix="slimx-gate-"))
    try:
        for entry in plan.entries:
            if progress is not None:
                progress.note(f"{entry.name}: {entry.model} on {entry.device}")
            results.append(_run_entry(plan, entry, stored, work / entry.name, update_baseline, progress))
        if update_baseline:
            write_baselines(plan.baseline_file, stored, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if r["verdict"] == "fail"]
    return {"tool": "slimx gate", "source": plan.source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                 time.gmtime()),
            "settings": dataclasses.asdict(plan.settings), "baseline_file": str(plan.baseline_file),
            "updated_baseline": update_baseline, "machine": cpu_model(), "versions": tool_versions(),
            "passed": not failed, "entries": results, "seconds": round(time.time() - started, 1),
            "notes": plan.notes}


def _run_entry(plan: GatePlan, entry: GateEntry, stored: dict, work: Path, update: bool, progress) -> dict:
    from slimx.devices import load_device

    device = load_device(entry.device)
    measured = device.name == "host" or plan.remote is not None
    out = {"name": entry.name, "model": entry.model, "device": device.name, "kind": "measured" if measured else
           "estimated", "budgets": {k: v for k, v in (("max_ms", entry.max_ms), ("statistic", entry.statistic),
                                                      ("max_regression_pct", entry.max_regression_pct)) if v
                                    is not None}, "checks": [], "warnings": []}
    if not measured:
        return _estimated_entry(plan, entry, device, stored, out, update)
    work.mkdir(parents=True, exist_ok=True)
    candidate = _artifact_of(entry.model, entry, work / "candidate", progress)
    baseline_art, record = None, stored.get("entries", {}).get(entry.name)
    if entry.max_regression_pct is not None and not update:
        if entry.baseline is not None:
            baseline_art = _artifact_of(entry.baseline, entry, work / "baseline", progress)
            out["baseline"] = {"from": entry.baseline, "how": "re-measured in this job, interleaved"}
        elif record is not None:
            baseline_art = _stored_artifact(plan.baseline_file, record)
            if baseline_art is None:
                out["warnings"].append(
                    f"the baseline's artifact ({record['artifact'].get('path')}) is not here or its hash differs: "
                    "compared with the latency recorded in " + str(plan.baseline_file) + " on " +
                    str(record.get("machine")) + "; timings from another job drift 10-25% on shared runners")
                out["baseline"] = {"from": str(plan.baseline_file), "how": "recorded latency (not re-measured)"}
            else:
                out["baseline"] = {"from": str(plan.baseline_file), "how": "its artifact, re-measured in this job, "
                                                                           "interleaved"}
    timer = _Timer(plan, candidate)
    rounds = _time_rounds(timer, candidate, baseline_art, plan.settings, progress, entry.name)
    cand = rounds["candidate"]
    out["format"] = candidate.format
    out["candidate"] = {"artifact": str(candidate.path), "sha256": sha256_of(candidate.path),
                        "runtime": rounds["runtime"], "median_ms": _r(np.median(cand["median"])),
                        "p90_ms": _r(np.median(cand["p90"])), "rounds_median_ms": [_r(v) for v in cand["median"]],
                        "rounds_p90_ms": [_r(v) for v in cand["p90"]]}
    if plan.learn:
        _learn(plan, entry, device, out, progress)
    if update:
        out["verdict"] = "recorded"
        out["record"] = {"artifact_path": candidate.path, "rounds": cand, "runtime": rounds["runtime"]}
        return out
    s = plan.settings
    if entry.max_ms is not None:
        values = np.asarray(cand[entry.statistic])
        point, lo, hi = float(np.median(values)), *bootstrap_ci(values, s.confidence)
        out["checks"].append(_judge("max_ms", f"{entry.statistic} ms", point, (lo, hi), entry.max_ms, s))
    if entry.max_regression_pct is not None:
        limit = 1 + entry.max_regression_pct / 100
        if baseline_art is not None:
            base = rounds["baseline"]
            ratios = np.asarray(cand["median"]) / np.asarray(base["median"])
            point, lo, hi = float(np.median(ratios)), *bootstrap_ci(ratios, s.confidence)
            out["baseline"].update({"median_ms": _r(np.median(base["median"])),
                                    "rounds_median_ms": [_r(v) for v in base["median"]]})
        else:
            base = np.asarray(record["latency"]["rounds_median_ms"])
            point = float(np.median(cand["median"]) / np.median(base))
            lo, hi = ratio_ci(np.asarray(cand["median"]), base, s.confidence)
            out["baseline"]["median_ms"] = _r(np.median(base))
            _compare_setups(record, rounds["runtime"], out)
        out["checks"].append(_judge("max_regression_pct", "candidate / baseline", point, (lo, hi), limit, s))
    out["verdict"] = "fail" if any(c["verdict"] == "fail" for c in out["checks"]) else "pass"
    return out


def _learn(plan: GatePlan, entry: GateEntry, device, out: dict, progress) -> None:
    """``--learn``: the candidate's measured median becomes an anchor of the device (for a MODEL entry, whose graph
    the estimator reads; an artifact or export folder is said not to be learned)."""
    from slimx.devices.anchor_cmd import learn
    from slimx.devices.estimator import default_setting

    if _is_artifact_like(entry.model):
        out["warnings"].append(f"not learned: {entry.model} is an artifact or export folder, with no graph to "
                               "estimate (gate the MODEL with --learn)")
        return
    setting = default_setting(device, entry.precision or (None if plan.remote else "fp32"))
    where = f"slimx gate via {plan.remote}" if plan.remote else "slimx gate on this host"
    got = learn(device, setting, entry.model, list(entry.input_shapes), out["candidate"]["median_ms"], where,
                progress)
    out["learned"] = {"anchors": got["count"], "setting": setting.key, "factor": got.get("factor")}


def _estimated_entry(plan: GatePlan, entry: GateEntry, device, stored: dict, out: dict, update: bool) -> dict:
    """No runner for the device here: the estimator's answer, failing only when its interval is past the budget."""
    est = _estimate(entry.model, entry, device)
    interval = est.get("interval_ms") or [est["total_ms"], est["total_ms"]]
    out["candidate"] = {"estimate_ms": _r(est["total_ms"]), "interval_ms": [_r(v) for v in interval],
                        "setting": est.get("setting"), "expected_error_pct": est.get("expected_error_pct"),
                        "cv_method": est.get("cv_method"), "setup": est.get("setup")}
    if est.get("transfer"):
        out["candidate"]["transfer"] = est["transfer"]
        out["warnings"].append(f"{entry.format} {est['transfer']}")
    anchors = est.get("anchors") or {}
    if anchors.get("count"):
        out["candidate"]["anchors"] = {k: anchors[k] for k in ("count", "setup", "factor", "interval_factors")}
    if est.get("unanchored"):  # the interval is for a setup not anchored; the profile's own setup's beside it
        out["candidate"]["unanchored"] = est["unanchored"]
    out["warnings"].append(f"estimated, not measured: no {device.name} here (give --remote URL for a device agent)"
                           + (f"; anchored to {anchors['setup']!r} by {anchors['count']} measurement(s)"
                              if anchors.get("count") else "")
                           + ("; its interval is for a setup not anchored, as wide as setups differ (time two "
                              f"models there and `slimx devices anchor {device.name}` to narrow it)"
                              if est.get("unanchored") else ""))
    if anchors.get("note"):
        out["warnings"].append(anchors["note"])
    if update:
        out["verdict"] = "recorded"
        out["record"] = {"estimate": out["candidate"]}
        return out
    s = plan.settings
    if entry.max_ms is not None:
        check = _judge("max_ms", "estimated ms", est["total_ms"], tuple(interval), entry.max_ms, s)
        check["how"] = "estimate: fails only when its whole interval is past the budget" + (
            " (--strict: when the estimate is)" if s.strict else "")
        out["checks"].append(check)
    if entry.max_regression_pct is not None:
        if entry.baseline is not None:
            base_ms = _estimate(entry.baseline, entry, device)["total_ms"]
        else:
            record = stored["entries"][entry.name]
            if "estimate" not in record:
                raise UsageError(f"entry {entry.name}", "its baseline record was measured, and this device can only "
                                 "be estimated here", "record the baseline where the entry is estimated, or give "
                                 "--remote")
            base_ms = record["estimate"]["estimate_ms"]
        ratio = est["total_ms"] / base_ms
        out["baseline"] = {"estimate_ms": _r(base_ms), "how": "estimated by the same device model"}
        check = _judge("max_regression_pct", "estimated candidate / baseline", ratio, (ratio, ratio),
                       1 + entry.max_regression_pct / 100, s)
        check["how"] = ("a ratio of two estimates by one device model: most of the model's error is shared and "
                        "cancels, so the point ratio is judged")
        out["checks"].append(check)
    out["verdict"] = "fail" if any(c["verdict"] == "fail" for c in out["checks"]) else "pass"
    return out


def _judge(budget: str, what: str, point: float, interval: tuple, limit: float, s: GateSettings) -> dict:
    lo, hi = interval
    beyond = point > limit if s.strict else lo > limit
    return {"budget": budget, "what": what, "value": _r(point), "interval": [_r(lo), _r(hi)], "limit": _r(limit),
            "confidence": s.confidence, "verdict": "fail" if beyond else "pass",
            "rule": "point estimate past the limit" if s.strict else
                    f"the whole {s.confidence:.0%} interval past the limit"}


def bootstrap_ci(values: np.ndarray, confidence: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """The ``confidence`` bootstrap interval of the median of ``values`` (resampling the rounds).

    Example:
        >>> lo, hi = bootstrap_ci(np.array([1.0, 1.1, 0.9, 1.05, 0.95]))
        >>> 0.9 <= lo <= 1.0 <= hi <= 1.1
        True
    """
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(values, size=(BOOTSTRAP, len(values)), replace=True), axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(meds, tail)), float(np.percentile(meds, 100 - tail))


def ratio_ci(candidate: np.ndarray, baseline: np.ndarray, confidence: float = 0.9, seed: int = 0):
    """Interval of median(candidate) / median(baseline), the two resampled independently (no pairing)."""
    rng = np.random.default_rng(seed)
    a = np.median(rng.choice(candidate, size=(BOOTSTRAP, len(candidate))), axis=1)
    b = np.median(rng.choice(baseline, size=(BOOTSTRAP, len(baseline))), axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(a / b, tail)), float(np.percentile(a / b, 100 - tail))


def _compare_setups(record: dict, runtime: str, out: dict) -> None:
    from slimx.devices.host import cpu_model

    if record.get("machine") != cpu_model() or record.get("runtime") != runtime:
        out["warnings"].append(f"the baseline was recorded on {record.get('machine')} with {record.get('runtime')}; "
                               f"this job runs on {cpu_model()} with {runtime}: not like for like")


class _Timer:
    """Times an artifact here (its format's default runner) or through a device agent (``--remote``)."""

    def __init__(self, plan: GatePlan, artifact) -> None:
        from slimx.devices.runners import default_runner_of, get_runner

        self.remote = plan.remote
        name = default_runner_of(artifact.format)
        if plan.remote:
            from slimx.devices.agent import RemoteRunner

            self.runner = RemoteRunner(plan.remote, plan.token or "", name, wait=plan.remote_wait)
        else:
            self.runner = get_runner(name, threads=plan.settings.threads)
        self.sessions: dict = {}

    def time(self, artifact, inputs, warmup: int, runs: int):
        if self.remote:
            return self.runner.time(artifact, inputs, warmup=warmup, runs=runs)
        from slimx.targets.base import Timing

        key = str(artifact.path)
        if key not in self.sessions:
            self.sessions[key] = self.runner.session(artifact.path)
        session = self.sessions[key]
        return Timing.measure(lambda: self.runner.run(artifact, inputs, session=session), warmup, runs,
                              runtime=self.runner.name, runtime_version=getattr(self.runner, "version", ""),
                              threads=self.runner.threads)


def _time_rounds(timer: _Timer, candidate, baseline, s: GateSettings, progress, name: str) -> dict:
    """``s.rounds`` rounds; in each the candidate and the baseline (if any) are timed back to back, the order
    flipping every round, so that drift in the machine's load falls on both alike."""
    from slimx._core.inputs import sample_inputs

    inputs = {}
    for which, art in (("candidate", candidate), ("baseline", baseline)):
        if art is not None:  # a mask input is all real tokens: the same work every call
            inputs[which] = tuple(x.fill_(1) if spec.kind == "mask" else x
                                  for spec, x in zip(art.inputs, sample_inputs(art.inputs, seed=11), strict=True))
    out = {k: {"median": [], "p90": []} for k in inputs}
    runtime = ""
    for r in range(s.rounds):
        order = [k for k in ("candidate", "baseline") if k in inputs]
        if r % 2:
            order.reverse()
        for which in order:
            art = candidate if which == "candidate" else baseline
            timing = timer.time(art, inputs[which], s.warmup, s.runs)
            out[which]["median"].append(timing.median_ms)
            out[which]["p90"].append(timing.p90_ms)
            runtime = f"{timing.runtime} {timing.runtime_version}".strip()
        if progress is not None:
            progress.tick(f"{name}: round", r + 1, s.rounds)
            progress.note(f"{name}: round {r + 1}/{s.rounds}: candidate {out['candidate']['median'][-1]:.3f} ms"
                          + (f", baseline {out['baseline']['median'][-1]:.3f} ms" if "baseline" in out else ""))
    out["runtime"] = runtime
    return out


def _artifact_of(spec: str, entry: GateEntry, work: Path, progress):
    """The artifact to time: the one an OUT folder or path names, else ``slimx export`` of the MODEL into
    ``work`` with the entry's format, precision and recipe."""
    from slimx.profiling import artifact_inputs, resolve_artifact
    from slimx.targets import Artifact, target_for_path

    path = resolve_artifact(spec) if _is_artifact_like(spec) else None
    if path is None and spec.lower().endswith(".onnx") and Path(spec).is_file():
        path = Path(spec)
    if path is not None:
        specs = _specs_from_report(path) or artifact_inputs(path)
        return Artifact(target_for_path(path).name, path, specs, [])
    from slimx._core.progress import Progress
    from slimx.config import ExportConfig
    from slimx.pipeline import run_export

    flags = {"model": spec, "device": "host", "out": str(work), "runs": 30, "warmup": 1,
             "input_shapes": tuple(entry.input_shapes), "weights": entry.weights, "format": entry.format,
             "precision": entry.precision, "recipe": entry.recipe}
    if progress is not None:
        progress.note(f"export {spec} for the gate")
    cfg = ExportConfig.from_flags({k: v for k, v in flags.items() if v not in (None, ())},
                                  where=f"gate entry {entry.name}")
    report = run_export(cfg, Progress(total=9, enabled=False))  # the export slimx.export runs; a failed verdict raises
    path = work / report["artifacts"][0]["path"]
    return Artifact(target_for_path(path).name, path, _specs_from_report(path), [])


def _specs_from_report(path: Path):
    """The artifact's input specs from the report beside it (its shapes and dynamic axes), if there is one."""
    from slimx._core.inputs import InputSpec

    report_path = Path(path).parent / "report.json"
    if not report_path.is_file():
        return None
    try:
        inputs = json.loads(report_path.read_text())["model"]["inputs"]
        return [InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i["kind"], *(i.get("range") or (0, 2)),
                          dynamic=tuple((d["axis"], d["min"], d["max"]) for d in i.get("dynamic", ())))
                for i in inputs]
    except (ValueError, KeyError, TypeError):
        return None


def _estimate(spec: str, entry: GateEntry, device) -> dict:
    """The estimator's answer for the MODEL (an OUT folder: its report's estimate for this device, else the
    model it was exported from)."""
    from slimx.profiling import ProfileRequest, estimate

    path = Path(spec)
    if path.is_dir() and (path / "report.json").is_file():
        from slimx.report import read_report

        report = read_report(path, f"entry {entry.name}:")
        latency = report.get("latency") or {}
        if latency.get("kind") == "estimated" and latency.get("device") == device.name:
            return latency
        spec = (report.get("config") or {}).get("model") or spec
    if _is_artifact_like(spec):
        raise UsageError(f"entry {entry.name}: {spec}", f"is a compiled artifact, and {device.name} can only be "
                         "estimated here (the estimator reads the PyTorch graph)",
                         "give the MODEL, an OUT folder exported for that device, or --remote")
    return estimate(ProfileRequest(subject=spec, device=device.name, input_shapes=tuple(entry.input_shapes),
                                   weights=entry.weights, precision=entry.precision, format=entry.format, top=0),
                    device)


# --------------------------------------------------------------------------- baselines


def sha256_of(path: Path) -> str:
    """The artifact's SHA-256 (a package folder: over its files in order, names included)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_baselines(path: Path) -> dict:
    if not path.is_file():
        return {"schema": BASELINE_SCHEMA, "entries": {}}
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != BASELINE_SCHEMA or not isinstance(data.get("entries"), dict):
            raise ValueError("not a slimx gate baseline")
    except ValueError as exc:
        raise UsageError(f"baseline file {path}", f"is not a slimx gate baseline ({exc})",
                         "rewrite it with --update-baseline, or point baseline_file at another") from None
    return data


def _store_dir(path: Path) -> Path:
    return path.with_name(path.stem + ".artifacts")


def _stored_artifact(path: Path, record: dict):
    """The baseline's stored artifact, if it is there and unchanged (its hash)."""
    from slimx.targets import Artifact, target_for_path

    art = record.get("artifact") or {}
    stored = path.parent / art.get("path", "")
    if not art.get("path") or not stored.exists() or sha256_of(stored) != art.get("sha256"):
        return None
    specs = _specs_from_report(stored) or _specs_of_record(record)
    return Artifact(target_for_path(stored).name, stored, specs, [])


def _specs_of_record(record: dict):
    from slimx._core.inputs import InputSpec

    return [InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i["kind"], *(i.get("range") or (0, 2)),
                      dynamic=tuple(tuple(d) for d in i.get("dynamic", ()))) for i in record.get("inputs", [])]


def write_baselines(path: Path, stored: dict, results: list[dict]) -> None:
    """Record each entry: the artifact (a copy beside the file, with its hash and inputs), its latency by round,
    the runtime, tool versions and machine; written under a temporary name, then renamed."""
    from slimx._core.versions import tool_versions
    from slimx.devices.host import cpu_model

    folder = _store_dir(path)
    entries = dict(stored.get("entries", {}))
    for res in results:
        record = res.pop("record")
        entry = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": res["device"],
                 "machine": cpu_model(), "versions": tool_versions(), "kind": res["kind"]}
        if "estimate" in record:
            entry["estimate"] = record["estimate"]
        else:
            src = Path(record["artifact_path"])
            dest = folder / res["name"] / src.name
            if dest.parent.exists():
                shutil.rmtree(dest.parent)
            dest.parent.mkdir(parents=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copyfile(src, dest)
            report = src.parent / "report.json"
            if report.is_file():
                shutil.copyfile(report, dest.parent / "report.json")
            entry["artifact"] = {"path": dest.relative_to(path.parent).as_posix(), "sha256": sha256_of(dest),
                                 "format": res.get("format")}
            entry["runtime"] = record["runtime"]
            entry["latency"] = {"rounds_median_ms": [_r(v) for v in record["rounds"]["median"]],
                                "rounds_p90_ms": [_r(v) for v in record["rounds"]["p90"]],
                                "median_ms": _r(np.median(record["rounds"]["median"]))}
        entries[res["name"]] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps({"schema": BASELINE_SCHEMA, "entries": entries}, indent=2) + "\n")
    os.replace(tmp, path)


def _r(value: float) -> float:
    return round(float(value), 4)


# --------------------------------------------------------------------------- outputs


def table(result: dict) -> str:
    """The terminal table: one line per check."""
    rows = [("entry", "device", "how", "check", "value", "interval", "limit", "verdict")]
    for e in result["entries"]:
        if e["verdict"] == "recorded":
            cand = e["candidate"]
            value = cand.get("median_ms", cand.get("estimate_ms"))
            rows.append((e["name"], e["device"], e["kind"], "baseline recorded", f"{value:.3f} ms", "-", "-",
                         "recorded"))
            continue
        for c in e["checks"]:
            unit = " ms" if c["budget"] == "max_ms" else "x"
            rows.append((e["name"], e["device"], e["kind"], c["what"], f"{c['value']:.3f}{unit}",
                         f"{c['interval'][0]:.3f}-{c['interval'][1]:.3f}", f"{c['limit']:.3f}{unit}",
                         c["verdict"].upper()))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "PASS" if result["passed"] else "FAIL"
    if result["updated_baseline"]:
        verdict = f"baseline written to {result['baseline_file']}"
    lines.append(f"slimx gate: {verdict} ({len(result['entries'])} entries, {result['seconds']} s)")
    for e in result["entries"]:
        for w in e["warnings"]:
            lines.append(f"  note [{e['name']}]: {w}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """A Markdown summary (a GitHub job summary)."""
    verdict = "passed" if result["passed"] else "**failed**"
    lines = [f"### slimx gate {verdict}", "",
             f"{len(result['entries'])} entries on {result['machine']}; {result['settings']['rounds']} interleaved "
             f"rounds of {result['settings']['runs']} runs; a check fails when "
             + ("its point estimate" if result["settings"]["strict"] else
                f"its whole {result['settings']['confidence']:.0%} interval") + " is past the limit.", "",
             "| entry | device | how | check | value | interval | limit | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in result["entries"]:
        for c in e.get("checks", []):
            unit = " ms" if c["budget"] == "max_ms" else "x"
            mark = ":x: fail" if c["verdict"] == "fail" else ":white_check_mark: pass"
            lines.append(f"| {e['name']} | {e['device']} | {e['kind']} | {c['what']} | {c['value']:.3f}{unit} | "
                         f"{c['interval'][0]:.3f}-{c['interval'][1]:.3f} | {c['limit']:.3f}{unit} | {mark} |")
    notes = [f"- {e['name']}: {w}" for e in result["entries"] for w in e["warnings"]]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def junit(result: dict) -> str:
    """JUnit XML: one test case per entry, a failure with the numbers where a check failed."""
    from xml.etree import ElementTree as ET

    cases = result["entries"]
    failures = sum(e["verdict"] == "fail" for e in cases)
    suite = ET.Element("testsuite", name="slimx gate", tests=str(len(cases)), failures=str(failures), errors="0",
                       skipped="0", time=f"{result['seconds']:.1f}", timestamp=result["created"])
    for e in cases:
        case = ET.SubElement(suite, "testcase", classname=f"slimx.gate.{e['device']}", name=e["name"],
                             time=f"{result['seconds'] / max(len(cases), 1):.1f}")
        text = "; ".join(f"{c['what']} {c['value']:.4f} (interval {c['interval'][0]:.4f}-{c['interval'][1]:.4f}) "
                         f"vs limit {c['limit']:.4f}: {c['verdict']}" for c in e.get("checks", []))
        bad = [c for c in e.get("checks", []) if c["verdict"] == "fail"]
        if bad:
            c = bad[0]
            failure = ET.SubElement(case, "failure", type="LatencyRegression",
                                    message=f"{e['name']} on {e['device']}: {c['what']} {c['value']:.4f} past "
                                            f"{c['limit']:.4f} ({e['kind']})")
            failure.text = text
        out = ET.SubElement(case, "system-out")
        out.text = text + "".join(f"\nnote: {w}" for w in e["warnings"])
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
