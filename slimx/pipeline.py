"""The export pipeline: intake -> deployment form -> torch.export -> target -> parity -> latency -> report.

Every stage is a plain function of the stages before; this module only strings them together and
keeps the output folder clean: everything is written to a hidden staging folder inside OUT and moved
into place at the end, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimx._core.errors import SlimxFailure, UsageError
from slimx._core.inputs import sample_inputs
from slimx._core.progress import Progress
from slimx._core.versions import tool_versions
from slimx.report import human

PARITY_SEED_BASE = 1000  # parity inputs are drawn from seeds the export example never used


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``slimx export`` needs; the CLI only fills this in."""

    model: str = "minilm"
    target: str = "host"
    format: str | None = None
    out: str = ""
    weights: str | None = None
    input_shapes: tuple[str, ...] = ()
    precision: str | None = None  # None: the target's default (fp16 for coreml and tensorrt, else fp32)
    opset: int = 18
    deployment_target: str | None = None
    compute_units: str | None = None
    palettize: int | None = None
    dla_core: int | None = None
    calib: str | None = None
    calib_samples: int = 16
    parity_inputs: int = 8
    min_cosine: float | None = None  # None: by precision (quant.DEFAULT_TOLERANCE)
    max_rel_err: float | None = None
    warmup: int = 5
    runs: int = 50
    threads: int | None = None
    seed: int = 0
    passes: tuple[str, ...] = ()
    recipe: str | None = None
    recover: str | None = None
    command: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.parity_inputs < 1:
            raise UsageError("--parity-inputs", "must be at least 1", "give a positive count (default 8)")
        if self.runs < 30:
            raise UsageError("--runs", f"{self.runs} is too few for a median and p90", "give at least 30")
        if self.warmup < 0:
            raise UsageError("--warmup", "must not be negative", "give 0 or more")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise UsageError("--min-cosine", f"{self.min_cosine} is outside (0, 1]", "e.g. --min-cosine 0.999")
        if self.max_rel_err is not None and self.max_rel_err <= 0:
            raise UsageError("--max-rel-err", "must be positive", "e.g. --max-rel-err 1e-3")
        if self.threads is not None and self.threads < 1:
            raise UsageError("--threads", "must be at least 1", "e.g. --threads 2")
        if self.palettize is not None and self.palettize not in (1, 2, 3, 4, 6, 8):
            raise UsageError("--palettize", f"{self.palettize} bits is not a CoreML palette size", "use 2, 4, 6 or 8")

    def tolerance(self, precision: str):
        from slimx.export import ParityTolerance
        from slimx.quant import DEFAULT_TOLERANCE

        cos, rel = DEFAULT_TOLERANCE[precision]
        return ParityTolerance(min_cosine=self.min_cosine if self.min_cosine is not None else cos,
                               max_rel_err=self.max_rel_err if self.max_rel_err is not None else rel)


def default_out_dir(model: str, target: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(model).stem if c)
    return str(Path("out") / f"{slug.strip('-') or 'model'}-{target}")


def run_export(cfg: ExportConfig, progress: Progress | None = None) -> dict:
    """Run the whole export and return the report (also written to ``OUT/report.json``)."""
    from slimx.devices import load_device
    from slimx.export import (
        Program,
        check_forward,
        export_program,
        load_calibration,
        load_model,
        to_deployment,
    )
    from slimx.quant import calibration_batches, check_precision
    from slimx.slim import load_recipe, parse_pass
    from slimx.targets import CompileOptions, get_target

    specs = [parse_pass(p) for p in cfg.passes] + (load_recipe(cfg.recipe) if cfg.recipe else [])
    recover_cfg = _recover_config(cfg.recover) if cfg.recover else None
    if recover_cfg and not specs:
        raise UsageError("--recover", "recovers accuracy after a compression pass, and none was given",
                         "add --pass NAME:... or --recipe FILE")
    progress = progress or Progress(total=7)
    progress.total = 8 if specs else 7
    device = load_device(cfg.target)
    fmt = cfg.format or device.default_format
    target = get_target(fmt)
    precision = check_precision(cfg.precision or target.default_precision)
    if cfg.model.lower().endswith(".onnx") and specs:
        raise UsageError(f"model {cfg.model}", "compression passes change a PyTorch model, and an ONNX file has none",
                         "start from the PyTorch model")
    if target.needs_torch and cfg.model.lower().endswith(".onnx"):
        raise UsageError(f"model {cfg.model}", f"the {target.name} target converts from the PyTorch program, "
                         "and an ONNX file has none", "start from the PyTorch model, or use --format onnx/tensorrt")
    out = Path(cfg.out or default_out_dir(cfg.model, device.name))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}", "exists and is not a folder", "give a folder path")
    created_out = not out.exists()
    staging = out / f".slimx-staging-{os.getpid()}"
    report: dict = {}
    try:
        staging.mkdir(parents=True, exist_ok=False)
        with progress.stage("intake", cfg.model):
            loaded = load_model(cfg.model, weights=cfg.weights, input_shapes=list(cfg.input_shapes))
            calib = None
            if cfg.calib:
                calib = load_calibration(cfg.calib, loaded, limit=cfg.calib_samples, seed=cfg.seed)
                progress.note(calib.describe())
        with progress.stage("deployment form"):
            module, deploy_record, example = None, None, None
            if loaded.module is not None:
                example = loaded.example_inputs or sample_inputs(loaded.inputs, seed=cfg.seed)
                shapes = ", ".join(f"{s.name}={'x'.join(map(str, s.shape))}" for s in loaded.inputs)
                check_forward(loaded.module, example, shapes)
                if loaded.source == "pt2":
                    module = loaded.module
                else:
                    module, deploy_record = to_deployment(loaded.module, example)
                    progress.note(f"reparameterized {len(deploy_record.reparameterized)} module(s), "
                                  f"folded {len(deploy_record.folded)} batch norm(s)")
        compression, original_module = None, module
        if specs:
            with progress.stage("compress", ", ".join(s.name for s in specs)):
                compression = run_passes(module, specs, recover_cfg, calib, loaded, device, cfg, progress)
                original_stats = model_stats(loaded, module, example)
                module = compression.pop("model")
        with progress.stage("torch.export"):
            exported = None
            if loaded.source == "pt2":
                exported = loaded.program
            elif module is not None:
                exported = export_program(module, example)
            program = Program(loaded.name, exported, module, loaded.inputs, loaded.output_names,
                              onnx_source=loaded.onnx_path)
            stats = model_stats(loaded, module, example)
            if compression is not None:
                stats["original"] = original_stats
        with progress.stage("compile", f"{target.name} for {device.name}"):
            coverage = target.check(program)
            if not coverage.ok:
                op, count = next(iter(coverage.unsupported.items()))
                where = coverage.where.get(op)
                more = f" (and {count - 1} more)" if count > 1 else ""
                raise SlimxFailure(
                    f"op {op}" + (f" from module {where}" if where else "") + more,
                    f"the {target.name} format cannot express it at opset {cfg.opset}",
                    "replace that module with an exportable one, try another --opset, or pick another --format")
            extra = {k: v for k, v in (("deployment_target", cfg.deployment_target),
                                       ("compute_units", cfg.compute_units), ("palettize", cfg.palettize),
                                       ("dla_core", cfg.dla_core)) if v is not None}
            options = CompileOptions(precision=precision, opset=cfg.opset, extra=extra)
            target.validate(device, options)
            calib_record, batches = None, None
            if precision == "int8":
                batches, synthetic = calibration_batches(calib, program.inputs, count=cfg.calib_samples,
                                                         seed=cfg.seed, warn=progress.warn)
                calib_record = {"source": calib.source if calib else "synthetic random inputs",
                                "kind": calib.kind if calib else "synthetic", "samples": len(batches),
                                "synthetic": synthetic}
            artifact = target.compile(program, device, options, staging, calib_batches=batches)
            if calib_record:
                artifact.meta["calibration"] = calib_record
            for f in artifact.files():
                progress.note(f"{f['path']}: {human(f['bytes'])}B")
        with progress.stage("parity", f"{cfg.parity_inputs} fresh inputs"):
            parity = run_parity(program, target, artifact, cfg, calib, precision)
            if parity["measured"]:
                progress.note(f"cosine {parity['cosine']:.6f}, max abs {parity['max_abs']:.2e}, "
                              f"rel err {parity['rel_err']:.2e}")
            else:
                progress.note(f"not measured: {parity['reason']}")
        with progress.stage("latency"):
            latency, host_latency = run_latency(device, target, artifact, program, cfg, precision)
            if compression is not None:
                compression["speedup"] = measure_speedup(target, device, options, artifact, original_module, loaded,
                                                         example, program, cfg, staging, progress)
        with progress.stage("report"):
            report = build_report(cfg, loaded, stats, device, target, precision, deploy_record, coverage,
                                  artifact, parity, latency, host_latency, progress)
            report["out"] = str(out)
            if compression is not None:
                report["passes"] = compression["passes"]
                report["compression"] = {k: v for k, v in compression.items() if k != "passes"}
            write_json(staging / "report.json", report)
            publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    proxy = parity.get("proxy") or {}
    if not parity.get("measured") and proxy.get("measured") and not proxy["passed"]:
        raise SlimxFailure(
            f"parity of {proxy.get('what', 'the ONNX form')}",
            f"cosine {proxy['cosine']:.6f} / rel err {proxy['rel_err']:.2e} is past the tolerance "
            f"(min cosine {proxy['tolerance']['min_cosine']}, max rel err {proxy['tolerance']['max_rel_err']}); "
            f"the report is in {out / 'report.json'}",
            "use more or better --calib data, another --precision, or loosen --min-cosine / --max-rel-err",
        )
    if parity.get("measured") and not parity["passed"]:
        raise SlimxFailure(
            f"parity of {artifact.path.name}",
            f"cosine {parity['cosine']:.6f} / rel err {parity['rel_err']:.2e} is past the tolerance "
            f"(min cosine {parity['tolerance']['min_cosine']}, max rel err {parity['tolerance']['max_rel_err']}); "
            f"the report is in {out / 'report.json'}",
            "inspect the report, or loosen --min-cosine / --max-rel-err if this drift is acceptable",
        )
    return report


def run_parity(program, target, artifact, cfg: ExportConfig, calib, precision: str) -> dict:
    """The artifact in its own runtime against the PyTorch model, on fresh inputs and on calibration data.

    For a quantized artifact this is its drift from the fp32 model. Where the target's runtime is
    missing here but the artifact comes with an ONNX form (TensorRT), that ONNX is also run in
    onnxruntime and reported as ``proxy``: evidence about the graph and its Q/DQ scales, not the engine.
    """
    from slimx.targets.onnx import OrtRunner

    if program.module is None:
        return {"measured": False, "reason": "the input was ONNX: there is no PyTorch model to compare against"}
    tol = cfg.tolerance(precision)
    batches = [sample_inputs(program.inputs, seed=PARITY_SEED_BASE + cfg.seed + i) for i in range(cfg.parity_inputs)]
    runner = target.runner()
    if runner is not None:
        result = _parity_in(runner, artifact, artifact.path, program, batches, calib, tol)
    else:
        result = {"measured": False, "reason": target.runner_missing_reason()}
    proxy = artifact.meta.get("proxy_onnx")
    if proxy and artifact.format != "onnx":
        path = artifact.path.parent / proxy
        runner = OrtRunner(threads=cfg.threads, simulate_qdq=True)  # the engine's int8 arithmetic, not ORT's kernels
        result["proxy"] = _parity_in(runner, artifact, path, program, batches, calib, tol)
        result["proxy"]["what"] = f"{proxy} in onnxruntime (the TensorRT-ready graph, not the engine)"
    result["precision"] = precision
    return result


def _parity_in(runner, artifact, path, program, batches, calib, tol) -> dict:
    from dataclasses import replace

    from slimx.export import check_parity, torch_outputs

    view = replace(artifact, path=path)
    session = runner.session(path)

    def reference(batch):
        return torch_outputs(program.module, batch)

    def candidate(batch):
        return runner.run(view, batch, session=session)

    result = check_parity(reference, candidate, batches, runner.name, tol).to_dict()
    if calib is not None:
        on_data = check_parity(reference, candidate, calib.batches, runner.name, tol, data=calib.describe()).to_dict()
        result["calibration"] = on_data
        result["passed"] = result["passed"] and on_data["passed"]
    return result


def run_latency(device, target, artifact, program, cfg: ExportConfig,
                precision: str = "fp32") -> tuple[dict, dict | None]:
    """Measure with the target's own runtime when it runs here; say plainly when the device is not at hand."""
    inputs = sample_inputs(program.inputs, seed=cfg.seed + 7)
    runner = target.runner()
    host = None
    if runner is not None:
        if hasattr(runner, "threads") and cfg.threads:
            runner.threads = cfg.threads
        timing = runner.time(artifact, inputs, warmup=cfg.warmup, runs=cfg.runs)
        host = {"device": "host", "kind": "measured", "measured": True, **timing.to_dict()}
    if device.name == "host":
        if host is None:
            return {"device": "host", "measured": False, "reason": target.runner_missing_reason()}, None
        return host, None
    reason = f"no {device.name} is attached and no runner for it exists here"
    if program.exported is not None:
        from slimx.devices.estimator import default_setting, describe, estimate_latency
        from slimx.devices.opmix import op_mix

        try:
            est = estimate_latency(op_mix(program.exported), device, default_setting(device, precision))
        except UsageError as exc:
            reason += f"; no estimate either ({exc.line()})"
        else:
            est["label"] = describe(est, device)
            est["not_measured"] = reason + " (measure it with `slimx profile OUT --device D --remote URL`)"
            return est, host
    return {"device": device.name, "measured": False, "reason": reason}, host


def _recover_config(text: str):
    from slimx.slim import RecoverConfig
    from slimx.slim.base import config_from_dict, parse_key_values

    values = parse_key_values(text, f"--recover {text}", "--recover steps=200,lr=5e-5")
    return config_from_dict(RecoverConfig, values, "--recover")


def run_passes(module, specs, recover_cfg, calib, loaded, device, cfg: ExportConfig, progress) -> dict:
    """Apply the passes (then recovery) to the deployment-form model; fidelity on held-out samples after each."""
    from slimx.quant import calibration_batches
    from slimx.slim import PassContext, apply, finalize, recipe_text, recover, torch_fidelity
    from slimx.slim.base import mask_index_of

    def warn(_):
        progress.warn("compressing with SYNTHETIC calibration inputs: rank choices, recovery and fidelity "
                      "figures do not reflect real data; give --calib")

    batches, synthetic = calibration_batches(calib, loaded.inputs, count=max(cfg.calib_samples, 16), seed=cfg.seed,
                                             warn=warn)
    held = max(2, len(batches) // 4) if len(batches) >= 8 else 0
    fit, heldout = (batches[:-held], batches[-held:]) if held else (batches, batches)
    data = (f"{len(heldout)} held-out {'SYNTHETIC ' if synthetic else ''}samples of "
            f"{calib.source if calib else 'random inputs'}")
    if not held:
        data += " (too few to hold any out: in-sample)"
    mask_index = mask_index_of([s.name for s in loaded.inputs])
    ctx = PassContext(calib=fit, synthetic=synthetic, teacher=module, device=device, progress=progress,
                      mask_index=mask_index)
    teacher = module
    model = module
    records = []
    for spec in specs:
        model, (result,) = apply(model, [spec], ctx)
        entry = result.to_dict()
        entry["fidelity"] = torch_fidelity(teacher, model, heldout)
        records.append(entry)
        progress.note(f"{spec.name}: {result.summary}; held-out cosine {entry['fidelity']['cosine_mean']:.4f}")
    out = {"model": model, "passes": records, "recipe": recipe_text(specs), "calibration": {
        "source": calib.source if calib else "synthetic random inputs", "fit_samples": len(fit),
        "heldout_samples": len(heldout), "synthetic": synthetic}}
    out["fidelity"] = {"data": data, "after_passes": records[-1]["fidelity"]}
    if recover_cfg is not None:
        model, record = recover(model, teacher, fit, recover_cfg, progress, mask_index=mask_index)
        out["recover"] = {"config": dataclasses.asdict(recover_cfg), **record}
        out["fidelity"]["after_recover"] = torch_fidelity(teacher, model, heldout)
        progress.note(f"recovered: held-out cosine {out['fidelity']['after_recover']['cosine_mean']:.4f}")
    out["fidelity"]["final"] = out["fidelity"].get("after_recover", out["fidelity"]["after_passes"])
    out["model"] = finalize(model)  # deployable form (e.g. dense-sparse layers as two plain linears)
    return out


def measure_speedup(target, device, options, artifact, base_module, loaded, example, program, cfg: ExportConfig,
                    staging, progress) -> dict:
    """Compile the uncompressed model the same way and time both, interleaved, in the same run and runtime."""
    from slimx.export import Program, export_program

    runner = target.runner()
    if runner is None:
        return {"measured": False, "reason": target.runner_missing_reason()}
    base_dir = staging / ".baseline"
    base_dir.mkdir()
    try:
        base_program = Program(loaded.name, export_program(base_module, example), base_module, loaded.inputs,
                               loaded.output_names)
        base_options = type(options)(precision=options.precision if options.precision != "int8" else "fp32",
                                     opset=options.opset, extra=options.extra)
        baseline = target.compile(base_program, device, base_options, base_dir)
        inputs = sample_inputs(program.inputs, seed=cfg.seed + 7)
        runs = max(30, cfg.runs // 2)
        base_ms, comp_ms = [], []
        for _ in range(2):  # interleaved rounds, so drift in machine load hits both alike
            base_ms.append(runner.time(baseline, inputs, warmup=cfg.warmup, runs=runs).median_ms)
            comp_ms.append(runner.time(artifact, inputs, warmup=cfg.warmup, runs=runs).median_ms)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    base, comp = min(base_ms), min(comp_ms)
    progress.note(f"speedup {base / comp:.2f}x ({base:.3f} ms -> {comp:.3f} ms, {runner.name})")
    return {"measured": True, "runtime": runner.name, "baseline_median_ms": round(base, 4),
            "compressed_median_ms": round(comp, 4), "ratio": round(base / comp, 3),
            "baseline_precision": base_options.precision, "method": "best of 2 interleaved rounds of medians"}


def model_stats(loaded, module, example) -> dict:
    """Parameter count and multiply-accumulates of one forward pass (torch's FLOP counter / 2)."""
    if module is None:
        return {"params": _onnx_params(loaded.onnx_path), "macs": None,
                "macs_note": "not counted for ONNX input"}
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    if params == 0 and hasattr(module, "state_dict"):
        params = sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*example)
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}


def _onnx_params(path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    # weights, not the scalar constants the exporter lifts into initializers
    return int(sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.dims and i.data_type in floats))


def build_report(cfg, loaded, stats, device, target, precision, deploy_record, coverage, artifact, parity,
                 latency, host_latency, progress) -> dict:
    from slimx.report import SCHEMA_VERSION

    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "slimx",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(cfg.command) or None,
        "config": {k: v for k, v in asdict(cfg).items() if k != "command"},
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            **stats,
            "inputs": [s.to_dict() for s in loaded.inputs],
            "outputs": loaded.output_names,
            "weights": loaded.weights,
            "notes": loaded.notes,
        },
        "device": {"name": device.name, "display_name": device.display_name},
        "target": {"format": target.name, "precision": precision, "opset": cfg.opset},
        "deploy": deploy_record.to_dict() if deploy_record else None,
        "coverage": coverage.to_dict(),
        "artifacts": artifact.files(),
        "compile": artifact.meta,
        "parity": parity,
        "latency": latency,
        "passes": [],
        "stages_s": dict(progress.timings),
        "versions": tool_versions(),
    }
    if host_latency is not None:
        report["host_latency"] = host_latency
    return report


def write_json(path: Path, data: dict) -> None:
    import json

    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def publish(staging: Path, out: Path) -> None:
    """Move every finished file from the staging folder into OUT, replacing older ones."""
    for item in sorted(staging.iterdir()):
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)

