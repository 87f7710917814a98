"""EfficientFormer's latency-driven slimming as a pass: shrink the model the user brings until the device's latency
model says it fits a budget (Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022:
a supernet slimmed under an on-device latency lookup table, each step taking the action with the best
accuracy-per-millisecond; the authors' repository ships the final architectures, not the search).

The search space comes from the model's own structure (``slim.attention``): drop a residual branch (attention or
token mixer, FFN), replace a block by identity (both), narrow an FFN's hidden width by an eighth (``ffn_step``)
rounded to the device's preferred multiple (``multiple``, 16 on the Neural Engine as in the paper), drop one
attention head. The plan lists every candidate with its shape change.

Latency: a lookup table of what each candidate saves, from the device's ``LatencyModel`` (one per-module
breakdown of the current model prices every candidate; rebuilt after each step, cached per architecture), or, with
``measure_lut``, from measuring the model with and without each candidate on a runner (slow, exact). Importance:
``loss`` (the measured increase of the validation loss when the candidate is applied: the honest one) or
``taylor`` (first-order Taylor, |sum(grad x weight)| over the weights the candidate removes, from one backward
pass per round for every candidate: cheap, approximate). Search: greedy on importance per millisecond saved until
the estimate is within the budget, in rounds: one scoring of every candidate, then up to ``per_round`` of the best
actions on distinct blocks, each measured after it is applied (a round ends early when an action costs clearly more
than it was scored to with the round's earlier actions in place); distillation recovery between steps when
fidelity falls below ``recover_below``. The trajectory (latency, interval, fidelity after each step) and the final
architecture go in the report.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from slimx._core.config import config_to_dict
from slimx._core.errors import SlimxFailure, UsageError
from slimx.slim.attention import BranchData, attention_modules, blocks, no_blocks_error, prune_heads
from slimx.slim.axformer import ValidationLoss
from slimx.slim.base import PassContext, PassResult, register_pass, token_mask, trim_padding
from slimx.slim.reconstruct import reconstruct


@dataclass(frozen=True)
class SlimmingConfig:
    """Options of the ``latency-slim`` pass.

    Attributes:
        budget_ms: the latency to reach on the export's device (its latency model); required.
        importance: ``loss`` (measured loss increase on the validation split) or ``taylor`` (first-order).
        multiple: FFN widths are rounded to this many neurons (None: the device's ``rank_multiple``, else 16).
        ffn_step: an FFN narrows by this fraction of its width a step (rounded down to ``multiple``, at least one).
        per_round: at most this many actions (on distinct blocks) from one scoring of every candidate.
        min_fidelity: stop (fail) when fidelity on the validation split would fall below this (1 - loss for an
            embedding model; accuracy relative to the original's with labels).
        recover_below: distil between steps when fidelity falls below this.
        recover_steps: distillation steps each time.
        validation: the calibration fraction held out for the search.
        max_steps: at most this many actions.
        measure_lut: price candidates by measuring the model with and without each (else the latency model's
            per-module breakdown).
        heads, ffn, branches: which kinds of action are in the search space.
        reconstruct: refit each taken step's cut output projection (heads, FFN neurons) by least squares on up to
            ``reconstruct_samples`` fit samples before judging it (``slim.reconstruct``).
    """

    budget_ms: float | None = None
    importance: str = "loss"
    multiple: int | None = None
    ffn_step: float = 0.125
    per_round: int = 4
    min_fidelity: float = 0.9
    recover_below: float = 0.97
    recover_steps: int = 40
    validation: float = 0.25
    max_steps: int = 200
    measure_lut: bool = False
    heads: bool = True
    ffn: bool = True
    branches: bool = True
    reconstruct: bool = True
    reconstruct_samples: int = 128

    def __post_init__(self) -> None:
        if self.reconstruct_samples < 1:
            raise ValueError("reconstruct_samples must be at least 1")
        if self.budget_ms is not None and self.budget_ms <= 0:
            raise ValueError("budget_ms must be positive")
        if self.importance not in ("loss", "taylor"):
            raise ValueError(f"importance must be loss or taylor, not {self.importance!r}")
        if self.multiple is not None and self.multiple < 1:
            raise ValueError("multiple must be at least 1")
        if not 0 < self.min_fidelity <= 1 or not 0 < self.recover_below <= 1:
            raise ValueError("min_fidelity and recover_below must be in (0, 1]")
        if not 0 < self.validation < 1 or self.max_steps < 1 or self.recover_steps < 0:
            raise ValueError("validation must be in (0, 1), max_steps at least 1, recover_steps not negative")
        if not 0 <= self.ffn_step < 1 or self.per_round < 1:
            raise ValueError("ffn_step must be in [0, 1) and per_round at least 1")


@dataclass
class Candidate:
    """One action: what it changes (plain data for the plan) and how to apply it to a model."""

    action: str  # remove-attention, remove-ffn, remove-block, narrow-ffn, drop-head
    block: str
    detail: dict
    price: list  # module paths whose time it saves (with a fraction): [(path, fraction)]

    def apply(self, model, data: BranchData | None = None) -> None:
        """Change ``model`` in place; ``data``: calibration batches whose mean branch output replaces a removed
        branch (else it contributes zero)."""
        view = next(b for b in blocks(model) if b.path == self.block)
        if self.action == "remove-attention":
            view.remove_attention(model, data)
        elif self.action == "remove-ffn":
            view.remove_ffn(model, data)
        elif self.action == "remove-block":
            view.remove_attention(model, data)
            next(b for b in blocks(model) if b.path == self.block).remove_ffn(model, data)
        elif self.action == "narrow-ffn":
            keep = view.ffn.importance(model).argsort(descending=True)[: self.detail["to"]].sort().values.tolist()
            view.ffn.prune(model, keep)
        elif self.action == "drop-head":
            heads = next(v for v in attention_modules(model, strict=False) if v.path == view.attention).num_heads
            prune_heads(model, view.attention, [h for h in range(heads) if h != self.detail["head"]])

    def to_dict(self) -> dict:
        return {"action": self.action, "block": self.block, **self.detail}


def candidates(model, multiple: int, cfg: SlimmingConfig) -> list[Candidate]:
    """Every action the model's structure offers now."""
    out = []
    heads = {v.path: v for v in attention_modules(model, strict=False)}
    for b in blocks(model):
        ffn_price = ([(f"{b.path}.intermediate", 1.0), (f"{b.path}.output", 1.0)]
                     if b.ffn is not None and b.ffn.path.endswith(".intermediate") else
                     [(b.ffn.path, 1.0)] if b.ffn is not None else [])
        mixer_price = [(b.attention, 1.0)] if b.attention else []
        if cfg.branches:
            if b.remove_attention is not None:
                out.append(Candidate("remove-attention", b.path, {"kind": b.attention_kind}, mixer_price))
            if b.remove_ffn is not None:
                out.append(Candidate("remove-ffn", b.path, {"hidden": b.ffn.hidden if b.ffn else None}, ffn_price))
            if b.remove_attention is not None and b.remove_ffn is not None:
                out.append(Candidate("remove-block", b.path, {}, mixer_price + ffn_price))
        if cfg.ffn and b.ffn is not None and b.ffn.hidden > multiple:
            cut = max(multiple, int(b.ffn.hidden * cfg.ffn_step) // multiple * multiple)
            to = max(multiple, (b.ffn.hidden - cut) // multiple * multiple)
            out.append(Candidate("narrow-ffn", b.path, {"from": b.ffn.hidden, "to": to},
                                 [(p, (b.ffn.hidden - to) / b.ffn.hidden) for p, _ in ffn_price]))
        view = heads.get(b.attention)
        if cfg.heads and view is not None and view.num_heads > 1:
            for h in range(view.num_heads):
                out.append(Candidate("drop-head", b.path, {"head": h, "heads": view.num_heads},
                                     [(b.attention, 1.0 / view.num_heads)]))
    return out


def plan_slimming(model, cfg: SlimmingConfig, ctx: PassContext) -> list[dict]:
    """The search space: every candidate action with its shape change (plain data)."""
    found = blocks(model)
    if not found:
        raise no_blocks_error(model, "--pass latency-slim")
    return [c.to_dict() for c in candidates(model, _multiple(cfg, ctx), cfg)]


def _multiple(cfg: SlimmingConfig, ctx: PassContext) -> int:
    return cfg.multiple or int(getattr(ctx.device, "rank_multiple", None) or 16)


class LatencyTable:
    """What each candidate saves on the device: from the latency model's per-module breakdown of the current
    model (or measured with and without it), cached per architecture."""

    def __init__(self, ctx: PassContext, example: tuple, measure: bool) -> None:
        self.lm, self.example, self.measure = ctx.latency_model, example, measure
        self.cache: dict = {}

    def _key(self, model) -> tuple:
        """The architecture: every module's type (a removed pooling mixer has no weights) and every weight's shape."""
        return (tuple((n, type(m).__name__) for n, m in model.named_modules()),
                tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))

    def total(self, model) -> dict:
        key = self._key(model)
        if key not in self.cache:
            if self.measure or not hasattr(self.lm, "breakdown"):
                self.cache[key] = self.lm.latency(model, self.example)
            else:
                self.cache[key] = self.lm.breakdown(model, self.example)
        return self.cache[key]

    def saving(self, model, cand: Candidate) -> float:
        base = self.total(model)
        if "per_module" in base:
            return sum(ms * frac for path, frac in cand.price for p, ms in base["per_module"].items()
                       if p == path or p.startswith(path + "."))
        trial = copy.deepcopy(model)
        cand.apply(trial)
        return base["ms"] - self.lm.latency(trial, self.example)["ms"]


def _taylor_terms(model, batches, teacher_out) -> dict:
    """grad x weight of every parameter for the cosine loss to the teacher, from one backward pass."""
    trial = copy.deepcopy(model).eval()
    params = dict(trial.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    loss = 0.0
    for batch, ref in zip(batches, teacher_out, strict=True):
        out = trial(*batch).float()
        loss = loss + (1 - torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)).mean()
    loss.backward()
    return {name: (p.grad * p).detach() for name, p in params.items() if p.grad is not None}


def _taylor(terms: dict, cand: Candidate) -> float:
    """First-order estimate of the loss increase of removing what ``cand`` removes: |sum(grad * weight)|."""
    return sum(float(t.sum().abs()) * frac for path, frac in cand.price for name, t in terms.items()
               if name.startswith(path + "."))


@register_pass("latency-slim", SlimmingConfig, plan=plan_slimming,
               selects=lambda model, cfg: [b.path for b in blocks(model)],
               test_options={"budget_ms": 0.001, "max_steps": 2, "min_fidelity": 0.0001, "recover_steps": 0,
                             "ffn": False, "heads": False}, test_model="vit", latency_driven=True)
def apply_slimming(model, plan: list[dict], cfg: SlimmingConfig, ctx: PassContext) -> PassResult:
    """Greedy slimming of a copy of ``model`` until the device's latency model says it fits the budget."""
    from slimx.slim.recover import RecoverConfig, recover

    if cfg.budget_ms is None:
        raise UsageError("--pass latency-slim", "needs a budget", "give budget_ms=X (or slimx export --budget-ms X)")
    if ctx.latency_model is None:
        raise UsageError("--pass latency-slim", "needs the device's latency model, and its profile has none",
                         "calibrate the device first (slimx devices calibrate)")
    if len(ctx.calib) < 4:
        raise UsageError("--pass latency-slim", "judges each step on calibration data", "give --calib")
    started = time.time()
    n_val = max(2, round(len(ctx.calib) * cfg.validation))
    fit, val = ctx.calib[:-n_val], ctx.calib[-n_val:]
    labels = ctx.labels[-n_val:] if ctx.labels is not None else None
    teacher = ctx.teacher if ctx.teacher is not None else model
    loss = ValidationLoss(teacher, val, labels, ctx.mask_index)
    example = _typical_sample(ctx.calib, ctx.mask_index)
    lut = LatencyTable(ctx, example, cfg.measure_lut)
    multiple = _multiple(cfg, ctx)
    branch_data = BranchData(fit or val, ctx.mask_index)
    current = copy.deepcopy(model).eval()
    start = lut.total(current)
    floor = _fidelity(loss, current, labels)

    def fidelity(m) -> float:
        got = _fidelity(loss, m, labels)
        return got / floor if labels is not None and floor > 0 else got

    trajectory = [_point(0, None, lut.total(current), 1.0)]
    if start["ms"] <= cfg.budget_ms:
        return _result(model, current, cfg, trajectory, [], start, lut.total(current), started, "already within",
                       example)
    taylor_batches = [trim_padding(b, ctx.mask_index) for b in val[:8]]
    with torch.no_grad():
        taylor_ref = [teacher(*b).float() for b in taylor_batches]
    steps, current_fid = [], 1.0

    def over_budget() -> bool:
        return lut.total(current)["ms"] > cfg.budget_ms and len(steps) < cfg.max_steps

    rounds = 0
    while over_budget():
        rounds += 1
        cands = candidates(current, multiple, cfg)
        step_data = branch_data.with_means(current)  # every branch's mean on this model, in one pass
        terms = _taylor_terms(current, taylor_batches, taylor_ref) if cfg.importance == "taylor" else None
        scored = []
        for cand in cands:
            saving = lut.saving(current, cand)
            if saving <= 1e-6:
                continue
            if terms is not None:
                cost = _taylor(terms, cand)
                scored.append((cost / saving, cand, saving, None, cost))
            else:
                trial = copy.deepcopy(current)
                cand.apply(trial, step_data)
                fid = fidelity(trial)
                cost = max(current_fid - fid, 0.0)
                scored.append((cost / saving, cand, saving, fid, cost))
        if not scored:
            break
        scored.sort(key=lambda s: s[0])
        touched: set = set()
        for _, best, saving, fid, cost in scored:
            if best.block in touched:
                continue
            if touched:  # a later action of the round: on the model the round's earlier actions left
                if len(touched) >= cfg.per_round or not over_budget():
                    break
                step_data, saving, fid = branch_data.with_means(current), lut.saving(current, best), None
            trial = copy.deepcopy(current)
            best.apply(trial, step_data)
            if cfg.reconstruct and fit and any(r["kept"] for r in reconstruct(
                    trial, current, fit[: cfg.reconstruct_samples], ctx.mask_index, reference=teacher)):
                fid = fidelity(trial)  # judged as refit, as it is kept
            fid = fidelity(trial) if fid is None else fid
            if touched and cfg.importance == "loss" and current_fid - fid > 2 * cost + 0.005:
                break  # it interacts with the round's earlier actions: score everything again
            recovered = False
            if fid < cfg.recover_below and cfg.recover_steps and fit:
                trial, _ = recover(trial, teacher, fit, RecoverConfig(steps=cfg.recover_steps, lr=1e-4,
                                                                      loss="kl" if labels is not None else "cosine",
                                                                      patience=3), None, mask_index=ctx.mask_index)
                fid, recovered = fidelity(trial), True
            if fid < cfg.min_fidelity and not ctx.synthetic:  # synthetic inputs: fidelity says nothing
                lat = lut.total(current)
                raise SlimxFailure(
                    f"--budget-ms {cfg.budget_ms:g}",
                    f"cannot be met without fidelity falling below {cfg.min_fidelity:g}: the closest point reached "
                    f"is {lat['ms']:.3f} ms at fidelity {current_fid:.4f} (next step, {best.action} {best.block}, "
                    f"would give {fid:.4f})", "raise the budget, lower min_fidelity, or give more --calib data for "
                    "recovery")
            current, current_fid = trial.eval(), fid
            touched.add(best.block)
            now = lut.total(current)
            steps.append({**best.to_dict(), "saving_ms": round(saving, 5), "importance": cfg.importance,
                          "cost": round(cost, 6), "fidelity": round(fid, 5), "recovered": recovered,
                          "round": rounds,
                          "latency_ms": round(now["ms"], 5)})
            trajectory.append(_point(len(steps), best, now, fid))
            if ctx.progress is not None:
                _tick(ctx.progress, "latency-slim: step", len(steps), cfg.max_steps, f"{now['ms']:.3f} ms")
                ctx.progress.note(f"latency-slim: {best.action} {best.block}{_detail(best)}: {now['ms']:.3f} ms "
                                  f"(budget {cfg.budget_ms:g}), fidelity {fid:.4f}"
                                  f"{' (recovered)' if recovered else ''}")
            if recovered and cfg.importance == "taylor":
                break  # distillation moved every weight: the round's Taylor terms are stale (measured loss scores
                # go on, each next action measured and the round ended where it costs clearly more than scored)
    outcome = "within the budget" if lut.total(current)["ms"] <= cfg.budget_ms else "stopped at max_steps"
    return _result(model, current, cfg, trajectory, steps, start, lut.total(current), started, outcome, example)


def _typical_sample(calib: list[tuple], mask_index: int | None) -> tuple:
    """The input the latency model prices: for a text model the calibration sample of median real length (a budget
    is met at the lengths users send, not at the first sentence's), cut to that length; else the first sample."""
    if mask_index is None:
        return calib[0]
    lengths = [int(token_mask(b, mask_index).sum()) for b in calib]
    middle = sorted(range(len(calib)), key=lambda i: lengths[i])[len(calib) // 2]
    return trim_padding(calib[middle], mask_index)


def _fidelity(loss: ValidationLoss, model, labels) -> float:
    if labels is not None:
        return loss.accuracy(model)
    return float(1 - loss(model).mean())


def _detail(c: Candidate) -> str:
    if c.action == "narrow-ffn":
        return f" {c.detail['from']}->{c.detail['to']}"
    if c.action == "drop-head":
        return f" head {c.detail['head']}"
    return ""


def _point(step: int, cand: Candidate | None, lat: dict, fid: float) -> dict:
    return {"step": step, "action": None if cand is None else f"{cand.action} {cand.block}{_detail(cand)}",
            "latency_ms": round(lat["ms"], 5), "interval_ms": lat.get("interval_ms"), "fidelity": round(fid, 5)}


def architecture(model) -> list[dict]:
    """Per block: which branches remain, the heads and the FFN width."""
    heads = {v.path: v.num_heads for v in attention_modules(model, strict=False)}
    return [{"block": b.path, "attention": b.attention_kind, "heads": heads.get(b.attention),
             "ffn_hidden": b.ffn.hidden if b.ffn else None} for b in blocks(model)]


def _result(model, current, cfg, trajectory, steps, start, end, started, outcome, example) -> PassResult:
    priced_at = [list(t.shape) for t in example if hasattr(t, "shape")]
    summary = {"budget_ms": cfg.budget_ms, "outcome": outcome, "steps": len(steps),
               "latency_before_ms": round(start["ms"], 4), "latency_after_ms": round(end["ms"], 4),
               "interval_after_ms": end.get("interval_ms"), "importance": cfg.importance,
               "params_before": sum(p.numel() for p in model.parameters()),
               "params_after": sum(p.numel() for p in current.parameters()),
               "fidelity_after": trajectory[-1]["fidelity"], "seconds": round(time.time() - started, 1),
               "within_budget": end["ms"] <= cfg.budget_ms, "priced_at": priced_at}
    layers = [{"layer": a["block"], **a} for a in architecture(current)]
    return PassResult(model=current, name="latency-slim", config=config_to_dict(cfg), layers=layers, summary=summary,
                      extra={"trajectory": trajectory, "steps": steps, "architecture": architecture(current),
                             "architecture_before": architecture(model)})


def _tick(progress, label: str, done: int, total: int | None, detail: str) -> None:
    """A step of a long search on the progress display, where it has one (``_core.progress.Progress.tick``)."""
    if hasattr(progress, "tick") and total:
        progress.tick(label, done, max(total, done), detail)
