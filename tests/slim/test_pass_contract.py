"""The contract every registered pass keeps, checked over the registry (a new pass is covered on registration):
the input model is untouched, the plan is plain data, every selected layer is reported, the result exports
with torch.export (before and after finalize), and its recipe round-trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from slimx._core.config import config_from_dict
from slimx.slim import PASSES, PassContext, PassSpec, finalize, load_recipe, recipe_text

# each pass registers the options that keep it fast here (and make the search passes take something away) and the
# tiny model it runs on (``register_pass(test_options=..., test_model=...)``): a new pass needs no edit of this file
FAST = {name: PASSES.get(name).test_options for name in PASSES.names()}
ATTENTION_PASSES = tuple(name for name in PASSES.names() if PASSES.get(name).test_model == "vit")


def _model(name: str = ""):
    torch.manual_seed(0)
    if name in ATTENTION_PASSES:  # a two-block timm ViT: attention the adapters know
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10).eval()
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10)).eval()


def _inputs(name: str, batch: int, gen=None):
    shape = (batch, 3, 32, 32) if name in ATTENTION_PASSES else (batch, 128)
    return (torch.randn(*shape, generator=gen),)


def _calib(name: str = "", n=6):
    gen = torch.Generator().manual_seed(1)
    return [_inputs(name, 2, gen) for _ in range(n)]


@pytest.mark.parametrize("name", PASSES.names())
def test_pass_contract(name, tmp_path):
    entry = PASSES.get(name)
    cfg = config_from_dict(entry.config_cls, FAST.get(name, {}), name)
    model = _model(name)
    before = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    ctx = PassContext(calib=_calib(name), teacher=model)
    if entry.latency_driven:  # a latency-driven pass prices its steps on the device's latency model
        from slimx.devices import load_device
        from slimx.devices.estimator import EstimatorLatencyModel

        ctx.latency_model = EstimatorLatencyModel.for_device(load_device("host"), "fp32")

    plan = entry.plan(model, cfg, ctx)
    json.dumps(plan)  # plain data: no tensors or modules hidden in it
    result = entry.apply(model, plan, cfg, ctx)

    assert [type(m) for m in model.modules()] == kinds, "the input model's modules are unchanged"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=f"{key} of the input model changed")
    assert result.name == name and result.summary
    selected = entry.selects(model, cfg)
    assert selected and {e["layer"] for e in result.layers} == set(selected), "every selected layer is reported"
    assert any("skipped" not in e for e in result.layers), "the default config changes something on this model"
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert [type(m) for m in result.model.modules()] != kinds or {
        k: v.shape for k, v in result.model.state_dict().items()} != shapes, "the pass changed the model's form"

    x = _inputs(name, 3)
    for candidate in (result.model, finalize(copy.deepcopy(result.model))):
        exported = torch.export.export(candidate.eval(), x, strict=False)
        torch.testing.assert_close(exported.module()(*x), candidate(*x))

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text([PassSpec(name, cfg)]))
    assert load_recipe(recipe) == [PassSpec(name, cfg)], "the recipe reproduces the pass and its config"
