"""Latency of an artifact as slimx reports it: measured with a runner where one exists here (at the export shape,
over sequence lengths, over the calibration data's real lengths), else estimated per op for the device; the
speed-up of a compressed model against the uncompressed one, timed interleaved in one run."""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass

from slimx._core.errors import UsageError
from slimx._core.inputs import sample_inputs


@dataclass(frozen=True)
class TimingConfig:
    """How latency is measured where a runner exists."""

    runs: int = 50
    warmup: int = 5
    threads: int | None = None
    learn: bool = False  # a measurement of the device becomes one of its anchors (devices.anchors)

    def __post_init__(self) -> None:
        if self.runs < 30:
            raise UsageError("--runs", f"{self.runs} is too few for a median and p90", "give at least 30")
        if self.warmup < 0:
            raise UsageError("--warmup", "must not be negative", "give 0 or more")
        if self.threads is not None and self.threads < 1:
            raise UsageError("--threads", "must be at least 1", "e.g. --threads 2")


def run_latency(device, target, artifact, program, t: TimingConfig, seed: int = 0, precision: str = "fp32",
                calib=None) -> tuple[dict, dict | None]:
    """Measure with the target's own runtime when it runs here; say plainly when the device is not at hand.

    Returns the report's ``latency`` (for the device) and ``host_latency`` (measured here for another device)."""
    from slimx.devices.records import Latency

    inputs = sample_inputs(program.inputs, seed=seed + 7)
    runner = target.runner(threads=t.threads)
    host = None
    if runner is not None:
        host = Latency.measured("host", runner.time(artifact, inputs, warmup=t.warmup, runs=t.runs))
        over = latency_over_lengths(runner, artifact, program.inputs, calib, t, seed)
        if over is not None:
            host.details["over_lengths"] = over
    if device.name == "host":
        if host is None:
            return Latency.not_measured("host", target.runner_missing_reason()).to_dict(), None
        return host.to_dict(), None
    reason = f"no {device.name} is attached and no runner for it exists here"
    host_dict = host.to_dict() if host is not None else None
    if program.exported is not None:
        from slimx.devices.estimator import describe, estimate_latency, setting_for_format
        from slimx.devices.opmix import op_mix

        try:
            setting, transfer = setting_for_format(device, target, precision)
            est = estimate_latency(op_mix(program.exported), device, setting)
        except UsageError as exc:
            reason += f"; no estimate either ({exc.line()})"
        else:
            est["label"] = describe(est, device)
            if transfer:
                est["transfer"] = transfer
                est["label"] += f"; {target.name} {transfer}"
            over = estimate_over_lengths(program, device, setting, calib,
                                         (artifact.meta.get("buckets") or {}).get("sizes"))
            if over is not None:
                over["method"] = "the estimator's price of the program at each length"
                est["over_lengths"] = over
            est["not_measured"] = reason + " (measure it with `slimx profile OUT --device D --remote URL`)"
            return Latency.estimated(est).to_dict(), host_dict
    return Latency.not_measured(device.name, reason).to_dict(), host_dict


def latency_over_lengths(runner, artifact, specs, calib, t: TimingConfig, seed: int) -> dict | None:
    """A dynamic text artifact timed at several sequence lengths (no padding: every position real), a bucketed
    one at each bucket (``over_lengths``)."""
    from slimx.export.shapes import seq_range_of

    if seq_range_of(specs) is None:
        return None
    runs = max(10, t.runs // 5)

    def time_at(length: int) -> dict:
        timing = runner.time(artifact, inputs_at_length(specs, length, seed), warmup=max(1, t.warmup), runs=runs)
        return {"median_ms": round(timing.median_ms, 4), "p90_ms": round(timing.p90_ms, 4)}

    out = over_lengths(specs, calib, (artifact.meta.get("buckets") or {}).get("sizes"), time_at)
    out["runs_each"] = runs
    return out


def inputs_at_length(specs, length: int, seed: int) -> tuple:
    """Fresh inputs of a text model at ``length`` tokens, every position real (the mask all ones)."""
    from slimx.export.shapes import at_length

    return tuple(x.fill_(1) if s.kind == "mask" else x
                 for s, x in zip(specs, sample_inputs(at_length(specs, length), seed=seed + 7), strict=True))


def estimate_over_lengths(program, device, setting, calib, buckets) -> dict | None:
    """The estimator's price of a dynamic text program at the same lengths a measurement would use (a bucketed
    artifact at each bucket: it runs padded to one), and over the calibration data's real lengths."""
    from slimx.devices.estimator import estimate_latency
    from slimx.devices.opmix import op_mix
    from slimx.export.shapes import seq_range_of

    if program.exported is None or seq_range_of(program.inputs) is None:
        return None

    def price_at(length: int) -> dict:
        est = estimate_latency(op_mix(program.exported, length), device, setting, top=0)
        return {"median_ms": round(est["total_ms"], 4)}

    return over_lengths(program.inputs, calib, buckets, price_at)


def over_lengths(specs, calib, buckets, cost_at) -> dict:
    """Latency at several sequence lengths (``cost_at(length)`` -> {median_ms, ...}): each bucket, or 5 lengths
    spread over the range, and, with calibration text, the latency expected over that data's real lengths
    (interpolated between the lengths; a bucketed artifact runs each sample at its bucket's cost): what a user
    sending those sentences one at a time would see."""
    import numpy as np

    from slimx.export.shapes import lengths_of, measure_lengths, pick_bucket, seq_range_of

    real = lengths_of(calib.batches, specs) if calib is not None else []
    typical = int(np.median(real)) if real else None
    rows = [{"length": n, **cost_at(n)} for n in (buckets or measure_lengths(*seq_range_of(specs), typical=typical))]
    out = {"axis": "seq", "lengths": rows}
    if buckets:
        out["buckets"] = list(buckets)
    if real:
        if buckets:
            cost = {r["length"]: r["median_ms"] for r in rows}
            per_sample = np.array([cost[pick_bucket(n, buckets, truncate=True)] for n in real])
            method = "each sample at its real length, run in the smallest bucket that holds it"
        else:
            per_sample = np.interp(real, [r["length"] for r in rows], [r["median_ms"] for r in rows])
            method = "each sample at its real length, interpolated between the measured lengths"
        out["on_data"] = {"data": calib.describe(), "samples": len(real), "median_length": int(np.median(real)),
                          "median_ms": round(float(np.median(per_sample)), 4),
                          "mean_ms": round(float(np.mean(per_sample)), 4),
                          "p90_ms": round(float(np.percentile(per_sample, 90)), 4), "method": method}
    return out


def latency_model_for(device, precision: str):
    """The latency model passes get for the chosen device: the per-op estimator in the device's setting for
    this precision, or None when the device's profile has no estimator settings."""
    from slimx.devices.estimator import EstimatorLatencyModel

    try:
        return EstimatorLatencyModel.for_device(device, precision)
    except UsageError:
        return None


def measure_speedup(target, device, options, base_program, program, artifact, t: TimingConfig, seed: int, calib,
                    staging, progress) -> dict:
    """Compile the uncompressed model (``base_program``) the way ``artifact`` was compiled and time both,
    interleaved, in the same run and runtime."""
    from slimx.export.shapes import at_real_lengths, seq_range_of

    runner = target.runner(threads=t.threads)
    if runner is None:
        return {"measured": False, "reason": target.runner_missing_reason()}
    base_dir = staging / ".baseline"
    base_dir.mkdir()
    try:
        base_options = dataclasses.replace(options, precision="fp32" if options.precision == "int8" else
                                           options.precision)
        baseline = target.compile(base_program, device, base_options, base_dir)
        inputs = sample_inputs(program.inputs, seed=seed + 7)
        runs = max(30, t.runs // 2)
        base_ms, comp_ms = [], []
        for _ in range(2):  # interleaved rounds, so drift in machine load hits both alike
            base_ms.append(runner.time(baseline, inputs, warmup=t.warmup, runs=runs).median_ms)
            comp_ms.append(runner.time(artifact, inputs, warmup=t.warmup, runs=runs).median_ms)
        on_data = None
        if calib is not None and seq_range_of(program.inputs) is not None:
            real = at_real_lengths(calib.batches, program.input_names)
            base_data, comp_data = paired_over_data(runner, baseline, artifact, real)
            on_data = {"data": calib.describe(), "baseline_ms": round(base_data, 4),
                       "compressed_ms": round(comp_data, 4), "ratio": round(base_data / comp_data, 3),
                       "method": "mean per sample over the data at its real lengths, best of 3 interleaved rounds"}
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    base, comp = min(base_ms), min(comp_ms)
    out = {"measured": True, "runtime": runner.name, "baseline_median_ms": round(base, 4),
           "compressed_median_ms": round(comp, 4), "ratio": round(base / comp, 3),
           "baseline_precision": base_options.precision, "method": "best of 2 interleaved rounds of medians"}
    if on_data is not None:  # the lengths users send: the headline figure
        out["at_export_shape"] = {k: out[k] for k in ("baseline_median_ms", "compressed_median_ms", "ratio")}
        out["on_data"] = on_data
        out["ratio"] = on_data["ratio"]
        progress.note(f"speedup {on_data['ratio']:.2f}x on the data at real lengths ({on_data['baseline_ms']:.3f} ms"
                      f" -> {on_data['compressed_ms']:.3f} ms per sample); {base / comp:.2f}x at the export shape")
    else:
        progress.note(f"speedup {base / comp:.2f}x ({base:.3f} ms -> {comp:.3f} ms, {runner.name})")
    return out


def paired_over_data(runner, first, second, batches: list[tuple], rounds: int = 3) -> tuple[float, float]:
    """Mean milliseconds per sample of two artifacts over the same samples (each at its own shape), in
    interleaved rounds so that machine drift hits both alike; the best round of each."""
    sessions = (runner.session(first.path), runner.session(second.path))
    for artifact, session in zip((first, second), sessions, strict=True):
        runner.run(artifact, batches[0], session=session)  # warm-up: first-call allocation is not the model
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, (artifact, session) in enumerate(zip((first, second), sessions, strict=True)):
            start = time.perf_counter()
            for batch in batches:
                runner.run(artifact, batch, session=session)
            best[i] = min(best[i], (time.perf_counter() - start) * 1000 / len(batches))
    return best[0], best[1]
