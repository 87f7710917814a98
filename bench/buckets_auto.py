"""``--buckets auto`` against the fixed rule: MiniLM for pixel7 (TFLite signatures), real sentences.

    python bench/buckets_auto.py [--fit 128] [--eval 128] [--max-buckets N]

The buckets are chosen from the real lengths of ``--fit`` standard-library sentences (``slimx export --buckets
auto``); both artifacts (the fixed rule's 16, 32, ..., 512 and the chosen set) are then judged on ``--eval`` other
sentences: the expected latency per sentence on the Pixel 7 (its estimator, each sentence in the smallest bucket
that holds it) and the latency measured here in LiteRT the same way (each bucket's signature timed, weighted by the
evaluation sentences' buckets). Then the same for this machine as the device (``--target host --format tflite``),
where ``--buckets auto`` prices each candidate length by timing it in LiteRT: the measured choice, the Pixel 7
estimator's choice and the fixed rule, each measured here on the evaluation sentences (``--no-host`` skips it).
Writes bench/results/buckets_auto.{md,json}.
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
    ap.add_argument("--no-host", action="store_true", help="skip the measured pricing on this machine")
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
    rows, paths = [], {}
    for name, buckets in (("fixed rule", None), ("auto", auto["buckets"])):
        print(f"judging {name} on the evaluation sentences", file=sys.stderr, flush=True)
        result = slimx.export("minilm", "pixel7", calib=held, calib_samples=args.eval,
                              out=work / name.replace(" ", "-"), shapes={"buckets": buckets} if buckets else None)
        rep = result.report.to_dict()
        est = rep["latency"]["over_lengths"]["on_data"]
        paths[name] = result.artifacts[0]
        rows.append({"buckets": name, "sizes": rep["shapes"]["buckets"], "pixel7_expected_mean_ms": est["mean_ms"],
                     "pixel7_expected_median_ms": est["median_ms"], "parity_cosine": rep["parity"]["cosine"]})
    print("timing both here, interleaved, on the evaluation sentences", file=sys.stderr, flush=True)
    timed = interleaved_per_sentence(paths, held, args.eval)
    for r in rows:
        t = timed[r["buckets"]]
        r.update({"litert_here_mean_ms": t["mean_ms"], "litert_here_median_ms": t["median_ms"],
                  "litert_here_vs_fixed": t["vs_fixed"]})
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "fit": args.fit, "eval": args.eval, "choice": auto}
    lines = ["# `--buckets auto` against the fixed rule: MiniLM for pixel7", "",
             f"{meta['when']}. Chosen from the real lengths of {args.fit} standard-library sentences, at most "
             f"{auto['max_buckets']} buckets, priced by {auto['priced_by']}; judged on "
             f"{args.eval} other sentences, each run in the smallest bucket that holds it: expected on the Pixel 7 "
             "(its estimator) and measured here in LiteRT (both .tflite files run on every sentence at its real "
             "length, interleaved sentence by sentence, 5 rounds; the ratio within each round, median).", "",
             "| buckets | sizes | Pixel 7 expected ms per sentence (mean / median) | LiteRT here, measured (mean / "
             "median) | parity cosine |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['buckets']} | {', '.join(map(str, r['sizes']))} | {r['pixel7_expected_mean_ms']:.3f} / "
                     f"{r['pixel7_expected_median_ms']:.3f} | {r['litert_here_mean_ms']:.3f} / "
                     f"{r['litert_here_median_ms']:.3f} | {r['parity_cosine']:.6f} |")
    a, f = rows[1], rows[0]
    lines += ["", f"auto / fixed: Pixel 7 expected {a['pixel7_expected_mean_ms'] / f['pixel7_expected_mean_ms']:.3f}x, "
              f"measured here {a['litert_here_vs_fixed']:.3f}x (mean per sentence; below 1 is faster).", "",
              "Length histogram of the fit sentences: " + ", ".join(
                  f"{h['from']}-{h['to']}: {h['count']}" for h in auto["histogram"] if h["count"]) + "."]
    host_rows = [] if args.no_host else host_section(args, work, fit, held, auto, lines)
    write_results("buckets_auto", {"meta": meta, "rows": rows, "host_rows": host_rows}, "\n".join(lines) + "\n")
    print(json.dumps(rows + host_rows, indent=2))


def host_section(args, work: Path, fit: Path, held: Path, pixel_auto: dict, lines: list[str]) -> list[dict]:
    """This machine as the device: --buckets auto prices each candidate by timing it in LiteRT."""
    import slimx

    shapes = {"buckets": "auto", **({"max_buckets": args.max_buckets} if args.max_buckets else {})}
    print("choosing the buckets for this machine (each candidate timed in LiteRT)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    chosen = slimx.export("minilm", "host", format="tflite", calib=fit, calib_samples=args.fit,
                          out=work / "choose-host", shapes=shapes)
    seconds = time.perf_counter() - started
    auto = chosen.report.to_dict()["shapes"]["auto"]
    sets = {"fixed rule": None, "auto, priced by timing here": auto["buckets"]}
    if pixel_auto["buckets"] != auto["buckets"]:
        sets["auto, priced by the Pixel 7 estimator"] = pixel_auto["buckets"]
    built = {}
    for name, buckets in sets.items():
        print(f"building {name}", file=sys.stderr, flush=True)
        result = slimx.export("minilm", "host", format="tflite", calib=held, calib_samples=args.eval,
                              out=work / f"host-{len(built)}", shapes={"buckets": buckets} if buckets else None,
                              timing={"runs": 30})
        rep = result.report.to_dict()
        built[name] = (result.artifacts[0], rep["shapes"]["buckets"], rep["parity"]["cosine"])
    print("timing the sets interleaved on the evaluation sentences", file=sys.stderr, flush=True)
    timed = interleaved_per_sentence({k: v[0] for k, v in built.items()}, held, args.eval)
    rows = [{"buckets": name, "sizes": built[name][1], "mean_ms": timed[name]["mean_ms"],
             "median_ms": timed[name]["median_ms"], "vs_fixed": timed[name]["vs_fixed"],
             "parity_cosine": built[name][2]} for name in built]
    same = "" if "auto, priced by the Pixel 7 estimator" in sets else (
        " The Pixel 7 estimator chose the same set here, so it has no row of its own.")
    lines += ["", "## This machine as the device: candidates priced by timing them in LiteRT", "",
              f"`slimx export minilm --target host --format tflite --buckets auto`: {auto['priced_by']} "
              f"(candidate step {auto['candidate_step']} tokens; the whole export {seconds:.0f} s). Each set then "
              f"timed here in one interleaved run on the {args.eval} evaluation sentences (each sentence at its real "
              "length in the smallest bucket that holds it; ratios within a round, median)." + same, "",
              "| buckets | sizes | measured here ms per sentence (mean / median) | vs the fixed rule | parity cosine |",
              "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['buckets']} | {', '.join(map(str, r['sizes']))} | {r['mean_ms']:.3f} / "
                     f"{r['median_ms']:.3f} | {r['vs_fixed']:.3f}x | {r['parity_cosine']:.6f} |")
    lines += ["", "Prices timed at the fit: " + ", ".join(f"{k}: {v:.3f} ms" for k, v in auto["prices_ms"].items())
              + "."]
    return rows


def interleaved_per_sentence(paths: dict, sentences: Path, count: int, rounds: int = 5) -> dict:
    """Each .tflite run on every sentence (at its real length, in its smallest bucket: the runner picks it), the
    artifacts interleaved sentence by sentence, ``rounds`` times; mean and median ms per sentence, and each
    artifact's per-round mean against the first's (median over rounds)."""
    import statistics

    from slimx.export import load_calibration, load_model
    from slimx.export.shapes import at_real_lengths
    from slimx.targets import get_target
    from slimx.targets.base import Artifact

    loaded = load_model("minilm")
    calib = load_calibration(str(sentences), loaded, limit=count, seed=0)
    names = [s.name for s in loaded.inputs]
    batches = at_real_lengths(calib.batches, names)
    target = get_target("tflite")
    runner = target.runner(threads=2)
    artifacts = {k: Artifact("tflite", Path(p), target.read_inputs(Path(p)), ["out"]) for k, p in paths.items()}
    sessions = {k: runner.session(a.path) for k, a in artifacts.items()}
    per = {k: [] for k in artifacts}
    for _ in range(rounds):
        for b in batches:
            for k, a in artifacts.items():
                started = time.perf_counter()
                runner.run(a, b, session=sessions[k])
                per[k].append((time.perf_counter() - started) * 1e3)
    first = next(iter(per))
    n = len(batches)
    out = {}
    for k, v in per.items():
        ratios = [statistics.fmean(v[r * n:(r + 1) * n]) / statistics.fmean(per[first][r * n:(r + 1) * n])
                  for r in range(rounds)]
        out[k] = {"mean_ms": statistics.fmean(v), "median_ms": statistics.median(v),
                  "vs_fixed": statistics.median(ratios)}
    return out


if __name__ == "__main__":
    main()
