"""onnxruntime's transformer fusions on a dynamo-exported graph, checked against the unfused graph.

torch.onnx's dynamo exporter writes attention as MatMul, Softmax, MatMul with a Reshape and Transpose per
projection, GELU as Erf arithmetic and LayerNorm after a separate residual Add. onnxruntime's offline BERT
optimizer (``onnxruntime.transformers.optimizer``) was written for the TorchScript exporter's patterns and
fuses almost nothing of this graph; onnxscript's rewriter (``onnxscript.rewriter.ort_fusions``) carries the
same fusions for dynamo graphs: SDPA -> MultiHeadAttention -> Attention (one QKV projection), SkipLayerNorm,
BiasGelu. Two edits make the fused ``Attention`` op what ``quantize_dynamic`` turns into ``QAttention``
(the int8 attention the ordinary recipe gets): the ``qkv_hidden_sizes`` attribute is dropped where Q, K and V
are equal (it is the default then, and its presence makes the quantizer skip the node), and an additive
attention bias computed from the model's padding-mask input alone becomes that raw mask as ``mask_index``.
The BERT embedding (word, position and token-type lookups, their sum, its LayerNorm) is fused here into
``EmbedLayerNormalization``, which neither library does for a dynamo graph; ``quantize_dynamic`` turns it into
``QEmbedLayerNormalization`` (int8 tables, one kernel), again what the recipe gets. On MiniLM at real lengths it
was worth about 1% of the int8 time (one interleaved run here), at the same cosine to PyTorch.

Measured here on MiniLM at real sentence lengths (batch 1, 2 threads, one interleaved run): fused fp32 1.13x
the recipe's unfused fp32; fused dynamic int8 2.17x against the recipe's 2.22x (unfused slimx int8: 1.72x).

The fused graph uses com.microsoft contrib ops, so it runs in onnxruntime (CPU, CUDA) only: the ``tensorrt``
format never gets it, and ``--no-fuse`` keeps a plain ONNX graph for other runtimes. Every fusion is checked:
the fused file must reproduce the unfused one on inputs with padding, else the unfused file is kept and the
record says why; a disagreeing embedding fusion is dropped on its own and the other fusions are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from slimx._core.errors import first_line

FOLD_LIMIT = 1 << 24  # elements: the fused QKV weight is a concatenation the folder must be allowed to compute
CHECK_COSINE = 0.99999  # the fused graph against the unfused one, on the same inputs


def fuse_for_onnxruntime(path: Path, check_inputs: list[tuple], mask_input: str | None = None) -> dict:
    """Fuse ``path`` in place for onnxruntime; return the record (``applied`` counts, or ``skipped`` and why).

    Args:
        check_inputs: input tuples (in graph input order) both graphs are run on; include padded masks.
        mask_input: the name of the padding-mask input (1 = real token), if the model has one.
    """
    import onnx_ir as ir

    path = Path(path)
    tmp = path.with_name(f".{path.name}.fused.partial")
    notes = []
    try:
        for embedding in (True, False):  # a disagreeing embedding fusion is dropped on its own, the rest kept
            model = ir.load(str(path))
            applied = _fuse(model, mask_input, embedding)
            if not applied:
                return {"applied": {}, "skipped": "no pattern onnxruntime fuses was found"}
            ir.save(model, str(tmp))
            worst = _agreement(path, tmp, check_inputs)
            if worst >= CHECK_COSINE or "embed_layer_normalization" not in applied:
                break
            notes.append(f"the embedding fusion differed from the unfused graph (cosine {worst:.6f}); left unfused")
        if worst < CHECK_COSINE:
            return {"applied": {}, "skipped": f"the fused graph differed from the unfused one (cosine {worst:.6f}); "
                                              "kept unfused"}
        os.replace(tmp, path)
    except Exception as exc:  # a fusion library failure must not fail the export: the unfused file is valid
        return {"applied": {}, "skipped": f"fusion failed ({first_line(exc, 160)}); kept unfused"}
    finally:
        tmp.unlink(missing_ok=True)
    record = {"applied": applied, "checked_cosine": round(worst, 7),
              "runtime": "com.microsoft contrib ops: runs in onnxruntime only (--no-fuse for a plain ONNX graph)"}
    if notes:
        record["notes"] = notes
    return record


def _fuse(model, mask_input: str | None, embedding: bool = True) -> dict[str, int]:
    """Apply the fusions to the IR model in place; return what was fused (count per kind). ``embedding``: also
    the BERT embedding (``EmbedLayerNormalization``)."""
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from slimx.export.program import quiet

    with quiet():
        model, counts = optimize_for_ort(model)
        optimize(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    applied = {k: int(v) for k, v in counts.items() if v}
    attention = [n for n in model.graph.all_nodes() if n.op_type == "Attention" and n.domain == "com.microsoft"]
    equal = sum(_drop_equal_qkv_sizes(n) for n in attention)
    if equal:
        applied["attention_qkv_packed"] = equal
    masked = _mask_as_index(model, attention, mask_input)
    if masked:
        applied["attention_mask_index"] = masked
    if embedding and _embed_layer_norm(model):
        applied["embed_layer_normalization"] = 1
    return applied


def _drop_equal_qkv_sizes(node) -> bool:
    sizes = node.attributes.get("qkv_hidden_sizes")
    if sizes is None:
        return False
    values = list(sizes.as_ints())
    if len(set(values)) != 1:
        return False
    del node.attributes["qkv_hidden_sizes"]
    return True


def _mask_as_index(model, attention: list, mask_input: str | None) -> int:
    """Give each Attention node whose additive bias (input 5) is computed from the padding mask alone that raw
    mask (int32, 1 = attend) as ``mask_index`` (input 3), the form ``QAttention`` takes too."""
    import onnx_ir as ir

    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == mask_input), None) if mask_input else None
    if mask is None:
        return 0
    targets = [n for n in attention if len(n.inputs) > 5 and n.inputs[5] is not None
               and (len(n.inputs) < 4 or n.inputs[3] is None) and _sources(n.inputs[5], graph) == {mask}]
    if not targets:
        return 0
    cast = ir.node("Cast", inputs=[mask], attributes={"to": ir.DataType.INT32}, name="slimx_mask_index")
    cast.outputs[0].name = "slimx_mask_index"
    graph.insert_before(targets[0], cast)  # the nodes are in order: the first attention reads it first
    for node in targets:
        node.replace_input_with(3, cast.outputs[0])
        node.replace_input_with(5, None)
        _trim_trailing_none(node)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    return len(targets)


def _trim_trailing_none(node) -> None:
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    if len(inputs) != len(node.inputs):
        node.resize_inputs(len(inputs))


def _sources(value, graph) -> set:
    """The graph inputs ``value`` is computed from (initializers and constants do not count)."""
    inputs = set(graph.inputs)
    seen, found, stack = set(), set(), [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v in inputs:
            found.add(v)
            continue
        node = v.producer()
        if node is not None:
            stack.extend(node.inputs)
    return found


def _agreement(unfused: Path, fused: Path, inputs: list[tuple]) -> float:
    """The worst cosine between the two graphs' outputs over ``inputs``."""
    from slimx.targets.ort_runner import OrtRunner

    runner = OrtRunner(threads=1)
    a_session, b_session = runner.session(unfused), runner.session(fused)
    worst = 1.0
    for batch in inputs:
        a = a_session.run(None, runner.feed(a_session, batch))
        b = b_session.run(None, runner.feed(b_session, batch))
        for x, y in zip(a, b, strict=True):
            x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
            denom = np.linalg.norm(x) * np.linalg.norm(y)
            cos = float(x @ y / denom) if denom > 0 else float(np.allclose(x, y))
            worst = min(worst, cos)
    return worst


# --- the embedding -------------------------------------------------------------------------------------

_PASS_THROUGH = {"Gather", "GatherElements", "Slice", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity",
                 "Cast", "Tile"}


def _embed_layer_norm(model) -> int:
    """Fuse the BERT embedding (word + position [+ token type] lookups, the sum, its LayerNorm) into
    ``EmbedLayerNormalization``, the op ``quantize_dynamic`` turns into ``QEmbedLayerNormalization`` (the
    recipe's int8 embedding: int8 tables, one kernel). The dynamo graph computes the position ids as a slice of
    the model's ``position_ids`` buffer (0, 1, 2, ...) and the token types as a lookup into an all-zero buffer;
    the op numbers positions from 0 itself, and a constant token type's row is folded into the position table.
    Returns 1 when fused, 0 when no embedding of that form is found (then the graph is left alone)."""
    import onnx_ir as ir

    graph = model.graph
    for norm in list(graph):
        found = _embedding_pattern(norm, graph)
        if found is None:
            continue
        ids, word, position, zeros, gamma, beta, epsilon = found
        table = position.const_value.numpy().astype(np.float32)
        for zero in zeros:  # a constant token type 0: its row is added to every position's
            table = table + zero.const_value.numpy()[0].astype(np.float32)
        name = "slimx_position_plus_type"
        folded = ir.Value(name=name, const_value=ir.tensor(table, name=name))
        graph.register_initializer(folded)
        if ids.dtype != ir.DataType.INT32:  # the op reads int32 ids
            cast = ir.node("Cast", inputs=[ids], attributes={"to": ir.DataType.INT32}, name="slimx_ids_int32")
            cast.outputs[0].name = "slimx_ids_int32"
            graph.insert_before(norm, cast)
            ids32 = cast.outputs[0]
        else:
            ids32 = ids
        fused = ir.node("EmbedLayerNormalization", inputs=[ids32, None, word, folded, None, gamma, beta],
                        attributes={"epsilon": float(epsilon)}, domain="com.microsoft", num_outputs=2,
                        name="slimx_EmbedLayerNormalization")
        fused.outputs[0].name, fused.outputs[1].name = "slimx_embedding", "slimx_embedding_mask_index"
        graph.insert_before(norm, fused)
        norm.outputs[0].replace_all_uses_with(fused.outputs[0])
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        return 1
    return 0


def _embedding_pattern(norm, graph):
    """``(ids, word table, position table, zero-type tables, gamma, beta, epsilon)`` when ``norm`` is the
    embedding's LayerNorm over a sum of lookups of that form, else None."""
    import onnx_ir as ir

    if norm.domain == "com.microsoft" and norm.op_type == "SkipLayerNormalization":
        if (len(norm.inputs) > 4 and norm.inputs[4] is not None) or "epsilon" not in norm.attributes:
            return None
        terms, gamma, beta = [norm.inputs[0], norm.inputs[1]], norm.inputs[2], norm.inputs[3]
        epsilon = norm.attributes["epsilon"].as_float()
    elif norm.domain == "" and norm.op_type == "LayerNormalization" and len(norm.inputs) == 3:
        add = norm.inputs[0].producer()
        axis = norm.attributes["axis"].as_int() if "axis" in norm.attributes else -1
        if add is None or add.op_type != "Add" or axis not in (-1, 2):
            return None
        terms, gamma, beta = list(add.inputs), norm.inputs[1], norm.inputs[2]
        epsilon = norm.attributes["epsilon"].as_float() if "epsilon" in norm.attributes else 1e-5
    else:
        return None
    if any(out.uses() for out in norm.outputs[1:]) or gamma is None or beta is None:
        return None
    lookups = []
    for term in terms:  # a lookup, or a sum of two lookups
        node = term.producer() if term is not None else None
        if node is not None and node.op_type == "Add" and node.domain == "" and len(term.uses()) == 1:
            lookups += [v.producer() for v in node.inputs]
        else:
            lookups.append(node)
    if any(n is None or n.op_type != "Gather" or n.domain != "" or n.inputs[0].const_value is None
           or (n.attributes["axis"].as_int() if "axis" in n.attributes else 0) != 0
           or len(n.inputs[0].const_value.shape) != 2 for n in lookups):
        return None
    inputs = set(graph.inputs)
    word = [n for n in lookups if n.inputs[1] in inputs]
    position = [n for n in lookups if n not in word and _is_positions(n.inputs[1])]
    zeros = [n for n in lookups if n not in word and n not in position and _all_zero(n.inputs[1])]
    if len(word) != 1 or len(position) != 1 or len(word) + len(position) + len(zeros) != len(lookups):
        return None
    ids = word[0].inputs[1]
    if ids.shape is None or len(ids.shape) != 2 or ids.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    if len({n.inputs[0].const_value.shape[1] for n in lookups}) != 1:
        return None
    return ids, word[0].inputs[0], position[0].inputs[0], [n.inputs[0] for n in zeros], gamma, beta, epsilon


def _const(value):
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _is_positions(value) -> bool:
    """Whether ``value`` is 0, 1, 2, ... along its last axis: a constant, or a slice from 0 with step 1 of one
    (the ``position_ids`` buffer cut to the sequence length)."""
    def arange(arr) -> bool:
        return arr is not None and arr.ndim >= 1 and all(np.array_equal(row, np.arange(arr.shape[-1]))
                                                          for row in arr.reshape(-1, arr.shape[-1]))

    if arange(_const(value)):
        return True
    node = value.producer()
    if node is None or node.op_type != "Slice" or node.domain != "":
        return False
    data = _const(node.inputs[0])
    if not arange(data):
        return False
    data_rank = data.ndim
    starts = _const(node.inputs[1])
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(data_rank)
    steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(len(axes))
    if starts is None or axes is None or steps is None:
        return False
    for axis, start, step in zip(axes.ravel(), starts.ravel(), steps.ravel(), strict=True):
        if (axis % data_rank == data_rank - 1 and start != 0) or step != 1:
            return False
    return True


def _all_zero(value) -> bool:
    """Whether every element of ``value`` is 0 whatever the inputs: an all-zero constant, or indexing, reshaping
    or broadcasting of one."""
    arr = _const(value)
    if arr is not None:
        return not np.any(arr)
    node = value.producer()
    if node is None or node.domain != "":
        return False
    if node.op_type == "ConstantOfShape":
        fill = node.attributes.get("value")
        return fill is None or not np.any(fill.as_tensor().numpy())
    return node.op_type in _PASS_THROUGH and _all_zero(node.inputs[0])
