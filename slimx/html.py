"""``report.html``: the report for people, rendered from the same data as ``report.json``.

One self-contained file: inline CSS and SVG charts drawn here (no script, no font or image fetched), so it
opens offline and in a CI artifact viewer alike. Written for every export (``OUT/report.html``), every eval
(``OUT/eval.html``), and for ``slimx profile`` and ``slimx gate`` with ``--html FILE``.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#1b1f24;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}.sub{color:#57606a;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{border:1px solid #d0d7de;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}td.n{text-align:right;
font-variant-numeric:tabular-nums}.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.note{color:#57606a}.row{display:flex;gap:24px;flex-wrap:wrap}.card{border:1px solid #d0d7de;border-radius:6px;
padding:8px 12px;margin:6px 0}svg text{font:11px system-ui,sans-serif;fill:#1b1f24}code{font-size:12px}
"""
PALETTE = ("#0969da", "#bf3989", "#1a7f37", "#9a6700", "#8250df", "#cf222e")


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
            + "".join(s for s in sections if s) + "</body></html>\n")


def table(headers: list[str], rows: list[list], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=\"n\">{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pairs(rows: list[list]) -> str:
    """A two-column table of label and value, no header."""
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def section(title: str, *parts: str) -> str:
    body = "".join(p for p in parts if p)
    return f"<h2>{esc(title)}</h2>{body}" if body else ""


# --------------------------------------------------------------------------- charts (SVG)


def bar_chart(items: list[tuple[str, float]], unit: str = "ms", title: str = "", width: int = 520,
              color: str = PALETTE[0]) -> str:
    """Horizontal bars, largest first as given."""
    items = [(label, float(v)) for label, v in items if v is not None][:20]
    if not items:
        return ""
    top = max(v for _, v in items) or 1.0
    label_w, bar_h, gap = 190, 16, 6
    height = 24 + len(items) * (bar_h + gap)
    rows = []
    for i, (label, value) in enumerate(items):
        y = 20 + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 90) * value / top)
        rows.append(f"<text x=\"{label_w - 6}\" y=\"{y + 12}\" text-anchor=\"end\">{esc(str(label)[:32])}</text>"
                    f"<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1f}\" height=\"{bar_h}\" fill=\"{color}\" rx=\"2\">"
                    f"<title>{esc(label)}: {value:.4g} {unit}</title></rect>"
                    f"<text x=\"{label_w + w + 4:.1f}\" y=\"{y + 12}\">{value:.3g} {esc(unit)}</text>")
    return (f"<svg role=\"img\" aria-label=\"{esc(title)}\" width=\"{width}\" height=\"{height}\" "
            f"viewBox=\"0 0 {width} {height}\"><text x=\"0\" y=\"12\" font-weight=\"600\">{esc(title)}</text>"
            + "".join(rows) + "</svg>")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def xy_chart(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str = "",
             logx: bool = False, points_only: bool = False, highlight: list[tuple[float, float]] | None = None,
             labels: dict | None = None, width: int = 520, height: int = 300) -> str:
    """Lines (or points) of several series on shared axes; ``highlight``: points joined as a front."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    fx = (lambda x: math.log2(max(x, 1e-9))) if logx else float
    xs, ys = [fx(x) for x, _ in pts], [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.08 or 1.0
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    left, right, top, bottom = 56, 12, 24, 40

    def px(x):
        return left + (fx(x) - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f"<text x=\"0\" y=\"12\" font-weight=\"600\">{esc(title)}</text>",
             f"<line x1=\"{left}\" y1=\"{height - bottom}\" x2=\"{width - right}\" y2=\"{height - bottom}\" "
             "stroke=\"#57606a\"/>",
             f"<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{height - bottom}\" stroke=\"#57606a\"/>"]
    for t in _ticks(y0, y1):
        parts.append(f"<text x=\"{left - 4}\" y=\"{py(t) + 4:.1f}\" text-anchor=\"end\">{t:g}</text>"
                     f"<line x1=\"{left}\" y1=\"{py(t):.1f}\" x2=\"{width - right}\" y2=\"{py(t):.1f}\" "
                     "stroke=\"#eaeef2\"/>")
    xticks = sorted({x for x, _ in pts}) if logx or len({x for x, _ in pts}) <= 8 else _ticks(x0, x1)
    for t in xticks:
        parts.append(f"<text x=\"{px(t):.1f}\" y=\"{height - bottom + 14}\" text-anchor=\"middle\">{t:g}</text>")
    parts.append(f"<text x=\"{(left + width - right) / 2}\" y=\"{height - 6}\" text-anchor=\"middle\">"
                 f"{esc(xlabel)}</text><text x=\"12\" y=\"{(top + height - bottom) / 2}\" text-anchor=\"middle\" "
                 f"transform=\"rotate(-90 12 {(top + height - bottom) / 2})\">{esc(ylabel)}</text>")
    for i, (name, data) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        data = sorted(data)
        if not points_only and len(data) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in data)
            parts.append(f"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{path}\"/>")
        for x, y in data:
            tip = (labels or {}).get((x, y), f"{name}: {x:g}, {y:.4g}")
            parts.append(f"<circle cx=\"{px(x):.1f}\" cy=\"{py(y):.1f}\" r=\"3.5\" fill=\"{color}\">"
                         f"<title>{esc(tip)}</title></circle>")
        parts.append(f"<rect x=\"{width - right - 150}\" y=\"{top + 4 + 16 * i}\" width=\"10\" height=\"10\" "
                     f"fill=\"{color}\"/><text x=\"{width - right - 136}\" y=\"{top + 13 + 16 * i}\">"
                     f"{esc(name[:22])}</text>")
    if highlight and len(highlight) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(highlight))
        parts.append(f"<polyline fill=\"none\" stroke=\"#cf222e\" stroke-dasharray=\"4 3\" stroke-width=\"1.5\" "
                     f"points=\"{path}\"/>")
    return (f"<svg role=\"img\" aria-label=\"{esc(title)}\" width=\"{width}\" height=\"{height}\" "
            f"viewBox=\"0 0 {width} {height}\">" + "".join(parts) + "</svg>")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both latency (lower) and fidelity (higher).

    Example:
        >>> pareto_front([(1.0, 0.9), (2.0, 0.95), (1.5, 0.8), (3.0, 0.99)])
        [(1.0, 0.9), (2.0, 0.95), (3.0, 0.99)]
    """
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


# --------------------------------------------------------------------------- pieces shared by the pages


def _unanchored_note(lat: dict) -> str:
    """For an estimate no anchor puts on the user's setup: that its interval is for a setup not anchored, and the
    profile's own setup's beside it."""
    u = lat.get("unanchored")
    if not u:
        return ""
    lo, hi = u["profile_setup_interval_ms"]
    return (f" for a setup not anchored ({fmt(lo)}-{fmt(hi)} ms in the profile's own setup; "
            f"<code>slimx devices anchor {esc(lat.get('device', 'DEVICE'))}</code> narrows it)")


def _latency_card(lat: dict | None, title: str) -> str:
    if not lat:
        return ""
    if lat.get("kind") == "estimated":
        lo, hi = lat.get("interval_ms") or (None, None)
        rows = [["kind", "estimated (not measured: no device here)"], ["total", f"{fmt(lat.get('total_ms'))} ms"],
                ["80% interval", (f"{fmt(lo)}-{fmt(hi)} ms" if lo is not None else "-") + _unanchored_note(lat)],
                ["expected error", f"±{fmt(lat.get('expected_error_pct'), 0)}% ({esc(lat.get('cv_method') or '')})"],
                ["setting", esc(lat.get("setting"))], ["setup", esc(lat.get("setup") or "-")]]
    elif lat.get("measured"):
        rows = [["kind", f"measured ({esc(lat.get('where') or lat.get('runtime'))})"],
                ["median / p90", f"{fmt(lat.get('median_ms'))} / {fmt(lat.get('p90_ms'))} ms"],
                ["min / max", f"{fmt(lat.get('min_ms'))} / {fmt(lat.get('max_ms'))} ms"],
                ["runs", f"{lat.get('runs')} after {lat.get('warmup')} warm-up, {lat.get('threads')} threads"],
                ["runtime", f"{esc(lat.get('runtime'))} {esc(lat.get('runtime_version'))}"]]
    else:
        rows = [["kind", f"not measured: {esc(lat.get('reason', ''))}"]]
    return f"<div class=\"card\"><b>{esc(title)}</b>" + pairs(rows) + "</div>"


def per_op_charts(measured: dict | None, estimated: dict | None) -> str:
    """Per-op latency, measured (the runtime's profiler) and estimated (the device model) side by side."""
    charts = []
    for lat, what, color in ((measured, "measured", PALETTE[0]), (estimated, "estimated", PALETTE[1])):
        ops = (lat or {}).get("per_op") or []
        if ops:
            title = f"per op, {what} ({lat.get('device')})"
            charts.append(bar_chart([(o["op"], o["ms"]) for o in ops[:14]], "ms", title, color=color))
    return f"<div class=\"row\">{''.join(charts)}</div>" if charts else ""


def lengths_chart(*latencies: dict | None) -> str:
    series = {}
    notes = []
    for lat in latencies:
        over = (lat or {}).get("over_lengths")
        if not over:
            continue
        name = f"{lat.get('kind', 'measured')} {lat.get('device', '')}".strip()
        series[name] = [(r["length"], r["median_ms"]) for r in over["lengths"]]
        data = over.get("on_data")
        if data:
            notes.append(f"{esc(name)}: on your data ({data['samples']} samples, median {data['median_length']} "
                         f"tokens) median {data['median_ms']:.3f} ms, mean {data['mean_ms']:.3f} ms")
    if not series:
        return ""
    chart = xy_chart(series, "sequence length (tokens)", "ms", "latency over sequence lengths", logx=True)
    return chart + "".join(f"<p class=\"note\">{n}</p>" for n in notes)


def versions_table(versions: dict | None) -> str:
    if not versions:
        return ""
    return table(["tool", "version"], [[esc(k), esc(v)] for k, v in versions.items()])


def _parity_rows(parity: dict, label: str) -> list[list]:
    if not parity:
        return []
    if not parity.get("measured"):
        return [[esc(label), "not measured", esc(parity.get("reason", "")), "-", "-", "-"]]
    verdict = "<span class=\"pass\">PASS</span>" if parity.get("passed") else "<span class=\"fail\">FAIL</span>"
    tol = parity.get("tolerance") or {}
    rows = [[esc(label), verdict, esc(parity.get("runtime")), fmt(parity.get("cosine"), 6),
             f"{parity.get('rel_err', 0):.2e}", f"cos >= {tol.get('min_cosine')}, rel <= {tol.get('max_rel_err')}"]]
    for shape in parity.get("per_shape") or []:
        rows.append([f"&nbsp;&nbsp;{esc(shape['axis'])} {esc(shape['size'])}", "", "", fmt(shape.get("cosine"), 6),
                     f"{shape.get('rel_err', 0):.2e}", ""])
    if parity.get("calibration"):
        cal = parity["calibration"]
        rows.append(["&nbsp;&nbsp;on calibration data", "", "", fmt(cal.get("cosine"), 6),
                     f"{cal.get('rel_err', 0):.2e}", ""])
    return rows


# --------------------------------------------------------------------------- pages


def export_page(report: dict) -> str:
    model, target = report.get("model", {}), report.get("target", {})
    title = f"slimx export: {model.get('name')} -> {report.get('device', {}).get('name')}"
    subtitle = (f"{target.get('format')} {target.get('precision')}; {report.get('created', '')}; "
                f"{' '.join(report.get('command') or [])}")
    stages = report.get("stages_s") or {}
    overview = pairs([
        ["model", f"{esc(model.get('name'))} ({esc(model.get('source'))}), {model.get('params', 0) / 1e6:.2f} M "
                  f"params, " + (f"{model['macs'] / 1e9:.3f} GMACs" if model.get("macs") else "MACs not counted")],
        ["inputs", ", ".join(f"{esc(i['name'])} {esc(i['shape'])} {esc(i['dtype'])}" for i in model.get("inputs",
                                                                                                          []))],
        ["shapes", esc((report.get("shapes") or {}).get("form", "-")) + " " +
         esc((report.get("shapes") or {}).get("why", ""))],
        ["artifacts", ", ".join(f"{esc(a['path'])} ({a['bytes'] / 1e6:.2f} MB)" for a in report.get("artifacts",
                                                                                                     []))]])
    parity = report.get("parity") or {}
    parity_table = table(["check", "verdict", "runtime", "cosine", "rel err", "tolerance"],
                         _parity_rows(parity, "parity") + _parity_rows(parity.get("proxy") or {}, "proxy (ONNX)"))
    latency, host = report.get("latency"), report.get("host_latency")
    measured = latency if (latency or {}).get("measured") else host
    estimated = latency if (latency or {}).get("kind") == "estimated" else None
    sections = [section("Overview", overview),
                section("Stages", bar_chart(list(stages.items()), "s", "seconds per stage")),
                section("Parity", parity_table),
                section("Latency", f"<div class=\"row\">{_latency_card(latency, 'target device')}"
                                   f"{_latency_card(host, 'this host')}</div>", per_op_charts(measured, estimated),
                        lengths_chart(latency, host))]
    sections.append(compression_section(report))
    sections.append(section("Compile", f"<pre>{esc(json.dumps(report.get('compile') or {}, indent=1)[:6000])}</pre>"))
    sections.append(section("Versions", versions_table(report.get("versions"))))
    return page(title, subtitle, sections)


def compression_section(report: dict) -> str:
    passes = report.get("passes") or []
    if not passes:
        return ""
    comp = report.get("compression") or {}
    stats, original = report.get("model", {}), (report.get("model") or {}).get("original") or {}
    rows = []
    for p in passes:
        s = p.get("summary", {})
        fid = p.get("fidelity") or {}
        rows.append([esc(p["name"]), esc(", ".join(f"{k}={v}" for k, v in p.get("config", {}).items()
                                                 if k != "version" and v not in (None, (), []))),
                     esc(", ".join(f"{k} {v}" for k, v in s.items() if not isinstance(v, (dict, list)))),
                     fmt(fid.get("cosine_mean"), 4)])
    speed = comp.get("speedup") or {}
    fidelity = comp.get("fidelity") or {}
    summary = table(["", "before", "after"], [
        ["params", f"{original.get('params', 0) / 1e6:.2f} M", f"{stats.get('params', 0) / 1e6:.2f} M"],
        ["MACs", f"{(original.get('macs') or 0) / 1e9:.3f} G", f"{(stats.get('macs') or 0) / 1e9:.3f} G"],
        ["latency", fmt(speed.get("baseline_median_ms")) + " ms", fmt(speed.get("compressed_median_ms")) + " ms"],
        ["fidelity (held-out cosine)", "1.0", fmt((fidelity.get("final") or {}).get("cosine_mean"), 4)]])
    parts = [summary, table(["pass", "config", "summary", "held-out cosine"], rows)]
    if comp.get("gate"):
        g = comp["gate"]
        verdict = "<span class=\"pass\">PASS</span>" if g.get("passed") else "<span class=\"fail\">FAIL</span>"
        parts.append(f"<p>fidelity gate {verdict}: {esc(g.get('metric'))} {fmt(g.get('value'), 4)} against the "
                     f"floor {fmt(g.get('floor'), 4)}</p>")
    for p in passes:
        traj = p.get("trajectory") or []
        pts = [(t["latency_ms"], t["fidelity"]) for t in traj
               if t.get("latency_ms") is not None and t.get("fidelity") is not None]
        if len(pts) > 1:
            parts.append(xy_chart({p["name"]: pts}, "latency (ms)", "fidelity", f"{p['name']}: trajectory"))
        trials = p.get("trials") or []
        pts = [(t["latency_ms"], t["fidelity"]) for t in trials if t.get("latency_ms") is not None
               and t.get("fidelity") is not None]
        if len(pts) > 2:
            parts.append(xy_chart({"settings tried": pts}, "latency (ms)", "fidelity",
                                  f"{p['name']}: latency against fidelity", points_only=True,
                                  highlight=pareto_front(pts)))
    return section("Compression", *parts)


def eval_page(result: dict) -> str:
    fid, lat = result.get("fidelity", {}), result.get("latency", {})
    rows = [[esc(k), fmt(v, 4) if isinstance(v, float) else esc(v)] for k, v in fid.items()]
    speed = bar_chart([("original fp32", lat.get("original_fp32_median_ms")),
                       ("artifact", lat.get("artifact_median_ms"))], "ms", "mean ms per sample over the data")
    return page(f"slimx eval: {result.get('artifact')}", f"against {result.get('against')} on {result.get('data')}",
                [section("Fidelity", table(["measure", "value"], rows)),
                 section("Latency", speed, f"<p class=\"note\">{esc(lat.get('method', ''))}; ratio "
                                           f"{fmt(lat.get('ratio'))}x ({esc(lat.get('runtime'))})</p>")])


def profile_page(latency: dict, subject: str) -> str:
    measured = latency if latency.get("measured") else None
    estimated = latency if latency.get("kind") == "estimated" else None
    modules = [(m["module"], m["ms"]) for m in latency.get("per_module") or []]
    nodes = [[fmt(n.get("ms"), 4), esc(n.get("op")), esc(n.get("module", ""))] for n in latency.get("per_node") or []]
    return page(f"slimx profile: {subject} on {latency.get('device')}", latency.get("label", ""),
                [section("Latency", _latency_card(latency, latency.get("device", "")),
                         per_op_charts(measured, estimated), lengths_chart(latency)),
                 section("Per module", bar_chart(modules, "ms", "per module path")),
                 section("Slowest ops", table(["ms", "op", "module"], nodes, {0}) if nodes else "")])


def gate_page(result: dict) -> str:
    rows = []
    for e in result["entries"]:
        for c in e.get("checks", []):
            css = "fail" if c["verdict"] == "fail" else "pass"
            rows.append([esc(e["name"]), esc(e["device"]), esc(e["kind"]), esc(c["what"]), fmt(c["value"], 4),
                         f"{fmt(c['interval'][0], 4)}-{fmt(c['interval'][1], 4)}", fmt(c["limit"], 4),
                         f"<span class=\"{css}\">{c['verdict'].upper()}</span>"])
    charts = []
    for e in result["entries"]:
        cand = e.get("candidate") or {}
        series = {}
        if cand.get("rounds_median_ms"):
            series["candidate"] = list(enumerate(cand["rounds_median_ms"], 1))
        base = e.get("baseline") or {}
        if base.get("rounds_median_ms"):
            series["baseline"] = list(enumerate(base["rounds_median_ms"], 1))
        if series:
            charts.append(xy_chart(series, "round", "median ms", f"{e['name']}: median by round"))
    notes = "".join(f"<p class=\"note\">{esc(e['name'])}: {esc(w)}</p>" for e in result["entries"]
                    for w in e.get("warnings", []))
    verdict = "passed" if result["passed"] else "FAILED"
    return page(f"slimx gate {verdict}", f"{result.get('source')} on {result.get('machine')}, {result['created']}",
                [section("Checks", table(["entry", "device", "how", "check", "value", "interval", "limit",
                                          "verdict"], rows, {4, 6}), notes),
                 section("Rounds", f"<div class=\"row\">{''.join(charts)}</div>" if charts else ""),
                 section("Versions", versions_table(result.get("versions")))])


def write(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_gate_html(path: Path, result: dict) -> Path:
    return write(path, gate_page(result))
