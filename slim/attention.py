"""Attention adapters: one view of the attention and FFN modules of the model families users bring, so that the
attention passes (EcoFormer, hard attention) and the structural ones (AxFormer, head / FFN-group / block removal)
work on all of them through the same seams.

An adapter recognises a module class and gives:

- ``view(module)``: heads, head and value widths, scale, and the extra additive bias the family carries (the
  relative-position bias of EfficientFormer);
- ``kernelized(module, kernel)``: a drop-in replacement (same call signature) that projects q, k, v with the
  module's own weights and hands them to ``kernel(q, k, v, scale, bias, key_mask)``: softmax attention
  (``SoftmaxKernel``, the original math), top-k (``TopKSoftmaxKernel``) or hashed linear attention
  (``slim.ecoformer``);
- ``prune_heads(module, keep)``: the module with only those heads, weights physically sliced.

Known: timm's ``Attention`` (ViT, DeiT, EfficientFormer-V2-free ViT family), timm EfficientFormer's
``Attention`` (with its attention biases), Hugging Face BERT's ``BertSelfAttention`` (transformers 5, eager or
SDPA masks). An unknown attention module is one line naming its class and how to add an adapter.

Blocks (``blocks(model)``): the residual blocks of timm ViT/DeiT and EfficientFormer (attention or token mixer
branch, MLP branch) and BERT layers (attention, FFN), each branch removable (the residual and its norm kept) and
each FFN narrowable by neuron groups (``FFNView.prune``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slimx._core.errors import UsageError
from slimx._core.registry import Registry

ADAPTERS: Registry = Registry("attention adapter")
HOW_TO_ADD = ("add an adapter in slim/attention.py: a class with matches/view/kernelized/prune_heads, registered with "
              "@register_adapter")


@dataclass
class AttentionView:
    """What the passes need to know of one attention module."""

    path: str
    family: str
    num_heads: int
    head_dim: int  # query/key width per head
    value_dim: int  # value width per head
    scale: float
    has_bias: bool  # an extra additive attention bias (relative positions) the kernel must add
    module: nn.Module

    def to_dict(self) -> dict:
        return {"path": self.path, "family": self.family, "heads": self.num_heads, "head_dim": self.head_dim,
                "value_dim": self.value_dim, "extra_bias": self.has_bias}


def register_adapter(name: str):
    def add(cls):
        ADAPTERS.add(name, cls())
        return cls

    return add


def adapter_for(module: nn.Module):
    """The adapter that knows ``module``'s class, or None."""
    for name in ADAPTERS.names():
        adapter = ADAPTERS.get(name)
        if adapter.matches(module):
            return adapter
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """A module named like attention that holds projections: what an adapter should exist for."""
    name = type(module).__name__.lower()
    if "attention" not in name or "pool" in name or "output" in name or isinstance(module, KernelAttention):
        return False
    return any(isinstance(m, nn.Linear) for m in module.children())


def attention_modules(model: nn.Module, strict: bool = True) -> list[AttentionView]:
    """Every attention module of ``model`` with its view, in model order. ``strict``: an attention-like module
    no adapter knows is a UsageError naming its class (else it is left out)."""
    views = []
    for path, module in model.named_modules():
        if _inside_known(path, views):  # the inner module of a kernelized attention: already seen
            continue
        if isinstance(module, KernelAttention):
            views.append(module.adapter.view(module.inner, path))
            continue
        adapter = adapter_for(module)
        if adapter is not None:
            views.append(adapter.view(module, path))
        elif strict and looks_like_attention(module):
            raise UsageError(f"attention module {path} ({type(module).__module__}.{type(module).__name__})",
                             "is not one slimx has an adapter for (known: " + ", ".join(ADAPTERS.names()) + ")",
                             HOW_TO_ADD)
    return views


def _inside_known(path: str, views: list[AttentionView]) -> bool:
    return any(path.startswith(v.path + ".") for v in views)


# --------------------------------------------------------------------------- kernels


class SoftmaxKernel(nn.Module):
    """softmax(q k^T * scale + bias) v: the original attention."""

    name = "softmax"

    def forward(self, q, k, v, scale: float, bias=None, key_mask=None):
        scores = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            scores = scores + bias
        return scores.softmax(-1) @ v


class TopKSoftmaxKernel(nn.Module):
    """Selective hard attention: per query only the ``k`` largest scores survive the softmax (the rest masked out
    before it, so the kept probabilities renormalise among themselves). Exported as TopK and a threshold mask."""

    name = "topk"

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def forward(self, q, k, v, scale: float, bias=None, key_mask=None):
        scores = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            scores = scores + bias
        low = torch.finfo(scores.dtype).min
        # k columns of the lowest value appended: top-k is defined at any length (shorter than k: every key stays),
        # with no branch on the length, so a dynamic sequence axis exports as it is
        padded = torch.cat([scores, torch.full_like(scores[..., :1], low).expand(*scores.shape[:-1], self.k)], -1)
        kth = padded.topk(self.k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, low)
        return scores.softmax(-1) @ v


class KernelAttention(nn.Module):
    """An attention module with its score-to-output step replaced by ``kernel``; projections and output are the
    wrapped module's own (``inner``), the call signature the family's (see the adapters)."""

    def __init__(self, inner: nn.Module, kernel: nn.Module, adapter) -> None:
        super().__init__()
        self.inner = inner
        self.kernel = kernel
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter.forward(self.inner, self.kernel, *args, **kwargs)


class MapKernel(nn.Module):
    """softmax(q k^T * scale + bias) v that also keeps its probabilities averaged over heads (B, Q, K), for
    attention-map distillation; averaging makes teacher and student comparable after heads were cut."""

    name = "softmax"

    def __init__(self) -> None:
        super().__init__()
        self.map = None

    def forward(self, q, k, v, scale: float, bias=None, key_mask=None):
        scores = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(-1)
        self.map = probs.mean(dim=1)
        return probs @ v


class AttentionMaps:
    """Taps on the attention probabilities of ``model``'s attention modules at ``paths``, for as long as it lives:
    each module's forward runs its adapter with a ``MapKernel`` (an instance attribute over the class's forward,
    so parameters and state-dict keys stay as they are); a module already computed by a plain softmax kernel gets
    the tap as its kernel. Modules with another kernel (top-k, hashed) have no probability map and are skipped.
    ``remove()`` puts everything back."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.kernels: dict[str, MapKernel] = {}
        self._undo: list = []
        for path in paths:
            module = model.get_submodule(path)
            tap = MapKernel()
            if isinstance(module, KernelAttention):
                if type(module.kernel) is not SoftmaxKernel:
                    continue
                self._undo.append((module, "kernel", module.kernel))
                module.kernel = tap
            else:
                adapter = adapter_for(module)
                if adapter is None:
                    continue
                module.forward = functools.partial(adapter.forward, module, tap)
                self._undo.append((module, "forward", None))
            self.kernels[path] = tap

    def maps(self) -> dict[str, torch.Tensor]:
        return {p: k.map for p, k in self.kernels.items() if k.map is not None}

    def remove(self) -> None:
        for module, kind, old in reversed(self._undo):
            if kind == "kernel":
                module.kernel = old
            else:
                del module.forward
        self._undo.clear()
        self.kernels.clear()


def kernelize(model: nn.Module, path: str, kernel: nn.Module) -> None:
    """Replace the attention at ``path`` (in place) by the same attention computed with ``kernel``."""
    module = model.get_submodule(path)
    if isinstance(module, KernelAttention):
        module.kernel = kernel
        return
    adapter = adapter_for(module)
    if adapter is None:
        raise UsageError(f"attention module {path} ({type(module).__name__})", "has no adapter", HOW_TO_ADD)
    _replace(model, path, KernelAttention(module, kernel, adapter))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _additive(mask, dtype):
    """A boolean (True = attend) or additive mask as an additive bias, and the keys that are real (B, N) when the
    mask says so per key (the same for every query)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        keys = mask
    else:
        bias = mask.to(dtype)
        keys = mask > torch.finfo(dtype).min / 2
    if keys.dim() == 4:  # (B, 1, Q, K) or (B, 1, 1, K): a key is real when any query may attend to it
        keys = keys.any(dim=2)[:, 0]
    return bias, keys


# --------------------------------------------------------------------------- adapters


@register_adapter("timm-attention")
class TimmAttention:
    """timm's ``Attention`` (ViT, DeiT): a fused ``qkv`` linear, rows [q heads, k heads, v heads]."""

    def matches(self, module) -> bool:
        cls = type(module)
        return cls.__name__ == "Attention" and cls.__module__.startswith("timm.layers") and hasattr(module, "qkv")

    def view(self, module, path: str) -> AttentionView:
        return AttentionView(path, "timm-attention", module.num_heads, module.head_dim, module.head_dim,
                             float(module.scale), False, module)

    def forward(self, inner, kernel, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        gate = inner.gate(x).sigmoid() if getattr(inner, "gate", None) is not None else None
        q, k, v = inner.qkv(x).reshape(b, n, 3, inner.num_heads, inner.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = inner.q_norm(q), inner.k_norm(k)
        bias, keys = _additive(attn_mask, q.dtype)
        if is_causal:
            causal = torch.full((n, n), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
            bias = causal if bias is None else bias + causal
        out = kernel(q, k, v, inner.scale, bias, keys).transpose(1, 2).reshape(b, n, inner.attn_dim)
        out = inner.norm(out)
        if gate is not None:
            out = out * gate
        return inner.proj_drop(inner.proj(out))

    def prune_heads(self, module, keep: list[int]):
        new = copy.deepcopy(module)
        d = module.head_dim
        rows = torch.tensor([part * module.attn_dim + h * d + i for part in range(3) for h in keep for i in range(d)])
        cols = torch.tensor([h * d + i for h in keep for i in range(d)])
        new.qkv = _sliced_linear(module.qkv, rows=rows)
        new.proj = _sliced_linear(module.proj, cols=cols)
        if getattr(module, "gate", None) is not None:
            new.gate = _sliced_linear(module.gate, rows=cols)
        if not isinstance(module.norm, nn.Identity):
            raise UsageError(f"heads of {type(module).__name__}", "a scale_norm over all heads cannot be cut per head",
                             "exclude this module from head removal")
        new.num_heads = len(keep)
        new.attn_dim = len(keep) * d
        return new


@register_adapter("efficientformer-attention")
class EfficientFormerAttention:
    """timm EfficientFormer's ``Attention``: ``qkv`` rows grouped per head [q, k, v], plus a learned relative
    position bias per head (``attention_biases[:, attention_bias_idxs]``) added to the scores."""

    def matches(self, module) -> bool:
        cls = type(module)
        return cls.__name__ == "Attention" and cls.__module__.startswith("timm.models.efficientformer")

    def view(self, module, path: str) -> AttentionView:
        return AttentionView(path, "efficientformer-attention", module.num_heads, module.key_dim, module.val_dim,
                             float(module.scale), True, module)

    def forward(self, inner, kernel, x):
        b, n, _ = x.shape
        qkv = inner.qkv(x).reshape(b, n, inner.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([inner.key_dim, inner.key_dim, inner.val_dim], dim=3)
        bias = inner.attention_biases[:, inner.attention_bias_idxs]
        out = kernel(q, k, v, inner.scale, bias, None)
        return inner.proj(out.transpose(1, 2).reshape(b, n, inner.num_heads * inner.val_dim))

    def prune_heads(self, module, keep: list[int]):
        new = copy.deepcopy(module)
        per = 2 * module.key_dim + module.val_dim
        rows = torch.tensor([h * per + i for h in keep for i in range(per)])
        cols = torch.tensor([h * module.val_dim + i for h in keep for i in range(module.val_dim)])
        new.qkv = _sliced_linear(module.qkv, rows=rows)
        new.proj = _sliced_linear(module.proj, cols=cols)
        new.attention_biases = nn.Parameter(module.attention_biases.detach()[keep].clone())
        new.num_heads = len(keep)
        new.key_attn_dim = len(keep) * module.key_dim
        new.val_attn_dim = len(keep) * module.val_dim
        new.attention_bias_cache = {}
        return new


@register_adapter("bert-self-attention")
class BertSelfAttention:
    """Hugging Face BERT's ``BertSelfAttention`` (transformers 5): separate ``query``/``key``/``value`` linears;
    the mask arrives additive (eager) or boolean (SDPA, True = attend); the output projection is the sibling
    ``BertSelfOutput.dense``, which ``prune_heads`` cannot reach: use ``prune_bert_heads`` on the layer."""

    def matches(self, module) -> bool:
        cls = type(module)
        return (cls.__name__.endswith("SelfAttention") and cls.__module__.startswith("transformers.models")
                and all(hasattr(module, a) for a in ("query", "key", "value", "attention_head_size")))

    def view(self, module, path: str) -> AttentionView:
        return AttentionView(path, "bert-self-attention", module.num_attention_heads, module.attention_head_size,
                             module.attention_head_size, float(module.scaling), False, module)

    def forward(self, inner, kernel, hidden_states, attention_mask=None, cache=None, **kwargs):
        if cache is not None:
            raise UsageError("a cached (decoder) BERT", "is not supported by slimx's attention kernels",
                             "compress encoder-only models")
        shape = (*hidden_states.shape[:-1], -1, inner.attention_head_size)
        q = inner.query(hidden_states).view(*shape).transpose(1, 2)
        k = inner.key(hidden_states).view(*shape).transpose(1, 2)
        v = inner.value(hidden_states).view(*shape).transpose(1, 2)
        bias, keys = _additive(attention_mask, q.dtype)
        out = kernel(q, k, v, inner.scaling, bias, keys)
        return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), None

    def prune_heads(self, module, keep: list[int]):
        new = copy.deepcopy(module)
        d = module.attention_head_size
        rows = torch.tensor([h * d + i for h in keep for i in range(d)])
        for name in ("query", "key", "value"):
            setattr(new, name, _sliced_linear(getattr(module, name), rows=rows))
        new.num_attention_heads = len(keep)
        new.all_head_size = len(keep) * d
        return new


def _sliced_linear(layer: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _sliced_conv1x1(layer: nn.Conv2d, rows=None, cols=None) -> nn.Conv2d:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _sliced_norm(norm: nn.Module, keep) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return norm
    new = copy.deepcopy(norm)
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(norm, name, None)
        if t is not None:
            data = t.detach()[keep].clone()
            if isinstance(t, nn.Parameter):
                setattr(new, name, nn.Parameter(data))
            else:
                new.register_buffer(name, data)
    if hasattr(new, "num_features"):
        new.num_features = len(keep)
    return new


# --------------------------------------------------------------------------- blocks and FFNs


class ZeroBranch(nn.Module):
    """A removed residual branch: contributes its mean output over calibration tokens (``mean``, a constant; zero
    without calibration data), so the block's residual carries the input through, shifted as the branch shifted it
    on average. Keeping the mean matters where a branch writes a large constant into some channels (BERT-like FFN
    outputs do): dropping it would move every token's features, not only lose their variation."""

    def __init__(self, mean: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean, persistent=mean is not None)

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x) if self.mean is None else self.mean.to(x.dtype).expand_as(x)


class BertAttentionRemoved(nn.Module):
    """A BERT layer's attention removed: its residual and LayerNorm kept, LN(x + mean of the branch's output)."""

    def __init__(self, norm: nn.LayerNorm, mean: torch.Tensor | None = None) -> None:
        super().__init__()
        self.LayerNorm = norm
        self.register_buffer("mean", mean, persistent=mean is not None)

    def forward(self, hidden_states, *args, **kwargs):
        shifted = hidden_states if self.mean is None else hidden_states + self.mean.to(hidden_states.dtype)
        return self.LayerNorm(shifted), None


class BertFFNInputPassThrough(nn.Module):
    def forward(self, hidden_states):
        return hidden_states


class BertFFNRemoved(nn.Module):
    """A BERT layer's FFN removed: its residual and LayerNorm kept, LN(x + mean of the branch's output)."""

    def __init__(self, norm: nn.LayerNorm, mean: torch.Tensor | None = None) -> None:
        super().__init__()
        self.LayerNorm = norm
        self.register_buffer("mean", mean, persistent=mean is not None)

    def forward(self, hidden_states, input_tensor):
        shifted = input_tensor if self.mean is None else input_tensor + self.mean.to(input_tensor.dtype)
        return self.LayerNorm(shifted)


@dataclass(frozen=True)
class BranchData:
    """Calibration batches for a removal: the removed branch's mean output over their tokens (real tokens only,
    where ``mask_index`` names the model's attention-mask input) replaces it. ``means``: those means for a model,
    measured in one pass (``with_means``), so that a search pricing many removals does not run the data again for
    each."""

    batches: list[tuple]
    mask_index: int | None = None
    limit: int = 32  # samples read (a mean needs few)
    means: dict | None = None  # branch output path -> mean, for the model they were measured on

    def mean_of(self, model: nn.Module, path: str) -> torch.Tensor | None:
        if self.means is not None and path in self.means:
            return self.means[path]
        return branch_means(model, [path], self).get(path)

    def with_means(self, model: nn.Module) -> BranchData:
        """This data with every removable branch's mean on ``model`` measured at once."""
        paths = [p for b in blocks(model) for p in (b.attention_out, b.ffn_out) if p is not None]
        return dataclasses.replace(self, means=branch_means(model, paths, self))


def branch_means(model: nn.Module, paths: list[str], data: BranchData | None) -> dict:
    """The mean output of each module in ``paths`` over ``data``'s tokens (one pass over the data), shaped to
    broadcast against it (per channel: the last axis of a (B, N, C) output, axis 1 of a (B, C, H, W) one); empty
    without data."""
    if data is None or not data.batches or not paths:
        return {}
    from slimx.slim.base import token_mask, trim_padding

    totals: dict = {}
    mask_now: list = [None]

    def hook_for(path):
        def hook(_module, _inputs, output):
            out = (output[0] if isinstance(output, tuple) else output).detach().float()
            if out.dim() == 4:
                summed, n = out.sum((0, 2, 3), keepdim=True)[:1], out.shape[0] * out.shape[2] * out.shape[3]
            else:
                flat = out.reshape(-1, out.shape[-1])
                mask = mask_now[0]
                if mask is not None and mask.numel() == flat.shape[0]:
                    flat = flat[mask.reshape(-1).bool()]
                summed, n = flat.sum(0), flat.shape[0]
            total, count = totals.get(path, (0.0, 0))
            totals[path] = (total + summed, count + n)
        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p)) for p in paths]
    seen = 0
    try:
        with torch.no_grad():
            for batch in data.batches:
                if seen >= data.limit:
                    break
                batch = trim_padding(batch, data.mask_index)
                mask = token_mask(batch, data.mask_index)
                mask_now[0] = mask if mask is not None and mask.dim() == 2 else None
                model(*batch)
                seen += int(batch[0].shape[0]) if isinstance(batch[0], torch.Tensor) and batch[0].dim() else 1
    finally:
        for handle in handles:
            handle.remove()
    return {p: total / count for p, (total, count) in totals.items() if count}


@dataclass
class FFNView:
    """One FFN: its hidden width and how to narrow it to some of its neurons."""

    path: str
    hidden: int
    prune: Callable[[nn.Module, list[int]], None]  # prune(model, keep) in place
    importance: Callable[[nn.Module], torch.Tensor]  # per-neuron weight magnitude (an order for groups)


@dataclass
class BlockView:
    """One residual block: where its attention and FFN branches are, and how to remove each."""

    path: str
    attention: str | None  # path of the attention (or token mixer) module, None when it has been removed
    attention_kind: str  # "attention", "pooling", or "removed"
    ffn: FFNView | None
    remove_attention: Callable[..., None] | None  # (model, data: BranchData | None = None), in place
    remove_ffn: Callable[..., None] | None
    attention_out: str | None = None  # the module whose output is the attention branch's contribution
    ffn_out: str | None = None  # the same for the FFN branch

    def to_dict(self) -> dict:
        return {"block": self.path, "attention": self.attention, "attention_kind": self.attention_kind,
                "ffn": self.ffn.path if self.ffn else None, "ffn_hidden": self.ffn.hidden if self.ffn else None}


def no_blocks_error(model: nn.Module, where: str) -> UsageError:
    """The one-line refusal of a block pass on a model whose layers no block view knows, naming their class."""
    layers = sorted({type(child).__name__ for mod in model.modules() if isinstance(mod, nn.ModuleList)
                     for child in mod if len(mod) > 1})
    named = f" (its repeated layers: {', '.join(layers)})" if layers else ""
    return UsageError(where, f"found no residual block slimx can take apart in this model{named}",
                      "slimx knows timm ViT/DeiT and EfficientFormer blocks and BERT-style layers (attention, "
                      "intermediate, output); add a block view for these in slim/attention.py (blocks) and an "
                      "attention adapter (@register_adapter)")


def blocks(model: nn.Module) -> list[BlockView]:
    """The residual blocks of ``model`` that slimx can take apart, in model order."""
    out = []
    for path, module in model.named_modules():
        name = type(module).__name__
        if hasattr(module, "attention") and hasattr(module, "intermediate") and hasattr(module, "output") \
                and hasattr(module.output, "LayerNorm") and _bert_like(module):
            out.append(_bert_block(path, module))
        elif name in ("Block", "MetaBlock1d", "MetaBlock2d") and hasattr(module, "mlp") and (
                hasattr(module, "attn") or hasattr(module, "token_mixer")):
            out.append(_timm_block(path, module))
    return out


def _timm_block(path: str, module) -> BlockView:
    mixer_name = "attn" if hasattr(module, "attn") else "token_mixer"
    mixer = getattr(module, mixer_name)
    mixer_path = f"{path}.{mixer_name}"
    kind = "removed" if isinstance(mixer, ZeroBranch) else (
        "attention" if adapter_for(mixer) or isinstance(mixer, KernelAttention) else "pooling")

    def remove_mixer(model, data: BranchData | None = None, p=mixer_path):
        _replace(model, p, ZeroBranch(data.mean_of(model, p) if data is not None else None))
        _drop_norm(model, f"{path}.norm1")

    ffn = None
    mlp = module.mlp
    mlp_path = f"{path}.mlp"
    if not isinstance(mlp, ZeroBranch) and hasattr(mlp, "fc1"):
        ffn = FFNView(mlp_path, _hidden_of(mlp.fc1), lambda model, keep, p=mlp_path: _prune_timm_mlp(model, p, keep),
                      lambda model, p=mlp_path: _neuron_importance(model.get_submodule(p).fc1,
                                                                   model.get_submodule(p).fc2))

    def remove_mlp(model, data: BranchData | None = None, p=mlp_path):
        _replace(model, p, ZeroBranch(data.mean_of(model, p) if data is not None else None))
        _drop_norm(model, f"{path}.norm2")

    mlp_gone = isinstance(mlp, ZeroBranch)
    return BlockView(path, None if kind == "removed" else mixer_path, kind, ffn,
                     None if kind == "removed" else remove_mixer, None if mlp_gone else remove_mlp,
                     None if kind == "removed" else mixer_path, None if mlp_gone else mlp_path)


def _drop_norm(model, path: str) -> None:
    """The norm in front of a removed branch feeds only its shape: an identity keeps the shape without the work."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(getattr(owner, name, None), nn.Module):
        setattr(owner, name, nn.Identity())


def _hidden_of(fc) -> int:
    return fc.out_features if isinstance(fc, nn.Linear) else fc.out_channels


def _neuron_importance(fc1, fc2) -> torch.Tensor:
    """How much each hidden neuron carries: |row of fc1| x |column of fc2| (a data-free order)."""
    w1 = fc1.weight.detach().flatten(1)
    w2 = fc2.weight.detach().flatten(1) if isinstance(fc2, nn.Linear) else fc2.weight.detach()[:, :, 0, 0]
    return w1.norm(dim=1) * w2.norm(dim=0)


def _prune_timm_mlp(model, path: str, keep: list[int]) -> None:
    mlp = model.get_submodule(path)
    idx = torch.tensor(keep)
    conv = isinstance(mlp.fc1, nn.Conv2d)
    sliced = _sliced_conv1x1 if conv else _sliced_linear
    mlp.fc1 = sliced(mlp.fc1, rows=idx)
    mlp.fc2 = sliced(mlp.fc2, cols=idx)
    for name in ("norm1", "norm"):  # a norm over the hidden neurons (ConvMlpWithNorm's BN, Mlp's optional norm)
        norm = getattr(mlp, name, None)
        if norm is not None and not isinstance(norm, nn.Identity):
            setattr(mlp, name, _sliced_norm(norm, idx))


def _bert_like(layer) -> bool:
    """A BERT-style layer: self-attention with a sibling output (dense + LayerNorm), a dense intermediate (either
    possibly removed by a pass); MPNet's layer has the three names but not this inside."""
    attention_ok = isinstance(layer.attention, BertAttentionRemoved) or hasattr(
        getattr(layer.attention, "output", None), "LayerNorm")
    ffn_ok = isinstance(layer.intermediate, BertFFNInputPassThrough) or isinstance(
        getattr(layer.intermediate, "dense", None), nn.Linear)
    return attention_ok and ffn_ok


def _bert_block(path: str, layer) -> BlockView:
    attn_removed = isinstance(layer.attention, BertAttentionRemoved)
    ffn_removed = isinstance(layer.output, BertFFNRemoved)

    def remove_attention(model, data: BranchData | None = None, p=path):
        mean = data.mean_of(model, f"{p}.attention.output.dense") if data is not None else None
        target = model.get_submodule(p)
        target.attention = BertAttentionRemoved(target.attention.output.LayerNorm, mean)

    def remove_ffn(model, data: BranchData | None = None, p=path):
        mean = data.mean_of(model, f"{p}.output.dense") if data is not None else None
        target = model.get_submodule(p)
        target.intermediate = BertFFNInputPassThrough()
        target.output = BertFFNRemoved(target.output.LayerNorm, mean)

    ffn = None
    if not ffn_removed:
        ffn = FFNView(f"{path}.intermediate", layer.intermediate.dense.out_features,
                      lambda model, keep, p=path: _prune_bert_ffn(model, p, keep),
                      lambda model, p=path: _neuron_importance(model.get_submodule(p).intermediate.dense,
                                                               model.get_submodule(p).output.dense))
    return BlockView(path, None if attn_removed else f"{path}.attention.self",
                     "removed" if attn_removed else "attention", ffn,
                     None if attn_removed else remove_attention, None if ffn_removed else remove_ffn,
                     None if attn_removed else f"{path}.attention.output.dense",
                     None if ffn_removed else f"{path}.output.dense")


def _prune_bert_ffn(model, path: str, keep: list[int]) -> None:
    layer = model.get_submodule(path)
    idx = torch.tensor(keep)
    layer.intermediate.dense = _sliced_linear(layer.intermediate.dense, rows=idx)
    layer.output.dense = _sliced_linear(layer.output.dense, cols=idx)


def prune_heads(model: nn.Module, path: str, keep: list[int]) -> None:
    """Keep only heads ``keep`` of the attention at ``path`` (in place), weights sliced, the output projection
    (the module's own, or BERT's sibling ``attention.output.dense``) sliced to match."""
    module = model.get_submodule(path)
    inner = module.inner if isinstance(module, KernelAttention) else module
    adapter = module.adapter if isinstance(module, KernelAttention) else adapter_for(module)
    if adapter is None:
        raise UsageError(f"attention module {path} ({type(module).__name__})", "has no adapter", HOW_TO_ADD)
    if not keep:
        raise UsageError(f"heads of {path}", "removing every head is removing the attention",
                         "remove the block's attention branch instead")
    new = adapter.prune_heads(inner, sorted(keep))
    if isinstance(adapter, BertSelfAttention):
        out = model.get_submodule(path.rsplit(".", 1)[0] + ".output")
        d = inner.attention_head_size
        out.dense = _sliced_linear(out.dense, cols=torch.tensor([h * d + i for h in sorted(keep) for i in range(d)]))
    if isinstance(module, KernelAttention):
        module.inner = new
    else:
        _replace(model, path, new)


def attention_flops(view: AttentionView, tokens: int) -> int:
    """Multiply-accumulates of the score and weighted-sum products of one attention at ``tokens`` tokens."""
    return view.num_heads * tokens * tokens * (view.head_dim + view.value_dim)


def scaled_dot_attention(q, k, v, scale, bias=None):
    """softmax(q k^T scale + bias) v, through torch's SDPA (the reference the kernels are checked against)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
