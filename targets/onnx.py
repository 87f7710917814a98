"""ONNX: the dynamo exporter to write it, onnxruntime to run, time and profile it."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure, first_line
from slimx._core.inputs import to_numpy_inputs
from slimx.export.program import node_module_path, onnx_node_modules
from slimx.targets.base import Artifact, CompileOptions, Coverage, RunnerInfo, Target, Timing, register_target

_ONNX_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


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
    """

    fuse: bool = True


@register_target
class OnnxTarget(Target):
    name = "onnx"
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

            ctx = QuantContext(calib_batches, program.module, program.input_names, score_runner=OrtRunner)
            _, meta["quantization"] = quantize("onnx", path, options.quant_config(), ctx)
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


class OrtRunner:
    """onnxruntime on this host's CPU (or the execution providers given).

    Example:
        >>> runner = OrtRunner(threads=1)  # doctest: +SKIP
        >>> runner.time(artifact, inputs, warmup=5, runs=30).median_ms  # doctest: +SKIP
    """

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, providers: list[str] | None = None,
                 simulate_qdq: bool = False) -> None:
        """``simulate_qdq``: run Q/DQ pairs as written (float math on quantized values) instead of fusing
        them into onnxruntime's int8 kernels. That is the arithmetic of a TensorRT engine (int8 products,
        wide accumulation); the fused x86 kernels saturate on CPUs without VNNI (AVX2 only), which on
        this project's tiny MLP took symmetric int8 from cosine 0.9998 to 0.972."""
        self.threads = threads or os.cpu_count() or 1
        self.providers = providers or ["CPUExecutionProvider"]
        self.simulate_qdq = simulate_qdq

    @property
    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def session(self, path: Path, profile_dir: str | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if self.simulate_qdq:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(profile_dir, "ort")
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:
            raise SlimxFailure(f"onnxruntime could not load {path}", first_line(exc),
                               "check the model with onnx.checker, or try another --opset") from exc

    def feed(self, session, inputs: tuple) -> dict:
        """The session's input dict for ``inputs`` (tensors or arrays), cast to the dtypes the graph declares."""
        arrays = to_numpy_inputs(inputs)
        feed = {}
        for meta, arr in zip(session.get_inputs(), arrays, strict=True):
            want = _ONNX_DTYPE.get(meta.type)
            feed[meta.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
        return feed

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        session = session or self.session(artifact.path)
        return session.run(None, self.feed(session, inputs))

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50,
             per_op: bool = True, profile_runs: int = 10) -> Timing:
        """Median/p90 over ``runs`` timed calls after ``warmup``; per-op times from ORT's profiler.

        The profiler runs in a separate session so that its overhead stays out of the timings.
        """
        session = self.session(artifact.path)
        feed = self.feed(session, inputs)
        timing = Timing.measure(lambda: session.run(None, feed), warmup, runs, runtime=self.name,
                                runtime_version=self.version, threads=self.threads)
        if per_op:
            timing.per_op, timing.per_node = self.profile(artifact, inputs, profile_runs)
        return timing

    def profile(self, artifact: Artifact, inputs: tuple, runs: int = 10, top: int = 15):
        """Per-op-type and per-node times (ms per inference) from onnxruntime's own profiler."""
        node_scopes = onnx_node_modules(artifact.path)
        with tempfile.TemporaryDirectory(prefix="slimx-ortprof-") as tmp:
            session = self.session(artifact.path, profile_dir=tmp)
            feed = self.feed(session, inputs)
            session.run(None, feed)  # warm-up, excluded below
            session.end_profiling()
            session = self.session(artifact.path, profile_dir=tmp)
            for _ in range(runs):
                session.run(None, feed)
            trace = session.end_profiling()
            with open(trace) as fh:
                events = json.load(fh)
        by_op: dict[str, dict] = {}
        by_node: dict[str, dict] = {}
        for ev in events:
            if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
                continue
            op = ev.get("args", {}).get("op_name", "?")
            node = ev["name"][: -len("_kernel_time")]
            dur_ms = ev.get("dur", 0) / 1000.0
            entry = by_op.setdefault(op, {"op": op, "ms": 0.0, "calls": 0})
            entry["ms"] += dur_ms
            entry["calls"] += 1
            n = by_node.setdefault(node, {"node": node, "op": op, "ms": 0.0,
                                          "module": node_scopes.get(node.split("/")[0], "")})
            n["ms"] += dur_ms
        total = sum(e["ms"] for e in by_op.values()) or 1.0
        ops = []
        for e in sorted(by_op.values(), key=lambda e: -e["ms"]):
            ops.append({"op": e["op"], "ms": round(e["ms"] / runs, 4), "share": round(e["ms"] / total, 4),
                        "count": e["calls"] // runs})
        nodes = [{**n, "ms": round(n["ms"] / runs, 4)} for n in sorted(by_node.values(), key=lambda n: -n["ms"])]
        return ops, nodes[:top]
