"""Model intake, deployment form, torch.export, ONNX conversion and parity checks."""

from slimx.export.calib import CalibrationData, load_calibration
from slimx.export.deploy import to_deployment
from slimx.export.intake import BUILTIN_MODELS, MODEL_FORMS, LoadedModel, load_model
from slimx.export.parity import ParityResult, ParityTolerance, check_parity, compare_outputs, torch_outputs
from slimx.export.program import (
    DEFAULT_OPSET,
    Program,
    check_forward,
    export_program,
    prepare_program,
    program_to_onnx,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_OPSET",
    "MODEL_FORMS",
    "CalibrationData",
    "LoadedModel",
    "ParityResult",
    "ParityTolerance",
    "Program",
    "check_forward",
    "check_parity",
    "compare_outputs",
    "export_program",
    "load_calibration",
    "load_model",
    "prepare_program",
    "program_to_onnx",
    "to_deployment",
    "torch_outputs",
]
