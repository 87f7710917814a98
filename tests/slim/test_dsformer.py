import pytest
import torch

from slimx._core.errors import UsageError
from slimx.slim import PassContext, finalize, parse_pass
from slimx.slim.dsformer import DenseSparseLinear, DSFormerConfig, dsformer, sparsity_mask


def test_masks_per_row_and_n_of_m():
    coeff = torch.randn(6, 16)
    per_row = sparsity_mask(coeff, 3, None)
    assert (per_row.sum(1) == 3).all()
    kept = coeff.abs() * per_row
    assert torch.equal(kept.max(1).values, coeff.abs().max(1).values), "the largest survive"
    nm = sparsity_mask(coeff, 0, (2, 4))
    assert (nm.reshape(6, 4, 4).sum(-1) == 2).all()


def _dense_sparse_target(out_f=128, in_f=64, k=32, nnz=4, seed=0):
    """A weight that is exactly basis x sparse coefficients, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, in_f, generator=gen)
    coeff = torch.randn(out_f, k, generator=gen) * sparsity_mask(torch.randn(out_f, k, generator=gen), nnz, None)
    return coeff @ basis + 0.01 * torch.randn(out_f, in_f, generator=gen)


def test_stf_beats_its_svd_initialisation():
    lin = torch.nn.Linear(64, 128)
    with torch.no_grad():
        lin.weight.copy_(_dense_sparse_target())
    model = torch.nn.Sequential(lin)
    result = dsformer(model, DSFormerConfig(k_ratio=0.5, nnz=4, steps=300, lr=5e-3, min_features=32), PassContext())
    (entry,) = result.layers
    assert entry["k"] == 32 and entry["sparse_side"] == "out" and entry["nonzeros_per_row"] == 4
    assert entry["rel_err"] < 0.8 * entry["rel_err_init"], entry  # STF finds a local optimum, clearly better
    assert entry["param_ratio"] < 0.5


def test_export_form_computes_the_same_and_is_plain_linears():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 96)).eval()
    new = dsformer(model, DSFormerConfig(k_ratio=0.5, nnz=8, steps=20, min_features=32), PassContext()).model
    assert isinstance(new[0], DenseSparseLinear) and new[0].sparse_out is False  # in (96) > out (64)
    x = torch.randn(3, 96)
    want = new(x)
    finalize(new)
    assert all(type(m) in (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sequential) for m in new.modules())
    torch.testing.assert_close(new(x), want, rtol=1e-5, atol=1e-5)
    sparse = new[0][0].weight  # the sparse factor comes first when in > out
    assert int((sparse != 0).sum(1).max()) <= 8


def test_density_scales_with_the_row_it_applies_to():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    result = dsformer(model, DSFormerConfig(k_ratio=0.5, density=0.25, steps=0, min_features=32), PassContext())
    up, down = result.layers
    assert up["sparse_side"] == "out" and up["nonzeros_per_row"] == 8  # rows of k = 32
    assert down["nonzeros_per_row"] == 32  # rows of in_features = 128
    assert result.model[0].mask.sum(1).eq(8).all() and result.model[1].mask.sum(1).eq(32).all()
    assert up["stored_values"] == 32 * 64 + 128 * 8 + 128  # basis + non-zeros + bias
    with pytest.raises(UsageError):
        parse_pass("dsformer:density=1.5")


def test_config_is_strict():
    with pytest.raises(UsageError, match="nm must look like"):
        parse_pass("dsformer:nm=4:2")
    with pytest.raises(UsageError, match="unknown option"):
        parse_pass("dsformer:rank=3")


def test_2_4_coefficients_reach_tensorrt_as_sparse_weights(tmp_path):
    from slimx._core.inputs import InputSpec
    from slimx.devices import load_device
    from slimx.export import Program, export_program
    from slimx.targets import CompileOptions, get_target

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    new = finalize(dsformer(model, DSFormerConfig(k_ratio=0.5, nm="2:4", steps=10, min_features=32),
                            PassContext()).model)
    x = torch.randn(1, 64)
    program = Program("ds", export_program(new, (x,)), new, [InputSpec("x", (1, 64))], ["y"])
    artifact = get_target("tensorrt").compile(program, load_device("jetson-orin-nano"), CompileOptions(), tmp_path)
    assert len(artifact.meta["sparse_2_4_weights"]) >= 1
    assert "--sparsity=enable" in (tmp_path / "build_engine.sh").read_text()
