"""A numerical pre-flight of the exported program, before any conversion: what overflows, or loses its meaning, in
the precision the target computes in, where in the user's model it is, what slimx does about it, and the parity
that precision predicts for formats this machine cannot run.

Found by running the program (``torch.fx.Interpreter`` over the ExportedProgram's module) on the calibration data
(or synthetic inputs, said so):

- **constants** past the precision's range: attention-mask sentinels (``finfo(float32).min``, -1e9, -inf) that
  fp16 turns into -inf, after which a fully masked row is NaN (coremltools #1932, PR #2669);
- **activations** whose largest magnitude passes the range (fp16: 65504);
- **reductions that overflow inside an op**: LayerNorm's variance (the square of an input past about 256 passes
  fp16's range: TensorRT #2564, #1500), ``pow`` by 2, ``var``;
- **int8 outliers**: a tensor whose largest magnitude is over 100x its 99.9th percentile, which a per-tensor scale
  spends its 255 levels on.

Fixes (on by default, ``--no-fp16-fixes`` turns them off), each checked against fp32 on the same inputs and
recorded: sentinel constants become -1e4 / +1e4 (fp16-safe, still far below any real score); a LayerNorm whose
variance overflows is rescaled where its input is a linear layer's output alone (that layer's weight and bias
divided by a power of two: the norm is scale-invariant up to its eps); any other whose input fits fp16 is rescaled
by one power-of-two multiply before it, its eps scaled to match (exact); with ``--fp16-norms fp32``, or where the
input itself is past fp16, it is kept in fp32 through the target's own mechanism (CoreML: the op selector of its
fp16 compute precision; TensorRT: ``--layerPrecisions`` in ``build_engine.sh``).

The predicted parity runs the program with every op's result rounded to fp16 (parameters too; LayerNorm's variance
computed in fp16 unless kept in fp32), the way an fp16 engine stores them, against the fp32 program.
"""

from __future__ import annotations

import math

import torch

from slimx.export.program import node_module

FP16_MAX = 65504.0
SAFE_SENTINEL = 1.0e4  # what a mask sentinel becomes: fp16-safe, and exp(-1e4) is 0 in any precision
OUTLIER_RATIO = 100.0  # int8: largest magnitude over the 99.9th percentile
_MASKING = ("masked_fill", "where", "full", "fill", "scalar_tensor", "mul", "add", "sub", "rsub", "clamp",
            "maximum", "minimum", "new_full", "full_like")
_SQUARING = ("layer_norm", "native_layer_norm", "var", "var_mean", "pow")


def compute_dtype(target_name: str, precision: str) -> str:
    """The dtype an artifact computes its float ops in: fp16 for fp16 artifacts and for the float layers of
    TensorRT's int8 engines (built with --fp16 as well), else fp32."""
    if precision == "fp16" or (precision == "int8" and target_name == "tensorrt"):
        return "fp16"
    return "fp32"


def module_of(node) -> str:
    """``layer.0.attention (BertAttention)``: the innermost module a node came from."""
    found = node_module(node)
    if found is None:
        return "(model)"
    path, name = found
    return f"{path.removeprefix('L__self__.').replace('_modules.', '') or '(model)'} ({name})"


def _op(node) -> str:
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _floats(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _floats(v)


class _Ranges(torch.fx.Interpreter):
    """Records each node's largest output magnitude, and the largest squared deviation a squaring op sees."""

    def __init__(self, gm, outliers: bool = False):
        super().__init__(gm)
        self.max_abs: dict[str, float] = {}
        self.squared: dict[str, float] = {}
        self.outlier: dict[str, float] = {}
        self.input_max: dict[str, float] = {}  # a squaring op's input: its largest magnitude
        self.outliers = outliers

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function":
            for t in _floats(out):
                if t.numel():
                    m = float(t.detach().abs().max())
                    self.max_abs[n.name] = max(self.max_abs.get(n.name, 0.0), m)
                    if self.outliers and t.numel() >= 64 and m > 0:
                        q = float(torch.quantile(t.detach().abs().flatten().float()[:100000], 0.999))
                        self.outlier[n.name] = max(self.outlier.get(n.name, 0.0), m / max(q, 1e-12))
            if _op(n) in _SQUARING:
                x = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], torch.fx.Node) else None
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                    dims = -1 if _op(n) != "pow" else None
                    dev = x - x.mean(dim=dims, keepdim=True) if dims is not None else x
                    self.squared[n.name] = max(self.squared.get(n.name, 0.0), float(dev.detach().abs().max()) ** 2)
                    self.input_max[n.name] = max(self.input_max.get(n.name, 0.0), float(x.detach().abs().max()))
        return out


def _module(program):
    return program.exported.module()


def _constant_findings(gm, limit: float) -> list[dict]:
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        for i, a in enumerate(list(n.args) + list(n.kwargs.values())):
            if isinstance(a, float) and (math.isinf(a) or abs(a) > limit):
                found.append({"kind": "constant", "node": n.name, "op": _op(n), "module": module_of(n),
                              "value": a, "limit": limit, "arg": i,
                              "why": f"{a:.4g} is past fp16's range (±{limit:g}): it becomes "
                                     f"{'-' if a < 0 else ''}inf, and a fully masked row turns NaN"})
    for name, t in list(gm.named_buffers()):
        if t.is_floating_point() and t.numel() and bool((~torch.isfinite(t) | (t.abs() > limit)).any()):
            found.append({"kind": "constant", "node": name, "op": "buffer", "module": name.rsplit(".", 1)[0] or
                          "(model)", "value": float(t[~torch.isfinite(t) | (t.abs() > limit)].flatten()[0]),
                          "limit": limit, "why": f"a buffer holds values past fp16's range (±{limit:g})"})
    return found


def _inputs(batches) -> list[tuple]:
    return [tuple(torch.as_tensor(a) for a in b) for b in batches]


def preflight(program, target_name: str, precision: str, batches: list, synthetic: bool) -> dict:
    """The findings for ``program`` computed in ``target_name``'s ``precision`` (see the module text)."""
    dtype = compute_dtype(target_name, precision)
    out = {"compute_dtype": dtype, "inputs": f"{'synthetic' if synthetic else 'calibration'} inputs "
                                             f"({len(batches)} sample{'s' if len(batches) != 1 else ''})",
           "findings": []}
    if program.exported is None:
        out["skipped"] = "an ONNX input has no PyTorch graph to run"
        return out
    gm = _module(program)
    ranges = _Ranges(gm, outliers=precision == "int8")
    with torch.no_grad():
        for b in _inputs(batches):
            ranges.run(*b)
    nodes = {n.name: n for n in gm.graph.nodes}
    findings = [{"kind": "non-finite", "node": name, "op": _op(nodes[name]), "module": module_of(nodes[name]),
                 "why": "its output is inf or NaN already in fp32"}
                for name, m in ranges.max_abs.items() if not math.isfinite(m)][:10]
    if dtype == "fp16":
        findings += _constant_findings(gm, FP16_MAX)
        for name, m in ranges.max_abs.items():
            if m > FP16_MAX and math.isfinite(m):
                n = nodes[name]
                findings.append({"kind": "activation", "node": name, "op": _op(n), "module": module_of(n),
                                 "max_abs": m, "limit": FP16_MAX,
                                 "why": f"its output reaches {m:.4g}, past fp16's {FP16_MAX:g}"})
        for name, sq in ranges.squared.items():
            if sq > FP16_MAX:
                n = nodes[name]
                findings.append({"kind": "reduction", "node": name, "op": _op(n), "module": module_of(n),
                                 "max_square": sq, "input_max_abs": ranges.input_max.get(name), "limit": FP16_MAX,
                                 "why": f"{_op(n)} squares deviations up to {math.sqrt(sq):.4g}: {sq:.4g}, past "
                                        f"fp16's {FP16_MAX:g}, so its variance overflows in fp16"})
    if precision == "int8":
        for name, ratio in sorted(ranges.outlier.items(), key=lambda kv: -kv[1])[:10]:
            if ratio > OUTLIER_RATIO:
                n = nodes[name]
                findings.append({"kind": "int8 outlier", "node": name, "op": _op(n), "module": module_of(n),
                                 "ratio": ratio, "why": f"its largest magnitude is {ratio:.0f}x its 99.9th "
                                                        "percentile: a per-tensor int8 scale spends its levels on "
                                                        "the outliers"})
    out["findings"] = findings
    out["checked_nodes"] = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    return out


NORM_FIXES = ("rescale", "fp32")  # --fp16-norms: how an overflowing LayerNorm is fixed where both are possible


def run(program, target_name: str, precision: str, calib, fixes: bool = True, seed: int = 0,
        samples: int = 4, norms: str = "rescale") -> dict:
    """The pre-flight as an export runs it: findings on the calibration data (synthetic inputs without), the fixes
    for an fp16 artifact (each checked against fp32 on the same inputs) and the predicted fp16 parity with and
    without them. Records the nodes to keep in fp32 on ``program.keep_fp32`` for the target to honour.

    ``norms``: an overflowing LayerNorm whose input fits fp16 is rescaled in the graph (``"rescale"``: the norm stays
    fp16, on the fast path of every format), or kept in fp32 through the target's per-op precision (``"fp32"``:
    exact, where the format has such a mechanism; where it has none, rescaled all the same, and said so). A
    LayerNorm fed by a linear layer alone is rescaled into that layer's weights either way (no op added)."""
    if norms not in NORM_FIXES:
        raise ValueError(f"norms must be one of {NORM_FIXES}, got {norms!r}")
    from slimx.quant import calibration_batches

    batches, synthetic = calibration_batches(calib, program.inputs, count=samples, seed=seed + 9000)
    batches = batches[:samples]
    rec = preflight(program, target_name, precision, batches, synthetic)
    if rec["compute_dtype"] != "fp16" or program.exported is None:
        return rec
    hazards = [f for f in rec["findings"] if f["kind"] in ("constant", "reduction", "activation")]
    before = predicted_parity(program, batches, target_name=target_name) if hazards else None
    if fixes and hazards:
        reference = _outputs(program, batches)
        changed = fix_constants(program, rec["findings"]) + rescale_into_norms(program, rec["findings"])
        rescaled = {c["node"] for c in changed if c["fix"] == "rescaled into the LayerNorm"}
        per_op = bool(fp16_policy(target_name).get("per_op_fp32"))
        if norms == "rescale" or not per_op:
            scaled = scale_before_norms(program, rec["findings"], skip=rescaled)
            if scaled and norms == "fp32":
                rec["norms_note"] = (f"--fp16-norms fp32: a {target_name} artifact has no per-op precision to keep "
                                     "a LayerNorm in fp32; rescaled in the graph instead")
            changed += scaled
            rescaled |= {c["node"] for c in scaled}
        program.keep_fp32 = [k for k in keep_fp32(rec["findings"]) if k not in rescaled]
        nodes = {f["node"]: f for f in rec["findings"]}
        rec["fixes"] = changed + [{"fix": "kept in fp32", "node": k, "op": nodes[k]["op"],
                                   "module": nodes[k]["module"]} for k in program.keep_fp32]
        program.graph_fixed = bool(changed)
        rec["fix_check"] = _agreement(reference, _outputs(program, batches))
        rec["fix_check"]["what"] = "the fixed program against the original, both in fp32, on the same inputs"
    elif hazards:
        rec["fixes"] = []
        rec["fixes_off"] = "--no-fp16-fixes: the hazards are reported, not fixed"
    keep = getattr(program, "keep_fp32", None)
    on_data = predicted_parity(program, batches, keep, target_name)
    fresh = predicted_parity(program, _fresh(program, seed), keep, target_name)
    worst = min((on_data, fresh), key=lambda r: (r["cosine"] == r["cosine"], r["cosine"]))  # NaN first
    rec["predicted_parity"] = {**worst, "on_data": _brief(on_data, "calibration" if not synthetic else "synthetic"),
                               "fresh": _brief(fresh, "fresh random")}
    if before is not None:
        rec["predicted_parity_without_fixes"] = before
    return rec


def _fresh(program, seed: int, count: int = 2) -> list:
    from slimx._core.inputs import sample_inputs

    return [sample_inputs(program.inputs, seed=seed + 7000 + i) for i in range(count)]


def _brief(rec: dict, what: str) -> dict:
    return {"inputs": f"{rec['samples']} {what} input(s)", **{k: rec[k] for k in ("cosine", "max_abs", "rel_err",
                                                                                   "non_finite_outputs")}}


def _outputs(program, batches) -> list:
    gm = _module(program)
    with torch.no_grad():
        return [[t.detach().float().clone() for t in _floats(gm(*b))] for b in _inputs(batches)]


def _agreement(ref: list, got: list) -> dict:
    cos, max_abs = 1.0, 0.0
    for rs, gs in zip(ref, got, strict=True):
        for r, g in zip(rs, gs, strict=True):
            r1, g1 = r.flatten(), g.flatten()
            if r1.norm() > 0 and g1.norm() > 0:
                cos = min(cos, float(torch.nn.functional.cosine_similarity(r1, g1, dim=0)))
            max_abs = max(max_abs, float((r1 - g1).abs().max()))
    return {"cosine": cos, "max_abs": max_abs}


def summary_line(rec: dict) -> str:
    """One line for the export summary."""
    n = len(rec.get("findings", []))
    head = f"pre-flight ({rec['compute_dtype']}, {rec['inputs']}): "
    if rec.get("skipped"):
        return head + f"skipped ({rec['skipped']})"
    text = head + ("no hazard" if not n else f"{n} finding(s): " + "; ".join(
        f"{f['kind']} in {f['module']} ({f['op']})" for f in rec["findings"][:3]) + ("; ..." if n > 3 else ""))
    if rec.get("fixes"):
        text += f"; fixed: {len(rec['fixes'])} ({', '.join(sorted({f['fix'] for f in rec['fixes']}))})"
    if rec.get("norms_note"):
        text += f" ({rec['norms_note']})"
    pp = rec.get("predicted_parity")
    if pp:
        text += f"; predicted fp16 parity: cosine {pp['cosine']:.6f}" + (
            f" (without the fixes {rec['predicted_parity_without_fixes']['cosine']:.4f})"
            if rec.get("predicted_parity_without_fixes") and rec.get("fixes") else "")
    return text


# --------------------------------------------------------------------------- fixes


def fix_constants(program, findings: list[dict]) -> list[dict]:
    """Sentinel constants past fp16's range become ±``SAFE_SENTINEL`` in the exported graph (what every target
    converts); returns what was changed."""
    if program.exported is None:
        return []
    wanted = {(f["node"], f.get("arg")) for f in findings if f["kind"] == "constant" and f["op"] != "buffer"
              and f["op"] in _MASKING}
    done = []
    gm = program.exported.graph_module
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        args, kwargs, changed = list(n.args), dict(n.kwargs), False
        keys = list(kwargs)
        for i in range(len(args) + len(keys)):
            key = (n.name, i)
            value = args[i] if i < len(args) else kwargs[keys[i - len(args)]]
            if key in wanted and isinstance(value, float):
                new = math.copysign(SAFE_SENTINEL, value)
                if i < len(args):
                    args[i] = new
                else:
                    kwargs[keys[i - len(args)]] = new
                done.append({"fix": "fp16-safe constant", "node": n.name, "op": _op(n), "module": module_of(n),
                             "from": value, "to": new})
                changed = True
        if changed:
            n.args, n.kwargs = tuple(args), kwargs
    if done:
        gm.recompile()
    return done


def _norm_overflow(findings: list[dict], node: str) -> dict | None:
    """The finding of a LayerNorm node whose fp16 variance overflows, if any."""
    return next((f for f in findings if f["kind"] == "reduction" and f["node"] == node
                 and f["op"] in ("layer_norm", "native_layer_norm")), None)


def rescale_into_norms(program, findings: list[dict]) -> list[dict]:
    """A LayerNorm is blind to the scale of its input (up to its eps): where the overflowing input is a linear
    layer's output that nothing else reads, that layer's weight and bias are divided by a power of two that brings
    the largest deviation under 128 (squares under 16384), so the norm stays in fp16 and the model's meaning
    holds. New tensors replace the parameters in the exported program (the PyTorch module keeps its own).
    Returns the fixes; their nodes need no fp32 fallback."""
    if program.exported is None:
        return []
    ep = program.exported
    params = dict(ep.graph_signature.inputs_to_parameters)
    done = []
    for n in ep.graph_module.graph.nodes:
        f = _norm_overflow(findings, n.name)
        src = n.args[0] if f is not None and n.args and isinstance(n.args[0], torch.fx.Node) else None
        if src is None or _op(src) != "linear" or len(src.users) != 1:
            continue
        names = [params.get(a.name) for a in src.args[1:3] if isinstance(a, torch.fx.Node)]
        if not names or None in names:
            continue
        scale = 2.0 ** math.ceil(math.log2(math.sqrt(f["max_square"]) / 128.0))
        for name in names:
            ep.state_dict[name] = torch.nn.Parameter(ep.state_dict[name].detach().clone() / scale,
                                                     requires_grad=False)
        done.append({"fix": "rescaled into the LayerNorm", "node": n.name, "op": _op(n), "module": module_of(n),
                     "producer": module_of(src), "divided_by": scale,
                     "why": f"{module_of(src)}'s weight and bias / {scale:g}: the norm's input deviations fall "
                            f"under 128, and a LayerNorm is scale-invariant up to its eps"})
    return done


_LN_DEFAULTS = (None, None, None, None, 1e-5)  # aten.layer_norm / native_layer_norm: input, shape, weight, bias, eps


def scale_before_norms(program, findings: list[dict], skip: set[str] = frozenset()) -> list[dict]:
    """Any other overflowing LayerNorm whose input itself fits fp16 (a residual sum, say): its input is multiplied
    by a power of two ``1/s`` in the graph (one elementwise op: exact in floating point) and its eps divided by
    ``s**2``, so ``LN(x / s, eps / s**2) == LN(x, eps)`` while the squares of the deviations stay under 16384. Every
    format converts the op, so this fixes the norm where no per-op fp32 exists (CoreML's neuralnetwork backend,
    LiteRT's GPU delegate, ExecuTorch, onnxruntime fp16) and keeps it on the fp16 path where one does (an fp32 op
    in an fp16 Core ML program leaves the Neural Engine). Returns the fixes."""
    if program.exported is None:
        return []
    gm = program.exported.graph_module
    done = []
    for n in list(gm.graph.nodes):
        f = _norm_overflow(findings, n.name)
        if f is None or n.name in skip or not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        if not f.get("input_max_abs") or f["input_max_abs"] > FP16_MAX:
            continue  # the input is past fp16 already: only an fp32 norm (and producer) can hold it
        src = n.args[0]
        scale = 2.0 ** math.ceil(math.log2(math.sqrt(f["max_square"]) / 128.0))
        args = list(n.args) + list(_LN_DEFAULTS[len(n.args):])
        eps = float(n.kwargs.get("eps", args[4]))
        with gm.graph.inserting_before(n):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (src, 1.0 / scale))
        scaled.meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        if "val" in src.meta:
            scaled.meta["val"] = src.meta["val"]
        args[0], args[4] = scaled, eps / scale ** 2
        n.args, n.kwargs = tuple(args), {k: v for k, v in n.kwargs.items() if k != "eps"}
        done.append({"fix": "rescaled before the LayerNorm", "node": n.name, "op": _op(n), "module": module_of(n),
                     "divided_by": scale, "eps": eps / scale ** 2,
                     "why": f"its input times 1/{scale:g} (one op) and its eps / {scale ** 2:g}: the same norm, "
                            "whose squared deviations now fit fp16"})
    if done:
        gm.recompile()
    return done


def keep_fp32(findings: list[dict]) -> list[str]:
    """The nodes to keep in fp32: the reductions whose fp16 variance overflows."""
    return sorted({f["node"] for f in findings if f["kind"] == "reduction"})


# --------------------------------------------------------------------------- predicted parity


# how each format's fp16 artifact computes, as far as it matters here: whether op results are fp16 (or only the
# weights, dequantized to fp32 on the CPU: LiteRT's fp16 weights), whether out-of-range constants are cast to
# -inf/inf (coremltools) or clamped to ±65504 (onnxruntime's float16 converter, TensorRT's weight clamping), and
# whether LayerNorm accumulates its variance in fp16 (Neural Engine, TensorRT fp16 layers) or in fp32 (onnxruntime's
# CPU kernel), and whether the format can keep one op in fp32 inside an fp16 artifact (``per_op_fp32``: Core ML's
# compute-precision op selector on an ML Program, TensorRT's layer precisions; LiteRT's GPU delegate, ExecuTorch's
# half program and onnxruntime's float16 conversion here have no such switch)
FP16_POLICIES = {
    "coreml": {"results": True, "constants": "cast", "layer_norm": "fp16", "per_op_fp32": True},
    "tensorrt": {"results": True, "constants": "clamp", "layer_norm": "fp16", "per_op_fp32": True},
    "onnx": {"results": True, "constants": "clamp", "layer_norm": "fp32 inside"},
    "tflite": {"results": False, "constants": "clamp", "layer_norm": "fp32 inside"},
}


def fp16_policy(target_name: str) -> dict:
    """How ``target_name``'s fp16 artifact computes: the target's own ``fp16_policy`` (a target outside this table
    declares it), else ``FP16_POLICIES``, else the strictest (CoreML's)."""
    from slimx.targets import TARGETS

    own = getattr(TARGETS.get(target_name), "fp16_policy", None) if target_name in TARGETS else None
    return own or FP16_POLICIES.get(target_name, FP16_POLICIES["coreml"])


class _Fp16(torch.fx.Interpreter):
    """The program as an fp16 artifact of a format computes it (``FP16_POLICIES``): results and parameters rounded
    to fp16 (overflow to inf), constants cast or clamped, LayerNorm's variance from fp16 squares where the format
    does so, except in the nodes kept in fp32."""

    def __init__(self, gm, keep: set[str], policy: dict):
        super().__init__(gm)
        self.keep = keep
        self.policy = policy

    def run_node(self, n):
        p = self.policy
        if n.op == "get_attr":
            return _round(super().run_node(n))
        if n.op != "call_function" or not p["results"]:
            return super().run_node(n)
        if _op(n) in ("layer_norm", "native_layer_norm") and n.name not in self.keep and p["layer_norm"] == "fp16":
            args = self.map_nodes_to_values(n.args, n)
            return _fp16_layer_norm(*args)
        with self._set_current_node(n):  # constants are fp16 in an fp16 graph too
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            clamp = p["constants"] == "clamp"
            out = self.call_function(n.target, _half_scalars(args, clamp), _half_scalars(kwargs, clamp))
        return _round(out)


def _half_scalars(value, clamp: bool = False):
    if isinstance(value, float):
        value = max(min(value, FP16_MAX), -FP16_MAX) if clamp else value
        return float(torch.tensor(value, dtype=torch.float16))
    if isinstance(value, tuple):
        return tuple(_half_scalars(v, clamp) for v in value)
    if isinstance(value, list):
        return [_half_scalars(v, clamp) for v in value]
    if isinstance(value, dict):
        return {k: _half_scalars(v, clamp) for k, v in value.items()}
    return value


def _round(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float16).to(value.dtype)
    if isinstance(value, tuple):
        return tuple(_round(v) for v in value)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _fp16_layer_norm(x, shape, weight=None, bias=None, eps=1e-5, *rest):
    dims = tuple(range(-len(shape), 0))
    h = lambda t: t.to(torch.float16).to(torch.float32)  # noqa: E731
    mean = h(x.mean(dim=dims, keepdim=True))
    dev = h(x - mean)
    var = h(h(dev * dev).mean(dim=dims, keepdim=True))
    y = h(dev / torch.sqrt(var + eps))
    if weight is not None:
        y = h(y * weight)
    if bias is not None:
        y = h(y + bias)
    return y


def predicted_parity(program, batches: list, keep: list[str] | None = None, target_name: str = "coreml") -> dict:
    """The program's outputs as ``target_name``'s fp16 artifact computes them (``FP16_POLICIES``) against its fp32
    outputs on ``batches`` (cosine, max abs, relative error, non-finite outputs)."""
    gm = _module(program)
    policy = fp16_policy(target_name)
    fp16 = _Fp16(gm, set(keep or ()), policy)
    cos, max_abs, rel, bad = 1.0, 0.0, 0.0, 0
    with torch.no_grad():
        for b in _inputs(batches):
            ref = [t.float() for t in _floats(gm(*b))]
            got = [t.float() for t in _floats(fp16.run(*b))]
            for r, g in zip(ref, got, strict=True):
                if not bool(torch.isfinite(g).all()):
                    bad += 1
                    cos = float("nan")
                    continue
                r1, g1 = r.flatten(), g.flatten()
                c = float(torch.nn.functional.cosine_similarity(r1, g1, dim=0)) if r1.norm() > 0 else 1.0
                cos = min(cos, c) if not math.isnan(cos) else cos
                d = float((r1 - g1).abs().max())
                max_abs = max(max_abs, d)
                rel = max(rel, d / max(float(r1.abs().max()), 1e-12))
    how = ("every op's result rounded to fp16" if policy["results"] else "fp16 weights, fp32 compute") + (
        f", constants {'clamped to ±65504' if policy['constants'] == 'clamp' else 'cast (past ±65504: inf)'}, "
        f"LayerNorm variance {'in fp16 unless kept in fp32' if policy['layer_norm'] == 'fp16' else 'in fp32'}")
    return {"predicted": True, "method": f"the exported program as a {target_name} fp16 artifact computes it "
                                         f"({how}), against fp32",
            "samples": len(batches), "cosine": cos, "max_abs": max_abs, "rel_err": rel, "non_finite_outputs": bad}
