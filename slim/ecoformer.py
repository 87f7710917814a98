"""EcoFormer: softmax attention replaced by linear-time attention over learned binary codes (Liu et al.,
"EcoFormer: Energy-Saving Attention with Linear Complexity", NeurIPS 2022; reference ziplab/EcoFormer, read to
understand the method, not copied).

Per head, queries and keys (normalised, one shared hash function) are mapped to ``bits``-bit codes by kernelised
hashing, h(x) = sign(A k(x)), with k(x) the RBF features of x to ``anchors`` anchor points drawn from calibration
tokens (bandwidth: the mean squared token-anchor distance; features centred on their calibration mean). A is
learned bit by bit, self-supervised, so that code agreement reproduces the original layer's attention
neighbourhoods: for each calibration query its ``neighbours`` most attended keys should agree (+1) and its least
attended ones disagree (-1); each bit fits the residual of the bits before it (kernel-based supervised hashing),
a smooth surrogate (tanh) standing in for sign, and the optimised bit is kept only if its discrete objective beats
the spectral initialisation it started from.

Attention then runs through the associative product: with s(q, k) = h(q).h(k) + b + 1 >= 1 (the offset keeps
every similarity positive, so the normaliser never vanishes),

    out_i = sum_j s_ij v_j / sum_j s_ij
          = (h_i^T (sum_j h_j v_j^T) + (b + 1) sum_j v_j) / (h_i^T sum_j h_j + (b + 1) n),

O(n b d) instead of O(n^2 d). The reference code's numerator adds (b + 1) v_i, the query's own value, where the
expansion of sum_j s_ij v_j gives (b + 1) sum_j v_j: slimx implements the exact expansion, so that the output is
the weighted average its denominator normalises. Padding keys are left out of every sum. In training mode
(``--recover``) the sign passes gradients straight through its tanh surrogate, so distillation tunes A too.

The pass decides where it pays: each selected layer's latency at the deployed length (the device's latency
model, hashed against softmax, the layer alone) and declines the layers where hashing would be slower, saying so
(on these CPUs it was 2x slower than softmax at 128 tokens and faster from about 512).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from slimx._core.config import config_to_dict
from slimx._core.errors import UsageError
from slimx.slim.attention import KernelAttention, SoftmaxKernel, adapter_for, attention_modules, kernelize
from slimx.slim.base import PassContext, PassResult, register_pass, trim_padding


@dataclass(frozen=True)
class EcoFormerConfig:
    """Options of the ``ecoformer`` pass.

    Attributes:
        bits: code length b per head.
        anchors: RBF anchor points m per head, drawn from calibration tokens.
        neighbours: the most and least attended keys per query that set the similarity targets.
        steps, lr: optimisation of each bit (Adam on the tanh surrogate).
        decide: ``latency`` (replace only where the latency model says the hashed layer is faster at ``length``)
            or ``always``.
        length: the sequence length to decide at (None: the calibration inputs' length, i.e. the export shape).
        include, exclude: regexes on attention module paths (include wins).
        max_queries: calibration queries per head used to fit (the rest are not needed).
    """

    bits: int = 16
    anchors: int = 64
    neighbours: int = 8
    steps: int = 60
    lr: float = 0.05
    decide: str = "latency"
    length: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_queries: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 64 or not 4 <= self.anchors <= 1024 or self.neighbours < 1:
            raise ValueError("bits must be 1..64, anchors 4..1024, neighbours at least 1")
        if self.steps < 0 or self.lr <= 0 or self.max_queries < 16:
            raise ValueError("steps must be non-negative, lr positive, max_queries at least 16")
        if self.decide not in ("latency", "always"):
            raise ValueError(f"decide must be latency or always, not {self.decide!r}")
        if self.length is not None and self.length < 1:
            raise ValueError("length must be at least 1")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None

    def selects(self, path: str) -> bool:
        if any(re.search(p, path) for p in self.include):
            return True
        return not any(re.search(p, path) for p in self.exclude)


def _normalise(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def _signs(y, training: bool):
    hard = torch.where(y >= 0, torch.ones_like(y), -torch.ones_like(y))
    if not training:
        return hard
    soft = torch.tanh(y)
    return soft + (hard - soft).detach()  # straight through the surrogate


class HashedLinearKernel(nn.Module):
    """Linear-time attention over ``bits``-bit codes of normalised q and k (see the module docstring)."""

    name = "hashed"

    def __init__(self, anchors: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, bandwidth: torch.Tensor):
        super().__init__()
        self.register_buffer("anchors", anchors)  # (H, m, D)
        self.weight = nn.Parameter(weight)  # (H, b, m): the hash functions A
        self.register_buffer("mean", mean)  # (H, 1, m): feature means on the calibration tokens
        self.register_buffer("bandwidth", bandwidth)  # (H, 1, 1): 2 sigma^2
        self.bits = weight.shape[1]

    def codes(self, x):
        """(B, H, N, D) -> (B, H, N, b) signs."""
        x = _normalise(x)
        dist = (x.pow(2).sum(-1, keepdim=True) + self.anchors.pow(2).sum(-1).unsqueeze(-2)
                - 2 * x @ self.anchors.transpose(-2, -1))  # (B, H, N, m)
        feats = torch.exp(-dist.clamp(min=0) / self.bandwidth) - self.mean
        return _signs(feats @ self.weight.transpose(-2, -1), self.training)

    def forward(self, q, k, v, scale: float, bias=None, key_mask=None):
        hq, hk = self.codes(q), self.codes(k)
        offset = float(self.bits + 1)
        if key_mask is not None:
            keep = key_mask[:, None, :, None].to(v.dtype)
            hk, v = hk * keep, v * keep
            count = keep.sum(-2, keepdim=True)  # (B, 1, 1, 1)
        else:
            count = torch.full_like(v[..., :1, :1], float(v.shape[-2]))
        kv = hk.transpose(-2, -1) @ v  # (B, H, b, Dv)
        num = hq @ kv + offset * v.sum(-2, keepdim=True)
        den = hq @ hk.sum(-2, keepdim=True).transpose(-2, -1) + offset * count
        return num / den


class _Recorder(nn.Module):
    """A softmax kernel that keeps what the fit needs: q, k and the original scores (real tokens only)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen = 0
        self.samples: list[tuple] = []
        self.shapes: list[tuple] = []

    def forward(self, q, k, v, scale: float, bias=None, key_mask=None):
        scores = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            scores = scores + bias
        if self.seen < self.limit:
            n = q.shape[-2]
            for b in range(q.shape[0]):
                real = key_mask[b] if key_mask is not None else torch.ones(n, dtype=torch.bool)
                idx = real.nonzero().flatten()
                self.samples.append((q[b][:, idx].detach(), k[b][:, idx].detach(),
                                     scores[b][:, idx][:, :, idx].detach()))
                self.seen += len(idx)
        return scores.softmax(-1) @ v


def fit_hash(samples: list[tuple], cfg: EcoFormerConfig, gen: torch.Generator) -> HashedLinearKernel:
    """Kernelised hash functions for one layer (per head) from recorded (q, k, scores) per sequence."""
    heads = samples[0][0].shape[0]
    q_all = _normalise(torch.cat([s[0] for s in samples], dim=1).float())  # (H, T, D)
    k_all = _normalise(torch.cat([s[1] for s in samples], dim=1).float())
    tokens = torch.cat([q_all, k_all], dim=1)
    pick = torch.randperm(tokens.shape[1], generator=gen)[: cfg.anchors]
    anchors = tokens[:, pick]  # (H, m, D)

    def dist(x):
        return (x.pow(2).sum(-1, keepdim=True) + anchors.pow(2).sum(-1).unsqueeze(-2)
                - 2 * x @ anchors.transpose(-2, -1)).clamp(min=0)

    bandwidth = 2 * dist(tokens).mean(dim=(1, 2), keepdim=True)  # 2 sigma^2, sigma^2 the mean squared distance
    mean = torch.exp(-dist(tokens) / bandwidth).mean(1, keepdim=True)

    def feats(x):
        return torch.exp(-dist(x) / bandwidth) - mean

    # similarity targets per sequence: each query's most attended keys +1, least attended -1
    pairs_q, pairs_k, target = [], [], []
    offset = 0
    t = cfg.neighbours
    for q, _k, scores in samples:
        n = q.shape[1]
        if n >= 2:
            top = scores.topk(min(t, n), dim=-1).indices  # (H, n, t)
            low = (-scores).topk(min(t, n), dim=-1).indices
            rows = torch.arange(n).view(1, n, 1).expand(heads, n, top.shape[-1])
            for idx, sign in ((top, 1.0), (low, -1.0)):
                pairs_q.append(rows + offset)
                pairs_k.append(idx + offset)
                target.append(torch.full(idx.shape, sign, dtype=torch.float32))
        offset += n
    if not pairs_q:
        raise UsageError("--pass ecoformer", "the calibration sequences are too short to learn attention "
                         "neighbourhoods from", "give longer calibration samples")
    pq = torch.cat([p.flatten(1) for p in pairs_q], 1)[:, : cfg.max_queries * 2 * t]  # (H, P)
    pk = torch.cat([p.flatten(1) for p in pairs_k], 1)[:, : pq.shape[1]]
    s = torch.cat([p.flatten(1) for p in target], 1)[:, : pq.shape[1]]
    fq, fk = feats(q_all), feats(k_all)  # (H, T, m)
    residual = cfg.bits * s  # KSH: codes' inner products should reach b * S on the constrained pairs
    weight = torch.zeros(heads, cfg.bits, cfg.anchors, dtype=torch.float32)
    for r in range(cfg.bits):
        init = _spectral_init(fq, fk, pq, pk, residual)
        a = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([a], lr=cfg.lr)
        for _ in range(cfg.steps):  # the surrogate codes per token, then looked up per pair (cheap)
            yq = torch.gather(torch.tanh(fq @ a[..., None])[..., 0], 1, pq)
            yk = torch.gather(torch.tanh(fk @ a[..., None])[..., 0], 1, pk)
            loss = -(residual * yq * yk).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            best = torch.where(_objective(fq, fk, pq, pk, residual, a) > _objective(fq, fk, pq, pk, residual, init),
                               torch.ones(heads, dtype=torch.bool), torch.zeros(heads, dtype=torch.bool))
            chosen = torch.where(best[:, None], a.detach(), init)  # kept only where it beats its start
            weight[:, r] = chosen
            hq = torch.sign(fq @ chosen[..., None])[..., 0]
            hk = torch.sign(fk @ chosen[..., None])[..., 0]
            residual = residual - torch.gather(hq, 1, pq) * torch.gather(hk, 1, pk)
    return HashedLinearKernel(anchors.float(), weight.float(), mean.float(), bandwidth.float())


def _objective(fq, fk, pq, pk, residual, a) -> torch.Tensor:
    """Per head, sum over constrained pairs of residual x sign(h_q) x sign(h_k): what a bit contributes."""
    hq = torch.sign(fq @ a[..., None])[..., 0]
    hk = torch.sign(fk @ a[..., None])[..., 0]
    return (residual * torch.gather(hq, 1, pq) * torch.gather(hk, 1, pk)).sum(-1)


def _spectral_init(fq, fk, pq, pk, residual) -> torch.Tensor:
    """The relaxed bit: the top eigenvector of sym(Fq^T R Fk) over the constrained pairs (per head)."""
    heads, _, m = fq.shape
    out = torch.empty(heads, m, dtype=fq.dtype)
    for h in range(heads):  # sum over pairs of r_p fq_p fk_p^T, accumulated per query token first
        acc = torch.zeros(fq.shape[1], m, dtype=fq.dtype).index_add_(0, pq[h], residual[h][:, None] * fk[h][pk[h]])
        mat = (fq[h].T @ acc).double()
        mat = (mat + mat.T) / 2
        _, vecs = torch.linalg.eigh(mat)
        out[h] = (vecs[:, -1] * math.sqrt(m)).to(fq.dtype)
    return out


def plan_ecoformer(model, cfg: EcoFormerConfig, ctx: PassContext) -> list[dict]:
    """Per selected attention layer: replace it or not, and why (the latency at the deployed length)."""
    views = [v for v in attention_modules(model) if cfg.selects(v.path)]
    if not views:
        raise UsageError("--pass ecoformer", "found no attention module it can replace",
                         "check include/exclude, or the model has no attention")
    shapes = _input_shapes(model, [v.path for v in views], ctx)
    plan = []
    for view in views:
        entry = {"layer": view.path, **view.to_dict()}
        entry.pop("path")
        if view.has_bias:
            plan.append({**entry, "skipped": "its learned attention bias (relative positions) has no factorised "
                                             "form in hashed linear attention"})
            continue
        shape = shapes.get(view.path)
        length = cfg.length or (shape[1] if shape else None)
        entry["length"] = length
        if cfg.decide == "latency":
            verdict = _latency_verdict(model, view, shape, length, cfg, ctx)
            entry.update(verdict)
            if verdict.get("slower"):
                plan.append({**entry, "skipped": verdict["reason"]})
                continue
        plan.append(entry)
    return plan


def _input_shapes(model, paths: list[str], ctx: PassContext) -> dict:
    """The (batch, tokens, width) each attention sees on a calibration input at its export shape."""
    shapes: dict = {}

    def keep(path, args, kwargs) -> None:
        shapes.setdefault(path, tuple(_first_tensor(args, kwargs).shape))

    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, args, kwargs, p=p: keep(p, args, kwargs), with_kwargs=True) for p in paths]
    try:
        if ctx.calib:
            with torch.no_grad():
                model(*ctx.calib[0])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _first_tensor(args, kwargs):
    for a in (*args, *kwargs.values()):
        if torch.is_tensor(a):
            return a
    raise ValueError("no tensor input")


class _AttentionAlone(nn.Module):
    """One attention layer as a model of its own (its input a (1, tokens, width) tensor), for the latency model."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x):
        out = self.attention(x)
        return out[0] if isinstance(out, tuple) else out


def _latency_verdict(model, view, shape, length, cfg: EcoFormerConfig, ctx: PassContext) -> dict:
    lm = ctx.latency_model
    if lm is None or shape is None or length is None:
        return {"decision": "no latency model: replaced (decide=latency needs one; decide=always to silence)"}
    example = (torch.randn(1, length, shape[-1]),)
    original = copy.deepcopy(model.get_submodule(view.path))
    plain = original if isinstance(original, KernelAttention) else KernelAttention(original, SoftmaxKernel(),
                                                                                    adapter_for(original))
    heads, d = view.num_heads, view.head_dim
    dummy = HashedLinearKernel(torch.randn(heads, cfg.anchors, d), torch.randn(heads, cfg.bits, cfg.anchors),
                               torch.zeros(heads, 1, cfg.anchors), torch.ones(heads, 1, 1)).eval()
    hashed = copy.deepcopy(plain)
    hashed.kernel = dummy
    base = lm.latency(_AttentionAlone(plain).eval(), example)["ms"]
    new = lm.latency(_AttentionAlone(hashed).eval(), example)["ms"]
    out = {"softmax_ms": round(base, 5), "hashed_ms": round(new, 5), "latency_kind": lm.kind,
           "latency_device": lm.device, "ratio": round(base / new, 3) if new else None}
    if new >= base:
        out["slower"] = True
        out["reason"] = (f"at {length} tokens the hashed layer is {lm.kind} {new / base:.2f}x the softmax layer's "
                         f"time on {lm.device} ({new:.4f} vs {base:.4f} ms): declined (decide=always forces it)")
    return out


@register_pass("ecoformer", EcoFormerConfig, plan=plan_ecoformer,
               selects=lambda model, cfg: [v.path for v in attention_modules(model) if cfg.selects(v.path)],
               fix_hint="more bits, or fewer layers (include=...)", test_options={"steps": 3, "anchors": 8, "bits": 4},
               test_model="vit")
def apply_ecoformer(model, plan: list[dict], cfg: EcoFormerConfig, ctx: PassContext) -> PassResult:
    """Fit hash functions for each planned layer on the calibration data and swap its attention (a copy)."""
    chosen = [e["layer"] for e in plan if "skipped" not in e]
    new = copy.deepcopy(model)
    layers = []
    if chosen:
        if not ctx.calib:
            raise UsageError("--pass ecoformer", "learns its hash functions from calibration data",
                             "give --calib with real samples")
        recorders = {}
        for path in chosen:
            recorders[path] = _Recorder(cfg.max_queries)
            kernelize(new, path, recorders[path])
        with torch.no_grad():
            for batch in ctx.calib:
                if all(r.seen >= r.limit for r in recorders.values()):
                    break
                new(*trim_padding(batch, ctx.mask_index))
        gen = torch.Generator().manual_seed(cfg.seed)
        for path in chosen:
            kernel = fit_hash(recorders[path].samples, cfg, gen)
            kernelize(new, path, kernel.eval())
            if ctx.progress is not None:
                ctx.progress.note(f"ecoformer: {path}: {cfg.bits}-bit codes from {recorders[path].seen} tokens")
    for entry in plan:
        layers.append(dict(entry))
    summary = {"replaced": len(chosen), "declined": len(plan) - len(chosen), "bits": cfg.bits, "anchors": cfg.anchors,
               "decide": cfg.decide}
    return PassResult(model=new.eval(), name="ecoformer", config=config_to_dict(cfg), layers=layers,
                      summary=summary)
