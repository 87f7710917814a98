import torch
from torch import nn

from slimx.export import load_model, to_deployment
from tests.models import RepNet, SharedConvBN, _randomize_bn, tiny_conv_bn


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_conv_and_linear_batch_norms_fold_exactly():
    model = tiny_conv_bn().eval()
    x = torch.randn(2, 3, 12, 12)
    deployed, record = to_deployment(model, (x,))
    assert {p["bn"] for p in record.folded} == {"bn1", "bn2", "bn_head"}
    assert {p["kind"] for p in record.folded} == {"conv", "linear"}
    assert _bns(deployed) == [], "every folded BN is gone"
    assert len(_bns(model)) == 3, "the original is left untouched"
    fresh = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(deployed(fresh), model(fresh), rtol=1e-5, atol=1e-5)
    assert record.check["rel_err"] < 1e-5


def test_conv_called_twice_is_not_folded():
    model = SharedConvBN().eval()
    _randomize_bn(model)
    deployed, record = to_deployment(model, (torch.randn(1, 3, 4, 4),))
    assert record.folded == []
    assert len(_bns(deployed)) == 2


def test_reparameterization_runs_and_keeps_the_function():
    torch.manual_seed(0)
    model = RepNet().eval()
    x = torch.randn(1, 4, 8, 8)
    deployed, record = to_deployment(model, (x,))
    assert record.reparameterized == ["block"]
    assert deployed.block.fused is not None and not hasattr(deployed.block, "k3")
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_timm_mobileone_is_reparameterized():
    loaded = load_model("timm:mobileone_s0")
    x = torch.randn(1, 3, 64, 64)
    deployed, record = to_deployment(loaded.module, (x,))
    assert len(record.reparameterized) > 10
    assert record.check["cosine"] > 0.9999
    assert not any(getattr(m, "rbr_skip", None) is not None for m in deployed.modules()), "branches merged"
