"""fisher-prune and AxFormer, each with the linear refit and distillation, on a ViT trained here on
scikit-learn's digits: accuracy on digits neither training nor the passes saw, speed of the ONNX exports in one
interleaved run.

    python bench/pruning_digits.py [--epochs 50] [--keep 0.4,0.3] [--axformer 0.1,0.2] [--rounds 20]
    python bench/pruning_digits.py --epochs 150 --keep '' --axformer 0.8 --folds 5 \
        --recover layerwise=600,steps=3000,loss=kl,lr=5e-4,batch_size=32,patience=40,mixup=0.4   # issue 28's

The ViT (8x8 digits, 2x2 patches, 6 blocks, width 96) is ``bench/attention.py``'s, trained on 1100 digits; the
passes' calibration is those and 300 labelled digits never trained on; accuracy is measured on the 397 left.
One point of accuracy there is four digits, about the noise between runs; ``--folds 5`` repeats the whole bench
on five disjoint test folds (each of the 1797 digits tested once, by a ViT trained without it) and pools them.
Writes bench/results/pruning_digits.* (``--out-name``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results
from attention import export_digits, interleaved, speed, train_digits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--keep", default="0.4,0.3")
    ap.add_argument("--axformer", default="0.1,0.2",
                    help="AxFormer tolerances (whole attention / FFN branches removed: op-removing cuts); '' for none")
    ap.add_argument("--axformer-options", default="",
                    help="more AxFormer options, e.g. 'units=false' (whole branches only) or 'recover_steps=200'")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--recover", default="layerwise=600,steps=600,loss=kl,lr=5e-4,batch_size=32,patience=10",
                    help="the recovery after each pass (slimx export --recover)")
    ap.add_argument("--folds", type=int, default=1,
                    help="K > 1: K disjoint test folds of all 1797 digits, a ViT trained per fold, accuracy pooled")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="the shuffle of the digits before the split (0: the order every digits bench has used)")
    ap.add_argument("--out-name", default="pruning_digits", help="bench/results/NAME.{md,json}")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    settings = [("original", [])]
    recover = ["--recover", args.recover]
    how = "layer-wise + distillation" if "layerwise=" in args.recover else "distillation"
    for keep in filter(None, args.keep.split(",")):
        settings.append((f"fisher-prune keep {keep}, refit + {how}",
                         ["--pass", f"fisher-prune:keep={keep}", *recover]))
    for tol in filter(None, args.axformer.split(",")):
        extra = f",{args.axformer_options}" if args.axformer_options else ""
        settings.append((f"AxFormer tolerance {tol}{extra.replace(',', ', ')}, refit + {how}",
                         ["--pass", f"axformer:tolerance={tol}{extra}", *recover]))
    folds = [run_fold(args, settings, fold) for fold in range(args.folds)]
    rows = folds[0]["rows"] if args.folds == 1 else pooled(folds)
    accuracy = folds[0]["trained_accuracy"] if args.folds == 1 else rows["original"]["accuracy"]
    tested = sum(len(f["test"]) for f in folds)
    split = ("" if args.folds == 1 else
             f" over {args.folds} folds: each digit tested once, by a ViT trained on 1100 of the others")
    lines = [f"# fisher-prune and AxFormer on the digits ViT (trained here to {accuracy:.4f}; "
             f"{tested} test digits{split})", "",
             "Calibration: the 1100 training digits and the labelled others never trained on (300; 337 per fold "
             "with 5 folds); fisher-prune ranks heads and FFN neurons by the Fisher information of the task loss; "
             "AxFormer removes whole attention / FFN branches (ops, not only MACs) by the paper's acceptance rule "
             "relaxed by its tolerance; each then the linear refit and "
             f"`--recover {args.recover}` (block-wise distillation, then KL distillation of the logits from the "
             "original). ONNX exports timed in one interleaved run, "
             f"{args.rounds} rounds of 20 digits, batch 1"
             + ("." if args.folds == 1 else " (per fold; the speed is the folds' geometric mean, their lowest "
                "beside it; params their mean; accuracy pooled over all test digits, points lost per fold in "
                "brackets)."),
             "",
             f"| setting | params | cut{'' if args.folds == 1 else ' (first fold)'} | ms / image | speed | accuracy | "
             "points lost | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = rows["original"]["accuracy"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | |")
            continue
        kept = _cut(r["summary"] or {})
        speed_text = f"{r['speed']:.2f}x" + (f" (lowest {r['speed_min']:.2f}x)" if "speed_min" in r else "")
        lost = f"{100 * (base - r['accuracy']):+.2f}" + (
            " (" + ", ".join(f"{v:+.2f}" for v in r["fold_points_lost"]) + ")" if "fold_points_lost" in r else "")
        lines.append(f"| {name} | {r['params'] / 1e6:.3f} M | {kept} | {r['ms']:.3f} | {speed_text} | "
                     f"{r['accuracy']:.4f} | {lost} | {r.get('seconds', 0)} |")
    met = [n for n, r in rows.items() if n != "original" and "error" not in r and r["speed"] >= 2.0
           and base - r["accuracy"] <= 0.01]
    lines += ["", "Target (issue 28): at least 2x at no more than 1 point of accuracy lost: "
              + (f"met by {met[0]}" if met else "missed")]
    epochs = f" --epochs {args.epochs}" if args.epochs != ap.get_default("epochs") else ""
    lines += ["", f"Command: `python bench/pruning_digits.py{epochs} --keep '{args.keep}' --axformer '{args.axformer}' "
              f"--recover '{args.recover}'"
              + (f" --axformer-options '{args.axformer_options}'" if args.axformer_options else "")
              + (f" --folds {args.folds}" if args.folds > 1 else "")
              + (f" --split-seed {args.split_seed}" if args.split_seed else "") + "`"]
    result = ({"trained_accuracy": accuracy, "rows": rows} if args.folds == 1 else
              {"pooled_accuracy": accuracy, "rows": rows,
               "folds": [{k: v for k, v in f.items() if k != "test"} for f in folds]})
    write_results(args.out_name, result, "\n".join(lines) + "\n")


def run_fold(args, settings: list, fold: int) -> dict:
    """One split: the ViT trained, every setting exported and tested, the exports timed in one interleaved run."""
    work = Path(tempfile.mkdtemp())
    _, x, y, train, calib, test, accuracy = train_digits(args.epochs, work, fold, args.folds, args.split_seed)
    given = np.concatenate([train, calib])
    np.savez(work / "digits.npz", x=x[given])
    (work / "digits-labels.txt").write_text(" ".join(map(str, y[given])))
    rows, sessions = {}, {}
    for name, extra in settings:
        started = time.time()
        rows[name] = export_digits(work, work / f"digits-{len(rows)}", name, extra, x, y, test, sessions)
        rows[name]["seconds"] = round(time.time() - started, 1)
    feeds = [{"x": x[i:i + 1]} for i in test[:200]]
    for name, t in speed(interleaved(sessions, feeds, rounds=args.rounds, block=20), "original").items():
        rows[name].update(t)
    return {"fold": fold, "trained_accuracy": accuracy, "rows": rows, "test": test}


def pooled(folds: list[dict]) -> dict:
    """The folds' rows as one per setting: accuracy pooled over every fold's test digits, points lost per fold,
    speed as the folds' geometric mean (and lowest), params, ms and seconds as means; a setting that failed in any
    fold keeps its first error."""
    out, sizes = {}, [len(f["test"]) for f in folds]
    for name in folds[0]["rows"]:
        rows = [f["rows"][name] for f in folds]
        failed = [r for r in rows if "error" in r]
        if failed:
            out[name] = failed[0]
            continue
        correct = sum(r["accuracy"] * n for r, n in zip(rows, sizes, strict=True))
        out[name] = {"params": float(np.mean([r["params"] for r in rows])), "summary": rows[0]["summary"],
                     "accuracy": correct / sum(sizes), "ms": float(np.mean([r["ms"] for r in rows])),
                     "speed": float(np.exp(np.mean(np.log([r["speed"] for r in rows])))),
                     "speed_min": min(r["speed"] for r in rows),
                     "fold_points_lost": [round(100 * (f["rows"]["original"]["accuracy"] - r["accuracy"]), 2)
                                          for f, r in zip(folds, rows, strict=True)],
                     "seconds": round(float(np.mean([r["seconds"] for r in rows])), 1)}
    return out


def _cut(summary: dict) -> str:
    """What a pass took away, in its own terms: MACs kept (fisher-prune) or branches / units removed (AxFormer)."""
    if "macs_kept" in summary:
        return f"MACs kept {summary['macs_kept']}"
    if "removed_attention" in summary:
        return (f"removed {summary['removed_attention']} attention + {summary['removed_ffn']} FFN branches, "
                f"{summary['removed_heads']} heads, {summary['removed_ffn_groups']} FFN groups")
    return "-"


if __name__ == "__main__":
    main()
