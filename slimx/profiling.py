"""``slimx profile``: measured where a runner for the device exists (here or through an agent), else estimated.

The answer is always labelled: ``measured on ...`` or ``estimated for ..., expected error ±x%``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from slimx._core.errors import UsageError


@dataclass
class ProfileRequest:
    subject: str  # MODEL spec, or an artifact path (.onnx, .tflite, .mlpackage, .plan), or an export OUT folder
    device: str = "host"
    remote: str | None = None
    token: str | None = None
    remote_wait: float = 900.0  # seconds a busy agent (503) is waited out
    mode: str | None = None  # "estimate", "measure" or None (measure when possible)
    input_shapes: tuple = ()
    weights: str | None = None
    precision: str | None = None
    setting: str | None = None  # an estimator setting of the device (e.g. tensorrt-dla-fp16)
    format: str | None = None  # the artifact format the estimate is for (None: the device's default format)
    runs: int = 50
    warmup: int = 5
    threads: int | None = None
    top: int = 12
    calibrate: bool = False  # host: time the microbenchmark suite here and fit the host profile first
    learn: bool = False  # a measurement becomes one of the device's anchors (devices.anchors)
    notes: list = field(default_factory=list)


def resolve_artifact(subject: str) -> Path | None:
    """The artifact file ``subject`` names, if it names one (an export OUT folder names the one in its report)."""
    from slimx.targets import artifact_suffixes, target_for_path

    path = Path(subject)
    if path.is_dir() and (path / "report.json").is_file():
        from slimx.report import read_report

        report = read_report(path, "artifact folder")
        files = [f for f in report.get("artifacts", [])
                 if isinstance(f, dict) and target_for_path(str(f.get("path", ""))) is not None]
        if not files:
            raise UsageError(f"{subject}", "has a report.json but no artifact slimx can run", "re-run slimx export")
        return path / files[0]["path"]
    if path.suffix.lower() in artifact_suffixes(include_model_forms=False):
        if not path.exists():
            raise UsageError(f"artifact {subject}", "does not exist", "give the path of an exported file")
        return path
    return None


def artifact_inputs(path: Path):
    """Input specs read from the artifact itself (for timing a file that came without its model)."""
    from slimx.targets import target_for_path

    target = target_for_path(path)
    specs = target.read_inputs(path) if target is not None else None
    if specs is None:
        raise UsageError(f"artifact {path.name}", "carries no input description slimx can read here",
                         "profile the MODEL it came from instead (slimx profile MODEL --device ...)")
    return specs


def profile(req: ProfileRequest, progress=None) -> dict:
    """Return the latency object (the report's ``latency``): measured or estimated, labelled."""
    from slimx.devices import load_device

    if req.mode not in (None, "estimate", "measure"):
        raise UsageError(f"mode {req.mode}", "is not estimate or measure", "use --estimate or --measure")
    if req.mode == "estimate" and req.remote:
        raise UsageError("--estimate with --remote", "contradict each other", "drop one of them")
    device = load_device(req.device)
    artifact_path = resolve_artifact(req.subject)
    if artifact_path is None and req.subject.lower().endswith(".onnx") and Path(req.subject).is_file():
        artifact_path = Path(req.subject)  # an .onnx file is measured as it is (and estimated only from a model)
    can_measure = req.remote is not None or device.name == "host"
    if req.mode == "measure" and not can_measure:
        raise UsageError(f"--measure on {device.name}", "no runner for that device exists on this host",
                         "run `slimx agent serve` on the device and pass --remote URL --token-file F, "
                         "or drop --measure to get an estimate")
    if req.calibrate:
        if device.name != "host":
            raise UsageError(f"--calibrate on {device.name}", "times the microbenchmarks on this machine, so it "
                             "calibrates only the host", f"calibrate {device.name} with `slimx devices calibrate "
                             f"{device.name} --measurements CSV`, or drop --calibrate")
        device = calibrate_host(_setting(device, req), req.threads, progress)
    if req.mode == "estimate" or not can_measure:
        if artifact_path is not None:
            raise UsageError(f"--estimate for {artifact_path.name}", "the estimator reads the PyTorch graph, and a "
                             "compiled artifact has none", "profile the MODEL it came from, or measure the artifact "
                             "with --remote or on the host")
        if req.learn:
            raise UsageError("--learn", "records a measurement, and this profile is an estimate",
                             "measure (on the host, or --remote URL on the device), or drop --learn")
        return estimate(req, device, progress)
    result = measure(req, device, artifact_path, progress)
    if req.learn:
        result["learned"] = learn_from(req, device, result, artifact_path, progress)
        result["label"] += f"; {result['learned']['line']}"
    return result


def learn_from(req: ProfileRequest, device, result: dict, artifact_path: Path | None, progress=None) -> dict:
    """The learning loop: this measurement becomes an anchor of ``device`` (where it came from a MODEL, whose
    graph the estimator can read)."""
    from slimx.devices.anchor_cmd import learn

    if artifact_path is not None:
        return {"learned": False, "line": f"not learned: {artifact_path.name} carries no graph to estimate (profile "
                                          "the MODEL it came from with --learn)"}
    setting = _setting(device, req)
    got = learn(device, setting, req.subject, list(req.input_shapes), float(result["median_ms"]),
                f"slimx profile on {result.get('where') or device.name}", progress)
    return {"learned": True, "anchors": got["count"], "setting": setting.key, "factor": got.get("factor"),
            "line": f"learned: {device.name} now has {got['count']} anchor(s) for {setting.key}"}


HOST_CALIBRATION = {"runs": 20, "rounds": 2, "warmup": 3}  # about two minutes for the suite on 2 cores


def calibrate_host(setting, threads: int | None = None, progress=None):
    """Time the microbenchmark suite with ``setting``'s runner on this machine and fit the host profile (written
    to the user profile folder, the figures being this machine's); returns the reloaded host device."""
    from slimx.devices import load_device
    from slimx.devices.calibrate import calibrate
    from slimx.devices.host import cache_dir, cpu_model
    from slimx.devices.microbench import run_microbench
    from slimx.devices.registry import reload_profiles
    from slimx.devices.runners import default_runner_of

    runner = default_runner_of(setting.runtime)
    digest = "".join(c if c.isalnum() else "-" for c in cpu_model())[:40]
    csv_path = cache_dir() / f"microbench-{runner}-{digest}.csv"
    if progress is not None:
        progress.note(f"timing the microbenchmark suite with {runner} on {cpu_model()} (about two minutes)")
    run_microbench(runner, csv_path, threads=threads, progress=progress, **HOST_CALIBRATION)
    result = calibrate("host", csv_path, progress=progress)
    if progress is not None:
        fit = result["fits"].get(setting.key) or next(iter(result["fits"].values()))
        progress.note(f"host calibrated: {fit['cv']['method']} error {fit['cv'].get('mape_pct', float('nan')):.1f}%; "
                      f"wrote {result['path']}")
    reload_profiles()
    return load_device("host")


def estimate(req: ProfileRequest, device, progress=None) -> dict:
    from slimx.devices.calibrate import model_op_mix
    from slimx.devices.estimator import describe, estimate_latency, settings_of

    if progress is not None:
        progress.note(f"op mix of {req.subject}")
    costs = model_op_mix(req.subject, list(req.input_shapes), weights=req.weights)
    setting, transfer = _setting_and_transfer(device, req)
    est = estimate_latency(costs, device, setting, top=req.top)
    est["label"] = describe(est, device)
    if transfer:
        est["transfer"] = transfer
        est["label"] += f"; {req.format} {transfer}"
    if req.precision and not req.setting and setting.dtype != req.precision:
        # the profile has no setting in that precision: say so rather than let the nearest one pass for it
        est["precision_note"] = (f"{device.name} has no {req.precision} estimator setting (it has "
                                 f"{', '.join(settings_of(device))}): this is the {setting.key} estimate")
        est["label"] += f"; {est['precision_note']}"
    return est


def _setting_and_transfer(device, req: ProfileRequest):
    """The setting to estimate with, and the note of a format estimated with another format's setting."""
    if req.format and not req.setting:
        from slimx.devices.estimator import setting_for_format
        from slimx.targets import get_target

        return setting_for_format(device, get_target(req.format), req.precision)
    return _setting(device, req), None


def _setting(device, req: ProfileRequest):
    from slimx.devices.estimator import default_setting, settings_of

    if not req.setting:
        return default_setting(device, req.precision)
    settings = settings_of(device)
    if req.setting not in settings:
        raise UsageError(f"--setting {req.setting}", f"is not an estimator setting of {device.name}",
                         f"use one of {', '.join(settings) or '(none)'}")
    return settings[req.setting]


def measure(req: ProfileRequest, device, artifact_path: Path | None, progress=None) -> dict:
    from slimx._core.inputs import sample_inputs
    from slimx.devices.runners import default_runner_of
    from slimx.targets import get_target
    from slimx.targets.base import Artifact

    with tempfile.TemporaryDirectory(prefix="slimx-profile-") as tmp:
        if artifact_path is not None:
            from slimx.targets import target_for_path

            fmt = target_for_path(artifact_path).name
            artifact = Artifact(format=fmt, path=artifact_path, inputs=artifact_inputs(artifact_path), output_names=[])
        else:
            artifact, fmt = _compile_model(req, device, Path(tmp), progress)
        inputs = sample_inputs(artifact.inputs, seed=7)
        over = None
        if req.remote:
            from slimx.devices.agent import RemoteRunner
            # a format the device builds (TensorRT) goes up as the file it is built from, then is built there
            target = get_target(fmt)
            build = target.builds_on_device_from is not None and not target.recognises(artifact.path)
            runner = RemoteRunner(req.remote, req.token or "", default_runner_of(fmt), wait=req.remote_wait,
                                  note=progress.warn if progress is not None else None)
            if progress is not None:
                progress.note(f"upload {artifact.path.name} to {req.remote}")
            timing = runner.time(artifact, inputs, warmup=req.warmup, runs=req.runs, build=build,
                                 precision=req.precision or "fp16")
            where = f"{runner.last.get('device', device.name)} via agent {req.remote}"
        else:
            from slimx.devices.runners import get_runner

            runner = get_runner(default_runner_of(fmt), threads=req.threads)
            timing = runner.time(artifact, inputs, warmup=req.warmup, runs=req.runs)
            from slimx.devices.host import cpu_model
            from slimx.devices.timing import TimingConfig, latency_over_lengths

            where = f"this host ({cpu_model()})"
            # a dynamic text artifact: the same lengths the export measured (no padding, or each bucket)
            over = latency_over_lengths(runner, artifact, artifact.inputs, None,
                                        TimingConfig(runs=max(30, req.runs), warmup=req.warmup), seed=0)
    from slimx.devices.records import Latency

    label = (f"measured on {where}: {timing.runtime} {timing.runtime_version}, "
             f"{timing.threads or '-'} threads: median {timing.median_ms:.3f} ms")
    extra = {"over_lengths": over} if over is not None else {}
    return Latency.measured(device.name, timing, where=where, label=label, **extra).to_dict()


def _compile_model(req: ProfileRequest, device, out: Path, progress=None):
    """MODEL -> the device's default format (TensorRT: the ONNX the agent builds its engine from)."""
    from slimx.export.program import prepare_program
    from slimx.targets import CompileOptions, get_target

    if progress is not None:
        progress.note(f"export {req.subject} for {device.name}")
    _, program, _ = prepare_program(req.subject, list(req.input_shapes), weights=req.weights)
    fmt = device.default_format if req.remote else "onnx"
    source = get_target(fmt).builds_on_device_from if req.remote else None
    if source:  # e.g. a TensorRT engine is built on the device, from ONNX
        return get_target(source).compile(program, device, CompileOptions(), out), fmt
    target = get_target(fmt)
    precision = req.precision if req.remote else (req.precision or "fp32")
    options = CompileOptions(precision=precision or target.default_precision)
    target.validate(device, options)
    return target.compile(program, device, options, out), fmt


def render(result: dict, top: int = 12) -> str:
    """The human form: the label, then the per-op (and per-module) breakdown."""
    lines = [result["label"]]
    if result["kind"] == "measured":
        lines.append(f"  min {result['min_ms']:.3f}  p50 {result['median_ms']:.3f}  p90 {result['p90_ms']:.3f}  "
                     f"max {result['max_ms']:.3f} ms over {result['runs']} runs ({result['warmup']} warm-up)")
        if result.get("over_lengths"):
            from slimx.report import _lengths_line

            lines.append("  lengths " + _lengths_line(result["over_lengths"]))
        ops = result.get("per_op") or []
        if ops:
            lines.append("  per op (runtime profiler):")
            lines += [f"    {o['op']:<28} {o['ms']:>9.4f} ms  {o.get('share', 0) * 100:5.1f}%  x{o.get('count', '')}"
                      for o in ops[:top]]
        nodes = [n for n in (result.get("per_node") or []) if n.get("module")]
        if nodes:
            lines.append("  slowest nodes -> module path:")
            lines += [f"    {n['ms']:>9.4f} ms  {n.get('op', ''):<14} {n['module']}" for n in nodes[:top]]
        return "\n".join(lines)
    lines.append(f"  {result['ops']} ops, {result['gflops']:.3f} GFLOP; fixed per-inference overhead "
                 f"{result['fixed_ms']:.3f} ms; unit {result['unit']} ({result['dtype']})")
    lines.append("  per op class:")
    lines += [f"    {o['op']:<12} {o['ms']:>9.4f} ms  {o['share'] * 100:5.1f}%  x{o['count']}"
              for o in result["per_op"]]
    lines.append("  per module:")
    lines += [f"    {m['ms']:>9.4f} ms  {m['module']}" for m in result["per_module"][:top]]
    lines.append("  slowest ops:")
    lines += [f"    {n['ms']:>9.4f} ms  {n['op']:<22} {n['unit']:<4} {n['module']}" for n in result["per_node"][:top]]
    return "\n".join(lines)
