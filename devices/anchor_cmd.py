"""Recording anchors (``slimx devices anchor``, ``--learn``): each timing becomes an anchor beside the raw
estimate of the same model, taken from the device's current fit; ``devices.anchors`` applies them."""

from __future__ import annotations

import csv
import datetime
import math
from pathlib import Path

from slimx._core.errors import UsageError
from slimx.devices.anchors import Anchor, fingerprint, read_anchors, standing, write_anchors


def raw_estimate(device, setting, model: str, input_shapes: list[str], weights=None) -> dict:
    """The un-anchored estimate of ``model``: ``estimated_ms``, the op mix the anchors' line reads (``gmacs``,
    ``ops``) and its split into compute, memory and per-layer work (``shares``)."""
    from slimx.devices.calibrate import model_op_mix
    from slimx.devices.estimator import estimate_latency

    costs = model_op_mix(model, list(input_shapes), weights=weights)
    est = estimate_latency(costs, device, setting, top=0, anchored=False)
    return {"estimated_ms": float(est["total_ms"]), "gmacs": est["gmacs"], "ops": est["ops"],
            "shares": est["shares"]}


def add(device, setting, measurements: list[tuple[str, list[str], float]], source: str, setup: str | None = None,
        replace: bool = False, progress=None) -> dict:
    """Record ``(model, input_shapes, measured_ms)`` measurements as anchors of ``device`` for ``setting``; a
    model already anchored with the same shapes is replaced by the new measurement. Returns the summary
    (``summary``)."""
    state = read_anchors(device.name)
    if setup and state["anchors"] and setup != state["setup"] and not replace:
        raise UsageError(f"--setup {setup!r}", f"differs from the setup the anchors of {device.name} are for "
                         f"({state['setup']!r}): anchors of two setups cannot share one factor",
                         "add --replace to start over for the new setup, or leave --setup out")
    anchors = [] if replace else list(state["anchors"])
    fit = fingerprint(device, setting)
    today = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for model, shapes, ms in measurements:
        if not (ms > 0 and math.isfinite(ms)):
            raise UsageError(f"{model}={ms}", "is not a positive latency in milliseconds", "give e.g. MODEL=12.5")
        if progress is not None:
            progress.note(f"estimating {model} on {device.name} ({setting.key}) to anchor it")
        est = raw_estimate(device, setting, model, shapes)
        anchors = [a for a in anchors if not (a.model == model and a.input_shapes == list(shapes)
                                              and a.setting == setting.key)]
        anchors.append(Anchor(model, list(shapes), float(ms), est["estimated_ms"], setting.key, fit, source, today,
                              est["gmacs"], est["ops"], est["shares"]))
    path = write_anchors(device.name, setup or state["setup"], anchors)
    return summary(device, setting) | {"path": str(path)}


def refresh(device, progress=None) -> dict:
    """Re-estimate every anchor against the device's current fit (after a recalibration)."""
    from slimx.devices.estimator import settings_of

    state = read_anchors(device.name)
    settings = settings_of(device)
    out = []
    for a in state["anchors"]:
        if a.setting not in settings:
            continue  # the setting is gone from the profile: its anchors go with it
        setting = settings[a.setting]
        if progress is not None:
            progress.note(f"re-estimating {a.model} ({a.setting})")
        est = raw_estimate(device, setting, a.model, a.input_shapes)
        a.estimated_ms, a.gmacs, a.ops, a.shares = est["estimated_ms"], est["gmacs"], est["ops"], est["shares"]
        a.fit = fingerprint(device, setting)
        out.append(a)
    write_anchors(device.name, state["setup"], out)
    return {"device": device.name, "refreshed": len(out), "dropped": len(state["anchors"]) - len(out)}


def summary(device, setting) -> dict:
    """Where the anchors of a device stand for one setting: each anchor's ratio, the factor, the interval."""
    from slimx.devices.anchors import between_setups

    now = standing(device, setting, read_anchors(device.name))
    return {"device": device.name, "setting": setting.key, **now["record"],
            "between_setups": between_setups(device, setting),
            "anchors": [{"model": a.model, "input_shapes": a.input_shapes, "measured_ms": a.measured_ms,
                         "estimated_ms": round(a.estimated_ms, 4), "ratio": round(a.measured_ms / a.estimated_ms, 4),
                         "source": a.source, "when": a.when, "current": a.fit == now["current"]}
                        for a in now["mine"]]}


def learn(device, setting, model: str, input_shapes: list[str], measured_ms: float, where: str,
          progress=None) -> dict:
    """The learning loop: one measurement slimx made of ``device`` becomes one of its anchors."""
    return add(device, setting, [(model, list(input_shapes), measured_ms)], f"learned: {where}", progress=progress)


# --------------------------------------------------------------------------- where timings come from


def split_model(text: str) -> tuple[str, list[str]]:
    """``timm:resnet18@224`` -> (``timm:resnet18``, [``1x3x224x224``]); without ``@RES`` no shape is given.

    Example:
        >>> split_model("timm:resnet18@160")
        ('timm:resnet18', ['1x3x160x160'])
        >>> split_model("minilm")
        ('minilm', [])
    """
    model, at, res = text.rpartition("@")
    if at and res.isdigit() and model and ":" in model:
        return model, [f"1x3x{res}x{res}"]
    return text, []


def parse_measured(items: list[str]) -> list[tuple[str, list[str], float]]:
    out = []
    for item in items:
        model, eq, ms = item.rpartition("=")
        try:
            value = float(ms)
        except ValueError:
            value = float("nan")
        if not eq or not model or not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--measured {item}", "is not MODEL=MS with a positive latency in milliseconds",
                             "give e.g. --measured timm:resnet18@224=11.4")
        out.append((*split_model(model), value))
    return out


def read_csv(path: str) -> list[tuple[str, list[str], float]]:
    """Timings from a CSV: ``model`` (a MODEL spec) or ``timm_name`` (a published table's column), ``latency_ms``,
    and an optional ``input_size`` (square images)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--csv {path}", "does not exist", "give a CSV with columns model,latency_ms[,input_size]")
    with file.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for i, row in enumerate(rows, start=2):
        name = (row.get("model") or "").strip() if "timm_name" not in row else \
            (f"timm:{row['timm_name'].strip()}" if (row.get("timm_name") or "").strip() else "")
        if not name:
            continue  # a published row without a timm model: nothing slimx can estimate
        try:
            ms = float(row.get("latency_ms") or "nan")
        except ValueError:
            ms = float("nan")
        if not (ms > 0 and math.isfinite(ms)):
            raise UsageError(f"--csv {path} line {i}", f"has no positive latency_ms ({row.get('latency_ms')!r})",
                             "give the median in milliseconds")
        size = (row.get("input_size") or "").strip()
        model, shapes = split_model(name)
        out.append((model, [f"1x3x{size}x{size}"] if size.isdigit() else shapes, ms))
    if not out:
        raise UsageError(f"--csv {path}", "has no row with a model and latency_ms",
                         "columns: model (or timm_name), latency_ms, optional input_size")
    return out
