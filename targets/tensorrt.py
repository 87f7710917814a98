"""TensorRT: a TensorRT-ready ONNX, its ``trtexec`` build script, and the engine where TensorRT exists.

The ONNX has static shapes, an opset the device's TensorRT parses, int8 as explicit symmetric Q/DQ
nodes (TensorRT's quantization is symmetric) and, when the weights are 2:4 sparse, the build asks
for sparse tactics. Where ``import tensorrt`` works (JetPack on a Jetson, x86 with TensorRT and a
GPU) the engine is built with the builder API into ``model.plan`` with a timing cache; elsewhere the
report says it was not built and why. A plan is never faked.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure, UsageError, first_line
from slimx._core.inputs import to_numpy_inputs
from slimx.targets.base import Artifact, CompileOptions, Coverage, RunnerInfo, Target, Timing, register_target


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT and a CUDA GPU are usable here, and if not, why."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt Python package is not importable here ({first_line(exc, 80)})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "tensorrt imports but no CUDA GPU is visible"
    except ImportError:
        return False, "tensorrt imports but torch (used for device buffers) does not"
    return True, ""


@dataclass(frozen=True)
class TensorRTOptions:
    """TensorRT's own options.

    Attributes:
        dla_core: build for this DLA core (with GPU fallback); None: the GPU.
        opt_len: the sequence length the optimisation profile is tuned for (dynamic text models); None: the
            export shape's.
    """

    dla_core: int | None = field(default=None, metadata={"help": "TensorRT: build for this DLA core, GPU fallback"})
    opt_len: int | None = field(default=None, metadata={
        "help": "TensorRT: the sequence length the engine is tuned for (default: the calibration data's median "
                "length, else the export shape's)"})

    def __post_init__(self) -> None:
        if self.dla_core is not None and self.dla_core < 0:
            raise ValueError(f"dla_core must be 0 or more, got {self.dla_core}")
        if self.opt_len is not None and self.opt_len < 1:
            raise ValueError(f"opt_len must be at least 1, got {self.opt_len}")


def _tensorrt_missing() -> str | None:
    ok, why = tensorrt_status()
    return None if ok else why


@register_target
class TensorRTTarget(Target):
    name = "tensorrt"
    writes_onnx = True
    suffixes = (".plan", ".engine")
    options_cls = TensorRTOptions
    runners = (RunnerInfo("tensorrt", "tensorrt", "tensorrt-gpu-fp16", "TensorRT engine on the local GPU",
                          missing=_tensorrt_missing, make=lambda threads=None: TensorRTRunner()),)
    default_runner = "tensorrt"
    builds_on_device_from = "onnx"  # the engine is specific to the device's GPU and TensorRT: built there
    dynamic_shapes = True  # symbolic dimensions in the ONNX, and an optimisation profile for the engine
    buckets = True  # --buckets: one optimisation profile per bucket
    default_buckets = False
    buckets_reason = ("symbolic dimensions in the ONNX and one optimisation profile per bucket, each tuned at its "
                      "bucket's length (--buckets)")
    default_precision = "fp16"
    needs_torch = False

    def verify_file(self, path: Path) -> str | None:
        return "corrupt TensorRT plan (too small)" if path.stat().st_size < 64 else None

    def build_on_device(self, source: Path, work: Path, precision: str) -> tuple[Path, dict]:
        plan = Path(work) / "model.plan"
        record = build_engine(source, plan, precision, sparse=False, cache_path=Path(work) / "timing.cache")
        return plan, record

    def proxy(self, artifact: Artifact, threads: int | None = None):
        """The TensorRT-ready ONNX in onnxruntime, Q/DQ pairs run as written (the engine's int8 arithmetic,
        not onnxruntime's fused kernels): evidence about the graph and its scales, not the engine."""
        name = artifact.meta.get("proxy_onnx")
        if not name:
            return None
        from slimx.targets.onnx import OrtRunner

        return (artifact.path.parent / name, OrtRunner(threads=threads, simulate_qdq=True),
                f"{name} in onnxruntime (the TensorRT-ready graph, not the engine)")

    def check(self, program) -> Coverage:
        from slimx.targets.onnx import OnnxTarget

        coverage = OnnxTarget().check(program)  # the same exporter writes the TensorRT-ready ONNX
        coverage.target = self.name
        return coverage

    def validate(self, device, options: CompileOptions) -> None:
        if options.precision == "int8-weights":
            raise UsageError("--precision int8-weights", "TensorRT has no weight-only int8 path for these models",
                             "use --precision int8 (explicit Q/DQ from --calib) or fp16")
        dla = _dla_core(options)
        cores = int(device.format_options.get("tensorrt", {}).get("dla_cores", 0))
        if dla >= cores:
            raise UsageError(f"--dla-core {dla}", f"{device.name} has {cores} DLA core(s)",
                             "drop --dla-core, or pick a core the device has")

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        from slimx.targets.onnx import OnnxOptions, OnnxTarget, OrtRunner

        trt_opts = device.format_options.get("tensorrt", {})
        max_opset = int(trt_opts.get("max_onnx_opset", 18))
        opset = min(options.opset, max_opset)
        self.validate(device, options)
        precision = options.precision
        out_dir = Path(out_dir)
        # plain ONNX: onnxruntime's fused contrib ops (com.microsoft Attention...) are not for TensorRT's parser
        onnx_artifact = OnnxTarget().compile(program, device, CompileOptions(
            precision="fp32", opset=opset, format_options=OnnxOptions(fuse=False)), out_dir)
        onnx_path = onnx_artifact.path
        notes = []
        if opset < options.opset:
            runtime = device.runtimes.get("tensorrt", "this TensorRT")
            notes.append(f"opset capped at {opset}: the ONNX parser of {runtime} reads up to {max_opset}")
        quant = None
        if precision == "int8":
            from slimx.quant import QuantContext, quantize

            # the guard scores Q/DQ pairs as written: the engine's arithmetic, not onnxruntime's int8 kernels
            ctx = QuantContext(calib_batches, program.module, program.input_names,
                               score_runner=lambda: OrtRunner(simulate_qdq=True))
            _, quant = quantize(self.name, onnx_path, options.quant_config(), ctx)
        sparse = sparse_24_weights(onnx_path)
        dla = _dla_core(options)
        profiles = shape_profiles(program.inputs, getattr(options.format_options, "opt_len", None), options.buckets)
        flags = trtexec_flags(precision, bool(sparse), dla, profiles)
        kept = fp32_layers(onnx_path, getattr(program, "keep_fp32", ()) or ()) if precision != "fp32" else []
        if kept:  # the pre-flight's overflowing LayerNorms: fp32 layers in an fp16 engine (TensorRT #2564)
            flags += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{k}:fp32" for k in kept)]
        script = write_build_script(out_dir, device, precision, flags, notes)
        files = [("onnx", onnx_path), ("script", script)]
        meta = {"opset": opset, "precision": precision, "trtexec_flags": flags, "sparse_2_4_weights": sparse,
                "quantization": quant, "notes": notes}
        if kept:
            meta["kept_fp32"] = {"layers": kept, "asked": list(program.keep_fp32),
                                 "how": "trtexec --layerPrecisions with --precisionConstraints=obey (the builder: "
                                        "the layers' precision and output type, OBEY_PRECISION_CONSTRAINTS)"}
        if len(profiles) == 1:
            meta["shape_profile"] = profiles[0]
        elif profiles:
            meta["shape_profiles"] = profiles
            meta["buckets"] = {"axis": "seq", "sizes": list(options.buckets), "form": "optimisation profiles",
                               "how": "one optimisation profile per bucket (tuned at the bucket's length); the "
                                      "runner selects the profile whose range holds the input"}
        ok, why = tensorrt_status()
        if ok:
            plan = build_engine(onnx_path, out_dir / "model.plan", precision, bool(sparse), out_dir / "timing.cache",
                                dla, profiles=profiles, fp32_layers=kept)
            meta["engine"] = {"built": True, **plan}
            files.append(("timing-cache", out_dir / "timing.cache"))
            primary = out_dir / "model.plan"
        else:
            meta["engine"] = {"built": False, "reason": f"{why}; run build_engine.sh on the device"}
            primary = onnx_path
        meta["proxy_onnx"] = onnx_path.name
        return Artifact(format=self.name, path=primary, inputs=program.inputs, output_names=program.output_names,
                        meta=meta, extra_files=[f for f in files if f[1] != primary])



def _dla_core(options: CompileOptions) -> int:
    core = getattr(options.format_options, "dla_core", None)
    return -1 if core is None else int(core)


def sparse_24_weights(onnx_path: Path, min_size: int = 1024) -> list[str]:
    """Initializers whose every group of 4 along the input dimension has at least 2 zeros (2:4)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    found = []
    for init in model.graph.initializer:
        if len(init.dims) < 2 or int(np.prod(init.dims)) < min_size or init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init)
        for axis in (w.ndim - 1, w.ndim - 2):  # MatMul weights are (in, out), Gemm/Conv (out, in, ...)
            moved = np.moveaxis(w, axis, -1)
            if moved.shape[-1] % 4:
                continue
            groups = moved.reshape(-1, 4)
            if np.all((groups == 0).sum(axis=1) >= 2) and np.any(groups != 0):
                found.append(init.name)
                break
    return found


def shape_profile(specs, opt_len: int | None = None) -> dict | None:
    """The optimisation profile of an engine with dynamic inputs: per input its min, opt and max shape (opt: the
    export shape, or ``opt_len`` on the sequence axis). None when every input is static.

    Example:
        >>> from slimx._core.inputs import InputSpec
        >>> ids = InputSpec("input_ids", (1, 128), "int64", "tokens", dynamic=((1, 1, 512),))
        >>> shape_profile([ids], opt_len=32)["input_ids"]
        {'min': [1, 1], 'opt': [1, 32], 'max': [1, 512]}
    """
    if not any(s.dynamic for s in specs):
        return None
    out = {}
    for spec in specs:
        lo, opt, hi = list(spec.shape), list(spec.shape), list(spec.shape)
        for axis, a, b in spec.dynamic:
            lo[axis], hi[axis] = a, b
            if axis == 1 and opt_len is not None:
                opt[axis] = min(max(opt_len, a), b)
        out[spec.name] = {"min": lo, "opt": opt, "max": hi}
    return out


def shape_profiles(specs, opt_len: int | None = None, buckets: tuple[int, ...] = ()) -> list[dict]:
    """The optimisation profiles of an engine with dynamic inputs: one over the whole range (``shape_profile``),
    or with ``buckets`` one per bucket, each covering the lengths above the previous bucket up to its own and
    tuned at its own. Empty when every input is static.

    Example:
        >>> from slimx._core.inputs import InputSpec
        >>> ids = InputSpec("input_ids", (1, 128), "int64", "tokens", dynamic=((1, 1, 128),))
        >>> [p["input_ids"]["min"][1] for p in shape_profiles([ids], buckets=(32, 128))]
        [1, 33]
    """
    single = shape_profile(specs, opt_len)
    if single is None:
        return []
    if not buckets:
        return [single]
    out, low = [], None
    for size in buckets:
        profile = {}
        for spec in specs:
            entry = {k: list(v) for k, v in single[spec.name].items()}
            if any(a == 1 for a, _, _ in spec.dynamic):
                entry["min"][1] = low if low is not None else entry["min"][1]
                entry["opt"][1] = entry["max"][1] = size
            profile[spec.name] = entry
        out.append(profile)
        low = size + 1
    return out


def trtexec_flags(precision: str, sparse: bool, dla_core: int = -1, profiles: list[dict] | None = None) -> list[str]:
    flags = ["--onnx=model.onnx", "--saveEngine=model.plan", "--timingCacheFile=timing.cache"]
    for index, profile in enumerate(profiles or ()):
        # one optimisation profile over the dynamic range, tuned for the opt shape; several (one per bucket)
        # each follow their --profile=N (trtexec of TensorRT 10 reads the three shape flags after it)
        if len(profiles) > 1:
            flags.append(f"--profile={index}")
        for key in ("min", "opt", "max"):
            flags.append(f"--{key}Shapes=" + ",".join(f"{name}:{'x'.join(map(str, p[key]))}"
                                                      for name, p in profile.items()))
    if precision in ("fp16", "int8"):
        flags.append("--fp16")
    if precision == "int8":
        flags.append("--int8")  # the Q/DQ scales in the ONNX are used; no TensorRT calibrator runs
    if sparse:
        flags.append("--sparsity=enable")
    if dla_core >= 0:
        flags += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return flags


def write_build_script(out_dir: Path, device, precision: str, flags: list[str], notes: list[str]) -> Path:
    from slimx import __version__

    runtime = device.runtimes.get("tensorrt", "TensorRT")
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine for {device.display_name} ({runtime}), precision {precision}.",
        f"# Written by slimx {__version__}. Run it on the device: the engine is specific to its GPU and TensorRT.",
        "# Explicit Q/DQ networks: TensorRT >= 10 also accepts --stronglyTyped instead of --fp16/--int8",
        "# (layers without Q/DQ then keep the ONNX's fp32).",
        *(f"# note: {n}" for n in notes),
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '"$TRTEXEC" ' + " ".join(shlex.quote(f) for f in flags) + ' "$@"',
        "",
    ]
    path = out_dir / "build_engine.sh"
    tmp = path.with_name(".build_engine.sh.partial")
    tmp.write_text("\n".join(lines))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def fp32_layers(onnx_path: Path, fx_nodes) -> list[str]:
    """The ONNX node names (TensorRT's layer names) of the exported graph's nodes ``fx_nodes`` (the exporter names
    node ``x`` as ``node_x``)."""
    import onnx

    wanted = {f"node_{n}" for n in fx_nodes} | set(fx_nodes)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.name in wanted]


def build_engine(onnx_path: Path, plan_path: Path, precision: str, sparse: bool, cache_path: Path,
                 dla_core: int = -1, workspace_mib: int = 2048, profiles: list[dict] | None = None,
                 fp32_layers: list[str] | None = None) -> dict:
    """Build and serialize an engine with the TensorRT builder API (only where tensorrt imports)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SlimxFailure("TensorRT ONNX parser", errors[:300] or "failed", "check the ONNX opset for this TensorRT")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if fp32_layers:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in fp32_layers:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    for profile in profiles or ():  # the same optimisation profiles build_engine.sh gives trtexec
        opt_profile = builder.create_optimization_profile()
        for name, p in profile.items():
            opt_profile.set_shape(name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(opt_profile)
    if dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SlimxFailure("TensorRT engine build", "the builder returned no engine", "run build_engine.sh --verbose")
    tmp = plan_path.with_name(f".{plan_path.name}.partial")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "build_s": round(time.perf_counter() - start, 2)}


class TensorRTRunner:
    """Runs a serialized engine on the local GPU (device buffers through torch.cuda)."""

    name = "tensorrt"
    threads = None  # a GPU runner

    def session(self, path):
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise SlimxFailure(f"TensorRT engine {path}", "does not deserialize", "rebuild it on this device")
        return engine, engine.create_execution_context()

    def _bind(self, session, inputs: tuple):
        import tensorrt as trt
        import torch

        engine, ctx = session
        arrays = to_numpy_inputs(inputs)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if engine.num_optimization_profiles > 1:  # the profile whose range holds these shapes
            for index in range(engine.num_optimization_profiles):
                fits = all(all(lo <= d <= hi for d, lo, hi in zip(a.shape, *engine.get_tensor_profile_shape(n, index)
                                                                  [::2], strict=True))
                           for n, a in zip(in_names, arrays, strict=True))
                if fits:
                    if ctx.active_optimization_profile != index:
                        ctx.set_optimization_profile_async(index, torch.cuda.current_stream().cuda_stream)
                    break
            else:
                raise SlimxFailure(f"inputs of shape {[list(a.shape) for a in arrays]}",
                                   "fit none of the engine's optimisation profiles", "rebuild with larger --buckets")
        by_name = dict(zip(in_names, arrays, strict=True))
        for name, arr in by_name.items():
            if -1 in tuple(engine.get_tensor_shape(name)):
                ctx.set_input_shape(name, tuple(arr.shape))
        outputs = []
        keep = []
        for name in names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if name in by_name:
                tensor = torch.from_numpy(np.ascontiguousarray(by_name[name].astype(dtype))).cuda()
            else:
                tensor = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=_torch_dtype(dtype), device="cuda")
                outputs.append(tensor)
            keep.append(tensor)
            ctx.set_tensor_address(name, tensor.data_ptr())
        return outputs, keep

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        import torch

        session = session or self.session(artifact.path)
        outputs, _keep = self._bind(session, inputs)
        stream = torch.cuda.current_stream()
        session[1].execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [t.float().cpu().numpy() for t in outputs]

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50) -> Timing:
        import tensorrt as trt
        import torch

        session = self.session(artifact.path)
        _outputs, _keep = self._bind(session, inputs)
        ctx = session[1]
        stream = torch.cuda.current_stream()

        def timed_run() -> float:  # device time of one execution, from CUDA events
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            ctx.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end)

        timing = Timing.measure(timed_run, warmup, runs, call_times_itself=True, runtime=self.name,
                                runtime_version=trt.__version__, threads=None)

        class _Profiler(trt.IProfiler):
            def __init__(self):
                super().__init__()
                self.layers: dict[str, float] = {}

            def report_layer_time(self, layer_name, ms):
                self.layers[layer_name] = self.layers.get(layer_name, 0.0) + ms

        profiler = _Profiler()
        ctx.profiler = profiler
        profile_runs = 10
        for _ in range(profile_runs):
            ctx.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
        total = sum(profiler.layers.values()) or 1.0
        ranked = sorted(profiler.layers.items(), key=lambda kv: -kv[1])
        per_layer = [{"node": name, "op": _layer_kind(name), "ms": round(ms / profile_runs, 4),
                      "share": round(ms / total, 4)} for name, ms in ranked]
        timing.per_op, timing.per_node = per_layer[:20], per_layer[:20]
        return timing


def _layer_kind(name: str) -> str:
    match = re.match(r"([A-Za-z]+)", name)
    return match.group(1) if match else name


def _torch_dtype(dtype: np.dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.int8): torch.int8,
            np.dtype(np.bool_): torch.bool}[np.dtype(dtype)]
