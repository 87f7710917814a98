"""Layer-wise reconstruction after a structural cut: no gradients, a ridge least-squares refit per layer.

After a pass cuts a layer's inputs (heads, FFN neurons) or replaces a linear by a factorization (low rank, dense x
sparse), the linear map that produces the layer's output is refit so that, on calibration activations, it gives
what the model before the cut gave there: with ``X`` the refit map's inputs in the cut model and ``Y`` the output
of the same layer before the cut, ``W = argmin ||X W^T - Y||^2 + lambda ||W||^2`` (the bias as a column of ones),
solved from the accumulated normal equations in float64. This is the reconstruction step of Kwon et al. 2022
("A Fast Post-Training Pruning Framework for Transformers", NeurIPS, section 3.4: least squares on the kept
weights, no retraining) and the layer-wise view SparseGPT and Wanda take.

What is refit (``refit_targets``): a linear with fewer inputs than the same layer before the pass (its inputs were
cut: BERT's ``attention.output.dense`` and ``output.dense``, timm's ``attn.proj`` and ``mlp.fc2``), the ``up``
factor of a ``LowRankLinear`` and the dense output basis of a ``DenseSparseLinear`` put where a linear was. Any
pass whose modules take these forms is reconstructed, with no code of its own. A refit is kept per layer only
where it lowers the layer's error on calibration batches held out of the fit and brings the model's output on
them closer to the reference's (the original model's in the pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimx.slim.base import length_batches, real_rows, token_mask, trim_padding


@dataclass
class RefitTarget:
    """One linear map to refit: ``path`` in the cut model (its forward hook sees the input; the layer at the same
    path before the cut gives the target output), and how to read and write the map."""

    path: str
    kind: str  # "linear", "lowrank-up" or "dense-sparse-basis"

    def features(self, module, x):
        """The refit map's inputs, from the module's own input ``x``."""
        if self.kind == "lowrank-up":
            return module.down(x)
        if self.kind == "dense-sparse-basis":
            return F.linear(x, module.sparse_coeff())
        return x

    def weights(self, module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "lowrank-up":
            return module.up.weight, module.up.bias
        if self.kind == "dense-sparse-basis":
            return module.basis, module.bias
        return module.weight, module.bias


def refit_targets(model: nn.Module, before: nn.Module) -> list[RefitTarget]:
    """The maps of ``model`` a pass cut or factorized, relative to ``before`` (the model the pass started from)."""
    from slimx.slim.dsformer import DenseSparseLinear
    from slimx.slim.lowrank import LowRankLinear

    old = dict(before.named_modules())
    out = []
    for path, module in model.named_modules():
        ref = old.get(path)
        if not isinstance(ref, nn.Linear) or module is ref:
            continue
        if isinstance(module, nn.Linear) and module.in_features < ref.in_features \
                and module.out_features == ref.out_features:
            out.append(RefitTarget(path, "linear"))
        elif isinstance(module, LowRankLinear) and module.up.out_features == ref.out_features:
            out.append(RefitTarget(path, "lowrank-up"))
        elif isinstance(module, DenseSparseLinear) and not module.sparse_out \
                and module.out_features == ref.out_features:
            out.append(RefitTarget(path, "dense-sparse-basis"))
    return out


class _Normal:
    """Accumulated normal equations of one refit: ``A = X~^T X~``, ``B = X~^T Y``, ``trace(Y^T Y)`` (``X~``: the
    inputs with a column of ones where the map has a bias)."""

    def __init__(self) -> None:
        self.a = self.b = None
        self.yy = 0.0
        self.rows = 0

    def add(self, x, y, bias: bool) -> None:
        x, y = x.double(), y.double()
        if bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        a, b = x.T @ x, x.T @ y
        self.a = a if self.a is None else self.a + a
        self.b = b if self.b is None else self.b + b
        self.yy += float((y * y).sum())
        self.rows += x.shape[0]

    def error(self, w) -> float:
        """``||X~ W~^T - Y||^2 / ||Y||^2`` for ``w`` (out x in, the bias as its last column)."""
        sq = torch.einsum("oi,ij,oj->", w, self.a, w) - 2 * torch.einsum("oi,io->", w, self.b) + self.yy
        return float(sq.clamp(min=0) / max(self.yy, 1e-30))


def _targets_of(before, targets: list[RefitTarget], batches: list[tuple], mask_index) -> dict[str, list]:
    """The outputs of ``before`` at every target's layer on each batch (real tokens; None where the batch did
    not reach it): one forward per batch, computed once for all the refits of a call and held in memory (the
    layers' outputs over the calibration tokens, float32)."""
    outputs: dict[str, list] = {t.path: [] for t in targets}
    current = {"mask": None}
    hooks = []
    for t in targets:
        def take_output(_mod, _args, out, path=t.path):
            outputs[path][-1] = real_rows(out.detach(), current["mask"])

        hooks.append(before.get_submodule(t.path).register_forward_hook(take_output))
    try:
        with torch.no_grad():
            for batch in batches:
                batch = trim_padding(batch, mask_index)
                current["mask"] = token_mask(batch, mask_index)
                for out in outputs.values():
                    out.append(None)
                before(*batch)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _collect(model, t: RefitTarget, batches: list[tuple], ys: list, mask_index) -> _Normal:
    """One forward of the cut model per batch: the refit map's inputs, against ``ys`` (``_targets_of``)."""
    normal = _Normal()
    taken: dict[str, Any] = {}
    current = {"mask": None}
    module = model.get_submodule(t.path)
    bias = t.weights(module)[1] is not None

    def take_input(mod, args, _out):
        taken["x"] = real_rows(t.features(mod, args[0].detach()), current["mask"])

    hook = module.register_forward_hook(take_input)
    try:
        with torch.no_grad():
            for batch, y in zip(batches, ys, strict=True):
                batch = trim_padding(batch, mask_index)
                current["mask"] = token_mask(batch, mask_index)
                taken.clear()
                model(*batch)
                x = taken.get("x")
                if x is None or y is None or x.shape[0] != y.shape[0]:
                    continue  # the cut model ran this layer on other rows (tokens dropped): not refit
                normal.add(x, y, bias)
    finally:
        hook.remove()
    return normal


def _grouped(samples: list[tuple], mask_index) -> list[tuple]:
    """Samples run 16 at a time (text: of similar length), the forwards being most of a refit's time; as they
    are where they cannot be stacked (shapes that differ)."""
    try:
        return length_batches(samples, 16, mask_index) if samples else samples
    except RuntimeError:
        return samples


def _first_output(model, batch):
    out = model(*batch)
    return out[0] if isinstance(out, (tuple, list)) else out


def _output_error(model, wanted: list, batches: list[tuple], mask_index) -> float:
    """Mean ``1 - cosine`` of ``model``'s first output to ``wanted`` (the reference's, per batch), per sample."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, want in zip(batches, wanted, strict=True):
            got = _first_output(model, trim_padding(batch, mask_index))
            got, want = got.double().reshape(got.shape[0], -1), want.double().reshape(want.shape[0], -1)
            total += float((1 - F.cosine_similarity(got, want, dim=1)).sum())
            count += got.shape[0]
    return total / max(count, 1)


def reconstruct(model: nn.Module, before: nn.Module, batches: list[tuple], mask_index: int | None = None,
                damping: float = 1e-3, reference: nn.Module | None = None, progress=None) -> list[dict]:
    """Refit ``model``'s cut and factorized maps (``refit_targets``) in place, one after another in model order
    (each on the inputs the refits before it leave), so that each gives what ``before`` gave at that layer on
    ``batches``; a quarter of the batches (from four on) judges each refit, which is kept only where it lowers
    that layer's held-out error and brings the model's output on them closer to ``reference``'s (default
    ``before``). Returns one record per map.

    ``damping``: the ridge, as a fraction of the mean diagonal of ``X^T X`` (the bias column is not damped).
    """
    targets = refit_targets(model, before)
    if not targets or not batches:
        return []
    held = max(1, len(batches) // 4) if len(batches) >= 4 else 0
    fit, val = (batches[:-held], batches[-held:]) if held else (batches, [])
    fit, val = _grouped(fit, mask_index), _grouped(val, mask_index)
    records = []
    reference = before if reference is None else reference
    with torch.no_grad():
        wanted = [_first_output(reference, trim_padding(b, mask_index)) for b in val]
    output_err = _output_error(model, wanted, val, mask_index) if val else None
    fit_ys, val_ys = _targets_of(before, targets, fit, mask_index), _targets_of(before, targets, val, mask_index)
    for i, t in enumerate(targets):
        if progress is not None:
            progress.tick("reconstruct", i, len(targets))
        # in model order, each on the inputs the refits before it leave (refit together, each on the cut model's
        # inputs, they undo each other: MiniLM after fisher-prune, every layer closer, the output farther)
        eq = _collect(model, t, fit, fit_ys[t.path], mask_index)
        val_eq = _collect(model, t, val, val_ys[t.path], mask_index) if val else None
        module = model.get_submodule(t.path)
        weight, bias = t.weights(module)
        record = {"layer": t.path, "map": t.kind, "rows": eq.rows}
        if eq.a is None:
            records.append({**record, "kept": False, "why": "no calibration rows reached it"})
            continue
        old = weight.detach().double()
        if bias is not None:
            old = torch.cat([old, bias.detach().double()[:, None]], dim=1)
        n = eq.a.shape[0]
        features = n - (1 if bias is not None else 0)
        ridge = damping * torch.diagonal(eq.a)[:features].mean().clamp(min=1e-12)
        reg = torch.zeros(n, dtype=eq.a.dtype)
        reg[:features] = ridge
        new = torch.linalg.solve(eq.a + torch.diag(reg), eq.b).T
        judge = val_eq if val_eq is not None and val_eq.a is not None else eq
        before_err, after_err = judge.error(old), judge.error(new)
        record.update({"judged_on": "held-out batches" if judge is not eq else "fit batches",
                       "rel_err_before": round(before_err, 6), "rel_err_after": round(after_err, 6)})
        kept = after_err < before_err
        if kept:
            kept_values = [(p, p.detach().clone()) for p in (weight, bias) if p is not None]
            with torch.no_grad():
                weight.copy_(new[:, :features].to(weight.dtype))
                if bias is not None:
                    bias.copy_(new[:, features].to(bias.dtype))
            if val:  # and the model's output closer to the reference's on the held-out batches, else undone
                err = _output_error(model, wanted, val, mask_index)
                record["output_err"] = {"before": round(output_err, 6), "after": round(err, 6)}
                if err < output_err:
                    output_err = err
                else:
                    kept = False
                    with torch.no_grad():
                        for p, values in kept_values:
                            p.copy_(values)
        records.append({**record, "kept": kept})
    if progress is not None:
        progress.tick("reconstruct", len(targets), len(targets))
    return records


def summary(records: list[dict]) -> dict:
    """The report's one-line view of a reconstruction."""
    kept = [r for r in records if r.get("kept")]
    mean = (lambda key: round(sum(r[key] for r in kept) / len(kept), 6)) if kept else (lambda key: None)
    return {"maps": len(records), "refit": len(kept), "mean_rel_err_before": mean("rel_err_before"),
            "mean_rel_err_after": mean("rel_err_after")}
