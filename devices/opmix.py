"""The op mix of an exported program: every op's class, FLOPs and bytes moved, and the module it came from.

This is what the latency estimator prices. It reads the ``torch.export`` graph (shapes and dtypes from
each node's fake-tensor metadata), so it works for any model slimx can export, before any converter runs.
Pure views (reshape, unsqueeze, ...) cost nothing and are dropped; ops that copy data in every runtime
(permute, cat, slice, gather) are counted as data movement.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# op class -> ATen op names (without overload). Anything with a tensor output not listed here is priced
# as an elementwise op, which is the right order of magnitude for the long tail.
_CLASSES = {
    "matmul": ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum"),
    "conv": ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"),
    "norm": ("layer_norm", "native_layer_norm", "batch_norm", "native_batch_norm", "group_norm",
             "native_group_norm", "rms_norm", "_native_batch_norm_legit_no_training", "instance_norm"),
    "softmax": ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"),
    "activation": ("gelu", "relu", "relu_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid",
                   "hardsigmoid_", "sigmoid", "tanh", "erf", "leaky_relu", "elu", "hardtanh", "hardtanh_",
                   "clamp", "clamp_min", "clamp_max", "exp", "log", "mish", "softplus", "gelu_"),
    "reduce": ("mean", "sum", "amax", "amin", "max", "min", "var", "std", "avg_pool1d", "avg_pool2d",
               "max_pool1d", "max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool1d",
               "adaptive_avg_pool2d", "adaptive_max_pool2d", "norm", "linalg_vector_norm", "argmax", "cumsum"),
    "move": ("permute", "transpose", "cat", "stack", "contiguous", "clone", "pad", "constant_pad_nd", "roll",
             "repeat", "index", "index_select", "embedding", "gather", "slice", "split", "split_with_sizes",
             "chunk", "unbind", "flip", "pixel_shuffle", "pixel_unshuffle", "upsample_nearest2d",
             "upsample_bilinear2d", "interpolate", "narrow", "tile", "_to_copy", "to", "type_as", "masked_fill",
             "scatter", "index_put", "new_zeros", "new_ones", "zeros_like", "ones_like", "full_like"),
}
_FREE = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "alias", "detach", "t", "expand",
         "expand_as", "select", "getitem", "dropout", "lift_fresh_copy", "view_as", "unflatten", "numpy_T",
         "sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar", "zeros", "ones",
         "full", "arange", "empty", "scalar_tensor", "feature_dropout", "alpha_dropout", "sym_constrain_range",
         "sym_constrain_range_for_size", "_assert_async", "item", "size", "dim", "contiguous_format"}
_OP_OF = {op: cls for cls, ops in _CLASSES.items() for op in ops}
# FLOPs per output element of vector ops (rough instruction counts: erf and exp are polynomials, relu one max)
_FLOPS_PER_ELEMENT = {"activation": 8, "softmax": 5, "norm": 8, "elementwise": 1, "reduce": 1, "move": 0}
_ACTIVATION_FLOPS = {"relu": 1, "relu_": 1, "hardtanh": 2, "hardtanh_": 2, "clamp": 2, "clamp_min": 1, "clamp_max": 1,
                     "leaky_relu": 2, "hardswish": 4, "hardswish_": 4, "hardsigmoid": 3, "hardsigmoid_": 3,
                     "sigmoid": 12, "silu": 13, "silu_": 13, "tanh": 12, "elu": 12, "exp": 10, "log": 10,
                     "gelu": 24, "gelu_": 24, "erf": 20, "mish": 30, "softplus": 22}
# activations every runtime here folds into the conv/matmul before it (ORT FusedConv/FusedGemm, TFLite fused
# activation functions, TensorRT and CoreML layer fusion): priced as free when they follow one directly
_FUSABLE = {"relu", "relu_", "hardtanh", "hardtanh_", "clamp", "clamp_min", "clamp_max", "leaky_relu", "sigmoid"}
_POOLS = ("avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d", "max_pool2d_with_indices")
OP_CLASSES = ("matmul", "conv", "depthwise", "attention", "mask", "norm", "softmax", "activation", "elementwise",
              "reduce", "move")
COMPUTE_CLASSES = ("matmul", "conv", "depthwise", "attention", "mask")


@dataclass
class OpCost:
    """One op of a program, priced in work: FLOPs and bytes read + written (at the program's own dtypes)."""

    node: str
    op: str
    op_class: str
    flops: float
    bytes: float
    float_bytes: float  # the part of ``bytes`` in floating-point tensors (scaled when the target is fp16/int8)
    module: str
    fusable: bool = False  # a residual add straight after a conv: free where the runtime fuses conv + add

    def to_dict(self) -> dict:
        return asdict(self)


# sympy symbol -> size: the values a dynamic program's symbolic sizes are priced at (set by op_mix)
_SYMBOL_VALUES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("symbol_values", default=None)


def _size(value) -> int:
    """A static size, or a symbolic one evaluated at the values op_mix is pricing (TypeError if it cannot be)."""
    node = getattr(value, "node", None)
    if node is None or not hasattr(node, "expr"):
        return int(value)
    return int(node.expr.xreplace(_SYMBOL_VALUES.get() or {}))


def symbol_values(exported, length: int | None = None) -> dict:
    """The symbols of a dynamic program's input sizes, each at its export example's size, or, with ``length``,
    the sequence axis (axis 1) at ``length``: what the program is priced at."""
    graph = exported.graph_module.graph if hasattr(exported, "graph_module") else exported.graph
    values = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        shape = getattr(node.meta.get("val"), "shape", ())
        for axis, size in enumerate(shape):
            sym_node = getattr(size, "node", None)
            if sym_node is None or not hasattr(sym_node, "expr"):
                continue
            env = getattr(sym_node, "shape_env", None)
            for symbol in sym_node.expr.free_symbols:
                if symbol in values:
                    continue
                if length is not None and axis == 1:
                    values[symbol] = length
                elif env is not None and symbol in env.var_to_val:
                    values[symbol] = int(env.var_to_val[symbol])
    return values


def _base_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    name = name.split(".")[-2] if name.count(".") >= 2 and name.startswith("aten") else name
    return name.split(".")[0]


def _tensor_meta(value):
    """(numel, element bytes, is_float) of a fake tensor, or None for non-tensors."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        numel = math.prod(_size(s) for s in shape)
    except TypeError:  # a symbolic size with no value to put in
        return None
    return numel, dtype.itemsize, dtype.is_floating_point


def _tensors(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    else:
        meta = _tensor_meta(value)
        if meta is not None:
            yield value, meta


def _arg_vals(node):
    out = []
    for arg in node.args:
        items = arg if isinstance(arg, (list, tuple)) else [arg]
        for item in items:
            if hasattr(item, "meta") and "val" in item.meta:
                out.append(item.meta["val"])
    return out


def _conv_class(ins: list) -> str:
    """Grouped (depthwise-like) when the weight sees fewer input channels than the input has."""
    if len(ins) < 2 or len(ins[0].shape) < 2 or len(ins[1].shape) < 2:
        return "conv"
    return "depthwise" if _size(ins[1].shape[1]) < _size(ins[0].shape[1]) else "conv"


def _flops(cls: str, node, ins: list, out_numel: int) -> float:
    if cls == "matmul":
        first = ins[1] if _base_name(node.target) in ("addmm", "baddbmm") else ins[0]
        k = _size(first.shape[-1]) if len(first.shape) else 1
        return 2.0 * out_numel * k
    if cls in ("conv", "depthwise"):
        weight = ins[1]
        per_output = math.prod(_size(s) for s in weight.shape[1:])  # (Cin/groups) * kh * kw
        return 2.0 * out_numel * per_output
    if cls == "attention":
        q, k = ins[0], ins[1]
        scores = math.prod(_size(s) for s in q.shape[:-1]) * _size(k.shape[-2])
        return 2.0 * scores * _size(q.shape[-1]) * 2 + 5.0 * scores
    name = _base_name(node.target)
    if cls == "reduce":
        if name in _POOLS and len(node.args) > 1:
            kernel = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            return float(out_numel * math.prod(int(k) for k in kernel))
        return float(sum(_tensor_meta(v)[0] for v in ins[:1])) if ins else float(out_numel)
    if cls == "activation":
        return float(_ACTIVATION_FLOPS.get(name, 8) * out_numel)
    return float(_FLOPS_PER_ELEMENT.get(cls, 1) * out_numel)


def op_mix(exported, length: int | None = None) -> list[OpCost]:
    """Price every op of an ExportedProgram (or its graph module); a dynamic program at its export example's
    sizes, or with ``length`` its sequence axis at that length (``symbol_values``).

    Example:
        >>> import torch
        >>> ep = torch.export.export(torch.nn.Linear(64, 32), (torch.randn(4, 64),))
        >>> [(c.op_class, c.flops) for c in op_mix(ep)]
        [('matmul', 16384.0)]
    """
    token = _SYMBOL_VALUES.set(symbol_values(exported, length))
    try:
        return _op_mix(exported)
    finally:
        _SYMBOL_VALUES.reset(token)


def _op_mix(exported) -> list[OpCost]:
    from slimx.export.program import node_module_path

    graph = exported.graph_module.graph if hasattr(exported, "graph_module") else exported.graph
    costs = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = _base_name(node.target)
        if name in _FREE or name.startswith(("sym_", "_assert")):
            continue
        outs = list(_tensors(node.meta.get("val")))
        if not outs:
            continue
        cls = _OP_OF.get(name, "elementwise")
        if name in _FUSABLE and (_follows_compute(node) or _follows_fusable_add(node)):
            continue
        ins = [v for v in _arg_vals(node) if _tensor_meta(v) is not None]
        if cls == "conv":
            cls = _conv_class(ins)
        out_numel = sum(m[0] for _, m in outs)
        moved = [m for _, m in outs] + [_tensor_meta(v) for v in ins]
        if cls == "move" and name in ("embedding", "index", "index_select", "gather", "slice", "split",
                                      "split_with_sizes", "chunk", "unbind", "narrow"):
            moved = [m for _, m in outs] * 2  # reads only the rows/slices it returns, not the whole table
        nbytes = float(sum(n * size for n, size, _ in moved))
        fbytes = float(sum(n * size for n, size, is_float in moved if is_float))
        if cls == "attention":  # the L x S score matrix is written and read back once in most runtimes
            q, k = ins[0], ins[1]
            scores = math.prod(_size(s) for s in q.shape[:-1]) * _size(k.shape[-2]) * q.dtype.itemsize
            nbytes += 2 * scores
            fbytes += 2 * scores
        module = node_module_path(node) or ""
        costs.append(OpCost(node=node.name, op=name, op_class=cls, flops=_flops(cls, node, ins, out_numel),
                            bytes=nbytes, float_bytes=fbytes, module=module, fusable=_is_fusable_add(node)))
        if cls == "attention" and (len(ins) > 3 or node.kwargs.get("attn_mask") is not None):
            # a masked softmax over the scores: runtimes apply the mask as separate passes (where/add, NaN
            # guards), which cost several times the unmasked softmax (measured in onnxruntime)
            q, k = ins[0], ins[1]
            scores = math.prod(_size(s) for s in q.shape[:-1]) * _size(k.shape[-2])
            costs.append(OpCost(node=f"{node.name}.mask", op="attention_mask", op_class="mask", flops=10.0 * scores,
                                bytes=3.0 * scores * q.dtype.itemsize, float_bytes=3.0 * scores * q.dtype.itemsize,
                                module=module))
    return costs


def _follows_compute(node) -> bool:
    """True when the op's input comes straight from a conv/linear that feeds nothing else."""
    src = node.args[0] if node.args else None
    if not hasattr(src, "target") or getattr(src, "op", "") != "call_function":
        return False
    return _OP_OF.get(_base_name(src.target)) in ("conv", "matmul") and len(src.users) == 1


def _is_fusable_add(node) -> bool:
    """A residual add with a conv output (used only here) as one operand: ORT, TensorRT and CoreML fuse it."""
    if _base_name(node.target) not in ("add", "add_"):
        return False
    for arg in node.args[:2]:
        if hasattr(arg, "target") and getattr(arg, "op", "") == "call_function" and \
                _OP_OF.get(_base_name(arg.target)) == "conv" and len(arg.users) == 1:
            return True
    return False


def _follows_fusable_add(node) -> bool:
    src = node.args[0] if node.args else None
    return hasattr(src, "target") and getattr(src, "op", "") == "call_function" and _is_fusable_add(src) and \
        len(src.users) == 1


def summarize(costs: list[OpCost]) -> dict:
    """Totals per op class: count, GFLOPs, MB moved."""
    out: dict[str, dict] = {}
    for c in costs:
        entry = out.setdefault(c.op_class, {"count": 0, "gflops": 0.0, "mbytes": 0.0})
        entry["count"] += 1
        entry["gflops"] += c.flops / 1e9
        entry["mbytes"] += c.bytes / 1e6
    return out


# --------------------------------------------------------------------------- cache

OPMIX_VERSION = 7  # bump when op pricing changes, so cached op mixes are rebuilt


def _cache_path(key: str) -> Path:
    from slimx.devices.host import cache_dir

    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / "opmix" / f"{digest}.json"


def cached_op_mix(key: str, make) -> list[OpCost]:
    """The op mix for ``key``, from the cache when present (exporting a model takes seconds)."""
    import torch

    full = f"v{OPMIX_VERSION}|torch {torch.__version__}|{key}"
    path = _cache_path(full)
    if path.is_file():
        try:
            return [OpCost(**c) for c in json.loads(path.read_text())]
        except (ValueError, TypeError):
            pass
    costs = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # processes sharing the cache write their own
    tmp.write_text(json.dumps([c.to_dict() for c in costs]))
    tmp.replace(path)
    return costs
