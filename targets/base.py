"""The protocol every target shares: what it writes (suffixes, typed options), check, compile, and its runners.

A format's knowledge lives in its target: the file suffixes of its artifacts, how to recognise, verify and
read one, its options as a strict dataclass, the runners that run it and which is the default, and (where
its own runtime is missing here) a proxy that gives evidence about the artifact. The runners, the device
agent, ``slimx profile`` and the pipeline loop over the registry; adding a target is one file in
``targets/`` (or a plugin module named in ``SLIMX_PLUGINS``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slimx._core.errors import UsageError
from slimx._core.inputs import to_numpy_inputs  # noqa: F401  (re-exported: runners import it from here)
from slimx._core.registry import Registry


@dataclass(frozen=True)
class NoOptions:
    """A format without options of its own."""


@dataclass(frozen=True)
class CompileOptions:
    """Options every target understands, plus the target's own (an instance of its ``options_cls``).

    ``quant``: how to quantize (``quant.QuantConfig``); None: the defaults for ``precision``.
    ``buckets``: sequence lengths to build one fixed shape each for (a target with ``buckets``: TFLite
    signatures, CoreML enumerated shapes, TensorRT optimisation profiles); empty: none.
    """

    precision: str = "fp32"
    opset: int = 18
    format_options: Any = field(default_factory=NoOptions)
    quant: Any = None
    buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.quant is not None and self.quant.precision != self.precision:
            raise ValueError(f"quant precision {self.quant.precision} differs from precision {self.precision}")

    def quant_config(self):
        """The quantization config (``quant`` or the defaults for ``precision``)."""
        from slimx.quant import QuantConfig

        return self.quant if self.quant is not None else QuantConfig(precision=self.precision)


@dataclass(frozen=True)
class RunnerInfo:
    """A runner a target declares: its name, the estimator setting its host measurements calibrate, how to
    tell whether it can run here, and how to make one."""

    name: str
    format: str  # the artifact format it runs ("torch": the Program itself)
    setting: str
    description: str
    missing: Callable[[], str | None] = lambda: None  # None when it can run on this host, else why not
    make: Callable[..., Any] | None = None  # make(threads=None) -> Runner


@dataclass
class Coverage:
    """Which ops of a program a format/device supports, falls back on, or cannot express."""

    target: str
    supported: dict[str, int] = field(default_factory=dict)
    fallback: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, op: str, module_path: str | None = None) -> None:
        """Count one node of ``op`` as supported, fallback or unsupported (and where it came from)."""
        table = getattr(self, kind)
        table[op] = table.get(op, 0) + 1
        if kind != "supported" and module_path and op not in self.where:
            self.where[op] = module_path

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "supported": self.supported,
                "fallback": self.fallback, "unsupported": self.unsupported, "where": self.where, "notes": self.notes}


@dataclass
class Artifact:
    """A compiled model on disk: a file (``.onnx``, ``.tflite``, ``.plan``) or a folder (``.mlpackage``)."""

    format: str
    path: Path
    inputs: list
    output_names: list[str]
    meta: dict = field(default_factory=dict)
    extra_files: list[tuple[str, Path]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size

    def save(self, path: str | Path) -> Path:
        """Copy the artifact to ``path`` and return it."""
        path = Path(path)
        if self.path.is_dir():
            shutil.copytree(self.path, path, dirs_exist_ok=True)
        else:
            shutil.copyfile(self.path, path)
        return path

    def files(self) -> list[dict]:
        """Every file this artifact consists of: {format, path (name in OUT), bytes}."""
        out = [{"format": self.format, "path": self.path.name, "bytes": self.bytes}]
        for kind, path in self.extra_files:
            if path.exists():
                out.append({"format": kind, "path": path.name, "bytes": path.stat().st_size})
        return out


@dataclass
class Timing:
    """A latency distribution from one runner, in milliseconds."""

    runtime: str
    runtime_version: str
    warmup: int
    runs: int
    threads: int | None
    min_ms: float
    median_ms: float
    p90_ms: float
    max_ms: float
    mean_ms: float
    per_op: list[dict] = field(default_factory=list)
    per_node: list[dict] = field(default_factory=list)
    p10_ms: float | None = None  # None: from an agent older than these fields
    median_ci_ms: list[float] | None = None  # a 95% bootstrap interval of the median
    load: float | None = None  # the share of the host's CPU other processes used while it was timed (Linux)
    trust: str | None = None  # a line when the figure should not be trusted as it stands (spread, load)

    @classmethod
    def from_samples(cls, samples_ms: list[float], load: float | None = None, **kw) -> Timing:
        arr = np.asarray(samples_ms, dtype=np.float64)
        median = float(np.median(arr))
        boot = np.median(np.random.default_rng(0).choice(arr, size=(1000, len(arr))), axis=1)
        lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
        p10, p90 = float(np.percentile(arr, 10)), float(np.percentile(arr, 90))
        return cls(min_ms=float(arr.min()), median_ms=median, p90_ms=p90, max_ms=float(arr.max()),
                   mean_ms=float(arr.mean()), runs=len(samples_ms), p10_ms=p10, median_ci_ms=[lo, hi], load=load,
                   trust=trust_note(median, p10, p90, lo, hi, load), **kw)

    @classmethod
    def measure(cls, call: Callable[[], Any], warmup: int, runs: int, *, call_times_itself: bool = False,
                **fields) -> Timing:
        """Time ``call`` with the one shared loop (``timed_calls``) and describe the samples."""
        probe = OtherLoad()
        samples = timed_calls(call, warmup, runs, call_times_itself=call_times_itself)
        return cls.from_samples(samples, warmup=warmup, load=probe.share(), **fields)

    def to_dict(self) -> dict:
        def rounded(v):
            return round(v, 4) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) and v and \
                isinstance(v[0], float) else v

        return {k: rounded(v) for k, v in self.__dict__.items()}


WIDE_SPREAD = 1.5  # p90 over p10 past this: the runs disagree too much for one figure
LOADED = 0.25  # other processes using more than this share of the host's CPU while it was timed


class OtherLoad:
    """The share of the host's CPU that processes other than this one used between its creation and ``share()``
    (Linux: ``/proc/stat`` less ``/proc/self/stat``; None elsewhere). Unlike the load average, the timing's own
    threads do not count."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read():
        import os

        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:9]]
            with open("/proc/self/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return time.monotonic(), sum(values) - values[3] - values[4], int(fields[11]) + int(fields[12]), \
                os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[0] - self.start[0] < 0.2:
            return None  # too short to say (the kernel counts in ticks of 10 ms)
        wall, busy, own = end[0] - self.start[0], end[1] - self.start[1], end[2] - self.start[2]
        return round(min(1.0, max(0.0, (busy - own) / (wall * end[3] * end[4]))), 3)


def trust_note(median: float, p10: float, p90: float, lo: float, hi: float, load: float | None) -> str | None:
    """One line saying why a measured latency should not be taken as it stands, or None.

    Example:
        >>> trust_note(10.0, 9.5, 10.5, 9.8, 10.2, 0.1) is None
        True
        >>> trust_note(79.0, 40.0, 118.0, 60.0, 95.0, 0.6).startswith("spread wide")
        True
    """
    why = []
    if p10 > 0 and p90 / p10 > WIDE_SPREAD:
        why.append(f"spread wide (p10 {p10:.3g} to p90 {p90:.3g} ms)")
    if median > 0 and (hi - lo) / median > 0.1:
        why.append(f"median uncertain ({lo:.3g}-{hi:.3g} ms, 95%)")
    if load is not None and load > LOADED:
        why.append(f"host busy with other work ({load:.0%} of its CPU)")
    if not why:
        return None
    return "; ".join(why) + ": compare only with figures timed in the same run, or re-measure on an idle host"


class Runner(Protocol):
    """Runs an artifact in its runtime on this host (local runners and the agent's client alike)."""

    name: str
    threads: int | None

    def session(self, path: Path) -> Any: ...

    def run(self, artifact: Artifact, inputs: tuple, session: Any = None) -> list[np.ndarray]: ...

    def time(self, artifact: Artifact, inputs: tuple, warmup: int, runs: int) -> Timing: ...


def timed_calls(call: Callable[[], Any], warmup: int, runs: int, *, call_times_itself: bool = False) -> list[float]:
    """Milliseconds of ``runs`` calls after ``warmup`` untimed ones: the one timing loop every runner uses.

    ``call_times_itself``: ``call`` returns its own time in ms (a GPU runner timing with device events).

    Example:
        >>> len(timed_calls(lambda: None, warmup=2, runs=5))
        5
    """
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        if call_times_itself:
            samples.append(float(call()))
            continue
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


class Target:
    """Base class of a backend. Subclasses set ``name``, ``suffixes``, their runners, and implement the methods.

    Attributes:
        suffixes: file (or package folder) suffixes of this format's artifacts; the first is what compile writes.
        options_cls: a frozen dataclass of the format's own options (strict: unknown keys are refused).
        runners: the runners of this format; ``default_runner`` names the one that runs it by default.
        builds_on_device_from: a format the device builds this one from (TensorRT engines from ONNX), if any.
        model_form_suffixes: suffixes that are also a MODEL form (``.onnx``): not taken as an artifact to profile.
        dynamic_shapes: whether the format keeps dynamic axes (``static_reason`` says why not).
        buckets: whether it builds a dynamic sequence axis as a set of fixed lengths (``--buckets``);
            ``default_buckets``: whether it does so by default (else only when asked), ``buckets_reason`` why.
        writes_onnx: whether the format is written through an ONNX file, whose opset ``--opset`` sets.
        fp16_policy: how the format's fp16 artifact computes, for the pre-flight's predicted parity
            (``export.preflight.FP16_POLICIES`` has the keys); None: that table's entry for the format.
        estimates_from: ``(format, note)``: a device with no estimator setting of this format's own is estimated
            with its setting of ``format`` (the same kernels underneath), and the estimate carries ``note``, which
            says how far that transfer is known to hold; None: the device's default setting, as for any format.
    """

    name = ""
    suffixes: tuple[str, ...] = ()
    options_cls: type = NoOptions
    runners: tuple[RunnerInfo, ...] = ()
    default_runner: str | None = None
    builds_on_device_from: str | None = None
    model_form_suffixes: tuple[str, ...] = ()
    dynamic_shapes = False  # True: compiles dynamic axes (else the model is exported at its static shape)
    static_reason = "this format is built with static shapes here"
    buckets = False
    default_buckets = True
    buckets_reason = ""
    default_precision = "fp32"
    needs_torch = False  # True: converts from the PyTorch program, so an ONNX input cannot be used
    writes_onnx = False
    estimates_from: tuple[str, str] | None = None
    fp16_policy: dict | None = None
    available = True
    unavailable_reason = ""

    @property
    def extension(self) -> str:
        return self.suffixes[0]

    def recognises(self, path: str | Path) -> bool:
        """Whether ``path`` names an artifact of this format (by its suffix)."""
        return Path(path).suffix.lower() in self.suffixes

    def verify_file(self, path: Path) -> str | None:
        """Why ``path`` is not a well-formed artifact of this format (a cheap look before a runtime parses it),
        or None when it looks right."""
        return None

    def read_inputs(self, path: Path) -> list | None:
        """Input specs read from an artifact itself (to time a file that came without its model), or None."""
        return None

    def options(self, values: dict, where: str = "format options"):
        """The format's typed options from ``values`` (flag or recipe values); unknown keys are a usage error."""
        import dataclasses

        from slimx._core.config import config_from_dict

        known = {f.name for f in dataclasses.fields(self.options_cls)}
        unknown = {k: v for k, v in values.items() if k not in known}
        if unknown:
            flags = (f"--{'no-' if v is False else ''}{k.replace('_', '-')}" for k, v in unknown.items())
            takes = f" ({self.name}'s own: {', '.join(sorted(known))})" if known else ""
            raise UsageError(", ".join(flags), f"the {self.name} format takes no such option",
                             f"drop it, or pick the format it is for{takes}")
        return config_from_dict(self.options_cls, {k: v for k, v in values.items() if v is not None},
                                f"{where} ({self.name})")

    def checked_opset(self, opset: int | None) -> int:
        """The ONNX opset to write: ``opset`` where the format goes through ONNX and the installed onnx knows it
        (the exporter's own limits are checked on the written file), else a usage error; None: the default."""
        import onnx

        from slimx.export.program import DEFAULT_OPSET

        if opset is None:
            return DEFAULT_OPSET
        if not self.writes_onnx:
            raise UsageError(f"--opset {opset}", f"the {self.name} format is not written through ONNX",
                             "drop --opset (it applies to the formats written through ONNX: "
                             f"{', '.join(t.name for t in all_targets() if t.writes_onnx)})")
        newest = onnx.defs.onnx_opset_version()
        if not 7 <= opset <= newest:
            raise UsageError(f"--opset {opset}", f"is outside the opsets onnx {onnx.__version__} knows (7..{newest})",
                             f"give one in 7..{newest}; {DEFAULT_OPSET} is the default")
        return opset

    def check(self, program) -> Coverage:
        raise NotImplementedError

    def validate(self, device, options: CompileOptions) -> None:
        """Refuse (UsageError) a precision/option combination this target cannot build, before any work."""

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        """Write the artifact into ``out_dir``; ``calib_batches`` are representative inputs for int8."""
        raise NotImplementedError

    def runner(self, threads: int | None = None) -> Runner | None:
        """The default runner when it can run here, else None (``runner_missing_reason`` says why)."""
        info = self.runner_info(self.default_runner) if self.default_runner else None
        if info is None or info.make is None or info.missing() is not None:
            return None
        return info.make(threads=threads)

    def runner_info(self, name: str) -> RunnerInfo | None:
        return next((r for r in self.runners if r.name == name), None)

    def runner_missing_reason(self) -> str:
        info = self.runner_info(self.default_runner) if self.default_runner else None
        return (info.missing() if info is not None else None) or f"no {self.name} runtime on this host"

    def build_on_device(self, source: Path, work: Path, precision: str) -> tuple[Path, dict]:
        """Build this format's artifact from a ``builds_on_device_from`` file, on the device (the agent's
        ``/v1/build``); returns the artifact's path and a record of the build."""
        raise NotImplementedError(f"the {self.name} format is not built on the device")

    def proxy(self, artifact: Artifact, threads: int | None = None):
        """``(path, runner, what)``: another file of the artifact that a runner here can check in place of the
        artifact itself (TensorRT's ONNX in onnxruntime), or None."""
        return None


TARGETS: Registry[Target] = Registry("format")


def register_target(cls):
    """Class decorator: register one instance of a Target subclass under its name."""
    TARGETS.add(cls.name, cls())
    return cls


def get_target(name: str) -> Target:
    target = TARGETS.get(name)
    if not target.available:
        raise UsageError(f"format {target.name}", target.unavailable_reason,
                         f"use one of {', '.join(available_formats())}")
    return target


def available_formats() -> list[str]:
    return [n for n in TARGETS.names() if TARGETS.get(n).available]


def all_targets() -> list[Target]:
    return [TARGETS.get(n) for n in TARGETS.names()]


@dataclass(frozen=True)
class OptionFlag:
    """One ``slimx export`` flag generated from a field of a target's options class.

    A field's ``metadata`` may carry ``help`` (of the flag), ``metavar`` and ``choices``; its type (``int |
    None``, ``str | None``, ``bool``...) gives the flag's. A bool field that defaults to True becomes
    ``--no-NAME`` (it sets the field to False), one that defaults to False becomes ``--NAME``. Fields of the
    same name in several targets share one flag (they must agree on its type).
    """

    dest: str  # the argparse dest and flags-dict key: the field's name, or no_NAME for a bool defaulting to True
    option: str  # the field it sets
    kind: type  # int, float, str or bool
    default: Any
    help: str
    metavar: str | None
    choices: tuple | None
    formats: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def option_value(self, flag_value):
        """The field's value for a flag value (a store-true flag given: the field's non-default)."""
        if self.kind is bool:
            return (not self.default) if flag_value else self.default
        return flag_value


def _flag_kind(hint) -> type:
    import types
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint in (int, float, str, bool):
        return hint
    raise TypeError(f"an option's type must be int, float, str or bool (or one of them | None), not {hint}")


def option_flags() -> list[OptionFlag]:
    """Every format option of every registered target as a ``slimx export`` flag, in registry order."""
    import dataclasses
    import typing

    flags: dict[str, OptionFlag] = {}
    for target in all_targets():
        if not dataclasses.is_dataclass(target.options_cls):
            continue
        hints = typing.get_type_hints(target.options_cls)
        for f in dataclasses.fields(target.options_cls):
            kind = _flag_kind(hints[f.name])
            dest = f"no_{f.name}" if kind is bool and f.default is True else f.name
            meta = f.metadata
            known = flags.get(dest)
            if known is not None:
                if known.kind is not kind:
                    raise TypeError(f"format option {f.name}: {known.formats[0]} declares it {known.kind.__name__}, "
                                    f"{target.name} {kind.__name__}; one flag cannot be both")
                flags[dest] = dataclasses.replace(known, formats=(*known.formats, target.name))
                continue
            choices = tuple(meta["choices"]) if meta.get("choices") else None
            flags[dest] = OptionFlag(dest, f.name, kind, f.default, meta.get("help", ""), meta.get("metavar"),
                                     choices, (target.name,))
    return list(flags.values())


def option_flag_values(values: dict) -> dict:
    """Format option values by field name (``{"fuse": False, "dla_core": 0}``) as the flags that give them
    (``{"no_fuse": True, "dla_core": 0}``); defaults and Nones are left out."""
    by_option = {}
    for of in option_flags():
        by_option.setdefault(of.option, of)
    out = {}
    for name, value in values.items():
        of = by_option.get(name)
        if of is None:
            out[name] = value  # an option no target declares: the chosen target refuses it, naming it
        elif of.kind is bool:
            if value != of.default:
                out[of.dest] = True
        elif value is not None:
            out[of.dest] = value
    return out


def target_for_path(path: str | Path) -> Target | None:
    """The target whose artifacts carry ``path``'s suffix, or None.

    Example:
        >>> target_for_path("model.tflite").name
        'tflite'
    """
    return next((t for t in all_targets() if t.recognises(path)), None)


def artifact_suffixes(include_model_forms: bool = True) -> tuple[str, ...]:
    """Every suffix an artifact of a registered format may have (``.onnx`` is also a MODEL form)."""
    out = []
    for target in all_targets():
        out += [s for s in target.suffixes if include_model_forms or s not in target.model_form_suffixes]
    return tuple(dict.fromkeys(out))


def load_plugins() -> list[str]:
    """Import the modules named in ``SLIMX_PLUGINS`` (comma-separated): a target registered outside this
    package (in a test, or a user's own format) is then known to every process, the agent's jobs included."""
    loaded = []
    for name in filter(None, (n.strip() for n in os.environ.get("SLIMX_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"SLIMX_PLUGINS {name}", f"cannot be imported ({exc})",
                             "fix the module name or unset SLIMX_PLUGINS") from exc
        loaded.append(name)
    return loaded
