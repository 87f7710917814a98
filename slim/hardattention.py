"""Selective hard attention (AxFormer's accuracy tool): in each attention layer, in order, keep only the ``k``
largest attention scores per query (k = 30 of 128 tokens in the paper), accepted by AxFormer's rule on the
validation split (total loss not worse than the best seen, more than half the samples no worse; ``tolerance``
relaxes both). Exported as TopK plus a threshold mask (ONNX TopK; TFLite's TOPK_V2 with litert-torch's full TFL
decompositions). On these CPU runtimes top-k attention ran 4-7x slower than plain attention, so this is a way to
gain accuracy, not speed: the report gives the latency it costs next to the loss it changes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from slimx._core.config import config_to_dict
from slimx._core.errors import UsageError
from slimx.slim.attention import TopKSoftmaxKernel, attention_modules, kernelize
from slimx.slim.axformer import EMBEDDING_TOLERANCE, Acceptance, ValidationLoss
from slimx.slim.base import PassContext, PassResult, register_pass, trim_padding


@dataclass(frozen=True)
class HardAttentionConfig:
    """Options of the ``hard-attention`` pass.

    Attributes:
        k: attention scores kept per query.
        tolerance: loss the search may give up (None: 0 with labels; 0.05 for an embedding model).
        validation: the fraction of calibration samples the rule is judged on.
        include, exclude: regexes on attention module paths (include wins).
    """

    k: int = 30
    tolerance: float | None = None
    validation: float = 0.25
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be at least 1")
        if self.tolerance is not None and not 0 <= self.tolerance <= 1:
            raise ValueError("tolerance must be in [0, 1]")
        if not 0 < self.validation < 1:
            raise ValueError("validation must be a fraction in (0, 1)")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None

    def selects(self, path: str) -> bool:
        if any(re.search(p, path) for p in self.include):
            return True
        return not any(re.search(p, path) for p in self.exclude)


def plan_hard_attention(model, cfg: HardAttentionConfig, ctx: PassContext) -> list[dict]:
    views = [v for v in attention_modules(model) if cfg.selects(v.path)]
    if not views:
        raise UsageError("--pass hard-attention", "found no attention module to make sparse",
                         "check include/exclude, or the model has no attention")
    return [{"layer": v.path, "heads": v.num_heads, "k": cfg.k} for v in views]


# the relative error parity allows a model with top-k attention (MiniLM, top-30 in every layer: 1.25e-3 at cosine
# 0.999999 on fresh inputs of 1..512 tokens, from float-level near-ties in the selection)
SELECTION_REL_ERR = 1e-2


@register_pass("hard-attention", HardAttentionConfig, plan=plan_hard_attention,
               selects=lambda model, cfg: [v.path for v in attention_modules(model) if cfg.selects(v.path)],
               fix_hint="a larger k", test_options={"tolerance": 1.0, "k": 2}, test_model="vit")
def apply_hard_attention(model, plan: list[dict], cfg: HardAttentionConfig, ctx: PassContext) -> PassResult:
    if len(ctx.calib) < 4:
        raise UsageError("--pass hard-attention", "needs calibration data to judge each layer on",
                         "give --calib with real samples")
    n_val = max(2, round(len(ctx.calib) * cfg.validation))
    labels = ctx.labels[-n_val:] if ctx.labels is not None else None
    loss = ValidationLoss(ctx.teacher if ctx.teacher is not None else model, ctx.calib[-n_val:], labels,
                          ctx.mask_index)
    tolerance = cfg.tolerance if cfg.tolerance is not None else (0.0 if labels is not None else EMBEDDING_TOLERANCE)
    current = copy.deepcopy(model).eval()
    current_losses = loss(current)
    rule = Acceptance(tolerance, float(current_losses.mean()))
    start_loss = rule.best
    layers = []
    for entry in plan:
        candidate = copy.deepcopy(current)
        kernelize(candidate, entry["layer"], TopKSoftmaxKernel(cfg.k))
        losses = loss(candidate)
        ok, figures = rule.judge(losses, current_losses)
        layers.append({**entry, **figures, "accepted": ok})
        if ok:
            current, current_losses = candidate, losses
            rule.best = min(rule.best, float(losses.mean()))
        if ctx.progress is not None:
            ctx.progress.note(f"hard-attention: {entry['layer']} top-{cfg.k}: loss {figures['loss']:.4f} "
                              f"({'accepted' if ok else 'kept'})")
    summary = {"accepted": sum(e["accepted"] for e in layers), "layers": len(layers), "k": cfg.k,
               "loss": loss.kind, "tolerance": tolerance, "validation_loss_before": round(start_loss, 6),
               "validation_loss_after": round(float(current_losses.mean()), 6)}
    accuracy = loss.accuracy(current)
    if accuracy is not None:
        summary.update({"validation_accuracy_before": loss.accuracy(model), "validation_accuracy_after": accuracy})
    lm = ctx.latency_model
    if lm is not None and ctx.calib and summary["accepted"]:
        example = trim_padding(ctx.calib[0], ctx.mask_index)
        before, after = lm.latency(model, example)["ms"], lm.latency(current, example)["ms"]
        summary.update({"latency_before_ms": round(before, 4), "latency_after_ms": round(after, 4),
                        "latency_cost": round(after / before, 3) if before else None, "latency_kind": lm.kind,
                        "latency_device": lm.device,
                        "note": "top-k attention ran 4-7x slower than plain attention on these CPU runtimes: an "
                                "accuracy tool, not a speed one"})
    extra = {"parity": {"max_rel_err": SELECTION_REL_ERR, "why": (
        f"top-{cfg.k} attention keeps the keys above a threshold: where two scores tie to float precision, PyTorch "
        "and the runtime may keep different ones, so parity allows a relative error of "
        f"{SELECTION_REL_ERR:g} (the cosine floor is unchanged)")}} if summary["accepted"] else {}
    return PassResult(model=current, name="hard-attention", config=config_to_dict(cfg), layers=layers,
                      summary=summary, extra=extra)
