"""ExecuTorch quantization through its own XNNPACK quantizer (PT2E), and fp16 as a half-precision program.

The subject is the slimx ``Program``; each handler returns the ``torch.export`` program that
``targets.executorch`` lowers to the XNNPACK delegate:

- ``fp32``: the exported program as it is.
- ``fp16``: the model in half precision, exported again (XNNPACK runs its fp16 kernels; float inputs and outputs
  are fp16, which the runner casts to and from).
- ``int8-weights``: PT2E with ``XNNPACKQuantizer`` in its dynamic mode: int8 per-channel weights, activations
  quantized per call (XNNPACK's QD8 kernels).
- ``int8``: PT2E static with ``XNNPACKQuantizer``: observers calibrated on the calibration data, with the accuracy
  guard of ``quant.sensitivity`` (layers whose inputs lose too much stay float).

Both int8 schemes quantize the linear and convolution ops (and the ReLU-like activations XNNPACK fuses into them),
not every op the quantizer knows: with every op, static int8 quantized the attention-mask ``add`` of MiniLM (a
-1e4 sentinel beside the scores) and held its calibration cosine at 0.87 however many layers the guard kept float.
"""

from __future__ import annotations

from slimx._core.errors import SlimxFailure, UsageError, first_line
from slimx.quant.base import (
    QuantConfig,
    QuantContext,
    first_output,
    innermost_module,
    register_quantizer,
    require_symmetric_calibrated,
)


@register_quantizer("executorch", "none", "fp32")
def executorch_fp32(program, cfg: QuantConfig, ctx: QuantContext):
    return program.exported, {"method": "none"}


@register_quantizer("executorch", "half-program", "fp16")
def executorch_fp16(program, cfg: QuantConfig, ctx: QuantContext):
    import copy

    import torch

    from slimx.export.program import export_program
    from slimx.export.shapes import export_example

    # the exported graph in half precision: it carries the pre-flight's fixes (fp16-safe constants, rescaled norms),
    # and its explicit casts to fp32 become casts to fp16 (a copy: the graph shares the module's tensors)
    module = copy.deepcopy(program.graph_module()).half()
    clamped = _half_casts(module)
    kept = _graph_layer_norms_in_fp32(module)
    example = tuple(x.half() if x.is_floating_point() else x for x in export_example(program.inputs))
    return export_program(module, example, program.inputs), {
        "method": "the model in half precision (torch.float16 weights, activations and float I/O), XNNPACK fp16 "
                  "kernels", "io": "fp16" if any(x.dtype == torch.float16 for x in example) else "unchanged",
        "kept_fp32": {"modules": kept, "why": FP32_LAYER_NORM_WHY} if kept else None,
        "clamped_constants": {"count": clamped, "why": "float constants past fp16's range clamped to ±65504 (the "
                              "runtime refuses them in a half program; the pre-flight's fixes leave none)"}
        if clamped else None}


FP32_LAYER_NORM_WHY = ("LayerNorm is computed in fp32 between casts: XNNPACK does not take it, and ExecuTorch 1.5.1's "
                       "portable layer_norm in fp16 is wrong here (off by 3.7-6 on N(0, 1-100) inputs against "
                       "PyTorch's half LayerNorm, inf on inputs near 0.1 with BERT's eps 1e-12: every MiniLM output "
                       "NaN)")


def _half_casts(gm) -> int:
    """A half-precision graph's explicit casts to fp32 (``mask.float()``) cast to fp16 instead, as the module's code
    would have in half precision (else fp32 leaks into fp16 matmuls), and its float constants past fp16's range
    clamped to ±65504 (ExecuTorch refuses them in a half ``scalar_tensor``; a module whose code asks
    ``finfo(dtype).min`` would have given -65504 itself). Returns how many constants were clamped."""
    import math

    import torch

    limit = float(torch.finfo(torch.float16).max)
    clamped = 0

    def half(a):
        nonlocal clamped
        if a is torch.float32:
            return torch.float16
        if isinstance(a, float) and (math.isinf(a) or abs(a) > limit):
            clamped += 1
            return math.copysign(limit, a)
        return a

    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.args = tuple(half(a) for a in n.args)
            n.kwargs = {k: half(v) for k, v in n.kwargs.items()}
    gm.recompile()
    return clamped


def _graph_layer_norms_in_fp32(gm) -> list[str]:
    """Every LayerNorm of a half-precision graph computed in fp32: each ``layer_norm`` node's tensor arguments cast
    to fp32 and its result back to fp16; returns the modules they came from."""
    import torch

    from slimx.export.program import node_module

    graph, kept = gm.graph, []
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.layer_norm.default:
            continue
        with graph.inserting_before(n):
            n.args = tuple(graph.call_function(torch.ops.aten._to_copy.default, (a,), {"dtype": torch.float32})
                           if isinstance(a, torch.fx.Node) else a for a in n.args)
        with graph.inserting_after(n):
            back = graph.call_function(torch.ops.aten._to_copy.default, (n,), {"dtype": torch.float16})
        n.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
        kept.append(((node_module(n) or ("",))[0] or "<root>").removeprefix("L__self__."))
    gm.recompile()
    return kept


@register_quantizer("executorch", "pt2e-dynamic", "int8-weights")
def executorch_dynamic(program, cfg: QuantConfig, ctx: QuantContext):
    exported, record = _pt2e(program, cfg, ctx, dynamic=True)
    return exported, record


@register_quantizer("executorch", "pt2e-static", "int8")
def executorch_static(program, cfg: QuantConfig, ctx: QuantContext):
    require_symmetric_calibrated(cfg, ctx, "ExecuTorch's XNNPACK quantizer is symmetric")
    return _pt2e(program, cfg, ctx, dynamic=False)


def _pt2e(program, cfg: QuantConfig, ctx: QuantContext, dynamic: bool):
    """PT2E with ``XNNPACKQuantizer`` on the program's capture, re-exported with its dynamic axes; static int8
    goes through the accuracy guard (each round scored in PyTorch on the converted graph)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from slimx.export.parity import compare_outputs, torch_outputs
    from slimx.export.program import export_program
    from slimx.export.shapes import dynamic_shapes, export_example
    from slimx.quant.sensitivity import guarded_int8

    module, batches = program.module, list(ctx.batches or [])
    example = export_example(program.inputs)
    symbolic = dynamic_shapes(program.inputs) is not None
    # with a symbolic axis, re-tracing the capture's guards refers to names prepare_pt2e cannot resolve; the
    # shapes were checked when the program was captured
    graph_of = (lambda: program.exported.module(check_guards=False)) if symbolic else program.exported.module
    config = get_symmetric_quantization_config(is_per_channel=cfg.per_channel, is_dynamic=dynamic)

    class Quantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model):
            return _float_scalars_to_attrs(model)

    aten = torch.ops.aten
    # the ops int8 reaches: matmul layers and the activations XNNPACK fuses into them (not set_global's every op:
    # a static int8 attention-mask add, a -1e4 sentinel beside the scores, held MiniLM at cosine 0.87 whatever the
    # guard kept float)
    layer_ops = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.convolution.default}
    fused_ops = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}

    def quantizer_skipping(skip: set[str]):
        def annotated(node, skip=skip):
            if node.op == "call_function" and node.target not in layer_ops and node.target not in fused_ops:
                return False  # (a pattern's weight and bias nodes are asked too: they pass)
            return innermost_module(node) not in skip

        return Quantizer().set_global(config).set_filter_function(annotated)

    def convert(keep):
        prepared = prepare_pt2e(graph_of(), quantizer_skipping(set(keep)))
        with torch.no_grad():
            # weight observers record on a call: dynamic int8 runs one (calibration data need not be given)
            for batch in (batches[:1] or [example]) if dynamic else batches:
                prepared(*batch)
        return convert_pt2e(prepared)

    try:
        if dynamic:
            converted, keep, guard = convert({}), {}, None
        else:
            reference = [torch_outputs(module, b) for b in batches]

            def quantize_and_score(keep):
                got = convert(keep)
                with torch.no_grad():
                    cosines = [compare_outputs(ref[:1], [first_output(got(*b))])["cosine"]
                               for b, ref in zip(batches, reference, strict=True)]
                return got, float(sum(cosines) / len(cosines))

            converted, keep, guard = guarded_int8(module, batches, quantize_and_score, cfg.target_cosine,
                                                  cfg.guard_step, cfg.guard_rounds,
                                                  always_float=cfg.kept_by_user(module))
        exported = export_program(converted, example, program.inputs)
    except (UsageError, SlimxFailure):
        raise
    except Exception as exc:
        raise SlimxFailure(f"ExecuTorch {'dynamic' if dynamic else 'static'} int8 (PT2E, XNNPACKQuantizer)",
                           first_line(exc), "try another --precision, or run with --debug") from exc
    scale = "per-channel" if cfg.per_channel else "per-tensor"
    record = {"method": (f"PT2E dynamic int8 (XNNPACKQuantizer: symmetric {scale} int8 weights, activations "
                         "quantized per call) on the linear and convolution layers") if dynamic else
              f"PT2E static int8 (XNNPACKQuantizer: symmetric, {scale} weights, calibrated observers) on the linear "
              "and convolution layers; other ops float"}
    if not dynamic:
        record.update({"calibration_samples": len(batches),
                       "kept_float": {"modules": keep, "why": "input SQNR under per-tensor int8 below the floor, "
                                                              "or guard rounds"},
                       "guard": guard})
    return exported, record


def _float_scalars_to_attrs(model):
    """The scalar operands of float ``add``/``mul`` nodes as tensor attributes, so the quantizer can annotate them
    (what XNNPACKQuantizer's own transform does); unlike it, integer arithmetic keeps its scalars: HF BERT's mask
    indices are ``arange(n) + 0``, which a float constant would turn into float indices that ``index`` refuses."""
    import torch

    targets = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)
    count = 0
    for node in list(model.graph.nodes):
        val = node.meta.get("val")
        if node.op != "call_function" or node.target not in targets or val is None \
                or not val.dtype.is_floating_point:
            continue
        args = []
        for arg in node.args:
            if isinstance(arg, (int, float)) and not isinstance(arg, bool):
                while hasattr(model, f"_slimx_scalar_{count}"):
                    count += 1
                name, const = f"_slimx_scalar_{count}", torch.tensor(float(arg))
                model.register_buffer(name, const)
                with model.graph.inserting_before(node):
                    attr = model.graph.get_attr(name)
                attr.meta["val"] = val.fake_mode.from_tensor(const, static_shapes=True)
                arg = attr
            args.append(arg)
        node.args = tuple(args)
    model.recompile()
    return model
