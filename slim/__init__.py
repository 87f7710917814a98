"""Compression passes from the papers (LRT, DSFormer, EcoFormer, AxFormer, EfficientFormer slimming).

Each pass is a strict config plus a registered function
``apply(model, cfg, ctx) -> PassResult``; the passes themselves land in later versions.
"""

from slimx._core.registry import Registry

PASSES: Registry = Registry("pass")

__all__ = ["PASSES"]
