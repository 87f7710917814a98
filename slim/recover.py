"""Recover: knowledge distillation from the original model on the calibration data, bounded and early-stopped."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from slimx._core.errors import UsageError
from slimx.slim.base import length_batches, real_rows, stack_samples, token_mask, trim_padding
from slimx.slim.layerwise import layerwise


@dataclass(frozen=True)
class RecoverConfig:
    """``--recover steps=N,lr=X,loss=mse|kl|cosine,batch_size=B,patience=P,layerwise=M``.

    Attributes:
        steps: end-to-end optimizer steps at most (0: only the layer-wise phase).
        lr: AdamW learning rate.
        loss: ``mse`` (outputs or embeddings), ``cosine`` (1 - cosine, for embeddings), ``kl`` (logits, T=2).
        batch_size: samples per step, drawn from the calibration batches.
        patience: stop after this many evaluations (every 10 steps) without a better held-out loss.
        holdout: fraction of the calibration samples kept out of training, to judge early stopping.
        hidden: also match every block's output (hidden-state MSE): the blocks are the children of
            ModuleLists (``encoder.layer.N``, ``blocks.N``), found in teacher and student alike.
        device: where to train: ``auto`` (CUDA if present, else Apple's MPS, else the CPU), ``cpu``, ``cuda``,
            ``cuda:N`` or ``mps``. The models come back on the CPU; the artifact is timed in its own runtime after.
        amp: mixed precision on CUDA (bfloat16 where the GPU has it, else float16 with loss scaling); the CPU
            and MPS train in float32.
        bucket: text models: draw each batch from samples of similar real length (sorted by length, a random
            window), so that little of a batch is padding.
        checkpoint: a file to save the training state to at every evaluation, and to resume from when it
            exists and was written for the same model shapes and settings (``torch.load(weights_only=True)``).
            A resumed run skips the layer-wise phase (the checkpoint's weights come after it).
        layerwise: steps per block of block-wise distillation (``slim.layerwise``), run before the end-to-end
            steps: each repeated block trained alone, in model order, on the inputs the trained blocks before
            it give, to the original block's output (relative MSE on real tokens); batches of ``batch_size``
            samples of similar length. 0: none.
        layerwise_lr: its Adam learning rate (cosine-decayed per block).
        attention: the weight of attention-map distillation in the end-to-end steps (0: none): at every attention
            module that teacher and student share and that computes a softmax, the KL divergence from the
            teacher's attention probabilities to the student's, averaged over heads (so a student with heads cut
            still compares) and over real query tokens (after MiniLM / TinyBERT's attention transfer).
        labels: the weight of the task loss in the end-to-end steps (0: none): cross-entropy of the student's
            logits against the calibration data's labels (``--labels``), added to the distillation loss, in the
            training steps and in the held-out loss that early stopping judges (the task fine-tune AxFormer's
            paper ends with, with the original's logits still distilled beside it).
        mixup: distil on mixed inputs (0: none): each end-to-end batch's float inputs mixed pairwise,
            ``l x + (1 - l) x[perm]`` with ``l ~ Beta(mixup, mixup)`` per sample, teacher and student given the same
            mix (function matching: Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
            consistent"), so that a few hundred images show the student the teacher's function between them too.
            Models with token inputs (nothing to mix) skip it, said so in the record; not with ``labels``
            (a mixed image has no one label).
    """

    steps: int = 100
    lr: float = 5e-5
    loss: str = "mse"
    batch_size: int = 8
    patience: int = 5
    holdout: float = 0.2
    hidden: bool = True
    device: str = "auto"
    amp: bool = True
    bucket: bool = True
    checkpoint: str | None = None
    layerwise: int = 0
    layerwise_lr: float = 3e-4
    attention: float = 0.0
    labels: float = 0.0
    mixup: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.patience < 1:
            raise ValueError("batch_size and patience must be at least 1")
        if self.steps < 0 or self.layerwise < 0 or self.steps + self.layerwise < 1:
            raise ValueError("steps and layerwise must be 0 or more, and not both 0")
        if self.layerwise_lr <= 0:
            raise ValueError("layerwise_lr must be positive")
        if self.attention < 0 or self.labels < 0 or self.mixup < 0:
            raise ValueError("attention and labels (loss weights) and mixup must be 0 or more")
        if self.mixup and self.labels:
            raise ValueError("mixup and labels cannot be combined: a mixed input has no one label")
        if self.loss not in ("mse", "kl", "cosine"):
            raise ValueError(f"loss must be mse, kl or cosine, not {self.loss!r}")
        if not 0.0 <= self.holdout < 1.0 or self.lr <= 0:
            raise ValueError("holdout must be in [0, 1) and lr positive")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")


def training_device(name: str) -> torch.device:
    """The device ``name`` asks for (``auto``: CUDA, else MPS, else CPU); a missing one is a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--recover device={name}", "asks for CUDA, and torch sees no CUDA device here",
                         "use device=auto or device=cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--recover device=mps", "asks for Apple's MPS, which this torch does not have here",
                         "use device=auto or device=cpu")
    return torch.device(name)


def _to(batch: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device) for t in batch)


def _real_length(sample: tuple, mask_index: int | None) -> int:
    if mask_index is None:
        return 0
    return int(sample[mask_index].sum())


class _Batches:
    """Training batches: uniformly drawn samples, or (``bucket``) a random window of the samples sorted by real
    length, so that a batch's samples have about the same length."""

    def __init__(self, train: list[tuple], batch_size: int, mask_index: int | None, bucket: bool) -> None:
        self.train, self.size = train, min(batch_size, len(train))
        self.bucketed = bucket and mask_index is not None
        lengths = [_real_length(s, mask_index) for s in train]
        self.order = sorted(range(len(train)), key=lambda i: lengths[i]) if self.bucketed else None
        self.gen = torch.Generator().manual_seed(0)

    def draw(self) -> list[tuple]:
        if self.bucketed:
            start = int(torch.randint(0, len(self.train) - self.size + 1, (1,), generator=self.gen))
            return [self.train[i] for i in self.order[start:start + self.size]]
        idx = torch.randint(0, len(self.train), (self.size,), generator=self.gen).tolist()
        return [self.train[i] for i in idx]


def _mix(inputs: tuple, lam: torch.Tensor, perm: torch.Tensor) -> tuple:
    """The batch's float inputs mixed pairwise, ``lam x + (1 - lam) x[perm]`` (``lam`` one weight per sample);
    other inputs as they are."""
    out = []
    for t in inputs:
        if t.is_floating_point():
            w = lam.to(t.device, t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
            t = w * t + (1 - w) * t[perm.to(t.device)]
        out.append(t)
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


def attention_paths(student, teacher) -> list[str]:
    """The attention modules teacher and student share (by path), for attention-map distillation."""
    from slimx.slim.attention import attention_modules

    mine = {v.path for v in attention_modules(student, strict=False)}
    return [v.path for v in attention_modules(teacher, strict=False) if v.path in mine]


def attention_map_loss(student_maps: dict, teacher_maps: dict, mask) -> torch.Tensor | None:
    """Mean over the shared modules of KL(teacher || student) of head-averaged attention probabilities, over real
    query rows (``mask``: (B, L) or None); None when no module gave a map."""
    losses = []
    for path, t in teacher_maps.items():
        s = student_maps.get(path)
        if s is None or s.shape != t.shape:
            continue
        t, s = t.float(), s.float()
        kl = (t * (t.clamp(min=1e-12).log() - s.clamp(min=1e-12).log())).sum(-1)  # (B, Q)
        losses.append(kl[mask.bool()].mean() if mask is not None else kl.mean())
    return torch.stack(losses).mean() if losses else None


def recover(student, teacher, batches: list[tuple], cfg: RecoverConfig, progress=None,
            mask_index: int | None = None, labels: list[int] | None = None) -> tuple:
    """Distill ``teacher`` into ``student`` (trained in place); return (student, record).

    The teacher runs alongside on each drawn batch (no stored targets, so the calibration set can be large).
    With ``mask_index`` (the attention-mask input of a text model), batches are cut to their longest real
    sequence and hidden states are compared on real tokens only. ``labels``: one task label per sample, for
    ``cfg.labels``.
    """
    if len(batches) < 2:
        raise UsageError("--recover", "needs at least 2 calibration samples", "give --calib with more data")
    if cfg.labels and (labels is None or len(labels) != len(batches)):
        raise UsageError("--recover labels=...", "adds the task loss, and the calibration data has no labels",
                         "give --labels FILE (one label per calibration sample), or drop labels=")
    held = max(1, round(len(batches) * cfg.holdout)) if cfg.holdout else 0
    split = held and len(batches) - held >= 1
    train, val = (batches[:-held], batches[-held:]) if split else (batches, batches)
    label_of: dict[int, int] = {}
    val_labels = None
    if cfg.labels:  # the samples are tuples drawn as they are: their labels found by identity
        label_of = {id(s): int(y) for s, y in zip(batches, labels, strict=True)}
        val_labels = [torch.tensor([label_of[id(s)] for s in val[i:i + 32]]) for i in range(0, len(val), 32)]
    device = training_device(cfg.device)
    amp_dtype = None
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    teacher.eval()
    teacher.to(device)
    student.to(device)
    paths = [p for p in block_paths(teacher) if p in dict(student.named_modules())] if cfg.hidden else []
    teacher_taps = _Taps(teacher, paths)
    val_chunks = [_to(trim_padding(stack_samples(val[i:i + 32]), mask_index), device) for i in range(0, len(val), 32)]
    with torch.no_grad():
        val_targets = [teacher(*chunk) for chunk in val_chunks]
    student_taps = _Taps(student, paths)
    maps = None
    if cfg.attention:
        from slimx.slim.attention import AttentionMaps

        shared = attention_paths(student, teacher)
        maps = (AttentionMaps(student, shared), AttentionMaps(teacher, shared))
        if not maps[0].kernels or not maps[1].kernels:
            raise UsageError("--recover attention=...", "found no softmax attention that teacher and student share "
                             "(a pass replaced it, or the model's attention has no adapter)",
                             "drop attention=, or distil outputs and hidden states only")
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(cfg.steps, 1))))
    draw = _Batches(train, cfg.batch_size, mask_index, cfg.bucket)
    mixing = bool(cfg.mixup) and mask_index is None and any(t.is_floating_point() for t in train[0])
    mix_rng = np.random.default_rng(1)

    def task(out, y):
        return cfg.labels * torch.nn.functional.cross_entropy(out.float(), y.to(out.device))

    def val_loss() -> float:
        student.eval()
        total = 0.0
        with torch.no_grad():
            for i, (c, t) in enumerate(zip(val_chunks, val_targets, strict=True)):
                out = student(*c)
                loss = _loss(out, t, cfg.loss) + (task(out, val_labels[i]) if val_labels is not None else 0.0)
                total += float(loss) * len(t)
        return total / sum(len(t) for t in val_targets)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    resumed, blockwise = None, None
    started = time.perf_counter()
    try:
        start_loss = val_loss()
        state = _load_checkpoint(cfg, student) if cfg.checkpoint else None
        if cfg.layerwise and state is None:  # float16 would want loss scaling: layer-wise runs bf16 or fp32
            chunks = [_to(b, device) for b in length_batches(train, cfg.batch_size, mask_index)]
            blockwise = layerwise(student, teacher, chunks, val_chunks, cfg.layerwise, cfg.layerwise_lr, mask_index,
                                  autocast if amp_dtype is torch.bfloat16 else contextlib.nullcontext, progress)
        best, stale, first = val_loss(), 0, 1
        if blockwise is not None:
            blockwise["heldout_loss_after"] = round(best, 6)
        best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if cfg.checkpoint:
            if state is not None:
                student.load_state_dict(state["student"])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                best_state, best, stale = state["best_state"], state["best"], state["stale"]
                start_loss, first = state["start_loss"], state["step"] + 1
                draw.gen.set_state(state["generator"])
                resumed = state["step"]
        step = first - 1
        for step in range(first, cfg.steps + 1):
            if stale >= cfg.patience:
                step -= 1
                break
            student.train()
            drawn = draw.draw()
            inputs = _to(trim_padding(stack_samples(drawn), mask_index), device)
            if mixing and len(drawn) >= 2:
                inputs = _mix(inputs, torch.from_numpy(mix_rng.beta(cfg.mixup, cfg.mixup, len(drawn))),
                              torch.from_numpy(mix_rng.permutation(len(drawn))))
            with torch.no_grad(), autocast():
                target = teacher(*inputs)
            with autocast():
                out = student(*inputs)
                loss = _loss(out, target, cfg.loss)
                if cfg.labels:
                    loss = loss + task(out, torch.tensor([label_of[id(s)] for s in drawn]))
                if paths:
                    loss = loss + _hidden_loss(student_taps, teacher_taps, paths, token_mask(inputs, mask_index))
                if maps is not None:
                    extra = attention_map_loss(maps[0].maps(), maps[1].maps(), token_mask(inputs, mask_index))
                    if extra is not None:
                        loss = loss + cfg.attention * extra
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if step % 10 == 0 or step == cfg.steps:
                current = val_loss()
                _show(progress, step, cfg.steps, loss.item(), current)
                if current < best - 1e-6:
                    best, stale = current, 0
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                else:
                    stale += 1
                if cfg.checkpoint:
                    _save_checkpoint(cfg, student, {
                        "student": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "best_state": best_state, "best": best, "stale": stale, "start_loss": start_loss,
                        "step": step, "generator": draw.gen.get_state()})
                if stale >= cfg.patience:
                    break
    finally:
        student_taps.remove()
        teacher_taps.remove()
        for tap in maps or ():
            tap.remove()
        student.to("cpu")  # the rest of slimx (fidelity, export) works on the CPU
        teacher.to("cpu")
    student.load_state_dict(best_state)
    student.eval()
    for p in params:
        p.requires_grad_(False)
    return student, {
        "steps_run": step, "early_stopped": step < cfg.steps, "hidden_states_matched": len(paths),
        "attention_maps_matched": len(attention_paths(student, teacher)) if cfg.attention else 0,
        "task_loss": f"cross-entropy on the labels, weight {cfg.labels:g}" if cfg.labels else None,
        "mixup": (f"inputs mixed pairwise, Beta({cfg.mixup:g}, {cfg.mixup:g})" if mixing else
                  "skipped: no float inputs to mix (token ids)" if cfg.mixup else None),
        "heldout_loss_before": round(start_loss, 6), "heldout_loss_after": round(best, 6), "loss": cfg.loss,
        "train_samples": len(train), "heldout_samples": len(val), "real_tokens_only": mask_index is not None,
        "device": str(device), "mixed_precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        "batches": "bucketed by real length" if draw.bucketed else "drawn uniformly",
        "resumed_from_step": resumed, "seconds": round(time.perf_counter() - started, 1), "layerwise": blockwise}


def _fingerprint(cfg: RecoverConfig, student) -> dict:
    """What a checkpoint must match to be resumed: the student's parameter shapes and the training settings."""
    shapes = {k: list(v.shape) for k, v in student.state_dict().items()}
    settings = {k: getattr(cfg, k) for k in ("steps", "lr", "loss", "batch_size", "holdout", "hidden", "bucket",
                                             "layerwise", "layerwise_lr", "attention", "labels", "mixup")}
    return {"shapes": shapes, "settings": settings}


def _save_checkpoint(cfg: RecoverConfig, student, state: dict) -> None:
    import json
    import os

    cpu = _to_cpu(state)
    cpu["fingerprint"] = json.dumps(_fingerprint(cfg, student), sort_keys=True)
    tmp = f"{cfg.checkpoint}.partial"
    torch.save(cpu, tmp)
    os.replace(tmp, cfg.checkpoint)


def _load_checkpoint(cfg: RecoverConfig, student) -> dict | None:
    """The saved state when ``cfg.checkpoint`` exists and fits this student and these settings, else None
    (a checkpoint of other shapes or settings is a usage error: resuming it would train something else)."""
    import json
    import os

    if not os.path.exists(cfg.checkpoint):
        return None
    try:
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"--recover checkpoint={cfg.checkpoint}", f"is not a slimx recovery checkpoint ({exc})",
                         "delete it or give another path") from exc
    if state.get("fingerprint") != json.dumps(_fingerprint(cfg, student), sort_keys=True):
        raise UsageError(f"--recover checkpoint={cfg.checkpoint}", "was written for another model or other "
                         "recovery settings", "delete it to start over, or give another path")
    return state


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _show(progress, step: int, total: int, train_loss: float, val_loss: float) -> None:
    if progress is None:
        return
    if hasattr(progress, "tick"):
        progress.tick("recover: step", step, total, f"train {train_loss:.4g}  held-out {val_loss:.4g}")
    if not getattr(progress, "tty", False) and progress.enabled and step % max(10, total // 4 // 10 * 10) == 0:
        print(f"      recover: step {step}/{total}  train {train_loss:.4g}  held-out {val_loss:.4g}", file=sys.stderr,
              flush=True)
