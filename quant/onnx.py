"""ONNX quantization with onnxruntime.quantization: static QDQ int8, dynamic int8, fp16."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure, UsageError, first_line
from slimx.quant.base import QuantConfig, QuantContext, register_quantizer, require_symmetric_calibrated

# the compute-heavy ops: quantizing gathers, softmax and adds costs accuracy for no speed
COMPUTE_OPS = ("MatMul", "Gemm", "Conv")


class _Reader:
    """onnxruntime's CalibrationDataReader over slimx input batches."""

    def __init__(self, names: list[str], dtypes: dict, batches: list[tuple]) -> None:
        self._items = []
        for batch in batches:
            feed = {}
            for name, value in zip(names, batch, strict=True):
                arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                feed[name] = arr.astype(dtypes.get(name, arr.dtype))
            self._items.append(feed)
        self._iter = iter(self._items)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._items)


def quantize_onnx(src: Path, dst: Path, precision: str, batches: list[tuple] | None = None,
                  symmetric: bool = False, op_types: tuple[str, ...] | None = None,
                  keep_float_modules: dict[str, float] | None = None, reduce_range: bool = False,
                  per_channel: bool = True, nodes_to_quantize: list[str] | None = None,
                  weight_type: str = "int8") -> dict:
    """Write a quantized copy of ``src`` to ``dst``; return a record of what was done.

    Args:
        precision: ``int8`` (static QDQ from ``batches``), ``int8-weights`` (dynamic: int8 weights,
            activations quantized at run time), ``fp16`` (float16 weights and compute, fp32 I/O).
        symmetric: symmetric int8 activations and weights (what TensorRT's explicit quantization
            expects); otherwise uint8 asymmetric activations, which suit onnxruntime's CPU kernels.
        op_types: restrict quantization to these ONNX op types (e.g. MatMul, Gemm, Conv).
        keep_float_modules: PyTorch module paths (from ``quant.sensitivity``) whose ONNX nodes stay float.
        per_channel: per-channel weight scales (else per tensor).
        reduce_range: 7-bit weights, onnxruntime's remedy for u8s8 saturation in its x86 CPU kernels (in a
            trial here MiniLM u8s8 fell to cosine 0.37 without it, 0.93 with it, before the guard).
    """
    import onnx

    tmp = dst.with_name(f".{dst.name}.partial")
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's "consider pre-processing" notes
    try:
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            onnx.save(model, str(tmp))
            record = {"method": "onnxruntime.transformers.float16 (fp32 I/O kept)"}
        elif precision == "int8-weights":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(tmp), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QUInt8 if weight_type == "uint8" else QuantType.QInt8,
                             op_types_to_quantize=list(op_types) if op_types else None,
                             nodes_to_quantize=nodes_to_quantize)
            record = {"method": f"onnxruntime.quantization.quantize_dynamic ({weight_type} "
                                f"{_granularity(per_channel)} weights{', reduced range' if reduce_range else ''})"}
        elif precision == "int8":
            if not batches:
                raise UsageError("--precision int8", "needs calibration data", "give --calib")
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

            model = onnx.load(str(src), load_external_data=False)
            names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
            dtypes = {i.name: _np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
            act = QuantType.QInt8 if symmetric else QuantType.QUInt8
            excluded = _nodes_of_modules(src, keep_float_modules or {})
            quantize_static(
                str(src), str(tmp), _Reader(names, dtypes, batches), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=list(op_types) if op_types else None,
                nodes_to_exclude=excluded,
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            )
            record = {"method": "onnxruntime.quantization.quantize_static, QDQ, "
                                f"{_granularity(per_channel)} int8 weights"
                                f"{' (reduced range)' if reduce_range else ''}, "
                                f"{'symmetric int8' if symmetric else 'asymmetric uint8'} activations (MinMax)",
                      "calibration_samples": len(batches),
                      "kept_float": {"modules": keep_float_modules or {}, "onnx_nodes": len(excluded),
                                     "why": "input SQNR under per-tensor int8 below the floor (quant.sensitivity)"}}
        else:
            raise UsageError(f"--precision {precision}", "is not an ONNX quantization",
                             "use fp16, int8 or int8-weights")
        os.replace(tmp, dst)
    except (UsageError, SlimxFailure):
        raise
    except Exception as exc:
        raise SlimxFailure(f"ONNX {precision} quantization", first_line(exc),
                           "try another --precision, or run with --debug") from exc
    finally:
        logging.getLogger().setLevel(root_level)
        tmp.unlink(missing_ok=True)
        for extra in dst.parent.glob(f".{dst.name}.partial*"):
            extra.unlink(missing_ok=True)
    record["qdq_nodes"] = count_qdq(dst)
    return record


def _nodes_of_modules(path: Path, modules: dict) -> list[str]:
    """ONNX compute nodes that came from the given PyTorch modules (exporter metadata)."""
    if not modules:
        return []
    import onnx

    from slimx.export.program import onnx_node_modules

    owners = onnx_node_modules(path)
    compute = {n.name for n in onnx.load(str(path), load_external_data=False).graph.node
               if n.op_type in ("MatMul", "Gemm", "Conv")}
    return sorted(n for n, mod in owners.items() if n in compute and mod in modules)


def count_qdq(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


def _np_dtype(elem_type: int):
    return {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32, 9: np.bool_}.get(elem_type, np.float32)


def _granularity(per_channel: bool) -> str:
    return "per-channel" if per_channel else "per-tensor"


def quantize_onnx_guarded(src: Path, dst: Path, batches: list[tuple], module, cfg: QuantConfig, *, symmetric: bool,
                          reduce_range: bool = False, op_types: tuple[str, ...] | None = None,
                          score_runner=None) -> dict:
    """Static int8 with an accuracy guard: layers stay float, most sensitive first, until the quantized
    graph's outputs on the calibration data reach ``cfg.target_cosine`` against the PyTorch model.

    Round 0 keeps the layers under the SQNR floor (``quant.sensitivity``) and those ``cfg.keep_float`` names;
    each further round adds the ``cfg.guard_step`` next-lowest-SQNR layers. Every round is recorded.
    ``score_runner()`` makes the runner that scores each round's graph (the calling target's: TensorRT's runs
    Q/DQ pairs unfused, its engine's arithmetic, rather than onnxruntime's int8 kernels); without one the
    guard cannot score and keeps round 0.
    """
    from slimx.export.parity import torch_outputs
    from slimx.quant.sensitivity import guarded_int8

    reference = [torch_outputs(module, b) for b in batches] if module is not None else None
    float_copy = dst.with_name(f".{dst.name}.fp32")  # every round starts from the float graph
    shutil.copyfile(src, float_copy)

    def quantize_and_score(keep):
        record = quantize_onnx(float_copy, dst, "int8", batches, symmetric=symmetric, op_types=op_types,
                               keep_float_modules=keep, reduce_range=reduce_range, per_channel=cfg.per_channel)
        if reference is None or score_runner is None:
            return record, None
        return record, _mean_cosine(dst, batches, reference, score_runner())

    try:
        record, _keep, guard = guarded_int8(module, batches, quantize_and_score, cfg.target_cosine, cfg.guard_step,
                                            cfg.guard_rounds, always_float=cfg.kept_by_user(module))
    finally:
        float_copy.unlink(missing_ok=True)
    record["guard"] = guard
    return record


def _mean_cosine(path: Path, batches: list[tuple], reference: list[list[np.ndarray]], runner) -> float:
    """Mean over batches of the first output's cosine to ``reference`` (the float model's outputs)."""
    from slimx.export.parity import compare_outputs

    session = runner.session(path)
    cosines = []
    for batch, ref in zip(batches, reference, strict=True):
        got = session.run(None, runner.feed(session, batch))
        cosines.append(compare_outputs(ref[:1], got[:1])["cosine"])
    return float(np.mean(cosines))


# --- the registered schemes -------------------------------------------------------------------------------


@register_quantizer("onnx", "fp16", "fp16")
def onnx_fp16(path: Path, cfg: QuantConfig, ctx: QuantContext):
    """float16 graph (onnxruntime's converter), fp32 inputs and outputs kept."""
    return path, quantize_onnx(path, path, "fp16")


@register_quantizer("onnx", "dynamic", "int8-weights")
def onnx_dynamic(path: Path, cfg: QuantConfig, ctx: QuantContext):
    """int8 weights, activations quantized at run time. Per-channel scales only where a weight loses too much
    per tensor (``per_channel_below_db``): on MiniLM the per-channel kernels cost about 2-5% and only 8 of 18
    weights (the FFN output projections first, 8-26 dB per tensor) need them; per tensor everywhere gave cosine
    0.963, per channel everywhere 0.9918. The fused attention's packed QKV weight is per channel too: per tensor it
    was about 1% faster at real lengths, but MiniLM's parity at 512 tokens fell to cosine 0.9796 (per channel
    0.987, as shipped; the floor is 0.98).

    The weights' type and range are chosen per CPU kind by measured error, not assumed: the candidates for this
    CPU (``weight_candidates``) are tried in order and the first whose outputs on fresh inputs, run here in
    onnxruntime, reach ``target_cosine`` plus a margin against the float graph is kept (else the closest). On a
    CPU with VNNI the first, 8-bit int8, passes (7-bit per tensor cost MiniLM cosine 0.99 -> 0.88); without VNNI
    onnxruntime's u8s8 kernels saturate, and the 7-bit remedy cost MiniLM parity (cosine 0.9739 at 128 tokens on
    an AVX2 EPYC), so uint8 weights (its u8u8 kernels, which do not saturate) come first there."""
    if cfg.weight_type is not None or cfg.reduce_range is not None:
        kind = cfg.weight_type or "int8"
        reduce = (not cpu_has_vnni()) if cfg.reduce_range is None else cfg.reduce_range
        return path, _dynamic(path, cfg, kind, reduce)
    cpu = cfg.cpu_kind or ("vnni" if cpu_has_vnni() else "avx2")
    candidates = weight_candidates(cpu)
    if ctx.specs is None or len(candidates) == 1:
        return path, _dynamic(path, cfg, *candidates[0])
    floor = cfg.target_cosine + 0.005
    float_copy = path.with_name(f".{path.name}.fp32")
    shutil.copyfile(path, float_copy)
    tried, chosen = [], None
    try:
        inputs = _probe_inputs(ctx)
        reference = _ort_outputs(float_copy, inputs, ctx.input_names)
        best = None
        for kind, reduce in candidates:
            shutil.copyfile(float_copy, path)
            record = _dynamic(path, cfg, kind, reduce)
            outputs = _ort_outputs(path, inputs, ctx.input_names)
            cosine = min(_first_cosine(ref, got) for ref, got in zip(reference, outputs, strict=True))
            tried.append({"weights": kind, "reduced_range": reduce, "cosine": round(cosine, 6)})
            if best is None or cosine > best[0]:
                best = (cosine, kind, reduce, record)
            if cosine >= floor:
                chosen = (kind, reduce, record)
                break
        if chosen is None:  # none reached the margin: the closest, quantized again (the file holds the last)
            _, kind, reduce, _ = best
            shutil.copyfile(float_copy, path)
            chosen = (kind, reduce, _dynamic(path, cfg, kind, reduce))
    finally:
        float_copy.unlink(missing_ok=True)
    record = chosen[2]
    record["weight_choice"] = {"cpu_kind": cpu, "forced": cfg.cpu_kind is not None, "floor": round(floor, 4),
                               "tried": tried, "chosen": {"weights": chosen[0], "reduced_range": chosen[1]},
                               "inputs": f"{len(inputs)} fresh inputs at the export shape, against the float graph "
                                         "in onnxruntime here"}
    return path, record


def weight_candidates(cpu_kind: str) -> list[tuple[str, bool]]:
    """(weight type, reduced range) to try for dynamic int8 on a CPU kind, the expected fastest first.

    Example:
        >>> weight_candidates("avx2")
        [('uint8', False), ('int8', True)]
    """
    if cpu_kind == "vnni":
        return [("int8", False), ("uint8", False), ("int8", True)]
    return [("uint8", False), ("int8", True)]


def _dynamic(path: Path, cfg: QuantConfig, kind: str, reduce: bool) -> dict:
    """Dynamic int8 of ``path`` in place: per-channel scales where a weight needs them, per tensor elsewhere."""
    if not cfg.per_channel or cfg.per_channel_below_db is None:
        record = quantize_onnx(path, path, "int8-weights", reduce_range=reduce, per_channel=cfg.per_channel,
                               weight_type=kind)
        record["reduced_range"] = reduce
        return record
    sqnr = per_tensor_weight_sqnr(path, reduce)
    fused = sorted(n.name for n in _onnx_nodes(path) if n.op_type == "Attention")
    fine = sorted(n for n, db in sqnr.items() if db < cfg.per_channel_below_db) + fused
    if not fine:
        record = quantize_onnx(path, path, "int8-weights", reduce_range=reduce, per_channel=False, weight_type=kind)
    elif len(fine) == len(sqnr) + len(fused):
        record = quantize_onnx(path, path, "int8-weights", reduce_range=reduce, per_channel=True, weight_type=kind)
    else:  # the per-channel layers first (the fused attention among them), then the rest per tensor: the second
        # pass leaves the nodes the first one quantized alone
        quantize_onnx(path, path, "int8-weights", reduce_range=reduce, per_channel=True, nodes_to_quantize=fine,
                      weight_type=kind)
        record = quantize_onnx(path, path, "int8-weights", reduce_range=reduce, per_channel=False, weight_type=kind)
    record["method"] = (f"onnxruntime.quantization.quantize_dynamic ({kind}{' 7-bit' if reduce else ''} weights: "
                        f"per-channel for {len(fine) - len(fused)} of {len(sqnr)} MatMul weights, those under "
                        f"{cfg.per_channel_below_db:g} dB per tensor, and the {len(fused)} fused attentions; "
                        f"per-tensor for the rest)")
    record["per_channel_nodes"] = {n: round(sqnr[n], 1) if n in sqnr else "fused attention" for n in fine}
    record["reduced_range"] = reduce
    return record


def _probe_inputs(ctx: QuantContext) -> list[tuple]:
    """Fresh inputs at the export shape (a text model's mask all real: the longest work), and two calibration
    batches where given."""
    from slimx._core.inputs import sample_inputs

    inputs = []
    for seed in (11, 12):
        batch = sample_inputs(ctx.specs, seed=seed)
        inputs.append(tuple(x.fill_(1) if s.kind == "mask" else x for s, x in zip(ctx.specs, batch, strict=True)))
    return inputs + list((ctx.batches or [])[:2])


def _ort_outputs(path: Path, inputs: list[tuple], names: list[str]) -> list[np.ndarray]:
    """The first output of ``path`` in onnxruntime (CPU) on each batch (inputs the graph does not take are
    dropped, as the exporter drops unused ones)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    taken = {i.name for i in session.get_inputs()}
    return [session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, batch, strict=True)
                               if n in taken})[0] for batch in inputs]


def _first_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX-512 or AVX) int8 dot products, which keep onnxruntime's u8s8 kernels
    from saturating; False where the flags cannot be read."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _onnx_nodes(path: Path):
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def per_tensor_weight_sqnr(path: Path, reduce_range: bool) -> dict[str, float]:
    """SQNR (dB) of each MatMul's constant weight under symmetric per-tensor int8 (7-bit with ``reduce_range``).

    Example:
        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> w = np.ones((4, 4), np.float32); w[0, 0] = 1000  # one outlier: per tensor, the rest round to zero
        >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(w, "w")])
        >>> import onnx, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"; onnx.save(helper.make_model(g), p)
        >>> round(per_tensor_weight_sqnr(p, False)["mm"])  # the outlier carries the energy; the ones are lost
        48
        >>> import shutil; shutil.rmtree(p.parent)
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name: t for t in model.graph.initializer}
    levels = 63 if reduce_range else 127
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        scale = np.abs(w).max() / levels
        if scale == 0:
            continue
        err = w - np.clip(np.round(w / scale), -levels, levels) * scale
        out[node.name] = float(10 * np.log10((w ** 2).sum() / max((err ** 2).sum(), 1e-30)))
    return out


@register_quantizer("onnx", "static-qdq", "int8")
def onnx_static(path: Path, cfg: QuantConfig, ctx: QuantContext):
    """Static QDQ on the compute ops with the accuracy guard: asymmetric uint8 activations and reduced-range
    weights by default, what onnxruntime's CPU kernels run well."""
    if not ctx.batches:
        raise UsageError("--precision int8", "needs calibration data", "give --calib")
    return path, quantize_onnx_guarded(path, path, ctx.batches, ctx.module, cfg, symmetric=bool(cfg.symmetric),
                                       reduce_range=True if cfg.reduce_range is None else cfg.reduce_range,
                                       op_types=COMPUTE_OPS, score_runner=ctx.score_runner)


@register_quantizer("tensorrt", "qdq", "int8")
def tensorrt_qdq(path: Path, cfg: QuantConfig, ctx: QuantContext):
    """Explicit symmetric Q/DQ on the compute ops with the accuracy guard (TensorRT's quantization is
    symmetric; its builder takes the scales as written)."""
    require_symmetric_calibrated(cfg, ctx, "TensorRT's int8 is symmetric")
    return path, quantize_onnx_guarded(path, path, ctx.batches, ctx.module, cfg, symmetric=True,
                                       reduce_range=bool(cfg.reduce_range), op_types=COMPUTE_OPS,
                                       score_runner=ctx.score_runner)
