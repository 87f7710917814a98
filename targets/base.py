"""The protocol every target shares: check, compile, and a runner where the runtime exists."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from slimx._core.errors import UsageError
from slimx._core.registry import Registry


@dataclass(frozen=True)
class CompileOptions:
    """Options every target understands; target-specific ones go in ``extra``."""

    precision: str = "fp32"
    opset: int = 18
    extra: dict = field(default_factory=dict)


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

    @classmethod
    def from_samples(cls, samples_ms: list[float], **kw) -> Timing:
        arr = np.asarray(samples_ms, dtype=np.float64)
        return cls(min_ms=float(arr.min()), median_ms=float(np.median(arr)),
                   p90_ms=float(np.percentile(arr, 90)), max_ms=float(arr.max()), mean_ms=float(arr.mean()),
                   runs=len(samples_ms), **kw)

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class Runner(Protocol):
    """Runs an artifact in its runtime on this host."""

    name: str

    def run(self, artifact: Artifact, inputs: tuple) -> list[np.ndarray]: ...

    def time(self, artifact: Artifact, inputs: tuple, warmup: int, runs: int) -> Timing: ...


class Target:
    """Base class of a backend. Subclasses set ``name``, ``extension`` and implement the methods."""

    name = ""
    extension = ""
    default_precision = "fp32"
    needs_torch = False  # True: converts from the PyTorch program, so an ONNX input cannot be used
    available = True
    unavailable_reason = ""

    def check(self, program) -> Coverage:
        raise NotImplementedError

    def validate(self, device, options: CompileOptions) -> None:
        """Refuse (UsageError) a precision/option combination this target cannot build, before any work."""

    def compile(self, program, device, options: CompileOptions, out_dir: Path, calib_batches=None) -> Artifact:
        """Write the artifact into ``out_dir``; ``calib_batches`` are representative inputs for int8."""
        raise NotImplementedError

    def runner(self) -> Runner | None:
        return None

    def runner_missing_reason(self) -> str:
        return f"no {self.name} runtime on this host"


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


def to_numpy_inputs(inputs: tuple) -> list[np.ndarray]:
    """Torch tensors (or arrays) -> contiguous numpy arrays."""
    out = []
    for value in inputs:
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out.append(np.ascontiguousarray(value))
    return out
