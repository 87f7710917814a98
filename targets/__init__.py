"""One backend per format (onnx, coreml, tflite, tensorrt) behind one small protocol.

Example:
    >>> from slimx.targets import get_target
    >>> get_target("onnx").extension
    '.onnx'
"""

from slimx.targets import onnx as _onnx  # noqa: F401  (registers the target)
from slimx.targets import pending as _pending  # noqa: F401
from slimx.targets.base import (
    TARGETS,
    Artifact,
    CompileOptions,
    Coverage,
    Runner,
    Target,
    Timing,
    available_formats,
    get_target,
    register_target,
)

__all__ = [
    "TARGETS",
    "Artifact",
    "CompileOptions",
    "Coverage",
    "Runner",
    "Target",
    "Timing",
    "available_formats",
    "get_target",
    "register_target",
]
