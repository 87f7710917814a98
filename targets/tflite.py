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
from slimx.export.shapes import fit_to_bucket, pick_bucket
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
    buckets = True
    static_reason = ("litert-torch lowers only some ops with dynamic shapes (Linear, Softmax and Embedding fail; "
                     "litert-torch 0.10 with torch 2.14 fails on MiniLM's dynamic sequence axis while it retraces "
                     "torch.export's guards): a dynamic batch axis is built at its static size")
    buckets_reason = ("one signature per sequence-length bucket in one .tflite (weights stored once): litert-torch "
                      "does not lower a dynamic sequence axis here (see static_reason), and XNNPACK plans each "
                      "fixed shape ahead")
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
            sigs = Signatures(Interpreter(model_path=str(path)))
        specs = []
        for name, d in sigs.largest.get_input_details().items():
            dtype = np.dtype(d["dtype"]).name
            kind = "tokens" if dtype.startswith("int") else "float"
            dtype = dtype if dtype in ("float32", "float16", "int64", "int32") else "float32"
            shape = tuple(int(x) for x in d["shape"])
            dynamic = ((1, 1, shape[1]),) if sigs.buckets and len(shape) == 2 else ()  # any length up to the largest
            specs.append(InputSpec(name, shape, dtype, kind=kind, dynamic=dynamic))
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
        from slimx.export.shapes import at_length
        from slimx.quant import QuantContext, quantize

        with native_stderr_to_null():  # LiteRT logs from C++ when it loads
            import litert_torch

        # litert-torch names the .tflite signature's inputs after the keywords it traced with: the spec's names
        kwargs = program.as_kwargs(sample_inputs(program.inputs, seed=0))
        buckets = tuple(options.buckets)
        ctx = QuantContext(calib_batches, program.module, program.input_names, example_kwargs=kwargs,
                           dynamic_shapes=_named_dynamic_shapes(program) if buckets else None)
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
                if buckets:  # one signature per bucket in one flatbuffer: the weights are stored once
                    converter = litert_torch
                    for size in buckets:
                        example = program.as_kwargs(sample_inputs(at_length(program.inputs, size), seed=0))
                        converter = converter.signature(bucket_signature(size), module, (), example)
                    converted = converter.convert(quant_config=quant_config)
                else:
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
        if buckets:
            meta["buckets"] = {"axis": "seq", "sizes": list(buckets),
                               "signatures": [bucket_signature(b) for b in buckets],
                               "how": "one signature per bucket; the runner picks the smallest that fits and pads "
                                      "inside it (pad tokens masked out)"}
        return Artifact(format=self.name, path=path, inputs=program.inputs, output_names=program.output_names,
                        meta=meta)


def bucket_signature(size: int) -> str:
    """The .tflite signature key of one sequence-length bucket."""
    return f"seq_{size}"


def _named_dynamic_shapes(program):
    """torch.export's ``dynamic_shapes`` for the program's ``NamedInputs`` module (inputs by keyword)."""
    from slimx.export.shapes import dynamic_shapes

    dims = dynamic_shapes(program.inputs)
    if dims is None:
        return None
    return {"kwargs": {name: d for name, d in zip(program.input_names, dims, strict=True) if d}}


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
    """Load the model in the LiteRT interpreter (proving it loads) and list its ops, signatures and I/O types
    (of the largest signature where there is one per bucket)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with native_stderr_to_null():  # "Created TensorFlow Lite XNNPACK delegate" on every load
            interp = Interpreter(model_path=str(path), num_threads=1)
            interp.allocate_tensors()
            signatures = Signatures(interp)
    except Exception as exc:
        op = re.search(r"([A-Z][A-Z0-9_]{3,})", str(exc))
        raise SlimxFailure(f"the converted .tflite{' (op ' + op.group(1) + ')' if op else ''}",
                           f"does not load in the LiteRT interpreter ({first_line(exc, 160)})",
                           "replace the module that produces this op, or run with --debug") from exc
    ops = Counter(d["op_name"] for d in interp._get_ops_details())
    sig = signatures.largest
    io_types = {}
    for kind, details in (("inputs", sig.get_input_details()), ("outputs", sig.get_output_details())):
        io_types[kind] = {name: {"dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]],
                                 "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]}
                          for name, d in details.items()}
    missing = set(program.input_names) - set(io_types["inputs"])
    if missing:
        raise SlimxFailure("the converted .tflite", f"lost input(s) {sorted(missing)}", "report this model")
    return {"ops": dict(ops.most_common()), "io": io_types, "signature_keys": list(signatures.keys)}


class Signatures:
    """The signature runners of a loaded .tflite: one, or one per sequence-length bucket (``seq_<N>``).

    ``buckets`` maps each bucket's length to its runner (empty for a single-signature model); ``seq_axes``
    says, per output, which axes follow the bucket's length (cut back to the real length after a run).
    """

    def __init__(self, interp) -> None:
        self.interp = interp
        self.keys = list(interp.get_signature_list())
        self.runners = {k: interp.get_signature_runner(k) for k in self.keys}
        self.buckets: dict[int, object] = {}
        for key, runner in self.runners.items():
            match = re.fullmatch(r"seq_(\d+)", key)
            if match:
                self.buckets[int(match[1])] = runner
        self.seq_axes: dict[str, tuple[int, ...]] = {}
        if len(self.buckets) == 1:  # one bucket (--seq-len 1..16, --buckets 64): token outputs are (batch, seq, ...)
            (size, runner), = self.buckets.items()
            for name, d in runner.get_output_details().items():
                self.seq_axes[name] = (1,) if len(d["shape"]) >= 3 and int(d["shape"][1]) == size else ()
        elif len(self.buckets) > 1:
            small, large = (self.buckets[b] for b in sorted(self.buckets)[:2])
            lengths = sorted(self.buckets)[:2]
            for name, d in small.get_output_details().items():
                other = large.get_output_details()[name]["shape"]
                self.seq_axes[name] = tuple(a for a, (x, y) in enumerate(zip(d["shape"], other, strict=True))
                                            if (x, y) == tuple(lengths))

    @property
    def largest(self):
        return self.buckets[max(self.buckets)] if self.buckets else self.runners[self.keys[0]]


class LiteRTRunner:
    """The LiteRT interpreter (ai-edge-litert) on this host, XNNPACK CPU delegate, threads set.

    A model with one signature per sequence-length bucket runs the smallest bucket that holds the input,
    padded inside it (pad tokens, masked out), and its outputs are cut back to the input's length.
    Inputs are cast to the model's I/O types; int8/uint8 inputs are quantized and outputs
    dequantized with the model's own scale and zero point (static PT2E models have int8 edges).
    LiteRT's Python API exposes no per-op profiler, so ``per_op`` stays empty.
    """

    name = "litert"

    def __init__(self, threads: int | None = None, truncate: bool = False) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.truncate = truncate  # an input past the largest bucket is cut to it (else an error)

    @property
    def version(self) -> str:
        from importlib import metadata

        return metadata.version("ai-edge-litert")

    def session(self, path) -> Signatures:
        from ai_edge_litert.interpreter import Interpreter

        with native_stderr_to_null():
            interp = Interpreter(model_path=str(path), num_threads=self.threads)
            interp.allocate_tensors()
        return Signatures(interp)

    def _pick(self, sigs: Signatures, artifact: Artifact, inputs: tuple):
        """The signature runner for ``inputs``, the inputs fitted to it, and their real length (bucketed)."""
        arrays = to_numpy_inputs(inputs)
        if not sigs.buckets:
            return sigs.largest, arrays, None
        length = arrays[0].shape[1]
        size = pick_bucket(length, tuple(sigs.buckets), truncate=self.truncate)
        return sigs.buckets[size], fit_to_bucket(arrays, size), min(length, size)

    def _feed(self, sig, artifact: Artifact, arrays: list) -> dict:
        details = sig.get_input_details()
        feed = {}
        for spec, arr in zip(artifact.inputs, arrays, strict=True):
            d = details[spec.name]
            dtype = np.dtype(d["dtype"])
            scale, zero = d["quantization"]
            if dtype in (np.int8, np.uint8) and scale:
                info = np.iinfo(dtype)
                arr = np.clip(np.round(arr / scale + zero), info.min, info.max)
            feed[spec.name] = arr.astype(dtype)
        return feed

    def _outputs(self, sig, raw: dict, sigs: Signatures, length: int | None) -> list[np.ndarray]:
        details = sig.get_output_details()
        out = []
        for name in sorted(raw, key=_output_index):
            arr = raw[name]
            scale, zero = details[name]["quantization"]
            if arr.dtype in (np.int8, np.uint8) and scale:
                arr = (arr.astype(np.float32) - zero) * scale
            for axis in sigs.seq_axes.get(name, ()) if length is not None else ():
                arr = np.take(arr, range(length), axis=axis)
            out.append(arr)
        return out

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        sigs = session or self.session(artifact.path)
        sig, arrays, length = self._pick(sigs, artifact, inputs)
        return self._outputs(sig, sig(**self._feed(sig, artifact, arrays)), sigs, length)

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50) -> Timing:
        sigs = self.session(artifact.path)
        sig, arrays, _ = self._pick(sigs, artifact, inputs)
        feed = self._feed(sig, artifact, arrays)
        return Timing.measure(lambda: sig(**feed), warmup, runs, runtime=self.name, runtime_version=self.version,
                              threads=self.threads)


def _output_index(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 0
