"""fisher-prune on MiniLM (real weights) with and without layer-wise reconstruction, on real English text.

    python bench/pruning_minilm.py [--fit 512] [--heldout 128] [--keep 0.75,0.65,0.6] [--recover-steps 0]

Fit text: standard-library docstring sentences 0..fit (the passes' calibration; the pipeline holds a quarter of it
out for its own fidelity gate); evaluation: a disjoint slice from sentence 2000, exported artifact against the
original in onnxruntime (``slimx.evaluate``: mean cosine and nearest-neighbour agreement). Speed: the compressed
export against the uncompressed one compiled the same way, interleaved in one run, on the fit text's real
lengths and at the 128-token export shape (the report's ``compression.speedup``). Writes a Markdown table and
the JSON behind it to bench/results/pruning_minilm.*.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=128)
    ap.add_argument("--keep", default="0.75,0.65,0.6")
    ap.add_argument("--recover-steps", type=int, default=0, help="also a row with distillation after the best keep")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import slimx
    from slimx.export.textdata import stdlib_sentences

    work = Path(tempfile.mkdtemp())
    fit, held = work / "fit.txt", work / "heldout.txt"
    fit.write_text("\n".join(stdlib_sentences(args.fit, 0)) + "\n")
    held.write_text("\n".join(stdlib_sentences(args.heldout, 2000)) + "\n")
    rows = []
    runs = [(float(k), rec, None) for k in args.keep.split(",") for rec in (True, False)]
    if args.recover_steps:
        recover = f"steps={args.recover_steps},loss=cosine,lr=1e-4,patience=20"
        runs.append((float(args.keep.split(",")[-1]), True, recover))
    for keep, reconstruct, recover in runs:
        started = time.time()
        out = work / f"keep{keep}-{reconstruct}-{bool(recover)}"
        result = slimx.export("minilm", "host", passes=[f"fisher-prune:keep={keep}"], calib=str(fit), out=out,
                              min_fidelity=0.01, reconstruct=reconstruct, recover=recover,
                              timing={"runs": 30, "warmup": 3})
        seconds = time.time() - started
        report = result.report.to_dict()
        speed = report["compression"]["speedup"]
        pass_entry = report["passes"][0]
        held_out = slimx.evaluate(out, held, against="minilm", samples=args.heldout)
        rows.append({"keep": keep, "reconstruct": reconstruct, "recover": recover,
                     "macs_kept": pass_entry["summary"]["macs_kept"], "heads": pass_entry["summary"]["heads_after"],
                     "ffn_neurons": pass_entry["summary"]["ffn_neurons_after"],
                     "refit": (pass_entry.get("reconstruction") or {}).get("summary"),
                     "speedup_on_data": speed["ratio"], "speedup_at_128": speed["at_export_shape"]["ratio"],
                     "heldout_cosine": held_out.cosine, "heldout_nn_agreement": held_out.nn_agreement,
                     "compression_s": round(seconds, 1)})
        print(rows[-1], flush=True)
    lines = ["# fisher-prune on MiniLM, with and without layer-wise reconstruction", "",
             f"{args.fit} fit sentences, {args.heldout} held-out (disjoint, from sentence 2000); host onnxruntime "
             f"fp32, {platform.processor() or platform.machine()}; speed vs the uncompressed export in the same run.",
             "", "| keep (MACs) | reconstruct | recover | heads | FFN neurons | speed on data | speed at 128 | "
             "held-out cosine | NN agreement | seconds |", "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['keep']} ({r['macs_kept']}) | {'yes' if r['reconstruct'] else 'no'} "
                     f"| {r['recover'] or '-'} | {r['heads']} | {r['ffn_neurons']} | {r['speedup_on_data']}x "
                     f"| {r['speedup_at_128']}x | "
                     f"{r['heldout_cosine']:.4f} | {r['heldout_nn_agreement']} | {r['compression_s']} |")
    write_results("pruning_minilm", {"rows": rows, "fit": args.fit, "heldout": args.heldout}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
