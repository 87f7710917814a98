"""One backend per format (onnx, coreml, tflite, tensorrt, executorch) behind one small protocol.

Example:
    >>> from slimx.targets import get_target
    >>> get_target("onnx").extension
    '.onnx'
"""

# importing each backend registers it; none imports its converter until it is used
from slimx.targets import coreml as _coreml  # noqa: F401
from slimx.targets import executorch as _executorch  # noqa: F401
from slimx.targets import onnx as _onnx  # noqa: F401
from slimx.targets import tensorrt as _tensorrt  # noqa: F401
from slimx.targets import tflite as _tflite  # noqa: F401
from slimx.targets.base import (
    TARGETS,
    Artifact,
    CompileOptions,
    Coverage,
    NoOptions,
    OptionFlag,
    Runner,
    RunnerInfo,
    Target,
    Timing,
    all_targets,
    artifact_suffixes,
    available_formats,
    get_target,
    load_plugins,
    option_flag_values,
    option_flags,
    register_target,
    target_for_path,
    timed_calls,
)

load_plugins()  # targets registered outside this package (SLIMX_PLUGINS)

__all__ = [
    "TARGETS",
    "Artifact",
    "CompileOptions",
    "Coverage",
    "NoOptions",
    "OptionFlag",
    "Runner",
    "RunnerInfo",
    "Target",
    "Timing",
    "all_targets",
    "artifact_suffixes",
    "available_formats",
    "get_target",
    "load_plugins",
    "option_flag_values",
    "option_flags",
    "register_target",
    "target_for_path",
    "timed_calls",
]
