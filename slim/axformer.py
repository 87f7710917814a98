"""AxFormer: accuracy-driven removal of what does not help the task (Nagarajan et al., "Specialized
Transformers: faster, smaller and more accurate NLP models"; public code amrnag/Specialized-Transformers, read to
understand the method, not copied).

On a validation split carved from the calibration data, with a per-sample loss (cross-entropy with the task's
labels; for an embedding model, 1 - cosine to the original model's output), greedily from the last block to the
first: try removing the whole FFN branch, then the whole attention branch (the residual and its norm kept, the
branch's mean output over the calibration tokens added in its place: a constant, no weights). A
removal is accepted only if (1) the total validation loss is not worse than the best seen so far and (2) more than
half of the validation samples are no worse than before: the paper's rule. ``tolerance`` relaxes both by that much
loss (per sample for the second): an embedding model starts at loss 0, so without it nothing could ever be taken
away; with it, the mean loss never rises more than ``tolerance`` above the best seen (0.05: mean cosine >= 0.95 on
the validation split before recovery). Where a branch removal narrowly fails (its rise is within ``narrow`` times
the allowance), its heads or FFN neuron groups are tried one at a time by the same rule. Every trial, accepted or
not, goes in the report with its loss and its latency saving (from the device's latency model: one per-module
breakdown of the current model prices every candidate).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np
import torch

from slimx._core.config import config_to_dict
from slimx._core.errors import UsageError
from slimx.slim.attention import BranchData, attention_modules, blocks, no_blocks_error, prune_heads
from slimx.slim.base import PassContext, PassResult, register_pass, stack_samples, trim_padding
from slimx.slim.reconstruct import reconstruct

EMBEDDING_TOLERANCE = 0.05  # the default for a model without labels: mean 1 - cosine may rise this much


@dataclass(frozen=True)
class AxFormerConfig:
    """Options of the ``axformer`` pass.

    Attributes:
        tolerance: loss the search may give up relative to the best seen (None: 0 with labels, the paper's
            rule; 0.05 for an embedding model, where the loss is 1 - cosine to the original).
        validation: the fraction of the calibration samples held out for the search.
        units: where a branch removal narrowly fails, try its heads / FFN neuron groups one at a time.
        ffn_groups: an FFN's neurons form this many groups (by weight magnitude, weakest first).
        narrow: a branch removal "narrowly fails" when its loss rise is within this many allowances.
        include, exclude: regexes on block paths (include wins).
        max_trials: stop after this many trials.
        reconstruct: refit each trial's cut output projection (heads, FFN neuron groups) by least squares on up to
            ``reconstruct_samples`` fit samples before judging it (``slim.reconstruct``), so that a cut is judged
            as it will be kept.
        recover_steps, recover_lr: distillation from the original on the rest of the calibration data after
            every accepted removal (0: none, as the paper, which fine-tunes once at the end: ``--recover``), so
            that each next decision starts from a recovered model; the rule is then judged on the recovered
            model's losses.
        speedup: stop the search once the latency model's estimate of the model so far is the original's
            divided by this or less (None: try every block). A loss allowance stops wherever a split's
            validation samples let it; this stops at the speed asked for, so that the cut, and what it costs,
            varies less between calibration sets. Needs the target's latency model.
    """

    tolerance: float | None = None
    validation: float = 0.25
    units: bool = True
    ffn_groups: int = 4
    narrow: float = 2.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_trials: int = 300
    reconstruct: bool = True
    reconstruct_samples: int = 128
    recover_steps: int = 0
    recover_lr: float = 1e-4
    speedup: float | None = None

    def __post_init__(self) -> None:
        if self.tolerance is not None and not 0 <= self.tolerance <= 1:
            raise ValueError(f"tolerance must be in [0, 1], got {self.tolerance}")
        if not 0 < self.validation < 1:
            raise ValueError("validation must be a fraction in (0, 1)")
        if self.ffn_groups < 2 or self.narrow < 1 or self.max_trials < 1:
            raise ValueError("ffn_groups must be at least 2, narrow at least 1, max_trials at least 1")
        if self.reconstruct_samples < 1:
            raise ValueError("reconstruct_samples must be at least 1")
        if self.speedup is not None and self.speedup <= 1:
            raise ValueError(f"speedup must be above 1, got {self.speedup}")
        if self.recover_steps < 0 or self.recover_lr <= 0:
            raise ValueError("recover_steps must not be negative and recover_lr positive")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None

    def selects(self, path: str) -> bool:
        if any(re.search(p, path) for p in self.include):
            return True
        return not any(re.search(p, path) for p in self.exclude)


class ValidationLoss:
    """Per-sample loss of a candidate on the validation split: cross-entropy with labels, else 1 - cosine to the
    original model's output (computed once).

    The samples run in chunks of ``chunk`` (padded to the chunk's longest real sequence where the model masks its
    padding; same-shaped samples otherwise), not one at a time: a search scores every candidate on this split, and
    batch-1 eager forwards made MiniLM's scoring of one round take about a minute and a half.
    """

    def __init__(self, teacher, batches: list[tuple], labels: list[int] | None, mask_index: int | None,
                 chunk: int = 32) -> None:
        groups: list[list[tuple]] = []
        for b in batches:
            last = groups[-1] if groups else None
            if last is not None and len(last) < chunk and (mask_index is not None or _same_shapes(last[0], b)):
                last.append(b)
            else:
                groups.append([b])
        self.batches = [trim_padding(stack_samples(g) if len(g) > 1 else g[0], mask_index) for g in groups]
        self.labels = labels
        self._targets = None
        if labels is not None:
            self._targets, at = [], 0
            for g in groups:
                self._targets.append(torch.tensor(list(labels[at:at + len(g)])))
                at += len(g)
        with torch.no_grad():
            self.reference = [teacher(*b).float() for b in self.batches]

    @property
    def kind(self) -> str:
        return "cross-entropy" if self.labels is not None else "1 - cosine to the original"

    def __call__(self, model) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i, (batch, ref) in enumerate(zip(self.batches, self.reference, strict=True)):
                got = model(*batch).float()
                if self._targets is not None:
                    out.append(torch.nn.functional.cross_entropy(got.flatten(1), self._targets[i], reduction="none"))
                else:
                    out.append(1 - torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1))
        return torch.cat(out).double().numpy()

    def accuracy(self, model) -> float | None:
        if self._targets is None:
            return None
        with torch.no_grad():
            hits = [(model(*b).flatten(1).argmax(-1) == t).float() for b, t in zip(self.batches, self._targets,
                                                                                  strict=True)]
        return float(torch.cat(hits).mean())


def _same_shapes(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(getattr(x, "shape", None) == getattr(y, "shape", None) for x, y in zip(a, b))


@dataclass
class Acceptance:
    """The paper's rule with a tolerance: total loss not worse than the best seen (+tolerance), and more than half
    the samples no worse than under the current model (+tolerance each)."""

    tolerance: float
    best: float

    def judge(self, losses: np.ndarray, current: np.ndarray) -> tuple[bool, dict]:
        mean = float(losses.mean())
        no_worse = float(np.mean(losses <= current + self.tolerance + 1e-9))
        ok = mean <= self.best + self.tolerance + 1e-12 and no_worse > 0.5
        return ok, {"loss": round(mean, 6), "rise": round(mean - self.best, 6), "samples_no_worse": round(no_worse, 3)}

    def narrowly(self, losses: np.ndarray, narrow: float) -> bool:
        allowance = max(self.tolerance, 0.01 * max(self.best, 1e-6))
        return float(losses.mean()) - self.best <= narrow * allowance


def plan_axformer(model, cfg: AxFormerConfig, ctx: PassContext) -> list[dict]:
    """The blocks the search walks (last first) and what each offers: plain data, nothing changed."""
    found = [b for b in blocks(model) if cfg.selects(b.path)]
    if not found:
        raise no_blocks_error(model, "--pass axformer")
    heads = {v.path: v.num_heads for v in attention_modules(model, strict=False)}
    return [{"layer": b.path, "attention": b.attention, "attention_kind": b.attention_kind,
             "heads": heads.get(b.attention), "ffn": b.ffn.path if b.ffn else None,
             "ffn_hidden": b.ffn.hidden if b.ffn else None} for b in reversed(found)]


def _savings(ctx: PassContext, model, example) -> dict | None:
    lm = ctx.latency_model
    if lm is None or not hasattr(lm, "breakdown") or example is None:
        return None
    return lm.breakdown(model, example)


def _sum_paths(breakdown, paths: list[str]) -> float | None:
    if breakdown is None:
        return None
    return round(sum(_ms_under(breakdown, p) or 0.0 for p in paths), 5)


def _ms_under(breakdown: dict | None, path: str | None) -> float | None:
    if breakdown is None or path is None:
        return None
    return round(sum(ms for p, ms in breakdown["per_module"].items() if p == path or p.startswith(path + ".")), 5)


@register_pass("axformer", AxFormerConfig, plan=plan_axformer,
               selects=lambda model, cfg: [b.path for b in blocks(model) if cfg.selects(b.path)],
               fix_hint="a smaller tolerance", test_options={"tolerance": 1.0}, test_model="vit")
def apply_axformer(model, plan: list[dict], cfg: AxFormerConfig, ctx: PassContext) -> PassResult:
    """Run the greedy search on a copy of ``model``; the report lists every trial."""
    if len(ctx.calib) < 4:
        raise UsageError("--pass axformer", "needs calibration data to judge removals on",
                         "give --calib with real samples (a few hundred is good)")
    n_val = max(2, round(len(ctx.calib) * cfg.validation))
    val, fit = ctx.calib[-n_val:], ctx.calib[:-n_val]
    labels = ctx.labels[-n_val:] if ctx.labels is not None else None
    teacher = ctx.teacher if ctx.teacher is not None else model
    loss = ValidationLoss(teacher, val, labels, ctx.mask_index)
    tolerance = cfg.tolerance if cfg.tolerance is not None else (0.0 if labels is not None else EMBEDDING_TOLERANCE)
    current = copy.deepcopy(model).eval()
    current_losses = loss(current)
    rule = Acceptance(tolerance, float(current_losses.mean()))
    example = trim_padding(ctx.calib[0], ctx.mask_index) if ctx.calib else None
    before = _savings(ctx, current, example)
    if cfg.speedup is not None and before is None:
        raise UsageError(f"--pass axformer:speedup={cfg.speedup:g}", "stops at an estimated speed, and this target "
                         "has no latency model to estimate it", "drop speedup=, or export for a --target/--device "
                         "with a profile")
    goal_ms = before["ms"] / cfg.speedup if cfg.speedup is not None else None
    trials: list[dict] = []
    if ctx.progress is not None:
        ctx.progress.note(f"axformer: {len(plan)} blocks, {n_val} validation samples, loss {loss.kind}, "
                          f"tolerance {tolerance:g}")
    removed = {"attention": [], "ffn": [], "heads": {}, "ffn_groups": {}}
    branch_data = BranchData(fit or val, ctx.mask_index)  # a removed branch keeps its mean output over these
    refit_data = fit[: cfg.reconstruct_samples]

    def attempt(what: dict, change, saving: float | None) -> tuple[bool, np.ndarray]:
        nonlocal current, current_losses
        candidate = copy.deepcopy(current)
        change(candidate)
        if cfg.reconstruct and refit_data:
            refit = reconstruct(candidate, current, refit_data, ctx.mask_index, reference=teacher)
            if refit:
                what = {**what, "reconstructed": sum(r["kept"] for r in refit)}
        losses = loss(candidate)
        ok, figures = rule.judge(losses, current_losses)
        trials.append({**what, **figures, "accepted": ok, "saving_ms": saving,
                       "saving_kind": getattr(ctx.latency_model, "kind", None) if saving is not None else None})
        if ctx.progress is not None:
            if hasattr(ctx.progress, "tick"):
                ctx.progress.tick("axformer: trial", len(trials), max(len(trials), min(cfg.max_trials, 2 * len(plan))),
                                  f"{what['block']} {what['remove']}")
            unit = f" {what['unit']}" if what["unit"] is not None else ""
            ctx.progress.note(f"axformer: {what['block']} {what['remove']}{unit}: loss {figures['loss']:.4f} "
                              f"({'accepted' if ok else 'kept'})")
        if ok:
            if cfg.recover_steps and len(fit) >= 2:
                from slimx.slim.recover import RecoverConfig, recover

                candidate, _ = recover(candidate, teacher, fit, RecoverConfig(
                    steps=cfg.recover_steps, lr=cfg.recover_lr, loss="kl" if labels is not None else "cosine",
                    patience=3, batch_size=8), None, mask_index=ctx.mask_index)
                losses = loss(candidate)
                trials[-1]["loss_after_recovery"] = round(float(losses.mean()), 6)
            current, current_losses = candidate, losses
            rule.best = min(rule.best, float(losses.mean()))
        return ok, losses

    breakdown = before
    def done() -> bool:
        return len(trials) >= cfg.max_trials or (goal_ms is not None and breakdown["ms"] <= goal_ms)

    for entry in plan:
        if done():
            break
        for branch in ("ffn", "attention"):
            if done():
                break
            block = next((b for b in blocks(current) if b.path == entry["layer"]), None)
            if block is None:
                break
            remove = block.remove_ffn if branch == "ffn" else block.remove_attention
            if remove is None or (branch == "attention" and block.attention_kind != "attention"):
                continue
            if branch == "ffn":  # a BERT FFN is intermediate + output: price both
                price = ([f"{block.path}.intermediate", f"{block.path}.output"]
                         if block.ffn.path.endswith(".intermediate") else [block.ffn.path])
            else:
                price = [block.attention]
            whole = _sum_paths(breakdown, price)
            ok, losses = attempt({"block": block.path, "remove": branch, "unit": None},
                                 lambda m, remove=remove: remove(m, branch_data), whole)
            if ok:
                removed[branch].append(block.path)
            elif cfg.units and rule.narrowly(losses, cfg.narrow):
                _try_units(block, branch, entry, attempt, removed, cfg, whole)
            breakdown = _savings(ctx, current, example) if ok or cfg.units else breakdown
    after = _savings(ctx, current, example)
    summary = {"trials": len(trials), "accepted": sum(t["accepted"] for t in trials),
               "removed_attention": len(removed["attention"]), "removed_ffn": len(removed["ffn"]),
               "removed_heads": sum(len(v) for v in removed["heads"].values()),
               "removed_ffn_groups": sum(len(v) for v in removed["ffn_groups"].values()),
               "loss": loss.kind, "tolerance": tolerance, "validation_samples": n_val,
               "speedup_goal": cfg.speedup, "stopped_at_speedup": goal_ms is not None and after is not None
               and after["ms"] <= goal_ms,
               "validation_loss_before": round(float(loss(model).mean()), 6),
               "validation_loss_after": round(float(current_losses.mean()), 6),
               "params_before": sum(p.numel() for p in model.parameters()),
               "params_after": sum(p.numel() for p in current.parameters())}
    if before is not None and after is not None:
        summary.update({"latency_before_ms": round(before["ms"], 4), "latency_after_ms": round(after["ms"], 4),
                        "latency_kind": getattr(ctx.latency_model, "kind", None),
                        "latency_device": getattr(ctx.latency_model, "device", None)})
    accuracy = loss.accuracy(current)
    if accuracy is not None:
        summary["validation_accuracy_before"] = loss.accuracy(model)
        summary["validation_accuracy_after"] = accuracy
    layers = [{**entry, "removed": [t["remove"] + (f" {t['unit']}" if t["unit"] is not None else "")
                                    for t in trials if t["block"] == entry["layer"] and t["accepted"]]}
              for entry in plan]
    return PassResult(model=current, name="axformer", config=config_to_dict(cfg), layers=layers, summary=summary,
                      extra={"trials": trials, "removed": removed,
                             "trajectory": _trajectory(trials, before, labels is not None)})


def _trajectory(trials: list[dict], before: dict | None, task: bool) -> list[dict]:
    """After each accepted removal: the estimated latency (before minus the savings so far) and the validation
    fidelity (1 - loss for an embedding model; the task loss itself with labels)."""
    if before is None:
        return []
    ms = before["ms"]
    points = [{"step": 0, "latency_ms": round(ms, 4), "fidelity": 1.0 if not task else None, "removed": None}]
    for t in (t for t in trials if t["accepted"]):
        ms -= t["saving_ms"] or 0.0
        points.append({"step": len(points), "latency_ms": round(ms, 4),
                       "fidelity": None if task else round(1 - t["loss"], 5), "loss": t["loss"],
                       "removed": f"{t['block']} {t['remove']}" + (f" {t['unit']}" if t["unit"] is not None else "")})
    return points


def _try_units(block, branch: str, entry: dict, attempt, removed: dict, cfg: AxFormerConfig,
               whole: float | None) -> None:
    """The branch narrowly failed: its heads (attention) or neuron groups (FFN, weakest first), one at a time."""
    if branch == "attention":
        heads = entry.get("heads") or 0
        kept = list(range(heads))
        for head in range(heads):
            if len(kept) <= 1:
                break
            keep = [h for h in kept if h != head]

            def change(model, keep=keep, path=block.attention, kept=kept):
                prune_heads(model, path, [kept.index(h) for h in keep])

            ok, _ = attempt({"block": block.path, "remove": "head", "unit": head}, change,
                            None if whole is None else round(whole / heads, 5))
            if ok:
                kept = keep
                removed["heads"].setdefault(block.path, []).append(head)
        return
    if block.ffn is None:
        return
    groups, size = cfg.ffn_groups, block.ffn.hidden // cfg.ffn_groups
    for g in range(groups - 1):  # at least one group stays: removing all of it is removing the branch
        def change(model, block_path=block.path):
            view = next(b for b in blocks(model) if b.path == block_path).ffn
            keep = view.importance(model).argsort(descending=True)[: view.hidden - size].sort().values.tolist()
            view.prune(model, keep)

        ok, _ = attempt({"block": block.path, "remove": "ffn group", "unit": g}, change,
                        None if whole is None else round(whole / groups, 5))
        if not ok:
            break  # the weakest group left is needed: the stronger ones are too
        removed["ffn_groups"].setdefault(block.path, []).append(g)
