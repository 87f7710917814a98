"""``--buckets auto`` against the fixed rule: MiniLM for pixel7 (TFLite signatures), real sentences.

    python bench/buckets_auto.py [--fit 128] [--eval 128] [--max-buckets N]

The buckets are chosen from the real lengths of ``--fit`` standard-library sentences (``slimx export --buckets
auto``); both artifacts (the fixed rule's 16, 32, ..., 512 and the chosen set) are then judged on ``--eval`` other
sentences: the expected latency per sentence on the Pixel 7 (its estimator, each sentence in the smallest bucket
that holds it) and the latency measured here in LiteRT the same way (each bucket's signature timed, weighted by the
evaluation sentences' buckets). Writes bench/results/buckets_auto.{md,json}.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--fit", type=int, default=128)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--max-buckets", type=int, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import slimx
    from slimx.export.textdata import stdlib_sentences

    work = Path(tempfile.mkdtemp())
    fit, held = work / "fit.txt", work / "eval.txt"
    fit.write_text("\n".join(stdlib_sentences(args.fit, 0)) + "\n")
    held.write_text("\n".join(stdlib_sentences(args.eval, args.fit)) + "\n")
    print("choosing the buckets on the fit sentences", file=sys.stderr, flush=True)
    chosen = slimx.export("minilm", "pixel7", calib=fit, calib_samples=args.fit, out=work / "choose",
                          shapes={"buckets": "auto", **({"max_buckets": args.max_buckets} if args.max_buckets else {})})
    auto = chosen.report.to_dict()["shapes"]["auto"]
    rows = []
    for name, buckets in (("fixed rule", None), ("auto", auto["buckets"])):
        print(f"judging {name} on the evaluation sentences", file=sys.stderr, flush=True)
        result = slimx.export("minilm", "pixel7", calib=held, calib_samples=args.eval,
                              out=work / name.replace(" ", "-"), shapes={"buckets": buckets} if buckets else None)
        rep = result.report.to_dict()
        est, host = rep["latency"]["over_lengths"]["on_data"], rep["host_latency"]["over_lengths"]["on_data"]
        rows.append({"buckets": name, "sizes": rep["shapes"]["buckets"], "pixel7_expected_mean_ms": est["mean_ms"],
                     "pixel7_expected_median_ms": est["median_ms"], "litert_here_mean_ms": host["mean_ms"],
                     "litert_here_median_ms": host["median_ms"], "parity_cosine": rep["parity"]["cosine"]})
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "fit": args.fit, "eval": args.eval, "choice": auto}
    lines = ["# `--buckets auto` against the fixed rule: MiniLM for pixel7", "",
             f"{meta['when']}. Chosen from the real lengths of {args.fit} standard-library sentences, at most "
             f"{auto['max_buckets']} buckets, priced by {auto['priced_by']}; judged on "
             f"{args.eval} other sentences, each run in the smallest bucket that holds it: expected on the Pixel 7 "
             "(its estimator) and measured here in LiteRT (each bucket's signature timed, weighted by the sentences' "
             "buckets).", "",
             "| buckets | sizes | Pixel 7 expected ms per sentence (mean / median) | LiteRT here, measured (mean / "
             "median) | parity cosine |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['buckets']} | {', '.join(map(str, r['sizes']))} | {r['pixel7_expected_mean_ms']:.3f} / "
                     f"{r['pixel7_expected_median_ms']:.3f} | {r['litert_here_mean_ms']:.3f} / "
                     f"{r['litert_here_median_ms']:.3f} | {r['parity_cosine']:.6f} |")
    a, f = rows[1], rows[0]
    lines += ["", f"auto / fixed: Pixel 7 expected {a['pixel7_expected_mean_ms'] / f['pixel7_expected_mean_ms']:.3f}x, "
              f"measured here {a['litert_here_mean_ms'] / f['litert_here_mean_ms']:.3f}x (mean per sentence; below 1 "
              "is faster).", "", "Length histogram of the fit sentences: " + ", ".join(
                  f"{h['from']}-{h['to']}: {h['count']}" for h in auto["histogram"] if h["count"]) + "."]
    write_results("buckets_auto", {"meta": meta, "rows": rows}, "\n".join(lines))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
