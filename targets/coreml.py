"""CoreML: an ``.mlpackage`` from the exported program (coremltools' torch.export path).

Deployment targets before iOS 15 produce a neural-network model (ML Programs need iOS 15); iOS 15
and later produce an ML Program. Prediction needs macOS: elsewhere the converted model is verified
(inputs, outputs, op list, weight precision, size) and parity is reported as not measured.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure, UsageError, first_line, root_cause
from slimx._core.inputs import to_numpy_inputs
from slimx.export.program import node_module_path, quiet
from slimx.export.shapes import fit_to_bucket, pick_bucket
from slimx.targets.base import Artifact, CompileOptions, Coverage, RunnerInfo, Target, Timing, register_target

ANE_SOURCE = ("hollance/neural-engine, docs/unsupported-layers.md (community findings: gather, dilated "
              "convolutions, broadcastable/ND layers, RNNs and custom layers run off the ANE); Apple, 'Deploying "
              "Transformers on the Apple Neural Engine' (2022): the ANE computes in fp16")
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU"}
# MIL ops of a converted program that run off the ANE
_ANE_UNFRIENDLY_MIL = ("gather", "gather_nd", "gather_along_axis", "lstm", "gru", "rnn")
# ATen ops (short names) with run-time indices, which a Neural Engine (or a DSP) does not run: the ops the
# estimator sends to a fallback unit too (devices.estimator imports this set); source: ANE_SOURCE
NPU_FALLBACK_OPS = frozenset({"embedding", "index", "index_select", "gather", "take_along_dim", "scatter",
                              "index_put", "cumsum"})


def parse_ios(value: str) -> int:
    match = re.fullmatch(r"(?i)ios\s*(\d+)", str(value).strip())
    if not match:
        raise UsageError(f"--deployment-target {value}", "is not an iOS version", "write it as iOS14, iOS17, ...")
    return int(match.group(1))


@dataclass(frozen=True)
class CoreMLOptions:
    """CoreML's own options (each None: the device profile's ``[format_options.coreml]``, then the default).

    Attributes:
        deployment_target: minimum iOS, e.g. ``iOS14`` (below iOS 15 a neural network, else an ML Program).
        compute_units: all, cpu_and_ne, cpu_only or cpu_and_gpu.
        palettize: palettize weights to this many bits (ML Program, iOS 16+).
    """

    deployment_target: str | None = field(default=None, metadata={
        "metavar": "iOSN", "help": "CoreML minimum deployment target (default: the device's, e.g. iOS14 for iphone12)"})
    compute_units: str | None = field(default=None, metadata={
        "choices": COMPUTE_UNITS, "help": "CoreML compute units (default: the device's)"})
    palettize: int | None = field(default=None, metadata={
        "metavar": "BITS", "help": "CoreML: palettize weights to this many bits (iOS16+)"})

    def __post_init__(self) -> None:
        if self.compute_units is not None and self.compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units {self.compute_units!r} is not one of {', '.join(COMPUTE_UNITS)}")
        if self.palettize is not None and self.palettize not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"palettize {self.palettize} bits is not a CoreML palette size (2, 4, 6 or 8)")


def coreml_missing() -> str | None:
    return None if sys.platform == "darwin" else f"CoreML runs predictions only on macOS (this host is {sys.platform})"


@register_target
class CoreMLTarget(Target):
    name = "coreml"
    suffixes = (".mlpackage",)
    options_cls = CoreMLOptions
    runners = (RunnerInfo("coreml", "coreml", "coreml-all-fp16", "CoreML prediction (macOS)", missing=coreml_missing,
                          make=lambda threads=None: CoreMLRunner()),)
    default_runner = "coreml"
    static_reason = ("a dynamic batch axis is not built for CoreML here (flexible shapes cover the sequence axis), "
                     "so the batch is static")
    buckets = True
    buckets_reason = ("CoreML flexible shapes over the sequence axis: enumerated shapes (one per bucket; what the "
                      "Neural Engine can run) where coremltools allows them (neuralnetwork, iOS 18, or one such "
                      "input), else a bounded RangeDim over the buckets' span")
    default_precision = "fp16"
    needs_torch = True

    def verify_file(self, path: Path) -> str | None:
        if not (path / "Manifest.json").is_file():
            return "corrupt CoreML package (no Manifest.json)"
        return None

    def check(self, program) -> Coverage:
        """Ops coremltools cannot convert, and ops likely to run off the Neural Engine."""
        coverage = Coverage(target=self.name)
        program_ep, label = program.derived("coreml_decomposition", decomposed_for_coreml)
        coverage.notes.append(f"decomposition: {label}")
        for node in program_ep.graph.nodes:
            if node.op != "call_function" or str(node.target).startswith(("<built-in", "_operator")):
                continue
            key = str(node.target)
            short = key.split(".")[1] if key.startswith("aten.") else key
            if not _converter_exists(key):
                coverage.add("unsupported", key, node_module_path(node))
            elif short in NPU_FALLBACK_OPS or (short.startswith("conv") and _dilated(node)):
                coverage.add("fallback", key, node_module_path(node))
            else:
                coverage.add("supported", key)
        if coverage.fallback:
            coverage.notes.append("ops in 'fallback' likely run on CPU/GPU rather than the Neural Engine "
                                  f"({ANE_SOURCE})")
        return coverage

    def settings(self, device, options: CompileOptions) -> tuple[int, str, str]:
        """(iOS version, compute units, backend) from the options, else the device profile."""
        coreml_opts = device.format_options.get("coreml", {})
        own = options.format_options if isinstance(options.format_options, CoreMLOptions) else CoreMLOptions()
        ios = parse_ios(own.deployment_target or coreml_opts.get("minimum_deployment_target", "iOS15"))
        units = own.compute_units or coreml_opts.get("compute_units", "all")
        return ios, units, "neuralnetwork" if ios < 15 else "mlprogram"

    def validate(self, device, options: CompileOptions) -> None:
        import coremltools as ct

        ios, units, backend = self.settings(device, options)
        if not hasattr(ct.target, f"iOS{ios}"):
            raise UsageError(f"--deployment-target iOS{ios}", f"coremltools {ct.__version__} does not know it",
                             "pick iOS13 to iOS18")
        if units not in COMPUTE_UNITS:
            raise UsageError(f"--compute-units {units}", "is not a CoreML compute-unit setting",
                             f"use one of {', '.join(COMPUTE_UNITS)}")
        from slimx.quant.coreml import check_coreml_precision

        check_coreml_precision(options.precision, backend, ios, _palettize(options))

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        from slimx._core.outdir import temp_files_in

        # coremltools writes a temporary .mlpackage per conversion and per quantization into the system temp
        # folder, removed only when its MLModel is collected: here they go into the run's folder and leave with it
        with temp_files_in(Path(out_dir) / ".coreml-tmp"):
            return self._compile(program, device, options, out_dir, calib_batches)

    def _compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        import coremltools as ct

        self.validate(device, options)
        ios, units, backend = self.settings(device, options)
        precision = options.precision
        inputs, shape_form = coreml_input_types(program.inputs, options.buckets, backend, ios)
        kwargs = {"inputs": inputs, "convert_to": backend,
                  "minimum_deployment_target": getattr(ct.target, f"iOS{ios}"),
                  "compute_units": getattr(ct.ComputeUnit, COMPUTE_UNITS[units])}
        kept = []
        if backend == "mlprogram":
            kwargs["compute_precision"] = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
            keep = set(getattr(program, "keep_fp32", ()) or ())
            if keep and precision != "fp32":  # the pre-flight's overflowing LayerNorms stay fp32 (per-op precision)

                def fp16_op(op, keep=keep, kept=kept):
                    if op.name in keep:
                        kept.append(op.name)
                        return False
                    return op.op_type != "const"

                kwargs["compute_precision"] = ct.transform.FP16ComputePrecision(op_selector=fp16_op)
        model, notes, decomposition = self._convert(program, kwargs)
        model = _rename_outputs(model, program.output_names)
        from slimx.quant import QuantContext, quantize

        ctx = QuantContext(calib_batches, program.module, program.input_names, options=options.format_options)
        with quiet():  # the weight quantizers print a line per layer
            model, qrecord = quantize(f"coreml-{backend}", model, options.quant_config(), ctx)
        path = Path(out_dir) / "model.mlpackage"
        tmp = path.with_name(".model.partial.mlpackage")  # coremltools insists on the extension
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save(str(tmp))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        meta = {
            "backend": backend,
            "deployment_target": f"iOS{ios}",
            "compute_units": units,
            "compute_precision": precision,
            "decomposition": decomposition,
            "quantization": qrecord,
            "conversion_warnings": notes,
        }
        keep = list(getattr(program, "keep_fp32", ()) or ())
        if keep and precision != "fp32":
            meta["kept_fp32"] = {"ops": sorted(set(kept)), "asked": keep,
                                 "how": "coremltools FP16ComputePrecision op selector" if backend == "mlprogram" else
                                 "not possible: the neuralnetwork format has no per-op precision (an ML Program, "
                                 "--deployment-target 15 or later, has)"}
        if shape_form:
            meta["buckets"] = shape_form
        meta.update(verify_mlpackage(path, program, backend, precision))
        return Artifact(format=self.name, path=path, inputs=program.inputs, output_names=program.output_names,
                        meta=meta)

    def _convert(self, program, kwargs):
        import coremltools as ct

        ep, decomposition = program.derived("coreml_decomposition", decomposed_for_coreml)
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        ct_logger = logging.getLogger("coremltools")
        saved = (ct_logger.level, ct_logger.propagate)
        ct_logger.setLevel(logging.WARNING)
        ct_logger.propagate = False  # its warnings go into the report, not the terminal
        ct_logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("always")
                model = ct.convert(ep, **kwargs)
        except Exception as exc:
            cause = root_cause(exc)
            raise SlimxFailure("CoreML conversion", first_line(cause, 160),
                               "replace the failing module, try --precision fp32 or another --deployment-target, "
                               "or run with --debug") from exc
        finally:
            ct_logger.removeHandler(handler)
            ct_logger.setLevel(saved[0])
            ct_logger.propagate = saved[1]
        notes = sorted({first_line(w.message) for w in caught if _worth_reporting(str(w.message))} |
                       {ln.strip() for ln in log.getvalue().splitlines() if _worth_reporting(ln)})
        return model, notes, decomposition



def coreml_input_types(specs, buckets: tuple[int, ...], backend: str, ios: int):
    """coremltools input types for ``specs`` and a record of the flexible form (None when static).

    With ``buckets``, the sequence axis is flexible: ``ct.EnumeratedShapes`` (one shape per bucket, which the
    Neural Engine can plan for) where coremltools accepts it (the neuralnetwork backend, mlprogram from iOS 18,
    or a model with one such input: below iOS 18 an mlprogram takes only one enumerated input), else a bounded
    ``ct.RangeDim`` spanning the buckets. Both need the program exported with the axis symbolic.
    """
    import coremltools as ct

    def dtype(s):
        return np.float32 if s.dtype.startswith("float") else np.int32

    flexible = [s for s in specs if any(a == 1 for a, _, _ in s.dynamic)]
    if not buckets or not flexible:
        return [ct.TensorType(name=s.name, shape=s.shape, dtype=dtype(s)) for s in specs], None
    enumerated = backend == "neuralnetwork" or ios >= 18 or len(flexible) == 1
    lo = min(lo for s in flexible for a, lo, _ in s.dynamic if a == 1)
    types = []
    for s in specs:
        if s not in flexible:
            types.append(ct.TensorType(name=s.name, shape=s.shape, dtype=dtype(s)))
        elif enumerated:
            shapes = [list(s.sized({1: b}).shape) for b in buckets]
            types.append(ct.TensorType(name=s.name, dtype=dtype(s), shape=ct.EnumeratedShapes(
                shapes=shapes, default=list(s.sized({1: pick_bucket(s.shape[1], buckets, truncate=True)}).shape))))
        else:
            dims = tuple(ct.RangeDim(lower_bound=lo, upper_bound=buckets[-1], default=s.shape[1]) if a == 1 else d
                         for a, d in enumerate(s.shape))
            types.append(ct.TensorType(name=s.name, shape=ct.Shape(shape=dims), dtype=dtype(s)))
    if enumerated:
        record = {"axis": "seq", "sizes": list(buckets), "form": "EnumeratedShapes",
                  "how": "one enumerated shape per bucket; the runner picks the smallest that fits and pads inside "
                         "it (pad tokens masked out)"}
    else:
        record = {"axis": "seq", "form": "RangeDim", "range": [lo, buckets[-1]],
                  "why": f"coremltools takes only one enumerated-shape input in an mlprogram below iOS 18 and this "
                         f"model has {len(flexible)}; a bounded range instead (the Neural Engine may not run a "
                         "range-shaped model: --deployment-target iOS18 gives enumerated shapes)"}
    return types, record


def flexible_shapes(spec) -> dict[str, dict]:
    """Per input of a CoreML spec: its enumerated shapes or size ranges (empty for a fixed shape)."""
    out = {}
    for i in spec.description.input:
        arr = i.type.multiArrayType
        kind = arr.WhichOneof("ShapeFlexibility")
        if kind == "enumeratedShapes":
            out[i.name] = {"enumerated": [list(s.shape) for s in arr.enumeratedShapes.shapes]}
        elif kind == "shapeRange":
            out[i.name] = {"range": [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]}
    return out


def _palettize(options: CompileOptions) -> int | None:
    return getattr(options.format_options, "palettize", None)


def _rename_outputs(model, names: list[str]):
    """Give the outputs slimx's names after conversion: naming them in ct.convert can clash with an
    internal layer of the same name (MiniLM's output 'embedding' vs BERT's embedding layer)."""
    import coremltools as ct

    spec = model.get_spec()
    current = [o.name for o in spec.description.output]
    if current == list(names):
        return model
    if len(current) != len(names):
        raise SlimxFailure("CoreML model", f"has {len(current)} outputs, the program {len(names)}", "report this")
    for old, new in zip(current, names, strict=True):
        if old != new:
            ct.utils.rename_feature(spec, old, new, rename_inputs=False)
    weights = getattr(model, "weights_dir", None) if spec.WhichOneof("Type") == "mlProgram" else None
    return ct.models.MLModel(spec, weights_dir=weights, skip_model_load=sys.platform != "darwin")


def _converter_exists(op: str) -> bool:
    from coremltools.converters.mil.frontend.torch import ops as _ops  # noqa: F401  (fills the registry)
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    return _TORCH_OPS_REGISTRY.get_func(op) is not None


def decomposed_for_coreml(exported):
    """The core-ATen program coremltools converts: partial decomposition unless it leaves an op without a
    converter (MiniLM keeps ``new_ones``), then the full one."""
    with quiet():
        partial = _without_alias(exported.run_decompositions({}))
    left = {str(n.target) for n in partial.graph.nodes if n.op == "call_function"
            and not str(n.target).startswith(("<built-in", "_operator")) and not _converter_exists(str(n.target))}
    if not left:
        return partial, "run_decompositions({})"
    with quiet():
        full = _without_alias(exported.run_decompositions())
    return full, f"run_decompositions() (the partial one left {', '.join(sorted(left))})"


def _without_alias(exported):
    """The program with ``aten.alias`` nodes (an identity: DeBERTa-v2's relative positions make them, and
    coremltools has no converter for them) replaced by their input, where no output is one (in place)."""
    import torch

    graph = exported.graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default \
                and not any(user.op == "output" for user in node.users):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed = True
    if changed:
        exported.graph_module.recompile()
    return exported


def _worth_reporting(text: str) -> bool:
    text = text.lower()
    return any(k in text for k in ("overflow", "precision", "not supported", "fall back", "lose"))


def _dilated(node) -> bool:
    args = list(node.args)
    dilation = args[5] if len(args) > 5 else node.kwargs.get("dilation", 1)
    values = dilation if isinstance(dilation, (list, tuple)) else [dilation]
    return any(int(v) > 1 for v in values if isinstance(v, int))


def verify_mlpackage(path: Path, program, backend: str, precision: str) -> dict:
    """What can be checked without macOS: I/O names and shapes, ops, weight precision, size."""
    import coremltools as ct

    model = ct.models.MLModel(str(path), skip_model_load=sys.platform != "darwin")
    spec = model.get_spec()
    desc = spec.description
    flexible = flexible_shapes(spec)
    got_in = {i.name: list(i.type.multiArrayType.shape) for i in desc.input}
    want_in = {s.name: list(s.shape) for s in program.inputs}
    if set(got_in) != set(want_in) or any(got_in[n] != want_in[n] for n in want_in if n not in flexible):
        raise SlimxFailure("CoreML model", f"inputs {got_in} differ from the program's {want_in}", "report this")
    got_out = [o.name for o in desc.output]
    if got_out != list(program.output_names):
        raise SlimxFailure("CoreML model", f"outputs {got_out} differ from {program.output_names}", "report this")
    if backend == "neuralnetwork":
        ops = Counter(layer.WhichOneof("layer") for layer in spec.neuralNetwork.layers)
        ane = {op: n for op, n in ops.items() if _ane_unfriendly_layer(op)}
        fp16 = sum(1 for layer in spec.neuralNetwork.layers for w in _layer_weights(layer) if len(w.float16Value))
        fp32 = sum(1 for layer in spec.neuralNetwork.layers for w in _layer_weights(layer) if len(w.floatValue))
        weights = {"fp16_tensors": fp16, "fp32_tensors": fp32}
        if precision == "fp16" and fp32:
            raise SlimxFailure("CoreML model", f"{fp32} weight tensors stayed fp32 after fp16 quantization",
                               "report this")
    else:
        ops = Counter()
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                ops.update(op.type for op in block.operations)
        ane = {op: n for op, n in ops.items() if op in _ANE_UNFRIENDLY_MIL}
        weights = {"compute_precision": precision}
    return {
        "spec_version": spec.specificationVersion,
        "verified": {"inputs": got_in, "outputs": got_out, **({"flexible_shapes": flexible} if flexible else {}),
                     "loaded_with": f"coremltools.models.MLModel {ct.__version__}"},
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "weights": weights,
        "ane_fallback_likely": {"ops": ane, "source": ANE_SOURCE} if ane else {},
    }


def _ane_unfriendly_layer(kind: str) -> bool:
    low = kind.lower()
    return ("broadcastable" in low or low.endswith("nd") or low.startswith(("gather", "embeddingnd")) or
            low in ("uniDirectionalLSTM".lower(), "biDirectionalLSTM".lower(), "gru", "simpleRecurrent".lower(),
                    "custom"))


def _layer_weights(layer):
    body = getattr(layer, layer.WhichOneof("layer"))
    for part in ("weights", "bias"):
        if hasattr(body, part):
            yield getattr(body, part)


class CoreMLRunner:
    """CoreML prediction (macOS only): the Mac slimx runs on, not the iPhone."""

    name = "coreml"
    threads = None  # CoreML schedules its own threads

    def __init__(self, compute_units: str = "all") -> None:
        self.compute_units = compute_units

    def _model(self, artifact: Artifact):
        import coremltools as ct

        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[artifact.meta.get("compute_units", self.compute_units)])
        return ct.models.MLModel(str(artifact.path), compute_units=units)

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        model = session or self._model(artifact)
        arrays = to_numpy_inputs(inputs)
        sizes = (artifact.meta.get("buckets") or {}).get("sizes")
        length = None
        if sizes:  # enumerated shapes: the smallest bucket that holds the input, padded inside it
            length = arrays[0].shape[1]
            size = pick_bucket(length, sizes)
            arrays = fit_to_bucket(arrays, size)
        feed = {s.name: a.astype(np.float32 if s.dtype.startswith("float") else np.int32)
                for s, a in zip(artifact.inputs, arrays, strict=True)}
        out = model.predict(feed)
        outs = [np.asarray(out[n]) for n in artifact.output_names]
        if length is not None:  # per-token outputs (batch, seq, ...) back to the input's length
            outs = [o[:, :length] if o.ndim >= 3 and o.shape[1] == size else o for o in outs]
        return outs

    def session(self, path):
        import coremltools as ct

        return ct.models.MLModel(str(path))

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50) -> Timing:
        import coremltools as ct

        model = self._model(artifact)
        return Timing.measure(lambda: self.run(artifact, inputs, session=model), warmup, runs, runtime="coreml",
                              runtime_version=ct.__version__, threads=None)
