"""The export orchestrator, a short chain of typed stages: resolve -> prepare -> compress -> compile -> prove ->
report. Each stage is a function of the config and the records before it; the work itself lives in the room that
owns it (``export`` shapes and parity, ``slim`` passes and fidelity, ``quant`` and ``targets`` the artifact,
``devices`` latency, ``_core.outdir`` the output-folder transaction). ``slimx.export`` (``slimx.api``) and the
CLI call ``run``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimx._core.errors import SlimxFailure, UsageError
from slimx._core.outdir import check_out_dir, default_out_dir, publish, staged, write_json
from slimx._core.progress import Progress
from slimx._core.versions import tool_versions
from slimx.config import CompileConfig, CompressConfig, DataConfig, ExportConfig, ModelConfig, ProveConfig
from slimx.devices.timing import TimingConfig
from slimx.report import SCHEMA_VERSION, human

__all__ = ["CompileConfig", "CompressConfig", "DataConfig", "ExportConfig", "ExportRun", "ModelConfig",
           "ProveConfig", "TimingConfig", "run", "run_export"]


# --------------------------------------------------------------------------- what each stage returns


@dataclass
class Prepared:
    """The request resolved and checked, the model loaded and in deployment form."""

    device: Any
    target: Any
    precision: str
    options: Any  # targets.CompileOptions, the format's own options typed
    specs: list  # compression passes to run
    recover: Any  # RecoverConfig or None
    deployable: Any  # export.program.Deployable
    calib: Any  # CalibrationData or None
    out: Path
    shapes: dict = field(default_factory=dict)  # the report's ``shapes``: the form built and its dynamic axes


@dataclass
class Compressed:
    """The model to compile: the deployment form, or its compressed copy with the record of what was done."""

    module: Any
    original_module: Any
    record: dict | None = None  # passes, recipe, calibration, fidelity, recover
    original_stats: dict | None = None


@dataclass
class Compiled:
    program: Any
    stats: dict
    coverage: Any
    artifact: Any
    preflight: dict | None = None


@dataclass
class Proven:
    parity: dict
    latency: dict
    host_latency: dict | None
    speedup: dict | None = None


@dataclass
class ExportRun:
    """One finished export: the report (as written to ``OUT/report.json``) and the stages' records."""

    report: dict
    prepared: Prepared
    compressed: Compressed
    compiled: Compiled
    proven: Proven

    def failures(self) -> list[SlimxFailure]:
        """The verdicts that failed (parity, then fidelity), each as the error the CLI exits 1 with."""
        return verdict_failures(self.report)


# --------------------------------------------------------------------------- the chain


def run(cfg: ExportConfig, progress: Progress | None = None, loaded=None) -> ExportRun:
    """Run the whole export; the report is written to ``OUT/report.json`` (and ``report.html``) whatever its
    verdicts, which the caller reads (``ExportRun.failures``). ``loaded``: a model already taken in
    (``export.intake.load_module``) instead of ``cfg.model.model``."""
    progress = progress or Progress(total=9, enabled=False)
    prepared = resolve(cfg, loaded)
    progress.total = 9 if prepared.specs else 8
    with staged(prepared.out, progress.warn) as staging:
        prepare(cfg, prepared, progress, loaded)
        compressed = compress(cfg, prepared, progress)
        compiled = compile_artifact(cfg, prepared, compressed, staging, progress)
        proven = prove(cfg, prepared, compressed, compiled, staging, progress)
        with progress.stage("report"):
            report = build_report(cfg, prepared, compressed, compiled, proven, progress)
            write_json(staging / "report.json", report)
            write_html(staging / "report.html", report)
            publish(staging, prepared.out)
    return ExportRun(report, prepared, compressed, compiled, proven)


def run_export(cfg: ExportConfig, progress: Progress | None = None) -> dict:
    """Run the whole export and return the report; a failed verdict is raised (exit 1) after the report is
    written, as ``slimx export`` does."""
    done = run(cfg, progress or Progress(total=9))
    failures = done.failures()
    if failures:
        raise failures[0]
    return done.report


def verdict_failures(report: dict) -> list[SlimxFailure]:
    """Parity's and fidelity's failures in ``report`` (none when both passed or were not measured)."""
    from slimx.export.parity import parity_failure
    from slimx.slim.compress import fidelity_failure

    out = Path(report["out"])
    name = Path(report["artifacts"][0]["path"]).name if report.get("artifacts") else "the artifact"
    found = [parity_failure(report["parity"], name, out), fidelity_failure(report.get("compression"), out)]
    predicted = (report.get("preflight") or {}).get("predicted_parity") or {}
    if not report["parity"].get("measured") and predicted.get("passed") is False:
        # no runtime here to measure it: the prediction is the proof there is, gated like parity
        found.append(SlimxFailure(
            f"predicted fp16 parity of {name}",
            f"cosine {predicted['cosine']:.6f} is below {predicted['min_cosine']} ({predicted['method']}); the "
            f"report is in {out / 'report.json'}",
            "leave the pre-flight's fixes on (drop --no-fp16-fixes), or use --precision fp32"
            if (report.get("config") or {}).get("no_fp16_fixes") else
            "see the report's preflight findings; --precision fp32 avoids fp16 here"))
    return [f for f in found if f is not None]


def resolve(cfg: ExportConfig, loaded=None) -> Prepared:
    """Everything that can be checked before a file is written or a model loaded: device, format, precision,
    the format's options, passes and recovery, the output folder."""
    from slimx._core.config import config_from_dict
    from slimx.devices import load_device
    from slimx.quant import QuantConfig, check_precision, quantizer_for, schemes
    from slimx.slim import load_recipe, parse_pass
    from slimx.slim.base import load_recipe_quant
    from slimx.targets import CompileOptions, get_target

    c = cfg.compress
    specs = [parse_pass(p) for p in c.passes] + (load_recipe(c.recipe) if c.recipe else [])
    recover_cfg = _recover_config(c.recover) if c.recover else None
    device = load_device(cfg.compile.device)
    if c.budget_ms is not None:
        specs = budget_specs(specs, c.budget_ms, device, cfg.compile.precision)
    if recover_cfg and not specs:
        raise UsageError("--recover", "recovers accuracy after a compression pass, and none was given",
                         "add --pass NAME:... or --recipe FILE")
    target = get_target(cfg.compile.format or device.default_format)
    quant_values = load_recipe_quant(c.recipe) if c.recipe else {}
    precision = check_precision(cfg.compile.precision or quant_values.get("precision") or target.default_precision)
    quant = config_from_dict(QuantConfig, {**quant_values, "precision": precision},
                             f"--recipe {c.recipe} [quant]" if quant_values else "--precision")
    model = cfg.model.model
    is_onnx = loaded is None and model.lower().endswith(".onnx")
    if is_onnx and specs:
        raise UsageError(f"model {model}", "compression passes change a PyTorch model, and an ONNX file has none",
                         "start from the PyTorch model")
    if target.needs_torch and is_onnx:
        raise UsageError(f"model {model}", f"the {target.name} target converts from the PyTorch program, "
                         "and an ONNX file has none", "start from the PyTorch model, or use --format onnx/tensorrt")
    options = CompileOptions(precision=precision, opset=target.checked_opset(cfg.compile.opset),
                             format_options=target.options(cfg.compile.format_options, "--format options"),
                             quant=quant)
    target.validate(device, options)
    if quant.scheme is not None and schemes(target.name):
        quantizer_for(target.name, quant)  # a scheme the format lacks is refused before any work
    out = Path(cfg.out or default_out_dir(loaded.name if loaded is not None else model, device.name))
    check_out_dir(out)
    return Prepared(device, target, precision, options, specs, recover_cfg, None, None, out)


def _recover_config(text: str):
    from slimx._core.config import config_from_dict, parse_key_values
    from slimx.slim import RecoverConfig

    values = parse_key_values(text, f"--recover {text}", "--recover steps=200,lr=5e-5")
    return config_from_dict(RecoverConfig, values, "--recover")


def budget_specs(specs: list, budget_ms: float, device, precision: str | None) -> list:
    """``--budget-ms X``: the ``latency-slim`` pass with that budget (its options from ``--pass latency-slim:...``
    if given there), refused below the device's fixed per-inference overhead (no model can be faster)."""
    from slimx.devices.estimator import device_floor_ms
    from slimx.slim import PassSpec, parse_pass

    floor = device_floor_ms(device, precision)
    if floor is not None and budget_ms < floor:
        raise UsageError(f"--budget-ms {budget_ms:g}", f"is below {device.name}'s fixed per-inference overhead "
                         f"({floor:.3f} ms in its calibrated profile): no model can meet it",
                         f"give a budget above {floor:.3f} ms")
    out, found = [], False
    for spec in specs:
        if spec.name == "latency-slim":
            spec = PassSpec(spec.name, dataclasses.replace(spec.config, budget_ms=budget_ms))
            found = True
        out.append(spec)
    if not found:
        out.append(parse_pass(f"latency-slim:budget_ms={budget_ms}"))
    return out


def prepare(cfg: ExportConfig, prepared: Prepared, progress: Progress, loaded=None) -> Prepared:
    """Load the model (and calibration data), set its shape form, then put it in deployment form."""
    from slimx.export import load_calibration, load_model
    from slimx.export.program import deployment_form
    from slimx.export.shapes import data_median_length, shape_form

    m = cfg.model
    with progress.stage("intake", loaded.name if loaded is not None else m.model):
        if loaded is None:
            loaded = load_model(m.model, weights=m.weights, input_shapes=list(m.input_shapes))
        prepared.shapes = shape_form(loaded, m, prepared.target, prepared.precision)
        if prepared.shapes.get("buckets"):
            prepared.options = dataclasses.replace(prepared.options, buckets=tuple(prepared.shapes["buckets"]))
            progress.note("buckets " + ", ".join(map(str, prepared.shapes["buckets"])))
        if prepared.shapes["dynamic"]:
            progress.note("dynamic " + ", ".join(f"{d['input']}[{d['axis']}] {d['min']}..{d['max']}"
                                                 for d in prepared.shapes["dynamic"]))
        if cfg.data.calib:
            prepared.calib = load_calibration(cfg.data.calib, loaded, limit=cfg.data.samples(bool(prepared.specs)),
                                              seed=m.seed, truncate=cfg.data.truncate, labels=cfg.data.labels)
            progress.note(prepared.calib.describe())
        if prepared.shapes.get("auto") and (prepared.calib is None or prepared.calib.kind != "text"):
            raise UsageError("--buckets auto", "chooses the buckets from the real lengths of text calibration data",
                             "add --calib sentences.txt (slimx data stdlib-text writes one), or give --buckets N,N,...")
            own = prepared.options.format_options
            median = data_median_length(prepared.calib, loaded.inputs)
            # a format tuned for one length (TensorRT's profile opt shape) is tuned for the data's median length
            if median is not None and getattr(own, "opt_len", False) is None:
                prepared.options = dataclasses.replace(
                    prepared.options, format_options=dataclasses.replace(own, opt_len=median))
                progress.note(f"tuned for length {median} (the calibration data's median; --opt-len sets another)")
    with progress.stage("deployment form"):
        prepared.deployable = deployment_form(loaded, seed=m.seed)
        record = prepared.deployable.record
        if record is not None:
            progress.note(f"reparameterized {len(record.reparameterized)} module(s), "
                          f"folded {len(record.folded)} batch norm(s)")
    return prepared


def compress(cfg: ExportConfig, prepared: Prepared, progress: Progress) -> Compressed:
    """Run the passes (then recovery) on the deployment form; without passes the model goes on as it is."""
    from slimx.export.program import model_stats
    from slimx.slim.base import load_recipe_quant

    d = prepared.deployable
    if not prepared.specs:
        return Compressed(d.module, d.module)
    with progress.stage("compress", ", ".join(s.name for s in prepared.specs)):
        record = compress_module(
            d.module, d.loaded.inputs, prepared.specs, prepared.calib, progress=progress, seed=cfg.model.seed,
            calib_samples=cfg.data.calib_samples, device=prepared.device, precision=prepared.precision,
            recover_cfg=prepared.recover, min_fidelity=cfg.compress.min_fidelity,
            max_accuracy_drop=cfg.compress.max_accuracy_drop, reconstruct=not cfg.compress.no_reconstruct,
            recipe_quant=load_recipe_quant(cfg.compress.recipe) if cfg.compress.recipe else None)
        original_stats = model_stats(d.loaded, d.module, d.example)
        module = record.pop("model")
    return Compressed(module, d.module, record, original_stats)


def compress_module(module, inputs: list, specs: list, calib, *, progress, seed: int = 0,
                    calib_samples: int | None = None, device=None, precision: str = "fp32", recover_cfg=None,
                    min_fidelity: float | None = None, max_accuracy_drop: float | None = None,
                    recipe_quant: dict | None = None, reconstruct: bool = True) -> dict:
    """The passes on ``module`` (a deployment form with input specs ``inputs``), fitted on ``calib`` (all of it
    up to ``PASS_CALIB_CAP``, or ``calib_samples``; synthetic inputs with a warning when None) and priced on
    ``device``'s latency model; returns ``slim.compress.run_passes``'s record. ``slimx export`` and
    ``slimx.compress`` both compress through here."""
    from slimx.devices.timing import latency_model_for
    from slimx.quant import calibration_batches
    from slimx.slim.compress import PASS_CALIB_CAP, SYNTHETIC_PASS_SAMPLES, run_passes

    def warn(_):
        progress.warn("compressing with SYNTHETIC calibration inputs: rank choices, recovery and fidelity "
                      "figures do not reflect real data; give --calib")

    count = calib_samples or (PASS_CALIB_CAP if calib is not None else SYNTHETIC_PASS_SAMPLES)
    batches, synthetic = calibration_batches(calib, inputs, count=max(count, 16), seed=seed, warn=warn)
    return run_passes(
        module, specs, batches, synthetic=synthetic, progress=progress,
        source=calib.source if calib is not None else "synthetic random inputs",
        labels=calib.labels if calib is not None else None, input_names=[s.name for s in inputs], device=device,
        latency_model=latency_model_for(device, precision) if device is not None else None,
        recover_cfg=recover_cfg, min_fidelity=min_fidelity, max_accuracy_drop=max_accuracy_drop,
        recipe_quant=recipe_quant, reconstruct=reconstruct)


SELECTION_FP16_COSINE = 0.99  # the predicted fp16 cosine floor of a graph with a selection (top-k attention)


def compile_artifact(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, staging: Path,
                     progress: Progress) -> Compiled:
    """torch.export the model to compile, then the target's op check and compile (int8: with calibration)."""
    from slimx.export.program import model_stats, program_of
    from slimx.export.shapes import at_real_lengths, seq_range_of
    from slimx.quant import calibration_batches

    d, target, device = prepared.deployable, prepared.target, prepared.device
    with progress.stage("torch.export"):
        program = program_of(d, compressed.module)
        stats = model_stats(d.loaded, compressed.module, d.example)
        if compressed.original_stats is not None:
            stats["original"] = compressed.original_stats
    with progress.stage("pre-flight", prepared.precision):
        from slimx.export.preflight import run as run_preflight
        from slimx.export.preflight import summary_line

        preflight = run_preflight(program, target.name, prepared.precision, prepared.calib,
                                  fixes=not cfg.compile.no_fp16_fixes, seed=cfg.model.seed,
                                  norms=cfg.compile.fp16_norms)
        predicted = preflight.get("predicted_parity")
        if predicted is not None:  # judged by the precision's parity cosine (the relative error is the runtime's)
            from slimx.export.parity import selection_tolerance

            floor = cfg.prove.tolerance(prepared.precision).min_cosine
            selection = selection_tolerance(compressed.record)
            if selection is not None and cfg.prove.min_cosine is None:
                # a selection (top-k) in the graph: in fp16 many more scores tie than in fp32, and each tie kept
                # differently moves an output by a step, so the prediction is judged at 0.99, not the fp16 floor
                floor = min(floor, SELECTION_FP16_COSINE)
                predicted["loosened"] = f"{selection['why']}; in fp16 more scores tie (floor {floor})"
            predicted["min_cosine"] = floor
            predicted["passed"] = bool(predicted["cosine"] >= floor)  # NaN: False
        progress.note(summary_line(preflight))
    with progress.stage("compile", f"{target.name} for {device.name}"):
        coverage = target.check(program)
        if not coverage.ok:
            op, count = next(iter(coverage.unsupported.items()))
            where = coverage.where.get(op)
            more = f" (and {count - 1} more)" if count > 1 else ""
            raise SlimxFailure(
                f"op {op}" + (f" from module {where}" if where else "") + more,
                f"the {target.name} format cannot express it at opset {prepared.options.opset}",
                "replace that module with an exportable one, try another --opset, or pick another --format")
        calib_record, batches = None, None
        real_lengths = seq_range_of(program.inputs) is not None
        if prepared.precision == "int8":
            calib = prepared.calib
            batches, synthetic = calibration_batches(calib, program.inputs, count=cfg.data.samples(False),
                                                     seed=cfg.model.seed, warn=progress.warn)
            calib_record = {"source": calib.source if calib else "synthetic random inputs",
                            "kind": calib.kind if calib else "synthetic", "samples": len(batches),
                            "synthetic": synthetic}
            if real_lengths:  # each sample at its real length: padding does not set the int8 ranges
                batches = at_real_lengths(batches, program.input_names)
        if (prepared.shapes.get("auto") or {}).get("pending"):
            from slimx.export.buckets import auto_buckets, measured_prices

            runner = target.runner(threads=cfg.timing.threads) if device.name == "host" else None
            with tempfile.TemporaryDirectory(prefix="slimx-buckets-") as work:
                measure = None
                if runner is not None:  # the device is this machine: price each candidate in the format's runtime
                    progress.note(f"pricing the candidate buckets in {runner.name} (the device is this machine)")
                    measure = measured_prices(program, target, device, prepared.options, runner, work,
                                              calib_batches=batches, seed=cfg.model.seed)
                rec = auto_buckets(program, prepared.calib, device, prepared.precision,
                                   tuple(prepared.shapes["buckets"]), cfg.model.max_buckets, measure=measure)
            prepared.shapes["auto"], prepared.shapes["buckets"] = rec, rec["buckets"]
            prepared.options = dataclasses.replace(prepared.options, buckets=tuple(rec["buckets"]))
            progress.note(f"buckets {', '.join(map(str, rec['buckets']))} (auto: expected {rec['expected_ms']:.3f} "
                          f"ms per sample against {rec['fixed_rule']['expected_ms']:.3f} ms with "
                          f"{', '.join(map(str, rec['fixed_rule']['buckets']))})")
        artifact = target.compile(program, device, prepared.options, staging, calib_batches=batches)
        built = artifact.meta.get("buckets")
        if built and prepared.shapes.get("buckets"):  # how the format built them (CoreML: enumerated or a range)
            prepared.shapes["built"] = built
            if built.get("why"):
                prepared.shapes["why"] = built["why"]
        if calib_record:
            artifact.meta["calibration"] = calib_record
            if real_lengths:
                artifact.meta["calibration_lengths"] = "real (each sample cut to its last real token)"
        for f in artifact.files():
            progress.note(f"{f['path']}: {human(f['bytes'])}B")
    return Compiled(program, stats, coverage, artifact, preflight)


def prove(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, compiled: Compiled, staging: Path,
          progress: Progress) -> Proven:
    """Parity in the artifact's own runtime, latency (measured, or estimated for a device not at hand) and,
    after compression, the speed-up against the uncompressed model compiled the same way."""
    from slimx.devices.timing import measure_speedup, run_latency
    from slimx.export.parity import run_parity, selection_tolerance
    from slimx.export.program import program_of

    p, t = cfg.prove, cfg.timing
    with progress.stage("parity", f"{p.parity_inputs} fresh inputs"):
        parity = run_parity(compiled.program, prepared.target, compiled.artifact, p.tolerance(prepared.precision),
                            n=p.parity_inputs, seed=cfg.model.seed, threads=t.threads, calib=prepared.calib,
                            precision=prepared.precision, selection=selection_tolerance(compressed.record),
                            rel_err_given=p.max_rel_err is not None)
        if parity["measured"]:
            progress.note(f"cosine {parity['cosine']:.6f}, max abs {parity['max_abs']:.2e}, "
                          f"rel err {parity['rel_err']:.2e}")
        else:
            progress.note(f"not measured: {parity['reason']}")
    with progress.stage("latency"):
        latency, host_latency = run_latency(prepared.device, prepared.target, compiled.artifact, compiled.program,
                                            t, cfg.model.seed, prepared.precision, prepared.calib)
        if t.learn:
            latency["learned"] = _learn(cfg, prepared, compressed, latency, progress)
        speedup = None
        if compressed.record is not None:
            base_program = program_of(prepared.deployable, compressed.original_module)
            speedup = measure_speedup(prepared.target, prepared.device, prepared.options, base_program,
                                      compiled.program, compiled.artifact, t, cfg.model.seed, prepared.calib,
                                      staging, progress)
    return Proven(parity, latency, host_latency, speedup)


def _learn(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, latency: dict, progress) -> dict:
    """``--learn``: the export's measurement of its device becomes an anchor (the MODEL as given, uncompressed:
    the anchor's estimate is of that spec)."""
    from slimx.devices.anchor_cmd import learn
    from slimx.devices.estimator import default_setting

    if not latency.get("measured"):
        return {"learned": False, "why": "nothing was measured (the device is not at hand)"}
    if compressed.record is not None:
        return {"learned": False, "why": "a compressed model is not the MODEL it came from, which the anchor estimates"}
    if not isinstance(cfg.model.model, str) or cfg.model.model.endswith((".onnx", ".pt2")):
        return {"learned": False, "why": "the estimator reads a MODEL spec's graph; this model was given otherwise"}
    setting = default_setting(prepared.device, prepared.precision)
    got = learn(prepared.device, setting, cfg.model.model, list(cfg.model.input_shapes), float(latency["median_ms"]),
                "slimx export on this host", progress)
    progress.note(f"learned: {prepared.device.name} now has {got['count']} anchor(s) for {setting.key}")
    return {"learned": True, "anchors": got["count"], "setting": setting.key}


def build_report(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, compiled: Compiled, proven: Proven,
                 progress) -> dict:
    """``report.json``, schema 1.0 (``slimx.report``), from the stages' records."""
    loaded, device, artifact = prepared.deployable.loaded, prepared.device, compiled.artifact
    record = prepared.deployable.record
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "slimx",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(cfg.command) or None,
        "config": cfg.flat(),
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            **compiled.stats,
            "inputs": [s.to_dict() for s in loaded.inputs],
            "outputs": loaded.output_names,
            "weights": loaded.weights,
            "notes": loaded.notes,
        },
        "device": {"name": device.name, "display_name": device.display_name},
        "target": {"format": prepared.target.name, "precision": prepared.precision,
                   "opset": artifact.meta.get("opset")},  # the opset the file has (None: not an ONNX format)
        "shapes": prepared.shapes,
        "deploy": record.to_dict() if record else None,
        "coverage": compiled.coverage.to_dict(),
        "artifacts": artifact.files(),
        "compile": artifact.meta,
        "parity": proven.parity,
        "preflight": compiled.preflight,
        "latency": proven.latency,
        "passes": [],
        "stages_s": dict(progress.timings),
        "versions": tool_versions(),
    }
    if proven.host_latency is not None:
        report["host_latency"] = proven.host_latency
    report["out"] = str(prepared.out)
    if compressed.record is not None:
        report["passes"] = compressed.record["passes"]
        report["compression"] = {k: v for k, v in compressed.record.items() if k != "passes"}
        report["compression"]["speedup"] = proven.speedup
    return report


def write_html(path: Path, report: dict) -> None:
    """``report.html``: the same report for people (``slimx.html``), rendered from the report's JSON form."""
    import json

    from slimx._core.outdir import _json_default
    from slimx.html import export_page, write

    write(path, export_page(json.loads(json.dumps(report, default=_json_default))))
