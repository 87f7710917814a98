"""Attention adapters: the same math through the common view on timm ViT/DeiT, timm EfficientFormer and Hugging
Face BERT; heads, FFN neurons and whole branches removed with the weights physically sliced; unknown attention
modules refused in one line."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from slimx._core.errors import UsageError
from slimx.slim.attention import (
    BranchData,
    SoftmaxKernel,
    TopKSoftmaxKernel,
    attention_modules,
    blocks,
    kernelize,
    prune_heads,
)


def _tiny_timm(name: str, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    from slimx.export import load_model

    loaded = load_model(f"hf:{tiny_bert_dir}", input_shapes=["1x12"])
    ids = torch.randint(5, 30, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # padding: the mask must reach the kernel
    return loaded.module.eval(), (ids, mask)


def _vit():
    return _tiny_timm("vit_tiny_patch16_224", img_size=64, depth=2), (torch.randn(2, 3, 64, 64),)


def _efficientformer():
    model = _tiny_timm("efficientformer_l1")
    with torch.no_grad():  # non-zero relative-position biases, so that dropping them would show
        for view in attention_modules(model):
            view.module.attention_biases.normal_()
    return model, (torch.randn(1, 3, 224, 224),)


@pytest.mark.parametrize("family", ["vit", "efficientformer", "bert"])
def test_softmax_kernel_reproduces_each_family(family, bert):
    model, x = {"vit": _vit, "efficientformer": _efficientformer, "bert": lambda: bert}[family]()
    with torch.no_grad():
        before = model(*x)
    views = attention_modules(model)
    assert views and {v.family for v in views} == {"vit": {"timm-attention"},
                                                   "efficientformer": {"efficientformer-attention"},
                                                   "bert": {"bert-self-attention"}}[family]
    swapped = __import__("copy").deepcopy(model)
    for view in views:
        kernelize(swapped, view.path, SoftmaxKernel())
    with torch.no_grad():
        torch.testing.assert_close(swapped(*x), before, rtol=1e-4, atol=1e-5)
    assert [v.path for v in attention_modules(swapped)] == [v.path for v in views], "the view sees through"
    exported = torch.export.export(swapped, x, strict=False)
    torch.testing.assert_close(exported.module()(*x), before, rtol=1e-4, atol=1e-5)


def test_topk_with_every_key_kept_is_softmax(bert):
    model, x = bert
    swapped = __import__("copy").deepcopy(model)
    for view in attention_modules(swapped):
        kernelize(swapped, view.path, TopKSoftmaxKernel(k=64))
    with torch.no_grad():
        torch.testing.assert_close(swapped(*x), model(*x), rtol=1e-4, atol=1e-5)
        for view in attention_modules(swapped):
            kernelize(swapped, view.path, TopKSoftmaxKernel(k=2))
        assert not torch.allclose(swapped(*x), model(*x), atol=1e-4), "k=2 attends to fewer keys"


@pytest.mark.parametrize("family", ["vit", "efficientformer", "bert"])
def test_heads_are_cut_from_the_weights(family, bert):
    import copy

    model, x = {"vit": _vit, "efficientformer": _efficientformer, "bert": lambda: bert}[family]()
    model = copy.deepcopy(model)
    view = attention_modules(model)[0]
    params = sum(p.numel() for p in model.parameters())
    keep = list(range(view.num_heads))[1:]
    prune_heads(model, view.path, keep)
    after = attention_modules(model)[0]
    assert after.num_heads == view.num_heads - 1
    assert sum(p.numel() for p in model.parameters()) < params
    with torch.no_grad():
        out = model(*x)
    assert torch.isfinite(out).all()
    torch.export.export(model, x, strict=False)


def test_removing_every_head_is_refused(bert):
    import copy

    model = copy.deepcopy(bert[0])
    with pytest.raises(UsageError, match="remove the block's attention branch"):
        prune_heads(model, attention_modules(model)[0].path, [])


@pytest.mark.parametrize("family", ["vit", "efficientformer", "bert"])
def test_blocks_lose_branches_and_ffn_neurons(family, bert):
    import copy

    model, x = {"vit": _vit, "efficientformer": _efficientformer, "bert": lambda: bert}[family]()
    model = copy.deepcopy(model)
    found = blocks(model)
    assert found and all(b.ffn is not None for b in found)
    params = sum(p.numel() for p in model.parameters())
    last = found[-1]
    keep = last.ffn.importance(model).argsort(descending=True)[: last.ffn.hidden // 2].sort().values.tolist()
    last.ffn.prune(model, keep)
    assert blocks(model)[-1].ffn.hidden == last.ffn.hidden // 2
    attn_block = next(b for b in found if b.attention_kind == "attention")
    attn_block.remove_attention(model)
    found[0].remove_ffn(model)
    after = blocks(model)
    assert next(b for b in after if b.path == attn_block.path).attention_kind == "removed"
    assert after[0].ffn is None and sum(p.numel() for p in model.parameters()) < params
    with torch.no_grad():
        out = model(*x)
    assert torch.isfinite(out).all()
    program = torch.export.export(model, x, strict=False)
    torch.testing.assert_close(program.module()(*x), out)


@pytest.mark.parametrize("family", ["vit", "efficientformer", "bert"])
def test_a_removed_branch_keeps_its_mean_output(family, bert):
    """With calibration data, a removed branch adds its mean output over the data's real tokens (a constant, no
    weights): the model stays closer to the original than with the branch zeroed, and still exports."""
    import copy

    original, x = {"vit": _vit, "efficientformer": _efficientformer, "bert": lambda: bert}[family]()
    mask_index = 1 if family == "bert" else None
    block = blocks(original)[-1]
    branch = f"{block.path}.output.dense" if family == "bert" else block.ffn.path
    seen = []
    handle = original.get_submodule(branch).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        reference = original(*x)
    handle.remove()
    out = seen[0]
    if family == "bert":  # real tokens only: the second sentence's padding does not count
        expected = out[x[1].bool()].mean(0)
    elif out.dim() == 4:
        expected = out.mean((0, 2, 3), keepdim=True)
    else:
        expected = out.reshape(-1, out.shape[-1]).mean(0)
    zeroed, kept = copy.deepcopy(original), copy.deepcopy(original)
    block.remove_ffn(zeroed)
    block.remove_ffn(kept, BranchData([x], mask_index))
    removed = kept.get_submodule(block.path + (".output" if family == "bert" else ".mlp"))
    torch.testing.assert_close(removed.mean.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        cos = {name: torch.nn.functional.cosine_similarity(m(*x).flatten(1), reference.flatten(1)).mean().item()
               for name, m in (("zeroed", zeroed), ("kept", kept))}
    assert cos["kept"] >= cos["zeroed"] - 1e-6, cos
    program = torch.export.export(kept, x, strict=False)
    torch.testing.assert_close(program.module()(*x), kept(*x))


def test_an_unknown_attention_module_is_one_line():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_qkv = nn.Linear(8, 24)

        def forward(self, x):
            return x

    model = nn.Sequential(MyAttention())
    with pytest.raises(UsageError) as info:
        attention_modules(model)
    line = info.value.line()
    assert "MyAttention" in line and "add an adapter" in line and "\n" not in line


def test_topk_exports_with_a_dynamic_sequence_axis(bert):
    """Top-k with k above some lengths and below others, one exported graph: no branch on the length."""
    import copy

    model, (ids, mask) = bert
    swapped = copy.deepcopy(model)
    for view in attention_modules(swapped):
        kernelize(swapped, view.path, TopKSoftmaxKernel(k=5))
    seq = torch.export.Dim("seq", min=2, max=12)
    exported = torch.export.export(swapped, (ids, mask), dynamic_shapes=({1: seq}, {1: seq}), strict=False)
    with torch.no_grad():
        for n in (3, 12):  # fewer keys than k: every key stays; more: five stay
            x = (ids[:, :n], mask[:, :n])
            torch.testing.assert_close(exported.module()(*x), swapped(*x), rtol=1e-4, atol=1e-5)
        x = (ids[:, :3], mask[:, :3])
        torch.testing.assert_close(swapped(*x), model(*x), rtol=1e-4, atol=1e-5)
