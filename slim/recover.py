"""Recover: knowledge distillation from the original model on the calibration data, bounded and early-stopped."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from slimx._core.errors import UsageError
from slimx.slim.base import real_rows, token_mask, trim_padding


@dataclass(frozen=True)
class RecoverConfig:
    """``--recover steps=N,lr=X,loss=mse|kl|cosine,batch_size=B,patience=P``.

    Attributes:
        steps: optimizer steps at most.
        lr: AdamW learning rate.
        loss: ``mse`` (outputs or embeddings), ``cosine`` (1 - cosine, for embeddings), ``kl`` (logits, T=2).
        batch_size: samples per step, drawn from the calibration batches.
        patience: stop after this many evaluations (every 10 steps) without a better held-out loss.
        holdout: fraction of the calibration samples kept out of training, to judge early stopping.
        hidden: also match every block's output (hidden-state MSE): the blocks are the children of
            ModuleLists (``encoder.layer.N``, ``blocks.N``), found in teacher and student alike.
    """

    steps: int = 100
    lr: float = 5e-5
    loss: str = "mse"
    batch_size: int = 8
    patience: int = 5
    holdout: float = 0.2
    hidden: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("steps, batch_size and patience must be at least 1")
        if self.loss not in ("mse", "kl", "cosine"):
            raise ValueError(f"loss must be mse, kl or cosine, not {self.loss!r}")
        if not 0.0 <= self.holdout < 1.0 or self.lr <= 0:
            raise ValueError("holdout must be in [0, 1) and lr positive")


def _stack(batches: list[tuple]) -> tuple:
    """Concatenate samples along the batch axis; text samples of different lengths are zero-padded (pad token,
    mask 0) to the longest first."""
    out = []
    for i in range(len(batches[0])):
        parts = [b[i] for b in batches]
        longest = max(p.shape[1] for p in parts) if parts[0].dim() >= 2 else None
        if longest is not None and any(p.shape[1] != longest for p in parts) and not parts[0].is_floating_point():
            parts = [torch.nn.functional.pad(p, (0, longest - p.shape[1])) for p in parts]
        out.append(torch.cat(parts))
    return tuple(out)


def _loss(student_out, teacher_out, kind: str):
    s, t = student_out.float(), teacher_out.float()
    if kind == "kl":
        temp = 2.0
        return torch.nn.functional.kl_div(torch.log_softmax(s / temp, -1), torch.softmax(t / temp, -1),
                                          reduction="batchmean") * temp * temp
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1)).mean()
    return torch.nn.functional.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)  # relative, scale-free


def block_paths(model) -> list[str]:
    """Paths of the modules held in ModuleLists: the repeated blocks of a transformer."""
    return [f"{path}.{i}" if path else str(i) for path, mod in model.named_modules()
            if isinstance(mod, torch.nn.ModuleList) for i in range(len(mod))]


class _Taps:
    """Forward hooks that keep the (first) output of each tapped module."""

    def __init__(self, model, paths: list[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for path in paths:
            def keep(_mod, _inp, output, path=path):
                self.out[path] = output[0] if isinstance(output, (tuple, list)) else output
            self.handles.append(model.get_submodule(path).register_forward_hook(keep))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _hidden_loss(student_taps: _Taps, teacher_taps: _Taps, paths: list[str], mask):
    losses = []
    for p in paths:
        s, t = real_rows(student_taps.out[p].float(), mask), real_rows(teacher_taps.out[p].float(), mask)
        losses.append(torch.nn.functional.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12))
    return torch.stack(losses).mean()


def recover(student, teacher, batches: list[tuple], cfg: RecoverConfig, progress=None,
            mask_index: int | None = None) -> tuple:
    """Distill ``teacher`` into ``student`` (trained in place); return (student, record).

    The teacher runs alongside on each drawn batch (no stored targets, so the calibration set can be large).
    With ``mask_index`` (the attention-mask input of a text model), batches are cut to their longest real
    sequence and hidden states are compared on real tokens only.
    """
    if len(batches) < 2:
        raise UsageError("--recover", "needs at least 2 calibration samples", "give --calib with more data")
    held = max(1, round(len(batches) * cfg.holdout)) if cfg.holdout else 0
    train, val = (batches[:-held], batches[-held:]) if held and len(batches) - held >= 1 else (batches, batches)
    teacher.eval()
    paths = [p for p in block_paths(teacher) if p in dict(student.named_modules())] if cfg.hidden else []
    teacher_taps = _Taps(teacher, paths)
    val_chunks = [trim_padding(_stack(val[i:i + 32]), mask_index) for i in range(0, len(val), 32)]
    with torch.no_grad():
        val_targets = [teacher(*chunk) for chunk in val_chunks]
    student_taps = _Taps(student, paths)
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))

    def val_loss() -> float:
        student.eval()
        with torch.no_grad():
            total = sum(float(_loss(student(*c), t, cfg.loss)) * len(t) for c, t in zip(val_chunks, val_targets,
                                                                                          strict=True))
        return total / sum(len(t) for t in val_targets)

    try:
        best = val_loss()
        start_loss, stale, step = best, 0, 0
        best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            student.train()
            idx = torch.randint(0, len(train), (min(cfg.batch_size, len(train)),), generator=gen).tolist()
            inputs = trim_padding(_stack([train[i] for i in idx]), mask_index)
            with torch.no_grad():
                target = teacher(*inputs)
            loss = _loss(student(*inputs), target, cfg.loss)
            if paths:
                loss = loss + _hidden_loss(student_taps, teacher_taps, paths, token_mask(inputs, mask_index))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == cfg.steps:
                current = val_loss()
                _show(progress, step, cfg.steps, loss.item(), current)
                if current < best - 1e-6:
                    best, stale = current, 0
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
    finally:
        student_taps.remove()
        teacher_taps.remove()
    student.load_state_dict(best_state)
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return student, {
        "steps_run": step, "early_stopped": step < cfg.steps, "hidden_states_matched": len(paths),
        "heldout_loss_before": round(start_loss, 6), "heldout_loss_after": round(best, 6), "loss": cfg.loss,
        "train_samples": len(train), "heldout_samples": len(val), "real_tokens_only": mask_index is not None,
        "seconds": round(time.perf_counter() - started, 1)}


def _show(progress, step: int, total: int, train_loss: float, val_loss: float) -> None:
    if progress is None:
        return
    if hasattr(progress, "tick"):
        progress.tick("recover: step", step, total, f"train {train_loss:.4g}  held-out {val_loss:.4g}")
    if not getattr(progress, "tty", False) and progress.enabled and step % max(10, total // 4 // 10 * 10) == 0:
        print(f"      recover: step {step}/{total}  train {train_loss:.4g}  held-out {val_loss:.4g}", file=sys.stderr,
              flush=True)
