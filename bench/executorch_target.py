"""ExecuTorch (.pte, XNNPACK delegate) beside ONNX and TFLite, on this host, in one interleaved run.

    python bench/executorch_target.py [--fit 128] [--eval 160] [--rounds 12] [--runs 15]

Part 1: MiniLM (real weights, static 1x64), a ViT (timm deit_tiny_patch16_224) and a CNN (timm mobilenetv2_100,
random weights) exported with ``slimx.export`` to ``.pte`` for pixel7 and for host, to ONNX for host and to TFLite
for pixel7 (fp32): parity in each runtime, the ops XNNPACK did not take (with their module paths), the Pixel 7
estimate, and host latency of the three formats timed together (every round runs each artifact ``--runs`` times
in a shuffled order; a figure is the median over rounds). The ExecuTorch / LiteRT ratio of those medians is the
measured part of the transfer the pixel profiles' executorch estimate rests on (the same XNNPACK kernels).

Part 2: int8 MiniLM on real sentences: static int8 (calibrated on ``--fit`` standard-library sentences) and
int8 weights in ExecuTorch, TFLite and ONNX; held-out cosine of each embedding to PyTorch's on ``--eval`` other
sentences, nearest-neighbour agreement, and speed against the same format's fp32 and against ONNX's int8 in the
same interleaved run. Writes bench/results/executorch.{md,json}.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results

MODELS = {"minilm": ["1x64"], "timm:deit_tiny_patch16_224": None, "timm:mobilenetv2_100": None}
FORMATS = (("executorch", "pixel7"), ("onnx", "host"), ("tflite", "pixel7"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=128)
    ap.add_argument("--eval", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="slimx-bench-executorch-"))
    fit = work / "fit.txt"
    from slimx.devices.host import cpu_model
    from slimx.export.textdata import stdlib_sentences

    fit.write_text("\n".join(stdlib_sentences(args.fit, 0)) + "\n")
    held = stdlib_sentences(args.eval, args.fit)  # disjoint from the fit sentences
    part1 = [model_rows(spec, shapes, work, fit, args) for spec, shapes in MODELS.items()]
    part2 = int8_rows(work, fit, held, args)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpu": cpu_model(), "threads": args.threads, "rounds": args.rounds, "runs": args.runs, "fit": args.fit,
            "eval": args.eval, "versions": _versions()}
    result = {"meta": meta, "models": part1, "int8": part2}
    write_results("executorch", result, render(result))


def _export(spec, device, fmt, precision, out, shapes, calib=None):
    import slimx

    print(f"export {spec} {fmt} {precision} for {device}", file=sys.stderr, flush=True)
    kw = {"shapes": {"input_shapes": shapes, "static": True}} if shapes else {}
    started = time.perf_counter()
    result = slimx.export(spec, device, format=fmt, precision=precision, out=out, calib=calib, **kw)
    return result, time.perf_counter() - started


def model_rows(spec, shapes, work, fit, args) -> dict:
    from slimx.targets import Artifact

    name = spec.split(":")[-1]
    specs = _inputs(spec, shapes)
    rows, timed = [], []
    calib = fit if spec == "minilm" else None
    for fmt, device in (*FORMATS, ("executorch", "host")):
        result, wall = _export(spec, device, fmt, "fp32", work / f"{name}-{fmt}-{device}", shapes, calib)
        rep = result.report.to_dict()
        row = {"format": fmt, "device": device, "export_s": round(wall, 1), "parity": _parity(rep["parity"]),
               "latency": _latency(rep["latency"]), "bytes": rep["artifacts"][0]["bytes"]}
        if fmt == "executorch":
            cov = rep["coverage"]
            row["not_delegated"] = {op: {"count": n, "where": cov["where"].get(op)}
                                    for op, n in sorted(cov["fallback"].items(), key=lambda kv: -kv[1])}
            row["delegated"] = sum(cov["supported"].values())
            row["per_op"] = (rep.get("host_latency") or rep["latency"]).get("per_op", [])[:6]
        rows.append(row)
        if device != "host" or fmt == "onnx":
            timed.append((fmt, Artifact(fmt, result.artifacts[0], specs, [])))
    times = interleaved(timed, specs, args)
    for row in rows:
        if row["device"] != "host" or row["format"] == "onnx":
            row["host_ms"] = times[row["format"]]
    et, lite = times["executorch"], times["tflite"]
    return {"model": spec, "shape": shapes[0] if shapes else "1x3x224x224", "rows": rows,
            "executorch_over_litert": round(et / lite, 3), "executorch_over_onnx": round(et / times["onnx"], 3)}


def _inputs(spec, shapes):
    from slimx.export import load_model

    return load_model(spec, input_shapes=shapes).inputs


def interleaved(timed, specs, args) -> dict:
    """Median over rounds of each artifact's median of ``--runs`` calls, the artifacts in a shuffled order each
    round (load bursts on this shared machine fall on all of them alike)."""
    from slimx._core.inputs import sample_inputs
    from slimx.targets import get_target, timed_calls

    inputs = sample_inputs(specs, seed=11)
    runners = {}
    for key, artifact in timed:
        runner = get_target(artifact.format).runner(threads=args.threads)
        artifact.inputs = specs
        session = runner.session(artifact.path)
        runners[key] = (runner, artifact, session)
        runner.run(artifact, inputs, session=session)
    per_round: dict[str, list] = {k: [] for k in runners}
    order = list(runners)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for key in order:
            runner, artifact, session = runners[key]
            samples = timed_calls(lambda r=runner, a=artifact, s=session: r.run(a, inputs, session=s), 2, args.runs)
            per_round[key].append(statistics.median(samples))
    return {k: round(statistics.median(v), 4) for k, v in per_round.items()}


def int8_rows(work, fit, held, args) -> list[dict]:
    import torch

    from slimx.export import load_model
    from slimx.targets import Artifact, get_target

    loaded = load_model("minilm", input_shapes=["1x64"])
    tok = loaded.tokenizer
    encoded = []
    for line in held:
        enc = tok(line, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        encoded.append((enc["input_ids"], enc["attention_mask"]))
    with torch.no_grad():
        reference = np.concatenate([loaded.module(*b).numpy() for b in encoded])
    rows, timed = [], []
    for fmt, device in FORMATS:
        for precision in ("fp32", "int8", "int8-weights"):
            result, wall = _export("minilm", device, fmt, precision, work / f"minilm-q-{fmt}-{precision}", ["1x64"],
                                   fit)
            rep = result.report.to_dict()
            path = result.artifacts[0]
            artifact = Artifact(fmt, path, loaded.inputs, [])
            runner = get_target(fmt).runner(threads=args.threads)
            session = runner.session(path)
            got = np.concatenate([runner.run(artifact, b, session=session)[0] for b in encoded])
            cos = np.sum(got * reference, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
            rows.append({"format": fmt, "precision": precision, "export_s": round(wall, 1),
                         "method": (rep["compile"].get("quantization") or {}).get("method", "none"),
                         "heldout_cosine_mean": round(float(cos.mean()), 5),
                         "heldout_cosine_min": round(float(cos.min()), 5),
                         "nn_agreement": round(_nn(got, reference), 4), "parity": _parity(rep["parity"])})
            timed.append((f"{fmt}/{precision}", artifact))
    times = interleaved(timed, loaded.inputs, args)
    for row in rows:
        key = f"{row['format']}/{row['precision']}"
        row["host_ms"] = times[key]
        row["speed_vs_own_fp32"] = round(times[f"{row['format']}/fp32"] / times[key], 3)
        row["speed_vs_onnx_int8_weights"] = round(times["onnx/int8-weights"] / times[key], 3)
    return rows


def _nn(got, ref) -> float:
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = unit(got) @ unit(got).T, unit(ref) @ unit(ref).T
    np.fill_diagonal(a, -2)
    np.fill_diagonal(b, -2)
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def _parity(p: dict) -> dict:
    if not p.get("measured"):
        return {"measured": False, "reason": p.get("reason")}
    out = {"cosine": round(p["cosine"], 6), "passed": p["passed"], "runtime": p["runtime"]}
    if p.get("calibration", {}).get("measured"):
        out["calibration_cosine"] = round(p["calibration"]["cosine"], 6)
    return out


def _latency(lat: dict) -> dict:
    if lat.get("kind") == "estimated":
        return {"kind": "estimated", "ms": round(lat["total_ms"], 3) if "total_ms" in lat else None,
                "interval_ms": lat.get("interval_ms"), "transfer": lat.get("transfer")}
    return {"kind": lat.get("kind", "none"), "median_ms": lat.get("median_ms")}


def _versions() -> dict:
    from importlib import metadata

    return {d: metadata.version(d) for d in ("executorch", "onnxruntime", "ai-edge-litert", "torch")}


def render(result: dict) -> str:
    meta = result["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = ["# ExecuTorch beside ONNX and TFLite (this host)", "",
             f"{meta['when']}, {meta['cpu']}, {meta['threads']} threads; {versions}. "
             f"Host latency: median over {meta['rounds']} interleaved rounds of each artifact's median of "
             f"{meta['runs']} calls (`python bench/executorch_target.py`).", "",
             "## fp32: parity, host latency, Pixel 7 estimate", "",
             "| model | format (for) | parity cosine | host ms | Pixel 7 estimate | artifact MB | export s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in result["models"]:
        for r in m["rows"]:
            est = r["latency"]
            est_text = (f"{est['ms']:.2f} ms (80% {est['interval_ms'][0]:.2f}-{est['interval_ms'][1]:.2f})"
                        if est["kind"] == "estimated" and est.get("interval_ms") else
                        f"{est['ms']:.2f} ms" if est["kind"] == "estimated" else "measured here")
            par = r["parity"]
            lines.append(f"| {m['model'].split(':')[-1]} {m['shape']} | {r['format']} ({r['device']}) | "
                         f"{par.get('cosine', 'n/a')} | {r.get('host_ms', '(same .pte)')} | {est_text} | "
                         f"{r['bytes'] / 1e6:.1f} | {r['export_s']} |")
    lines += ["", "ExecuTorch / LiteRT host median (the transfer the pixel profiles' executorch estimate assumes is "
              "1.0): " + ", ".join(f"{m['model'].split(':')[-1]} {m['executorch_over_litert']}x" for m in
                                   result["models"]) + "; ExecuTorch / onnxruntime: " + ", ".join(
                  f"{m['model'].split(':')[-1]} {m['executorch_over_onnx']}x" for m in result["models"]) + ".", "",
              "## What XNNPACK did not take (ExecuTorch portable kernels), per model", ""]
    for m in result["models"]:
        row = next(r for r in m["rows"] if r["format"] == "executorch")
        left = ", ".join(f"{op.split('.')[1] if op.startswith('aten.') else op} x{v['count']} ({v['where']})"
                         for op, v in list(row["not_delegated"].items())[:8]) or "none"
        top = ", ".join(f"{e['op']} {e['share']:.0%}" for e in row["per_op"] if "share" in e)
        lines += [f"- **{m['model']}**: {row['delegated']} ops delegated; not delegated: {left}. Host time by op "
                  f"(ETDump): {top}."]
    lines += ["", "## int8 MiniLM on real sentences (static 1x64)", "",
              f"Calibrated on {meta['fit']} standard-library sentences, judged on {meta['eval']} others.", "",
              "| format | precision | held-out cosine mean / min | NN agreement | host ms | speed vs own fp32 | "
              "speed vs ONNX int8-weights | method |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["int8"]:
        lines.append(f"| {r['format']} | {r['precision']} | {r['heldout_cosine_mean']:.4f} / "
                     f"{r['heldout_cosine_min']:.4f} | {r['nn_agreement']:.3f} | {r['host_ms']:.3f} | "
                     f"{r['speed_vs_own_fp32']:.2f}x | {r['speed_vs_onnx_int8_weights']:.2f}x | {r['method']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
