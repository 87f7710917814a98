"""fp16 / int8 / weight-only quantization, each through the target's own tool (later versions)."""

PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")

__all__ = ["PRECISIONS"]
