import numpy as np
import torch

from slimx.slim import RecoverConfig, fidelity, recover, torch_fidelity
from slimx.slim.base import PassContext
from slimx.slim.lowrank import LowRankConfig, lowrank


def test_distillation_recovers_fidelity_on_held_out_data():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 32, generator=gen),) for _ in range(40)]
    train, heldout = data[:30], data[30:]
    student = lowrank(teacher, LowRankConfig(rank_ratio=0.2, multiple=1), PassContext(calib=train)).model
    before = torch_fidelity(teacher, student, heldout)["cosine_mean"]
    student, record = recover(student, teacher, train, RecoverConfig(steps=150, lr=3e-3, patience=50))
    after = torch_fidelity(teacher, student, heldout)["cosine_mean"]
    assert after > before + 0.01, (before, after)
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    assert not any(p.requires_grad for p in student.parameters())


def test_fidelity_nearest_neighbour_agreement():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal(8) for _ in range(6)]
    same = fidelity(ref, [r * 3.0 for r in ref])
    assert same["cosine_mean"] == 1.0 and same["nn_agreement"] == 1.0
    shuffled = fidelity(ref, ref[1:] + ref[:1])
    assert shuffled["nn_agreement"] < 1.0 and shuffled["cosine_mean"] < 0.9
    labelled = fidelity([np.array([1.0, 0.0]), np.array([0.0, 1.0])], [np.array([0.9, 0.1]), np.array([0.8, 0.2])],
                        labels=[0, 1])
    assert labelled["accuracy_reference"] == 1.0 and labelled["accuracy"] == 0.5


class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 32)
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU())
                                           for _ in range(3)])
        self.out = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


def test_hidden_state_distillation_matches_every_block():
    from slimx.slim.recover import block_paths

    torch.manual_seed(0)
    teacher = _Blocks().eval()
    assert block_paths(teacher) == ["layers.0", "layers.1", "layers.2"]
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 16, generator=gen),) for _ in range(20)]
    cfg = LowRankConfig(rank_ratio=0.25, multiple=1, min_features=8)
    _, record = recover(lowrank(teacher, cfg, PassContext(calib=data)).model, teacher, data,
                        RecoverConfig(steps=20, lr=1e-3))
    assert record["hidden_states_matched"] == 3
    _, plain = recover(lowrank(teacher, cfg, PassContext(calib=data)).model, teacher, data,
                       RecoverConfig(steps=20, hidden=False))
    assert plain["hidden_states_matched"] == 0


def test_recovery_stacks_samples_of_different_lengths():
    from slimx.slim.recover import _stack

    ids, mask = _stack([(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)),
                        (torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))])
    assert ids.shape == (2, 5) and mask[0].tolist() == [1, 1, 1, 0, 0]
