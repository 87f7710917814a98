"""latency-slim: the search space from the model's structure, a budget met on the device's latency model, the
trajectory and final architecture in the report, and the budget's usage errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import timm
import torch

from slimx._core.errors import SlimxFailure
from slimx.cli import main
from slimx.devices import load_device
from slimx.devices.estimator import EstimatorLatencyModel
from slimx.slim import PassContext, run_pass
from slimx.slim.slimming import SlimmingConfig, candidates
from tests.slim.test_attention_passes import _calib, vit_factory

FAST = ["--runs", "30", "--warmup", "1", "-q"]


def _ctx(model, calib=None):
    return PassContext(calib=calib or _calib(24), teacher=model,
                       latency_model=EstimatorLatencyModel.for_device(load_device("host"), "fp32"))


def test_the_search_space_is_the_models_structure():
    model = vit_factory()
    found = candidates(model, 16, SlimmingConfig(budget_ms=1.0))
    actions = {c.action for c in found}
    assert actions == {"remove-attention", "remove-ffn", "remove-block", "narrow-ffn", "drop-head"}
    narrow = next(c for c in found if c.action == "narrow-ffn")
    assert narrow.detail == {"from": 256, "to": 224}, "an eighth of the width, in the device's multiple (16)"
    fine = next(c for c in candidates(model, 16, SlimmingConfig(budget_ms=1.0, ffn_step=0.01))
                if c.action == "narrow-ffn")
    assert fine.detail == {"from": 256, "to": 240}, "at least one multiple"
    assert sum(c.action == "drop-head" for c in found) == 2 * 4


@pytest.mark.parametrize("importance", ["loss", "taylor"])
def test_a_budget_is_met_on_the_latency_model(importance):
    model = vit_factory()
    ctx = _ctx(model)
    start = ctx.latency_model.latency(model, _calib(1)[0])["ms"]
    budget = start * 0.6
    result = run_pass("latency-slim", model, SlimmingConfig(budget_ms=budget, importance=importance,
                                                            min_fidelity=0.01, recover_steps=0), ctx)
    assert result.summary["within_budget"] and result.summary["latency_after_ms"] <= budget
    traj = result.extra["trajectory"]
    assert traj[0]["step"] == 0 and traj[-1]["latency_ms"] <= budget
    assert all(b["latency_ms"] < a["latency_ms"] for a, b in itertools.pairwise(traj)), traj
    assert all(p["interval_ms"] for p in traj), "every point carries the estimate's interval"
    assert result.extra["architecture"] != result.extra["architecture_before"]
    steps = result.extra["steps"]
    assert all(s["importance"] == importance and s["saving_ms"] > 0 for s in steps)
    for r in {s["round"] for s in steps}:  # a round takes up to per_round actions, each on its own block
        blocks_of_round = [s["block"] for s in steps if s["round"] == r]
        assert 1 <= len(blocks_of_round) <= 4 and len(set(blocks_of_round)) == len(blocks_of_round)


def test_a_budget_that_would_destroy_the_model_stops_with_the_closest_point():
    model = vit_factory()
    ctx = _ctx(model)
    with pytest.raises(SlimxFailure) as info:
        run_pass("latency-slim", model, SlimmingConfig(budget_ms=1e-4, min_fidelity=0.999, recover_steps=0), ctx)
    line = info.value.line()
    assert "cannot be met without fidelity falling below 0.999" in line and "closest point reached" in line


def test_export_with_a_budget(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32))
    model = vit_factory()
    start = EstimatorLatencyModel.for_device(load_device("host"), "fp32").latency(model, (torch.randn(1, 3, 32, 32),))
    out = tmp_path / "o"
    budget = round(start["ms"] * 0.7, 4)
    code = main(["export", "tests.slim.test_attention_passes:vit_factory", "--calib", str(tmp_path / "calib.npz"),
                 "--budget-ms", str(budget), "--min-fidelity", "0.01", "--out", str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["passes"]
    assert entry["name"] == "latency-slim" and entry["summary"]["within_budget"]
    assert entry["trajectory"][-1]["latency_ms"] <= budget and entry["architecture"]
    assert report["parity"]["passed"]
    assert main(["export", "tests.slim.test_attention_passes:vit_factory", "--target", "iphone12", "--budget-ms",
                 "0.01", "--out", str(tmp_path / "p"), *FAST]) == 2
    assert "fixed per-inference overhead" in capsys.readouterr().err


def test_the_latency_table_sees_a_removal_without_weights():
    # EfficientFormer's pooling mixer has no weights: a table keyed on weight shapes alone kept pricing the model
    # from before its removal (the trajectory stood still while the search kept taking the same "saving")
    from slimx.slim.attention import blocks
    from slimx.slim.slimming import LatencyTable

    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1", pretrained=False).eval()
    example = (torch.randn(1, 3, 224, 224),)
    lut = LatencyTable(PassContext(calib=[example], latency_model=EstimatorLatencyModel.for_device(
        load_device("iphone12"), "fp16")), example, measure=False)
    before = lut.total(model)["ms"]
    (pooling,) = [b for b in blocks(model) if b.path == "stages.0.blocks.1"]
    assert pooling.attention_kind == "pooling"
    pooling.remove_attention(model)
    assert lut.total(model)["ms"] < before
