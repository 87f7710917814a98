"""Experiment tracking: ``--track mlflow[:URI]`` logs an export, a gate or each sweep trial as an MLflow run.

MLflow is an optional extra (``slimx-edge[track]``: ``mlflow-skinny``), imported only when a run is tracked. The
default store is ``./mlruns`` (a local file store); ``mlflow:URI`` names another (a folder, ``file:``, ``sqlite:``
or a tracking server's ``http(s)://`` address). A run holds the flattened config as parameters; parity, fidelity,
latency, speed-up and size as metrics; the device, format and precision as tags; ``report.json`` (``log_dict``) and
the HTML report and model card as artifacts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from slimx._core.errors import UsageError

DEFAULT_STORE = "./mlruns"
EXPERIMENT = "slimx"


@dataclass(frozen=True)
class Tracker:
    """Where runs go: the tracker (``mlflow``) and its store URI."""

    kind: str
    uri: str

    @property
    def store(self) -> str:
        """The URI MLflow is given: a plain folder becomes an absolute ``file:`` URI."""
        if "://" in self.uri or self.uri.startswith(("file:", "sqlite:", "databricks")):
            return self.uri
        return Path(self.uri).expanduser().resolve().as_uri()


def parse_track(value: str | None) -> Tracker | None:
    """``mlflow`` or ``mlflow:URI`` as a Tracker (None: not tracked); MLflow must be importable.

    Example:
        >>> parse_track(None) is None
        True
    """
    if value is None:
        return None
    kind, _, uri = str(value).partition(":")
    if kind != "mlflow":
        raise UsageError(f"--track {value}", "is not a tracker slimx knows", "use --track mlflow or mlflow:URI")
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--track {value}", "needs MLflow, which is not installed",
                         "pip install 'slimx-edge[track]' (mlflow-skinny), or drop --track") from exc
    return Tracker("mlflow", uri or DEFAULT_STORE)


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def export_metrics(report: dict) -> dict[str, float]:
    """The numbers worth comparing across runs, from an export's report."""
    out: dict[str, float | None] = {}
    parity = report.get("parity") or {}
    if parity.get("measured"):
        out.update({"parity_cosine": parity.get("cosine"), "parity_max_abs": parity.get("max_abs"),
                    "parity_rel_err": parity.get("rel_err"), "parity_passed": float(bool(parity.get("passed")))})
        cal = parity.get("calibration") or {}
        if cal.get("measured"):
            out["parity_calibration_cosine"] = cal.get("cosine")
    predicted = (report.get("preflight") or {}).get("predicted_parity") or {}
    if predicted.get("cosine") is not None:  # the formats that cannot run here: the pre-flight's prediction
        out["parity_predicted_cosine"] = predicted["cosine"]
    lat = report.get("latency") or {}
    if lat.get("kind") == "measured":
        out.update({"latency_ms": lat.get("median_ms"), "latency_p90_ms": lat.get("p90_ms"), "latency_measured": 1.0})
    elif lat.get("kind") == "estimated":
        lo, hi = (lat.get("interval_ms") or [None, None])[:2]
        out.update({"latency_ms": lat.get("total_ms"), "latency_interval_low_ms": lo,
                    "latency_interval_high_ms": hi, "latency_measured": 0.0})
    host = report.get("host_latency") or {}
    if host.get("kind") == "measured":
        out["host_latency_ms"] = host.get("median_ms")
    comp = report.get("compression") or {}
    final = (comp.get("fidelity") or {}).get("final") or {}
    for key in ("cosine_mean", "cosine_min", "nn_agreement", "accuracy", "accuracy_reference"):
        if key in final:
            out[f"fidelity_{key}"] = final[key]
    if comp.get("gate"):
        out["fidelity_passed"] = float(bool(comp["gate"].get("passed")))
    if isinstance(comp.get("speedup"), dict):
        out["speedup"] = comp["speedup"].get("ratio")
    out["artifact_bytes"] = sum(a.get("bytes", 0) for a in report.get("artifacts") or [])
    model = report.get("model") or {}
    out["params"], out["macs"] = model.get("params"), model.get("macs")
    return {k: f for k, v in out.items() if (f := _finite(v)) is not None}


def _params(config: dict) -> dict[str, str]:
    """The flattened config as MLflow parameters (values as text, cut to MLflow's length limit)."""
    return {k: str(v)[:500] for k, v in config.items() if v not in (None, (), [], {}, False)}


def _start(tracker: Tracker, run_name: str):
    import os

    import mlflow

    if tracker.store.startswith("file:"):
        # MLflow 3.x keeps its folder store in maintenance mode and refuses it unless asked: a folder is what the
        # user asked for here (a database or server store is a sqlite: / http: URI, which needs full mlflow)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(tracker.store)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow.start_run(run_name=run_name)


def log_export(tracker: Tracker, report: dict, out: str | Path, card: bool = True) -> dict:
    """One MLflow run for an export: config, metrics, tags, ``report.json`` and the folder's report/card files."""
    import mlflow

    out = Path(out)
    target, device = report.get("target") or {}, report.get("device") or {}
    name = f"{(report.get('model') or {}).get('name')} -> {device.get('name')} ({target.get('format')}, " \
           f"{target.get('precision')})"
    if card and (out / "report.json").is_file():
        from slimx.card import write_card

        write_card(out)
    with _start(tracker, name) as run:
        mlflow.log_params(_params(report.get("config") or {}))
        mlflow.log_metrics(export_metrics(report))
        mlflow.set_tags({"slimx.kind": "export", "slimx.device": device.get("name"),
                         "slimx.format": target.get("format"), "slimx.precision": target.get("precision"),
                         "slimx.latency": (report.get("latency") or {}).get("kind", "none"),
                         "slimx.out": str(out)})
        mlflow.log_dict(report, "report.json")
        for extra in ("report.html", "README.md"):
            if (out / extra).is_file():
                mlflow.log_artifact(str(out / extra))
        return {"tracker": "mlflow", "store": tracker.store, "experiment": EXPERIMENT, "run_id": run.info.run_id}


def log_gate(tracker: Tracker, result: dict) -> dict:
    """One MLflow run for a gate: each entry's candidate figure and verdict as metrics, the result as JSON."""
    import mlflow

    metrics: dict[str, float] = {"passed": float(bool(result.get("passed")))}
    for i, entry in enumerate(result.get("entries") or []):
        key = str(entry.get("name") or i).replace(" ", "_")
        cand = entry.get("candidate") or {}
        for field in ("median_ms", "estimate_ms", "p90_ms"):
            if (value := _finite(cand.get(field))) is not None:
                metrics[f"{key}.{field}"] = value
        metrics[f"{key}.passed"] = float(entry.get("verdict") in ("pass", "recorded"))
    with _start(tracker, f"gate ({len(result.get('entries') or [])} entries)") as run:
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"slimx.kind": "gate", "slimx.verdict": "pass" if result.get("passed") else "fail"})
        mlflow.log_dict(result, "gate.json")
        return {"tracker": "mlflow", "store": tracker.store, "experiment": EXPERIMENT, "run_id": run.info.run_id}
