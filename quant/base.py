"""Quantization as a stage with a config: ``quantize(format, subject, QuantConfig, QuantContext)``.

The config says what to do, as data (precision, scheme, symmetry, per-channel, the accuracy guard's target
and rounds, layers kept float); a recipe's ``[quant]`` table sets it and the report records it. Handlers are
registered per (format, scheme) with the precision they produce; runtime objects (calibration batches, the
float model, the runner that scores a quantized artifact) come in the context, from the target that calls.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimx._core.errors import UsageError
from slimx._core.registry import Registry

PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    Attributes:
        precision: fp32, fp16, int8 (weights and activations) or int8-weights (weights only).
        scheme: a scheme registered for the format and precision (``slimx.quant.schemes(format)``); None: the
            format's default for the precision.
        symmetric: symmetric activations; None: the scheme's default (TensorRT and LiteRT PT2E: symmetric;
            onnxruntime's CPU kernels: asymmetric uint8).
        per_channel: per-channel weight scales.
        per_channel_below_db: onnx dynamic int8: only weights whose per-tensor int8 SQNR is below this many dB
            get per-channel scales (onnxruntime's per-channel dynamic kernels cost about 5% on MiniLM, and 8 of
            its 18 weights, 8-26 dB per tensor, need them); None: per-channel everywhere.
        reduce_range: 7-bit weights (onnxruntime on CPUs without VNNI); None: the scheme's default.
        weight_type: onnx dynamic int8: ``int8`` or ``uint8`` weights; None: chosen with ``reduce_range`` by
            measured error among the candidates for the CPU kind (``quant.onnx.weight_candidates``).
        cpu_kind: onnx dynamic int8: ``vnni`` or ``avx2`` (x86 without VNNI) to choose the candidates for; None:
            this CPU's kind. Forcing ``avx2`` on a VNNI host runs the non-VNNI path's choice.
        target_cosine: the accuracy guard keeps layers float until the quantized model reaches this cosine
            to the float one on the calibration data.
        guard_rounds, guard_step: at most this many guard rounds, each keeping this many more layers float.
        keep_float: module-path regexes that always stay float.
    """

    precision: str = "fp32"
    scheme: str | None = None
    symmetric: bool | None = None
    per_channel: bool = True
    per_channel_below_db: float | None = 30.0
    reduce_range: bool | None = None
    weight_type: str | None = None
    cpu_kind: str | None = None
    target_cosine: float = 0.98
    guard_rounds: int = 4
    guard_step: int = 2
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.weight_type not in (None, "int8", "uint8"):
            raise ValueError(f"weight_type must be int8 or uint8, not {self.weight_type!r}")
        if self.cpu_kind not in (None, "vnni", "avx2"):
            raise ValueError(f"cpu_kind must be vnni or avx2, not {self.cpu_kind!r}")
        if not 0.0 < self.target_cosine <= 1.0:
            raise ValueError(f"target_cosine must be in (0, 1], got {self.target_cosine}")
        if self.guard_rounds < 0 or self.guard_step < 1:
            raise ValueError("guard_rounds must be 0 or more and guard_step at least 1")
        for pattern in self.keep_float:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"keep_float {pattern!r} is not a regular expression ({exc})") from None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def kept_by_user(self, module) -> list[str]:
        """Paths of the modules of ``module`` that ``keep_float`` names (linear and conv layers)."""
        if not self.keep_float or module is None:
            return []
        import torch

        return [path for path, mod in module.named_modules()
                if isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
                and any(re.search(p, path) for p in self.keep_float)]


@dataclass
class QuantContext:
    """Runtime objects a quantizer may use (never config fields).

    Attributes:
        batches: calibration inputs (tuples of tensors), for int8.
        module: the float PyTorch model: the guard's reference and where layer sensitivity is measured.
        input_names: the model's input names, in call order.
        score_runner: makes the runner that scores a quantized artifact (the target passes its own).
        options: the format's own options (e.g. CoreML's palettization).
        example_kwargs: one example input by name (converters that trace with keywords).
        dynamic_shapes: torch.export ``dynamic_shapes`` for a capture with ``example_kwargs`` (a bucketed
            artifact is traced again at each bucket, so the capture must keep the sequence axis symbolic).
    """

    batches: list[tuple] | None = None
    module: Any = None
    input_names: list[str] = field(default_factory=list)
    score_runner: Callable[[], Any] | None = None
    options: Any = None
    example_kwargs: dict | None = None
    dynamic_shapes: Any = None
    specs: list | None = None  # the model's InputSpecs: fresh inputs for measuring a candidate's error


@dataclass(frozen=True)
class Quantizer:
    format: str
    scheme: str
    precision: str
    fn: Callable
    default: bool = True


QUANTIZERS: Registry[Quantizer] = Registry("quantization scheme")


def register_quantizer(fmt: str, scheme: str, precision: str, *, default: bool = True):
    """Decorator: ``fn(subject, cfg, ctx) -> (subject, record)`` quantizes ``fmt``'s subject (a file, a module or
    a converted model, as the format works) to ``precision`` by ``scheme``."""

    def add(fn):
        QUANTIZERS.add(f"{fmt}:{scheme}", Quantizer(fmt, scheme, precision, fn, default))
        return fn

    return add


def schemes(fmt: str, precision: str | None = None) -> list[Quantizer]:
    """The quantizers registered for a format (and precision)."""
    return [q for q in (QUANTIZERS.get(n) for n in QUANTIZERS.names())
            if q.format == fmt and (precision is None or q.precision == precision)]


def quantizer_for(fmt: str, cfg: QuantConfig) -> Quantizer:
    """The handler ``cfg`` asks for on ``fmt``: its scheme, or the format's default for the precision."""
    found = schemes(fmt, cfg.precision)
    if cfg.scheme is not None:
        found = [q for q in found if q.scheme == cfg.scheme]
        if not found:
            names = ", ".join(q.scheme for q in schemes(fmt, cfg.precision)) or "none"
            raise UsageError(f"quantization scheme {cfg.scheme!r}", f"is not a {cfg.precision} scheme of {fmt}",
                             f"use one of: {names}")
        return found[0]
    defaults = [q for q in found if q.default] or found
    if not defaults:
        raise UsageError(f"--precision {cfg.precision}", f"{fmt} has no quantizer for it", "pick another precision")
    return defaults[0]


def quantize(fmt: str, subject, cfg: QuantConfig, ctx: QuantContext | None = None):
    """Quantize ``subject`` for format ``fmt`` as ``cfg`` says; returns ``(subject, record)``, the record carrying
    the config and scheme as data.

    Example:
        >>> import slimx.quant
        >>> quantizer_for("onnx", QuantConfig(precision="int8-weights")).scheme
        'dynamic'
    """
    handler = quantizer_for(fmt, cfg)
    subject, record = handler.fn(subject, cfg, ctx or QuantContext())
    record["scheme"] = handler.scheme
    record["config"] = cfg.to_dict()
    return subject, record


def require_symmetric_calibrated(cfg: QuantConfig, ctx: QuantContext, symmetric_why: str) -> None:
    """Refuse an int8 config a symmetric, calibrated scheme cannot build: ``symmetric = false`` (``symmetric_why``
    says whose quantization is symmetric), or no calibration batches."""
    if cfg.symmetric is False:
        raise UsageError("quant symmetric = false", symmetric_why, "drop symmetric, or set it true")
    if not ctx.batches:
        raise UsageError("--precision int8", "needs calibration data", "give --calib")


def innermost_module(node) -> str | None:
    """The path of the innermost module a traced graph node came from (``nn_module_stack``), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def first_output(out):
    """The first output of a PyTorch call (a tensor, or the first of a tuple/list) as a float numpy array."""
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().float().numpy()
