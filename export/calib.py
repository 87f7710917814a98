"""Calibration data: real inputs for parity, quantization and compression.

``--calib`` takes a ``.npz`` of input arrays (one array per input, samples on the first axis), a
text file (one sentence per line, tokenized with the model's tokenizer), or a folder of images
(read with the model's preprocessing). Samples are shuffled with a fixed seed and capped.
"""

from __future__ import annotations

import contextvars
import random
from dataclasses import dataclass
from pathlib import Path

from slimx._core.errors import UsageError, first_line

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_TEXT_EXT = (".txt", ".text")


@dataclass
class CalibrationData:
    batches: list[tuple]
    source: str
    kind: str  # npz | text | images | synthetic
    labels: list[int] | None = None  # a task label per batch (``--labels``), in the batches' order
    total: int = 0  # samples in the source (the batches are a seeded draw of them)

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    def describe(self) -> str:
        return f"{len(self.batches)} samples of {self.kind} from {self.source}"


_FLAG: contextvars.ContextVar[str] = contextvars.ContextVar("calibration_flag", default="--calib")


def load_calibration(path: str | Path, model, limit: int = 64, seed: int = 0, flag: str = "--calib",
                     truncate: bool = False, labels: str | Path | None = None) -> CalibrationData:
    """Read calibration samples for ``model`` (a LoadedModel) from ``path``; batch size 1. ``flag``: the option
    that named the file, in error lines (``slimx eval`` reads its ``--data`` the same way).

    Text is tokenized up to the longest sequence the model's inputs take (a dynamic axis's maximum, else the
    export length) and padded to the export length when shorter; a sentence longer than that maximum is an
    error naming it, or is cut to it with ``truncate`` (``--truncate``). ``labels``: a file of one integer per
    sample in the data's own order (whitespace-separated), kept aligned with the samples drawn.
    """
    token = _FLAG.set(flag)
    try:
        data = _load_calibration(Path(path), model, limit, seed, truncate)
        if labels is not None:
            data.labels = _labels(Path(labels), data, path, limit, seed)
        return data
    finally:
        _FLAG.reset(token)


def _labels(path: Path, data: CalibrationData, source, limit: int, seed: int) -> list[int]:
    if not path.is_file():
        raise UsageError(f"--labels {path}", "does not exist", "give a file of one integer label per sample")
    try:
        values = [int(x) for x in path.read_text().split()]
    except ValueError:
        raise UsageError(f"--labels {path}", "holds something that is not an integer",
                         "write one integer class label per sample, whitespace-separated") from None
    total = data.total
    if data.batches and data.batches[0][0].shape[0] != 1:
        raise UsageError(f"--labels {path}", f"labels one sample per batch, and the model takes batches of "
                         f"{data.batches[0][0].shape[0]}", "export at batch 1 (--input-shape 1x...)")
    if len(values) != total:
        raise UsageError(f"--labels {path}", f"has {len(values)} labels for the {total} samples of {source}",
                         "give exactly one label per sample, in the data's order")
    return [values[i] for i in _order(total, limit, seed)]


def _load_calibration(path: Path, model, limit: int, seed: int, truncate: bool = False) -> CalibrationData:
    if not path.exists():
        raise UsageError(f"{_FLAG.get()} {path}", "no such file or folder",
                         "give a .npz of input arrays, a text file of sentences, or a folder of images")
    if path.is_dir():
        batches, total = _images(path, model, limit, seed)
        kind = "images"
    elif path.suffix == ".npz":
        batches, total = _npz(path, model, limit, seed)
        kind = "npz"
    elif path.suffix in _TEXT_EXT:
        batches, total = _text(path, model, limit, seed, truncate)
        kind = "text"
    else:
        raise UsageError(f"{_FLAG.get()} {path}", f"slimx does not read {path.suffix or 'extension-less'} files",
                         "give a .npz, a .txt with one sentence per line, or a folder of images")
    if not batches:
        raise UsageError(f"{_FLAG.get()} {path}", "holds no samples", "add samples to it")
    return CalibrationData(batches=batches, source=str(path), kind=kind, total=total)


def _npz(path: Path, model, limit: int, seed: int) -> list[tuple]:
    import numpy as np
    import torch

    try:
        data = np.load(str(path), allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise UsageError(f"{_FLAG.get()} {path}", f"is not a readable .npz ({first_line(exc)})",
                         "save it with numpy.savez(path, **{input_name: array})") from exc
    names = [s.name for s in model.inputs]
    if all(n in arrays for n in names):
        ordered = [arrays[n] for n in names]
    elif len(arrays) == len(names) and all(k.startswith("arr_") for k in arrays):
        ordered = [arrays[f"arr_{i}"] for i in range(len(names))]
    else:
        raise UsageError(f"{_FLAG.get()} {path}", f"has arrays {sorted(arrays)} but the model takes {names}",
                         "name the arrays after the model's inputs")
    count = {a.shape[0] for a in ordered}
    if len(count) != 1:
        raise UsageError(f"{_FLAG.get()} {path}", "its arrays hold different numbers of samples",
                         "put samples on the first axis of every array, the same count in each")
    for spec, arr in zip(model.inputs, ordered, strict=True):
        if tuple(arr.shape[1:]) != tuple(spec.shape[1:]):
            raise UsageError(f"{_FLAG.get()} {path}", f"array {spec.name!r} has samples of shape "
                             f"{list(arr.shape[1:])}, the model takes {list(spec.shape[1:])}",
                             "reshape the data or set --input-shape")
    total = count.pop()
    per = max(1, int(model.inputs[0].shape[0])) if model.inputs[0].shape else 1  # the model's batch size
    order = _order(total, limit * per, seed)
    groups = [order[i:i + per] for i in range(0, len(order) - per + 1, per)]  # a static batch of 2 gets pairs
    return [tuple(torch.from_numpy(np.ascontiguousarray(a[idx])).to(getattr(torch, s.dtype))
                  for a, s in zip(ordered, model.inputs, strict=True)) for idx in groups], total


def _text(path: Path, model, limit: int, seed: int, truncate: bool = False) -> list[tuple]:
    from slimx.export.shapes import seq_range_of

    if model.tokenizer is None:
        raise UsageError(f"{_FLAG.get()} {path}", "is text, but the model has no tokenizer",
                         "use text with a text model (minilm, hf:DIR), or give a .npz of inputs")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    order = _order(len(lines), limit, seed)
    seq = model.inputs[0].shape[-1]
    dynamic = seq_range_of(model.inputs)
    longest = max(seq, dynamic[1]) if dynamic else seq  # what the artifact takes: past it, cut or refuse
    batches = []
    for i in order:
        n = len(model.tokenizer(lines[i], truncation=False)["input_ids"])
        if n > longest and not truncate:
            raise UsageError(f"{_FLAG.get()} {path}", f"line {i + 1} has {n} tokens, more than the {longest} the "
                             "model takes", "pass --truncate to cut long samples to that length, or export with a "
                             "larger --seq-len")
        length = seq if n <= seq else min(n, longest)  # padded to the export length, a longer one kept whole
        enc = model.tokenizer(lines[i], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        batches.append(tuple(enc[s.name] for s in model.inputs))
    return batches, len(lines)


def _images(path: Path, model, limit: int, seed: int) -> list[tuple]:
    if model.data_config is None or len(model.inputs) != 1:
        raise UsageError(f"{_FLAG.get()} {path}", "is a folder of images, but the model is not an image model slimx "
                         "knows the preprocessing of", "give a .npz of preprocessed inputs instead")
    from PIL import Image
    from timm.data import create_transform

    cfg = dict(model.data_config)
    cfg["input_size"] = tuple(model.inputs[0].shape[1:])
    transform = create_transform(**cfg, is_training=False)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_EXT)
    batches = []
    for i in _order(len(files), limit, seed):
        try:
            with Image.open(files[i]) as img:
                batches.append((transform(img.convert("RGB")).unsqueeze(0),))
        except OSError as exc:
            raise UsageError(f"--calib {files[i]}", f"is not a readable image ({first_line(exc)})",
                             "remove it from the folder") from exc
    return batches, len(files)


def _order(n: int, limit: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:limit]
