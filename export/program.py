"""torch.export and ONNX conversion, with failures turned into one line naming the op and module."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimx._core.errors import SlimxFailure, UsageError, exception_chain, first_line, root_cause

DEFAULT_OPSET = 18
_OP_RE = re.compile(r"((?:aten|prims)[.:]+[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?)")


def check_forward(module, example_inputs: tuple, input_desc: str):
    """Run the model once eagerly; a failure here means the inputs do not fit the model."""
    import torch

    try:
        with torch.no_grad():
            return module(*example_inputs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        raise UsageError(
            f"inputs {input_desc}",
            f"do not fit the model ({first_line(exc, 160)})",
            "give the shapes the model expects with --input-shape (e.g. 1x3x224x224)",
        ) from exc


def export_program(module, example_inputs: tuple, specs=None):
    """``torch.export`` the module (non-strict) and return the ExportedProgram; the dynamic axes of ``specs``
    (``InputSpec.dynamic``) stay symbolic."""
    import torch

    from slimx.export.shapes import dynamic_shapes, specialisation_error

    dims = dynamic_shapes(specs) if specs else None
    try:
        with quiet():
            return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dims, strict=False)
    except Exception as exc:
        failure = specialisation_error(exc, specs) if dims else None
        if failure is not None:
            raise failure from exc
        raise SlimxFailure(
            "torch.export",
            f"could not capture the model{_where(exc)} ({first_line(root_cause(exc), 160)})",
            "make the failing code path static (no data-dependent Python control flow), "
            "or run with --debug for the full trace",
        ) from exc


def program_to_onnx(program, path: Path, input_names: list[str], output_names: list[str],
                    opset: int = DEFAULT_OPSET) -> Path:
    """Convert an ExportedProgram to ONNX at ``path`` (dynamo exporter), then check it.

    The graph's inputs and outputs are given the names slimx uses; any internal value that
    already had one of those names is renamed first. Shape inference and ``onnx.checker`` run on
    the written file. The file is written under a temporary name and renamed when complete.
    """
    import onnx
    import torch

    try:
        with quiet():
            onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False,
                                             optimize=True)
    except Exception as exc:
        op = _failing_op(exc)
        where = module_of_op(program, op) if op else None
        what = f"op {op}" + (f" (from module {where})" if where else "") if op else "the model"
        raise SlimxFailure(
            f"ONNX export of {what}",
            f"failed at opset {opset} ({first_line(root_cause(exc), 160)})",
            "try another --opset, replace the module with an exportable one, or run with --debug",
        ) from exc
    _rename_io(onnx_program.model.graph, input_names, output_names)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        onnx_program.save(str(tmp), external_data=False)
        model = onnx.load(str(tmp))
        written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:  # the exporter converts between opsets only where the version converter can
            raise UsageError(f"--opset {opset}", f"the exporter could not write this model at opset {opset} "
                             f"(it wrote {written})", f"use --opset {written}, or leave --opset at its default")
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
        onnx.checker.check_model(inferred, full_check=True)
        onnx.save(inferred, str(tmp))
        os.replace(tmp, path)
    except UsageError:
        raise
    except Exception as exc:
        raise SlimxFailure("ONNX model", f"failed its checks ({first_line(exc, 160)})",
                           "run with --debug and report the model") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _rename_io(graph, input_names: list[str], output_names: list[str]) -> None:
    wanted = dict(zip([v.name for v in graph.inputs], input_names, strict=False))
    wanted.update(zip([v.name for v in graph.outputs], output_names, strict=False))
    targets = set(wanted.values())
    io_values = set(graph.inputs) | set(graph.outputs)
    # rename any other value that already holds one of the target names
    for value in _all_values(graph):
        if value not in io_values and value.name in targets:
            value.name = f"{value.name}__internal"
    for value in list(graph.inputs) + list(graph.outputs):
        if value.name in wanted:
            value.name = wanted[value.name]


def _all_values(graph):
    import onnx_ir as ir

    seen = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        seen.extend(v for v in node.outputs if v is not None)
    seen.extend(graph.initializers.values())
    return seen


def _failing_op(exc: BaseException) -> str | None:
    for text in map(str, exception_chain(exc)):
        match = _OP_RE.search(text)
        if match:
            return match.group(1).replace("::", ".")
    return None


def module_of_op(program, op: str) -> str | None:
    """The module path (and class) of the first node calling ``op`` in an exported graph."""
    name = op.split(".")[1] if op.count(".") >= 1 else op
    for node in program.graph.nodes:
        if node.op == "call_function" and name in str(node.target):
            return node_module_path(node)
    return None


def node_module(node) -> tuple[str, str] | None:
    """``(path, class name)`` of the innermost module a graph node was traced in, from torch.export metadata
    (None for a node outside every module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    return path, getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")


def node_module_path(node) -> str | None:
    """``path (Class)`` of the innermost module a graph node was traced in, from torch.export metadata."""
    found = node_module(node)
    return None if found is None else f"{found[0] or '<root>'} ({found[1]})"


def _where(exc: BaseException) -> str:
    text = str(exc)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    if frames:
        file, line, func = frames[-1]
        return f" at {Path(file).name}:{line} in {func}"
    op = _failing_op(exc)
    return f" at op {op}" if op else ""


@contextlib.contextmanager
def native_stderr_to_null():
    """Silence what native libraries (TensorFlow/LiteRT C++ logging) write straight to file descriptor 2."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor (e.g. captured streams): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def quiet():
    """Silence the exporters' chatter (progress prints, optimizer notes); errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo",
                                                "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class Program:
    """What targets compile: the exported program plus what slimx knows about its I/O.

    Attributes:
        name: the model's display name.
        exported: the ExportedProgram, or None when the input was ONNX.
        module: the deployment-form PyTorch module (the parity reference), or None.
        inputs: input specs, in call order.
        output_names: names of the flattened outputs.
        onnx_source: an ONNX file the user gave (the ONNX target copies it instead of converting).
    """

    def __init__(self, name, exported, module, inputs, output_names, onnx_source=None):
        self.name = name
        self.exported = exported
        self.module = module
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.onnx_source = onnx_source
        self.keep_fp32: list[str] = []  # graph nodes an fp16 artifact keeps in fp32 (export.preflight)
        self.graph_fixed = False  # the pre-flight changed the exported graph (fp16 fixes): converters take that graph
        self._derived: dict = {}

    def derived(self, key: str, make):
        """A value computed from the program once (e.g. a decomposition a target needs in check and compile)."""
        if key not in self._derived:
            self._derived[key] = make(self.exported)
        return self._derived[key]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def named_module(self):
        """The module taking its inputs by the spec's names (what keyword-passing converters trace):
        every target that binds inputs by name goes through this one wrapper (``export.binding``). Where the
        pre-flight fixed the exported graph (``graph_fixed``), it wraps that graph's module, so that a converter
        which traces again (LiteRT) converts the fixed program, not the module it came from."""
        if "named_module" not in self._derived:
            from slimx.export.binding import NamedInputs

            self._derived["named_module"] = NamedInputs(self.traced_module(), self.input_names)
        return self._derived["named_module"]

    def traced_module(self):
        """What a converter that re-traces should trace: the deployment module, or the fixed exported graph's
        module (``graph_fixed``; parity still compares against ``module``, the user's own)."""
        if self.graph_fixed and self.exported is not None:
            return self.graph_module()
        return self.module

    def graph_module(self):
        """The exported graph as a module (a new one each call; it shares the program's tensors)."""
        import types

        # without the guard check: with a symbolic axis it names symbols a second trace cannot resolve
        module = self.exported.module(check_guards=False)
        # an exported graph's module refuses .train()/.eval(), which converters call; it was exported in eval mode
        # (dropout and batch norm already fixed in the graph), so both have nothing left to change
        module.train = types.MethodType(lambda self, mode=True: self, module)
        module.eval = types.MethodType(lambda self: self, module)
        return module

    def as_kwargs(self, batch: tuple) -> dict:
        """One batch of inputs (in call order) keyed by the spec's input names."""
        return dict(zip(self.input_names, batch, strict=True))

    def op_counts(self) -> dict[str, int]:
        """ATen op -> count in the exported graph (empty when there is none)."""
        counts: dict[str, int] = {}
        if self.exported is None:
            return counts
        for node in self.exported.graph.nodes:
            if node.op == "call_function":
                key = str(node.target)
                counts[key] = counts.get(key, 0) + 1
        return counts


def onnx_node_modules(path) -> dict[str, str]:
    """ONNX node name -> the PyTorch module path it came from (dynamo exporter metadata)."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key.endswith("name_scopes"):
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    continue
                # scopes are cumulative ('', 'model', 'model.encoder', ..., fx node): take the deepest module
                out[node.name] = next((s for s in reversed(scopes[:-1]) if s), "")
    return out


@dataclass
class Deployable:
    """A loaded model in its deployment form: what export, profile and eval all start from.

    Attributes:
        loaded: the model as intake received it.
        module: the deployment-form module (None for ONNX input; a ``.pt2`` program's own module).
        example: example inputs (None for ONNX input).
        record: the deployment step's record (reparameterized modules, folded norms), or None.
    """

    loaded: Any
    module: Any
    example: tuple | None
    record: Any = None


def deployment_form(loaded, seed: int = 0) -> Deployable:
    """Check the model runs on its inputs, then put it in deployment form (a ``.pt2`` program is already)."""
    from slimx._core.inputs import sample_inputs
    from slimx.export.deploy import to_deployment

    if loaded.module is None:
        return Deployable(loaded, None, None)
    if any(s.dynamic for s in loaded.inputs):  # drawn so that no dynamic axis is given as 1 (export would fix it)
        from slimx.export.shapes import export_example

        example = export_example(loaded.inputs, seed)
    else:
        example = loaded.example_inputs or sample_inputs(loaded.inputs, seed=seed)
    shapes = ", ".join(f"{s.name}={'x'.join(map(str, s.shape))}" for s in loaded.inputs)
    check_forward(loaded.module, example, shapes)
    if loaded.source == "pt2":
        return Deployable(loaded, loaded.module, example)
    module, record = to_deployment(loaded.module, example)
    return Deployable(loaded, module, example, record)


def program_of(deployable: Deployable, module=None) -> Program:
    """The Program of a deployable model (or of ``module``, a compressed copy of it): captured with torch.export,
    except a ``.pt2`` input, whose program is used as it came, and an ONNX input, which has none."""
    loaded = deployable.loaded
    module = deployable.module if module is None else module
    if loaded.source == "pt2":
        exported = loaded.program
    elif module is not None:
        exported = export_program(module, deployable.example, specs=loaded.inputs)
    else:
        exported = None
    return Program(loaded.name, exported, module, loaded.inputs, loaded.output_names, onnx_source=loaded.onnx_path)


def prepare_program(spec: str, input_shapes: list[str] | None = None, weights=None, seed: int = 0):
    """MODEL spec -> (LoadedModel, Program in deployment form, example inputs): what export and profile share.

    An ONNX input has no PyTorch graph: its Program carries only ``onnx_source``.
    """
    from slimx.export.intake import load_model

    deployable = deployment_form(load_model(spec, weights=weights, input_shapes=list(input_shapes or [])), seed)
    return deployable.loaded, program_of(deployable), deployable.example


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
    # the counter's module tracker hooks every tensor that requires grad, and a view of a parameter taken under
    # no_grad (DeBERTa-v2's relative embeddings) has no grad function to hook: nothing requires grad while counting
    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with counter, torch.no_grad():
            module(*example)
    except (AssertionError, RuntimeError, TypeError) as exc:  # statistics only: the export goes on without them
        from slimx._core.errors import first_line

        return {"params": int(params), "macs": None, "macs_note": f"not counted ({first_line(exc, 100)})"}
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}


def _onnx_params(path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    # weights, not the scalar constants the exporter lifts into initializers
    return int(sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.dims and i.data_type in floats))
