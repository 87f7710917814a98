"""Versions of the tools a run used, for the report."""

from __future__ import annotations

import platform
from importlib import metadata

_TOOLS = ("slimx", "torch", "onnx", "onnxscript", "onnxruntime", "timm", "transformers",
          "safetensors", "numpy", "coremltools", "litert-torch", "ai-edge-litert", "tensorrt")


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the tools slimx drives (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in (*_TOOLS, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
