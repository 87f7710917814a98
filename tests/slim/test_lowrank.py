import pytest
import torch
from torch import nn

from slimx._core.errors import UsageError
from slimx.slim import PassContext, apply, load_recipe, parse_pass, recipe_text
from slimx.slim.base import LayerSelector
from slimx.slim.lowrank import LowRankConfig, LowRankLinear, lowrank


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 192), nn.GELU(), nn.Linear(192, 96), nn.GELU(), nn.Linear(96, 16)).eval()


def _calib(n=8):
    gen = torch.Generator().manual_seed(1)
    # inputs with very unequal channel scales: where activation-aware SVD should win
    scale = torch.logspace(-2, 1, 96)
    return [(torch.randn(4, 96, generator=gen) * scale,) for _ in range(n)]


def test_ranks_ratio_rounding_and_skips():
    result = lowrank(_mlp(), LowRankConfig(rank_ratio=0.3, multiple=8, min_features=32), PassContext())
    layers = {e["layer"]: e for e in result.layers}
    assert layers["0"]["rank"] == 32  # 0.3 * 96 = 28.8 -> 29 -> rounded up to 32
    assert layers["2"]["rank"] == 32
    assert "fewer than 32 features" in layers["4"]["skipped"]  # 16 outputs
    assert isinstance(result.model[0], LowRankLinear) and isinstance(result.model[4], nn.Linear)
    assert result.summary["factorized"] == 2 and result.summary["params_after"] == 2 * 32 * (96 + 192)
    assert isinstance(_mlp()[0], nn.Linear), "the input model is not modified"


def test_no_reduction_is_skipped():
    result = lowrank(_mlp(), LowRankConfig(rank_ratio=0.9), PassContext())
    assert all("would not reduce MACs" in e["skipped"] for e in result.layers if "rank" in e)


def test_full_rank_reconstructs_and_low_rank_errs_measurably():
    model = _mlp()
    x = torch.randn(5, 96)
    plan = lowrank(model, LowRankConfig(energy=1.0, multiple=1), PassContext()).layers
    assert all("skipped" in e for e in plan if e["layer"] in ("0", "2")), "energy 1.0 keeps full rank: no gain"
    low = lowrank(model, LowRankConfig(rank_ratio=0.1, multiple=1), PassContext())
    assert 0.05 < low.layers[0]["rel_err"] < 1.0
    assert not torch.allclose(low.model(x), model(x), atol=1e-3)


def test_activation_aware_beats_plain_svd_on_the_data():
    model, calib = _mlp(), _calib()
    cfg = dict(rank_ratio=0.2, multiple=1, include=("^0$",), exclude=(".",))
    aware = lowrank(model, LowRankConfig(activation_aware=True, **cfg), PassContext(calib=calib))
    plain = lowrank(model, LowRankConfig(activation_aware=False, **cfg), PassContext(calib=calib))
    x = torch.cat([b[0] for b in calib])
    ref = model[0](x)
    err_aware = (aware.model[0](x) - ref).norm() / ref.norm()
    err_plain = (plain.model[0](x) - ref).norm() / ref.norm()
    assert err_aware < 0.7 * err_plain, (float(err_aware), float(err_plain))
    diag = lowrank(model, LowRankConfig(activation_aware="diag", **cfg), PassContext(calib=calib))
    err_diag = (diag.model[0](x) - ref).norm() / ref.norm()
    assert err_aware <= err_diag + 1e-6, "whitening is the least-output-error factorization"
    assert aware.layers[0]["error_on"] == "calibration activations"
    assert aware.layers[0]["rel_err"] == pytest.approx(float(err_aware), rel=1e-3)


def test_parameter_budget():
    result = lowrank(_mlp(), LowRankConfig(param_budget=0.25, multiple=1), PassContext())
    for e in result.layers:
        if "rank" in e and "skipped" not in e:
            assert e["params_after"] <= 0.25 * e["params_before"] + e["in"] + e["out"]


def test_selector_precedence():
    sel = LayerSelector(include=("keep_me",), exclude=("attn",), types=("Linear",))
    assert sel.selects("attn.keep_me", nn.Linear(2, 2)), "include regex beats exclude"
    assert not sel.selects("block.attn.q", nn.Linear(2, 2)), "exclude beats type"
    assert not sel.selects("block.conv", nn.Conv2d(1, 1, 1)), "type filter"
    assert LayerSelector().selects("anything", nn.Linear(2, 2)), "global default"


def test_strict_configs_and_recipe_round_trip(tmp_path):
    with pytest.raises(UsageError, match="unknown option"):
        parse_pass("lowrank:rank=4")
    with pytest.raises(UsageError, match="give one of"):
        parse_pass("lowrank:rank_ratio=0.5,energy=0.9")
    with pytest.raises(UsageError, match="not a number"):
        parse_pass("lowrank:rank_ratio=half")
    with pytest.raises(UsageError, match="unknown pass"):
        parse_pass("dsformerr:k=4")
    spec = parse_pass("lowrank:energy=0.9,multiple=16,exclude=attention|pooler")
    assert spec.config.exclude == ("attention", "pooler")
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_text([spec]))
    assert load_recipe(path) == [spec]


def test_apply_runs_passes_in_order():
    specs = [parse_pass("lowrank:rank_ratio=0.5,include=^0$,exclude=."), parse_pass("lowrank:rank_ratio=0.5,"
                                                                                   "include=^2$,exclude=.")]
    model, results = apply(_mlp(), specs, PassContext())
    assert [r.summary["factorized"] for r in results] == [1, 1]
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)


def test_spread_keeps_the_product_and_flattens_an_outlier_channel():
    torch.manual_seed(0)
    layer = LowRankLinear(64, 48, 16, bias=True)
    with torch.no_grad():
        layer.down.weight[0] *= 50.0  # one bottleneck channel carries most of the range
    x = torch.randn(32, 64)
    before, peak_before = layer(x), layer.down(x).abs().amax(0)
    layer.spread_()
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)
    peak_after = layer.down(x).abs().amax(0)
    # per-tensor int8 resolution is set by the largest channel: the smallest channels' peaks rise toward it
    assert peak_after.max() < 0.6 * peak_before.max()
    assert (peak_after.min() / peak_after.max()) > 5 * (peak_before.min() / peak_before.max())


def test_apply_reuses_the_plans_factors_and_ticks_per_layer(monkeypatch):
    """One SVD per layer for plan and apply together (apply reuses the plan's factors at the planned rank)."""
    import slimx.slim.lowrank as lowrank_module
    from slimx._core.progress import Progress

    calls = []
    real = lowrank_module.whitened_svd
    monkeypatch.setattr(lowrank_module, "whitened_svd", lambda w, r=None: calls.append(w.shape) or real(w, r))
    ticks = []

    class Recording(Progress):
        def tick(self, label, done, total, detail=""):
            ticks.append((label, done, total))

    result = lowrank(_mlp(), LowRankConfig(rank_ratio=0.3, multiple=8, min_features=32),
                     PassContext(calib=_calib(), progress=Recording(total=1, enabled=False)))
    assert result.summary["factorized"] == 2 and len(calls) == 2
    assert ticks[0] == ("lowrank: SVD per layer", 0, 3) and ticks[-1] == ("lowrank: SVD per layer", 3, 3)
