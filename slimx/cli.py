"""The ``slimx`` command: flags in, a config out, one pipeline call, one line per error.

Exit codes: 0 success, 1 a failure while running, 2 a usage error (bad flag, unknown name, bad
file). Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from slimx import __version__
from slimx._core.errors import SlimxError, UsageError
from slimx.quant import PRECISIONS

EPILOG = ("MODEL forms: minilm (built in, the default), timm:NAME, hf:DIR, pkg.module:factory, "
          "FILE.pt2, FILE.onnx")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"slimx: error: {message}; see '{self.prog} --help'", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    # --debug before or after the command: the command's copy has no default, so it never resets the other's
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library logs")

    parser = _Parser(prog="slimx", description="Compress, compile and prove PyTorch models for edge devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    parser.add_argument("--version", action="version", version=f"slimx {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    from slimx.config import ExportConfig

    def d(name):  # a flag's default, stated once in the config
        return ExportConfig.default(name)

    keep = argparse.SUPPRESS  # an absent flag takes the config's default
    exp = sub.add_parser("export", parents=[common], help="export a model for a device and prove it",
                         description="Export MODEL for a device: deployment form, torch.export, the target "
                                     "format, parity against PyTorch and latency.", epilog=EPILOG)
    exp.add_argument("model", nargs="?", default=keep, help=f"the model (default: {d('model')})")
    exp.add_argument("--target", "-t", dest="device", default=keep,
                     help=f"device or alias (default: {d('device')}); see 'slimx devices'")
    exp.add_argument("--format", "-f", default=keep, help="onnx, coreml, tflite or tensorrt (default: the device's)")
    exp.add_argument("--out", "-o", default=keep, help="output folder (default: out/MODEL-DEVICE)")
    exp.add_argument("--weights", default=keep, help="weights to load: .safetensors, or a state dict (.pt/.pth/.bin)")
    exp.add_argument("--input-shape", dest="input_shapes", action="append", default=keep,
                     metavar="[NAME=]D1xD2[:DTYPE]",
                     help="input shape, once per input (e.g. 1x3x224x224, input_ids=1x64)")
    exp.add_argument("--seq-len", default=keep, metavar="MIN..MAX",
                     help="text models: the dynamic sequence axis's range (default 1..the model's maximum positions)")
    exp.add_argument("--batch", default=keep, metavar="MIN..MAX", help="a dynamic batch axis (any model)")
    exp.add_argument("--static", action="store_true", default=keep, help="fix every shape at the export shape")
    exp.add_argument("--buckets", default=keep, metavar="N,N,...|auto",
                     help="text models: the sequence lengths to build one fixed shape each for (TFLite signatures, "
                          "CoreML enumerated shapes, TensorRT profiles; default for TFLite/CoreML: 16,32,64,... "
                          "up to the maximum); auto: the set that minimises the expected latency over --calib's "
                          "real lengths, priced by the device's latency model")
    exp.add_argument("--max-buckets", type=int, default=keep, metavar="N",
                     help="with --buckets auto: at most N buckets (default: as many as the fixed rule builds)")
    exp.add_argument("--precision", default=keep, choices=PRECISIONS,
                     help="default: the target's (fp16 for coreml and tensorrt, fp32 otherwise)")
    from slimx.targets import all_targets, option_flags

    for of in option_flags():  # each target's own options, from its options class
        if of.kind is bool:
            exp.add_argument(of.flag, dest=of.dest, action="store_true", default=keep, help=of.help)
        else:
            exp.add_argument(of.flag, dest=of.dest, type=of.kind, choices=of.choices, metavar=of.metavar,
                             default=keep, help=of.help)
    exp.add_argument("--opset", type=int, default=keep,
                     help="ONNX opset of the formats written through ONNX ("
                          f"{', '.join(t.name for t in all_targets() if t.writes_onnx)}; default 18)")
    exp.add_argument("--calib", default=keep, help="calibration data: .npz of inputs, text file, or image folder")
    exp.add_argument("--truncate", action="store_true", default=keep,
                     help="text longer than the artifact's longest sequence is cut to it (default: an error)")
    exp.add_argument("--calib-samples", type=int, default=keep,
                     help="samples to use from --calib (default 16; with --pass, all of it up to 1024; "
                          "without --calib, 64 random ones for the passes)")
    exp.add_argument("--labels", default=keep, metavar="FILE",
                     help="one integer task label per --calib sample (file order): fidelity is then accuracy")
    exp.add_argument("--budget-ms", type=float, default=keep,
                     help="slim the model (latency-slim pass) until the device's latency model says it takes at "
                          "most this many ms")
    exp.add_argument("--min-fidelity", type=float, default=keep,
                     help="with --pass: the run fails below this held-out cosine to the original (default 0.95)")
    exp.add_argument("--max-accuracy-drop", type=float, default=keep,
                     help="with --pass and --labels: the run fails past this many points of accuracy lost "
                          "(default 1)")
    exp.add_argument("--parity-inputs", type=int, default=keep,
                     help=f"fresh random inputs for parity (default {d('parity_inputs')})")
    exp.add_argument("--min-cosine", type=float, default=keep, help="parity fails below (fp32 default 0.9999)")
    exp.add_argument("--max-rel-err", type=float, default=keep, help="parity fails above (fp32 default 1e-3)")
    exp.add_argument("--pass", dest="passes", action="append", default=keep, metavar="NAME:K=V,...",
                     help="a compression pass, e.g. lowrank:rank_ratio=0.5 (repeatable, run in order)")
    exp.add_argument("--recipe", default=keep, help="a TOML file of [[pass]] tables")
    exp.add_argument("--no-reconstruct", action="store_true", default=keep,
                     help="keep each pass's cut weights as they are (default: after each pass, refit the layers it "
                          "cut or factorized by least squares on the calibration data)")
    exp.add_argument("--track", default=None, metavar="mlflow[:URI]", help=TRACK_HELP)
    exp.add_argument("--learn", action="store_true", default=keep,
                     help="add the measured latency (host) to the device's anchors (slimx devices anchor), so "
                          "estimates of models not yet timed there use it")
    exp.add_argument("--no-fp16-fixes", action="store_true", default=keep,
                     help="keep the fp16 hazards the numerical pre-flight finds as they are (default: fp16-safe mask "
                          "constants, overflowing LayerNorms rescaled; each checked against fp32)")
    exp.add_argument("--fp16-norms", choices=("rescale", "fp32"), default=keep,
                     help="an fp16 LayerNorm whose variance overflows: rescale its input in the graph (default; the "
                          "norm stays on the fp16 path) or keep it in fp32 through the format's per-op precision "
                          "(Core ML ML Program, TensorRT; other formats rescale and say so)")
    exp.add_argument("--recover", default=keep, metavar="K=V,...",
                     help="distill from the original after the passes, e.g. steps=200,lr=5e-5")
    exp.add_argument("--runs", type=int, default=keep, help=f"timed runs, at least 30 (default {d('runs')})")
    exp.add_argument("--warmup", type=int, default=keep, help=f"warm-up runs (default {d('warmup')})")
    exp.add_argument("--threads", type=int, default=keep, help="runtime threads (default: all cores)")
    exp.add_argument("--seed", type=int, default=keep, help=f"(default {d('seed')})")
    exp.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    exp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")

    ev = sub.add_parser("eval", parents=[common], help="an exported artifact against the original on real data",
                        description="Run the artifact in OUT_DIR and the original model on DATA: fidelity (cosine, "
                                    "nearest-neighbour agreement, accuracy with --labels) and the measured latency "
                                    "ratio original/artifact in the same run and runtime.")
    ev.add_argument("out_dir")
    ev.add_argument("--against", default=None,
                    help="the original MODEL (default: the model the export started from, with its --weights, as "
                         "its report records them); another model is compared only when named here")
    ev.add_argument("--data", required=True, help="text file, image folder or .npz of inputs")
    ev.add_argument("--labels", default=None, help="one integer label per sample, whitespace-separated")
    ev.add_argument("--weights", default=None,
                    help="weights for the original model (default: the export's, when --against is its model)")
    ev.add_argument("--samples", type=int, default=64)
    ev.add_argument("--truncate", action="store_true",
                    help="text longer than the artifact's longest sequence is cut to it (default: an error)")
    ev.add_argument("--runs", type=int, default=30)
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--html", default=None, metavar="FILE", help="the HTML report (default: OUT_DIR/eval.html)")

    data = sub.add_parser("data", parents=[common], help="write calibration/evaluation data",
                          description="Write real English text, one sentence per line, for --calib or evaluation: "
                                      "stdlib-text from Python's standard-library docstrings (about 2,900 "
                                      "sentences), package-text from the docstrings of the installed packages "
                                      "(tens of thousands; none shared with stdlib-text).")
    data.add_argument("kind", choices=["stdlib-text", "package-text"])
    data.add_argument("--out", "-o", required=True, help="text file to write")
    data.add_argument("--count", type=int, default=256, help="sentences (default 256)")
    data.add_argument("--offset", type=int, default=0, help="skip this many first (disjoint sets)")

    card = sub.add_parser("card", parents=[common], help="a model card (README.md) for an export folder",
                          description="Write a model card for an export folder: README.md with Hugging Face YAML "
                                      "metadata, from its report.json (inputs, passes and fidelity, latency per "
                                      "device, parity per runtime, quantization, artifacts with SHA-256, tool "
                                      "versions, the command that reproduces it). Nothing is re-run.")
    card.add_argument("out", metavar="OUT", help="the export folder (with report.json)")
    card.add_argument("--output", "-o", default=None, metavar="FILE", help="where to write (default: OUT/README.md)")

    dev = sub.add_parser("devices", parents=[common],
                         help="device profiles: list, show, microbench, calibrate, anchor",
                         description="Device profiles: 'slimx devices' lists them, 'slimx devices show NAME' prints "
                                     "one in full; 'slimx devices microbench --runner R' times the standard op suite "
                                     "and writes a measurements CSV; 'slimx devices calibrate NAME --measurements CSV' "
                                     "fits the device's estimator settings (least squares on log latency, "
                                     "cross-validated) and writes them into its profile; 'slimx devices anchor NAME "
                                     "--measured MODEL=MS ...' records timings of your own setup, which later "
                                     "estimates for that device are put on (a user layer; the profile is not "
                                     "edited).")
    dev.add_argument("action", nargs="?", default="list",
                     choices=["list", "show", "microbench", "calibrate", "anchor"])
    dev.add_argument("name", nargs="?", default=None)
    dev.add_argument("--json", action="store_true")
    dev.add_argument("--runner", default="onnxruntime", help="microbench: the runner to time with")
    dev.add_argument("--out", "-o", default=None, help="microbench: CSV to write; calibrate: profile file to write")
    dev.add_argument("--quick", action="store_true", help="microbench: a 12-case subset")
    dev.add_argument("--rounds", type=int, default=3, help="microbench: interleaved timing rounds (default 3)")
    dev.add_argument("--runs", type=int, default=50, help="microbench: timed runs per case and round (default 50)")
    dev.add_argument("--threads", type=int, default=None, help="microbench: runtime threads (default: all cores)")
    dev.add_argument("--measurements", action="append", default=None,
                     help="calibrate: a microbench CSV or a published latency table (with --family: repeat it, one "
                          "table per --measurements)")
    dev.add_argument("--family", default=None, metavar="FAMILY",
                     help="calibrate every device of a family (jetson, apple-ane, apple-gpu, apple-cpu, pixel) in "
                          "one fit tied to their specs")
    dev.add_argument("--scale-from", default=None, metavar="DEVICE",
                     help="calibrate: carry a calibrated device's efficiencies over by peak rates (same family)")
    dev.add_argument("--setting", action="append", default=None, metavar="SETTING",
                     help="calibrate: fit only this estimator setting (repeatable); the others keep their figures, "
                          "and rows for them are counted as skipped; anchor: the setting the timings are of "
                          "(default: the device's default)")
    dev.add_argument("--measured", action="append", default=[], metavar="MODEL[@RES]=MS",
                     help="anchor: a model you timed on your device and its median in ms (repeatable); @RES: the "
                          "square input size of an image model (default 224)")
    dev.add_argument("--csv", default=None, metavar="FILE",
                     help="anchor: timings as CSV, columns model (or timm_name), latency_ms, optional input_size")
    dev.add_argument("--from-agent", default=None, metavar="URL",
                     help="anchor: time a small standard set of models on a running slimx agent (--token-file)")
    dev.add_argument("--models", default=None, metavar="M1,M2",
                     help="anchor --from-agent: the models to time instead of the standard set")
    dev.add_argument("--token-file", default=None, help="anchor --from-agent: the agent's token file")
    dev.add_argument("--allow-insecure-token-file", action="store_true")
    dev.add_argument("--setup", default=None, metavar="NAME",
                     help="anchor: a name for your measurement setup (tool, OS, runtime version)")
    dev.add_argument("--replace", action="store_true", help="anchor: drop the device's anchors before adding these")
    dev.add_argument("--clear", action="store_true", help="anchor: delete the device's anchors")
    dev.add_argument("--refresh", action="store_true",
                     help="anchor: re-estimate the anchors against the current profile (after a recalibration)")

    prof = sub.add_parser("profile", parents=[common], help="latency on a device: measured, or estimated per op",
                          description="Latency of MODEL or ARTIFACT on a device: measured when a runner for it "
                                      "exists here (the host) or through a slimx agent (--remote), estimated per op "
                                      "from the device's calibrated profile otherwise. The output says which.",
                          epilog=EPILOG + "; ARTIFACT: .onnx, .tflite, .mlpackage, .plan, or an export OUT folder")
    prof.add_argument("subject", nargs="?", default="minilm", metavar="MODEL|ARTIFACT",
                      help="MODEL or ARTIFACT (default: minilm)")
    prof.add_argument("--device", "-d", default="host", help="device or alias (default: host)")
    prof.add_argument("--remote", default=None, metavar="URL", help="a slimx agent on the device, e.g. http://jetson:8765")
    prof.add_argument("--token-file", default=None, help="file holding the agent's token (with --remote; mode 600)")
    prof.add_argument("--remote-wait", type=float, default=900.0, metavar="S",
                      help="seconds to wait out a busy agent (503), retrying after its Retry-After (default: 900)")
    prof.add_argument("--allow-insecure-token-file", action="store_true",
                      help="accept a token file other users can read (with a warning)")
    how = prof.add_mutually_exclusive_group()
    how.add_argument("--estimate", action="store_true", help="use the estimator, also on the host")
    how.add_argument("--measure", action="store_true", help="measure or fail; never estimate")
    prof.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]D1xD2[:DTYPE]")
    prof.add_argument("--weights", default=None)
    prof.add_argument("--precision", default=None, choices=PRECISIONS)
    prof.add_argument("--setting", default=None,
                      help="estimator setting of the device (e.g. tensorrt-dla-fp16; see 'slimx devices show D')")
    prof.add_argument("--runs", type=int, default=50)
    prof.add_argument("--warmup", type=int, default=5)
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--top", type=int, default=12, help="rows of the per-op breakdown (default 12)")
    prof.add_argument("--calibrate", action="store_true",
                      help="host: time the microbenchmark suite here and fit the host's estimator first (about a "
                           "minute; do it when the profile was fitted on another CPU)")
    prof.add_argument("--learn", action="store_true",
                      help="add this measurement to the device's anchors (slimx devices anchor), so estimates for "
                           "models not yet timed there use it")
    prof.add_argument("--json", action="store_true", help="print the report's latency object as JSON")
    prof.add_argument("--html", default=None, metavar="FILE", help="write a self-contained HTML report")
    prof.add_argument("--quiet", "-q", action="store_true")

    gate = sub.add_parser("gate", parents=[common], help="fail CI when a model got slower on its device",
                          description="Judge latency budgets: a gate file of [[gate]] entries, or one MODEL with "
                                      "--device and --budget-ms. Measured where a runner exists (candidate and "
                                      "baseline interleaved in rounds; a check fails only when its bootstrap "
                                      "interval lies past the budget), estimated elsewhere (fails only when the "
                                      "estimate's interval does). Exit 0 pass, 1 regression, 2 usage error.")
    gate.add_argument("subject", metavar="FILE.toml|MODEL", help="a gate file, or a MODEL / export OUT folder")
    gate.add_argument("--device", "-d", default=None,
                      help="with MODEL: the device (default: the one an export OUT folder was made for, else host)")
    gate.add_argument("--budget-ms", type=float, default=None, help="with MODEL: the most it may take")
    gate.add_argument("--max-regression-pct", type=float, default=None,
                      help="with MODEL: how much slower than the baseline it may be")
    gate.add_argument("--statistic", default="median", choices=["median", "p90"], help="what --budget-ms limits")
    gate.add_argument("--baseline", default=None, help="with MODEL: an artifact or OUT folder to compare against")
    gate.add_argument("--baseline-file", default=None,
                      help="recorded baselines (default: FILE-baseline.json beside the gate file)")
    gate.add_argument("--update-baseline", action="store_true",
                      help="measure and record each entry as its baseline (artifact copy, latency, versions)")
    gate.add_argument("--precision", default=None, choices=PRECISIONS)
    gate.add_argument("--format", default=None)
    gate.add_argument("--input-shape", action="append", default=[], metavar="[NAME=]D1xD2[:DTYPE]")
    gate.add_argument("--weights", default=None)
    gate.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")
    gate.add_argument("--runs", type=int, default=None, help="timed runs per artifact per round (default 20)")
    gate.add_argument("--warmup", type=int, default=None)
    gate.add_argument("--threads", type=int, default=None)
    gate.add_argument("--strict", action="store_true", help="judge point estimates instead of intervals")
    gate.add_argument("--remote", default=None, metavar="URL", help="measure through a slimx agent on the device")
    gate.add_argument("--token-file", default=None)
    gate.add_argument("--remote-wait", type=float, default=900.0, metavar="S",
                      help="seconds to wait out a busy agent (503), retrying after its Retry-After (default: 900)")
    gate.add_argument("--allow-insecure-token-file", action="store_true")
    gate.add_argument("--track", default=None, metavar="mlflow[:URI]", help=TRACK_HELP)
    gate.add_argument("--learn", action="store_true",
                      help="add each measured MODEL entry to its device's anchors (slimx devices anchor), so that "
                           "estimates for models not yet timed there use it")
    gate.add_argument("--junit", default=None, metavar="FILE", help="write JUnit XML (one test case per entry)")
    gate.add_argument("--markdown", default=None, metavar="FILE",
                      help="write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY when set)")
    gate.add_argument("--html", default=None, metavar="FILE", help="write a self-contained HTML report")
    gate.add_argument("--json", action="store_true", help="print the result as JSON")
    gate.add_argument("--quiet", "-q", action="store_true")

    sweep = sub.add_parser("sweep", parents=[common], help="models x devices x recipes on Ray, with a Pareto front",
                           description="Run every trial of a sweep file (models x devices x precisions x recipes) "
                                       "as a Ray task: slimx export (and eval) into OUT/trials/KEY, results appended "
                                       "to OUT/results.csv and results.json, the latency-fidelity front per device "
                                       "in the terminal and OUT/report.html. Finished trials are skipped on a rerun.")
    sweep.add_argument("file", help="the sweep file (TOML)")
    sweep.add_argument("--out", "-o", required=True, help="the sweep's folder (results, trials, report.html)")
    sweep.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    sweep.add_argument("--workers", type=int, default=None, help="local Ray: CPUs to use (default: up to 2)")
    sweep.add_argument("--retry-failed", action="store_true", help="rerun trials that failed before")
    sweep.add_argument("--track", default=None, metavar="mlflow[:URI]", help=TRACK_HELP + " (one run per trial)")
    sweep.add_argument("--json", action="store_true")
    sweep.add_argument("--quiet", "-q", action="store_true")

    agent = sub.add_parser("agent", parents=[common], help="run the remote device agent",
                           description="Serve this device to 'slimx profile --remote': accepts artifact uploads over "
                                       "HTTP (token required), runs them with a local runner, returns timings; builds "
                                       "TensorRT engines here from ONNX.")
    agent.add_argument("action", choices=["serve"])
    agent.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    agent.add_argument("--port", type=int, default=8765)
    agent.add_argument("--token-file", required=True,
                       help="file holding the shared token (16+ characters, readable by its owner only: chmod 600)")
    agent.add_argument("--allow-insecure-token-file", action="store_true",
                       help="accept a token file other users can read (with a warning)")
    agent.add_argument("--device", default="host", help="the device profile this agent runs on (default host)")
    agent.add_argument("--max-upload-mb", type=float, default=512.0)
    agent.add_argument("--job-timeout", type=float, default=300.0, help="seconds per job (default 300)")
    agent.add_argument("--queue", type=int, default=8, help="jobs that may wait per runner (default 8)")
    agent.add_argument("--max-connections", type=int, default=64,
                       help="requests served at once; more get 503 with Retry-After (default 64)")
    agent.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not args.debug:
        _quiet_libraries()
    from slimx._core.errors import RECEIVED, Terminated, terminate_on_signals

    try:
        with terminate_on_signals():
            try:
                return _dispatch(args, argv)
            except Exception as exc:  # a library that wrapped the Terminated a signal raised inside it
                if RECEIVED:
                    raise Terminated(RECEIVED[0]) from exc
                raise
    except SlimxError as exc:
        if args.debug:
            raise
        print(f"slimx: error: {exc.line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("slimx: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"slimx: terminated by {exc.name}; nothing half-written was left in the output folder",
              file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:  # the reader of the output left (`slimx profile ... | head -1`): stop without a word
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a writer killed by the closed pipe
    except Exception as exc:  # an unexpected failure still gets one line
        if args.debug:
            raise
        from slimx._core.errors import first_line

        print(f"slimx: error: {type(exc).__name__}: {first_line(exc)}; rerun with --debug for the trace",
              file=sys.stderr)
        return 1


TRACK_HELP = ("log the run to MLflow: mlflow (a ./mlruns store) or mlflow:URI; config, parity, fidelity, latency, "
              "size as metrics, the report and model card as artifacts (needs slimx-edge[track])")


def _dispatch(args, argv: list[str]) -> int:
    if args.command == "export":
        return _export(args, argv)
    if args.command == "data":
        return _data(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "profile":
        return _profile(args)
    if args.command == "agent":
        return _agent(args)
    if args.command == "gate":
        return _gate(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "card":
        from slimx.card import write_card

        print(write_card(args.out, args.output))
        return 0
    return _devices(args)


def _export(args, argv: list[str]) -> int:
    from slimx._core.progress import Progress
    from slimx.api import export_config
    from slimx.config import ExportConfig
    from slimx.tracking import log_export, parse_track

    tracker = parse_track(args.track)  # refused before any work when MLflow is missing
    flags = {k: v for k, v in vars(args).items() if k in ExportConfig.flag_names()}
    cfg = ExportConfig.from_flags(flags, command=("slimx", *argv), where="slimx export")
    result = export_config(cfg, progress=Progress(total=9, enabled=not args.quiet))
    if tracker is not None:  # a failed verdict is tracked too: its report is written either way
        _tracked(log_export(tracker, result.report.to_dict(), result.out), args)
    result.raise_for_failures()  # the report is written either way; a failed verdict exits 1
    if args.json:
        print(json.dumps(result.report.to_dict(), indent=2))
    else:
        print(result.summary())
        print(f"  report    {os.path.join(str(result.out), 'report.json')} (and report.html)")
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from slimx.api import evaluate
    from slimx.evaluate import summary
    from slimx.html import eval_page, write

    result = evaluate(args.out_dir, args.data, against=args.against, samples=args.samples, runs=args.runs,
                      weights=args.weights, labels=args.labels, truncate=args.truncate).to_dict()
    write(Path(args.html or os.path.join(args.out_dir, "eval.html")), eval_page(result))
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def _data(args) -> int:
    from slimx.export.textdata import package_sentences, stdlib_sentences

    if args.count < 1 or args.offset < 0:
        raise UsageError("--count/--offset", "must be positive / non-negative", "e.g. --count 256 --offset 0")
    lines = (package_sentences if args.kind == "package-text" else stdlib_sentences)(args.count, args.offset)
    if not lines:
        raise UsageError("--offset", f"{args.offset} skips past every sentence there is", "give a smaller offset")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        why = "is not writable" if os.path.isdir(folder) else "does not exist"
        raise UsageError(f"--out {args.out}", f"its folder {folder} {why}", "create the folder first, or write "
                         "somewhere else")
    tmp = f"{args.out}.partial"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(lines)} sentences to {args.out}")
    return 0


def _token(args) -> str | None:
    """The agent's token for --remote, read from --token-file (refused where others may read it)."""
    if not args.remote:
        if args.token_file:
            raise UsageError("--token-file", "is only used with --remote", "add --remote URL or drop it")
        return None
    if not args.token_file:
        raise UsageError("--remote", "needs the agent's token", "add --token-file FILE")
    from slimx.devices.agent import read_token

    return read_token(args.token_file, allow_insecure=args.allow_insecure_token_file)


def _profile(args) -> int:
    from slimx._core.progress import Progress
    from slimx.api import profile

    token = _token(args)
    if args.html and not os.path.isdir(os.path.dirname(os.path.abspath(args.html))):
        raise UsageError(f"--html {args.html}", "is in a folder that does not exist", "create the folder first")
    result = profile(args.subject, args.device, remote=args.remote, token=token, remote_wait=args.remote_wait,
                     estimate=True if args.estimate else False if args.measure else None,
                     input_shapes=tuple(args.input_shape), weights=args.weights, precision=args.precision,
                     setting=args.setting, runs=args.runs, warmup=args.warmup, threads=args.threads, top=args.top,
                     calibrate=args.calibrate, learn=args.learn,
                     progress=Progress(total=1, enabled=not (args.quiet or args.json)))
    if args.html:
        from pathlib import Path

        from slimx.html import profile_page, write

        write(Path(args.html), profile_page(result.to_dict(), args.subject))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render(top=args.top))
    return 0


def _sweep(args) -> int:
    from pathlib import Path

    from slimx._core.progress import Progress
    from slimx.sweep import load_sweep, run_sweep, table

    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("slimx sweep", "runs its trials on Ray, which is not installed",
                         "pip install 'slimx[sweep]' (or ray)") from None
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers", "must be at least 1", "e.g. --workers 2")
    plan = load_sweep(args.file)
    from slimx.tracking import log_export, parse_track

    tracker = parse_track(args.track)
    result = run_sweep(plan, Path(args.out), address=args.address, workers=args.workers,
                       retry_failed=args.retry_failed, progress=Progress(total=1, enabled=not (args.quiet or
                                                                                              args.json)))
    if tracker is not None:
        from slimx.report import read_report

        for row in result["trials"]:
            if (Path(row["out"]) / "report.json").is_file():
                row["tracked"] = log_export(tracker, read_report(row["out"], "slimx sweep --track:"), row["out"])
        _tracked(next((r["tracked"] for r in result["trials"] if r.get("tracked")), None), args,
                 f"{sum(1 for r in result['trials'] if r.get('tracked'))} trial run(s)")
    print(json.dumps(result, indent=2) if args.json else table(result, plan.rank_by))
    return 0 if all(r["status"] == "ok" for r in result["trials"]) else 1


def _gate(args) -> int:
    from pathlib import Path

    from slimx._core.progress import Progress
    from slimx.api import gate
    from slimx.gate import junit, markdown, table

    settings = {k: v for k, v in (("rounds", args.rounds), ("runs", args.runs), ("warmup", args.warmup),
                                  ("threads", args.threads), ("strict", args.strict or None)) if v is not None}
    for out in (args.junit, args.markdown, args.html):
        if out and not Path(out).absolute().parent.is_dir():
            raise UsageError(f"{out}", "is in a folder that does not exist", "create the folder first")
    from slimx.tracking import log_gate, parse_track

    tracker = parse_track(args.track)
    token = _token(args)
    result = gate(args.subject, args.device, budget_ms=args.budget_ms, max_regression_pct=args.max_regression_pct,
                  statistic=args.statistic, baseline=args.baseline, precision=args.precision, format=args.format,
                  input_shapes=tuple(args.input_shape), weights=args.weights, settings=settings,
                  update_baseline=args.update_baseline, baseline_file=args.baseline_file, remote=args.remote,
                  token=token, remote_wait=args.remote_wait, learn=args.learn,
                  progress=Progress(total=1, enabled=not (args.quiet or args.json))).to_dict()
    text = markdown(result)
    for path, content in ((args.junit, junit(result) if args.junit else None), (args.markdown, text)):
        if path:
            _write_text(Path(path), content)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as fh:
            fh.write(text)
    if args.html:
        from slimx.html import write_gate_html

        write_gate_html(Path(args.html), result)
    if tracker is not None:
        result["tracked"] = log_gate(tracker, result)
        _tracked(result["tracked"], args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["passed"] else 1


def _tracked(record: dict | None, args, what: str = "run") -> None:
    if record and not getattr(args, "json", False) and not getattr(args, "quiet", False):
        print(f"tracked: MLflow {what} {record['run_id']} in {record['store']} (experiment {record['experiment']})",
              file=sys.stderr)


def _write_text(path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def _agent(args) -> int:
    from slimx.devices import load_device
    from slimx.devices.agent import Agent, read_token, serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}", "is not a TCP port", "give one in 1..65535 (0: any free port)")
    if args.max_upload_mb <= 0 or args.job_timeout <= 0 or args.queue < 0 or args.max_connections < 1:
        raise UsageError("--max-upload-mb/--job-timeout/--queue/--max-connections", "must be positive",
                         "e.g. --max-upload-mb 512 --max-connections 64")
    token = read_token(args.token_file, allow_insecure=args.allow_insecure_token_file)
    device = load_device(args.device, measure_host=False)
    agent = Agent(token, device=device.name, max_upload=int(args.max_upload_mb * (1 << 20)),
                  job_timeout=args.job_timeout, max_queue=args.queue, threads=args.threads,
                  max_connections=args.max_connections)
    try:
        server = serve(agent, args.host, args.port)
    except OSError as exc:
        raise UsageError(f"--host {args.host} --port {args.port}", f"cannot listen there ({exc.strerror})",
                         "pick a free port, or an address of this machine") from exc
    info = agent.info()
    print(f"slimx agent: serving {device.name} on http://{args.host}:{server.server_address[1]} "
          f"(runners: {', '.join(info['runners'])}; upload limit {args.max_upload_mb:g} MB; "
          f"job timeout {args.job_timeout:g} s; {args.max_connections} requests at once, {args.queue} jobs queued "
          "per runner)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _microbench(args) -> int:
    from pathlib import Path

    from slimx._core.progress import Progress
    from slimx.devices.microbench import run_microbench

    if args.name:
        raise UsageError(f"slimx devices microbench {args.name}", "takes no device name (it times this host)",
                         "use --runner R --out CSV")
    if args.rounds < 1 or args.runs < 1:
        raise UsageError("--rounds/--runs", "must be at least 1", "e.g. --rounds 3 --runs 50")
    out = Path(args.out or f"microbench-{args.runner}.csv")
    progress = Progress(total=1, enabled=not args.json)
    rows = run_microbench(args.runner, out, quick=args.quick, threads=args.threads, runs=args.runs,
                          rounds=args.rounds, progress=progress)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"wrote {len(rows)} measurements ({args.runner}, setting {rows[0]['setting'] if rows else '-'}) to {out}")
    return 0


def _calibrate(args) -> int:
    from pathlib import Path

    from slimx._core.progress import Progress
    from slimx.devices.calibrate import calibrate, scale_from

    if args.family:
        if args.setting:
            raise UsageError("--setting", "a family fits the one setting it is for", "drop --setting")
        return _calibrate_family(args)
    if not args.name:
        raise UsageError("slimx devices calibrate", "needs a device name", "e.g. slimx devices calibrate host "
                         "--measurements microbench.csv")
    if args.measurements and len(args.measurements) > 1:
        raise UsageError("--measurements", "takes one table for one device", "give one, or use --family")
    if bool(args.measurements) == bool(args.scale_from):
        raise UsageError("slimx devices calibrate", "needs exactly one of --measurements CSV and --scale-from DEVICE",
                         "give the measurements to fit, or the calibrated device of the same family")
    out = Path(args.out) if args.out else None
    if args.scale_from:
        result = scale_from(args.name, args.scale_from, out=out)
        print(f"{args.name}: settings {', '.join(result['settings'])} scaled from {args.scale_from}; "
              f"wrote {result['path']}")
        return 0
    progress = Progress(total=1, enabled=not args.json)
    result = calibrate(args.name, Path(args.measurements[0]), out=out, progress=progress, only=args.setting)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "path"} | {"path": str(result["path"])},
                         indent=2, default=float))
        return 0
    for key, fit in result["fits"].items():
        cv = fit["cv"]
        print(f"{args.name} / {key}: {fit['rows']} rows, {len(fit.get('families', []))} families; fitted "
              f"{', '.join(fit['free'])}")
        for name, part in (("per-op model", "cv_per_op"), ("baseline", "cv_baseline")):
            got = fit.get(part) or {}
            if got.get("mape_pct") is not None:
                print(f"  {name:<12} {got['method']}: mean {got['mape_pct']:.1f}%, median "
                      f"{got['median_abs_pct']:.1f}%, within ±15%: {got['within_15pct'] * 100:.0f}%, "
                      f"Spearman {got['spearman']:.2f}")
        print(f"  ships the {fit.get('model', 'per-op')} fit; held-out error ({cv['method']}): mean "
              f"{cv.get('mape_pct', float('nan')):.1f}%, max {cv.get('max_abs_pct', float('nan')):.1f}%, within ±15%: "
              f"{cv.get('within_15pct', 0) * 100:.0f}%"
              + (f"; 80% interval x{cv['interval_factors'][0]:.2f}-x{cv['interval_factors'][1]:.2f}"
                 if cv.get("interval_factors") else ""))
        for row in fit["table"]:
            held = row["held_out_error_pct"]
            print(f"    {row['label']:<34} measured {row['measured_ms']:>9.3f}  fitted {row['fitted_ms']:>9.3f}  "
                  f"held-out {'-' if held is None else f'{held:+.1f}%'}")
    for why, n in result["skipped"].items():
        print(f"  skipped {n} row(s): {why}")
    print(f"wrote {result['path']}")
    return 0


def _calibrate_family(args) -> int:
    from pathlib import Path

    from slimx._core.progress import Progress
    from slimx.devices.calibrate import read_rows
    from slimx.devices.family import calibrate_family, write_family

    if args.name or args.scale_from:
        raise UsageError("--family", "fits every device of the family", "drop the device name and --scale-from")
    if not args.measurements:
        raise UsageError("--family", "needs the published tables to fit", "add --measurements CSV (repeatable)")
    tables = [(Path(p).name, read_rows(Path(p))) for p in args.measurements]
    progress = Progress(total=1, enabled=not args.json)
    result = calibrate_family(args.family, tables, progress)
    paths = write_family(result, Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=float))
        return 0
    lodo = result["lodo"]
    exps = ", ".join(f"{k} {v:.2f}" for k, v in result["exponents"].items())
    print(f"{result['family']}: {result['rows']} rows on {', '.join(result['devices_with_rows'])}; spec exponents "
          f"{exps}; {lodo['method']}: mean {lodo['mape_pct']:.1f}%, median {lodo['median_abs_pct']:.1f}%, "
          f"Spearman {lodo['spearman']:.2f}; estimates for the setup {result['reference_setup']}" +
          (f"; left out (no model shared with another setup): {', '.join(result['unlinked_setups'])}"
           if result.get("unlinked_setups") else ""))
    for name, m in result["members"].items():
        verdict = "ships" if m["ships"] else f"keeps its own fit (±{m['own_error_pct']:.1f}%)"
        print(f"  {name:<18} {m['basis']:<34} {m['cv']['method'][:48]}: mean {m['cv']['mape_pct']:.1f}%, median "
              f"{m['cv']['median_abs_pct']:.1f}%, interval x{m['cv']['interval_factors'][0]:.2f}-"
              f"x{m['cv']['interval_factors'][1]:.2f}; {verdict}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _devices(args) -> int:
    from slimx.devices import list_devices, load_device

    if args.action == "microbench":
        return _microbench(args)
    if args.action == "calibrate":
        return _calibrate(args)
    if args.action == "anchor":
        from slimx.anchoring import anchor_command

        return anchor_command(args)
    if args.action == "show":
        if not args.name:
            raise UsageError("slimx devices show", "needs a device name", "e.g. slimx devices show iphone12")
        profile = load_device(args.name)
        print(json.dumps(profile.to_dict(), indent=2) if args.json else _show(profile))
        return 0
    if args.name:
        raise UsageError(f"slimx devices {args.name}", "is not an action", "use 'slimx devices show NAME'")
    profiles = list_devices()
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
        return 0
    rows = [("device", "aliases", "format", "compute units", "peak (best unit)", "mem GB/s")]
    for p in profiles:
        mem = p.memory.get("mem_bandwidth_gbs")
        rows.append((p.name, ", ".join(p.aliases), p.default_format, ", ".join(cu.name for cu in p.compute_units),
                     _best_peak(p), f"{mem:g}" if mem else "-"))
    print(_table(rows))
    return 0


def _best_peak(profile) -> str:
    best = None
    for cu in profile.compute_units:
        for dtype in ("fp32", "fp16", "int8"):
            value = cu.peak(dtype)
            if value is not None and (best is None or value > best[0]):
                unit = "GOPS" if dtype.startswith("int") else "GFLOPS"
                best = (value, f"{cu.name} {value:g} {unit} {dtype}")
    return best[1] if best else "-"


def _show(profile) -> str:
    import dataclasses

    lines = [f"{profile.name}: {profile.display_name}", f"  kind            {profile.kind}",
             f"  aliases         {', '.join(profile.aliases) or '-'}", f"  default format  {profile.default_format}"]
    for key, value in profile.memory.items():
        if not key.endswith("_source"):
            lines.append(f"  {key:<15} {value:g}   [{profile.memory.get(key + '_source', '')}]")
    for cu in profile.compute_units:
        lines.append(f"  unit {cu.name} ({cu.kind}): {cu.description}")
        for key, value in dataclasses.asdict(cu).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"      {key:<24} {value:g}   [{cu.sources.get(key, '')}]")
    for key, value in profile.runtimes.items():
        if not key.endswith("_source"):
            lines.append(f"  runtime {key:<8} {value}")
    for fmt, opts in profile.format_options.items():
        lines.append(f"  {fmt} options  " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    from slimx.devices.estimator import settings_of

    default = profile.estimator_default
    for key, setting in settings_of(profile).items():
        if setting.scaled_from:
            how = f"scaled from {setting.scaled_from}, expected error ±{setting.expected_error_pct:.0f}%"
        elif setting.calibrated:
            rows = setting.fit.get("fit_rows", "?")
            rows = "its family's rows (none of its own)" if rows == 0 else f"{rows} rows"
            how = (f"{setting.model} model fitted on {rows}, expected error ±{setting.expected_error_pct:.0f}%"
                   + (f" ({setting.cv_method})" if setting.cv_method else ""))
        else:
            how = "not calibrated"
        mark = " (default)" if key == default else ""
        lines.append(f"  estimator {key}{mark}: {setting.runtime} on {setting.unit}, {setting.dtype}; {how}")
    return "\n".join(lines)


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _quiet_libraries() -> None:
    """Keep converter chatter off the terminal; --debug shows it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.utils._pytree", "torch.onnx", "onnxscript", "transformers", "absl", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
