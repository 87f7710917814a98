"""Reading checkpoints without unpickling anything, and applying them to a model."""

from __future__ import annotations

from pathlib import Path

from slimx._core.errors import UsageError, first_line

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def read_state_dict(path: str | Path) -> dict:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    Torch files are read with ``torch.load(weights_only=True)``; a checkpoint that needs arbitrary
    pickled objects is refused. A dict that nests the weights under ``state_dict``/``model`` is
    unwrapped.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--weights {path}", "no such file", "give the path of a .safetensors or .pt/.pth/.bin file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"--weights {path}", f"is not a readable safetensors file ({first_line(exc)})",
                             "re-save it with safetensors.torch.save_file") from exc
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusals and corrupt files both land here
            if _looks_like_torch_file(path):
                why = "holds pickled Python objects beyond tensors, which slimx will not unpickle"
                fix = "save only the state dict (torch.save(model.state_dict(), f)) or use safetensors"
            else:
                why = f"is not a readable torch checkpoint ({first_line(exc, 120)})"
                fix = "check the file, or convert it to .safetensors"
            raise UsageError(f"--weights {path}", why, fix) from exc
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not _is_tensor_dict(state):
            state = state[key]
    if not isinstance(state, dict) or not _is_tensor_dict(state):
        raise UsageError(f"--weights {path}", "does not hold a state dict of tensors",
                         "save model.state_dict() with torch.save or safetensors")
    return state


def apply_state_dict(module, state: dict, source: str) -> dict:
    """Load ``state`` into ``module``; return a record of matched, missing and unexpected keys.

    Keys with a common ``module.`` prefix (DataParallel) are stripped. A shape mismatch or a
    checkpoint that matches no key at all is an error; missing and unexpected keys are reported.
    """
    own = module.state_dict()
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    matched = [k for k in state if k in own]
    if not matched:
        raise UsageError(
            f"--weights {source}",
            f"none of its {len(state)} keys match the model (e.g. {next(iter(state), '?')!r} vs "
            f"{next(iter(own), '?')!r})",
            "check that the checkpoint belongs to this architecture",
        )
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in matched
           if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UsageError(f"--weights {source}", f"{len(bad)} tensor(s) have the wrong shape: {bad[0]}",
                         "check that the checkpoint belongs to this architecture and configuration")
    result = module.load_state_dict(state, strict=False)
    return {
        "path": str(source),
        "matched": len(matched),
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
    }


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save zip archive or a pickle stream (protocol 2+), as opposed to random bytes."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as fh:
        return fh.read(1) == b"\x80"


def _is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())
