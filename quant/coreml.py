"""CoreML quantization with coremltools.

Neural-network models (deployment targets before iOS 15) store weights in fp16 or int8 with
``quantization_utils.quantize_weights``. ML Programs (iOS 15+) compute in fp16 via
``compute_precision`` and quantize weights with ``coremltools.optimize.coreml`` (linear int8, iOS 16+;
palettization). Activation quantization (W8A8, iOS 17+) calibrates by running the model, which
coremltools can only do on macOS.
"""

from __future__ import annotations

import sys

from slimx._core.errors import UsageError
from slimx.quant.base import QuantConfig, QuantContext, register_quantizer

FP16_MAX = 65504.0


def check_coreml_precision(precision: str, backend: str, ios: int, palettize: int | None) -> None:
    """Refuse, before any conversion, what CoreML cannot build for this backend, iOS version and host."""
    if backend == "neuralnetwork":
        if precision == "int8":
            raise UsageError("--precision int8", "a neural-network CoreML model (deployment target before iOS 15) "
                             "cannot quantize activations", "use int8-weights, or --deployment-target iOS17 for W8A8")
        if palettize:
            raise UsageError(f"--palettize {palettize}", "palettized weights need an ML Program (iOS 16 or later)",
                             "add --deployment-target iOS16 (or later)")
        return
    if palettize and ios < 16:
        raise UsageError(f"--palettize {palettize}", "palettized ML Programs need iOS 16 or later",
                         "use --deployment-target iOS16 (or later)")
    if precision in ("int8-weights", "int8") and ios < 16:
        raise UsageError(f"--precision {precision}", "int8 weights in an ML Program need iOS 16 or later",
                         "use --deployment-target iOS16 (or later), or --precision fp16")
    if precision == "int8":
        if ios < 17:
            raise UsageError("--precision int8", "activation quantization in CoreML needs iOS 17 or later",
                             "use --deployment-target iOS17, or --precision int8-weights")
        if sys.platform != "darwin":
            raise UsageError("--precision int8", "CoreML calibrates activation ranges by running the model, which "
                             "coremltools can do only on macOS", "use --precision int8-weights here, or run on a Mac")


def quantize_neuralnetwork(model, precision: str):
    """fp16 or int8 weights for a neural-network model; returns (model, record).

    Constant layers holding values fp16 cannot represent (attention-mask fills such as ``-inf`` or
    ``finfo(float32).min``) stay fp32, which coremltools otherwise refuses for the whole model; the
    record lists them.
    """
    from coremltools.models.neural_network import quantization_utils

    if precision == "fp32":
        return model, {"method": "none (fp32 weights)"}
    selector = _fp16_safe_selector()
    if precision == "fp16":
        out = quantization_utils.quantize_weights(model, nbits=16, selector=selector)
        method = "coremltools quantize_weights(nbits=16): fp16 weights"
    elif precision == "int8-weights":
        out = quantization_utils.quantize_weights(model, nbits=8, quantization_mode="linear", selector=selector)
        method = "coremltools quantize_weights(nbits=8, linear): int8 weights"
    else:
        raise ValueError(precision)  # check_coreml_precision refused this before conversion
    record = {"method": method}
    if selector.kept:
        record["kept_fp32_constants"] = selector.kept
        record["why"] = "values beyond the fp16 range (attention-mask fills); they are exact in fp32"
    return out, record


def _fp16_safe_selector():
    """A coremltools layer selector that leaves constants fp16 cannot hold in fp32; ``.kept`` names them."""
    import numpy as np
    from coremltools.models.neural_network.quantization_utils import QuantizedLayerSelector

    class KeepOutOfRangeConstants(QuantizedLayerSelector):
        def __init__(self):
            super().__init__()
            self.kept: list[str] = []

        def do_quantize(self, layer, **kwargs):
            if layer.WhichOneof("layer") in ("loadConstantND", "loadConstant"):
                values = np.asarray(getattr(layer, layer.WhichOneof("layer")).data.floatValue)
                if values.size and not np.all(np.abs(values) <= FP16_MAX):
                    self.kept.append(layer.name)
                    return False
            return super().do_quantize(layer, **kwargs)

    return KeepOutOfRangeConstants()


def quantize_mlprogram(model, precision: str, batches: list[dict] | None, palettize: int | None):
    """Weight (and on macOS activation) quantization of an ML Program; returns (model, record)."""
    import coremltools.optimize.coreml as cto

    record = {"method": f"compute precision {'fp32' if precision == 'fp32' else 'fp16'}"}
    if palettize:
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=palettize))
        model = cto.palettize_weights(model, cfg)
        record["palettized_bits"] = palettize
    if precision in ("int8-weights", "int8"):
        if precision == "int8":
            from coremltools.optimize.coreml.experimental import (
                OpActivationLinearQuantizerConfig,
                linear_quantize_activations,
            )

            act_cfg = cto.OptimizationConfig(global_config=OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
            model = linear_quantize_activations(model, act_cfg, batches)
            record["activations"] = f"int8, calibrated on {len(batches)} samples"
        cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
        model = cto.linear_quantize_weights(model, cfg)
        record["method"] += "; coremltools.optimize linear_quantize_weights (int8, symmetric, per-channel)"
    return model, record


# --- the registered schemes: a neural network (before iOS 15) and an ML Program are quantized differently ------


def _nn(precision: str, doc: str):
    def handler(model, cfg: QuantConfig, ctx: QuantContext):
        return quantize_neuralnetwork(model, cfg.precision)

    handler.__doc__ = doc
    return handler


register_quantizer("coreml-neuralnetwork", "none", "fp32")(_nn("fp32", "fp32 weights, as converted"))
register_quantizer("coreml-neuralnetwork", "weights-fp16", "fp16")(_nn("fp16", "quantize_weights(nbits=16)"))
register_quantizer("coreml-neuralnetwork", "weights-int8", "int8-weights")(
    _nn("int8-weights", "quantize_weights(nbits=8, linear)"))


def _mlprogram(doc: str):
    def handler(model, cfg: QuantConfig, ctx: QuantContext):
        feeds = None
        if ctx.batches and cfg.precision == "int8":
            from slimx._core.inputs import to_numpy_inputs

            feeds = [dict(zip(ctx.input_names, to_numpy_inputs(b), strict=True)) for b in ctx.batches]
        return quantize_mlprogram(model, cfg.precision, feeds, getattr(ctx.options, "palettize", None))

    handler.__doc__ = doc
    return handler


register_quantizer("coreml-mlprogram", "fp32-compute", "fp32")(_mlprogram("fp32 compute (palettized if asked)"))
register_quantizer("coreml-mlprogram", "fp16-compute", "fp16")(_mlprogram("fp16 compute precision"))
register_quantizer("coreml-mlprogram", "linear-weights", "int8-weights")(
    _mlprogram("coremltools.optimize linear_quantize_weights (int8, symmetric, per-channel)"))
register_quantizer("coreml-mlprogram", "w8a8", "int8")(
    _mlprogram("int8 activations (calibrated, macOS only) and int8 weights"))
