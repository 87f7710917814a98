"""``fisher-prune``: heads and FFN neurons ranked across the whole model at once by their Fisher information on
calibration data, cut to a global MACs budget, the kept weights then refit layer by layer (``slim.reconstruct``).

After Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers", NeurIPS): a mask variable
``m`` multiplies each head's output and each FFN neuron; the importance of a unit is the diagonal Fisher
information of its mask, ``sum over samples of (dL/dm)^2`` at ``m = 1``; the units are sorted by importance per
MAC and cut, across all layers together, until the budget is met; the layer-wise least-squares reconstruction
then refits each cut layer's output projection. With labels ``L`` is the task loss (cross-entropy). An embedding
model has no loss to differentiate at the original (its distance to itself is zero, with zero gradient), so
``L`` is the output projected on a random direction per sample, and the squared gradient averages (over those
directions) to the squared norm of the output's derivative by the mask: the Gauss-Newton form of the Fisher
information of a Gaussian likelihood around the original output.

Costs are MACs per token at the calibration data's median length: a head its share of the q/k/v/output
projections and of the two attention products, an FFN neuron its row of the first linear and column of the
second. At least one head per attention and ``multiple`` neurons per FFN stay (FFN widths are rounded to that
multiple).

``rounds`` > 1 scores and cuts in steps (to ``keep ** (r / rounds)`` of the MACs after round ``r``), each round
scoring the model the rounds before it cut and refit: the diagonal Fisher information ranks units as if each
were cut alone, and once a layer has lost some of its units the ones left carry more (the iterative re-scoring
of structured OBS methods such as ZipLM, Kurtic et al. 2023, and of LLM-Pruner). Only the final choice of units
is kept; run_passes then refits the cut layers of the original from scratch, as for one round.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from slimx._core.config import config_to_dict
from slimx._core.errors import UsageError
from slimx.slim.attention import attention_modules, blocks, no_blocks_error, prune_heads
from slimx.slim.base import PassContext, PassResult, register_pass, token_mask, trim_padding
from slimx.slim.reconstruct import reconstruct


@dataclass(frozen=True)
class FisherPruneConfig:
    """Options of ``fisher-prune``.

    Attributes:
        keep: the fraction of the prunable MACs per token (heads and FFNs) to keep, in (0, 1].
        heads, ffn: which units may be cut.
        multiple: FFN widths are kept at multiples of this many neurons (None: the device's ``rank_multiple``,
            else 8).
        samples: calibration samples the Fisher information is summed over (at most).
        directions: random output directions per sample for an embedding model (more: a less noisy estimate
            of the output's sensitivity, one backward pass each).
        seed: the random output directions of an embedding model.
        rounds: score, cut and refit this many times, each round re-scoring what the rounds before it left.
        refit_samples: calibration samples the refit between rounds uses (at most).
    """

    keep: float = 0.6
    heads: bool = True
    ffn: bool = True
    multiple: int | None = None
    samples: int = 256
    directions: int = 4
    seed: int = 0
    rounds: int = 1
    refit_samples: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.multiple is not None and self.multiple < 1:
            raise ValueError("multiple must be at least 1")
        if self.samples < 1 or self.directions < 1 or self.rounds < 1 or self.refit_samples < 1:
            raise ValueError("samples, directions, rounds and refit_samples must be at least 1")
        if not (self.heads or self.ffn):
            raise ValueError("heads and ffn cannot both be off")


@dataclass
class _Group:
    """The units of one layer: its heads (or FFN neurons), where their mask goes, and what each costs."""

    kind: str  # "heads" or "ffn"
    block: str
    path: str  # the attention module (heads) or the FFN view's path
    mask_at: str  # the module whose input the mask multiplies (the output projection)
    units: int
    width: int  # features per unit in the mask's input (head width; 1 for a neuron)
    macs_per_unit: float  # per token
    minimum: int  # units that must stay


def _projection(model, path: str | None, inner: str) -> str | None:
    """The linear whose input a branch's units feed: the module at ``path`` (BERT's ``output.dense``), or its
    ``inner`` child (timm's ``attn.proj``, ``mlp.fc2``); None when neither is a linear."""
    if path is None:
        return None
    module = model.get_submodule(path)
    if isinstance(module, nn.Linear):
        return path
    return f"{path}.{inner}" if isinstance(getattr(module, inner, None), nn.Linear) else None


def _groups(model, cfg: FisherPruneConfig, length: int, multiple: int) -> list[_Group]:
    views = {v.path: v for v in attention_modules(model, strict=False)}
    out = []
    for b in blocks(model):
        proj = _projection(model, b.attention_out, "proj")
        if cfg.heads and b.attention in views and proj is not None:
            v = views[b.attention]
            d_model = model.get_submodule(proj).out_features
            # q, k, v and output projections of one head, and its two attention products
            macs = (3 * v.head_dim + v.value_dim) * d_model + length * (v.head_dim + v.value_dim)
            out.append(_Group("heads", b.path, b.attention, proj, v.num_heads, v.value_dim, macs, 1))
        second = _projection(model, b.ffn_out, "fc2") if b.ffn is not None else None
        if cfg.ffn and second is not None:
            out.append(_Group("ffn", b.path, b.ffn.path, second, b.ffn.hidden, 1,
                              2 * model.get_submodule(second).out_features, min(multiple, b.ffn.hidden)))
    return out


def fisher_scores(model, groups: list[_Group], batches: list[tuple], mask_index: int | None,
                  labels: list[int] | None = None, seed: int = 0, progress=None,
                  directions: int = 1) -> dict[str, torch.Tensor]:
    """Per group, the Fisher information of each unit's mask summed over ``batches`` (one sample each)."""
    masks = {g.mask_at: torch.ones(g.units, requires_grad=True) for g in groups}
    width = {g.mask_at: g.width for g in groups}
    hooks = []
    for g in groups:
        def scale(_mod, args, path=g.mask_at):
            x = args[0]
            m = masks[path].repeat_interleave(width[path]).to(x.dtype)
            return (x * m,)
        hooks.append(model.get_submodule(g.mask_at).register_forward_pre_hook(scale))
    scores = {k: torch.zeros(v.shape[0], dtype=torch.float64) for k, v in masks.items()}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for i, batch in enumerate(batches):
            if progress is not None:
                progress.tick("fisher-prune: scores", i, len(batches))
            batch = trim_padding(batch, mask_index)
            out = model(*batch)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if labels is not None:
                losses = [nn.functional.cross_entropy(out.reshape(out.shape[0], -1).float(),
                                                      torch.tensor([labels[i]] * out.shape[0]))]
            else:
                if out.dim() == 3 and mask_index is not None:  # token outputs: real tokens only
                    out = out * token_mask(batch, mask_index).unsqueeze(-1).to(out.dtype)
                losses = [(out.float() * torch.randn(out.shape, generator=gen)).sum() for _ in range(directions)]
            for j, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, list(masks.values()), retain_graph=j < len(losses) - 1)
                for key, grad in zip(masks, grads, strict=True):
                    scores[key] += grad.double() ** 2 / len(losses)
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return scores


def _select(groups: list[_Group], scores: dict, keep: float, multiple: int) -> dict[str, list[int]]:
    """Units to keep per group: cut the least important per MAC, across all groups, until the kept MACs are
    ``keep`` of the total; FFN widths rounded up to ``multiple``."""
    total = sum(g.units * g.macs_per_unit for g in groups)
    target = keep * total
    ranked = sorted(((float(scores[g.mask_at][u]) / g.macs_per_unit, gi, u) for gi, g in enumerate(groups)
                     for u in range(g.units)))
    kept = {gi: set(range(g.units)) for gi, g in enumerate(groups)}
    macs = total
    for _, gi, u in ranked:
        if macs <= target:
            break
        g = groups[gi]
        if len(kept[gi]) <= g.minimum:
            continue
        kept[gi].discard(u)
        macs -= g.macs_per_unit
    out = {}
    for gi, g in enumerate(groups):
        order = sorted(range(g.units), key=lambda u, g=g: -float(scores[g.mask_at][u]))
        count = len(kept[gi])
        if g.kind == "ffn":
            count = min(g.units, max(g.minimum, math.ceil(count / multiple) * multiple))
        out[g.mask_at] = sorted(order[:count])
    return out


def _search(model, groups: list[_Group], cfg: FisherPruneConfig, ctx: PassContext, batches: list[tuple],
            multiple: int) -> tuple[dict[str, list[int]], dict]:
    """The units of ``model`` to keep per group (indices into the original layers) and the MACs summary, after
    ``cfg.rounds`` rounds of scoring and cutting (see the module's docstring)."""
    labels = ctx.labels[: cfg.samples] if ctx.labels is not None else None
    total = sum(g.units * g.macs_per_unit for g in groups)
    kept = {g.mask_at: list(range(g.units)) for g in groups}
    current, length = model, _median_length(batches, ctx.mask_index)

    def kept_macs() -> float:
        return sum(len(kept[g.mask_at]) * g.macs_per_unit for g in groups)

    for r in range(1, cfg.rounds + 1):
        now = _groups(current, cfg, length, multiple) if r > 1 else groups
        scores = fisher_scores(copy.deepcopy(current), now, batches, ctx.mask_index, labels, cfg.seed + r - 1,
                               ctx.progress, cfg.directions)
        remaining = sum(g.units * g.macs_per_unit for g in now)
        target = cfg.keep ** (r / cfg.rounds) * total
        chosen = _select(now, scores, min(1.0, target / remaining), multiple)
        kept = {path: [kept[path][i] for i in chosen[path]] for path in kept}
        if r < cfg.rounds:
            if ctx.progress is not None:
                ctx.progress.note(f"fisher-prune: round {r} of {cfg.rounds}, MACs kept {kept_macs() / total:.3f}")
            cut = _cut(current, [(g.kind, g.block, g.path, chosen[g.mask_at]) for g in now
                                 if len(chosen[g.mask_at]) < g.units])
            reconstruct(cut, current, ctx.calib[: cfg.refit_samples], ctx.mask_index,
                        reference=ctx.teacher if ctx.teacher is not None else model)
            current = cut
    after = kept_macs()
    return kept, {"macs_per_token_before": round(total), "macs_per_token_after": round(after),
                  "macs_kept": round(after / total, 4) if total else None, "rounds": cfg.rounds}


def _cut(model, cuts: list[tuple[str, str, str, list[int]]]):
    """A copy of ``model`` with, per ``(kind, block, path, keep)``, only the ``keep`` heads of the attention at
    ``path`` or neurons of the FFN of ``block``."""
    new = copy.deepcopy(model)
    for kind, block, path, keep in cuts:
        if kind == "heads":
            prune_heads(new, path, keep)
        else:
            next(b for b in blocks(new) if b.path == block).ffn.prune(new, keep)
    return new


def _median_length(batches: list[tuple], mask_index: int | None) -> int:
    if mask_index is None or not batches:
        return 1
    lengths = sorted(int(b[mask_index].sum()) for b in batches)
    return max(1, lengths[len(lengths) // 2])


def _multiple(cfg: FisherPruneConfig, ctx: PassContext) -> int:
    return cfg.multiple or int(getattr(ctx.device, "rank_multiple", None) or 8)


def plan_fisher(model, cfg: FisherPruneConfig, ctx: PassContext) -> list[dict]:
    """Score every head and FFN neuron, choose the units to keep: per layer, plain data."""
    if not blocks(model):
        raise no_blocks_error(model, "--pass fisher-prune")
    if not ctx.calib:
        raise UsageError("--pass fisher-prune", "ranks heads and neurons on calibration data",
                         "give --calib with real samples (a few hundred is good)")
    multiple = _multiple(cfg, ctx)
    batches = ctx.calib[: cfg.samples]
    groups = _groups(model, cfg, _median_length(batches, ctx.mask_index), multiple)
    key = ("fisher", id(model), repr(cfg))
    if key not in ctx.cache:
        ctx.cache[key] = _search(model, groups, cfg, ctx, batches, multiple)
    keep, _ = ctx.cache[key]
    return [{"layer": g.path, "block": g.block, "kind": g.kind, "units": g.units, "kept": len(keep[g.mask_at]),
             "keep": keep[g.mask_at], "output_projection": g.mask_at,
             "macs_per_unit_per_token": round(g.macs_per_unit)} for g in groups]


@register_pass("fisher-prune", FisherPruneConfig, plan=plan_fisher,
               selects=lambda model, cfg: [g.path for g in _groups(model, cfg, 1, 8)],
               fix_hint="a larger keep (the fraction of MACs kept), or --recover", test_model="vit",
               test_options={"keep": 0.7, "samples": 8})
def apply_fisher(model, plan: list[dict], cfg: FisherPruneConfig, ctx: PassContext) -> PassResult:
    """Cut the planned heads and FFN neurons from a copy of ``model`` (run_passes then refits the cut layers)."""
    new = _cut(model, [(e["kind"], e["block"], e["layer"], e["keep"]) for e in plan if e["kept"] < e["units"]])
    key = ("fisher", id(model), repr(cfg))
    summary = dict(ctx.cache[key][1]) if key in ctx.cache else {}
    summary.update({
        "heads_before": sum(e["units"] for e in plan if e["kind"] == "heads"),
        "heads_after": sum(e["kept"] for e in plan if e["kind"] == "heads"),
        "ffn_neurons_before": sum(e["units"] for e in plan if e["kind"] == "ffn"),
        "ffn_neurons_after": sum(e["kept"] for e in plan if e["kind"] == "ffn"),
        "importance": "task loss (labels)" if ctx.labels is not None else "output sensitivity (random directions)",
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in new.parameters())})
    layers = [{k: v for k, v in e.items() if k != "keep"} for e in plan]
    return PassResult(model=new, name="fisher-prune", config=config_to_dict(cfg), layers=layers, summary=summary)
