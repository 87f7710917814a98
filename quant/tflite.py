"""TFLite quantization through LiteRT's own tools (litert-torch recipes and PT2E).

- ``fp16``: fp16 weights (LiteRT ``full_fp16_recipe``).
- ``int8-weights``: dynamic-range quantization: int8 weights, activations quantized at run time
  (``full_dynamic_recipe``).
- ``int8``: full-integer static PT2E: observers calibrated on representative data
  (``prepare_pt2e`` -> calibration -> ``convert_pt2e``), then converted with the same quantizer.
  A ``QuantConfig`` on a float model alone does not quantize it, so the model is prepared first.
"""

from __future__ import annotations

from slimx._core.errors import SlimxFailure, first_line
from slimx.quant.base import (
    QuantConfig,
    QuantContext,
    first_output,
    innermost_module,
    register_quantizer,
    require_symmetric_calibrated,
)


@register_quantizer("tflite", "none", "fp32")
def tflite_fp32(module, cfg: QuantConfig, ctx: QuantContext):
    return (module, None), {"method": "none"}


@register_quantizer("tflite", "fp16-weights", "fp16")
def tflite_fp16(module, cfg: QuantConfig, ctx: QuantContext):
    from litert_torch.generative.quantize import quant_recipes

    return (module, quant_recipes.full_fp16_recipe()), {"method": "LiteRT full_fp16_recipe (fp16 weights)"}


@register_quantizer("tflite", "dynamic-range", "int8-weights")
def tflite_dynamic_range(module, cfg: QuantConfig, ctx: QuantContext):
    from litert_torch.generative.quantize import quant_recipes

    return (module, quant_recipes.full_dynamic_recipe()), {
        "method": "LiteRT full_dynamic_recipe (dynamic range: int8 per-channel weights)"}


@register_quantizer("tflite", "pt2e-static", "int8")
def tflite_pt2e_static(module, cfg: QuantConfig, ctx: QuantContext):
    """Full-integer static PT2E with the accuracy guard; LiteRT's PT2E quantizer is symmetric."""
    require_symmetric_calibrated(cfg, ctx, "LiteRT's PT2E quantizer here is symmetric")
    module, quant_config, record = _static_int8(module, ctx.example_kwargs, ctx.batches, ctx.input_names, cfg,
                                                ctx.dynamic_shapes)
    return (module, quant_config), record


def _static_int8(module, example_kwargs: dict, batches: list[tuple], input_names: list[str], cfg: QuantConfig,
                 dynamic_shapes=None):
    """PT2E static int8 with the accuracy guard of ``quant.sensitivity``: layers whose inputs lose too much
    under int8 stay float, more of them (most sensitive first) while the quantized model's outputs on the
    calibration data stay under ``target_cosine`` against the float model. Each round runs in PyTorch
    (the converted PT2E model), so LiteRT converts once."""
    import torch
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig as LiteRTQuantConfig

    from slimx.export.binding import NamedInputs
    from slimx.export.parity import compare_outputs, torch_outputs
    from slimx.quant.sensitivity import guarded_int8

    reference = [torch_outputs(module, b) for b in batches]
    captured = torch.export.export(module, (), kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    # with a symbolic axis, torch.export's guard check refers to names that re-tracing (prepare_pt2e, then
    # litert-torch at each bucket) cannot resolve ("name 'L' is not defined"): the shapes were checked at capture
    graph_of = (lambda: captured.module(check_guards=False)) if dynamic_shapes else captured.module
    # layers are named as in the user's model; inside a NamedInputs wrapper the traced paths gain its prefix
    inner, prefix = (module.module, "module.") if isinstance(module, NamedInputs) else (module, "")

    def quantize_and_score(keep):
        quantizer = _quantizer_skipping({prefix + k for k in keep})
        quantizer.set_global(get_symmetric_quantization_config(is_per_channel=cfg.per_channel))
        converted = _calibrated(graph_of(), quantizer, batches, input_names)
        with torch.no_grad():
            cosines = [compare_outputs(ref[:1], [first_output(converted(**dict(zip(input_names, b, strict=True))))])
                       ["cosine"] for b, ref in zip(batches, reference, strict=True)]
        return (converted, quantizer), float(sum(cosines) / len(cosines))

    try:
        (converted, quantizer), keep, guard = guarded_int8(inner, batches, quantize_and_score, cfg.target_cosine,
                                                           cfg.guard_step, cfg.guard_rounds,
                                                           always_float=cfg.kept_by_user(inner))
    except Exception as exc:
        raise SlimxFailure("TFLite int8 (PT2E static) calibration", first_line(exc),
                           "try --precision int8-weights (dynamic range), or run with --debug") from exc
    return converted, LiteRTQuantConfig(pt2e_quantizer=quantizer), {
        "method": f"PT2E static int8 (symmetric, {'per-channel' if cfg.per_channel else 'per-tensor'} weights, "
                  "histogram observers)",
        "calibration_samples": len(batches),
        "kept_float": {"modules": keep, "why": "input SQNR under per-tensor int8 below the floor, or guard rounds"},
        "guard": guard}


def _quantizer_skipping(skip: set[str]):
    """LiteRT's PT2E quantizer, minus the annotations of nodes inside the ``skip`` modules (they stay float).
    Its own set_module_name filter expects an older module-stack key format, so it is not used."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class SkippingQuantizer(PT2EQuantizer):
        def annotate(self, model):
            model = super().annotate(model)
            for node in model.graph.nodes:
                if innermost_module(node) in skip:
                    node.meta.pop("quantization_annotation", None)
            return model

    return SkippingQuantizer()


def _calibrated(graph_module, quantizer, batches, input_names):
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(graph_module, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(**dict(zip(input_names, batch, strict=True)))
    return convert_pt2e(prepared, fold_quantize=False)
