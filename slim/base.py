"""Pass machinery: strict configs, a registry, the per-layer selector, and what a pass returns.

A pass is ``apply(model, cfg, ctx) -> PassResult``, registered by name. It builds a plan (which
layers change, and how) as data first, then applies it to a copy of the model.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimx._core.errors import UsageError
from slimx._core.registry import Registry

CONFIG_VERSION = 1


@dataclass
class PassContext:
    """Runtime objects a pass may use (never config fields).

    Attributes:
        calib: calibration input batches (tuples of tensors).
        synthetic: whether ``calib`` is synthetic (fidelity figures are then marked so).
        teacher: the original model, for distillation and fidelity.
        device: the target device profile (hardware-friendly rank multiples), if any.
        latency_model: a latency estimator for latency-driven passes, if any.
        progress: a Progress for long steps, if any.
        mask_index: position of the attention-mask input in each calibration tuple (text models), or None.
            Where given, statistics and distillation losses count real tokens only, and batches are cut to
            their longest real sequence: with sentences padded to a fixed length, padding is most positions.
    """

    calib: list[tuple] = field(default_factory=list)
    synthetic: bool = False
    teacher: Any = None
    device: Any = None
    latency_model: Any = None
    progress: Any = None
    mask_index: int | None = None


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


def real_rows(x, mask):
    """``x`` (batch, seq, features) as (real tokens, features) under ``mask``; any other shape as rows."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@dataclass
class PassResult:
    """A pass's output: the new model and a per-layer report."""

    model: Any
    name: str
    config: dict
    layers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "summary": self.summary, "layers": self.layers}


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    config_cls: type
    fn: Any


PASSES: Registry[RegisteredPass] = Registry("pass")


def register_pass(name: str, config_cls: type):
    """Decorator: register ``fn(model, cfg, ctx) -> PassResult`` under ``name`` with its config class."""

    def add(fn):
        PASSES.add(name, RegisteredPass(name, config_cls, fn))
        return fn

    return add


def config_from_dict(cls: type, values: dict, where: str):
    """Build a frozen config dataclass from ``values``, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{where}", f"unknown option(s) {', '.join(unknown)}",
                         f"{cls.__name__} takes {', '.join(sorted(fields))}")
    typed = {}
    for key, value in values.items():
        typed[key] = _coerce(value, fields[key].type, f"{where} {key}")
    try:
        return cls(**typed)
    except (TypeError, ValueError) as exc:
        raise UsageError(where, str(exc), f"see {cls.__name__}'s options") from exc


def config_to_dict(cfg) -> dict:
    return {"version": CONFIG_VERSION, **dataclasses.asdict(cfg)}


def _coerce(value, annotation, where: str):
    kind = str(annotation)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "null", ""):
            return None
        if "bool" in kind and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if "float" in kind:
            try:
                return float(text)
            except ValueError:
                if "str" not in kind:
                    raise UsageError(where, f"{text!r} is not a number", "give a number") from None
        if "int" in kind:
            try:
                return int(text)
            except ValueError:
                if "str" not in kind:
                    raise UsageError(where, f"{text!r} is not an integer", "give an integer") from None
        if "tuple" in kind:
            return tuple(t for t in re.split(r"[|;]", text) if t)
        return text
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class PassSpec:
    """One pass to run, as the user wrote it: a name and its config."""

    name: str
    config: Any

    def describe(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in dataclasses.asdict(self.config).items())})"


def parse_pass(text: str) -> PassSpec:
    """``lowrank:rank_ratio=0.5,multiple=8`` -> PassSpec.

    Example:
        >>> import slimx.slim
        >>> parse_pass("lowrank:rank_ratio=0.25").config.rank_ratio
        0.25
    """
    name, _, opts = text.partition(":")
    entry = PASSES.get(name.strip())
    values = parse_key_values(opts, f"--pass {text}", "--pass NAME:key=value,key=value")
    return PassSpec(entry.name, config_from_dict(entry.config_cls, values, f"--pass {entry.name}"))


def parse_key_values(text: str, where: str, example: str) -> dict[str, str]:
    """``a=1,b=x`` -> {"a": "1", "b": "x"}; anything else is a usage error naming ``where``."""
    values = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(where, f"{item!r} is not KEY=VALUE", f"write {example}")
        values[key.strip()] = value.strip()
    return values


def load_recipe(path: str | Path) -> list[PassSpec]:
    """A TOML recipe: ``[[pass]]`` tables, each with ``name`` and the pass's options, run in order."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--recipe {path}", "no such file", "give a TOML file with [[pass]] tables")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--recipe {path}", f"is not valid TOML ({exc})", "fix the file") from exc
    unknown = sorted(set(data) - {"pass", "version"})
    if unknown or not isinstance(data.get("pass"), list):
        raise UsageError(f"--recipe {path}", f"expects [[pass]] tables only (found {', '.join(unknown) or 'none'})",
                         "write [[pass]] name = \"lowrank\" rank_ratio = 0.5")
    specs = []
    for i, table in enumerate(data["pass"]):
        table = dict(table)
        name = table.pop("name", None)
        if not name:
            raise UsageError(f"--recipe {path}", f"pass #{i + 1} has no name", "add name = \"lowrank\"")
        entry = PASSES.get(name)
        specs.append(PassSpec(entry.name, config_from_dict(entry.config_cls, table, f"--recipe {path} pass {name}")))
    return specs


def recipe_text(specs: list[PassSpec]) -> str:
    """The TOML recipe that reproduces ``specs`` (configs round-trip)."""
    lines = [f"version = {CONFIG_VERSION}", ""]
    for spec in specs:
        lines.append("[[pass]]")
        lines.append(f'name = "{spec.name}"')
        for key, value in dataclasses.asdict(spec.config).items():
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            elif isinstance(value, tuple):
                lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
            else:
                lines.append(f'{key} = "{value}"')
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class LayerSelector:
    """Which modules a pass touches: a name regex beats a module type beats the global default.

    Attributes:
        include: regexes on module paths that select a module (wins over everything).
        exclude: regexes on module paths that leave a module alone (wins over types and default).
        types: module class names selected by type.
        default: whether a module of a supported type is selected when nothing else says.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    default: bool = True

    def selects(self, path: str, module) -> bool:
        if any(re.search(p, path) for p in self.include):
            return True
        if any(re.search(p, path) for p in self.exclude):
            return False
        if self.types:
            return type(module).__name__ in self.types
        return self.default
