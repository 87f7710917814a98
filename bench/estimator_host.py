"""Proof of the latency estimator on this machine.

1. Time the microbenchmark suite with onnxruntime (``slimx devices microbench``) and calibrate the ``host``
   profile from it alone.
2. Estimate whole models the fit never saw, from their exported graphs, and measure them in onnxruntime.
3. Write the table (model, measured, estimated, error) and the rank-order check.

    python bench/estimator_host.py            # about 4 minutes on 2 cores
    python bench/estimator_host.py --render bench/results/estimator_host.json

Goal (issue 4): at least 80% of models within ±15%, rank order preserved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
MODELS = ("timm:deit_tiny_patch16_224", "timm:efficientformer_l1", "timm:poolformer_s12", "timm:mobilenetv2_100",
          "timm:resnet50", "timm:levit_128s", "timm:convnext_atto", "minilm")


def run(args) -> dict:
    """Prepare the microbenchmarks and the models once, then time them in interleaved rounds."""
    import numpy as np

    from slimx._core.inputs import sample_inputs
    from slimx.devices import load_device
    from slimx.devices.calibrate import calibrate, model_op_mix
    from slimx.devices.estimator import default_setting, estimate_latency
    from slimx.devices.host import cpu_model
    from slimx.devices.microbench import (
        Prepared,
        microbench_row,
        prepare_cases,
        suite,
        time_round,
        write_csv,
    )
    from slimx.devices.registry import reload_profiles
    from slimx.devices.runners import compile_for, get_runner, runner_info
    from slimx.export.program import prepare_program

    start = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runner = get_runner("onnxruntime", threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="slimx-bench-") as tmp:
        print("prepare microbenchmarks ...", file=sys.stderr)
        cases = prepare_cases("onnxruntime", suite(), Path(tmp) / "cases")
        models = []
        for i, spec in enumerate(args.models):
            print(f"prepare {spec} ...", file=sys.stderr)
            _, program, _ = prepare_program(spec)
            costs = model_op_mix(spec, program=program)
            models.append(Prepared(spec, "model", compile_for(program, "onnx", Path(tmp) / f"model{i}"),
                                   sample_inputs(program.inputs, seed=7), sum(c.flops for c in costs) / 1e9,
                                   sum(c.bytes for c in costs) / 1e6, []))
        timing = None
        for r in range(args.rounds):
            timing = time_round(runner, cases, warmup=10, runs=args.runs)[-1]
            time_round(runner, models, warmup=5, runs=args.runs)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    csv_path = RESULTS / "host_microbench.csv"
    info = runner_info("onnxruntime")
    write_csv(csv_path, [microbench_row(c, info, "onnxruntime", timing, 10, args.runs, cpu_model()) for c in cases])
    print(f"calibrate host from {len(cases)} microbenchmarks ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="slimx-profiles-") as profiles:
        os.environ["SLIMX_DEVICES_DIR"] = profiles  # the fit goes to a scratch copy, not the user's profile
        reload_profiles()
        fit = calibrate("host", csv_path)
        device = load_device("host")
        setting = default_setting(device)
        table = []
        for m in models:
            measured = float(np.median(m.medians))
            est = estimate_latency(model_op_mix(m.name), device, setting)
            table.append({"model": m.name, "measured_ms": round(measured, 3), "estimated_ms": round(est["total_ms"], 3),
                          "error_pct": round((est["total_ms"] / measured - 1) * 100, 1), "gflops": est["gflops"],
                          "rounds_ms": [round(x, 3) for x in m.medians],
                          "top_classes": [(e["op"], e["ms"]) for e in est["per_op"][:3]]})
    reload_profiles()
    fit_info = fit["fits"][setting.key]
    within = sum(abs(r["error_pct"]) <= 15 for r in table) / len(table)
    meas_order = [r["model"] for r in sorted(table, key=lambda r: r["measured_ms"])]
    est_order = [r["model"] for r in sorted(table, key=lambda r: r["estimated_ms"])]
    return {"device": device.display_name, "cpu": cpu_model(),
            "peak_gflops_fp32": device.peak("cpu", "fp32"), "mem_bandwidth_gbs": device.memory.get("mem_bandwidth_gbs"),
            "threads": args.threads, "runs": args.runs, "rounds": args.rounds,
            "microbench_cases": len(cases), "fit": {"params": fit_info["params"], "cv": {
                k: v for k, v in fit_info["cv"].items() if k != "errors_pct"}},
            "table": table, "within_15pct": round(within, 3), "rank_order_preserved": meas_order == est_order,
            "measured_order": meas_order, "estimated_order": est_order,
            "spearman": _spearman([r["measured_ms"] for r in table], [r["estimated_ms"] for r in table]),
            "seconds": round(time.time() - start, 1)}


def _spearman(a, b) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return round(float(np.corrcoef(ra, rb)[0, 1]), 4)


def render(result: dict) -> str:
    lines = ["# Latency estimator on this host (onnxruntime CPU), calibrated only from microbenchmarks", "",
             f"Fit: {result['microbench_cases']} microbenchmark cases, {result['fit']['cv']['method']} error on "
             f"those cases {result['fit']['cv']['mape_pct']}% (within ±15%: "
             f"{result['fit']['cv']['within_15pct'] * 100:.0f}%). Host figures: sgemm {result['peak_gflops_fp32']} "
             f"GFLOP/s, copy {result['mem_bandwidth_gbs']} GB/s; {result['threads']} threads; measured = median of "
             f"{result['rounds']} interleaved rounds x {result['runs']} runs.", "",
             "| model | GFLOPs | measured ms | estimated ms | error |", "| --- | --- | --- | --- | --- |"]
    for r in result["table"]:
        lines.append(f"| {r['model']} | {r['gflops']:.2f} | {r['measured_ms']:.2f} | {r['estimated_ms']:.2f} | "
                     f"{r['error_pct']:+.1f}% |")
    lines += ["", f"Within ±15%: {result['within_15pct'] * 100:.0f}% of models (goal 80%). Rank order preserved: "
              f"{'yes' if result['rank_order_preserved'] else 'no'} (Spearman {result['spearman']}).",
              f"Measured order: {', '.join(result['measured_order'])}.",
              f"Estimated order: {', '.join(result['estimated_order'])}.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--render", default=None, help="only re-render a saved JSON result")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    import warnings

    warnings.filterwarnings("ignore")
    from _results import write_results

    result = run(args)
    write_results("estimator_host", result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
