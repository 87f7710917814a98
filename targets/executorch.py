"""ExecuTorch: a ``.pte`` lowered to the XNNPACK delegate, run, proved and profiled in ExecuTorch's own runtime.

``torch.export`` -> (``quant.executorch``: fp16 / PT2E int8) -> ``to_edge_transform_and_lower`` with
``XnnpackPartitioner`` -> ``to_executorch()``. What XNNPACK does not take runs in ExecuTorch's portable kernels;
the coverage check lists those ops with their module paths. The ``executorch`` wheel's Python bindings
(``executorch.runtime``) load and run the file here with the same C++ runtime and XNNPACK kernels a phone or a
board runs, and its event tracer (ETDump, read by ``executorch.devtools.Inspector``) gives per-op times.
Sequence and batch axes stay dynamic (bounded: the runtime plans memory for the upper bound).
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np

from slimx._core.errors import SlimxFailure, first_line, root_cause
from slimx.export.program import node_module_path, quiet
from slimx.targets.base import Artifact, CompileOptions, Coverage, RunnerInfo, Target, Timing, register_target

# ops that are bookkeeping in any graph (tuple access, symbolic sizes), not kernels
_NOT_KERNELS = ("getitem", "sym_size", "sym_numel", "executorch_call_delegate", "_assert", "sym_constrain_range")
# how the estimate of an executorch artifact carries over from a device's LiteRT setting (both run XNNPACK's CPU
# kernels); the ratio is measured on this host by bench/executorch_target.py (bench/results/executorch.md)
TRANSFER_NOTE = ("estimated from the device's LiteRT (XNNPACK CPU) setting: ExecuTorch's XNNPACK delegate runs the "
                 "same kernels, but the ops it does not delegate run in portable kernels; no published ExecuTorch "
                 "device timings exist to check the transfer (on an x86 host ExecuTorch took 1.0-1.4x LiteRT's time "
                 "on MiniLM, deit_tiny and mobilenetv2 fp32: bench/results/executorch.md)")


def executorch_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("executorch") is None:  # cheap: every CLI start asks which formats exist
        return "executorch is not installed (pip install 'slimx-edge[executorch]')"
    return None


@register_target
class ExecuTorchTarget(Target):
    name = "executorch"
    suffixes = (".pte",)
    runners = (RunnerInfo("executorch", "executorch", "executorch-cpu-fp32",
                          "ExecuTorch runtime (Python bindings), XNNPACK delegate",
                          missing=executorch_missing, make=lambda threads=None: ExecuTorchRunner(threads=threads)),)
    default_runner = "executorch"
    dynamic_shapes = True  # bounded symbolic axes: the runtime runs any size up to the bound
    needs_torch = True
    estimates_from = ("tflite", TRANSFER_NOTE)
    # fp16: XNNPACK's fp16 kernels and the portable ones compute in fp16; the half program clamps float constants
    # past fp16 (quant.executorch._half_casts); LayerNorm runs in fp32 between casts (the portable fp16 kernel is
    # wrong here)
    fp16_policy: ClassVar[dict] = {"results": True, "constants": "clamp", "layer_norm": "fp32 inside"}

    @property
    def available(self) -> bool:  # the format needs the optional executorch package to be written at all
        return executorch_missing() is None

    @property
    def unavailable_reason(self) -> str:
        return executorch_missing() or ""

    def verify_file(self, path: Path) -> str | None:
        head = path.read_bytes()[:8]
        if len(head) < 8 or not head[4:8].startswith(b"ET"):
            return "corrupt ExecuTorch program (no ET flatbuffer identifier)"
        return None

    def read_inputs(self, path: Path) -> list:
        from slimx._core.inputs import InputSpec

        meta = _method_meta(path)
        specs = []
        for i in range(meta.num_inputs()):
            info = meta.input_tensor_meta(i)
            dtype = _dtype_name(info.dtype())
            dtype = dtype if dtype in ("float32", "float16", "int64", "int32", "bool") else "float32"
            kind = "tokens" if dtype.startswith("int") else "float"
            specs.append(InputSpec(f"input_{i}", tuple(int(s) for s in info.sizes()), dtype, kind=kind))
        return specs

    def check(self, program) -> Coverage:
        """Lower the fp32 program (kept for compile) and list what XNNPACK takes and what stays in the portable
        kernels, with the module each left-over op came from."""
        coverage = Coverage(target=self.name)
        lowered = program.derived("executorch_fp32", _lower_copy)
        delegated, left = delegation(lowered)
        for op, n in delegated.items():
            coverage.supported[op] = n
        for op, paths in left.items():
            for path in paths:
                coverage.add("fallback", op, path)
        if left:
            coverage.notes.append(f"{sum(len(p) for p in left.values())} op(s) not delegated to XNNPACK run in "
                                  "ExecuTorch's portable kernels: " + ", ".join(sorted(left)))
        return coverage

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        from slimx.quant import QuantContext, quantize

        cfg = options.quant_config()
        ctx = QuantContext(calib_batches, program.module, program.input_names, specs=program.inputs)
        with quiet():
            exported, record = quantize(self.name, program, cfg, ctx)
        if exported is program.exported:  # fp32: the check's lowering, copied (serializing rewrites it in place)
            lowered = copy.deepcopy(program.derived("executorch_fp32", _lower_copy))
        else:
            lowered = _lower(exported)
        delegated, left = delegation(lowered)
        calls = delegate_calls(lowered)
        path = Path(out_dir) / "model.pte"
        tmp = path.with_name(".model.pte.partial")
        try:
            with quiet():
                buffer = lowered.to_executorch().buffer
            tmp.write_bytes(buffer)
            os.replace(tmp, path)
        except Exception as exc:
            raise SlimxFailure("ExecuTorch serialization", first_line(root_cause(exc), 160),
                               "run with --debug") from exc
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"quantization": record, "backend": "XNNPACK (XnnpackPartitioner)",
                "delegated_ops": dict(delegated.most_common()),
                "portable_ops": {op: len(p) for op, p in sorted(left.items())},
                "portable_where": {op: p[0] for op, p in sorted(left.items()) if p[0]},
                "delegate_calls": calls, "io": _io_record(path)}
        return Artifact(format=self.name, path=path, inputs=program.inputs, output_names=program.output_names,
                        meta=meta)


def _lower(exported):
    """``to_edge_transform_and_lower`` with the XNNPACK partitioner (unmasked attention as plain softmax first)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    _register_quantized_kernels()
    try:
        with quiet():
            return to_edge_transform_and_lower(plain_attention(exported), partitioner=[XnnpackPartitioner()])
    except Exception as exc:
        cause = root_cause(exc)
        op = re.search(r"(aten\.[\w.]+)", str(cause))
        raise SlimxFailure(f"ExecuTorch lowering{' of ' + op.group(1) if op else ''}", first_line(cause, 160),
                           "replace the failing module, try another --precision, or run with --debug") from exc


def plain_attention(exported):
    """The program with each ``scaled_dot_product_attention`` decomposed as ``softmax(q k^T * scale) v`` when none
    of them has a mask, causality or dropout (a ViT's), else unchanged.

    The default decomposition is the "safe" softmax, which guards rows that are all ``-inf`` with ``eq``, ``any``,
    ``logical_not``, ``full_like`` and ``where``: XNNPACK takes none of them, and in timm's deit_tiny they ran in
    the portable kernels for about a third of the model's time here (bench/results/executorch.md). Without a mask
    no score is ``-inf``, so the plain softmax computes the same values.
    """
    import math

    import torch

    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    nodes = [n for n in exported.graph.nodes if n.op == "call_function" and n.target is sdpa]

    def plain(n) -> bool:
        extra = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), n.args[3:], strict=False))
        extra.update(n.kwargs)
        return extra.get("attn_mask") is None and not extra.get("dropout_p") and not extra.get("is_causal") \
            and not extra.get("enable_gqa")

    if not nodes or not all(plain(n) for n in nodes):
        return exported

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        scores = torch.matmul(query, key.transpose(-2, -1)) * factor
        return torch.matmul(torch.softmax(scores, dim=-1), value)

    with quiet():
        return exported.run_decompositions({sdpa: attention})


def _lower_copy(exported):
    """The program lowered, leaving ``exported`` as it was (lowering rewrites the program it is given in place: a
    later PT2E capture of it saw per-channel weight scales of size 1)."""
    return _lower(copy.deepcopy(exported))


def _register_quantized_kernels() -> None:
    """ExecuTorch's quantized kernel library (the out variants of quantize/dequantize): a quantized op XNNPACK does
    not take (a dynamic activation's choose_qparams between delegates) must have one to be serialized."""
    try:
        import executorch.kernels.quantized  # noqa: F401
    except ImportError:  # a build without it: serialization names the missing out variants
        pass


def _short(target) -> str:
    """``aten.linear.default`` for an edge op (``<EdgeOpOverload: aten.linear.default>: schema = ...``)."""
    text = str(target)
    match = re.search(r"((?:aten|dim_order_ops|quantized_decomposed|torchao)\.[\w.]+)", text)
    return match.group(1) if match else text


def delegation(lowered) -> tuple[Counter, dict[str, list]]:
    """The ops XNNPACK took (from each delegated subgraph) and, per op left in the portable kernels, the module
    paths of its nodes."""
    gm = lowered.exported_program().graph_module
    delegated: Counter = Counter()
    for name, child in gm.named_children():
        if name.startswith("lowered_module"):
            original = getattr(child, "original_module", None)
            graph = original.graph if original is not None else None
            for node in graph.nodes if graph is not None else ():
                if node.op == "call_function" and not any(k in str(node.target) for k in _NOT_KERNELS):
                    delegated[_short(node.target)] += 1
    left: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or any(k in str(node.target) for k in _NOT_KERNELS):
            continue
        left.setdefault(_short(node.target), []).append(node_module_path(node))
    return delegated, left


def delegate_calls(lowered) -> int:
    gm = lowered.exported_program().graph_module
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))


# ExecuTorch's ScalarType codes (c10's numbering) of the dtypes slimx inputs and outputs have
_SCALAR_TYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 11: "bool"}


def _dtype_name(code) -> str:
    """``float16`` for a tensor info's dtype (an int code in the Python bindings, or an enum)."""
    try:
        return _SCALAR_TYPES.get(int(code), str(code))
    except (TypeError, ValueError):
        return {"Float": "float32", "Half": "float16", "Long": "int64", "Int": "int32", "Bool": "bool"}.get(
            str(code).rsplit(".", 1)[-1], str(code))


def _method_meta(path: Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path)).metadata("forward")


def _io_record(path: Path) -> dict:
    meta = _method_meta(path)

    def one(info):
        return {"dtype": _dtype_name(info.dtype()),
                "max_shape": [int(s) for s in info.sizes()]}

    return {"inputs": [one(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
            "outputs": [one(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]}


class ExecuTorchRunner:
    """ExecuTorch's runtime through its Python bindings (``executorch.runtime``), XNNPACK delegate.

    Inputs are cast to the program's input dtypes (an fp16 program takes fp16 floats); outputs come back as
    float32 arrays. XNNPACK's thread pool is sized to the host's cores by the runtime itself; ``threads`` is
    recorded, not set (the Python bindings expose no setting for it). Per-op times come from the runtime's event
    tracer (ETDump), read with ``executorch.devtools.Inspector``: XNNPACK's operators by kind inside the delegate,
    and the portable kernels by name.
    """

    name = "executorch"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1

    @property
    def version(self) -> str:
        from importlib import metadata

        return metadata.version("executorch")

    def session(self, path: Path, etdump: bool = False):
        from executorch.runtime import Runtime

        kwargs = {"enable_etdump": True, "debug_buffer_size": 0} if etdump else {}
        program = Runtime.get().load_program(Path(path), **kwargs)
        return _Session(program, program.load_method("forward"))

    def _feed(self, session, inputs: tuple) -> tuple:
        import torch

        meta = session.method.metadata
        out = []
        for i, value in enumerate(inputs):
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            want = getattr(torch, _dtype_name(meta.input_tensor_meta(i).dtype()), None)
            if isinstance(want, torch.dtype) and tensor.dtype != want:
                tensor = tensor.to(want)
            out.append(tensor.contiguous())
        return tuple(out)

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        session = session or self.session(artifact.path)
        try:
            outputs = session.method.execute(self._feed(session, inputs))
        except Exception as exc:
            raise SlimxFailure("the ExecuTorch runtime", f"could not run {Path(artifact.path).name} "
                               f"({first_line(exc, 160)})", "check the input shapes against the exported range, "
                               "or run with --debug") from exc
        return [o.detach().float().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outputs]

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50, per_op: bool = True,
             profile_runs: int = 10) -> Timing:
        session = self.session(artifact.path)
        feed = self._feed(session, inputs)
        timing = Timing.measure(lambda: session.method.execute(feed), warmup, runs, runtime=self.name,
                                runtime_version=self.version, threads=self.threads)
        if per_op:
            try:
                timing.per_op, timing.per_node = self.profile(artifact, inputs, profile_runs)
            except Exception as exc:  # a runtime built without the event tracer: the timing stands without it
                timing.per_op = [{"op": "(per-op times unavailable)", "why": first_line(exc, 120)}]
        return timing

    def profile(self, artifact: Artifact, inputs: tuple, runs: int = 10, top: int = 15):
        """Per-op-kind and per-event times (ms per inference) from the runtime's ETDump."""
        import warnings

        from executorch.devtools import Inspector

        session = self.session(artifact.path, etdump=True)
        feed = self._feed(session, inputs)
        session.method.execute(feed)  # warm-up; the events of every call are averaged below
        for _ in range(runs):
            session.method.execute(feed)
        with tempfile.TemporaryDirectory(prefix="slimx-etdump-") as tmp:
            dump, debug = os.path.join(tmp, "run.etdp"), os.path.join(tmp, "debug.bin")
            session.program.write_etdump_result_to_file(dump, debug)
            with warnings.catch_warnings(), quiet():
                warnings.simplefilter("ignore")
                frame = Inspector(etdump_path=dump).to_dataframe()
        calls = runs + 1
        by_op: dict[str, dict] = {}
        by_event: dict[str, dict] = {}
        for row in frame.itertuples():
            if row.event_block_name != "Execute" or row.event_name in ("OPERATOR_CALL", "DELEGATE_CALL") \
                    or "::" in str(row.event_name):  # the method's own span (Method::execute), not an op
                continue
            raw = [float(v) for v in (row.raw or [])]
            if not raw:
                continue
            delegated = bool(row.is_delegated_op)
            kind = re.sub(r"\s*#\d+$", "", str(row.event_name))
            op = f"xnnpack: {kind}" if delegated else f"portable: {kind.removeprefix('native_call_')}"
            entry = by_op.setdefault(op, {"op": op, "ms": 0.0, "count": 0})
            entry["ms"] += sum(raw)
            entry["count"] += len(raw)
            key = f"{row.Index}:{row.event_name}"
            by_event[key] = {"node": str(row.event_name), "op": op, "ms": sum(raw)}
        total = sum(e["ms"] for e in by_op.values()) or 1.0
        ops = [{"op": e["op"], "ms": round(e["ms"] / calls, 4), "share": round(e["ms"] / total, 4),
                "count": e["count"] // calls} for e in sorted(by_op.values(), key=lambda e: -e["ms"])]
        events = sorted(by_event.values(), key=lambda e: -e["ms"])[:top]
        return ops, [{**e, "ms": round(e["ms"] / calls, 4)} for e in events]


class _Session:
    """A loaded program and its ``forward`` method (the program must outlive the method)."""

    def __init__(self, program, method) -> None:
        self.program = program
        self.method = method
