"""TFLite: litert-torch converts the PyTorch model, the LiteRT interpreter (ai-edge-litert) runs it."""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure, first_line, root_cause
from slimx._core.inputs import sample_inputs, to_numpy_inputs
from slimx.export.program import native_stderr_to_null, node_module_path, quiet
from slimx.targets.base import Artifact, CompileOptions, Coverage, RunnerInfo, Target, Timing, register_target

# ops that convert but do not load in the LiteRT interpreter (seen here; see shared FIELD-NOTES)
_NEEDS_TFL_DECOMPS = {"aten.topk.default"}  # STABLEHLO_SORT unless LITERT_TORCH_FULL_TFL_DECOMPS=1 (-> TOPK_V2)
_UNLOADABLE = {"aten.sort.default": "lowers to STABLEHLO_SORT, which the LiteRT interpreter cannot load",
               "aten.sort.stable": "lowers to STABLEHLO_SORT, which the LiteRT interpreter cannot load"}


def litert_missing() -> str | None:
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        return "ai-edge-litert is not installed (pip install 'slimx[tflite]')"
    return None


@register_target
class TFLiteTarget(Target):
    name = "tflite"
    suffixes = (".tflite",)
    runners = (RunnerInfo("litert", "tflite", "tflite-cpu-fp32", "LiteRT interpreter, XNNPACK CPU",
                          missing=litert_missing, make=lambda threads=None: LiteRTRunner(threads=threads)),)
    default_runner = "litert"
    static_reason = ("litert-torch lowers only some ops with dynamic shapes (Linear, Softmax and Embedding fail); "
                     "per-length signatures are not built yet, so the model is exported at its static shape")
    default_precision = "fp32"
    needs_torch = True

    def verify_file(self, path: Path) -> str | None:
        head = path.read_bytes()[:8]
        if len(head) < 8 or head[4:8] != b"TFL3":
            return "corrupt TFLite artifact (no TFL3 flatbuffer identifier)"
        return None

    def read_inputs(self, path: Path) -> list:
        from ai_edge_litert.interpreter import Interpreter

        from slimx._core.inputs import InputSpec

        with native_stderr_to_null():
            interp = Interpreter(model_path=str(path))
        specs = []
        for name, d in interp.get_signature_runner().get_input_details().items():
            dtype = np.dtype(d["dtype"]).name
            kind = "tokens" if dtype.startswith("int") else "float"
            dtype = dtype if dtype in ("float32", "float16", "int64", "int32") else "float32"
            specs.append(InputSpec(name, tuple(int(x) for x in d["shape"]), dtype, kind=kind))
        return specs

    def check(self, program) -> Coverage:
        coverage = Coverage(target=self.name)
        for node in program.exported.graph.nodes:
            if node.op != "call_function":
                continue
            key = str(node.target)
            if key in _UNLOADABLE:
                coverage.add("unsupported", key, node_module_path(node))
            else:
                coverage.add("supported", key)
                if key in _NEEDS_TFL_DECOMPS and not any("TOPK_V2" in n for n in coverage.notes):
                    coverage.notes.append(f"{key}: converted with LITERT_TORCH_FULL_TFL_DECOMPS=1 (TOPK_V2)")
        for op in coverage.unsupported:
            coverage.notes.append(f"{op} {_UNLOADABLE[op]}")
        return coverage

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        from slimx.quant import QuantContext, quantize

        with native_stderr_to_null():  # LiteRT logs from C++ when it loads
            import litert_torch

        # litert-torch names the .tflite signature's inputs after the keywords it traced with: the spec's names
        kwargs = program.as_kwargs(sample_inputs(program.inputs, seed=0))
        ctx = QuantContext(calib_batches, program.module, program.input_names, example_kwargs=kwargs)
        with native_stderr_to_null():  # LiteRT's quantizer logs from C++ on import
            (module, quant_config), record = quantize(self.name, program.named_module(), options.quant_config(),
                                                      ctx)
        needs_decomps = any(str(n.target) in _NEEDS_TFL_DECOMPS for n in program.exported.graph.nodes
                            if n.op == "call_function")
        path = Path(out_dir) / "model.tflite"
        tmp = path.with_name(".model.tflite.partial")
        try:
            with _env("LITERT_TORCH_FULL_TFL_DECOMPS", "1" if needs_decomps else None), quiet(), \
                    native_stderr_to_null():
                # the program's module is already in eval mode; a PT2E-converted graph refuses .eval()
                converted = litert_torch.convert(module, (), sample_kwargs=kwargs, quant_config=quant_config)
                converted.export(str(tmp))
            os.replace(tmp, path)
        except Exception as exc:
            cause = root_cause(exc)
            op = re.search(r"(aten\.[\w.]+|tfl\.[\w]+|stablehlo\.[\w]+)", str(cause))
            raise SlimxFailure(f"TFLite conversion{' of ' + op.group(1) if op else ''}", first_line(cause, 160),
                               "try --precision fp32, replace the failing module, or run with --debug") from exc
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"quantization": record, **inspect_tflite(path, program)}
        return Artifact(format=self.name, path=path, inputs=program.inputs, output_names=program.output_names,
                        meta=meta)

@contextlib.contextmanager
def _env(key: str, value: str | None):
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def inspect_tflite(path: Path, program) -> dict:
    """Load the model in the LiteRT interpreter (proving it loads) and list its ops and I/O types."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with native_stderr_to_null():  # "Created TensorFlow Lite XNNPACK delegate" on every load
            interp = Interpreter(model_path=str(path), num_threads=1)
            interp.allocate_tensors()
    except Exception as exc:
        op = re.search(r"([A-Z][A-Z0-9_]{3,})", str(exc))
        raise SlimxFailure(f"the converted .tflite{' (op ' + op.group(1) + ')' if op else ''}",
                           f"does not load in the LiteRT interpreter ({first_line(exc, 160)})",
                           "replace the module that produces this op, or run with --debug") from exc
    ops = Counter(d["op_name"] for d in interp._get_ops_details())
    sig = interp.get_signature_runner()
    io_types = {}
    for kind, details in (("inputs", sig.get_input_details()), ("outputs", sig.get_output_details())):
        io_types[kind] = {name: {"dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]],
                                 "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]}
                          for name, d in details.items()}
    missing = set(program.input_names) - set(io_types["inputs"])
    if missing:
        raise SlimxFailure("the converted .tflite", f"lost input(s) {sorted(missing)}", "report this model")
    return {"ops": dict(ops.most_common()), "io": io_types}


class LiteRTRunner:
    """The LiteRT interpreter (ai-edge-litert) on this host, XNNPACK CPU delegate, threads set.

    Inputs are cast to the model's I/O types; int8/uint8 inputs are quantized and outputs
    dequantized with the model's own scale and zero point (static PT2E models have int8 edges).
    LiteRT's Python API exposes no per-op profiler, so ``per_op`` stays empty.
    """

    name = "litert"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1

    @property
    def version(self) -> str:
        from importlib import metadata

        return metadata.version("ai-edge-litert")

    def session(self, path):
        from ai_edge_litert.interpreter import Interpreter

        with native_stderr_to_null():
            interp = Interpreter(model_path=str(path), num_threads=self.threads)
            interp.allocate_tensors()
        return interp.get_signature_runner()

    def _feed(self, sig, artifact: Artifact, inputs: tuple) -> dict:
        details = sig.get_input_details()
        feed = {}
        for spec, arr in zip(artifact.inputs, to_numpy_inputs(inputs), strict=True):
            d = details[spec.name]
            dtype = np.dtype(d["dtype"])
            scale, zero = d["quantization"]
            if dtype in (np.int8, np.uint8) and scale:
                info = np.iinfo(dtype)
                arr = np.clip(np.round(arr / scale + zero), info.min, info.max)
            feed[spec.name] = arr.astype(dtype)
        return feed

    def _outputs(self, sig, raw: dict, artifact: Artifact) -> list[np.ndarray]:
        details = sig.get_output_details()
        out = []
        for name in sorted(raw, key=_output_index):
            arr = raw[name]
            scale, zero = details[name]["quantization"]
            if arr.dtype in (np.int8, np.uint8) and scale:
                arr = (arr.astype(np.float32) - zero) * scale
            out.append(arr)
        return out

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        sig = session or self.session(artifact.path)
        return self._outputs(sig, sig(**self._feed(sig, artifact, inputs)), artifact)

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50) -> Timing:
        sig = self.session(artifact.path)
        feed = self._feed(sig, artifact, inputs)
        return Timing.measure(lambda: sig(**feed), warmup, runs, runtime=self.name, runtime_version=self.version,
                              threads=self.threads)


def _output_index(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 0
