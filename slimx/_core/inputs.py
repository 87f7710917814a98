"""What a model takes as input, and fresh random inputs that fit it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from slimx._core.errors import UsageError

_DTYPES = ("float32", "float16", "int64", "int32", "bool")
_KINDS = ("float", "tokens", "mask", "zeros")
MAX_INPUT_ELEMENTS = 2**31  # one example input larger than this (8 GiB of fp32) is a typo, not a model


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: the input's name in the exported program and artifact.
        shape: static shape, batch first.
        dtype: one of float32, float16, int64, int32, bool.
        kind: how fresh values are drawn: ``float`` (standard normal), ``tokens`` (integers in
            [low, high)), ``mask`` (ones with a random padded tail), ``zeros``.
        low, high: the integer range for ``tokens``.
        dynamic: axes whose size may vary in the artifact, as ``(axis, min, max)``; ``shape`` holds the size
            the model is exported (and statically compiled) at.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "float"
    low: int = 0
    high: int = 2
    extra: dict = field(default_factory=dict, compare=False)
    dynamic: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise UsageError(f"input {self.name!r}", f"dtype {self.dtype!r} is not supported",
                             f"use one of {', '.join(_DTYPES)}")
        if self.kind not in _KINDS:
            raise ValueError(f"input kind {self.kind!r} is not one of {_KINDS}")
        if any(int(d) <= 0 for d in self.shape):
            raise UsageError(f"input {self.name!r}", f"shape {list(self.shape)} has a dimension <= 0",
                             "give every dimension as a positive integer, e.g. 1x3x224x224")
        elements = 1
        for d in self.shape:
            elements *= int(d)
        if elements > MAX_INPUT_ELEMENTS:
            raise UsageError(f"input {self.name!r}", f"shape {'x'.join(map(str, self.shape))} is {elements:.3g} "
                             f"elements, more than one input can hold here ({MAX_INPUT_ELEMENTS:.0e})",
                             "give the shape one example has, e.g. 1x3x224x224")

    def with_shape(self, shape: tuple[int, ...], dtype: str | None = None) -> InputSpec:
        return replace(self, shape=tuple(int(d) for d in shape), dtype=dtype or self.dtype)

    def sized(self, sizes: dict[int, int]) -> InputSpec:
        """The same input with some axes at other sizes (a dynamic axis at one length), still dynamic.

        Example:
            >>> InputSpec("ids", (1, 128), "int64", "tokens", dynamic=((1, 1, 512),)).sized({1: 7}).shape
            (1, 7)
        """
        shape = tuple(sizes.get(axis, d) for axis, d in enumerate(self.shape))
        return replace(self, shape=shape)

    def static(self) -> InputSpec:
        """The input at its export shape, with no dynamic axis."""
        return replace(self, dynamic=())

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}
        if self.kind == "tokens":
            out["range"] = [self.low, self.high]
        if self.dynamic:
            out["dynamic"] = [{"axis": a, "min": lo, "max": hi} for a, lo, hi in self.dynamic]
        return out


def sample_inputs(specs: list[InputSpec], seed: int) -> tuple:
    """Draw one set of inputs for ``specs`` from a seeded generator.

    Example:
        >>> x, = sample_inputs([InputSpec("x", (1, 4))], seed=0)
        >>> tuple(x.shape)
        (1, 4)
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        if spec.kind == "float":
            out.append(torch.randn(spec.shape, generator=gen).to(dtype))
        elif spec.kind == "tokens":
            out.append(torch.randint(spec.low, spec.high, spec.shape, generator=gen).to(dtype))
        elif spec.kind == "zeros":
            out.append(torch.zeros(spec.shape, dtype=dtype))
        else:  # mask: keep a random-length prefix, at least one position, the rest padding
            mask = torch.ones(spec.shape, dtype=dtype)
            length = spec.shape[-1]
            for row in mask.reshape(-1, length):
                keep = int(torch.randint(1, length + 1, (1,), generator=gen))
                row[keep:] = 0
            out.append(mask)
    return tuple(out)


_SHAPE = re.compile(r"^(?:(?P<name>[A-Za-z_][\w.]*)=)?(?P<dims>\d+(?:[x,]\d+)*)(?::(?P<dtype>\w+))?$")


def parse_input_shapes(values: list[str]) -> list[tuple[str | None, tuple[int, ...], str | None]]:
    """Parse ``--input-shape`` values: ``[NAME=]D1xD2x...[:DTYPE]``.

    Example:
        >>> parse_input_shapes(["1x3x224x224", "mask=1,128:int64"])
        [(None, (1, 3, 224, 224), None), ('mask', (1, 128), 'int64')]
    """
    parsed = []
    for value in values:
        match = _SHAPE.match(value.strip())
        if not match:
            raise UsageError(
                f"--input-shape {value!r}",
                "is not a shape",
                "write it as [NAME=]D1xD2x...[:DTYPE], e.g. 1x3x224x224 or input_ids=1x128:int64",
            )
        dims = tuple(int(d) for d in re.split(r"[x,]", match["dims"]))
        dtype = match["dtype"]
        if dtype is not None and dtype not in _DTYPES:
            raise UsageError(f"--input-shape {value!r}", f"dtype {dtype!r} is not supported",
                             f"use one of {', '.join(_DTYPES)}")
        if any(d <= 0 for d in dims):
            raise UsageError(f"--input-shape {value!r}", "has a dimension <= 0",
                             "give every dimension as a positive integer")
        parsed.append((match["name"], dims, dtype))
    return parsed


def apply_input_shapes(specs: list[InputSpec], values: list[str]) -> list[InputSpec]:
    """Override the shapes (and dtypes) of ``specs`` from ``--input-shape`` values.

    Named values go to the input of that name; unnamed ones go in order. A single unnamed value
    given to a model whose inputs are all token-like sets every one of them (``1x64`` for a text
    encoder sets ids and mask alike).
    """
    parsed = parse_input_shapes(values)
    if not parsed:
        return specs
    by_name = {s.name: i for i, s in enumerate(specs)}
    out = list(specs)
    unnamed = [p for p in parsed if p[0] is None]
    text_like = specs and all(s.kind in ("tokens", "mask", "zeros") for s in specs)
    if len(unnamed) == 1 and text_like and len(specs) > 1:
        out = [s.with_shape(unnamed[0][1], unnamed[0][2]) for s in out]
        unnamed = []
    if len(unnamed) > len(specs):
        raise UsageError(
            "--input-shape",
            f"{len(unnamed)} shapes given but the model takes {len(specs)} input(s) "
            f"({', '.join(s.name for s in specs)})",
            "give one shape per input, or name them: NAME=1x3x224x224",
        )
    for i, (_, dims, dtype) in enumerate(unnamed):
        out[i] = out[i].with_shape(dims, dtype)
    for name, dims, dtype in parsed:
        if name is None:
            continue
        if name not in by_name:
            raise UsageError(f"--input-shape {name}=...", "the model has no input of that name",
                             f"its inputs are {', '.join(by_name)}")
        out[by_name[name]] = out[by_name[name]].with_shape(dims, dtype)
    return out


def to_numpy_inputs(inputs: tuple) -> list:
    """Torch tensors (or arrays) -> contiguous numpy arrays."""
    import numpy as np

    out = []
    for value in inputs:
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out.append(np.ascontiguousarray(value))
    return out


def mask_index_of(input_names: list[str]) -> int | None:
    """Where the attention mask sits among a model's inputs (by its conventional name), or None."""
    return input_names.index("attention_mask") if "attention_mask" in input_names else None


def token_mask(batch: tuple, mask_index: int | None):
    """The (batch, seq) boolean mask of real tokens of one calibration batch, or None without a mask input."""
    if mask_index is None:
        return None
    return batch[mask_index].bool()


def trim_padding(batch: tuple, mask_index: int | None) -> tuple:
    """Cut the positions past the longest real sequence of the batch from every (batch, seq, ...) input.

    A model that masks its padding gives the same outputs for the real tokens (up to rounding), at the cost
    of the real length instead of the padded one.
    """
    mask = token_mask(batch, mask_index)
    if mask is None or mask.dim() != 2:
        return batch
    real = mask.any(0).nonzero()
    length = int(real.max()) + 1 if len(real) else 1
    if length == mask.shape[1]:
        return batch
    return tuple(t[:, :length] if t.dim() >= 2 and t.shape[:2] == mask.shape else t for t in batch)
