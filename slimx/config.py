"""The configuration of one export, a section per stage: what ``slimx export``'s flags and ``slimx.export``'s
arguments become. Strict: unknown keys are refused with a did-you-mean, values are checked against each field's
type, and every default is stated once, here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from slimx._core.config import check_keys, coerce, config_from_dict
from slimx._core.errors import UsageError
from slimx.devices.timing import TimingConfig
from slimx.slim.compress import PASS_CALIB_CAP


@dataclass(frozen=True)
class ModelConfig:
    """What to load: the MODEL form, its weights and input shapes."""

    model: str = "minilm"
    weights: str | None = None
    input_shapes: tuple[str, ...] = ()
    seed: int = 0
    seq_len: str | None = None  # MIN..MAX of a text model's dynamic sequence axis (default 1..max positions)
    batch: str | None = None  # MIN..MAX: a dynamic batch axis
    static: bool = False  # every shape fixed at the export shape
    buckets: str | None = None  # "16,32,64": the lengths a bucketed target builds (default: powers of two);
    # "auto": chosen from the calibration data's lengths by the device's latency model (export.buckets)
    max_buckets: int | None = None  # with buckets "auto": at most this many (default: as many as the fixed rule)

    def __post_init__(self) -> None:
        if self.max_buckets is not None and (self.buckets != "auto" or self.max_buckets < 1):
            raise UsageError(f"--max-buckets {self.max_buckets}", "bounds --buckets auto's choice" if self.buckets !=
                             "auto" else "must be at least 1", "add --buckets auto" if self.buckets != "auto" else
                             "give a positive count, e.g. --max-buckets 3")


@dataclass(frozen=True)
class DataConfig:
    """Calibration data (int8, passes, parity on real data)."""

    calib: str | None = None
    calib_samples: int | None = None  # None: 16 without passes, up to PASS_CALIB_CAP with them
    truncate: bool = False  # text longer than the artifact's longest sequence is cut to it (else an error)
    labels: str | None = None  # one integer task label per --calib sample (file order): accuracy as fidelity

    def __post_init__(self) -> None:
        if self.calib_samples is not None and self.calib_samples < 1:
            raise UsageError("--calib-samples", "must be at least 1", "e.g. --calib-samples 256")
        if self.labels and not self.calib:
            raise UsageError("--labels", "label the --calib samples, and none were given", "add --calib FILE")

    def samples(self, passes: bool) -> int:
        """How many calibration samples to read: what was asked, else 16 (int8 ranges, parity on data) or, with
        compression passes, all there is up to ``PASS_CALIB_CAP`` (the passes fit, recover and are judged on it)."""
        if self.calib_samples is not None:
            return self.calib_samples
        return PASS_CALIB_CAP if passes else 16


@dataclass(frozen=True)
class CompressConfig:
    """Compression passes (flags or a recipe file) and distillation recovery."""

    passes: tuple[str, ...] = ()
    recipe: str | None = None
    recover: str | None = None
    min_fidelity: float | None = None  # held-out cosine floor after compression (None: DEFAULT_MIN_FIDELITY)
    max_accuracy_drop: float | None = None  # with --labels: points of accuracy the compression may lose
    budget_ms: float | None = None  # slim the model (latency-slim) until the device's latency model says it fits
    no_reconstruct: bool = False  # keep each pass's cut weights as they are (no least-squares refit, slim.reconstruct)

    def __post_init__(self) -> None:
        if self.min_fidelity is not None and not 0 < self.min_fidelity <= 1:
            raise UsageError(f"--min-fidelity {self.min_fidelity}", "is a cosine, in (0, 1]",
                             "e.g. --min-fidelity 0.95")
        if self.budget_ms is not None and self.budget_ms <= 0:
            raise UsageError(f"--budget-ms {self.budget_ms}", "must be positive", "e.g. --budget-ms 2.0")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise UsageError(f"--max-accuracy-drop {self.max_accuracy_drop}", "is in points of accuracy, 0..100",
                             "e.g. --max-accuracy-drop 1")


@dataclass(frozen=True)
class CompileConfig:
    """Which device, format and precision, and the format's own options (checked by the chosen target)."""

    device: str = "host"  # the flag is --target (the report's config keeps that name)
    format: str | None = None  # None: the device's default format
    precision: str | None = None  # None: the target's default (fp16 for coreml and tensorrt, else fp32)
    opset: int | None = None  # ONNX opset for the formats written through ONNX (None: DEFAULT_OPSET)
    no_fp16_fixes: bool = False  # keep fp16 hazards the pre-flight finds as they are (export.preflight)
    fp16_norms: str = "rescale"  # an overflowing LayerNorm: rescaled in the graph, or "fp32" (per-op precision)
    # the format's own options by field name ({"dla_core": 0}); the chosen target's options class checks them.
    # Their flags (--dla-core, --no-fuse...) are generated from every target's options class (targets.option_flags)
    format_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fp16_norms not in ("rescale", "fp32"):
            raise UsageError(f"--fp16-norms {self.fp16_norms}", "is not a way to fix an fp16 LayerNorm",
                             "give rescale (the default) or fp32")


@dataclass(frozen=True)
class ProveConfig:
    """Parity: how many fresh inputs, and the tolerance (None: by precision, ``quant.DEFAULT_TOLERANCE``)."""

    parity_inputs: int = 8
    min_cosine: float | None = None
    max_rel_err: float | None = None

    def __post_init__(self) -> None:
        if self.parity_inputs < 1:
            raise UsageError("--parity-inputs", "must be at least 1", "give a positive count (default 8)")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise UsageError("--min-cosine", f"{self.min_cosine} is outside (0, 1]", "e.g. --min-cosine 0.999")
        if self.max_rel_err is not None and self.max_rel_err <= 0:
            raise UsageError("--max-rel-err", "must be positive", "e.g. --max-rel-err 1e-3")

    def tolerance(self, precision: str):
        from slimx.export import ParityTolerance
        from slimx.quant import DEFAULT_TOLERANCE

        cos, rel = DEFAULT_TOLERANCE[precision]
        return ParityTolerance(min_cosine=self.min_cosine if self.min_cosine is not None else cos,
                               max_rel_err=self.max_rel_err if self.max_rel_err is not None else rel)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "compress": CompressConfig, "compile": CompileConfig,
             "prove": ProveConfig, "timing": TimingConfig}


# the report's config keys, in order; every target option's flag (targets.option_flags) follows "opset"
_FLAT_ORDER = ("model", "target", "format", "out", "weights", "input_shapes", "precision", "opset", "calib",
               "calib_samples", "parity_inputs", "min_cosine", "max_rel_err", "warmup", "runs", "threads", "learn",
               "seed", "passes", "recipe", "recover", "seq_len", "batch", "static", "buckets", "max_buckets",
               "truncate", "labels", "min_fidelity", "max_accuracy_drop", "budget_ms", "no_reconstruct",
               "no_fp16_fixes", "fp16_norms")


def _option_flags():
    from slimx.targets import option_flags  # importing slimx.targets registers every target (no converter loads)

    return option_flags()


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``slimx export`` needs, one section per stage; the CLI builds it with ``from_flags``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    prove: ProveConfig = field(default_factory=ProveConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    out: str = ""
    command: tuple[str, ...] = ()

    @classmethod
    def from_flags(cls, flags: dict, command: tuple[str, ...] = (), where: str = "export options") -> ExportConfig:
        """Sort flat flag values (``vars(args)``, names as the fields') into their sections; a flag that is
        absent takes the field's default, so each default is stated once, here. Unknown names are refused with
        a did-you-mean, and every value is checked against its field's type (text is parsed).

        Example:
            >>> ExportConfig.from_flags({"runs": "40", "precision": "int8"}).timing.runs
            40
            >>> try:
            ...     ExportConfig.from_flags({"runz": 40})
            ... except UsageError as exc:
            ...     print(exc.line()[:60])
            export options: unknown option(s) runz; did you mean 'runs'?
        """
        check_keys(flags, cls.flag_names(), where, "see 'slimx export --help' for the options")
        sections = {}
        for name, section in _SECTIONS.items():
            names = {f.name for f in dataclasses.fields(section)} - {"format_options"}
            sections[name] = config_from_dict(section, {k: v for k, v in flags.items() if k in names}, where)
        options = {}
        for of in _option_flags():
            value = flags.get(of.dest)
            if value is None:
                continue
            value = coerce(value, of.kind, f"{where} {of.dest}")
            if of.kind is not bool or value:
                options[of.option] = of.option_value(value)
        sections["compile"] = dataclasses.replace(sections["compile"], format_options=options)
        out = flags.get("out") or ""
        return cls(**sections, out=str(out), command=tuple(command))

    @classmethod
    def flag_names(cls) -> set[str]:
        """Every flag name the config takes."""
        names = {f.name for s in _SECTIONS.values() for f in dataclasses.fields(s)} - {"format_options"}
        return names | {"out"} | {of.dest for of in _option_flags()}

    @staticmethod
    def default(name: str):
        """The default of one flag (for help texts)."""
        for section in _SECTIONS.values():
            for f in dataclasses.fields(section):
                if f.name == name:
                    return f.default
        raise KeyError(name)

    def flat(self) -> dict:
        """The flat view the report records under ``config`` (same keys as ever)."""
        values = {"out": self.out}
        for name in _SECTIONS:
            values.update(dataclasses.asdict(getattr(self, name)))
        values["target"] = values.pop("device")  # the flag's name, as the report has always recorded it
        from slimx.targets import option_flag_values

        given = option_flag_values(values.pop("format_options"))
        order = list(_FLAT_ORDER)
        at = order.index("opset") + 1
        for i, of in enumerate(_option_flags()):
            values[of.dest] = given.get(of.dest, False if of.kind is bool else None)
            order.insert(at + i, of.dest)
        return {k: values[k] for k in order}


__all__ = ["CompileConfig", "CompressConfig", "DataConfig", "ExportConfig", "ModelConfig", "ProveConfig",
           "TimingConfig"]
