"""Shapes as part of the input spec: which axes of a model's inputs may vary in the artifact, and over what range.

A text model (token ids, masks) has a dynamic sequence axis by default, from 1 to its maximum positions:
real sentences are a fraction of the padded length (stdlib sentences: median about 25 of 128 tokens), and a
static 1x128 artifact pays for the padding on every call. ``--seq-len MIN..MAX`` narrows the range,
``--static`` keeps today's fixed shape, ``--batch MIN..MAX`` makes the batch axis dynamic for any model.
"""

from __future__ import annotations

import dataclasses
import re

from slimx._core.errors import SlimxFailure, UsageError, exception_chain, first_line
from slimx._core.inputs import InputSpec

TEXT_KINDS = ("tokens", "mask", "zeros")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:\.\.|-|:)\s*(\d+)\s*$")


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """``"1..128"`` -> (1, 128).

    Example:
        >>> parse_range("8..64", "--seq-len")
        (8, 64)
    """
    match = _RANGE.match(str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"{flag} {text}", "is not a range of sizes", f"write it as MIN..MAX with 1 <= MIN <= MAX, "
                         f"e.g. {flag} 1..128")
    return int(match[1]), int(match[2])


def is_text(specs: list[InputSpec]) -> bool:
    """Token-like 2-D inputs only (ids, masks, type ids): the second axis is the sequence."""
    return bool(specs) and all(s.kind in TEXT_KINDS and len(s.shape) == 2 for s in specs)


def apply_shape_policy(specs: list[InputSpec], max_positions: int | None, seq_len: str | None = None,
                       batch: str | None = None, static: bool = False, shape_given: bool = False) -> list[InputSpec]:
    """The specs with their dynamic axes set: the sequence axis of a text model (unless ``static``), the batch
    axis of every input with ``batch``. The export shape stays as it was (clamped into the range); with
    ``shape_given`` (the user's ``--input-shape``) a shape outside the range is refused instead.

    Example:
        >>> ids = InputSpec("input_ids", (1, 128), "int64", "tokens")
        >>> apply_shape_policy([ids], max_positions=512)[0].dynamic
        ((1, 1, 512),)
    """
    if static:
        if seq_len or batch:
            raise UsageError("--static", "fixes every shape, and --seq-len/--batch ask for dynamic ones",
                             "drop one of them")
        return [s.static() for s in specs]
    out = []
    seq_range = None
    if is_text(specs):
        longest = max_positions or max(s.shape[1] for s in specs)
        seq_range = parse_range(seq_len, "--seq-len") if seq_len else (1, longest)
        if seq_range[1] > longest:
            raise UsageError(f"--seq-len {seq_len}", f"goes past the model's {longest} positions",
                             f"give a maximum of at most {longest}")
        asked = max(s.shape[1] for s in specs if s.kind in ("tokens", "mask", "zeros") and len(s.shape) > 1)
        if asked > longest:  # only --input-shape sets a length past the positions: refused, never clamped
            raise UsageError(f"--input-shape 1x{asked}", f"asks for {asked} tokens, past the model's {longest} "
                             "positions", f"give a length of at most {longest} (e.g. --input-shape "
                             f"1x{min(128, longest)})")
    elif seq_len:
        raise UsageError(f"--seq-len {seq_len}", "applies to text models (token-id and mask inputs)",
                         "use --input-shape for this model, or --batch for a dynamic batch axis")
    batch_range = parse_range(batch, "--batch") if batch else None
    if shape_given:
        _given_inside(specs, seq_range if seq_len else None, seq_len, batch_range, batch)
    for spec in specs:
        dynamic = []
        sizes = {}
        if batch_range and batch_range[0] < batch_range[1]:
            dynamic.append((0, *batch_range))
            sizes[0] = min(max(spec.shape[0], batch_range[0]), batch_range[1])
        if seq_range and seq_range[0] < seq_range[1]:
            dynamic.append((1, *seq_range))
            sizes[1] = min(max(spec.shape[1], seq_range[0]), seq_range[1])
        elif seq_range:  # MIN == MAX: a static length
            sizes[1] = seq_range[0]
        out.append(InputSpec(spec.name, tuple(sizes.get(a, d) for a, d in enumerate(spec.shape)), spec.dtype,
                             spec.kind, spec.low, spec.high, spec.extra, tuple(dynamic)))
    return out


def _given_inside(specs: list[InputSpec], seq_range, seq_len, batch_range, batch) -> None:
    """The user's ``--input-shape`` is the shape exported and traced: refused where it lies outside the range that
    ``--seq-len`` / ``--batch`` ask for, never moved into it."""
    shape = "x".join(map(str, specs[0].shape))
    for axis, span, flag, text in ((1, seq_range, "--seq-len", seq_len), (0, batch_range, "--batch", batch)):
        if span is None:
            continue
        size = max(s.shape[axis] for s in specs if len(s.shape) > axis)
        if not span[0] <= size <= span[1]:
            what = "length" if axis == 1 else "batch"
            raise UsageError(f"--input-shape {shape} with {flag} {text}",
                             f"exports at {what} {size}, outside the range {span[0]}..{span[1]}",
                             f"give an --input-shape whose {what} lies in {span[0]}..{span[1]}, or widen {flag}")


def axis_name(spec: InputSpec, axis: int) -> str:
    return "batch" if axis == 0 else "seq" if is_text([spec]) and axis == 1 else f"{spec.name}_{axis}"


def dynamic_shapes(specs: list[InputSpec]):
    """torch.export's ``dynamic_shapes`` for ``specs`` (one ``Dim`` per named axis, shared by every input that
    has it), or None when nothing is dynamic."""
    if not any(s.dynamic for s in specs):
        return None
    import torch

    dims: dict[str, object] = {}
    out = []
    for spec in specs:
        entry = {}
        for axis, lo, hi in spec.dynamic:
            name = axis_name(spec, axis)
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=lo, max=hi)
            entry[axis] = dims[name]
        out.append(entry or None)
    return tuple(out)


def export_example(specs: list[InputSpec], seed: int = 0) -> tuple:
    """Inputs to export with: the export shape, except that a dynamic axis of size 1 is drawn at 2 (torch.export
    fixes an axis that the example gives as 1)."""
    from slimx._core.inputs import sample_inputs

    bumped = []
    for spec in specs:
        sizes = {a: min(2, hi) for a, lo, hi in spec.dynamic if spec.shape[a] == 1}
        bumped.append(spec.sized(sizes))
    return sample_inputs(bumped, seed=seed)


def specialisation_error(exc: BaseException, specs: list[InputSpec]) -> SlimxFailure | None:
    """A clear failure when torch.export found that the model fixes an axis slimx asked to keep dynamic."""
    text = "\n".join(str(e) for e in exception_chain(exc))
    if not any(k in text for k in ("Constraints violated", "specialized", "specialize")):
        return None
    names = sorted({axis_name(s, a) for s in specs for a, _, _ in s.dynamic})
    where = re.search(r"(L\['[\w.]+'\]|[\w.]+\.forward)", text)
    return SlimxFailure(
        f"torch.export of the dynamic {'/'.join(names)} axis",
        f"the model fixes it{' (' + where.group(1) + ')' if where else ''}: {first_line(exc, 160)}",
        "export it static with --static, narrow the range with --seq-len MIN..MAX, or drop --batch")


def lengths_of(batches: list[tuple], specs: list[InputSpec]) -> list[int]:
    """Real sequence length of each calibration sample (from its attention mask), for a text model."""
    mask_at = next((i for i, s in enumerate(specs) if s.kind == "mask"), None)
    if mask_at is None or not is_text(specs):
        return []
    out = []
    for batch in batches:
        mask = batch[mask_at]
        for row in mask.reshape(-1, mask.shape[-1]):
            real = row.nonzero()
            out.append(int(real.max()) + 1 if len(real) else 1)
    return out


def seq_range_of(specs: list[InputSpec]) -> tuple[int, int] | None:
    """The dynamic sequence axis's (min, max) of a text model, or None."""
    if not is_text(specs):
        return None
    for spec in specs:
        for axis, lo, hi in spec.dynamic:
            if axis == 1:
                return lo, hi
    return None


def at_length(specs: list[InputSpec], length: int) -> list[InputSpec]:
    """The specs with the sequence axis at ``length``."""
    return [s.sized({1: length}) for s in specs]


def measure_lengths(lo: int, hi: int, typical: int | None = None, count: int = 5) -> list[int]:
    """Lengths to time a dynamic text artifact at: both ends, the typical (calibration median) length, and
    powers of two spread evenly (in log scale) between.

    Example:
        >>> measure_lengths(1, 512, typical=31)
        [1, 8, 31, 64, 512]
    """
    import math

    points = {lo, hi}
    if typical is not None:
        points.add(min(max(typical, lo), hi))
    needed = count - len(points)
    span = math.log2(hi) - math.log2(lo)
    for i in range(1, needed + 1):
        candidate = 2 ** round(math.log2(lo) + span * i / (needed + 1))
        points.add(min(max(candidate, lo), hi))
    return sorted(points)


DEFAULT_FIRST_BUCKET = 16


def bucket_sizes(lo: int, hi: int, given: str | None = None) -> tuple[int, ...]:
    """The sequence lengths a bucketed artifact is built at (one fixed shape each): powers of two from 16 up
    to the range's maximum (which is always one), or the ``--buckets`` list, each inside ``lo..hi``.

    Example:
        >>> bucket_sizes(1, 512)
        (16, 32, 64, 128, 256, 512)
        >>> bucket_sizes(1, 100, "8,32")
        (8, 32)
    """
    if given:
        try:
            sizes = sorted({int(x) for x in str(given).replace(" ", "").split(",") if x})
        except ValueError:
            sizes = []
        if not sizes or sizes[0] < 1:
            raise UsageError(f"--buckets {given}", "is not a list of lengths",
                             "write it as e.g. --buckets 16,32,64,128")
        outside = [s for s in sizes if not lo <= s <= hi]
        if outside:
            raise UsageError(f"--buckets {given}", f"has {outside} outside the sequence range {lo}..{hi}",
                             f"give lengths within {lo}..{hi} (--seq-len sets the range)")
        return tuple(sizes)
    sizes, size = [], DEFAULT_FIRST_BUCKET
    while size < hi:
        if size >= lo:
            sizes.append(size)
        size *= 2
    return (*sizes, hi)


def pick_bucket(length: int, buckets: tuple[int, ...] | list[int], truncate: bool = False) -> int:
    """The smallest bucket that holds ``length`` tokens; past the largest, an error (or, with ``truncate``, the
    largest: the caller cuts the input to it).

    Example:
        >>> pick_bucket(20, (16, 32, 64))
        32
    """
    for size in sorted(buckets):
        if length <= size:
            return size
    if truncate:
        return max(buckets)
    raise SlimxFailure(f"an input of {length} tokens", f"is longer than the artifact's largest bucket ({max(buckets)})",
                       "cut it to that length, pass --truncate to cut it, or export with a larger --seq-len/--buckets")


def fit_to_bucket(arrays: list, size: int, axis: int = 1) -> list:
    """Numpy inputs padded with zeros (pad tokens, masked out) or cut along ``axis`` to ``size``."""
    import numpy as np

    out = []
    for arr in arrays:
        length = arr.shape[axis]
        if length > size:
            arr = np.take(arr, range(size), axis=axis)
        elif length < size:
            pad = [(0, 0)] * arr.ndim
            pad[axis] = (0, size - length)
            arr = np.pad(arr, pad)
        out.append(arr)
    return out


# --------------------------------------------------------------------------- the shape form of an export


def shape_form(loaded, m, target, precision: str) -> dict:
    """``m``: the shape request (``seq_len``, ``batch``, ``static``, ``buckets``; ``slimx.config.ModelConfig``).

    Set the loaded model's dynamic axes (text: the sequence axis by default) as far as the format keeps them;
    returns the report's ``shapes`` record: the form built (dynamic, buckets or static), its dynamic axes, the
    buckets, and why a form is static or bucketed."""
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
    specs = apply_shape_policy(loaded.inputs, longest, m.seq_len, m.batch, m.static, bool(m.input_shapes))
    asked = any(s.dynamic for s in specs)
    seq = seq_range_of(specs)
    if m.buckets and (not target.buckets or seq is None):
        raise UsageError(f"--buckets {m.buckets}", f"applies to a dynamic sequence axis on a format that builds "
                         f"buckets (tflite, coreml, tensorrt), not to this {'model' if seq is None else target.name}",
                         "drop --buckets" if seq is not None else "drop --buckets (or --static)")
    buckets = None
    auto = m.buckets == "auto"
    if seq is not None and target.buckets and (m.buckets or target.default_buckets):
        # auto: built as the fixed rule's range (its largest bucket is the range's maximum either way); the set is
        # chosen after torch.export, from the calibration data (export.buckets)
        buckets = bucket_sizes(*seq, None if auto else m.buckets)
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
    if auto:
        out["auto"] = {"pending": True}
    return out


def at_real_lengths(batches: list[tuple], input_names: list[str]) -> list[tuple]:
    """Padded text batches cut to their real length (the last real token of each batch)."""
    from slimx._core.inputs import mask_index_of, trim_padding

    mask_index = mask_index_of(list(input_names))
    return [trim_padding(b, mask_index) for b in batches]


def data_median_length(calib, specs) -> int | None:
    """The median real length of the calibration data's samples, for a dynamic text model (else None)."""
    import numpy as np

    if calib is None or seq_range_of(specs) is None:
        return None
    real = lengths_of(calib.batches, specs)
    return int(np.median(real)) if real else None
