"""``slimx sweep``: models x devices x precisions x recipes, each trial one Ray task, with a latency-fidelity front.

A sweep file (TOML, strict)::

    version = 1
    models = ["minilm", "timm:mobilenetv2_050"]
    devices = ["host", "iphone12"]
    precisions = ["fp32"]                  # optional, default ["fp32"]
    calib = "calib.txt"                    # calibration data (int8, passes), relative to the file; or a table
                                           # per model: calib = { minilm = "calib.txt", "timm:x" = "img.npz" }
    eval = "heldout.txt"                   # optional evaluation data: held-out fidelity of each artifact
    min_fidelity = 0.9                     # the floor each compressed trial's export is held to
    rank_by = "latency"                    # or "fidelity"
    timeout_s = 1800                       # per trial
    [[recipe]]
    name = "plain"                         # no passes
    [[recipe]]
    name = "lrt-0.5"
    passes = ["lowrank:rank_ratio=0.5,exclude=attention|pooler"]
    recover = "steps=100"

Each trial runs the ordinary path in a Ray task (its own worker process): ``slimx export`` into
``DIR/trials/KEY`` (a normal OUT folder, so ``slimx gate DIR/trials/KEY`` takes it as a candidate), then
``slimx eval`` on the evaluation data where given. A trial is keyed by a hash of what determines its result
(model, weights, device, precision, recipe, data files' contents, slimx and tool versions): rerunning the sweep
skips finished trials, reruns interrupted ones (a worker killed or gone) and, with ``--retry-failed``, failed
ones. Results are appended to
``DIR/results.json`` and ``DIR/results.csv`` as trials finish. A trial that fails or is killed (its worker gone,
or past ``timeout_s``) is recorded with its one-line error and the sweep goes on.

Timing honesty: every trial that times on this host (device ``host``, or a format whose runtime is here) holds
the Ray resource ``slimx_host_timing`` (one unit exists per node) and every worker CPU of the sweep, so nothing
else runs beside it while it exports and times; estimated trials run alongside each other. The table, the JSON and
the report say so (``timing``). Local by default (``ray.init`` on this machine, ``--workers`` CPUs); ``--address``
joins an existing cluster, in which case ``DIR`` and the data files must be on a path every node sees.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from slimx._core.config import check_keys, read_toml
from slimx._core.errors import UsageError

TIMING_RESOURCE = "slimx_host_timing"
TIMING_NOTE = ("trials measured on this machine ran alone on it (the node's timing resource and every worker CPU "
               "held while they exported and timed); estimated trials ran alongside each other")
CSV_COLUMNS = ("key", "model", "device", "precision", "recipe", "status", "latency_ms", "latency_kind",
               "interval_lo_ms", "interval_hi_ms", "fidelity", "fidelity_source", "params", "artifact_mb",
               "seconds", "error", "out")


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[str, ...] = ()
    recover: str | None = None
    budget_ms: float | None = None


@dataclass
class SweepPlan:
    models: list[str]
    devices: list[str]
    precisions: list[str]
    recipes: list[Recipe]
    calib: str | dict | None = None  # one file, or {model: file}
    eval: str | dict | None = None
    min_fidelity: float | None = None
    rank_by: str = "latency"
    timeout_s: float = 1800.0
    runs: int = 30
    source: str = ""
    notes: list = field(default_factory=list)
    cwd: str = ""  # the driver's folder: factories (pkg.module:factory) are imported from it, as slimx export does

    def trials(self) -> list[dict]:
        return [{"model": m, "device": d, "precision": p, "recipe": dataclasses.asdict(r)}
                for m, d, p, r in itertools.product(self.models, self.devices, self.precisions, self.recipes)]


def load_sweep(path: str | Path) -> SweepPlan:
    """Read and check a sweep file (unknown keys, devices, models, recipes: one UsageError each)."""
    from slimx.devices import load_device
    from slimx.export.intake import check_spec
    from slimx.quant import check_precision
    from slimx.slim import parse_pass

    path = Path(path)
    where = f"sweep file {path}"
    data = read_toml(path, "sweep file", {"models", "devices", "precisions", "recipe", "calib", "eval",
                                          "min_fidelity", "rank_by", "timeout_s", "runs"},
                     "give a TOML file with models, devices and [[recipe]] tables")
    for key in ("models", "devices"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise UsageError(where, f"needs a non-empty list {key} = [...]", f"e.g. {key} = [\"...\"]")
    base = path.parent
    models = [_rel(m, base) for m in data["models"]]
    for m in models:
        if not Path(m).is_dir():
            check_spec(m)
    devices = [load_device(d, measure_host=False).name for d in data["devices"]]
    precisions = [check_precision(p) for p in data.get("precisions", ["fp32"])]
    recipes = []
    for i, table in enumerate(data.get("recipe") or [{"name": "plain"}]):
        check_keys(table, {"name", "passes", "recover", "budget_ms"}, f"{where} [[recipe]] #{i + 1}",
                   "a recipe takes name, passes, recover and budget_ms", noun="key")
        if not table.get("name"):
            raise UsageError(f"{where} [[recipe]] #{i + 1}", "has no name", "give it name = \"...\"")
        for spec in table.get("passes", []):
            parse_pass(spec)  # an unknown pass or option is refused now, not in a worker
        recipes.append(Recipe(table["name"], tuple(table.get("passes", [])), table.get("recover"),
                              table.get("budget_ms")))
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UsageError(where, "names two recipes alike", "give every [[recipe]] its own name")
    data_files = {}
    for key in ("calib", "eval"):
        value = data.get(key)
        if isinstance(value, dict):
            unknown_models = sorted(set(value) - set(data["models"]))
            if unknown_models:
                raise UsageError(f"{where}: {key}", f"names model(s) not in models: {', '.join(unknown_models)}",
                                 "key the table by the models' names as models lists them")
            data_files[key] = {_rel(m, base): _rel(f, base) for m, f in value.items()}
            files = list(value.values())
        else:
            data_files[key] = _rel(value, base)
            files = [value] if value else []
        for f in files:
            if not (base / f).exists() and not Path(f).exists():
                raise UsageError(f"{where}: {key} = {f}", "does not exist", "give a data file next to the sweep")
    rank_by = data.get("rank_by", "latency")
    if rank_by not in ("latency", "fidelity"):
        raise UsageError(f"{where}: rank_by = {rank_by}", "is not latency or fidelity", "use one of them")
    return SweepPlan(models, devices, precisions, recipes, data_files["calib"], data_files["eval"],
                     data.get("min_fidelity"), rank_by, float(data.get("timeout_s", 1800)), int(data.get("runs", 30)),
                     str(path), cwd=os.getcwd())


def _rel(value: str | None, base: Path) -> str | None:
    if value is None or ":" in value.split("/")[0] or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def trial_key(trial: dict, plan: SweepPlan) -> str:
    """A hash of everything that determines a trial's result: what it runs, the data's contents, the versions."""
    from slimx._core.versions import tool_versions

    digest = hashlib.sha256()
    parts = {**trial, "calib": _file_hash(data_for(plan.calib, trial)), "eval": _file_hash(data_for(plan.eval, trial)),
             "min_fidelity":
             plan.min_fidelity, "runs": plan.runs, "model_files": _file_hash(trial["model"]),
             "versions": tool_versions()}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def data_for(value, trial: dict) -> str | None:
    """The data file of a trial: the sweep's one file, or its model's entry in the table."""
    return value.get(trial["model"]) if isinstance(value, dict) else value


def _file_hash(value: str | None) -> str | None:
    if not value or not Path(value).exists():
        return None
    path = Path(value)
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() and f.stat().st_size < (64 << 20):
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def times_on_host(trial: dict) -> bool:
    """Whether the trial's export measures latency on this machine (the host, or a device whose format has a
    runtime here: its host latency is measured too), so it must not share the cores while it does."""
    from slimx.devices import load_device
    from slimx.targets import get_target

    if trial["device"] == "host":
        return True
    return get_target(load_device(trial["device"], measure_host=False).default_format).runner() is not None


def export_flags(trial: dict, plan: SweepPlan, out: Path) -> dict:
    """The trial's export, as ``slimx.config.ExportConfig`` flags (what ``slimx export`` would be given)."""
    recipe = trial["recipe"]
    flags = {"model": trial["model"], "device": trial["device"], "precision": trial["precision"], "out": str(out),
             "runs": plan.runs, "calib": data_for(plan.calib, trial), "passes": tuple(recipe["passes"]),
             "recover": recipe.get("recover"), "budget_ms": recipe.get("budget_ms")}
    if plan.min_fidelity is not None and (recipe["passes"] or recipe.get("budget_ms")):
        flags["min_fidelity"] = plan.min_fidelity
    return {k: v for k, v in flags.items() if v not in (None, ())}


def run_trial(trial: dict, plan_dict: dict, out: str) -> dict:
    """One trial, in a Ray worker process: ``slimx.export`` (and ``slimx.evaluate``) called in that process, their
    one-line errors kept; returns the result row. A trial past ``timeout_s`` is stopped by the driver."""
    plan = SweepPlan(**{k: v for k, v in plan_dict.items() if k != "recipes"},
                     recipes=[Recipe(**r) for r in plan_dict["recipes"]])
    started = time.time()
    row = {"model": trial["model"], "device": trial["device"], "precision": trial["precision"],
           "recipe": trial["recipe"]["name"], "out": out, "status": "failed"}
    os.environ["HF_HUB_OFFLINE"] = "1"
    cwd = plan.cwd or os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # factories (pkg.module:factory) import from the driver's folder, as slimx export's do
    os.chdir(cwd)
    _trial(trial, plan, out, row)
    row["seconds"] = round(time.time() - started, 1)
    return row


def _trial(trial: dict, plan: SweepPlan, out: str, row: dict) -> None:
    """Fill ``row`` with the trial's export (and evaluation): its figures, or its one-line error."""
    from slimx._core.errors import SlimxError, first_line
    from slimx.api import evaluate, export_config
    from slimx.config import ExportConfig

    try:
        cfg = ExportConfig.from_flags(export_flags(trial, plan, Path(out)), where=f"sweep trial {row['recipe']}")
        result = export_config(cfg)
    except SlimxError as exc:
        row["error"] = f"slimx: error: {exc.line()}"[:300]
        return
    except Exception as exc:  # an unexpected failure: this trial only, in one line
        row["error"] = f"slimx: error: {type(exc).__name__}: {first_line(exc)}"[:300]
        return
    report = result.report.to_dict()
    row.update(_from_report(report))
    if result.failures:  # a run that failed its parity or fidelity gate keeps its report
        row["error"] = f"slimx: error: {result.failures[0].line()}"[:300]
        return
    row["status"] = "ok"
    evaluation = data_for(plan.eval, trial)
    if evaluation and report.get("latency", {}).get("measured") is not None:
        from slimx.targets import get_target

        if get_target(result.format).runner() is not None:
            try:
                ev = evaluate(out, evaluation, truncate=True)
            except SlimxError:
                return
            row["fidelity"], row["fidelity_source"] = ev.cosine, f"slimx eval on {Path(evaluation).name}"


def _from_report(report: dict) -> dict:
    lat = report.get("latency") or {}
    out = {"params": report.get("model", {}).get("params"),
           "artifact_mb": round(sum(a["bytes"] for a in report.get("artifacts", [])[:1]) / 1e6, 3)}
    if lat.get("kind") == "estimated":
        lo, hi = lat.get("interval_ms") or (None, None)
        out.update({"latency_ms": lat.get("total_ms"), "latency_kind": "estimated", "interval_lo_ms": lo,
                    "interval_hi_ms": hi, "anchors": (lat.get("anchors") or {}).get("count", 0)})
    elif lat.get("measured"):
        out.update({"latency_ms": lat.get("median_ms"), "latency_kind": "measured",
                    "interval_lo_ms": lat.get("min_ms"), "interval_hi_ms": lat.get("p90_ms")})
    comp = report.get("compression") or {}
    final = (comp.get("fidelity") or {}).get("final")
    if final:
        out["fidelity"], out["fidelity_source"] = final.get("cosine_mean"), "held-out calibration samples"
    else:
        out["fidelity"], out["fidelity_source"] = 1.0, "uncompressed (the original)"
    return out


# --------------------------------------------------------------------------- the driver


def run_sweep(plan: SweepPlan, out_dir: Path, address: str | None = None, workers: int | None = None,
              retry_failed: bool = False, progress=None) -> dict:
    """Run every trial not finished yet on Ray; returns the whole table (old rows and new)."""
    import ray

    out_dir = Path(out_dir).absolute()
    (out_dir / "trials").mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in read_results(out_dir)}
    todo = []
    for trial in plan.trials():
        key = trial_key(trial, plan)
        old = done.get(key)  # finished: skipped; failed: rerun with retry_failed; interrupted (worker gone): rerun
        if old is not None and (old["status"] == "ok" or (old["status"] == "failed" and not retry_failed)):
            continue
        todo.append((key, trial))
    skipped = len(plan.trials()) - len(todo)
    if progress is not None:
        progress.note(f"{len(plan.trials())} trials: {skipped} already in {out_dir / 'results.json'}, "
                      f"{len(todo)} to run")
    if todo:
        workers = workers or max(1, min(os.cpu_count() or 1, 2))
        if address:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, resources={TIMING_RESOURCE: 1}, include_dashboard=False,
                     ignore_reinit_error=True, log_to_driver=False, configure_logging=False)
        try:
            remote = ray.remote(max_retries=0)(run_trial)
            plan_dict = {**dataclasses.asdict(plan), "recipes": [dataclasses.asdict(r) for r in plan.recipes]}
            pending = {}
            for key, trial in todo:
                opts = {"num_cpus": 1}
                if times_on_host(trial):  # alone on the node: a trial beside it would share its cores
                    opts = {"num_cpus": workers, "resources": {TIMING_RESOURCE: 1}}
                ref = remote.options(**opts).remote(trial, plan_dict, str(out_dir / "trials" / key))
                pending[ref] = (key, trial, time.time())
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                for ref in ready:
                    key, trial, _ = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except Exception as exc:  # the worker died (killed, out of memory): this trial only
                        row = {"model": trial["model"], "device": trial["device"], "precision": trial["precision"],
                               "recipe": trial["recipe"]["name"], "status": "interrupted",
                               "out": str(out_dir / "trials" / key), "error": _ray_error(exc)}
                    row["key"] = key
                    done[key] = row
                    write_results(out_dir, list(done.values()), plan)
                    if progress is not None:
                        progress.tick("sweep: trial", len(todo) - len(pending), len(todo))
                        progress.note(f"[{len(done)}/{len(plan.trials())}] {row['model']} {row['device']} "
                                      f"{row['precision']} {row['recipe']}: {row['status']}"
                                      + (f", {row.get('latency_ms')} ms" if row.get("latency_ms") else "")
                                      + (f" ({row['error'][:100]})" if row.get("error") else ""))
                now = time.time()
                for ref, (key, trial, started) in list(pending.items()):
                    if now - started > plan.timeout_s:  # the trial runs in its worker: stop the worker
                        ray.cancel(ref, force=True)
                        pending.pop(ref)
                        row = {"model": trial["model"], "device": trial["device"], "precision": trial["precision"],
                               "recipe": trial["recipe"]["name"], "status": "failed", "key": key,
                               "out": str(out_dir / "trials" / key), "seconds": round(now - started, 1),
                               "error": f"the trial ran past timeout_s = {plan.timeout_s:g} s and was stopped"}
                        done[key] = row
                        write_results(out_dir, list(done.values()), plan)
        finally:
            ray.shutdown()
    rows = [done[trial_key(t, plan)] for t in plan.trials() if trial_key(t, plan) in done]
    result = {"source": plan.source, "out": str(out_dir), "trials": rows, "front": pareto(rows),
              "skipped_finished": skipped, "ran": len(todo), "timing": TIMING_NOTE}
    write_results(out_dir, list(done.values()), plan)
    write_report(out_dir, result, plan)
    from slimx.card import write_front_card

    write_front_card(result)
    return result


def _ray_error(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if "Worker" in type(exc).__name__ or "died" in text.lower() or "cancel" in text.lower():
        return f"the trial's worker process ended before it finished ({text[:200]}); rerun the sweep to retry it"
    return text[:300]


def read_results(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["trials"]
    except (ValueError, KeyError) as exc:
        raise UsageError(f"{path}", f"is not a slimx sweep table ({exc})", "remove it, or give another --out") from None


def write_results(out_dir: Path, rows: list[dict], plan: SweepPlan) -> None:
    """The table as JSON and CSV, written whole under temporary names and renamed (a kill leaves the last one)."""
    out_dir = Path(out_dir)
    tmp = out_dir / ".results.json.partial"
    tmp.write_text(json.dumps({"source": plan.source, "trials": rows}, indent=2) + "\n")
    os.replace(tmp, out_dir / "results.json")
    tmp = out_dir / ".results.csv.partial"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, out_dir / "results.csv")


def pareto(rows: list[dict]) -> dict:
    """Per device: the trials no other trial of the same model beats on both latency (lower) and fidelity (higher).
    Fronts are per model: fidelity to a text encoder and to an image classifier are not one scale, and a user picks
    a recipe for the model they have.

    Example:
        >>> rows = [{"key": k, "model": m, "device": "d", "status": "ok", "latency_ms": ms, "fidelity": f}
        ...         for k, m, ms, f in (("a", "big", 10, 1.0), ("b", "big", 6, 0.95), ("c", "big", 8, 0.9),
        ...                             ("d", "small", 1, 1.0))]
        >>> pareto(rows)  # c is slower and less faithful than b; d is faster than all but another model
        {'d': ['a', 'b', 'd']}
    """
    from slimx.html import pareto_front

    out = {}
    for device in sorted({r["device"] for r in rows}):
        keys = []
        for model in sorted({r["model"] for r in rows if r["device"] == device}):
            mine = [r for r in rows if r["device"] == device and r["model"] == model and r["status"] == "ok"
                    and r.get("latency_ms") is not None and r.get("fidelity") is not None]
            front = set(pareto_front([(r["latency_ms"], r["fidelity"]) for r in mine]))
            keys += [r["key"] for r in mine if (r["latency_ms"], r["fidelity"]) in front]
        out[device] = [r["key"] for r in rows if r["key"] in keys]
    return out


def table(result: dict, rank_by: str = "latency") -> str:
    rows = [("", "model", "device", "prec", "recipe", "status", "latency ms", "kind", "fidelity", "key")]
    front = {k for keys in result["front"].values() for k in keys}
    order = sorted(result["trials"], key=lambda r: (r["device"], r["status"] != "ok",
                                                    (r.get("latency_ms") or 1e9) if rank_by == "latency"
                                                    else -(r.get("fidelity") or 0)))
    for r in order:
        rows.append(("*" if r["key"] in front else "", r["model"][:28], r["device"], r["precision"], r["recipe"],
                     r["status"], f"{r['latency_ms']:.3f}" if r.get("latency_ms") is not None else "-",
                     r.get("latency_kind") or "-", f"{r['fidelity']:.4f}" if r.get("fidelity") is not None else "-",
                     r["key"]))
    widths = [max(len(str(x[i])) for x in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [r for r in result["trials"] if r["status"] != "ok"]
    lines.append(f"slimx sweep: {len(result['trials'])} trials ({result['ran']} run now, {result['skipped_finished']}"
                 f" already done), {len(failed)} not ok; * = on the latency-fidelity front of its model and device; "
                 f"table in {Path(result['out']) / 'results.csv'}")
    lines.append(f"  timing: {result.get('timing', TIMING_NOTE)}")
    for r in failed:
        again = "rerun the sweep" if r["status"] == "interrupted" else "--retry-failed reruns it"
        lines.append(f"  {r['status']} {r['key']}: {r.get('error', '')[:160]} ({again})")
    return "\n".join(lines)


def write_report(out_dir: Path, result: dict, plan: SweepPlan) -> None:
    from slimx.html import esc, fmt, page, pareto_front, section, write, xy_chart
    from slimx.html import table as html_table

    charts = []
    for device, model in sorted({(r["device"], r["model"]) for r in result["trials"]}):
        pts, labels = [], {}
        for r in result["trials"]:
            if r["device"] == device and r["model"] == model and r["status"] == "ok" \
                    and r.get("latency_ms") is not None and r.get("fidelity") is not None:
                pts.append((r["latency_ms"], r["fidelity"]))
                labels[(r["latency_ms"], r["fidelity"])] = f"{r['precision']} {r['recipe']}"
        if pts:
            charts.append(xy_chart({"trials": pts}, "latency (ms)", "fidelity",
                                   f"{model} on {device}: latency against fidelity", points_only=True,
                                   highlight=pareto_front(pts), labels=labels))
    front = {k for keys in result["front"].values() for k in keys}
    rows = [[("&#9733; " if r["key"] in front else "") + esc(r["model"]), esc(r["device"]), esc(r["precision"]),
             esc(r["recipe"]), esc(r["status"]), fmt(r.get("latency_ms")), esc(r.get("latency_kind") or "-"),
             fmt(r.get("fidelity"), 4), esc(r.get("error", "")[:120])] for r in result["trials"]]
    html = page(f"slimx sweep: {Path(plan.source).name}", f"{len(result['trials'])} trials in {result['out']}; "
                f"timing: {result.get('timing', TIMING_NOTE)}",
                [section("Front", f"<div class=\"row\">{''.join(charts)}</div>"),
                 section("Trials", html_table(["model", "device", "precision", "recipe", "status", "latency ms",
                                               "kind", "fidelity", "error"], rows, {5, 7}))])
    write(Path(out_dir) / "report.html", html)
