"""DSFormer: each selected linear as a small dense basis times semi-structured sparse coefficients.

``W (out x in) ~= C @ B`` with the sparse factor on the larger side: when ``out >= in``, a dense basis
``B`` (k x in) and sparse coefficients ``C`` (out x k) holding ``nnz`` non-zeros per row (each output
is a sparse combination of k basis projections); when ``in > out``, sparse ``C`` (k x in) first and a
dense basis (out x k) after. With ``nm="2:4"`` the coefficients follow the N:M pattern that TensorRT's
sparse tensor cores use instead.

Initialised from the SVD (``C0 = U_k S^1/2``, ``B0 = S^1/2 V_k^T``, then the sparsity mask), and then
the **Straight-Through Factorizer**: basis and coefficients are trained jointly, the mask recomputed
from the coefficient magnitudes in every forward pass while gradients pass straight through to every
coefficient, so pruned ones can come back. Here the loss is each layer's output error on the
calibration activations, ``|| X (W - C B)^T ||``, a local distillation target; ``--recover`` can then
distill the whole model end to end with the STF still active.

Exported form: two dense linears with the zeros kept (in a trial here, 0.66x the time of the original
384->1536 linear in onnxruntime; every gather-based form was slower), so ONNX, TFLite and CoreML run it
as plain MatMuls and the parameter saving shows in compressed storage and N:M-aware runtimes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from slimx._core.config import config_to_dict
from slimx.slim.base import LayerSelector, PassContext, PassResult, register_pass
from slimx.slim.surgery import layer_moments, replace_module, select_linears, split_factors, whitened_svd, whitening


@dataclass(frozen=True)
class DSFormerConfig:
    """Options of the ``dsformer`` pass.

    Attributes:
        k_ratio: basis size k = ratio x min(in, out), rounded up to ``multiple``.
        nnz: non-zeros per row of the sparse coefficients (ignored with ``nm`` or ``density``).
        density: non-zeros per row as a fraction of the row's length (rows of the sparse factor are k long
            when it maps the basis to the outputs, in_features long when it reads the inputs).
        nm: an N:M pattern for the coefficients, e.g. "2:4" (N non-zeros in every M along a row).
        steps, lr: Straight-Through Factorizer optimisation per layer.
        multiple: round k up to a multiple of this.
        include, exclude, types: the layer selector; min_features: leave smaller layers alone.
    """

    k_ratio: float = 0.5
    nnz: int = 16
    nm: str | None = None
    density: float | None = None
    steps: int = 150
    lr: float = 1e-2
    multiple: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    min_features: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.k_ratio <= 1.0:
            raise ValueError(f"k_ratio must be in (0, 1], got {self.k_ratio}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.nnz < 1 or self.steps < 0 or self.lr <= 0 or self.multiple < 1:
            raise ValueError("nnz and multiple must be at least 1, steps non-negative, lr positive")
        if self.nm is not None:
            n, _, m = str(self.nm).partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"nm must look like 2:4, got {self.nm!r}")

    @property
    def selector(self) -> LayerSelector:
        return LayerSelector(include=self.include, exclude=self.exclude, types=self.types)


def sparsity_mask(coeff: torch.Tensor, nnz: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep the ``nnz`` largest magnitudes per row, or N of every M along each row."""
    mag = coeff.detach().abs()
    if nm is not None:
        n, m = nm
        groups = mag.reshape(mag.shape[0], -1, m)
        idx = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups).scatter_(-1, idx, 1.0).reshape_as(coeff)
    idx = mag.topk(min(nnz, mag.shape[1]), dim=1).indices
    return torch.zeros_like(mag).scatter_(1, idx, 1.0)


class DenseSparseLinear(torch.nn.Module):
    """A linear as dense basis x sparse coefficients; in training mode the Straight-Through Factorizer runs."""

    def __init__(self, in_features: int, out_features: int, k: int, nnz: int, nm: tuple[int, int] | None,
                 sparse_out: bool, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.nnz, self.nm, self.sparse_out = nnz, nm, sparse_out
        if sparse_out:  # y = C (B x): basis k x in, coefficients out x k
            self.basis = torch.nn.Parameter(torch.zeros(k, in_features))
            self.coeff = torch.nn.Parameter(torch.zeros(out_features, k))
        else:  # y = B (C x): coefficients k x in, basis out x k
            self.coeff = torch.nn.Parameter(torch.zeros(k, in_features))
            self.basis = torch.nn.Parameter(torch.zeros(out_features, k))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("mask", torch.ones_like(self.coeff))

    def sparse_coeff(self) -> torch.Tensor:
        if self.training:  # STF: a fresh mask, gradients straight through to every coefficient
            mask = sparsity_mask(self.coeff, self.nnz, self.nm)
            self.mask.copy_(mask)
            return self.coeff - (self.coeff * (1 - mask)).detach()
        return self.coeff * self.mask

    def weight(self) -> torch.Tensor:
        coeff = self.sparse_coeff()
        return coeff @ self.basis if self.sparse_out else self.basis @ coeff

    def forward(self, x):
        coeff = self.sparse_coeff()
        if self.sparse_out:
            return F.linear(F.linear(x, self.basis), coeff, self.bias)
        return F.linear(F.linear(x, coeff), self.basis, self.bias)

    def to_export(self) -> torch.nn.Sequential:
        """The deployed form: two plain linears, the sparse one with its zeros kept."""
        with torch.no_grad():
            mask = sparsity_mask(self.coeff, self.nnz, self.nm) if self.training else self.mask
            coeff = self.coeff * mask
            first, second = (self.basis, coeff) if self.sparse_out else (coeff, self.basis)
            a = torch.nn.Linear(first.shape[1], first.shape[0], bias=False)
            b = torch.nn.Linear(second.shape[1], second.shape[0], bias=self.bias is not None)
            a.weight.copy_(first)
            b.weight.copy_(second)
            if self.bias is not None:
                b.bias.copy_(self.bias)
        return torch.nn.Sequential(a, b)

    def stored_params(self) -> dict:
        nonzero = int(self.mask.sum().item())
        return {"basis": self.basis.numel(), "coeff_nonzero": nonzero,
                "values": self.basis.numel() + nonzero + (self.bias.numel() if self.bias is not None else 0)}


def _fit(layer: DenseSparseLinear, weight: torch.Tensor, chol: torch.Tensor | None, steps: int, lr: float) -> float:
    """Straight-Through Factorizer on one layer: minimise || (W - C B) L || (L L^T = X^T X / n)."""
    target = weight.float() @ chol if chol is not None else weight.float()
    params = [layer.basis, layer.coeff]
    opt = torch.optim.Adam(params, lr=lr)
    layer.train()
    denom = target.pow(2).sum().clamp(min=1e-30)
    for _ in range(steps):
        approx = layer.weight() @ chol if chol is not None else layer.weight()
        loss = (approx - target).pow(2).sum() / denom
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        layer.mask.copy_(sparsity_mask(layer.coeff, layer.nnz, layer.nm))
        approx = layer.weight() @ chol if chol is not None else layer.weight()
        return float(torch.sqrt((approx - target).pow(2).sum() / denom))


def plan_dsformer(model, cfg: DSFormerConfig, ctx: PassContext) -> list[dict]:
    """Per selected linear: basis size, non-zeros per row and which side is sparse, or why it is skipped
    (plain data; nothing is changed yet)."""
    nm = _nm(cfg)
    plan = []
    for path in select_linears(model, cfg.selector):
        out_f, in_f = model.get_submodule(path).weight.shape
        entry = {"layer": path, "in": in_f, "out": out_f, "params_before": out_f * in_f}
        if min(in_f, out_f) < cfg.min_features:
            plan.append({**entry, "skipped": f"fewer than {cfg.min_features} features"})
            continue
        k = min(int(math.ceil(cfg.k_ratio * min(in_f, out_f) / cfg.multiple) * cfg.multiple), min(in_f, out_f))
        sparse_out = out_f >= in_f
        if (nm is not None and k % nm[1] and sparse_out) or (nm is not None and in_f % nm[1] and not sparse_out):
            plan.append({**entry, "skipped": f"row length not a multiple of {nm[1]} for {cfg.nm}"})
            continue
        row_len = k if sparse_out else in_f
        if nm:
            per_row = nm[0] * row_len // nm[1]
        elif cfg.density is not None:
            per_row = max(1, round(cfg.density * row_len))
        else:
            per_row = min(cfg.nnz, row_len)
        dense_cost = k * in_f + out_f * k  # MACs per token of the exported form, either orientation
        if dense_cost >= in_f * out_f:
            plan.append({**entry, "k": k, "skipped": f"k={k} would not reduce MACs of the exported dense form"})
            continue
        plan.append({**entry, "k": k, "nonzeros_per_row": per_row, "pattern": cfg.nm or f"{per_row} per row",
                     "sparse_side": "out" if sparse_out else "in", "macs_per_token_exported": dense_cost})
    return plan


def _nm(cfg: DSFormerConfig) -> tuple[int, int] | None:
    return tuple(int(v) for v in cfg.nm.split(":")) if cfg.nm else None


def _initial_layer(lin, entry: dict, nm, moment) -> tuple[DenseSparseLinear, torch.Tensor | None]:
    """The layer from the whitened SVD (the least output error on the calibration inputs for rank k), masked;
    and the whitening factor its fit measures error through (None: on the weights)."""
    out_f, in_f, k = entry["out"], entry["in"], entry["k"]
    sparse_out = entry["sparse_side"] == "out"
    weight = lin.weight.detach().double()
    chol = whitening(moment, 1e-5) if moment is not None else None
    u, s, vt = whitened_svd(weight, chol)
    left, right = split_factors(u, s, vt, k, chol)
    layer = DenseSparseLinear(in_f, out_f, k, entry["nonzeros_per_row"], nm, sparse_out, bias=lin.bias is not None)
    with torch.no_grad():
        left, right = left.float(), right.float()
        if sparse_out:
            layer.coeff.copy_(left)
            layer.basis.copy_(right)
        else:
            layer.basis.copy_(left)
            layer.coeff.copy_(right)
        if lin.bias is not None:
            layer.bias.copy_(lin.bias)
        layer.mask.copy_(sparsity_mask(layer.coeff, entry["nonzeros_per_row"], nm))
    return layer, (chol.float() if chol is not None else None)


def finalize_dsformer(model):
    """Every DenseSparseLinear as its exported form (two plain linears), in place (returns the model)."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, DenseSparseLinear):
            replace_module(model, path, mod.to_export())
    return model


@register_pass("dsformer", DSFormerConfig, plan=plan_dsformer, finalize=finalize_dsformer,
               selects=lambda model, cfg: select_linears(model, cfg.selector),
               fix_hint="a larger k_ratio or density", test_options={"steps": 5})
def apply_dsformer(model, plan: list[dict], cfg: DSFormerConfig, ctx: PassContext) -> PassResult:
    """Carry out a DSFormer plan on a copy of ``model``: whitened-SVD init, then the Straight-Through Factorizer."""
    nm = _nm(cfg)
    moments = layer_moments(model, select_linears(model, cfg.selector), ctx)
    new = copy.deepcopy(model)
    layers = []
    for entry in plan:
        if "skipped" in entry:
            layers.append(dict(entry))
            continue
        path = entry["layer"]
        lin = model.get_submodule(path)
        layer, chol = _initial_layer(lin, entry, nm, moments.get(path))
        eye = torch.eye(entry["in"])
        with torch.no_grad():
            through = chol if chol is not None else eye
            init_err = float(torch.linalg.norm((layer.weight() - lin.weight) @ through) /
                             torch.linalg.norm(lin.weight @ through))
        rel_err = _fit(layer, lin.weight.detach(), chol, cfg.steps, cfg.lr) if cfg.steps else init_err
        for p in layer.parameters():
            p.requires_grad_(False)
        replace_module(new, path, layer)
        stored = layer.stored_params()
        layers.append({**entry, "stored_values": stored["values"],
                       "param_ratio": round(stored["values"] / entry["params_before"], 4),
                       "rel_err_init": round(init_err, 5), "rel_err": round(rel_err, 5), "stf_steps": cfg.steps,
                       "error_on": "calibration activations" if chol is not None else "weights"})
    done = [e for e in layers if "skipped" not in e]
    before = sum(e["params_before"] for e in done)
    after = sum(e["stored_values"] for e in done)
    summary = {"factorized": len(done), "skipped": len(layers) - len(done), "params_before": before,
               "stored_values_after": after, "param_ratio": round(after / before, 4) if before else None,
               "export_form": "two dense linears, zeros kept", "mean_rel_err": round(
                   sum(e["rel_err"] for e in done) / len(done), 5) if done else None}
    return PassResult(model=new, name="dsformer", config=config_to_dict(cfg), layers=layers, summary=summary)


def dsformer(model, cfg: DSFormerConfig, ctx: PassContext) -> PassResult:
    """Factorize the selected linears into dense basis x sparse coefficients (a new model).

    Example:
        >>> from slimx.slim.base import PassContext
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 128))
        >>> r = dsformer(m, DSFormerConfig(k_ratio=0.5, nnz=8, steps=5), PassContext())
        >>> r.layers[0]["k"], r.layers[0]["stored_values"] < r.layers[0]["params_before"]
        (32, True)
    """
    return apply_dsformer(model, plan_dsformer(model, cfg, ctx), cfg, ctx)
