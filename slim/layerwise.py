"""Block-wise distillation: each repeated block of the compressed model trained alone, in model order, to give
the original block's output on the inputs the blocks before it (already trained) now give it.

One step runs one block forward and backward, a sixth of MiniLM's end-to-end step, and each block's problem is
small and well posed (its own input, its own target), so a few minutes reach what end-to-end distillation
reaches in tens (``bench/results/pruning_minilm.md``). It is ``--recover layerwise=N`` (N steps per block),
run before the end-to-end steps. Nonlinear where ``slim.reconstruct`` is linear: every kept weight of the
block moves (attention projections, both FFN layers, LayerNorms), not only the map after a cut.
"""

from __future__ import annotations

import math
import time

import torch

from slimx.slim.base import real_rows, token_mask


class _Stop(Exception):
    """Raised from a hook to end a forward once the block wanted has run."""


def outer_blocks(model) -> list[str]:
    """Paths of the outermost repeated blocks: children of a ModuleList, or of a Sequential whose two or more
    children are all of one class (timm's ``blocks``), not inside another such block."""
    from torch import nn

    paths = []
    for path, mod in model.named_modules():
        children = list(mod.children())
        repeated = isinstance(mod, nn.Sequential) and len(children) >= 2 and len({type(c) for c in children}) == 1
        if isinstance(mod, nn.ModuleList) or repeated:
            paths += [f"{path}.{i}" if path else str(i) for i in range(len(children))]
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture(model, path: str, chunks: list[tuple], want_inputs: bool) -> list:
    """Run ``model`` on each chunk up to block ``path``, no further: the block's (args, kwargs) per chunk
    (``want_inputs``), else its first output per chunk."""
    got = []
    block = model.get_submodule(path)

    def pre(_m, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    def post(_m, _args, output):
        got.append(_first(output).detach())
        raise _Stop

    handle = (block.register_forward_pre_hook(pre, with_kwargs=True) if want_inputs
              else block.register_forward_hook(post))
    try:
        with torch.no_grad():
            for chunk in chunks:
                try:
                    model(*chunk)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def _shared(model, path: str, chunk: tuple) -> bool:
    """Whether block ``path`` runs more than once in one forward (ALBERT's one layer repeated)."""
    calls = [0]

    def count(_m, _args):
        calls[0] += 1

    handle = model.get_submodule(path).register_forward_pre_hook(count)
    try:
        with torch.no_grad():
            model(*chunk)
    finally:
        handle.remove()
    return calls[0] > 1


def _relative_error(block, inputs: list, targets: list, masks: list, autocast) -> float:
    err = ref = 0.0
    with torch.no_grad(), autocast():
        for (args, kwargs), y, m in zip(inputs, targets, masks, strict=True):
            out = real_rows(_first(block(*args, **kwargs)).float(), m)
            want = real_rows(y.float(), m)
            err += float((out - want).pow(2).sum())
            ref += float(want.pow(2).sum())
    return err / max(ref, 1e-12)


def layerwise(student, teacher, train_chunks: list[tuple], val_chunks: list[tuple], steps: int, lr: float,
              mask_index: int | None, autocast, progress=None) -> dict:
    """Train each outer block of ``student`` (in place) to the matching block of ``teacher``; return the record.

    ``train_chunks``/``val_chunks``: batches already stacked, trimmed and on the training device. Each block keeps
    the weights of its best held-out error (checked every ``max(10, steps // 20)`` steps; the untrained block
    counts, so a block never leaves worse than it came on the held-out chunks).
    """
    paths = [p for p in outer_blocks(teacher) if p in dict(student.named_modules())]
    record = {"steps_per_block": steps, "lr": lr, "blocks": []}
    if not paths:
        record["skipped"] = "no repeated blocks (children of a ModuleList) to train one at a time"
        return record
    if _shared(student, paths[0], train_chunks[0]):
        record["skipped"] = f"{paths[0]} runs more than once per forward (shared weights): trained end to end only"
        return record
    started = time.perf_counter()
    student.eval()
    teacher.eval()
    every = max(10, steps // 20)
    train_masks = [token_mask(c, mask_index) for c in train_chunks]
    val_masks = [token_mask(c, mask_index) for c in val_chunks]
    gen = torch.Generator().manual_seed(0)
    for n, path in enumerate(paths):
        block = student.get_submodule(path)
        params = [p for p in block.parameters() if p.is_floating_point()]
        if not params:  # every branch of the block cut away (AxFormer): nothing of it left to train
            record["blocks"].append({"block": path, "skipped": "no trainable weights left"})
            continue
        train_in = _capture(student, path, train_chunks, want_inputs=True)
        val_in = _capture(student, path, val_chunks, want_inputs=True)
        train_y = _capture(teacher, path, train_chunks, want_inputs=False)
        val_y = _capture(teacher, path, val_chunks, want_inputs=False)
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        before = best = _relative_error(block, val_in, val_y, val_masks, autocast)
        best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
        try:
            for step in range(1, steps + 1):
                i = int(torch.randint(0, len(train_in), (1,), generator=gen))
                (args, kwargs), m = train_in[i], train_masks[i]
                with autocast():
                    out = real_rows(_first(block(*args, **kwargs)).float(), m)
                want = real_rows(train_y[i].float(), m)
                loss = (out - want).pow(2).mean() / want.pow(2).mean().clamp(min=1e-12)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if step % every == 0 or step == steps:
                    current = _relative_error(block, val_in, val_y, val_masks, autocast)
                    if current < best:
                        best, best_state = current, {k: v.detach().clone() for k, v in block.state_dict().items()}
                    if progress is not None and hasattr(progress, "tick"):
                        progress.tick("recover: layer-wise", n * steps + step, len(paths) * steps,
                                      f"{path}  held-out error {current:.4g}")
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        block.load_state_dict(best_state)
        record["blocks"].append({"block": path, "heldout_error_before": round(before, 6),
                                 "heldout_error_after": round(best, 6)})
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record
