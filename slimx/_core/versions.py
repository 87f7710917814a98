"""Versions of the tools a run used, for the report."""

from __future__ import annotations

import platform
from importlib import metadata

_TOOLS = ("torch", "onnx", "onnxscript", "onnxruntime", "timm", "transformers",
          "safetensors", "numpy", "coremltools", "litert-torch", "ai-edge-litert", "executorch", "tensorrt")


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the tools slimx drives (absent ones are left out)."""
    from slimx import __version__  # the code that ran, whatever the distribution is called (slimx-edge on PyPI)

    out = {"python": platform.python_version(), "slimx": __version__}
    for name in (*_TOOLS, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
