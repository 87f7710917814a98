"""Formats slimx names but does not compile yet; asking for one gets one clear line."""

from __future__ import annotations

from slimx.targets.base import Target, register_target

_LATER = "is not available yet in this version of slimx (it is planned)"


@register_target
class CoreMLTarget(Target):
    name = "coreml"
    extension = ".mlpackage"
    available = False
    unavailable_reason = f"the CoreML target {_LATER}"


@register_target
class TFLiteTarget(Target):
    name = "tflite"
    extension = ".tflite"
    available = False
    unavailable_reason = f"the TFLite target {_LATER}"


@register_target
class TensorRTTarget(Target):
    name = "tensorrt"
    extension = ".plan"
    available = False
    unavailable_reason = f"the TensorRT target {_LATER}"
