"""Op mix: each op's class, FLOPs and bytes from the exported graph, with the fusions runtimes apply."""

import torch
from torch import nn
from torch.nn import functional as F

from slimx.devices.opmix import op_mix, summarize


def _mix(module, *inputs):
    return op_mix(torch.export.export(module.eval(), inputs))


def test_linear_flops_and_bytes():
    (cost,) = _mix(nn.Linear(64, 32), torch.randn(1, 10, 64))
    assert cost.op_class == "matmul"
    assert cost.flops == 2 * 10 * 32 * 64
    # input + weight + bias + output, fp32
    assert cost.bytes == 4 * (10 * 64 + 32 * 64 + 32 + 10 * 32)
    assert cost.module.startswith("<root>") or cost.module == ""


def test_conv_depthwise_and_fused_activation():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.GELU())
    costs = _mix(model, torch.randn(1, 8, 10, 10))
    assert [c.op_class for c in costs] == ["conv", "depthwise", "activation"], "relu after a conv is fused"
    assert costs[0].flops == 2 * 16 * 10 * 10 * 8 * 9
    assert costs[1].flops == 2 * 16 * 10 * 10 * 9
    assert costs[2].module.startswith("3")


def test_residual_add_after_conv_is_marked_fusable():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return F.relu(self.conv(x) + x)

    costs = _mix(Res(), torch.randn(1, 4, 6, 6))
    assert [c.op_class for c in costs] == ["conv", "elementwise"]
    assert costs[1].fusable, "conv + add (+ relu) is one fused kernel in onnxruntime, TensorRT and CoreML"


def test_views_are_free_and_masked_attention_costs_extra():
    class Attn(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, 8, 32)

    q = torch.randn(1, 4, 8, 8)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    classes = [c.op_class for c in _mix(Attn(), q, q, q, mask)]
    assert classes.count("attention") == 1 and classes.count("mask") == 1
    assert "view" not in classes and classes.count("move") == 1  # the transpose copies; the reshape is a view
    summary = summarize(_mix(Attn(), q, q, q, mask))
    assert summary["attention"]["gflops"] > 0


def test_a_dynamic_program_is_priced_at_any_length_as_a_static_one_would_be():
    import torch

    from slimx.devices.opmix import op_mix

    class Attend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.proj(x)
            return torch.softmax(h @ h.transpose(1, 2), -1) @ h

    model = Attend()
    seq = torch.export.Dim("seq", min=1, max=64)
    dynamic = torch.export.export(model, (torch.randn(1, 10, 8),), dynamic_shapes=({1: seq},))

    def work(program, length=None):
        return [(c.op_class, c.flops, c.bytes) for c in op_mix(program, length)]

    assert work(dynamic) == work(torch.export.export(model, (torch.randn(1, 10, 8),))), "at the example's size"
    for length in (3, 40):
        assert work(dynamic, length) == work(torch.export.export(model, (torch.randn(1, length, 8),)))
