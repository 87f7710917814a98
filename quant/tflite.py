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


def tflite_quantization(module, example_kwargs: dict, precision: str, batches: list[tuple] | None,
                        input_names: list[str]):
    """Return ``(module_to_convert, quant_config, record)`` for litert_torch.convert."""
    if precision == "fp32":
        return module, None, {"method": "none"}
    if precision == "fp16":
        from litert_torch.generative.quantize import quant_recipes

        return module, quant_recipes.full_fp16_recipe(), {"method": "LiteRT full_fp16_recipe (fp16 weights)"}
    if precision == "int8-weights":
        from litert_torch.generative.quantize import quant_recipes

        return module, quant_recipes.full_dynamic_recipe(), {
            "method": "LiteRT full_dynamic_recipe (dynamic range: int8 per-channel weights)"}
    if precision == "int8":
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        try:
            captured = torch.export.export(module, (), kwargs=example_kwargs, strict=False).module()
            prepared = prepare_pt2e(captured, quantizer)
            with torch.no_grad():
                for batch in batches:
                    prepared(**dict(zip(input_names, batch, strict=True)))
            converted = convert_pt2e(prepared, fold_quantize=False)
        except Exception as exc:
            raise SlimxFailure("TFLite int8 (PT2E static) calibration", first_line(exc),
                               "try --precision int8-weights (dynamic range), or run with --debug") from exc
        return converted, QuantConfig(pt2e_quantizer=quantizer), {
            "method": "PT2E static int8 (symmetric, per-channel weights, histogram observers)",
            "calibration_samples": len(batches)}
    raise ValueError(precision)
