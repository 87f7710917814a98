"""slimx's Python API: ``export``, ``compress``, ``profile``, ``evaluate`` and ``gate``, with typed results.

Each takes live objects (an ``nn.Module`` with example inputs, typed config objects) as well as the CLI's strings,
raises the ``SlimxError`` family (``UsageError`` for a request that cannot be, ``SlimxFailure`` for work that
failed), never exits, and prints nothing unless given a ``progress`` (a ``slimx.Progress``) or ``verbose=True``.
``slimx export``, ``eval``, ``profile`` and ``gate`` are thin clients of these functions; ``slimx sweep``'s trials call
``export`` and ``evaluate`` in their Ray workers.

Example:
    >>> import slimx, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU())
    >>> result = slimx.export(net, "host", example_inputs=(torch.randn(1, 16),), out=tmp)  # doctest: +SKIP
    >>> result.passed, result.latency.kind  # doctest: +SKIP
    (True, 'measured')
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimx._core.errors import SlimxError, UsageError
from slimx._core.progress import Progress

__all__ = ["Compression", "EvalResult", "ExportResult", "Fidelity", "GateResult", "Latency", "Parity",
           "ProfileResult", "compress", "evaluate", "export", "gate", "profile"]


# --------------------------------------------------------------------------- typed results


@dataclass(frozen=True)
class Parity:
    """The artifact against PyTorch on fresh inputs (and calibration data), in the artifact's own runtime.

    ``measured`` is False where the runtime cannot run here (``reason`` says why); ``predicted`` then holds a
    proxy's figures where the target has one (TensorRT's ONNX in onnxruntime).
    """

    measured: bool
    passed: bool | None
    cosine: float | None = None
    rel_err: float | None = None
    runtime: str | None = None
    reason: str = ""
    proxy: dict | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Parity:
        proxy = data.get("proxy")
        passed = data.get("passed") if data.get("measured") else (proxy or {}).get("passed")
        return cls(bool(data.get("measured")), passed, data.get("cosine"), data.get("rel_err"),
                   data.get("runtime"), data.get("reason", ""), proxy)


@dataclass(frozen=True)
class Fidelity:
    """Held-out fidelity of the compressed model to the original (cosine; accuracy with labels), gated."""

    cosine: float
    passed: bool
    floor: float
    metric: str
    gated: bool = True
    accuracy: float | None = None
    lost_most: dict | None = None

    @classmethod
    def from_record(cls, record: dict | None) -> Fidelity | None:
        if not record or "gate" not in record:
            return None
        gate, final = record["gate"], record["fidelity"]["final"]
        return cls(final["cosine_mean"], bool(gate["passed"]), gate["floor"], gate["metric"], gate.get("gated", True),
                   final.get("accuracy"), gate.get("lost_most"))


@dataclass(frozen=True)
class Latency:
    """Latency on the device: ``kind`` is ``measured``, ``estimated`` (per op, with its 80% interval) or ``none``
    (``reason`` says why). ``ms`` is the median (measured) or the estimate."""

    device: str
    kind: str
    ms: float | None
    interval_ms: tuple[float, float] | None = None
    p90_ms: float | None = None
    reason: str = ""
    details: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict | None) -> Latency | None:
        if data is None:
            return None
        from slimx.devices.records import Latency as Record

        rec = Record.from_dict(data)
        interval = rec.details.get("interval_ms")
        if rec.kind == "measured":
            interval = (rec.details.get("p10_ms") or rec.details.get("min_ms"), rec.details.get("p90_ms"))
            interval = interval if None not in interval else None
        return cls(rec.device, rec.kind, rec.ms, tuple(interval) if interval else None, rec.details.get("p90_ms"),
                   rec.reason, dict(rec.details))

    def line(self) -> str:
        from slimx.devices.records import Latency as Record

        return Record.from_dict(self.to_dict()).line()

    def to_dict(self) -> dict:
        if self.kind == "none":
            return {"device": self.device, "measured": False, "reason": self.reason}
        return {"device": self.device, "kind": self.kind, "measured": self.kind == "measured", **self.details}


@dataclass(frozen=True)
class Report:
    """``report.json`` as an object: ``to_dict()`` is the file's content (schema 1.0, unchanged)."""

    data: dict = field(repr=False)

    @property
    def schema_version(self) -> str:
        return self.data["schema_version"]

    def to_dict(self) -> dict:
        return self.data

    def summary(self) -> str:
        """The terminal summary ``slimx export`` prints."""
        from slimx.report import summary

        return summary(self.data)


@dataclass
class ExportResult:
    """What ``slimx.export`` made and proved.

    Attributes:
        out: the output folder (``report.json``, ``report.html`` and the artifacts).
        artifacts: the artifact files (the first is the one deployed).
        format, precision, device: what was built, for which device.
        parity: the artifact against PyTorch in its runtime (``Parity``).
        fidelity: after compression passes, held-out fidelity to the original (``Fidelity``), else None.
        latency: on the device, measured or estimated with its interval (``Latency``); ``host_latency``: measured
            here when the device is another.
        shapes: the shape form built (dynamic axes, buckets) and why.
        speedup: after passes, the measured speed-up over the uncompressed model compiled the same way.
        passed: parity and fidelity both passed (or could not be measured).
        failures: the failed verdicts as the errors the CLI exits with; ``raise_for_failures()`` raises the first.
        report: ``report.json`` as an object (``report.to_dict()``).
        module: the PyTorch module that was compiled (compressed, in deployment form).
        warnings: what slimx warned about during the run.
    """

    out: Path
    artifacts: list[Path]
    format: str
    precision: str
    device: str
    parity: Parity
    fidelity: Fidelity | None
    latency: Latency
    host_latency: Latency | None
    shapes: dict
    speedup: float | None
    passed: bool
    failures: list[SlimxError]
    report: Report
    module: Any = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def artifact(self) -> Path:
        return self.artifacts[0]

    def raise_for_failures(self) -> ExportResult:
        """Raise the first failed verdict (``SlimxFailure``); return self when all passed."""
        if self.failures:
            raise self.failures[0]
        return self

    def summary(self) -> str:
        return self.report.summary()

    def card(self, path: str | Path | None = None) -> Path:
        """Write the model card (``README.md`` with Hugging Face metadata) of this export; returns its path."""
        from slimx.card import write_card

        return write_card(self.out, path)

    def track(self, to: str = "mlflow") -> dict:
        """Log this export as an MLflow run (``to``: ``mlflow`` for ./mlruns, or ``mlflow:URI``); returns the run's
        record (store, experiment, run id)."""
        from slimx.tracking import log_export, parse_track

        return log_export(parse_track(to), self.report.to_dict(), self.out)


@dataclass(frozen=True)
class Compression:
    """What ``slimx.compress`` did: each pass's record, the held-out fidelity after them, and the model's inputs."""

    passes: list[dict]
    fidelity: Fidelity | None
    record: dict = field(repr=False)
    inputs: list = field(default_factory=list, repr=False)

    def __iter__(self):  # ``module, records = slimx.compress(...)``: the records iterate as the passes' records
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)


@dataclass(frozen=True)
class ProfileResult:
    """``slimx.profile``'s answer: the latency and the whole latency object (``to_dict()``)."""

    latency: Latency
    data: dict = field(repr=False)

    def to_dict(self) -> dict:
        return self.data

    def render(self, top: int = 12) -> str:
        from slimx.profiling import render

        return render(self.data, top=top)


@dataclass(frozen=True)
class EvalResult:
    """``slimx.evaluate``'s answer: fidelity of the artifact to the original on real data and the speed ratio."""

    cosine: float
    nn_agreement: float | None
    accuracy: float | None
    speed_ratio: float | None
    data: dict = field(repr=False)

    def to_dict(self) -> dict:
        return self.data


@dataclass(frozen=True)
class GateResult:
    """``slimx.gate``'s verdict: ``passed``, one entry per budget checked, the whole result (``to_dict()``)."""

    passed: bool
    entries: list[dict]
    data: dict = field(repr=False)

    def to_dict(self) -> dict:
        return self.data

    def markdown(self) -> str:
        from slimx.gate import markdown

        return markdown(self.data)


# --------------------------------------------------------------------------- helpers


class _Quiet(Progress):
    """No progress lines; warnings kept for the result (and as Python warnings) instead of printed."""

    def __init__(self) -> None:
        super().__init__(total=1, enabled=False)
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        warnings.warn(f"slimx: {text}", stacklevel=4)


def _timing_config(timing):
    """A ``TimingConfig`` from one, or from a dict of its fields (strict)."""
    from slimx.devices.timing import TimingConfig

    if isinstance(timing, dict):
        from slimx._core.config import config_from_dict

        timing = config_from_dict(TimingConfig, timing, "timing")
    if not isinstance(timing, TimingConfig):
        raise UsageError("timing", f"is {type(timing).__name__}",
                         "give a TimingConfig(runs=..., warmup=...) or a dict of its fields")
    return timing


def _progress(progress, verbose: bool) -> Progress:
    if progress is not None:
        return progress
    return Progress(total=9) if verbose else _Quiet()


def _model_text(model) -> str | None:
    """``model`` as a MODEL string when it is one (a str or a path), else None."""
    if isinstance(model, Path):
        return str(model)
    if isinstance(model, str):
        return model
    return None


def _pass_specs(passes) -> tuple[list[str], list]:
    """Passes given as strings (``"lowrank:rank_ratio=0.5"``), ``PassSpec``s, ``(name, config)`` pairs or config
    objects of a registered pass, as typed ``PassSpec``s."""
    from slimx.slim import PASSES, PassSpec, parse_pass

    if isinstance(passes, (str, PassSpec)) or dataclasses.is_dataclass(passes):
        passes = [passes]
    specs = []
    for item in passes or ():
        if isinstance(item, str):
            specs.append(parse_pass(item))
        elif isinstance(item, PassSpec):
            specs.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, cfg = item
            entry = PASSES.get(name)
            if isinstance(cfg, dict):
                from slimx._core.config import config_from_dict

                cfg = config_from_dict(entry.config_cls, cfg, f"pass {name}")
            if not isinstance(cfg, entry.config_cls):
                raise UsageError(f"pass {name}", f"takes a {entry.config_cls.__name__}, not {type(cfg).__name__}",
                                 f"give ({name!r}, {entry.config_cls.__name__}(...))")
            specs.append(PassSpec(entry.name, cfg))
        elif dataclasses.is_dataclass(item):
            owners = [n for n in PASSES.names() if PASSES.get(n).config_cls is type(item)]
            if not owners:
                raise UsageError(f"pass config {type(item).__name__}", "belongs to no registered pass",
                                 f"give one of the passes' configs ({', '.join(PASSES.names())}) or a string")
            specs.append(PassSpec(owners[0], item))
        else:
            raise UsageError(f"pass {item!r}", "is not a pass", "give 'name:key=value', a PassSpec or a pass config")
    return specs


def _config_text(cfg) -> str:
    """A config dataclass as the ``K=V,...`` text its flag takes (tuples as ``a|b``; None left out)."""
    values = []
    for key, value in dataclasses.asdict(cfg).items():
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            value = "|".join(map(str, value))
        values.append(f"{key}={value}")
    return ",".join(values)


def _spec_text(spec) -> str:
    values = _config_text(spec.config)
    return spec.name + (f":{values}" if values else "")


def _recover_text(recover) -> str | None:
    from slimx.slim import RecoverConfig

    if recover is None or isinstance(recover, str):
        return recover
    if isinstance(recover, dict):
        return ",".join(f"{k}={v}" for k, v in recover.items())
    if isinstance(recover, RecoverConfig):
        return _config_text(recover)
    raise UsageError("recover", f"is {type(recover).__name__}", "give a RecoverConfig, a dict or 'steps=200,...'")


_SHAPE_KEYS = ("seq_len", "batch", "static", "buckets", "max_buckets", "input_shapes")


def _shape_flags(shapes) -> dict:
    from slimx._core.config import check_keys

    if shapes is None:
        return {}
    if not isinstance(shapes, dict):
        raise UsageError("shapes", f"is {type(shapes).__name__}, not a dict",
                         "e.g. shapes={'seq_len': '1..128'} or {'batch': '1..8', 'static': False}")
    check_keys(shapes, _SHAPE_KEYS, "shapes", f"shapes takes {', '.join(_SHAPE_KEYS)}")
    out = dict(shapes)
    for key in ("seq_len", "batch"):
        if isinstance(out.get(key), (tuple, list)) and len(out[key]) == 2:
            out[key] = f"{out[key][0]}..{out[key][1]}"
    if isinstance(out.get("buckets"), (tuple, list)):
        out["buckets"] = ",".join(map(str, out["buckets"]))
    if isinstance(out.get("input_shapes"), str):
        out["input_shapes"] = (out["input_shapes"],)
    return out


def _format_flags(options) -> dict:
    """A target's options object (``CoreMLOptions(...)``) or a dict as the config's format flags."""
    if options is None:
        return {}
    from slimx.targets import option_flag_values

    values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    return option_flag_values(values)


# --------------------------------------------------------------------------- export


def export(model, device: str = "host", *, example_inputs=None, format: str | None = None,
           precision: str | None = None, passes: Sequence = (), recover=None, calib: str | Path | None = None,
           shapes: dict | None = None, out: str | Path | None = None, weights: str | Path | None = None,
           labels: str | Path | None = None, options=None, opset: int | None = None, timing=None,
           min_fidelity: float | None = None, max_accuracy_drop: float | None = None, budget_ms: float | None = None,
           parity_inputs: int | None = None, min_cosine: float | None = None, max_rel_err: float | None = None,
           seed: int = 0, calib_samples: int | None = None, truncate: bool = False, reconstruct: bool = True,
           fp16_fixes: bool = True, fp16_norms: str = "rescale", progress: Progress | None = None,
           verbose: bool = False, command: Iterable[str] = ()) -> ExportResult:
    """Compress (optionally), compile and prove ``model`` for ``device``.

    Args:
        model: an ``nn.Module`` (with ``example_inputs``, or an ``example_inputs`` attribute, or one that
            ``slimx.compress`` returned), any MODEL string the CLI takes (``"minilm"``, ``"timm:NAME"``,
            ``"hf:DIR"``, ``"pkg.mod:factory"``) or a path (``.pt2``, ``.onnx``).
        device: a device profile or alias (``"host"``, ``"iphone12"``, ``"pixel7"``, ``"jetson-orin-nano"``).
        example_inputs: a tensor or tuple of tensors, for a module.
        format: ``onnx``, ``coreml``, ``tflite`` or ``tensorrt`` (default: the device's).
        precision: ``fp32``, ``fp16``, ``int8`` or ``int8-weights`` (default: the target's).
        passes: compression passes: strings (``"lowrank:rank_ratio=0.5"``), pass configs
            (``LowRankConfig(rank_ratio=0.5)``), ``(name, config)`` pairs or ``PassSpec``s, run in order.
        recover: distillation after the passes: a ``RecoverConfig``, a dict or ``"steps=200,lr=5e-5"``.
        reconstruct: after each pass, refit the maps it cut or factorized by least squares on the calibration
            data, layer by layer (``slim.reconstruct``); False keeps the pass's own weights.
        fp16_fixes: fix what the numerical pre-flight finds for an fp16 artifact (mask constants past fp16's range,
            LayerNorms whose variance overflows rescaled); False reports them only (``export.preflight``).
        fp16_norms: ``"rescale"`` (an overflowing LayerNorm's input scaled by a power of two in the graph) or
            ``"fp32"`` (kept in fp32 through the format's per-op precision where it has one).
        calib: calibration data (text file, image folder, ``.npz``) for int8, passes and parity on data.
        shapes: ``{"seq_len": (1, 128), "batch": (1, 8), "static": False, "buckets": [16, 32, 64],
            "input_shapes": ["1x3x224x224"]}`` (any subset).
        out: the output folder (default ``out/MODEL-DEVICE``).
        options: the format's own options, typed (``targets.coreml.CoreMLOptions(compute_units="cpu_only")``)
            or as a dict.
        timing: a ``TimingConfig`` (runs, warmup, threads, learn: the measurement becomes an anchor of the
            device), or a dict of its fields, for measured latency.
        progress: a ``slimx.Progress`` to show stages on; ``verbose=True`` makes one on stderr.

    Returns:
        ExportResult. Failed verdicts (parity, fidelity) are in ``result.failures`` and ``result.passed``; the
        report is written either way. ``result.raise_for_failures()`` raises the first.

    Raises:
        UsageError: a request that cannot be (unknown device, bad option, a model without inputs).
        SlimxFailure: work that failed (conversion, an op the format cannot express).
    """
    from slimx.config import ExportConfig

    flags: dict[str, Any] = {"device": device, "format": format, "precision": precision, "opset": opset,
                             "calib": str(calib) if calib is not None else None, "weights": weights,
                             "labels": str(labels) if labels is not None else None, "seed": seed,
                             "min_fidelity": min_fidelity, "max_accuracy_drop": max_accuracy_drop,
                             "budget_ms": budget_ms, "no_reconstruct": (not reconstruct) or None,
                             "no_fp16_fixes": (not fp16_fixes) or None,
                             "fp16_norms": fp16_norms if fp16_norms != "rescale" else None,
                             "parity_inputs": parity_inputs, "min_cosine": min_cosine,
                             "max_rel_err": max_rel_err, "calib_samples": calib_samples, "truncate": truncate or None,
                             "recover": _recover_text(recover), "out": str(out) if out is not None else None}
    names = tuple(_spec_text(s) for s in _pass_specs(passes))
    if names:
        flags["passes"] = names
    flags.update(_shape_flags(shapes))
    flags.update(_format_flags(options))
    if timing is not None:
        timing = _timing_config(timing)
        flags.update(runs=timing.runs, warmup=timing.warmup, threads=timing.threads, learn=timing.learn or None)
    text = _model_text(model)
    loaded = None
    if text is None:
        from slimx.export.intake import load_module

        if weights is not None:
            raise UsageError("weights", "loads a checkpoint into a model slimx builds, and this one is live",
                             "load the weights into the module yourself (load_state_dict)")
        loaded = load_module(model, example_inputs, input_shapes=list(flags.pop("input_shapes", ()) or ()))
        flags["model"] = loaded.name
    else:
        if example_inputs is not None:
            raise UsageError("example_inputs", f"are for a live module, and {text!r} is a MODEL string",
                             "give shapes={'input_shapes': [...]} for a MODEL string")
        flags["model"] = text
    cfg = ExportConfig.from_flags({k: v for k, v in flags.items() if v is not None}, command=tuple(command),
                                  where="slimx.export")
    return export_config(cfg, progress=progress, verbose=verbose, loaded=loaded)


def export_config(cfg, *, progress: Progress | None = None, verbose: bool = False, loaded=None) -> ExportResult:
    """``slimx.export`` from a whole ``slimx.config.ExportConfig`` (what ``slimx export``'s flags, a gate entry
    or a sweep trial build); ``loaded``: a model already taken in (``export.intake.load_module``)."""
    from slimx.pipeline import run

    p = _progress(progress, verbose)
    done = run(cfg, p, loaded)
    return _result(done, getattr(p, "warnings", []))


def _result(done, warned: list[str]) -> ExportResult:
    report = done.report
    out = Path(report["out"])
    failures = done.failures()
    speed = (report.get("compression") or {}).get("speedup") or {}
    return ExportResult(
        out=out, artifacts=[out / a["path"] for a in report.get("artifacts", [])],
        format=report["target"]["format"], precision=report["target"]["precision"], device=report["device"]["name"],
        parity=Parity.from_dict(report["parity"]), fidelity=Fidelity.from_record(report.get("compression")),
        latency=Latency.from_dict(report["latency"]), host_latency=Latency.from_dict(report.get("host_latency")),
        shapes=report.get("shapes") or {}, speedup=speed.get("ratio") if speed.get("measured") else None,
        passed=not failures, failures=failures, report=Report(report), module=done.compressed.module,
        warnings=list(warned))


# --------------------------------------------------------------------------- compress


def compress(model, passes: Sequence, *, calib: str | Path | None = None, recover=None, example_inputs=None,
             device: str | None = None, precision: str = "fp32", labels: str | Path | None = None,
             calib_samples: int | None = None, min_fidelity: float | None = None, seed: int = 0,
             reconstruct: bool = True, progress: Progress | None = None,
             verbose: bool = False) -> tuple[Any, Compression]:
    """Run compression passes on a model and hand it back, for your own fine-tuning before ``slimx.export``.

    The passes run on the model's deployment form; fidelity is measured on held-out calibration samples (a
    quarter of them), as ``slimx.export`` does, and recorded (not raised: ``records.fidelity.passed``).

    Args:
        model: an ``nn.Module`` (with ``example_inputs``) or a MODEL string (``"minilm"``).
        passes: as ``slimx.export``'s.
        calib: real calibration data (strongly advised: without it the passes fit synthetic inputs).
        device: the device whose latency model latency-driven passes price steps on (default: none, or the host
            for ``latency-slim``).
        reconstruct: after each pass, refit the maps it cut or factorized by least squares on the calibration
            data (``slim.reconstruct``); False keeps the pass's own weights.

    Returns:
        ``(module, records)``: the compressed module (a new one; ``slimx.export(module, ...)`` takes it with no
        example inputs), and a ``Compression`` whose iteration gives each pass's record.

    Example:
        >>> module, records = slimx.compress("minilm", ["lowrank:rank_ratio=0.5"], calib="text.txt")  # doctest: +SKIP
    """
    from slimx.devices import load_device
    from slimx.export import load_calibration, load_model
    from slimx.export.intake import ORIGINS, load_module
    from slimx.export.program import deployment_form
    from slimx.pipeline import _recover_config, compress_module
    from slimx.slim import PASSES, RecoverConfig
    from slimx.slim.compress import PASS_CALIB_CAP

    specs = _pass_specs(passes)
    if not specs:
        raise UsageError("slimx.compress", "was given no passes", "give passes=['lowrank:rank_ratio=0.5', ...]")
    p = _progress(progress, verbose)
    text = _model_text(model)
    if text is not None:
        if example_inputs is not None:
            raise UsageError("example_inputs", f"are for a live module, and {text!r} is a MODEL string", "drop them")
        loaded = load_model(text)
    else:
        loaded = load_module(model, example_inputs)
    recover_cfg = None
    if recover is not None:
        recover_cfg = recover if isinstance(recover, RecoverConfig) else _recover_config(_recover_text(recover))
    needs_device = any(PASSES.get(s.name).latency_driven for s in specs)
    dev = load_device(device or "host") if (device or needs_device) else None
    data = None
    if calib is not None:
        data = load_calibration(str(calib), loaded, limit=calib_samples or PASS_CALIB_CAP, seed=seed,
                                labels=str(labels) if labels is not None else None)
    elif labels is not None:
        raise UsageError("labels", "label the calib samples, and none were given", "add calib=FILE")
    deployable = deployment_form(loaded, seed=seed)
    record = compress_module(deployable.module, loaded.inputs, specs, data, progress=p, seed=seed,
                             calib_samples=calib_samples, device=dev, precision=precision, recover_cfg=recover_cfg,
                             min_fidelity=min_fidelity, reconstruct=reconstruct)
    module = record.pop("model")
    ORIGINS[module] = dataclasses.replace(loaded, module=None, notes=[*loaded.notes, "compressed by slimx.compress"])
    return module, Compression(record["passes"], Fidelity.from_record(record), record, list(loaded.inputs))


# --------------------------------------------------------------------------- profile, evaluate, gate


def _check_wait(seconds) -> None:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        raise UsageError(f"remote_wait (--remote-wait) {seconds!r}", "must be seconds, 0 or more",
                         "e.g. --remote-wait 900 (0: fail on the first 503)")


def profile(model, device: str = "host", *, estimate: bool | None = None, precision: str | None = None,
            setting: str | None = None, input_shapes: Sequence[str] = (), weights: str | None = None,
            remote: str | None = None, token: str | None = None, remote_wait: float = 900.0, runs: int = 50,
            warmup: int = 5, threads: int | None = None, timing=None, calibrate: bool = False, top: int = 12,
            learn: bool = False, progress: Progress | None = None, verbose: bool = False) -> ProfileResult:
    """Latency of a MODEL or an artifact (``.onnx``, ``.tflite``, ``.mlpackage``, an export folder) on ``device``:
    measured where a runner exists (here, or through an agent at ``remote``), else estimated per op.
    ``estimate``: True forces the estimator, False requires a measurement, None picks. ``runs`` / ``warmup`` /
    ``threads`` set the measurement (``timing``, a ``TimingConfig`` or a dict of its fields, sets all three);
    ``calibrate``: time the microbenchmarks here and fit the host's profile before estimating the host.
    ``remote_wait``: seconds to wait out a busy agent (503), retrying after its ``Retry-After``; ``learn``: the
    measurement becomes one of the device's anchors (``slimx devices anchor``), so later estimates for it use it."""
    from slimx.profiling import ProfileRequest
    from slimx.profiling import profile as run_profile

    text = _model_text(model)
    if text is None:
        raise UsageError(f"model {type(model).__name__}", "slimx.profile takes a MODEL string or an artifact path",
                         "export the module first (slimx.export) and profile result.out")
    if timing is not None:
        timing = _timing_config(timing)
        runs, warmup, threads = timing.runs, timing.warmup, timing.threads
    if runs < 1 or warmup < 0:
        raise UsageError("runs/warmup (--runs/--warmup)", "must be at least 1 / not negative",
                         "e.g. runs=50, warmup=5 (--runs 50 --warmup 5)")
    _check_wait(remote_wait)
    req = ProfileRequest(subject=text, device=device, remote=remote, token=token, remote_wait=remote_wait,
                         mode=None if estimate is None else "estimate" if estimate else "measure",
                         input_shapes=tuple(input_shapes), weights=weights, precision=precision, setting=setting,
                         runs=runs, warmup=warmup, threads=threads, top=top, calibrate=calibrate, learn=learn)
    data = run_profile(req, _progress(progress, verbose))
    return ProfileResult(Latency.from_dict(data), data)


def evaluate(out: str | Path, data: str | Path, *, against: str | None = None, samples: int = 64, runs: int = 30,
             weights: str | None = None, labels: str | Path | None = None, truncate: bool = False) -> EvalResult:
    """An export folder's artifact against the original model on real ``data``: fidelity and the measured speed
    ratio, in the artifact's own runtime."""
    from slimx.evaluate import evaluate as run_eval

    result = run_eval(out, against, data, samples=samples, runs=runs, weights=weights, labels=labels,
                      truncate=truncate)
    fid = result.get("fidelity") or {}
    return EvalResult(fid.get("cosine_mean"), fid.get("nn_agreement"), fid.get("accuracy"),
                      (result.get("latency") or {}).get("ratio"), result)


def gate(subject: str | Path, device: str | None = None, *, budget_ms: float | None = None,
         max_regression_pct: float | None = None, statistic: str = "median", baseline: str | None = None,
         precision: str | None = None, format: str | None = None, input_shapes: Sequence[str] = (),
         weights: str | None = None, settings: dict | None = None, update_baseline: bool = False,
         baseline_file: str | Path | None = None, remote: str | None = None, token: str | None = None,
         remote_wait: float = 900.0, learn: bool = False, progress: Progress | None = None,
         verbose: bool = False) -> GateResult:
    """Judge latency budgets: a gate file (``.toml``), or one MODEL / export folder with ``budget_ms`` and/or
    ``max_regression_pct``. Returns the verdict (``passed``); a regression is a result, not an error.
    ``settings``: the gate's [settings] (rounds, runs, warmup, threads, strict); ``learn``: every measured entry
    given as a MODEL becomes one of its device's anchors (``slimx devices anchor``)."""
    from slimx.gate import load_gate_file, plan_from_flags, run_gate

    subject = str(subject)
    overrides = dict(settings or {})
    if subject.lower().endswith(".toml"):
        given = [f"{k} (--{k.replace('_', '-')})" for k, v in (
            ("budget_ms", budget_ms), ("max_regression_pct", max_regression_pct), ("baseline", baseline),
            ("precision", precision), ("format", format), ("weights", weights),
            ("input_shape", input_shapes or None)) if v is not None]
        if given:
            raise UsageError(", ".join(given), "set an entry, and the gate file holds the entries",
                             "put them in the file's [[gate]] tables, or gate a MODEL instead of a file")
        plan = load_gate_file(subject, overrides)
        if baseline_file:
            plan.baseline_file = Path(baseline_file)
    else:
        if budget_ms is None and max_regression_pct is None:
            raise UsageError(f"slimx gate {subject}", "has no budget", "add budget_ms and/or max_regression_pct "
                             "(--budget-ms X / --max-regression-pct P), or give a gate file")
        plan = plan_from_flags(subject, device, budget_ms, max_regression_pct, statistic, precision, format,
                               tuple(input_shapes), weights, baseline, str(baseline_file) if baseline_file else None,
                               overrides)
    if remote:
        if not token:
            raise UsageError("remote", "needs the agent's token", "give token= (the CLI: --token-file FILE)")
        _check_wait(remote_wait)
        plan.remote, plan.token, plan.remote_wait = remote, token, remote_wait
    plan.learn = learn
    data = run_gate(plan, update_baseline=update_baseline, progress=_progress(progress, verbose))
    return GateResult(bool(data["passed"]), data["entries"], data)
