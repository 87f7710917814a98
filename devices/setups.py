"""The device families and measurement setups that published latency rows are grouped by.

Data and naming only, shared by a single device's fit (``devices.calibrate``) and a family's (``devices.family``):
which profiles make a family, which rows it takes, and the setup (timing tool, stated versions, thread
configuration) each row was measured in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    profile: str  # the slimx device profile
    data_device: str  # regex on a published row's ``device`` column


@dataclass(frozen=True)
class Family:
    name: str
    setting: str  # the estimator setting of each member it fits
    runtime_match: tuple[str, ...]  # words a row's runtime text must contain (any)
    runtime_exclude: tuple[str, ...]
    members: tuple[Member, ...]
    description: str
    # the runtime configuration the members' settings describe (TFLite with 4 threads): where a setup names it, it
    # is the reference estimates are for, whatever the sources' years
    configuration: str = ""


_APPLE = (Member("iphone7", r"^iPhone 7\b"), Member("iphone11pro", r"^iPhone 11 Pro"),
          Member("iphone12", r"^iPhone 12"), Member("iphone13", r"^iPhone 13"), Member("iphone14", r"^iPhone 14"),
          Member("iphone15pro", r"^iPhone 15 Pro"))

FAMILIES = {
    "jetson": Family(
        "jetson", "tensorrt-gpu-fp16", ("tensorrt fp16", "fp16_mode", "half"), ("fp32", "tensorflow"),
        (Member("jetson-nano", r"^Jetson Nano"), Member("jetson-tx2", r"^Jetson TX2"),
         Member("jetson-xavier-nx", r"^Jetson (Xavier )?NX"), Member("jetson-agx-xavier", r"^Jetson (AGX )?Xavier"),
         Member("jetson-orin-nano", r"^Jetson Orin Nano"), Member("jetson-agx-orin", r"^Jetson AGX Orin")),
        "NVIDIA Jetson GPUs, TensorRT fp16 (Maxwell, Pascal, Volta, Ampere)"),
    "apple-ane": Family(
        "apple-ane", "coreml-ane-fp16", ("coreml",), ("compute unit = cpu", "compute unit = gpu"),
        tuple(m for m in _APPLE if m.profile != "iphone7"),  # the A10 has no Neural Engine
        "Apple Neural Engines through Core ML (A13, A14, A15, A17 Pro)"),
    # Core ML's other units: the A10's CPU and GPU rows, with the A13's
    "apple-gpu": Family(
        "apple-gpu", "coreml-gpu-fp16", ("compute unit = gpu",), (), _APPLE,
        "Apple GPUs through Core ML (A10 to A17 Pro)"),
    "apple-cpu": Family(
        "apple-cpu", "coreml-cpu-fp32", ("compute unit = cpu",), (), _APPLE,
        "Apple CPUs through Core ML (A10 to A17 Pro)"),
    "pixel": Family(
        "pixel", "tflite-cpu-fp32", ("tflite float", "tflite (float)"), ("gpu", "nnapi", "uint8"),
        (Member("pixel1", r"^Pixel 1\b"), Member("pixel2", r"^Pixel 2\b"), Member("pixel3", r"^Pixel 3\b"),
         Member("pixel4", r"^Pixel 4\b"), Member("pixel7", r"^Pixel 7\b")),
        "Google Pixel phones' CPUs, TFLite float (Snapdragon 821, 835, 845, 855; Tensor G2)", "4 threads"),
}


def family_of_device(name: str) -> Family | None:
    return next((f for f in FAMILIES.values() if any(m.profile == name for m in f.members)), None)


# timing tools a published row's runtime or source text can name: rows timed by the same tool share a setup across
# tables and devices (the iPhone 14's Xcode report rows with the iPhone 12's), whatever words each table uses
SETUP_TOOLS = (("xcode", "Xcode Core ML performance report"), ("coreml-performance", "coreml-performance app"),
               ("modelbench", "ModelBench app"), ("netspresso", "NetsPresso Launcher"), ("torch2trt", "torch2trt"),
               ("trtexec", "trtexec"))


# versions a row's runtime or device text states: part of its setup (the same app under another OS or converter
# version is another setup)
SETUP_VERSIONS = re.compile(r"\b(xcode|ios|coremltools|jetpack|tensorrt)\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_SPELLING = {"xcode": "Xcode", "ios": "iOS", "coremltools": "coremltools", "jetpack": "JetPack", "tensorrt": "TensorRT"}
# how many CPU threads a row ran: a configuration every table words its own way ("single large core", "Mobile CPU
# (large core)", "CPU 4 threads"); rows that state the same one share a setup across tables
_THREADS = re.compile(r"\b(\d+)\s*threads?\b")
_ONE_CORE = re.compile(r"single[- ](?:large[- ])?core|\blarge core\b|single[- ]thread")


def setup_of(row: dict, first: dict[str, str]) -> str:
    """A row's measurement setup: the timing tool its runtime or source text names with the versions (OS, app,
    converter) its runtime and device text state, else its table and runtime text ("same setup as ..." joins
    the table's first setup)."""
    text = (row.get("runtime") or "").strip()
    if "same setup as" in text.lower() and row["table"] in first:
        return first[row["table"]]
    both = f"{text} {row.get('source') or ''}".lower()
    tool = next((name for word, name in SETUP_TOOLS if word in both), None)
    threads = _THREADS.search(text.lower())
    if tool is None and threads is not None:
        key = f"{threads.group(1)} threads"
    elif tool is None and _ONE_CORE.search(text.lower()):
        key = "1 large core"
    elif tool is None:
        key = f"{row['table']}: {text}" if row.get("table") else text
    else:
        versions = sorted({f"{_SPELLING[m.group(1).lower()]} {m.group(2)}"
                           for m in SETUP_VERSIONS.finditer(f"{text} {row.get('device') or ''}")})
        key = tool + (f" ({', '.join(versions)})" if versions else "")
    first.setdefault(row["table"], key)
    return key


def family_setups(rows: list[dict], configuration: str = "") -> tuple[list[str], str, list[str]]:
    """Each row's measurement setup (``setup_of``), the reference setup estimates are for (the one naming the
    family's ``configuration`` where one does, else the newest: the latest year its rows' sources name; ties: more
    rows) and the setups left out.

    A setup is used only where it is tied to the reference by models timed in both (directly or through other
    setups, on any device of the family): otherwise its factor cannot be told apart from its devices' and models'
    own, and its rows, which cannot be put on the reference's scale, are left out of the fit."""
    first: dict[str, str] = {}
    keys = [setup_of(row, first) for row in rows]
    years = {k: max([int(y) for r, kk in zip(rows, keys, strict=True) if kk == k
                     for y in re.findall(r"\b(20[0-4]\d)\b", r.get("source") or "")] or [0]) for k in set(keys)}
    named = sorted(k for k in set(keys) if configuration and configuration in k)
    reference = named[0] if named else max(sorted(years), key=lambda k: (years[k], keys.count(k)))
    models = {k: {(r.get("timm_name"), r.get("input_size")) for r, kk in zip(rows, keys, strict=True) if kk == k}
              for k in set(keys)}
    linked, frontier = {reference}, [reference]
    while frontier:
        k = frontier.pop()
        for other in sorted(set(keys) - linked):
            if models[other] & models[k]:
                linked.add(other)
                frontier.append(other)
    return keys, reference, sorted(set(keys) - linked)
