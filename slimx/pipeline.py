"""The export pipeline, a chain of typed stages: prepare -> compress -> compile -> prove -> report.

Each stage is a plain function of the config and the stages before it, returning a dataclass; this module
only strings them together and keeps the output folder clean: everything is written to a hidden staging
folder inside OUT and moved into place at the end, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimx._core.errors import SlimxFailure, UsageError
from slimx._core.inputs import sample_inputs
from slimx._core.progress import Progress
from slimx._core.versions import tool_versions
from slimx.report import human

PARITY_SEED_BASE = 1000  # parity inputs are drawn from seeds the export example never used
PASS_CALIB_CAP = 1024  # calibration samples the passes use by default (all the data given, up to this)
SYNTHETIC_PASS_SAMPLES = 64  # without --calib: random inputs carry no information, and every pass step costs a
# forward over its validation share (EfficientFormer-L3's slimming over 1024 random images took minutes a candidate)
DEFAULT_MIN_FIDELITY = 0.95  # held-out cosine to the original, for embedding (unlabelled) outputs
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of held-out accuracy, with --labels


# --------------------------------------------------------------------------- configs, one per stage


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
    buckets: str | None = None  # "16,32,64": the lengths a bucketed target builds (default: powers of two)


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
    deployment_target: str | None = None
    compute_units: str | None = None
    palettize: int | None = None
    dla_core: int | None = None
    opt_len: int | None = None
    no_fuse: bool = False  # onnx: keep a plain ONNX graph (no onnxruntime contrib-op fusions)

    def format_option_values(self) -> dict:
        """The format-specific flags the user gave (the chosen target's options class checks them)."""
        return {k: v for k, v in (("deployment_target", self.deployment_target), ("compute_units", self.compute_units),
                                  ("palettize", self.palettize), ("dla_core", self.dla_core),
                                  ("opt_len", self.opt_len), ("fuse", False if self.no_fuse else None))
                if v is not None}


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


@dataclass(frozen=True)
class TimingConfig:
    """How latency is measured where a runner exists."""

    runs: int = 50
    warmup: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.runs < 30:
            raise UsageError("--runs", f"{self.runs} is too few for a median and p90", "give at least 30")
        if self.warmup < 0:
            raise UsageError("--warmup", "must not be negative", "give 0 or more")
        if self.threads is not None and self.threads < 1:
            raise UsageError("--threads", "must be at least 1", "e.g. --threads 2")


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "compress": CompressConfig, "compile": CompileConfig,
             "prove": ProveConfig, "timing": TimingConfig}
# the report's flat "config" object, in the order it has always had
_FLAT_ORDER = ("model", "target", "format", "out", "weights", "input_shapes", "precision", "opset",
               "deployment_target", "compute_units", "palettize", "dla_core", "calib", "calib_samples",
               "parity_inputs", "min_cosine", "max_rel_err", "warmup", "runs", "threads", "seed", "passes", "recipe",
               "recover", "seq_len", "batch", "static", "opt_len", "buckets", "no_fuse", "truncate", "labels",
               "min_fidelity", "max_accuracy_drop", "budget_ms")


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
    def from_flags(cls, flags: dict, command: tuple[str, ...] = ()) -> ExportConfig:
        """Sort flat flag values (``vars(args)``, names as the fields') into their sections; a flag that is
        absent takes the field's default, so each default is stated once, here."""
        flags = {k: (tuple(v) if isinstance(v, list) else v) for k, v in flags.items()}
        sections = {}
        for name, section in _SECTIONS.items():
            names = {f.name for f in dataclasses.fields(section)}
            sections[name] = section(**{k: v for k, v in flags.items() if k in names})
        return cls(**sections, out=flags.get("out", ""), command=tuple(command))

    @classmethod
    def flag_names(cls) -> set[str]:
        """Every flag name the config takes."""
        return {f.name for s in _SECTIONS.values() for f in dataclasses.fields(s)} | {"out"}

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
        return {k: values[k] for k in _FLAT_ORDER}


def default_out_dir(model: str, target: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(model[:400]).stem if c)
    return str(Path("out") / f"{slug.strip('-')[:80] or 'model'}-{target}")  # a name the file system takes


# --------------------------------------------------------------------------- what each stage returns


@dataclass
class Prepared:
    """The request resolved and checked, the model loaded and in deployment form."""

    device: Any
    target: Any
    precision: str
    options: Any  # targets.CompileOptions, the format's own options typed
    specs: list  # compression passes to run
    recover: Any  # RecoverConfig or None
    deployable: Any  # export.program.Deployable
    calib: Any  # CalibrationData or None
    out: Path
    shapes: dict = field(default_factory=dict)  # the report's ``shapes``: the form built and its dynamic axes


@dataclass
class Compressed:
    """The model to compile: the deployment form, or its compressed copy with the record of what was done."""

    module: Any
    original_module: Any
    record: dict | None = None  # passes, recipe, calibration, fidelity, recover
    original_stats: dict | None = None


@dataclass
class Compiled:
    program: Any
    stats: dict
    coverage: Any
    artifact: Any


@dataclass
class Proven:
    parity: dict
    latency: dict
    host_latency: dict | None
    speedup: dict | None = None


# --------------------------------------------------------------------------- the chain


def run_export(cfg: ExportConfig, progress: Progress | None = None) -> dict:
    """Run the whole export and return the report (also written to ``OUT/report.json``)."""
    progress = progress or Progress(total=7)
    prepared = resolve(cfg)
    progress.total = 8 if prepared.specs else 7
    out = prepared.out
    created = first_missing(out)  # the top folder this run creates (removed again if the run fails)
    staging = out / f".slimx-staging-{os.getpid()}"
    for pid, stale in stale_stagings(out):
        shutil.rmtree(stale, ignore_errors=True)
        progress.warn(f"removed {stale.name}, left in {out} by a run that was killed (process {pid} is gone)")
    try:
        staging.mkdir(parents=True, exist_ok=False)
        prepare(cfg, prepared, progress)
        compressed = compress(cfg, prepared, progress)
        compiled = compile_artifact(cfg, prepared, compressed, staging, progress)
        proven = prove(cfg, prepared, compressed, compiled, staging, progress)
        with progress.stage("report"):
            report = build_report(cfg, prepared, compressed, compiled, proven, progress)
            write_json(staging / "report.json", report)
            write_html(staging / "report.html", report)
            publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(out, created)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_verdicts(proven.parity, compiled.artifact, out)
    check_fidelity(compressed.record, out)
    return report


ONNX_FORMATS = ("onnx", "tensorrt")  # the formats written through an ONNX file, which --opset sets


def checked_opset(opset: int | None, target) -> int:
    """The ONNX opset to write: ``--opset`` where the format goes through ONNX and the installed onnx knows it
    (the exporter's own limits are checked on the written file), else a usage error."""
    import onnx

    from slimx.export.program import DEFAULT_OPSET

    if opset is None:
        return DEFAULT_OPSET
    if target.name not in ONNX_FORMATS:
        raise UsageError(f"--opset {opset}", f"the {target.name} format is not written through ONNX",
                         "drop --opset (it applies to --format onnx and tensorrt)")
    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise UsageError(f"--opset {opset}", f"is outside the opsets onnx {onnx.__version__} knows (7..{newest})",
                         f"give one in 7..{newest}; {DEFAULT_OPSET} is the default")
    return opset


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would create), or None."""
    path = Path(path).absolute()
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_empty(path: Path, up_to: Path | None) -> None:
    """Remove ``path`` and its parents while they are empty, stopping at ``up_to`` (a failed run leaves no folder
    it created)."""
    if up_to is None:
        return
    folder = Path(path).absolute()
    while True:
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == up_to or up_to not in folder.parents:
            return
        folder = folder.parent


def stale_stagings(out: Path) -> list[tuple[int, Path]]:
    """Staging folders in OUT whose run is gone (killed by a signal that cannot be caught, or a power cut)."""
    found = []
    if not Path(out).is_dir():
        return found
    for item in Path(out).glob(".slimx-staging-*"):
        try:
            pid = int(item.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            found.append((pid, item))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def resolve(cfg: ExportConfig) -> Prepared:
    """Everything that can be checked before a file is written or a model loaded: device, format, precision,
    the format's options, passes and recovery, the output folder."""
    from slimx._core.config import config_from_dict
    from slimx.devices import load_device
    from slimx.quant import QuantConfig, check_precision, quantizer_for, schemes
    from slimx.slim import load_recipe, parse_pass
    from slimx.slim.base import load_recipe_quant
    from slimx.targets import CompileOptions, get_target

    c = cfg.compress
    specs = [parse_pass(p) for p in c.passes] + (load_recipe(c.recipe) if c.recipe else [])
    recover_cfg = _recover_config(c.recover) if c.recover else None
    device = load_device(cfg.compile.device)
    if c.budget_ms is not None:
        specs = budget_specs(specs, c.budget_ms, device, cfg.compile.precision)
    if recover_cfg and not specs:
        raise UsageError("--recover", "recovers accuracy after a compression pass, and none was given",
                         "add --pass NAME:... or --recipe FILE")
    target = get_target(cfg.compile.format or device.default_format)
    quant_values = load_recipe_quant(c.recipe) if c.recipe else {}
    precision = check_precision(cfg.compile.precision or quant_values.get("precision") or target.default_precision)
    quant = config_from_dict(QuantConfig, {**quant_values, "precision": precision},
                             f"--recipe {c.recipe} [quant]" if quant_values else "--precision")
    model = cfg.model.model
    if model.lower().endswith(".onnx") and specs:
        raise UsageError(f"model {model}", "compression passes change a PyTorch model, and an ONNX file has none",
                         "start from the PyTorch model")
    if target.needs_torch and model.lower().endswith(".onnx"):
        raise UsageError(f"model {model}", f"the {target.name} target converts from the PyTorch program, "
                         "and an ONNX file has none", "start from the PyTorch model, or use --format onnx/tensorrt")
    options = CompileOptions(precision=precision, opset=checked_opset(cfg.compile.opset, target),
                             format_options=target.options(cfg.compile.format_option_values(), "--format options"),
                             quant=quant)
    target.validate(device, options)
    if quant.scheme is not None and schemes(target.name):
        quantizer_for(target.name, quant)  # a scheme the format lacks is refused before any work
    out = Path(cfg.out or default_out_dir(model, device.name))
    if any(len(part) > 255 for part in out.parts):
        raise UsageError(f"--out {str(out)[:60]}...", "has a folder name longer than file systems allow (255)",
                         "give a shorter path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}", "exists and is not a folder", "give a folder path")
    existing = next((f for f in (out.absolute(), *out.absolute().parents) if f.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}", f"cannot be written: {existing} is not writable by this user",
                         "give a folder you can write to")
    return Prepared(device, target, precision, options, specs, recover_cfg, None, None, out)


def budget_specs(specs: list, budget_ms: float, device, precision: str | None) -> list:
    """``--budget-ms X``: the ``latency-slim`` pass with that budget (its options from ``--pass latency-slim:...``
    if given there), refused below the device's fixed per-inference overhead (no model can be faster)."""
    from slimx.gate import device_floor_ms
    from slimx.slim import PassSpec, parse_pass

    floor = device_floor_ms(device, precision)
    if floor is not None and budget_ms < floor:
        raise UsageError(f"--budget-ms {budget_ms:g}", f"is below {device.name}'s fixed per-inference overhead "
                         f"({floor:.3f} ms in its calibrated profile): no model can meet it",
                         f"give a budget above {floor:.3f} ms")
    out, found = [], False
    for spec in specs:
        if spec.name == "latency-slim":
            spec = PassSpec(spec.name, dataclasses.replace(spec.config, budget_ms=budget_ms))
            found = True
        out.append(spec)
    if not found:
        out.append(parse_pass(f"latency-slim:budget_ms={budget_ms}"))
    return out


def prepare(cfg: ExportConfig, prepared: Prepared, progress: Progress) -> Prepared:
    """Load the model (and calibration data), then put it in deployment form."""
    from slimx.export import load_calibration, load_model
    from slimx.export.program import deployment_form

    m = cfg.model
    with progress.stage("intake", m.model):
        loaded = load_model(m.model, weights=m.weights, input_shapes=list(m.input_shapes))
        prepared.shapes = shape_form(loaded, m, prepared.target, prepared.precision)
        if prepared.shapes.get("buckets"):
            prepared.options = dataclasses.replace(prepared.options, buckets=tuple(prepared.shapes["buckets"]))
            progress.note("buckets " + ", ".join(map(str, prepared.shapes["buckets"])))
        if prepared.shapes["dynamic"]:
            progress.note("dynamic " + ", ".join(f"{d['input']}[{d['axis']}] {d['min']}..{d['max']}"
                                                 for d in prepared.shapes["dynamic"]))
        if cfg.data.calib:
            prepared.calib = load_calibration(cfg.data.calib, loaded, limit=cfg.data.samples(bool(prepared.specs)),
                                              seed=m.seed, truncate=cfg.data.truncate, labels=cfg.data.labels)
            progress.note(prepared.calib.describe())
            tune_to_data(prepared, loaded, progress)
    with progress.stage("deployment form"):
        prepared.deployable = deployment_form(loaded, seed=m.seed)
        record = prepared.deployable.record
        if record is not None:
            progress.note(f"reparameterized {len(record.reparameterized)} module(s), "
                          f"folded {len(record.folded)} batch norm(s)")
    return prepared


def tune_to_data(prepared: Prepared, loaded, progress) -> None:
    """A format tuned for one length (TensorRT's profile opt shape) is tuned for the calibration data's median
    real length, unless the user gave one (``--opt-len``)."""
    import numpy as np

    from slimx.export.shapes import lengths_of, seq_range_of

    own = prepared.options.format_options
    if not hasattr(own, "opt_len") or own.opt_len is not None or seq_range_of(loaded.inputs) is None:
        return
    real = lengths_of(prepared.calib.batches, loaded.inputs)
    if real:
        median = int(np.median(real))
        prepared.options = dataclasses.replace(prepared.options,
                                               format_options=dataclasses.replace(own, opt_len=median))
        progress.note(f"tuned for length {median} (the calibration data's median; --opt-len sets another)")


def shape_form(loaded, m: ModelConfig, target, precision: str) -> dict:
    """Set the loaded model's dynamic axes (text: the sequence axis by default) as far as the format keeps them;
    returns the report's ``shapes`` record: the form built (dynamic, buckets or static), its dynamic axes, the
    buckets, and why a form is static or bucketed."""
    from slimx.export.shapes import apply_shape_policy, bucket_sizes, is_text, seq_range_of

    if loaded.module is None or loaded.source == "pt2":  # an ONNX file or a .pt2 program keeps the shapes it has
        if m.buckets:
            raise UsageError(f"--buckets {m.buckets}", f"needs a PyTorch model (a {loaded.source} input keeps its "
                             "own shapes)", "give the model as a timm name, a HF folder or a factory")
        return {"form": "as given", "dynamic": [], "why": f"a {loaded.source} input keeps its own shapes"}
    longest, why = loaded.max_positions, ""
    if precision == "int8" and not m.seq_len and is_text(loaded.inputs):
        # static int8 scales hold for the range calibration covered: sentences padded to the export length
        longest = min(longest or loaded.inputs[0].shape[1], loaded.inputs[0].shape[1])
        why = f"int8: the sequence range stops at the calibrated length {longest} (--seq-len widens it)"
    specs = apply_shape_policy(loaded.inputs, longest, m.seq_len, m.batch, m.static)
    asked = any(s.dynamic for s in specs)
    seq = seq_range_of(specs)
    if m.buckets and (not target.buckets or seq is None):
        raise UsageError(f"--buckets {m.buckets}", f"applies to a dynamic sequence axis on a format that builds "
                         f"buckets (tflite, coreml, tensorrt), not to this {'model' if seq is None else target.name}",
                         "drop --buckets" if seq is not None else "drop --buckets (or --static)")
    buckets = None
    if seq is not None and target.buckets and (m.buckets or target.default_buckets):
        buckets = bucket_sizes(*seq, m.buckets)
        # a dynamic format keeps every axis (the buckets shape how it is built: profiles); a bucketed one keeps
        # only the sequence axis, spanning the buckets, and every other axis is static
        dropped = not target.dynamic_shapes and any(a != 1 for s in specs for a, _, _ in s.dynamic)
        specs = [dataclasses.replace(s, dynamic=tuple((a, lo, min(hi, buckets[-1]) if a == 1 else hi)
                                                      for a, lo, hi in s.dynamic
                                                      if a == 1 or target.dynamic_shapes)) for s in specs]
        why = target.buckets_reason + (f"; {target.static_reason}" if dropped else "")
        specs = [s.sized({1: min(s.shape[1], buckets[-1])}) for s in specs]
    elif asked and not target.dynamic_shapes:
        specs, why = [s.static() for s in specs], target.static_reason
    elif m.static:
        why = "--static"
    elif not asked:
        why = "not a text model (give --batch MIN..MAX for a dynamic batch axis)" if not is_text(specs) else ""
    loaded.inputs = specs
    dynamic = [{"input": s.name, "axis": a, "min": lo, "max": hi} for s in specs for a, lo, hi in s.dynamic]
    form = "buckets" if buckets else "dynamic" if dynamic else "static"
    out = {"form": form, "dynamic": dynamic, "why": why}
    if buckets:
        out["buckets"] = list(buckets)
    return out


def compress(cfg: ExportConfig, prepared: Prepared, progress: Progress) -> Compressed:
    """Run the passes (then recovery) on the deployment form; without passes the model goes on as it is."""
    d = prepared.deployable
    if not prepared.specs:
        return Compressed(d.module, d.module)
    with progress.stage("compress", ", ".join(s.name for s in prepared.specs)):
        record = run_passes(d.module, prepared, cfg, progress)
        original_stats = model_stats(d.loaded, d.module, d.example)
        module = record.pop("model")
    return Compressed(module, d.module, record, original_stats)


def compile_artifact(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, staging: Path,
                     progress: Progress) -> Compiled:
    """torch.export the model to compile, then the target's op check and compile (int8: with calibration)."""
    from slimx.export.program import program_of
    from slimx.export.shapes import seq_range_of
    from slimx.quant import calibration_batches

    d, target, device = prepared.deployable, prepared.target, prepared.device
    with progress.stage("torch.export"):
        program = program_of(d, compressed.module)
        stats = model_stats(d.loaded, compressed.module, d.example)
        if compressed.original_stats is not None:
            stats["original"] = compressed.original_stats
    with progress.stage("compile", f"{target.name} for {device.name}"):
        coverage = target.check(program)
        if not coverage.ok:
            op, count = next(iter(coverage.unsupported.items()))
            where = coverage.where.get(op)
            more = f" (and {count - 1} more)" if count > 1 else ""
            raise SlimxFailure(
                f"op {op}" + (f" from module {where}" if where else "") + more,
                f"the {target.name} format cannot express it at opset {prepared.options.opset}",
                "replace that module with an exportable one, try another --opset, or pick another --format")
        calib_record, batches = None, None
        real_lengths = seq_range_of(program.inputs) is not None
        if prepared.precision == "int8":
            calib = prepared.calib
            batches, synthetic = calibration_batches(calib, program.inputs, count=cfg.data.samples(False),
                                                     seed=cfg.model.seed, warn=progress.warn)
            calib_record = {"source": calib.source if calib else "synthetic random inputs",
                            "kind": calib.kind if calib else "synthetic", "samples": len(batches),
                            "synthetic": synthetic}
            if real_lengths:  # each sample at its real length: padding does not set the int8 ranges
                batches = at_real_lengths(batches, program)
        artifact = target.compile(program, device, prepared.options, staging, calib_batches=batches)
        built = artifact.meta.get("buckets")
        if built and prepared.shapes.get("buckets"):  # how the format built them (CoreML: enumerated or a range)
            prepared.shapes["built"] = built
            if built.get("why"):
                prepared.shapes["why"] = built["why"]
        if calib_record:
            artifact.meta["calibration"] = calib_record
            if real_lengths:
                artifact.meta["calibration_lengths"] = "real (each sample cut to its last real token)"
        for f in artifact.files():
            progress.note(f"{f['path']}: {human(f['bytes'])}B")
    return Compiled(program, stats, coverage, artifact)


def prove(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, compiled: Compiled, staging: Path,
          progress: Progress) -> Proven:
    """Parity in the artifact's own runtime, latency (measured, or estimated for a device not at hand) and,
    after compression, the speed-up against the uncompressed model compiled the same way."""
    with progress.stage("parity", f"{cfg.prove.parity_inputs} fresh inputs"):
        parity = run_parity(compiled.program, prepared.target, compiled.artifact, cfg, prepared.calib,
                            prepared.precision, selection_tolerance(compressed.record))
        if parity["measured"]:
            progress.note(f"cosine {parity['cosine']:.6f}, max abs {parity['max_abs']:.2e}, "
                          f"rel err {parity['rel_err']:.2e}")
        else:
            progress.note(f"not measured: {parity['reason']}")
    with progress.stage("latency"):
        latency, host_latency = run_latency(prepared.device, prepared.target, compiled.artifact, compiled.program,
                                            cfg, prepared.precision, prepared.calib)
        speedup = None
        if compressed.record is not None:
            speedup = measure_speedup(prepared, compressed, compiled, cfg, staging, progress)
    return Proven(parity, latency, host_latency, speedup)


def at_real_lengths(batches: list[tuple], program) -> list[tuple]:
    """Padded text batches cut to their real length (the last real token of each batch)."""
    from slimx.slim.base import mask_index_of, trim_padding

    mask_index = mask_index_of(program.input_names)
    return [trim_padding(b, mask_index) for b in batches]


def check_verdicts(parity: dict, artifact, out: Path) -> None:
    """Fail the run (exit 1, report kept) when parity, or the proxy's where the runtime is missing, failed."""
    proxy = parity.get("proxy") or {}
    if not parity.get("measured") and proxy.get("measured") and not proxy["passed"]:
        raise SlimxFailure(
            f"parity of {proxy.get('what', 'the ONNX form')}",
            f"cosine {proxy['cosine']:.6f} / rel err {proxy['rel_err']:.2e} is past the tolerance "
            f"(min cosine {proxy['tolerance']['min_cosine']}, max rel err {proxy['tolerance']['max_rel_err']}); "
            f"the report is in {out / 'report.json'}",
            "use more or better --calib data, another --precision, or loosen --min-cosine / --max-rel-err",
        )
    if parity.get("measured") and not parity["passed"]:
        failed = parity  # the fresh inputs, or else the calibration data that failed
        where = f"on {parity.get('n_inputs')} fresh inputs"
        calib = parity.get("calibration") or {}
        if calib and not calib.get("passed", True) and (parity.get("cosine", 0) >= parity["tolerance"]["min_cosine"]
                                                          and parity.get("rel_err", 0) <= parity["tolerance"][
                                                              "max_rel_err"]):
            failed, where = calib, f"on the calibration data ({calib.get('n_inputs')} samples, worst sample)"
        raise SlimxFailure(
            f"parity of {artifact.path.name}",
            f"cosine {failed['cosine']:.6f} / rel err {failed['rel_err']:.2e} {where} is past the tolerance "
            f"(min cosine {parity['tolerance']['min_cosine']}, max rel err {parity['tolerance']['max_rel_err']}); "
            f"the report is in {out / 'report.json'}",
            "inspect the report, or loosen --min-cosine / --max-rel-err if this drift is acceptable",
        )


FIX_HINTS = {
    "lowrank": "a larger rank_ratio (or energy=0.99) or exclude=attention",
    "dsformer": "a larger k_ratio or density",
    "axformer": "a smaller tolerance",
    "ecoformer": "more bits, or fewer layers (include=...)",
    "hard-attention": "a larger k",
}


def check_fidelity(record: dict | None, out: Path) -> None:
    """Fail the run (exit 1, report kept) when the compressed model's held-out fidelity is below the floor."""
    gate = (record or {}).get("gate")
    if not gate or gate["passed"] or not gate.get("gated", True):
        return
    worst = gate.get("lost_most") or {}
    name = worst.get("pass", "the passes")
    hint = FIX_HINTS.get(name, "milder settings")
    more = "" if gate.get("recovered") else ", or --recover steps=300"
    if gate["metric"].startswith("held-out accuracy"):
        what = (f"held-out accuracy {gate['accuracy']:.4f} is {gate['value']:.2f} points below the original's "
                f"{gate['accuracy_reference']:.4f} (at most {gate['floor']:g} allowed, --max-accuracy-drop)")
    else:
        what = f"held-out cosine {gate['value']:.4f} is below --min-fidelity {gate['floor']:g}"
    lost = (f"; {name} lost the most ({worst['before']:.4f} -> {worst['after']:.4f})" if worst else "")
    raise SlimxFailure("fidelity of the compressed model", f"{what}{lost}; the report is in {out / 'report.json'}",
                       f"try {name} with {hint}{more}, or more --calib data")


# --------------------------------------------------------------------------- the stages' work


def selection_tolerance(record: dict | None) -> dict | None:
    """The loosest relative-error ceiling the applied passes ask parity for, with why, or None. A pass that puts a
    selection in the graph (top-k attention) asks for one: where two scores tie to float precision, PyTorch and
    the runtime may keep different keys, so a few outputs move by a step while the cosine stays at 0.99999."""
    asks = [p["parity"] for p in (record or {}).get("passes", []) if p.get("parity")]
    return max(asks, key=lambda a: a["max_rel_err"]) if asks else None


def run_parity(program, target, artifact, cfg: ExportConfig, calib, precision: str,
               selection: dict | None = None) -> dict:
    """The artifact in its own runtime against the PyTorch model, on fresh inputs and on calibration data.

    For a quantized artifact this is its drift from the fp32 model. A dynamic text artifact is checked at
    several lengths (1, short, the calibration median, the maximum), a dynamic batch at its smallest and largest
    size (``per_shape``). Where the target's
    runtime is missing here but the target names a proxy (TensorRT: its ONNX in onnxruntime), the proxy is run
    too and reported as ``proxy``: evidence about the graph and its Q/DQ scales, not the engine.
    """
    import numpy as np

    from slimx.export.shapes import at_length, lengths_of, seq_range_of

    if program.module is None:
        return {"measured": False, "reason": "the input was ONNX: there is no PyTorch model to compare against"}
    tol = cfg.prove.tolerance(precision)
    loosened = None
    if selection is not None and cfg.prove.max_rel_err is None and selection["max_rel_err"] > tol.max_rel_err:
        tol = dataclasses.replace(tol, max_rel_err=selection["max_rel_err"])
        loosened = selection["why"]
    seed = PARITY_SEED_BASE + cfg.model.seed
    n = cfg.prove.parity_inputs
    specs = program.inputs
    seq = seq_range_of(specs)
    sizes = []  # (axis, size): the dynamic axes' sizes parity is checked at
    if seq is not None:
        real = lengths_of(calib.batches, specs) if calib is not None else []
        typical = int(np.median(real)) if real else specs[0].shape[1]
        sizes += [(1, n_) for n_ in sorted({seq[0], min(max(8, seq[0]), seq[1]), min(max(typical, seq[0]), seq[1]),
                                            seq[1]})]
    batch = next(((lo, hi) for s in specs for a, lo, hi in s.dynamic if a == 0), None)
    if batch is not None:
        sizes += [(0, batch[0]), (0, batch[1])]
    groups = None
    if not sizes:
        batches = [sample_inputs(specs, seed=seed + i) for i in range(n)]
    else:
        each = max(1, -(-n // len(sizes)))
        groups = {(axis, size): [sample_inputs(at_length(specs, size) if axis == 1 else
                                               [s.sized({0: size}) for s in specs], seed=seed + 100 * size + i)
                                 for i in range(each)] for axis, size in sizes}
        batches = [b for group in groups.values() for b in group]
    if calib is not None and seq is not None:  # the data as it will be sent: each sample at its real length
        calib = dataclasses.replace(calib, batches=at_real_lengths(calib.batches, program))
    runner = target.runner(threads=cfg.timing.threads)
    if runner is not None:
        result = _parity_in(runner, artifact, artifact.path, program, batches, calib, tol, groups)
    else:
        result = {"measured": False, "reason": target.runner_missing_reason()}
    proxy = target.proxy(artifact, threads=cfg.timing.threads)
    if proxy is not None:
        path, runner, what = proxy
        result["proxy"] = _parity_in(runner, artifact, path, program, batches, calib, tol, groups)
        result["proxy"]["what"] = what
    result["precision"] = precision
    if loosened is not None:
        result["tolerance_why"] = loosened
    return result


def _parity_in(runner, artifact, path, program, batches, calib, tol, groups=None) -> dict:
    from slimx.export import check_parity, torch_outputs

    view = dataclasses.replace(artifact, path=path)
    session = runner.session(path)
    seen: dict[int, tuple] = {}  # outputs per batch, so the per-length figures reuse the overall run

    def outputs(batch):
        if id(batch) not in seen:
            seen[id(batch)] = (torch_outputs(program.module, batch), runner.run(view, batch, session=session))
        return seen[id(batch)]

    def reference(batch):
        return outputs(batch)[0]

    def candidate(batch):
        return outputs(batch)[1]

    result = check_parity(reference, candidate, batches, runner.name, tol).to_dict()
    if groups:
        result["per_shape"] = []
        for (axis, size), group in groups.items():
            one = check_parity(reference, candidate, group, runner.name, tol)
            result["per_shape"].append({"axis": "seq" if axis == 1 else "batch", "size": size,
                                        "n_inputs": one.n_inputs, "cosine": one.cosine, "rel_err": one.rel_err,
                                        "passed": one.passed})
    if calib is not None:
        on_data = check_parity(lambda b: torch_outputs(program.module, b),
                               lambda b: runner.run(view, b, session=session), calib.batches, runner.name, tol,
                               data=calib.describe()).to_dict()
        result["calibration"] = on_data
        result["passed"] = result["passed"] and on_data["passed"]
    return result


def run_latency(device, target, artifact, program, cfg: ExportConfig, precision: str = "fp32",
                calib=None) -> tuple[dict, dict | None]:
    """Measure with the target's own runtime when it runs here; say plainly when the device is not at hand.

    Returns the report's ``latency`` (for the device) and ``host_latency`` (measured here for another device)."""
    from slimx.devices.records import Latency

    t = cfg.timing
    inputs = sample_inputs(program.inputs, seed=cfg.model.seed + 7)
    runner = target.runner(threads=t.threads)
    host = None
    if runner is not None:
        host = Latency.measured("host", runner.time(artifact, inputs, warmup=t.warmup, runs=t.runs))
        over = latency_over_lengths(runner, artifact, program.inputs, calib, t, cfg.model.seed)
        if over is not None:
            host.details["over_lengths"] = over
    if device.name == "host":
        if host is None:
            return Latency.not_measured("host", target.runner_missing_reason()).to_dict(), None
        return host.to_dict(), None
    reason = f"no {device.name} is attached and no runner for it exists here"
    host_dict = host.to_dict() if host is not None else None
    if program.exported is not None:
        from slimx.devices.estimator import default_setting, describe, estimate_latency
        from slimx.devices.opmix import op_mix

        try:
            setting = default_setting(device, precision)
            est = estimate_latency(op_mix(program.exported), device, setting)
        except UsageError as exc:
            reason += f"; no estimate either ({exc.line()})"
        else:
            est["label"] = describe(est, device)
            over = estimate_over_lengths(program, device, setting, calib,
                                         (artifact.meta.get("buckets") or {}).get("sizes"))
            if over is not None:
                over["method"] = "the estimator's price of the program at each length"
                est["over_lengths"] = over
            est["not_measured"] = reason + " (measure it with `slimx profile OUT --device D --remote URL`)"
            return Latency.estimated(est).to_dict(), host_dict
    return Latency.not_measured(device.name, reason).to_dict(), host_dict


def latency_over_lengths(runner, artifact, specs, calib, t: TimingConfig, seed: int) -> dict | None:
    """A dynamic text artifact timed at several sequence lengths (no padding: every position real), a bucketed
    one at each bucket (``over_lengths``)."""
    from slimx.export.shapes import at_length, seq_range_of

    if seq_range_of(specs) is None:
        return None
    runs = max(10, t.runs // 5)

    def time_at(length: int) -> dict:
        inputs = tuple(x.fill_(1) if s.kind == "mask" else x
                       for s, x in zip(specs, sample_inputs(at_length(specs, length), seed=seed + 7), strict=True))
        timing = runner.time(artifact, inputs, warmup=max(1, t.warmup), runs=runs)
        return {"median_ms": round(timing.median_ms, 4), "p90_ms": round(timing.p90_ms, 4)}

    out = over_lengths(specs, calib, (artifact.meta.get("buckets") or {}).get("sizes"), time_at)
    out["runs_each"] = runs
    return out


def estimate_over_lengths(program, device, setting, calib, buckets) -> dict | None:
    """The estimator's price of a dynamic text program at the same lengths a measurement would use (a bucketed
    artifact at each bucket: it runs padded to one), and over the calibration data's real lengths."""
    from slimx.devices.estimator import estimate_latency
    from slimx.devices.opmix import op_mix
    from slimx.export.shapes import seq_range_of

    if program.exported is None or seq_range_of(program.inputs) is None:
        return None

    def price_at(length: int) -> dict:
        est = estimate_latency(op_mix(program.exported, length), device, setting, top=0)
        return {"median_ms": round(est["total_ms"], 4)}

    return over_lengths(program.inputs, calib, buckets, price_at)


def over_lengths(specs, calib, buckets, cost_at) -> dict:
    """Latency at several sequence lengths (``cost_at(length)`` -> {median_ms, ...}): each bucket, or 5 lengths
    spread over the range, and, with calibration text, the latency expected over that data's real lengths
    (interpolated between the lengths; a bucketed artifact runs each sample at its bucket's cost): what a user
    sending those sentences one at a time would see."""
    import numpy as np

    from slimx.export.shapes import lengths_of, measure_lengths, pick_bucket, seq_range_of

    real = lengths_of(calib.batches, specs) if calib is not None else []
    typical = int(np.median(real)) if real else None
    rows = [{"length": n, **cost_at(n)} for n in (buckets or measure_lengths(*seq_range_of(specs), typical=typical))]
    out = {"axis": "seq", "lengths": rows}
    if buckets:
        out["buckets"] = list(buckets)
    if real:
        if buckets:
            cost = {r["length"]: r["median_ms"] for r in rows}
            per_sample = np.array([cost[pick_bucket(n, buckets, truncate=True)] for n in real])
            method = "each sample at its real length, run in the smallest bucket that holds it"
        else:
            per_sample = np.interp(real, [r["length"] for r in rows], [r["median_ms"] for r in rows])
            method = "each sample at its real length, interpolated between the measured lengths"
        out["on_data"] = {"data": calib.describe(), "samples": len(real), "median_length": int(np.median(real)),
                          "median_ms": round(float(np.median(per_sample)), 4),
                          "mean_ms": round(float(np.mean(per_sample)), 4),
                          "p90_ms": round(float(np.percentile(per_sample, 90)), 4), "method": method}
    return out


def _recover_config(text: str):
    from slimx._core.config import config_from_dict, parse_key_values
    from slimx.slim import RecoverConfig

    values = parse_key_values(text, f"--recover {text}", "--recover steps=200,lr=5e-5")
    return config_from_dict(RecoverConfig, values, "--recover")


def run_passes(module, prepared: Prepared, cfg: ExportConfig, progress) -> dict:
    """Apply the passes (then recovery) to the deployment-form model; fidelity on held-out samples after each."""
    from slimx.quant import calibration_batches
    from slimx.slim import PassContext, apply, finalize, recipe_text, recover, torch_fidelity
    from slimx.slim.base import load_recipe_quant, mask_index_of

    def warn(_):
        progress.warn("compressing with SYNTHETIC calibration inputs: rank choices, recovery and fidelity "
                      "figures do not reflect real data; give --calib")

    loaded, calib, specs = prepared.deployable.loaded, prepared.calib, prepared.specs
    count = cfg.data.samples(True) if calib is not None or cfg.data.calib_samples else SYNTHETIC_PASS_SAMPLES
    batches, synthetic = calibration_batches(calib, loaded.inputs, count=max(count, 16), seed=cfg.model.seed,
                                             warn=warn)
    held = max(2, len(batches) // 4) if len(batches) >= 8 else 0
    fit, heldout = (batches[:-held], batches[-held:]) if held else (batches, batches)
    labels = calib.labels if calib is not None else None
    fit_labels, held_labels = ((labels[:-held], labels[-held:]) if held else (labels, labels)) if labels else (None,
                                                                                                               None)
    data = (f"{len(heldout)} held-out {'SYNTHETIC ' if synthetic else ''}samples of "
            f"{calib.source if calib else 'random inputs'}")
    if not held:
        data += " (too few to hold any out: in-sample)"
    mask_index = mask_index_of([s.name for s in loaded.inputs])
    ctx = PassContext(calib=fit, synthetic=synthetic, teacher=module, device=prepared.device, progress=progress,
                      mask_index=mask_index, latency_model=latency_model_for(prepared.device, prepared.precision),
                      labels=fit_labels)
    teacher = module
    model = module
    records = []
    for spec in specs:
        model, (result,) = apply(model, [spec], ctx)
        entry = result.to_dict()
        entry["fidelity"] = torch_fidelity(teacher, model, heldout, held_labels)
        records.append(entry)
        progress.note(f"{spec.name}: {result.summary}; held-out cosine {entry['fidelity']['cosine_mean']:.4f}")
    quant = load_recipe_quant(cfg.compress.recipe) if cfg.compress.recipe else None
    out = {"model": model, "passes": records, "recipe": recipe_text(specs, quant), "calibration": {
        "source": calib.source if calib else "synthetic random inputs", "fit_samples": len(fit),
        "heldout_samples": len(heldout), "synthetic": synthetic}}
    out["fidelity"] = {"data": data, "after_passes": records[-1]["fidelity"]}
    if prepared.recover is not None:
        model, record = recover(model, teacher, fit, prepared.recover, progress, mask_index=mask_index)
        out["recover"] = {"config": dataclasses.asdict(prepared.recover), **record}
        out["fidelity"]["after_recover"] = torch_fidelity(teacher, model, heldout, held_labels)
        progress.note(f"recovered: held-out cosine {out['fidelity']['after_recover']['cosine_mean']:.4f}")
    out["fidelity"]["final"] = out["fidelity"].get("after_recover", out["fidelity"]["after_passes"])
    out["gate"] = fidelity_gate(out["fidelity"]["final"], records, cfg.compress, bool(held_labels),
                                prepared.recover is not None, synthetic)
    out["model"] = finalize(model)  # deployable form (e.g. dense-sparse layers as two plain linears)
    return out


def fidelity_gate(final: dict, records: list[dict], c: CompressConfig, labelled: bool, recovered: bool,
                  synthetic: bool = False) -> dict:
    """Fidelity judged like parity: held-out cosine to the original at or above the floor (with labels: accuracy
    at most ``max_accuracy_drop`` points below the original's), and which pass lost the most. On synthetic
    calibration inputs the figure is reported but does not fail the run (it says nothing about real data)."""
    if labelled and "accuracy" in final:
        drop = DEFAULT_MAX_ACCURACY_DROP if c.max_accuracy_drop is None else c.max_accuracy_drop
        value = round((final["accuracy_reference"] - final["accuracy"]) * 100, 2)
        gate = {"metric": "held-out accuracy drop (points)", "value": value, "floor": drop, "passed": value <= drop,
                "accuracy": final["accuracy"], "accuracy_reference": final["accuracy_reference"]}
        key, start = "accuracy", final["accuracy_reference"]
    else:
        floor = DEFAULT_MIN_FIDELITY if c.min_fidelity is None else c.min_fidelity
        gate = {"metric": "held-out cosine to the original", "value": final["cosine_mean"], "floor": floor,
                "passed": final["cosine_mean"] >= floor}
        key, start = "cosine_mean", 1.0
    previous, worst = start, None
    for record in records:  # what each pass cost, before recovery
        now = record["fidelity"].get(key, previous)
        lost = previous - now
        if worst is None or lost > worst["lost"]:
            worst = {"pass": record["name"], "before": round(previous, 4), "after": round(now, 4),
                     "lost": round(lost, 4)}
        previous = now
    gate["lost_most"] = worst
    gate["recovered"] = recovered
    gate["gated"] = not synthetic
    if synthetic:
        gate["why"] = "not gated: measured on synthetic calibration inputs, which say nothing about real data"
    return gate


def latency_model_for(device, precision: str):
    """The latency model passes get for the chosen device: the per-op estimator in the device's setting for
    this precision, or None when the device's profile has no estimator settings."""
    from slimx.devices.estimator import EstimatorLatencyModel

    try:
        return EstimatorLatencyModel.for_device(device, precision)
    except UsageError:
        return None


def measure_speedup(prepared: Prepared, compressed: Compressed, compiled: Compiled, cfg: ExportConfig, staging,
                    progress) -> dict:
    """Compile the uncompressed model the same way and time both, interleaved, in the same run and runtime."""
    from slimx.export.program import program_of
    from slimx.export.shapes import seq_range_of

    target, t = prepared.target, cfg.timing
    runner = target.runner(threads=t.threads)
    if runner is None:
        return {"measured": False, "reason": target.runner_missing_reason()}
    base_dir = staging / ".baseline"
    base_dir.mkdir()
    try:
        base_program = program_of(prepared.deployable, compressed.original_module)
        options = prepared.options
        base_options = dataclasses.replace(options, precision="fp32" if options.precision == "int8" else
                                           options.precision)
        baseline = target.compile(base_program, prepared.device, base_options, base_dir)
        inputs = sample_inputs(compiled.program.inputs, seed=cfg.model.seed + 7)
        runs = max(30, t.runs // 2)
        base_ms, comp_ms = [], []
        for _ in range(2):  # interleaved rounds, so drift in machine load hits both alike
            base_ms.append(runner.time(baseline, inputs, warmup=t.warmup, runs=runs).median_ms)
            comp_ms.append(runner.time(compiled.artifact, inputs, warmup=t.warmup, runs=runs).median_ms)
        on_data = None
        if prepared.calib is not None and seq_range_of(compiled.program.inputs) is not None:
            real = at_real_lengths(prepared.calib.batches, compiled.program)
            base_data, comp_data = paired_over_data(runner, baseline, compiled.artifact, real)
            on_data = {"data": prepared.calib.describe(), "baseline_ms": round(base_data, 4),
                       "compressed_ms": round(comp_data, 4), "ratio": round(base_data / comp_data, 3),
                       "method": "mean per sample over the data at its real lengths, best of 3 interleaved rounds"}
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    base, comp = min(base_ms), min(comp_ms)
    out = {"measured": True, "runtime": runner.name, "baseline_median_ms": round(base, 4),
           "compressed_median_ms": round(comp, 4), "ratio": round(base / comp, 3),
           "baseline_precision": base_options.precision, "method": "best of 2 interleaved rounds of medians"}
    if on_data is not None:  # the lengths users send: the headline figure
        out["at_export_shape"] = {k: out[k] for k in ("baseline_median_ms", "compressed_median_ms", "ratio")}
        out["on_data"] = on_data
        out["ratio"] = on_data["ratio"]
        progress.note(f"speedup {on_data['ratio']:.2f}x on the data at real lengths ({on_data['baseline_ms']:.3f} ms"
                      f" -> {on_data['compressed_ms']:.3f} ms per sample); {base / comp:.2f}x at the export shape")
    else:
        progress.note(f"speedup {base / comp:.2f}x ({base:.3f} ms -> {comp:.3f} ms, {runner.name})")
    return out


def paired_over_data(runner, first, second, batches: list[tuple], rounds: int = 3) -> tuple[float, float]:
    """Mean milliseconds per sample of two artifacts over the same samples (each at its own shape), in
    interleaved rounds so that machine drift hits both alike; the best round of each."""
    sessions = (runner.session(first.path), runner.session(second.path))
    for artifact, session in zip((first, second), sessions, strict=True):
        runner.run(artifact, batches[0], session=session)  # warm-up: first-call allocation is not the model
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, (artifact, session) in enumerate(zip((first, second), sessions, strict=True)):
            start = time.perf_counter()
            for batch in batches:
                runner.run(artifact, batch, session=session)
            best[i] = min(best[i], (time.perf_counter() - start) * 1000 / len(batches))
    return best[0], best[1]


def model_stats(loaded, module, example) -> dict:
    """Parameter count and multiply-accumulates of one forward pass (torch's FLOP counter / 2)."""
    if module is None:
        return {"params": _onnx_params(loaded.onnx_path), "macs": None,
                "macs_note": "not counted for ONNX input"}
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    if params == 0 and hasattr(module, "state_dict"):
        params = sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*example)
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}


def _onnx_params(path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    # weights, not the scalar constants the exporter lifts into initializers
    return int(sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.dims and i.data_type in floats))


def build_report(cfg: ExportConfig, prepared: Prepared, compressed: Compressed, compiled: Compiled, proven: Proven,
                 progress) -> dict:
    from slimx.report import SCHEMA_VERSION

    loaded, device, artifact = prepared.deployable.loaded, prepared.device, compiled.artifact
    record = prepared.deployable.record
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "slimx",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(cfg.command) or None,
        "config": cfg.flat(),
        "model": {
            "name": loaded.name,
            "source": loaded.source,
            **compiled.stats,
            "inputs": [s.to_dict() for s in loaded.inputs],
            "outputs": loaded.output_names,
            "weights": loaded.weights,
            "notes": loaded.notes,
        },
        "device": {"name": device.name, "display_name": device.display_name},
        "target": {"format": prepared.target.name, "precision": prepared.precision,
                   "opset": artifact.meta.get("opset")},  # the opset the file has (None: not an ONNX format)
        "shapes": prepared.shapes,
        "deploy": record.to_dict() if record else None,
        "coverage": compiled.coverage.to_dict(),
        "artifacts": artifact.files(),
        "compile": artifact.meta,
        "parity": proven.parity,
        "latency": proven.latency,
        "passes": [],
        "stages_s": dict(progress.timings),
        "versions": tool_versions(),
    }
    if proven.host_latency is not None:
        report["host_latency"] = proven.host_latency
    report["out"] = str(prepared.out)
    if compressed.record is not None:
        report["passes"] = compressed.record["passes"]
        report["compression"] = {k: v for k, v in compressed.record.items() if k != "passes"}
        report["compression"]["speedup"] = proven.speedup
    return report


def write_json(path: Path, data: dict) -> None:
    import json

    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def write_html(path: Path, report: dict) -> None:
    """``report.html``: the same report for people (``slimx.html``), rendered from the report's JSON form."""
    import json

    from slimx.html import export_page, write

    write(path, export_page(json.loads(json.dumps(report, default=_json_default))))


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def publish(staging: Path, out: Path) -> None:
    """Move every finished file from the staging folder into OUT, replacing older ones."""
    for item in sorted(staging.iterdir()):
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
