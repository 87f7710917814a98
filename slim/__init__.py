"""Compression passes from the papers, the distillation ("recover") step and fidelity measures.

Each pass is a strict config plus a registered function ``apply(model, cfg, ctx) -> PassResult``
(``slimx.slim.base``): ``lowrank`` (LRT), ``dsformer`` (DSFormer), ``ecoformer`` (hashed linear attention),
``axformer`` (accuracy-driven removal), ``hard-attention`` (top-k attention) and ``latency-slim``
(EfficientFormer's latency-driven slimming to a budget). The attention passes reach
each model family through ``slimx.slim.attention``'s adapters.
"""

from slimx.slim import axformer as _axformer  # noqa: F401  (registers the pass)
from slimx.slim import dsformer as _dsformer  # noqa: F401  (registers the pass)
from slimx.slim import ecoformer as _ecoformer  # noqa: F401  (registers the pass)
from slimx.slim import fisher as _fisher  # noqa: F401  (registers the pass)
from slimx.slim import hardattention as _hardattention  # noqa: F401  (registers the pass)
from slimx.slim import lowrank as _lowrank  # noqa: F401  (registers the pass)
from slimx.slim import slimming as _slimming  # noqa: F401  (registers the pass)
from slimx.slim.base import (
    PASSES,
    LatencyModel,
    LayerSelector,
    PassContext,
    PassResult,
    PassSpec,
    finalize,
    load_recipe,
    parse_pass,
    recipe_text,
    register_pass,
    run_pass,
)
from slimx.slim.fidelity import fidelity, torch_fidelity
from slimx.slim.recover import RecoverConfig, recover


def apply(model, specs: list[PassSpec], ctx: PassContext) -> tuple:
    """Run passes in order; return the final model and each pass's result."""
    results = []
    for spec in specs:
        result = run_pass(spec.name, model, spec.config, ctx)
        results.append(result)
        model = result.model
    return model, results


__all__ = [
    "PASSES",
    "LatencyModel",
    "LayerSelector",
    "PassContext",
    "PassResult",
    "PassSpec",
    "RecoverConfig",
    "apply",
    "fidelity",
    "finalize",
    "load_recipe",
    "parse_pass",
    "recipe_text",
    "recover",
    "register_pass",
    "run_pass",
    "torch_fidelity",
]
