"""Inputs bound to a model by the names slimx gives them, whatever the model's own parameter names are.

slimx names a model's inputs in its spec (``pixel_values``, ``input_ids``, ``attention_mask``) and every
artifact keeps those names; the PyTorch module may call them something else (timm's ``forward(x)``). A
converter that passes inputs by keyword (litert-torch's ``sample_kwargs``, PT2E calibration) goes through
:class:`NamedInputs`, which maps the spec's names onto the module's positional call order in one place.
"""

from __future__ import annotations

import inspect

import torch

from slimx._core.errors import UsageError


def positional_order(names: list[str], args: tuple = (), kwargs: dict | None = None) -> tuple:
    """The values of ``args`` / ``kwargs`` (keyed by the spec's ``names``) in call order.

    Example:
        >>> positional_order(["pixel_values"], kwargs={"pixel_values": 1})
        (1,)
    """
    kwargs = dict(kwargs or {})
    if args and kwargs:
        raise TypeError("give the inputs either by position or by name, not both")
    if args:
        return tuple(args)
    missing = [n for n in names if n not in kwargs]
    extra = sorted(set(kwargs) - set(names))
    if missing or extra:
        raise UsageError("model inputs", f"got {sorted(kwargs)}, the model's spec names {names}",
                         "pass exactly the inputs the spec names")
    return tuple(kwargs[n] for n in names)


def check_binds(module, count: int) -> None:
    """Refuse a module whose ``forward`` cannot take ``count`` positional inputs (before a converter tries)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # builtins or C extensions: nothing to check ahead
        return
    try:
        signature.bind(*range(count))
    except TypeError as exc:
        raise UsageError(f"{type(module).__name__}.forward{signature}",
                         f"cannot take the {count} input(s) of its spec by position ({exc})",
                         "give a factory whose module's forward takes the inputs in spec order") from None


class NamedInputs(torch.nn.Module):
    """``module`` called with keyword inputs named as in the spec (or positionally, in spec order).

    Example:
        >>> class Net(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x + 1
        >>> NamedInputs(Net(), ["pixel_values"])(pixel_values=torch.zeros(1))
        tensor([1.])
    """

    def __init__(self, module, names: list[str]) -> None:
        super().__init__()
        check_binds(module, len(names))
        self.module = module
        self.names = tuple(names)
        self.train(module.training)

    def forward(self, *args, **kwargs):
        return self.module(*positional_order(list(self.names), args, kwargs))
