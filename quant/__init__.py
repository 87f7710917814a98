"""fp16 / int8 / weight-only quantization, each through the target's own tool.

One stage with a config: ``quantize(format, subject, QuantConfig, QuantContext)`` (``quant.base``), with the
handlers registered per (format, scheme): ``quant.onnx`` uses onnxruntime.quantization (ONNX and the
TensorRT-ready ONNX), ``quant.tflite`` LiteRT's recipes and PT2E, ``quant.coreml`` coremltools. Calibration
data comes from ``slimx.export.load_calibration``; when a user gives none, ``calibration_batches`` draws
synthetic inputs and says so loudly.
"""

from __future__ import annotations

from slimx._core.errors import UsageError
from slimx.quant import coreml as _coreml  # noqa: F401  (registers its schemes; no SDK imported)
from slimx.quant import executorch as _executorch  # noqa: F401
from slimx.quant import onnx as _onnx  # noqa: F401
from slimx.quant import tflite as _tflite  # noqa: F401
from slimx.quant.base import (
    PRECISIONS,
    QUANTIZERS,
    QuantConfig,
    QuantContext,
    quantize,
    quantizer_for,
    register_quantizer,
    schemes,
)

# how far a quantized artifact may drift from the fp32 PyTorch model before parity fails
# (cosine floor, relative-error ceiling); the user's --min-cosine / --max-rel-err override these
DEFAULT_TOLERANCE = {
    "fp32": (0.9999, 1e-3),
    "fp16": (0.999, 5e-2),
    "int8-weights": (0.98, 0.25),
    "int8": (0.95, 0.35),
}

SYNTHETIC_WARNING = ("int8 calibration on SYNTHETIC random inputs: activation ranges will not match real data "
                     "and accuracy can collapse (MiniLM static int8 on random calibration: cosine 0.33 in a trial "
                     "here); give --calib with real data")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}", "is not a precision slimx knows",
                         f"use one of {', '.join(PRECISIONS)}")
    return precision


def calibration_batches(calib, inputs, count: int = 16, seed: int = 0, warn=None) -> tuple[list[tuple], bool]:
    """Real calibration batches when given, else synthetic ones with a loud warning.

    Returns the batches and whether they are synthetic.
    """
    if calib is not None:
        return list(calib.batches), False
    from slimx._core.inputs import sample_inputs

    if warn is not None:
        warn(SYNTHETIC_WARNING)
    return [sample_inputs(inputs, seed=seed + 5000 + i) for i in range(count)], True


__all__ = ["DEFAULT_TOLERANCE", "PRECISIONS", "QUANTIZERS", "SYNTHETIC_WARNING", "QuantConfig", "QuantContext",
           "calibration_batches", "check_precision", "quantize", "quantizer_for", "register_quantizer", "schemes"]
