"""ONNX: the dynamo exporter to write it, onnxruntime to run, time and profile it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from slimx._core.errors import SlimxFailure, first_line
from slimx.export.program import node_module_path
from slimx.targets.base import Artifact, CompileOptions, Coverage, RunnerInfo, Target, register_target
from slimx.targets.ort_runner import OrtRunner


def _ort_provider_missing(provider: str) -> str | None:
    import onnxruntime

    if provider not in onnxruntime.get_available_providers():
        return f"onnxruntime on this host has no {provider} (install onnxruntime-gpu with CUDA/TensorRT)"
    return None


def _ort_runner(providers: list[str] | None = None):
    return lambda threads=None: OrtRunner(threads=threads, providers=providers)


ORT_RUNNERS = (
    RunnerInfo("onnxruntime", "onnx", "onnxruntime-cpu-fp32", "onnxruntime, CPU execution provider",
               make=_ort_runner()),
    RunnerInfo("onnxruntime-cuda", "onnx", "onnxruntime-cuda-fp32", "onnxruntime, CUDA execution provider",
               missing=lambda: _ort_provider_missing("CUDAExecutionProvider"),
               make=_ort_runner(["CUDAExecutionProvider", "CPUExecutionProvider"])),
    RunnerInfo("onnxruntime-tensorrt", "onnx", "onnxruntime-tensorrt-fp32", "onnxruntime, TensorRT execution provider",
               missing=lambda: _ort_provider_missing("TensorrtExecutionProvider"),
               make=_ort_runner(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])),
)


@dataclass(frozen=True)
class OnnxOptions:
    """The onnx format's own options.

    Attributes:
        fuse: apply onnxruntime's transformer fusions (``targets.ort_fusions``: Attention, SkipLayerNorm,
            BiasGelu, as com.microsoft contrib ops, checked against the unfused graph); ``--no-fuse`` keeps a
            plain ONNX graph that runtimes other than onnxruntime can load.
        int8_cpu: for ``int8-weights``, the CPU kind whose weight candidates are tried (``quant.onnx``): ``auto``
            (this host's), ``vnni``, or ``avx2`` (x86 without VNNI, where onnxruntime's u8s8 kernels saturate).
    """

    fuse: bool = field(default=True, metadata={
        "help": "onnx: keep a plain ONNX graph (default: onnxruntime's Attention/SkipLayerNorm/BiasGelu fusions, "
                "contrib ops that only onnxruntime runs)"})
    int8_cpu: str = field(default="auto", metadata={
        "help": "onnx int8-weights: choose the weights for this CPU kind by measured error (default: auto, this "
                "host's; avx2: x86 without VNNI)", "choices": ("auto", "vnni", "avx2")})


@register_target
class OnnxTarget(Target):
    name = "onnx"
    writes_onnx = True
    suffixes = (".onnx",)
    options_cls = OnnxOptions
    model_form_suffixes = (".onnx",)  # an .onnx file is also a MODEL form
    runners = ORT_RUNNERS
    default_runner = "onnxruntime"
    dynamic_shapes = True  # symbolic dimensions: onnxruntime runs any length in the range

    def verify_file(self, path: Path) -> str | None:
        return verify_onnx_file(path)

    def read_inputs(self, path: Path) -> list:
        from slimx.export.intake import load_onnx_file

        return load_onnx_file(Path(path), []).inputs

    def check(self, program) -> Coverage:
        """Which ATen ops the exporter can translate, after the same decompositions it applies."""
        coverage = Coverage(target=self.name)
        if program.exported is None:
            coverage.notes.append("input is already ONNX: nothing to translate")
            return coverage
        try:  # the exporter's own op table and decomposition step (private API: degrade gracefully)
            from torch.onnx._internal.exporter import _fx_passes
            from torch.onnx._internal.exporter._registration import ONNXRegistry

            from slimx.export.program import quiet

            registry = ONNXRegistry.from_torchlib()
            with quiet():
                decomposed = _fx_passes.decompose_with_registry(program.exported, registry)
        except Exception as exc:
            coverage.notes.append(f"ops not checked ahead of conversion ({first_line(exc)})")
            return coverage
        for node in decomposed.graph.nodes:
            if node.op != "call_function":
                continue
            key = str(node.target)
            if _is_structural(key) or registry.is_registered(node.target):
                coverage.add("supported", key)
            else:
                coverage.add("unsupported", key, node_module_path(node))
        return coverage

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        from slimx.export.program import program_to_onnx

        path = Path(out_dir) / "model.onnx"
        if program.exported is None:
            if program.onnx_source is None:
                raise SlimxFailure("onnx target", "the program has neither an exported graph nor an ONNX file",
                                   "report this as a bug")
            import onnx

            tmp = path.with_name(".model.onnx.partial")
            try:  # one self-contained file, whether or not the source kept its weights beside it
                onnx.save(onnx.load(str(program.onnx_source)), str(tmp))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            program_to_onnx(program.exported, path, program.input_names, program.output_names, opset=options.opset)
        meta = {"opset": _opset_of(path)}
        fuse = getattr(options.format_options, "fuse", True)
        if program.exported is not None and fuse:
            meta["fusions"] = self._fuse(path, program, options.precision)
        elif program.exported is not None:
            meta["fusions"] = {"applied": {}, "skipped": "--no-fuse"}
        if options.precision != "fp32":
            from slimx.quant import QuantContext, quantize

            ctx = QuantContext(calib_batches, program.module, program.input_names, score_runner=OrtRunner,
                               specs=program.inputs)
            cfg = options.quant_config()
            cpu = getattr(options.format_options, "int8_cpu", "auto")
            if cpu != "auto" and cfg.cpu_kind is None:
                cfg = dataclasses.replace(cfg, cpu_kind=cpu)
            _, meta["quantization"] = quantize("onnx", path, cfg, ctx)
        return Artifact(format=self.name, path=path, inputs=program.inputs, output_names=program.output_names,
                        meta=meta)

    @staticmethod
    def _fuse(path: Path, program, precision: str) -> dict:
        """onnxruntime's fusions on the written file, checked on fresh inputs (padded masks, two lengths)."""
        from slimx._core.inputs import sample_inputs
        from slimx.export.shapes import at_length, seq_range_of
        from slimx.targets.ort_fusions import fuse_for_onnxruntime

        if precision == "int8":  # the QDQ quantizer leaves a fused Attention float: static int8 stays unfused
            return {"applied": {}, "skipped": "static int8: onnxruntime's QDQ quantizer does not quantize the fused "
                                              "attention, so the graph is quantized unfused"}
        specs = program.inputs
        seq = seq_range_of(specs)
        shapes = [specs] if seq is None else [at_length(specs, n) for n in sorted({min(max(seq[0], 7), seq[1]),
                                                                                  specs[0].shape[1]})]
        checks = [sample_inputs(s, seed=4242 + i) for i, s in enumerate(shapes)]
        mask = next((s.name for s in specs if s.kind == "mask"), None)
        return fuse_for_onnxruntime(path, checks, mask_input=mask)


def verify_onnx_file(path: Path) -> str | None:
    """Why an uploaded file is not a self-contained, valid ONNX model (None when it is)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:
        return f"corrupt ONNX artifact ({first_line(exc, 160)})"
    if any(t.data_location == 1 for t in model.graph.initializer):
        return "the ONNX file refers to external data; send one file"
    return None


def _is_structural(op: str) -> bool:
    """Python-level and assertion nodes the exporter drops or folds (no ONNX node of their own)."""
    return op.startswith(("<built-in", "_operator", "aten._assert", "aten.sym_constrain_range", "aten.sym_size",
                          "aten.sym_numel", "aten.sym_stride"))


def _opset_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
