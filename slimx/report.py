"""report.json (schema below) and its short terminal summary.

Schema version 1.0: the keys ``schema_version``, ``model``, ``device``, ``target``, ``artifacts``,
``parity``, ``latency``, ``passes`` and ``versions`` are always present; README.md documents each.
Later versions only add keys; a consumer checks ``schema_version``'s major number.
"""

from __future__ import annotations

SCHEMA_VERSION = "1.0"


def read_report(folder, who: str) -> dict:
    """``folder/report.json`` as a dict, checked to be a slimx export report of this schema's major version; a
    corrupt or foreign one is a UsageError naming it (``who``: the command or flag that was given the folder)."""
    import json
    from pathlib import Path

    from slimx._core.errors import UsageError, first_line

    path = Path(folder) / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{who} {folder}", f"its report.json cannot be read as JSON ({first_line(exc)})",
                         "re-run slimx export into that folder") from None
    if not isinstance(report, dict) or report.get("tool", "slimx") != "slimx" or not isinstance(
            report.get("artifacts", []), list):
        raise UsageError(f"{who} {folder}", "its report.json is not a slimx export report",
                         "point at the OUT folder of a 'slimx export' run")
    version = str(report.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise UsageError(f"{who} {folder}", f"its report.json has schema {version or 'none'}, and this slimx reads "
                         f"schema {SCHEMA_VERSION}", "re-export with this slimx, or use the slimx that wrote it")
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    model, target = report["model"], report["target"]
    lines = [f"slimx export: {model['name']} -> {report['device']['name']} ({target['format']}, {target['precision']})"]
    macs = f"{human(model['macs'])}MACs" if model.get("macs") is not None else "MACs not counted"
    lines.append(f"  model     {human(model['params'])}params, {macs}")
    for art in report["artifacts"]:
        lines.append(f"  artifact  {art['path']}  {human(art['bytes'])}B  ({art['format']})")
    details = _compile_line(report.get("compile") or {})
    if details:
        lines.append(f"  compiled  {details}")
    shapes = _shapes_line(report.get("shapes") or {})
    if shapes:
        lines.append(f"  shapes    {shapes}")
    lines.append("  parity    " + _parity_line(report["parity"]))
    gate = (report.get("compression") or {}).get("gate")
    if gate:
        lines.append("  fidelity  " + _fidelity_line(report["compression"]))
    if report["parity"].get("proxy"):
        lines.append("  proxy     " + _parity_line(report["parity"]["proxy"]) + " [TensorRT-ready ONNX]")
    if report.get("preflight"):
        from slimx.export.preflight import summary_line

        lines.append("  numerics  " + summary_line(report["preflight"]))
    from slimx.devices.records import Latency

    latency = Latency.from_dict(report["latency"])
    host = Latency.from_dict(report["host_latency"]) if report.get("host_latency") else None
    lines.append("  latency   " + latency.line())
    if host is not None:
        lines.append("  host      " + host.line())
    for label, record in (("lengths", latency), ("host len", host)):
        lengths = record.details.get("over_lengths") if record is not None else None
        if lengths:
            lines.append(f"  {label:<9} " + _lengths_line(lengths))
    ops = (host or latency).per_op
    if ops:
        top = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in ops[:5])
        lines.append(f"  top ops   {top}")
    return "\n".join(lines)


def human(n: float) -> str:
    """1234567 -> '1.23 M' (with a trailing space, so units can follow)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} "


def _compile_line(meta: dict) -> str:
    parts = []
    for key in ("backend", "deployment_target", "compute_units", "compute_precision"):
        if meta.get(key):
            parts.append(str(meta[key]))
    fused = (meta.get("fusions") or {}).get("applied") or {}
    kinds = [(label, fused[key]) for key, label in (("attention", "Attention"), ("sdpa_via_mha", "MultiHeadAttention"),
                                                     ("skip_layer_normalization", "SkipLayerNorm"),
                                                     ("bias_gelu", "BiasGelu"),
                                                     ("embed_layer_normalization", "EmbedLayerNorm")) if fused.get(key)]
    if kinds:
        parts.append("onnxruntime fusions " + ", ".join(f"{label} x{n}" for label, n in kinds))
    quant = meta.get("quantization") or {}
    if quant.get("method") and quant["method"] != "none":
        parts.append(quant["method"])
    calib = meta.get("calibration")
    if calib:
        parts.append(f"calibrated on {calib['samples']} {'SYNTHETIC' if calib['synthetic'] else calib['kind']} samples")
    engine = meta.get("engine")
    if engine is not None:
        parts.append("engine built" if engine.get("built") else f"engine NOT built: {engine.get('reason')}")
    fallback = (meta.get("ane_fallback_likely") or {}).get("ops")
    if fallback:
        parts.append("likely off the Neural Engine: " + ", ".join(f"{k} x{v}" for k, v in fallback.items()))
    return "; ".join(parts)


def _shapes_line(shapes: dict) -> str:
    """The form built: dynamic axes, buckets (and how the format holds them), or static (and why)."""
    axes = ", ".join(f"{d['input']}[{d['axis']}] {d['min']}..{d['max']}" for d in shapes.get("dynamic", []))
    built = shapes.get("built") or {}
    if shapes.get("form") == "buckets":
        if built.get("form") == "RangeDim":
            return f"sequence range {built['range'][0]}..{built['range'][1]} (RangeDim: {shapes.get('why', '')})"
        how = built.get("form") or ("signatures" if built.get("signatures") else "profiles")
        auto = shapes.get("auto") or {}
        if auto.get("expected_ms") is not None:
            how += (f"; auto from {auto['samples']} calibration lengths: expected {auto['expected_ms']:.3f} ms per "
                    f"sample, {auto['fixed_rule']['expected_ms']:.3f} ms with the fixed "
                    f"{', '.join(map(str, auto['fixed_rule']['buckets']))}")
        return f"sequence buckets {', '.join(map(str, shapes['buckets']))} ({how})"
    if shapes.get("form") == "dynamic":
        return f"dynamic {axes}"
    if shapes.get("form") == "static" and shapes.get("why"):
        return f"static ({shapes['why']})"
    return ""


def _parity_line(parity: dict) -> str:
    if not parity.get("measured"):
        return f"not measured: {parity.get('reason', '')}"
    verdict = "PASS" if parity["passed"] else "FAIL"
    text = (f"{verdict} cosine {parity['cosine']:.6f}, max abs {parity['max_abs']:.2e}, rel err "
            f"{parity['rel_err']:.2e} on {parity['n_inputs']} fresh inputs ({parity['runtime']})")
    shapes = parity.get("per_shape")
    if shapes:
        text += " at " + ", ".join(f"{p['axis']} {p['size']}" for p in shapes)
    calib = parity.get("calibration")
    if calib:
        text += f"; on calibration data cosine {calib['cosine']:.6f}"
    if parity.get("tolerance_why"):
        text += f"; rel err allowed {parity['tolerance']['max_rel_err']:g} (top-k selection)"
    return text


def _fidelity_line(compression: dict) -> str:
    """The compressed model against the original on held-out data, judged like parity."""
    gate, fid = compression["gate"], compression.get("fidelity") or {}
    verdict = ("PASS" if gate["passed"] else "FAIL") if gate.get("gated", True) else "NOT GATED (synthetic inputs)"
    if gate["metric"].startswith("held-out accuracy"):
        text = (f"{verdict} held-out accuracy {gate['accuracy']:.4f} (original {gate['accuracy_reference']:.4f}, "
                f"{gate['value']:.2f} points lost, at most {gate['floor']:g})")
    else:
        text = f"{verdict} held-out cosine {gate['value']:.4f} to the original (floor {gate['floor']:g})"
    steps = [f"after passes {fid['after_passes']['cosine_mean']:.4f}"] if fid.get("after_passes") else []
    if fid.get("after_recover"):
        steps.append(f"after recovery {fid['after_recover']['cosine_mean']:.4f}")
    data = fid.get("data", "")
    return text + (f"; {', '.join(steps)}" if steps else "") + (f" on {data}" if data else "")


def _lengths_line(over: dict) -> str:
    """Latency over sequence lengths: on the user's data first (the number that matters), then per length."""
    at = ", ".join(f"{r['length']}: {r['median_ms']:.3f} ms" for r in over["lengths"])
    data = over.get("on_data")
    per = "by bucket" if over.get("buckets") else "by length"
    if not data:
        return f"{per} {at}" if over.get("buckets") else f"by sequence length (no padding) {at}"
    return (f"on your data ({data['samples']} samples, median {data['median_length']} tokens): median "
            f"{data['median_ms']:.3f} ms, mean {data['mean_ms']:.3f} ms; {per} {at}")
