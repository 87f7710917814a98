"""Layer-wise reconstruction: the maps a pass cut or factorized are refit by least squares, judged on held-out
batches, and the pipeline records it per pass."""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimx.slim import PassContext
from slimx.slim.lowrank import LowRankConfig, lowrank
from slimx.slim.reconstruct import reconstruct, refit_targets, summary


class _FFN(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def _batches(n: int, seed: int = 0, d: int = 32):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5  # correlated channels, as real activations are
    return [(torch.randn(16, d, generator=gen) @ mix * 3,) for _ in range(n)]


def _cut_ffn(model: _FFN, keep: int) -> _FFN:
    """Keep the first ``keep`` hidden neurons, weights sliced as the FFN passes slice them."""
    cut = copy.deepcopy(model)
    idx = torch.arange(keep)
    fc1, fc2 = nn.Linear(32, keep), nn.Linear(keep, 32)
    with torch.no_grad():
        fc1.weight.copy_(model.fc1.weight[idx])
        fc1.bias.copy_(model.fc1.bias[idx])
        fc2.weight.copy_(model.fc2.weight[:, idx])
        fc2.bias.copy_(model.fc2.bias)
    cut.fc1, cut.fc2 = fc1, fc2
    return cut


def _error(a, b, batches) -> float:
    with torch.no_grad():
        return float(sum(((a(*x) - b(*x)) ** 2).sum() for x in batches) / sum((b(*x) ** 2).sum() for x in batches))


def test_a_cut_ffn_is_refit_and_gets_closer_to_the_uncut_model_on_held_out_data():
    torch.manual_seed(0)
    model = _FFN().eval()
    cut = _cut_ffn(model, 48)
    assert [(t.path, t.kind) for t in refit_targets(cut, model)] == [("fc2", "linear")]
    held_out = _batches(4, seed=9)
    before = _error(cut, model, held_out)
    records = reconstruct(cut, model, _batches(24), progress=None)
    after = _error(cut, model, held_out)
    assert records[0]["kept"] and records[0]["judged_on"] == "held-out batches"
    assert records[0]["rel_err_after"] < records[0]["rel_err_before"]
    assert after < 0.8 * before, (before, after)
    assert summary(records)["refit"] == 1 and cut.fc2.in_features == 48


def test_a_refit_that_does_not_help_on_held_out_batches_is_not_kept():
    torch.manual_seed(0)
    model = _FFN().eval()
    cut = _cut_ffn(model, 127)  # nearly nothing cut; with 4 fit rows per feature, least squares overfits
    weight = cut.fc2.weight.detach().clone()
    tiny = [(b[0][:1],) for b in _batches(8)]
    records = reconstruct(cut, model, tiny, damping=1e-12)
    assert not records[0]["kept"] and torch.equal(cut.fc2.weight, weight)


def test_a_low_rank_factorization_refits_its_up_factor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    result = lowrank(model, LowRankConfig(rank_ratio=0.25, multiple=1, min_features=8, activation_aware=False),
                     PassContext())
    targets = refit_targets(result.model, model)
    assert {(t.path, t.kind) for t in targets} == {("0", "lowrank-up"), ("2", "lowrank-up")}
    records = reconstruct(result.model, model, _batches(24))
    assert all(r["rel_err_after"] <= r["rel_err_before"] for r in records)
    assert any(r["kept"] for r in records)
    assert model[0].in_features == 32 and isinstance(model[0], nn.Linear), "the reference is untouched"
