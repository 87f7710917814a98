"""slimx: compress a trained PyTorch model, compile it for an edge device, and prove the result.

The front door (``slimx.api``)::

    import slimx

    result = slimx.export(model, "iphone12", example_inputs=(x,))   # an nn.Module, or "minilm", "timm:NAME", ...
    result.parity.passed, result.latency.ms, result.latency.interval_ms, result.artifact
    module, records = slimx.compress(model, ["lowrank:rank_ratio=0.5"], calib="text.txt")
    slimx.profile("timm:deit_tiny_patch16_224", "jetson-orin-nano").latency
    slimx.gate("gate.toml").passed

Importing ``slimx`` is cheap: the names below load on first use, and no converter, runtime or model zoo loads
until a stage needs it. Each stage is a subpackage (``slimx.export``, ``slimx.slim``, ``slimx.quant``,
``slimx.targets``, ``slimx.devices``).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it (loaded on first access)
_LAZY = {
    "export": "slimx.api", "compress": "slimx.api", "profile": "slimx.api", "evaluate": "slimx.api",
    "gate": "slimx.api",
    "ExportResult": "slimx.api", "Compression": "slimx.api", "ProfileResult": "slimx.api", "EvalResult": "slimx.api",
    "GateResult": "slimx.api", "Parity": "slimx.api", "Fidelity": "slimx.api", "Latency": "slimx.api",
    "TimingConfig": "slimx.devices.timing", "RecoverConfig": "slimx.slim.recover",
    "LowRankConfig": "slimx.slim.lowrank", "DSFormerConfig": "slimx.slim.dsformer",
    "EcoFormerConfig": "slimx.slim.ecoformer", "AxFormerConfig": "slimx.slim.axformer",
    "HardAttentionConfig": "slimx.slim.hardattention", "SlimmingConfig": "slimx.slim.slimming",
    "Progress": "slimx._core.progress",
    "SlimxError": "slimx._core.errors", "UsageError": "slimx._core.errors", "SlimxFailure": "slimx._core.errors",
}

__all__ = ["__version__", *sorted(_LAZY)]


# ``slimx.export``, ``slimx.evaluate`` and ``slimx.gate`` are the API's functions, and also a subpackage and two
# modules of that name (``from slimx.export import load_model`` keeps working: it reads ``sys.modules``). Importing
# a submodule sets it as an attribute of its parent; for these names the function stays.
_FUNCTIONS = frozenset({"export", "evaluate", "gate", "compress", "profile"})


class _FrontDoor(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # a submodule of that name stays in sys.modules only
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FrontDoor


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
