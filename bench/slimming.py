"""Latency-driven slimming to a budget: a DeiT-Tiny-sized ViT trained on scikit-learn's digits slimmed on the host
to 60% of its measured latency, EfficientFormer-L3 slimmed for the iPhone 12 to 2.0 ms, and MiniLM to a host
budget exported to ONNX and TFLite.

    python bench/slimming.py [--epochs 50] [--skip-minilm] [--only efficientformer|digits|minilm ...]

1. Digits: a ViT of DeiT-Tiny width (192, 3 heads, 12 blocks; 8x8 digits in 2x2 patches) trained here on 1100
   digits; the pass is calibrated on what a user has, the labelled training digits plus 300 others (the last
   quarter, the pass's validation split, is mostly those); 397 are held out. The host's latency model is fitted on
   this machine first (``slimx profile --calibrate``'s microbenchmarks). The budget is 60% of the model's
   latency on this host, measured in onnxruntime; the pass slims it on the host's latency model (once with loss
   importance, once with first-order Taylor importance), recovery by distillation after. Before and after: the
   measured latency (interleaved rounds), the estimate and its interval, held-out accuracy.
2. EfficientFormer-L3 (random weights, synthetic calibration inputs) for iphone12 at 2.0 ms: the estimate before
   and after, with its interval, and the trajectory.
3. MiniLM (real weights, stdlib sentences) to 70% of its measured host latency at real lengths (onnxruntime),
   exported as ONNX and as TFLite, with parity and latency in their runtimes.

Writes ``bench/results/slimming.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, write_results
from attention import interleaved, ort_session, speed

FAST = ["--runs", "30", "-q"]


def deit_digits():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10, embed_dim=192, depth=12, num_heads=3)
    model.example_inputs = lambda: (torch.zeros(1, 1, 8, 8),)
    return model.eval()


def train(model, x, y, epochs: int):
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=epochs * -(-len(x) // 64),
                                                pct_start=0.15)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def one_at_a_time(paths: dict, feeds: list[dict], rounds: int, block: int, warmup: int = 200) -> dict:
    """``attention.interleaved`` (shuffled order each round, ratios within a round), timed as slimx's
    runner runs, onnxruntime's spinning on (what the host's latency model is fitted to; with it off, each of this
    small model's ~250 nodes waits for a sleeping worker: 5.4 ms against 2.5 ms), with only the timed session
    alive: the spinning workers of idle sessions took CPU from the timed one (4.3 ms against 2.5 ms with three
    open). A session is opened for its block, warmed up with ``warmup`` runs (a new one takes a few hundred runs to
    its steady pace), timed, and closed."""
    return interleaved(paths, feeds, rounds, block, warmup, lambda path: ort_session(path, spinning=True))


def run_digits(args, work: Path) -> dict:
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from slimx.cli import main as slimx
    from slimx.devices import load_device
    from slimx.devices.estimator import EstimatorLatencyModel, default_setting
    from slimx.profiling import calibrate_host

    # the host's latency model fitted on this machine (the committed one is another CPU's): what the pass and the
    # interval it states rest on
    calibrate_host(default_setting(load_device("host"), "fp32"))
    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    tr, cal, te = order[:1100], order[1100:1400], order[1400:]
    started = time.time()
    model = train(deit_digits(), x[tr], y[tr], args.epochs)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[te])).argmax(1).numpy() == y[te]).mean())
    print(f"digits DeiT-Tiny: {acc:.4f} after {time.time() - started:.0f} s", file=sys.stderr)
    save_file(model.state_dict(), str(work / "w.safetensors"))
    given = np.concatenate([tr, cal])  # what a user has: the labelled training digits, and 300 others last (the
    np.savez(work / "cal.npz", x=x[given])  # pass's validation split is the last quarter of the calibration data)
    (work / "cal.txt").write_text(" ".join(map(str, y[given])))
    base = work / "base"
    common = ["slimming:deit_digits", "--weights", str(work / "w.safetensors"), "--calib", str(work / "cal.npz"),
              "--labels", str(work / "cal.txt")]
    assert slimx(["export", *common, "--out", str(base), *FAST]) == 0
    paths = {"original": base / "model.onnx"}
    feeds = [{"x": x[i:i + 1]} for i in te[:200]]
    measured = speed(one_at_a_time(paths, feeds, rounds=10, block=20), "original")["original"]["ms"]
    budget = round(0.6 * measured, 4)
    lm = EstimatorLatencyModel.for_device(load_device("host"), "fp32")
    est_before = lm.latency(model, (torch.from_numpy(x[:1]),))
    rows = {"original": {"accuracy": acc, "estimate_ms": est_before["ms"], "interval_ms": est_before.get(
        "interval_ms")}}
    for importance in ("loss", "taylor"):
        out = work / f"slim-{importance}"
        code = slimx(["export", *common, "--budget-ms", str(budget), "--pass",
                      f"latency-slim:importance={importance},min_fidelity=0.5", "--recover",
                      "steps=1500,loss=kl,lr=3e-4,batch_size=32,patience=20", "--max-accuracy-drop", "100",
                      "--out", str(out), *FAST])
        if code != 0:
            rows[f"slimmed ({importance})"] = {"error": f"export exited {code}"}
            continue
        report = json.loads((out / "report.json").read_text())
        entry = report["passes"][0]
        paths[f"slimmed ({importance})"] = out / "model.onnx"
        session = ort_session(out / "model.onnx")
        pred = np.array([session.run(None, {"x": x[i:i + 1]})[0].argmax() for i in te])
        del session
        rows[f"slimmed ({importance})"] = {"accuracy": float((pred == y[te]).mean()),
                                           "estimate_ms": entry["summary"]["latency_after_ms"],
                                           "interval_ms": entry["summary"]["interval_after_ms"],
                                           "steps": len(entry["steps"]), "params": report["model"]["params"],
                                           "trajectory": entry["trajectory"], "architecture": entry["architecture"]}
    timed = speed(one_at_a_time(paths, feeds, rounds=args.rounds, block=20), "original")
    for name, t in timed.items():
        rows[name].update({"measured_ms": t["ms"], "speed": t["speed"]})
    return {"trained_accuracy": acc, "measured_before_ms": measured, "budget_ms": budget, "rows": rows}


def run_efficientformer(work: Path) -> dict:
    from slimx.cli import main as slimx

    out = work / "ef-l3"
    code = slimx(["export", "timm:efficientformer_l3", "--target", "iphone12", "--budget-ms", "2.0", "--out",
                  str(out), *FAST])
    if code != 0:
        return {"error": f"export exited {code}"}
    report = json.loads((out / "report.json").read_text())
    entry = report["passes"][0]
    lat = report["latency"]
    return {"summary": entry["summary"], "trajectory": entry["trajectory"], "architecture": entry["architecture"],
            "estimate_ms": lat.get("total_ms"), "interval_ms": lat.get("interval_ms"), "label": lat.get("label")}


def run_minilm(args, work: Path) -> dict:
    """MiniLM to 70% of its measured host latency on real sentences (onnxruntime, the host's default runtime),
    exported as ONNX and as TFLite: the pass prices candidates on the host's latency model whatever the format, so
    both runs slim to the same budget on the same latency model (the searches are separate, and their recoveries
    draw batches differently, so the architectures can differ a little); each export proves parity in its own
    runtime and is measured there."""
    from slimx.cli import main as slimx
    from slimx.export.textdata import stdlib_sentences

    (work / "calib.txt").write_text("\n".join(stdlib_sentences(512, 0)) + "\n")
    out = {}
    budget = None
    for fmt in ("onnx", "tflite"):
        started = time.time()
        base = work / f"minilm-base-{fmt}"
        common = ["minilm", "--target", "host", "--format", fmt, "--calib", str(work / "calib.txt"),
                  "--calib-samples", "512", *FAST]
        if slimx(["export", *common, "--out", str(base)]) != 0:
            out[fmt] = {"error": "the baseline export failed"}
            continue
        before = json.loads((base / "report.json").read_text())["latency"]["over_lengths"]["on_data"]["median_ms"]
        budget = budget or round(0.7 * before, 4)
        path = work / f"minilm-{fmt}"
        code = slimx(["export", *common, "--budget-ms", str(budget), "--pass", "latency-slim:min_fidelity=0.8",
                      "--recover", "steps=200,loss=cosine", "--min-fidelity", "0.8", "--out", str(path)])
        if code != 0:
            out[fmt] = {"error": f"export exited {code}", "budget_ms": budget, "measured_before_ms": before}
            continue
        rep = json.loads((path / "report.json").read_text())
        entry = rep["passes"][0]
        out[fmt] = {"measured_before_ms": before, "budget_ms": budget,
                    "measured_after_ms": rep["latency"]["over_lengths"]["on_data"]["median_ms"],
                    "summary": entry["summary"], "trajectory": entry["trajectory"],
                    "parity": {k: rep["parity"].get(k) for k in ("measured", "passed", "cosine", "runtime")},
                    "fidelity": rep["compression"]["gate"], "architecture": entry["architecture"],
                    "seconds": round(time.time() - started, 1)}
    return out


def render(result: dict) -> str:
    lines = ["# Latency-driven slimming to a budget", "", f"{result['machine']}, 2 threads.", ""]
    runs = result.get("runs") or {}
    if len({r["date"] for r in runs.values()}) > 1:
        lines += ["Parts run separately (`--only`), each in one run: " + "; ".join(f"{n} {r['date']}"
                                                                                for n, r in runs.items()), ""]
    d = result.get("digits")
    if d:
        lines += [f"## DeiT-Tiny-sized ViT on scikit-learn's digits (trained here to {d['trained_accuracy']:.4f})", "",
                  f"Measured on this host before: {d['measured_before_ms']:.3f} ms; budget 60%: "
                  f"{d['budget_ms']:.3f} ms (the pass works on the host's latency model).", "",
                  "| model | accuracy | measured ms | speed | estimated ms (80% interval) | steps |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in d["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | | | |")
                continue
            iv = r.get("interval_ms") or [None, None]
            interval = f" ({iv[0]:.3f}-{iv[1]:.3f})" if iv[0] is not None else ""
            lines.append(f"| {name} | {r['accuracy']:.4f} | {r.get('measured_ms', float('nan')):.3f} | "
                         f"{r.get('speed', float('nan')):.2f}x | {r['estimate_ms']:.3f}{interval} | "
                         f"{r.get('steps', '-')} |")
        base = d["rows"]["original"]["accuracy"]
        ok = [(n, r) for n, r in d["rows"].items() if n != "original" and "error" not in r]
        lines.append("")
        for name, r in ok:
            iv = r.get("interval_ms") or [0, 0]
            within = iv[0] <= r.get("measured_ms", -1) <= iv[1]
            under = "yes" if r.get("measured_ms", 1e9) <= d["budget_ms"] * 1.05 else "no"
            lines.append(f"- {name}: accuracy {'within' if base - r['accuracy'] <= 0.01 else 'NOT within'} 1 point "
                         f"({(base - r['accuracy']) * 100:+.2f}); measured {r.get('measured_ms', 0):.3f} ms "
                         f"{'inside' if within else 'OUTSIDE'} the stated interval {iv[0]:.3f}-{iv[1]:.3f} ms; "
                         f"at or under the budget: {under}")
    e = result.get("efficientformer")
    if e:
        lines += ["", "## EfficientFormer-L3 for iphone12 at 2.0 ms", ""]
        if "error" in e:
            lines.append(e["error"])
        else:
            s = e["summary"]
            lines += [f"Estimated {s['latency_before_ms']:.3f} ms before, {s['latency_after_ms']:.3f} ms after "
                      f"({s['steps']} steps, {s['params_before'] / 1e6:.1f} M -> {s['params_after'] / 1e6:.1f} M "
                      f"params); the export's estimate: {e['estimate_ms']:.3f} ms, 80% interval "
                      f"{e['interval_ms'][0]:.3f}-{e['interval_ms'][1]:.3f} ms: within the budget: "
                      f"{'met' if s['within_budget'] else 'MISSED'}.", "",
                      "| step | action | estimated ms | interval |", "| --- | --- | --- | --- |"]
            for t in e["trajectory"]:
                iv = t.get("interval_ms") or [None, None]
                lines.append(f"| {t['step']} | {t['action'] or '-'} | {t['latency_ms']:.3f} | "
                             + (f"{iv[0]:.3f}-{iv[1]:.3f} |" if iv[0] is not None else "- |"))
    m = result.get("minilm")
    if m:
        lines += ["", "## MiniLM (real weights) to 70% of its measured host latency on real sentences", "",
                  "The budget is 70% of the ONNX baseline's median over the calibration sentences' lengths, measured "
                  "in onnxruntime; the pass prices candidates on the host's latency model (onnxruntime) at the median "
                  "length, for both formats, so the TFLite run slims to the same budget; each export is proved and "
                  "measured in its own runtime (LiteRT pads a sentence to its bucket, 16/32/64/...).", "",
                  "| format | measured before | budget | estimated after | measured after | parity | fidelity | "
                  "steps | time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for fmt in ("onnx", "tflite"):
            r = m.get(fmt, {})
            if "error" in r:
                lines.append(f"| {fmt} | {r.get('measured_before_ms', float('nan')):.3f} ms | "
                             f"{r.get('budget_ms', float('nan')):.3f} ms | {r['error']} | | | | | |")
                continue
            p, s = r["parity"], r["summary"]
            lines.append(f"| {fmt} | {r['measured_before_ms']:.3f} ms | {r['budget_ms']:.3f} ms | "
                         f"{s['latency_after_ms']:.3f} ms ({'within' if s['within_budget'] else 'OVER'}) | "
                         f"{r['measured_after_ms']:.3f} ms | {'PASS' if p['passed'] else 'FAIL'} cosine "
                         f"{p['cosine']:.6f} ({p['runtime']}) | {r['fidelity']['value']:.4f} | {s['steps']} | "
                         f"{r['seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--only", action="append", choices=["efficientformer", "digits", "minilm"],
                        help="run only this part (repeatable); the other parts' results of the last run are kept")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slimx-bench-slimming-"))
    result = {"machine": platform.processor() or platform.machine(), "runs": {}}
    if args.only and (RESULTS / "slimming.json").exists():
        last = json.loads((RESULTS / "slimming.json").read_text())
        result = {**last, "machine": result["machine"], "runs": last.get("runs") or {}}
    parts = [("efficientformer", lambda: run_efficientformer(work)), ("digits", lambda: run_digits(args, work)),
             ("minilm", lambda: run_minilm(args, work))]
    wanted = set(args.only or ["efficientformer", "digits"] + ([] if args.skip_minilm else ["minilm"]))
    try:
        for name, part in parts:
            if name not in wanted:
                continue
            result[name] = part()
            result["runs"][name] = {"machine": platform.processor() or platform.machine(),
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            write_results("slimming", result, render(result))  # after each part: a long run keeps what it did
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
