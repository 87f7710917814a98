"""Types every stage shares: errors, registries, input specs, progress, versions."""

from slimx._core.errors import SlimxError, SlimxFailure, UsageError
from slimx._core.inputs import InputSpec, parse_input_shapes, sample_inputs
from slimx._core.progress import Progress
from slimx._core.registry import Registry

__all__ = [
    "InputSpec",
    "Progress",
    "Registry",
    "SlimxError",
    "SlimxFailure",
    "UsageError",
    "parse_input_shapes",
    "sample_inputs",
]
