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

from slimx._core.errors import SlimxFailure, UsageError
from slimx._core.inputs import InputSpec, sample_inputs


def evaluate(out_dir: str | Path, against: str, data: str | Path, samples: int = 64, runs: int = 30,
             weights: str | None = None, labels: str | Path | None = None) -> dict:
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
    report = json.loads(report_path.read_text())
    fmt = report["target"]["format"]
    target = get_target(fmt)
    runner = target.runner()
    if runner is None:
        raise SlimxFailure(f"slimx eval of a {fmt} artifact", target.runner_missing_reason(),
                           "evaluate it on a host with that runtime")
    primary = out_dir / report["artifacts"][0]["path"]
    specs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i["kind"], *(i.get("range") or (0, 2)))
             for i in report["model"]["inputs"]]
    artifact = Artifact(fmt, primary, specs, report["model"]["outputs"], meta=report.get("compile") or {})
    shapes = [f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in specs]
    original = load_model(against, weights=weights, input_shapes=shapes)
    calib = load_calibration(data, original, limit=samples, seed=0)
    label_list = None
    if labels is not None:
        label_list = [int(x) for x in Path(labels).read_text().split()]
        if len(label_list) < len(calib.batches):
            raise UsageError(f"--labels {labels}", f"has {len(label_list)} labels for {len(calib.batches)} samples",
                             "give one integer label per sample, in the data's order")
    session = runner.session(primary)
    got = [runner.run(artifact, b, session=session)[0] for b in calib.batches]
    example = original.example_inputs or sample_inputs(original.inputs, seed=0)
    base_module, _ = to_deployment(original.module, example)
    ref = [torch_outputs(base_module, b)[0] for b in calib.batches]
    result = {"artifact": str(primary), "format": fmt, "against": against, "data": calib.describe(),
              "fidelity": fidelity(ref, got, label_list)}
    tmp = Path(tempfile.mkdtemp(prefix="slimx-eval-"))
    try:
        device = load_device(report["device"]["name"])
        program = Program(original.name, export_program(base_module, example), base_module, original.inputs,
                          original.output_names)
        baseline = target.compile(program, device, CompileOptions(precision="fp32"), tmp)
        inputs = calib.batches[0]
        base_ms, comp_ms = [], []
        for _ in range(2):
            base_ms.append(runner.time(baseline, inputs, warmup=3, runs=runs).median_ms)
            comp_ms.append(runner.time(artifact, inputs, warmup=3, runs=runs).median_ms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base, comp = min(base_ms), min(comp_ms)
    result["latency"] = {"runtime": runner.name, "original_fp32_median_ms": round(base, 4),
                         "artifact_median_ms": round(comp, 4), "ratio": round(base / comp, 3),
                         "method": "best of 2 interleaved rounds of medians, same run and runtime"}
    return result


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
