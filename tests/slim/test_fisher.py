"""fisher-prune: heads and FFN neurons ranked across the model by the Fisher information of their masks, cut to
a global MACs budget."""

from __future__ import annotations

import pytest
import torch

from slimx._core.errors import UsageError
from slimx.slim import PassContext
from slimx.slim.base import run_pass
from slimx.slim.fisher import FisherPruneConfig, _groups, fisher_scores, plan_fisher


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10).eval()


def _calib(n: int = 12):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(n)]


def test_a_dead_neuron_scores_zero_and_a_live_one_does_not():
    model = _vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[:, 5] = 0  # neuron 5 of block 1 writes nothing: its mask has no effect
    groups = _groups(model, FisherPruneConfig(), length=65, multiple=8)
    assert [(g.kind, g.mask_at) for g in groups] == [("heads", "blocks.0.attn.proj"), ("ffn", "blocks.0.mlp.fc2"),
                                                     ("heads", "blocks.1.attn.proj"), ("ffn", "blocks.1.mlp.fc2")]
    scores = fisher_scores(model, groups, _calib(4), mask_index=None)
    ffn = scores["blocks.1.mlp.fc2"]
    assert ffn[5] == 0 and (ffn > 0).sum() == ffn.numel() - 1
    assert all(p.requires_grad for p in model.parameters()), "the model's parameters are left as they were"


def test_the_budget_is_met_globally_and_ffn_widths_are_multiples():
    model = _vit()
    result = run_pass("fisher-prune", model, FisherPruneConfig(keep=0.5, samples=8), PassContext(calib=_calib()))
    summary = result.summary
    assert summary["macs_kept"] <= 0.55 and summary["heads_after"] >= 2  # at least one head per attention
    widths = [e["kept"] for e in result.layers if e["kind"] == "ffn"]
    assert all(w % 8 == 0 for w in widths) and widths != [e["units"] for e in result.layers if e["kind"] == "ffn"]
    assert result.model.blocks[0].mlp.fc1.out_features == widths[0]
    out = result.model(*_calib(1)[0])
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_labels_rank_by_the_task_loss():
    model = _vit()
    ctx = PassContext(calib=_calib(), labels=[i % 10 for i in range(12)])
    result = run_pass("fisher-prune", model, FisherPruneConfig(keep=0.7, samples=12), ctx)
    assert result.summary["importance"] == "task loss (labels)"


def test_it_needs_calibration_data():
    with pytest.raises(UsageError, match="calibration data"):
        run_pass("fisher-prune", _vit(), FisherPruneConfig(), PassContext())


def test_rounds_rescore_the_cut_model_and_meet_the_same_budget():
    model = _vit()
    one = plan_fisher(model, FisherPruneConfig(keep=0.5, samples=8), PassContext(calib=_calib()))
    cfg = FisherPruneConfig(keep=0.5, samples=8, rounds=3, refit_samples=8)
    three = plan_fisher(model, cfg, PassContext(calib=_calib(), teacher=model))
    assert all(0 <= i < e["units"] for e in three for i in e["keep"])  # indices into the original layers
    assert [e["keep"] for e in three] != [e["keep"] for e in one], "the later rounds re-ranked on the cut model"
    result = run_pass("fisher-prune", model, cfg, PassContext(calib=_calib(), teacher=model))
    assert result.summary["rounds"] == 3 and 0.45 <= result.summary["macs_kept"] <= 0.55
    out = result.model(*_calib(1)[0])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
