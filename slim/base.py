"""Pass machinery: strict configs, a registry, the per-layer selector, and what a pass returns.

A pass is ``apply(model, cfg, ctx) -> PassResult``, registered by name. It builds a plan (which
layers change, and how) as data first, then applies it to a copy of the model.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from slimx._core.config import CONFIG_VERSION, config_from_dict, parse_key_values, read_toml
from slimx._core.errors import UsageError
from slimx._core.inputs import mask_index_of, token_mask, trim_padding  # noqa: F401  (used by the passes)
from slimx._core.registry import Registry


class LatencyModel(Protocol):
    """Latency of a model on the device an export is for: the one interface a latency-driven pass uses
    (``devices.estimator.EstimatorLatencyModel`` estimates per op; ``devices.runners.RunnerLatencyModel``
    measures with a runner). A pass never imports a target or a device.

    ``latency(module, example_inputs)`` returns ``{"ms", "kind" ("estimated" or "measured"), "device"}`` and,
    where known, ``"interval_ms": [lo, hi]``.
    """

    kind: str
    device: str

    def latency(self, module, example_inputs: tuple) -> dict: ...


@dataclass
class PassContext:
    """Runtime objects a pass may use (never config fields).

    Attributes:
        calib: calibration input batches (tuples of tensors).
        synthetic: whether ``calib`` is synthetic (fidelity figures are then marked so).
        teacher: the original model, for distillation and fidelity.
        device: the target device profile (hardware-friendly rank multiples), if any.
        latency_model: the chosen device's ``LatencyModel`` (filled by the pipeline), for latency-driven passes.
        progress: a Progress for long steps, if any.
        labels: one task label per ``calib`` sample (``--labels``): accuracy-driven passes judge by task loss.
        mask_index: position of the attention-mask input in each calibration tuple (text models), or None.
            Where given, statistics and distillation losses count real tokens only, and batches are cut to
            their longest real sequence: with sentences padded to a fixed length, padding is most positions.
    """

    calib: list[tuple] = field(default_factory=list)
    synthetic: bool = False
    teacher: Any = None
    device: Any = None
    latency_model: LatencyModel | None = None
    progress: Any = None
    mask_index: int | None = None
    labels: list[int] | None = None  # a task label per calibration sample (accuracy-driven passes), if given
    cache: dict = field(default_factory=dict)  # statistics a pass's plan computed for its apply (slim.surgery)


def real_rows(x, mask):
    """``x`` (batch, seq, features) as (real tokens, features) under ``mask``; any other shape as rows."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def stack_samples(samples: list[tuple]) -> tuple:
    """Concatenate samples along the batch axis; text samples of different lengths are zero-padded (pad token,
    mask 0) to the longest first."""
    import torch

    out = []
    for i in range(len(samples[0])):
        parts = [b[i] for b in samples]
        longest = max(p.shape[1] for p in parts) if parts[0].dim() >= 2 else None
        if longest is not None and any(p.shape[1] != longest for p in parts) and not parts[0].is_floating_point():
            parts = [torch.nn.functional.pad(p, (0, longest - p.shape[1])) for p in parts]
        out.append(torch.cat(parts))
    return tuple(out)


def length_batches(samples: list[tuple], size: int, mask_index: int | None) -> list[tuple]:
    """``samples`` in batches of ``size``, sorted by real length (text: little padding), each cut to its longest
    real sequence. Without a mask input the samples keep their order (and must share a shape)."""
    def real(i: int) -> int:
        return int(samples[i][mask_index].sum()) if mask_index is not None else 0

    order = sorted(range(len(samples)), key=real)
    return [trim_padding(stack_samples([samples[i] for i in order[k:k + size]]), mask_index)
            for k in range(0, len(order), size)]


@dataclass
class PassResult:
    """A pass's output: the new model and a per-layer report."""

    model: Any
    name: str
    config: dict
    layers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more of the report (a search's trials and trajectory)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "summary": self.summary, "layers": self.layers,
                **self.extra}


@dataclass(frozen=True)
class RegisteredPass:
    """A pass as registered: its config class and its three steps.

    Attributes:
        plan: ``plan(model, cfg, ctx) -> list[dict]``: per layer what would change, as plain data (nothing changed).
        apply: ``apply(model, plan, cfg, ctx) -> PassResult``: the plan carried out on a copy of the model.
        finalize: ``finalize(model) -> model`` (in place): this pass's modules in their deployable form, or None.
        selects: ``selects(model, cfg) -> list[str]``: the module paths the pass considers (its selector's pick).
        fix_hint: what to try when the pass loses too much fidelity (the fidelity gate's one-line fix).
        test_options: options that keep the pass fast on the contract test's tiny models (else its defaults).
        test_model: the tiny model the contract test runs it on: ``"mlp"`` or ``"vit"`` (a pass on attention).
        latency_driven: whether the pass prices its steps on ``PassContext.latency_model`` (the device's).
    """

    name: str
    config_cls: type
    plan: Any
    apply: Any
    finalize: Any = None
    selects: Any = None
    fix_hint: str = "milder settings"
    test_options: dict = field(default_factory=dict)
    test_model: str = "mlp"
    latency_driven: bool = False

    def fn(self, model, cfg, ctx) -> PassResult:
        """Plan, then apply: the whole pass."""
        return self.apply(model, self.plan(model, cfg, ctx), cfg, ctx)


PASSES: Registry[RegisteredPass] = Registry("pass")


def register_pass(name: str, config_cls: type, *, plan, finalize=None, selects=None, fix_hint: str = "milder settings",
                  test_options: dict | None = None, test_model: str = "mlp", latency_driven: bool = False):
    """Decorator on a pass's ``apply(model, plan, cfg, ctx) -> PassResult``: register it under ``name`` with its
    config class, its ``plan`` and, where its modules need a deployable form, its ``finalize``; with what to try
    when it costs too much fidelity (``fix_hint``) and how the pass contract test runs it (``test_options``,
    ``test_model``: ``"mlp"`` or ``"vit"``) and whether it is ``latency_driven`` (prices its steps on the device's
    latency model)."""
    if test_model not in ("mlp", "vit"):
        raise ValueError(f"pass {name!r}: test_model is 'mlp' or 'vit', not {test_model!r}")

    def add(apply):
        PASSES.add(name, RegisteredPass(name, config_cls, plan, apply, finalize, selects, fix_hint,
                                        dict(test_options or {}), test_model, latency_driven))
        return apply

    return add


def run_pass(name: str, model, cfg, ctx: PassContext) -> PassResult:
    """Run the registered pass ``name`` (plan, then apply) on ``model``."""
    return PASSES.get(name).fn(model, cfg, ctx)


def finalize(model):
    """Every registered pass's modules in their deployable form, in place (returns the model).

    E.g. a DenseSparseLinear becomes two plain linears, a LowRankLinear's bottleneck is rotated so that int8
    downstream has no outlier channel to lose precision to.
    """
    for name in PASSES.names():
        step = PASSES.get(name).finalize
        if step is not None:
            model = step(model)
    return model


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


def _read_recipe(path: str | Path) -> dict:
    data = read_toml(path, "recipe", {"pass", "quant"}, "give a TOML file with [[pass]] tables",
                     where=f"--recipe {path}")
    has_passes = isinstance(data.get("pass"), list)
    if not (has_passes or isinstance(data.get("quant"), dict)) or ("pass" in data and not has_passes):
        raise UsageError(f"--recipe {path}", "expects [[pass]] tables (and an optional [quant] table) only",
                         "write [[pass]] name = \"lowrank\" rank_ratio = 0.5")
    return data


def load_recipe(path: str | Path) -> list[PassSpec]:
    """A TOML recipe's passes: ``[[pass]]`` tables, each with ``name`` and the pass's options, run in order."""
    data = _read_recipe(path)
    specs = []
    for i, table in enumerate(data.get("pass", [])):
        table = dict(table)
        name = table.pop("name", None)
        if not name:
            raise UsageError(f"--recipe {path}", f"pass #{i + 1} has no name", "add name = \"lowrank\"")
        entry = PASSES.get(name)
        specs.append(PassSpec(entry.name, config_from_dict(entry.config_cls, table, f"--recipe {path} pass {name}")))
    return specs


def load_recipe_quant(path: str | Path) -> dict:
    """A TOML recipe's ``[quant]`` table (the options of ``quant.QuantConfig``), empty when it has none."""
    return dict(_read_recipe(path).get("quant", {}))


def recipe_text(specs: list[PassSpec], quant: dict | None = None) -> str:
    """The TOML recipe that reproduces ``specs`` (configs round-trip; written by tomli-w), and ``quant``'s
    ``[quant]`` table when given.

    Example:
        >>> import slimx.slim
        >>> print(recipe_text([parse_pass("lowrank:rank_ratio=0.25,exclude=attention")]).splitlines()[3:5])
        ['name = "lowrank"', 'rank_ratio = 0.25']
    """
    import tomli_w

    tables = []
    for spec in specs:
        table = {"name": spec.name}
        for key, value in dataclasses.asdict(spec.config).items():
            if value is not None:
                table[key] = list(value) if isinstance(value, tuple) else value
        tables.append(table)
    data: dict = {"version": CONFIG_VERSION, "pass": tables}
    if quant:
        data["quant"] = {k: list(v) if isinstance(v, tuple) else v for k, v in quant.items() if v is not None}
    return tomli_w.dumps(data)


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

    def __post_init__(self) -> None:
        for key in ("include", "exclude"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"{key}={pattern}", f"is not a regular expression ({exc})",
                                     f"fix the pattern, e.g. {key}=attention|pooler or {key}=layer\\.[0-3]\\.") \
                        from None

    def selects(self, path: str, module) -> bool:
        if any(re.search(p, path) for p in self.include):
            return True
        if any(re.search(p, path) for p in self.exclude):
            return False
        if self.types:
            return type(module).__name__ in self.types
        return self.default
