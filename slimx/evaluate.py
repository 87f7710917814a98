"""``slimx eval``: an exported artifact against the original model on real data.

Fidelity: the artifact (in its own runtime) and the original PyTorch model on every sample; output
cosine, nearest-neighbour agreement for embeddings, accuracy with labels. Speed: the original is
compiled to the same format (fp32) and both are timed in the same run and runtime, interleaved.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from slimx._core.errors import SlimxFailure, UsageError, first_line
from slimx._core.inputs import InputSpec, sample_inputs
from slimx.export.shapes import seq_range_of


def evaluate(out_dir: str | Path, against: str | None, data: str | Path, samples: int = 64, runs: int = 30,
             weights: str | None = None, labels: str | Path | None = None, truncate: bool = False) -> dict:
    from slimx.devices import load_device
    from slimx.export import export_program, load_calibration, load_model, to_deployment, torch_outputs
    from slimx.export.program import Program
    from slimx.slim import fidelity
    from slimx.targets import Artifact, CompileOptions, get_target

    out_dir = Path(out_dir)
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        raise UsageError(f"slimx eval {out_dir}", "has no report.json",
                         "point at the OUT folder of a 'slimx export' run")
    try:
        report = json.loads(report_path.read_text())
        report["target"]["format"], report["artifacts"][0]["path"], report["model"]["inputs"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise UsageError(f"slimx eval {out_dir}", f"its report.json is not a slimx export report ({first_line(exc)})",
                         "re-run slimx export into that folder") from None
    against, weights = original_of(report, against, weights)
    fmt = report["target"]["format"]
    target = get_target(fmt)
    runner = target.runner()
    if runner is None:
        raise SlimxFailure(f"slimx eval of a {fmt} artifact", target.runner_missing_reason(),
                           "evaluate it on a host with that runtime")
    primary = out_dir / report["artifacts"][0]["path"]
    specs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i["kind"], *(i.get("range") or (0, 2)),
                       dynamic=tuple((d["axis"], d["min"], d["max"]) for d in i.get("dynamic", ())))
             for i in report["model"]["inputs"]]
    artifact = Artifact(fmt, primary, specs, report["model"]["outputs"], meta=report.get("compile") or {})
    shapes = [f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in specs]
    original = load_model(against, weights=weights, input_shapes=shapes)
    original.inputs = specs  # the artifact's shape form (dynamic axes), so the baseline is built the same way
    calib = load_calibration(data, original, limit=samples, seed=0, flag="--data", truncate=truncate)
    label_list = None
    if labels is not None:
        label_list = [int(x) for x in Path(labels).read_text().split()]
        if len(label_list) < len(calib.batches):
            raise UsageError(f"--labels {labels}", f"has {len(label_list)} labels for {len(calib.batches)} samples",
                             "give one integer label per sample, in the data's order")
    example = original.example_inputs or sample_inputs(original.inputs, seed=0)
    if any(s.dynamic for s in specs):
        from slimx.export.shapes import export_example

        example = export_example(specs)
    base_module, _ = to_deployment(original.module, example)
    program = Program(original.name, export_program(base_module, example, specs=specs), base_module, specs,
                      original.output_names)
    batches = calib.batches
    if seq_range_of(specs) is not None:  # text as users send it: each sample at its real length
        from slimx.export.shapes import at_real_lengths

        batches = at_real_lengths(batches, program.input_names)
    session = runner.session(primary)
    got = [runner.run(artifact, b, session=session)[0] for b in batches]
    ref = [torch_outputs(base_module, b)[0] for b in batches]
    result = {"artifact": str(primary), "format": fmt, "against": against, "data": calib.describe(),
              "fidelity": fidelity(ref, got, label_list)}
    tmp = Path(tempfile.mkdtemp(prefix="slimx-eval-"))
    try:
        device = load_device(report["device"]["name"])
        buckets = tuple((report.get("shapes") or {}).get("buckets") or ())
        baseline = target.compile(program, device, CompileOptions(precision="fp32", buckets=buckets), tmp)
        from slimx.devices.timing import paired_over_data

        base, comp = paired_over_data(runner, baseline, artifact, batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    where = "each sample at its real length" if seq_range_of(specs) is not None else "each sample"
    result["latency"] = {"runtime": runner.name, "original_fp32_median_ms": round(base, 4),
                         "artifact_median_ms": round(comp, 4), "ratio": round(base / comp, 3),
                         "method": f"mean ms per sample over the data ({where}), best of 3 interleaved rounds, "
                                   "same run and runtime"}
    return result


def original_of(report: dict, against: str | None, weights: str | None) -> tuple[str, str | None]:
    """The original to compare against: the export's own model and weights (from its report) unless
    ``against`` names another; the export's model without the weights it was exported with is refused (the
    comparison would be against a different network)."""
    config = report.get("config") or {}
    model, used = config.get("model"), config.get("weights")
    if against is None:
        if not model:
            raise UsageError("slimx eval", "the report does not record the model it was exported from",
                             "name the original with --against MODEL")
        against = model
    if against == model and used and weights is None:
        if not Path(used).is_file():
            raise UsageError(f"--against {against}", f"the export loaded weights from {used}, which is not there now",
                             "give the same weights with --weights FILE")
        weights = used
    elif against == model and used and Path(weights).resolve() != Path(used).resolve():
        raise UsageError(f"--weights {weights}", f"the export was made with {used}",
                         "give the export's own weights, or drop --weights to use them")
    return against, weights


def summary(result: dict) -> str:
    fid, lat = result["fidelity"], result["latency"]
    lines = [f"slimx eval: {result['artifact']} ({result['format']}) against {result['against']}",
             f"  data      {result['data']}",
             f"  fidelity  cosine mean {fid['cosine_mean']:.4f}, min {fid['cosine_min']:.4f}"
             + (f", nearest-neighbour agreement {fid['nn_agreement']:.3f}" if "nn_agreement" in fid else "")
             + (f", accuracy {fid['accuracy']:.3f} (original {fid['accuracy_reference']:.3f})" if "accuracy" in fid
                else ""),
             f"  latency   original {lat['original_fp32_median_ms']:.3f} ms, "
             f"artifact {lat['artifact_median_ms']:.3f} ms: {lat['ratio']:.2f}x ({lat['runtime']})"]
    return "\n".join(lines)
