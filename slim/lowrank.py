"""LRT (Greenformers' Low-Rank Transformer): each selected ``nn.Linear`` becomes two thin linears.

W (out x in) ~= U_r S_r V_r^T from a truncated SVD; ``down = S_r^1/2 V_r^T`` (in -> r) and
``up = U_r S_r^1/2`` (r -> out). Activation-aware (``activation_aware="whiten"``, the default): the SVD
is taken of ``W L`` with ``L L^T = X^T X / n`` the calibration inputs' second moment, then ``L`` is undone
on ``down``; this is the rank-r factorization with the least output error on the calibration data
(``|| X (W - W_r)^T ||``). ``"diag"`` scales by each input channel's RMS only; ``false`` is plain SVD.
Ranks come from a fixed ratio, retained energy, or a parameter budget, are rounded up to a
hardware-friendly multiple, and a layer is skipped when the factorization would not reduce its MACs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from slimx._core.config import config_to_dict
from slimx.slim.base import LayerSelector, PassContext, PassResult, register_pass
from slimx.slim.surgery import (
    input_second_moments,  # noqa: F401  (its home before slim.surgery; tests and benches import it from here)
    layer_moments,
    replace_module,
    select_linears,
    split_factors,
    weighted_relative_error,
    whitened_svd,
    whitening,
)


@dataclass(frozen=True)
class LowRankConfig:
    """Options of the ``lowrank`` pass (exactly one of rank_ratio, energy, param_budget; default ratio 0.5).

    Attributes:
        rank_ratio: rank = ratio x min(in, out).
        energy: smallest rank keeping this fraction of the (scaled) weight's squared singular values.
        param_budget: each factorized layer keeps at most this fraction of its parameters.
        activation_aware: ``whiten`` (full input covariance), ``diag`` (per-channel RMS) or false.
        damping: ridge added to the input covariance before whitening, as a fraction of its mean diagonal;
            raise it when the calibration set has fewer real tokens than the layer has input features (the
            second moment is then singular and the factorization would trust directions it never saw).
        multiple: round ranks up to a multiple of this (default: 8, or the device's ``rank_multiple``).
        include, exclude: module-path regexes (include wins, then exclude); types: module class names.
        min_features: leave layers with fewer input or output features alone.
    """

    rank_ratio: float | None = None
    energy: float | None = None
    param_budget: float | None = None
    activation_aware: str | bool = "whiten"
    damping: float = 1e-5
    multiple: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    min_features: int = 32

    def __post_init__(self) -> None:
        modes = [m for m in ("rank_ratio", "energy", "param_budget") if getattr(self, m) is not None]
        if len(modes) > 1:
            raise ValueError(f"give one of rank_ratio, energy, param_budget (got {', '.join(modes)})")
        if not modes:
            object.__setattr__(self, "rank_ratio", 0.5)
        for name in ("rank_ratio", "energy", "param_budget"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.activation_aware not in (True, False, "whiten", "diag"):
            raise ValueError(f"activation_aware must be whiten, diag or false, not {self.activation_aware!r}")
        if not 0.0 <= self.damping <= 10.0:
            raise ValueError(f"damping must be in [0, 10], got {self.damping}")
        if self.multiple is not None and self.multiple < 1:
            raise ValueError("multiple must be at least 1")

    @property
    def selector(self) -> LayerSelector:
        return LayerSelector(include=self.include, exclude=self.exclude, types=self.types)


class LowRankLinear(torch.nn.Module):
    """``up(down(x))``: two linears through a rank-r bottleneck (exports as two MatMuls everywhere)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.rank = rank
        self.down = torch.nn.Linear(in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.up(self.down(x))

    def spread_(self, seed: int = 0) -> LowRankLinear:
        """Rotate the bottleneck by a fixed random orthogonal Q (``down <- Q^T down``, ``up <- up Q``).

        The product ``up @ down`` is unchanged, but an outlier channel of the rank-r activations (the top
        singular direction often carries most of their range) is spread over all r channels, so a per-tensor
        int8 quantizer downstream (onnxruntime dynamic quantization, TFLite) keeps the small ones. In a trial
        on MiniLM's FFN at rank 0.5 this took int8's cosine from 0.59 to 0.90 (fp32: 0.91), the idea that
        QuaRot (Ashkboos et al., 2024) applies to whole hidden states.
        """
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(self.rank, self.rank, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))[None, :]  # a uniformly random rotation, fixed by the seed
        with torch.no_grad():
            self.down.weight.copy_((q.T @ self.down.weight.double()).to(self.down.weight.dtype))
            self.up.weight.copy_((self.up.weight.double() @ q).to(self.up.weight.dtype))
        return self


def plan_lowrank(model, cfg: LowRankConfig, ctx: PassContext) -> list[dict]:
    """Decide, per linear, whether and at which rank to factorize: plain data, nothing is changed yet."""
    return [{k: v for k, v in entry.items() if not k.startswith("_")} for entry in _factorize(model, cfg, ctx)]


def _factorize(model, cfg: LowRankConfig, ctx: PassContext, ranks: dict | None = None) -> list[dict]:
    """Per selected linear: its plan entry and (under ``_factors``) the factors; ``ranks`` fixes them (apply)."""
    multiple = cfg.multiple or int(_device_multiple(ctx.device) or 8)
    candidates = select_linears(model, cfg.selector)
    moments = layer_moments(model, candidates, ctx) if cfg.activation_aware else {}
    plan = []
    for done, path in enumerate(candidates):
        if ctx.progress is not None:
            ctx.progress.tick("lowrank: SVD per layer", done, len(candidates))
        lin = model.get_submodule(path)
        out_f, in_f = lin.weight.shape
        entry = {"layer": path, "in": in_f, "out": out_f, "params_before": lin.weight.numel(),
                 "macs_per_token_before": in_f * out_f}
        if min(in_f, out_f) < cfg.min_features:
            plan.append({**entry, "skipped": f"fewer than {cfg.min_features} features"})
            continue
        if ranks is not None and path not in ranks:
            continue
        key = ("lowrank-factors", id(model), path, repr(cfg))  # the plan's factors, for its apply (same rank)
        known = ctx.cache.get(key)
        if ranks is not None and known is not None and known["rank"] == ranks[path]:
            plan.append({**entry, **known})
            continue
        weight = lin.weight.detach().double()
        right = None  # W -> W @ right before the SVD, undone on `down` after
        if path in moments:
            if cfg.activation_aware == "diag":
                cov, rows = moments[path]
                right = torch.diag(torch.sqrt(torch.diagonal(cov / max(rows, 1))).clamp(min=1e-6))
            else:
                right = whitening(moments[path], cfg.damping)
        u, s, vt = whitened_svd(weight, right)
        if ranks is not None:
            rank = ranks[path]
        else:
            rank = _choose_rank(cfg, s, in_f, out_f)
            rank = min(int(math.ceil(rank / multiple) * multiple), min(in_f, out_f))
        if rank * (in_f + out_f) >= in_f * out_f:
            plan.append({**entry, "rank": rank,
                         "skipped": f"rank {rank} would not reduce MACs ({rank * (in_f + out_f)} >= {in_f * out_f})"})
            continue
        up, down = split_factors(u, s, vt, rank, right)
        factored = rank * (in_f + out_f)
        entry.update({"rank": rank, "params_after": factored, "macs_per_token_after": factored,
                      "rel_err": weighted_relative_error(weight, up @ down, moments.get(path)),
                      "error_on": "calibration activations" if path in moments else "weights",
                      "_factors": (down.float(), up.float())})
        ctx.cache[key] = {k: entry[k] for k in ("rank", "params_after", "macs_per_token_after", "rel_err",
                                                "error_on", "_factors")}
        plan.append(entry)
    if ctx.progress is not None and candidates:
        ctx.progress.tick("lowrank: SVD per layer", len(candidates), len(candidates))
    return plan


def _choose_rank(cfg: LowRankConfig, s, in_f: int, out_f: int) -> int:
    if cfg.rank_ratio is not None:
        return max(1, round(cfg.rank_ratio * min(in_f, out_f)))
    if cfg.energy is not None:
        energy = (s**2).cumsum(0) / (s**2).sum()
        return (energy < cfg.energy).sum().item() + 1
    return max(1, int(cfg.param_budget * in_f * out_f / (in_f + out_f)))


def _device_multiple(device):
    if device is None:
        return None
    return getattr(device, "rank_multiple", None)


def finalize_lowrank(model):
    """Rotate every LowRankLinear's bottleneck (``spread_``) so that int8 downstream has no outlier channel."""
    for mod in model.modules():
        if isinstance(mod, LowRankLinear):
            mod.spread_()
    return model


@register_pass("lowrank", LowRankConfig, plan=plan_lowrank, finalize=finalize_lowrank,
               selects=lambda model, cfg: select_linears(model, cfg.selector),
               fix_hint="a larger rank_ratio (or energy=0.99) or exclude=attention")
def apply_lowrank(model, plan: list[dict], cfg: LowRankConfig, ctx: PassContext) -> PassResult:
    """Carry out a lowrank plan on a copy of ``model`` (the input is left as it was)."""
    ranks = {e["layer"]: e["rank"] for e in plan if "skipped" not in e}
    factors = {e["layer"]: e["_factors"] for e in _factorize(model, cfg, ctx, ranks) if "_factors" in e}
    new = copy.deepcopy(model)
    for entry in plan:
        if "skipped" in entry:
            continue
        down, up = factors[entry["layer"]]
        old = new.get_submodule(entry["layer"])
        repl = LowRankLinear(entry["in"], entry["out"], entry["rank"], bias=old.bias is not None)
        with torch.no_grad():
            repl.down.weight.copy_(down)
            repl.up.weight.copy_(up)
            if old.bias is not None:
                repl.up.bias.copy_(old.bias)
        replace_module(new, entry["layer"], repl)
    done = [e for e in plan if "skipped" not in e]
    before = sum(e["params_before"] for e in done)
    after = sum(e["params_after"] for e in done)
    summary = {"factorized": len(done), "skipped": len(plan) - len(done),
               "params_before": before, "params_after": after,
               "param_ratio": round(after / before, 4) if before else None,
               "mean_rel_err": round(sum(e["rel_err"] for e in done) / len(done), 5) if done else None}
    return PassResult(model=new, name="lowrank", config=config_to_dict(cfg), layers=list(plan), summary=summary)


def lowrank(model, cfg: LowRankConfig, ctx: PassContext) -> PassResult:
    """Factorize the selected linears (a new model; the input is left as it was).

    Example:
        >>> from slimx.slim.base import PassContext
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> r = lowrank(m, LowRankConfig(rank_ratio=0.25), PassContext())
        >>> type(r.model[0]).__name__, r.model[0].rank
        ('LowRankLinear', 16)
    """
    return apply_lowrank(model, plan_lowrank(model, cfg, ctx), cfg, ctx)
