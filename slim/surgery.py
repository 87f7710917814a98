"""Model surgery every pass shares: which layers a pass touches, their calibration statistics, the whitened
SVD that factorizations start from, and putting a new module in a layer's place.

A pass plans with these (``plan`` returns plain data: paths, shapes, ranks, errors) and applies the plan to a
copy of the model; the statistics a plan needed are cached on the ``PassContext`` so that apply does not run
the calibration data a second time.
"""

from __future__ import annotations

import torch

from slimx.slim.base import LayerSelector, PassContext, real_rows, token_mask, trim_padding


def select_linears(model, selector: LayerSelector) -> list[str]:
    """Module paths of the ``nn.Linear`` layers ``selector`` picks, in model order.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> select_linears(m, LayerSelector(exclude=("^2$",)))
        ['0']
    """
    return [path for path, mod in model.named_modules()
            if path and isinstance(mod, torch.nn.Linear) and selector.selects(path, mod)]


def replace_module(model, path: str, new) -> None:
    """Put ``new`` where the module at ``path`` is (in place)."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def input_second_moments(model, paths: list[str], batches: list[tuple], mask_index: int | None = None):
    """Input-channel second-moment matrices (X^T X) and row counts of the given linears on ``batches``.

    With ``mask_index`` (the attention-mask input), only real tokens count, not padding.
    """
    stats: dict[str, list] = {p: [None, 0] for p in paths}
    current = {"mask": None}
    hooks = []
    for path in paths:
        def record(_mod, inputs, _out, path=path):
            x = real_rows(inputs[0].detach().double(), current["mask"])
            acc = stats[path]
            acc[0] = x.T @ x if acc[0] is None else acc[0] + x.T @ x
            acc[1] += x.shape[0]
        hooks.append(model.get_submodule(path).register_forward_hook(record))
    try:
        with torch.no_grad():
            for batch in batches:
                batch = trim_padding(batch, mask_index)
                current["mask"] = token_mask(batch, mask_index)
                model(*batch)
    finally:
        for h in hooks:
            h.remove()
    return {p: (c, n) for p, (c, n) in stats.items() if c is not None}


def layer_moments(model, paths: list[str], ctx: PassContext) -> dict:
    """``input_second_moments`` on the context's calibration data, computed once per model and layer set
    (a pass's plan and apply share them through ``ctx.cache``); empty without calibration data."""
    if not ctx.calib or not paths:
        return {}
    key = ("moments", id(model), tuple(paths))
    if key not in ctx.cache:
        ctx.cache[key] = input_second_moments(model, paths, ctx.calib, ctx.mask_index)
    return ctx.cache[key]


def whitening(moment, damping: float):
    """Cholesky factor ``L`` of the inputs' second moment (``L L^T = X^T X / n``, plus a ridge of ``damping``
    times its mean diagonal): ``W L`` is the weight seen through the data."""
    cov, rows = moment
    cov = cov / max(rows, 1)
    ridge = damping * torch.diagonal(cov).mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    return torch.linalg.cholesky(cov + ridge)


def whitened_svd(weight, right=None):
    """SVD of ``weight @ right`` (``right``: a whitening factor or diagonal scaling, or None for plain SVD)."""
    return torch.linalg.svd(weight @ right if right is not None else weight, full_matrices=False)


def split_factors(u, s, vt, rank: int, right=None):
    """The rank-``rank`` factors ``(left, right_factor)`` with ``left @ right_factor ~= W``: ``U S^1/2`` and
    ``S^1/2 V^T``, the transform ``right`` the SVD was taken through undone on the second."""
    root = torch.sqrt(s[:rank])
    second = root[:, None] * vt[:rank]
    if right is not None:  # undo the input transform: second @ right^-1 (right is lower-triangular or diagonal)
        second = torch.linalg.solve_triangular(right, second, upper=False, left=False)
    return u[:, :rank] * root[None, :], second


def weighted_relative_error(weight, approx, moment=None) -> float:
    """``||X (W - W')^T|| / ||X W^T||`` on the calibration inputs (``moment``), else on the weights alone."""
    diff = weight - approx
    if moment is None:
        return float(torch.linalg.norm(diff) / torch.linalg.norm(weight))
    cov, _ = moment  # ||X D^T||^2 = trace(D C D^T)
    num = torch.einsum("oi,ij,oj->", diff, cov, diff)
    den = torch.einsum("oi,ij,oj->", weight, cov, weight)
    return float(torch.sqrt(num.clamp(min=0) / den.clamp(min=1e-30)))
