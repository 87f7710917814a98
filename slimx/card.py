"""``slimx card OUT``: a model card (``README.md`` with Hugging Face YAML metadata) for an export folder.

The card is written from ``report.json`` alone (nothing is re-run): what went in, the compression passes and their
fidelity, the latency per device (measured, or estimated with its interval and setup), parity in each runtime,
quantization, the artifacts with sizes and SHA-256, the tool versions, and how to reproduce the export. Numbers
are copied from the report, never recomputed, so the card says what the report says.
"""

from __future__ import annotations

from pathlib import Path

from slimx._core.errors import UsageError

CARD_NAME = "README.md"


def _yaml_value(value) -> str:
    text = str(value)
    return text if text.replace("-", "").replace("_", "").replace(".", "").isalnum() else '"' + text.replace(
        '"', '\\"') + '"'


def _metadata(report: dict) -> list[str]:
    model, target = report.get("model") or {}, report.get("target") or {}
    tags = ["slimx", target.get("format", ""), target.get("precision", ""), (report.get("device") or {}).get("name")]
    lines = ["---", "library_name: slimx", "tags:"] + [f"  - {_yaml_value(t)}" for t in tags if t]
    if model.get("source") == "hf" or str(model.get("name", "")).startswith("hf:"):
        lines.append(f"base_model: {_yaml_value(model['name'].removeprefix('hf:'))}")
    lines += ["model-index:", f"  - name: {_yaml_value(model.get('name', 'model'))}", "    results: []", "---"]
    return lines


def _fmt_ms(value) -> str:
    return f"{value:.3f} ms" if isinstance(value, (int, float)) else "n/a"


def _latency_rows(report: dict) -> list[str]:
    rows = []
    for key in ("latency", "host_latency"):
        lat = report.get(key)
        if not lat:
            continue
        device = lat.get("device", "?")
        if lat.get("kind") == "measured":
            spread = (f"p10-p90 {lat['p10_ms']:.3f}-{lat['p90_ms']:.3f} ms" if lat.get("p10_ms") is not None else "")
            rows.append(f"| {device} | measured | {_fmt_ms(lat.get('median_ms'))} | {spread} | "
                        f"{lat.get('runtime', '')} {lat.get('runtime_version', '')}, {lat.get('threads')} threads, "
                        f"{lat.get('runs')} runs |")
        elif lat.get("kind") == "estimated":
            lo, hi = (lat.get("interval_ms") or [None, None])[:2]
            interval = f"80% interval {lo:.3f}-{hi:.3f} ms" if lo is not None else "no interval"
            if lat.get("unanchored"):  # no anchor: the interval is for a setup the profile never saw
                interval += " for a setup not anchored"
            anchors = lat.get("anchors") or {}
            setup = (f"anchored to {anchors['setup']!r} by {anchors['count']} measurement(s)" if anchors.get("count")
                     else f"setup: {lat['setup']}" if lat.get("setup") else "")
            how = "; ".join(x for x in (f"setting {lat.get('setting')}", setup,
                                         f"expected error ±{lat['expected_error_pct']:.0f}%"
                                         if lat.get("expected_error_pct") is not None else "",
                                         lat.get("transfer") or "") if x)
            rows.append(f"| {device} | estimated (not measured) | {_fmt_ms(lat.get('total_ms'))} | {interval} | "
                        f"{how} |")
        else:
            rows.append(f"| {device} | not measured | | | {lat.get('reason', '')} |")
    return rows


def _parity_rows(report: dict) -> list[str]:
    p = report.get("parity") or {}
    if not p.get("measured"):
        rows = [f"| {report.get('target', {}).get('format')} | not measured | | {p.get('reason', '')} |"]
    else:
        verdict = "PASS" if p.get("passed") else "FAIL"
        rows = [f"| {p.get('runtime')} | {verdict} | cosine {p['cosine']:.6f}, max abs {p['max_abs']:.2e}, rel err "
                f"{p['rel_err']:.2e} | {p.get('n_inputs')} fresh inputs |"]
        cal = p.get("calibration") or {}
        if cal.get("measured"):
            rows.append(f"| {cal.get('runtime')} | {'PASS' if cal.get('passed') else 'FAIL'} | cosine "
                        f"{cal['cosine']:.6f} | {cal.get('data', 'calibration data')} |")
    proxy = p.get("proxy")
    if isinstance(proxy, dict) and proxy.get("measured"):
        rows.append(f"| {proxy.get('runtime')} (proxy) | {'PASS' if proxy.get('passed') else 'FAIL'} | cosine "
                    f"{proxy['cosine']:.6f} | {proxy.get('what', 'the TensorRT-ready ONNX')} |")
    pre = report.get("preflight") or {}
    predicted = pre.get("predicted_parity") or {}
    if predicted.get("cosine") is not None:
        rows.append(f"| predicted ({pre.get('compute_dtype', '')}) | "
                    f"{'PASS' if predicted.get('passed', True) else 'FAIL'} | cosine {predicted['cosine']:.6f} | "
                    "the exported program as the format's reduced-precision artifact computes it |")
    return rows


def render_card(report: dict, out: Path) -> str:
    """The card's Markdown (YAML metadata first) for the export in ``out`` described by ``report``."""
    model, target, device = report.get("model") or {}, report.get("target") or {}, report.get("device") or {}
    title = f"{model.get('name', 'model')} for {device.get('display_name') or device.get('name')}"
    built = (f"Built by slimx {report.get('versions', {}).get('slimx', '')} on {report.get('created', '')}. "
             "Every figure below is copied from `report.json`.")
    lines = [*_metadata(report), "", f"# {title} ({target.get('format')}, {target.get('precision')})", "", built,
             ""]
    params = model.get("params")
    lines += ["## What went in", "",
              f"- model: `{model.get('name')}` ({model.get('source')})"
              + (f", {params / 1e6:.2f} M parameters" if params else "")
              + (f", {model['macs'] / 1e9:.2f} GMACs" if model.get("macs") else ""),
              "- inputs: " + ", ".join(f"`{i['name']}` {'x'.join(map(str, i['shape']))} {i['dtype']}"
                                       for i in model.get("inputs", [])),
              f"- shapes: {(report.get('shapes') or {}).get('form', 'static')}"
              + (f" ({report['shapes']['why']})" if (report.get("shapes") or {}).get("why") else ""), ""]
    passes = report.get("passes") or []
    lines += ["## Compression", ""]
    if not passes:
        lines += ["No compression pass was applied.", ""]
    else:
        lines += ["| pass | options | result |", "| --- | --- | --- |"]
        for p in passes:
            summary = p.get("summary") or {}
            shown = ", ".join(f"{k} {v}" for k, v in list(summary.items())[:4])
            lines.append(f"| {p.get('name')} | {p.get('config', '')} | {shown} |")
        comp = report.get("compression") or {}
        gate = comp.get("gate") or {}
        final = (comp.get("fidelity") or {}).get("final") or {}
        if gate:
            extra = ", ".join(f"{k} {final[k]}" for k in ("cosine_min", "nn_agreement") if k in final)
            lines += ["", f"Fidelity to the original on held-out data ({final.get('samples', '?')} samples): "
                          f"{gate.get('metric')} {gate.get('value')} against the floor {gate.get('floor')}, "
                          f"{'PASS' if gate.get('passed') else 'FAIL'}" + (f" ({extra})" if extra else "") + "."]
        speed = comp.get("speedup") or {}
        if isinstance(speed, dict) and speed.get("ratio"):
            lines += ["", f"Measured speed-up over the uncompressed model compiled the same way: {speed['ratio']}x "
                          f"({speed.get('baseline_median_ms')} -> {speed.get('compressed_median_ms')} ms)."]
        lines.append("")
    q = (report.get("compile") or {}).get("quantization") or {}
    lines += ["## Quantization", "", f"- precision: {target.get('precision')}; scheme: `{q.get('scheme', 'none')}`",
              f"- method: {q.get('method', 'none')}"]
    if q.get("kept_float"):
        kept = q["kept_float"].get("modules") or {}
        lines.append(f"- kept float: {len(kept)} module(s) ({q['kept_float'].get('why', '')})")
    if q.get("calibration_samples"):
        lines.append(f"- calibration samples: {q['calibration_samples']}")
    lines += ["", "## Latency", "", "| device | how | ms | spread / interval | setting, runtime |",
              "| --- | --- | --- | --- | --- |", *_latency_rows(report), "",
              "## Parity (the artifact against PyTorch, in its runtime)", "", "| runtime | verdict | figures | on |",
              "| --- | --- | --- | --- |", *_parity_rows(report), "", "## Artifacts", "",
              "| file | format | bytes | SHA-256 |", "| --- | --- | --- | --- |"]
    from slimx.gate import sha256_of  # the hash the gate records for a baseline artifact

    for a in report.get("artifacts") or []:
        path = out / a["path"]
        digest = sha256_of(path) if path.exists() else "(missing)"
        lines.append(f"| `{a['path']}` | {a['format']} | {a['bytes']} | `{digest}` |")
    versions = report.get("versions") or {}
    lines += ["", "## Tools", "", ", ".join(f"{k} {v}" for k, v in versions.items()), "", "## Reproduce", ""]
    command = report.get("command")
    if command:
        lines += ["```sh", " ".join(_quote(c) for c in command), "```"]
    else:
        cfg = report.get("config") or {}
        lines += ["```python", "import slimx", "", f"slimx.export({cfg.get('model', model.get('name'))!r}, "
                  f"{device.get('name')!r}, format={target.get('format')!r}, precision={target.get('precision')!r})",
                  "```"]
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def write_card(out: str | Path, path: str | Path | None = None) -> Path:
    """Write the card of the export folder ``out`` (to ``out/README.md`` unless ``path``); returns its path."""
    from slimx.report import read_report

    out = Path(out)
    if not (out / "report.json").is_file():
        raise UsageError(f"slimx card {out}", "is not an export folder (no report.json in it)",
                         "give the OUT folder of a `slimx export`")
    report = read_report(out, "slimx card:")
    text = render_card(report, out)
    dest = Path(path) if path else out / CARD_NAME
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.write_text(text)
    tmp.replace(dest)
    return dest


def write_front_card(result: dict) -> Path:
    """A sweep's card: ``OUT/README.md`` listing the trials on the latency-fidelity front of each model and device
    (their figures, from the sweep's rows), each trial's own card written beside its report and linked."""
    out = Path(result["out"])
    front = {k for keys in (result.get("front") or {}).values() for k in keys}
    rows = [r for r in result.get("trials") or [] if r.get("key") in front]
    lines = ["---", "library_name: slimx", "tags:", "  - slimx", "  - sweep", "---", "",
             f"# slimx sweep: the latency-fidelity front ({len(rows)} of {len(result.get('trials') or [])} trials)",
             "", f"From `{result.get('source')}`. Each trial on the front of its model and device, with its own card; "
                 "every figure is copied from the trial's `report.json`.", "",
             "| model | device | precision | recipe | latency ms (how) | held-out fidelity | MB | card |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["model"], r["device"], r.get("latency_ms") or 0)):
        trial_out = Path(r["out"])
        link = "(no report)"
        if (trial_out / "report.json").is_file():
            card = write_card(trial_out)
            link = f"[card]({card.relative_to(out).as_posix() if card.is_relative_to(out) else card})"
        ms = r.get("latency_ms")
        lines.append(f"| {r['model']} | {r['device']} | {r['precision']} | {r['recipe']} | "
                     f"{f'{ms:.3f}' if isinstance(ms, (int, float)) else 'n/a'} ({r.get('latency_kind', '')}) | "
                     f"{r.get('fidelity')} ({r.get('fidelity_source', '')}) | {r.get('artifact_mb')} | {link} |")
    dest = out / CARD_NAME
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(dest)
    return dest
