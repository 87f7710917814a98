"""The numerical pre-flight: fp16 hazards found in the exported program with their module paths, fixed without
changing the model's meaning, and the fp16 parity predicted for formats that cannot run here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimx._core.inputs import InputSpec
from slimx.cli import main
from slimx.export.preflight import (
    FP16_POLICIES,
    fix_constants,
    keep_fp32,
    predicted_parity,
    preflight,
    rescale_into_norms,
    run,
    scale_before_norms,
)
from slimx.export.program import Program, export_program
from tests.models import loud_layer_norm, loud_residual_norm, masked_scores


def _program(make):
    model = make()
    example = model.example_inputs()
    specs = [InputSpec(f"x{i}", tuple(t.shape)) for i, t in enumerate(example)]
    return Program("t", export_program(model, example), model, specs, ["y"]), model, example


def _batches(example, n=3):
    gen = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for t in example)
            for _ in range(n)]


def test_a_finfo_min_mask_is_found_fixed_and_predicted():
    program, model, example = _program(masked_scores)
    batches = _batches(example)
    found = preflight(program, "coreml", "fp16", batches, synthetic=True)
    constants = [f for f in found["findings"] if f["kind"] == "constant"]
    assert constants and constants[0]["op"] == "mul" and "MaskedScores" in constants[0]["module"]
    assert constants[0]["value"] == pytest.approx(torch.finfo(torch.float32).min)
    before = predicted_parity(program, batches, target_name="coreml")
    assert math.isnan(before["cosine"]) and before["non_finite_outputs"] == len(batches), "0 * -inf is NaN"
    reference = [model(*b) for b in batches]
    changed = fix_constants(program, found["findings"])
    assert [c["to"] for c in changed] == [-1e4]
    fixed = program.exported.module()
    for b, ref in zip(batches, reference, strict=True):
        assert torch.allclose(fixed(*b), ref, atol=1e-6), "the fix keeps the model's meaning in fp32"
    after = predicted_parity(program, batches, target_name="coreml")
    assert after["cosine"] > 0.999 and after["non_finite_outputs"] == 0
    assert not [f for f in preflight(program, "coreml", "fp16", batches, True)["findings"] if f["kind"] == "constant"]
    assert preflight(program, "host", "fp32", batches, True)["findings"] == [], "fp32: no fp16 hazard to report"


def test_an_overflowing_layer_norm_fed_by_a_linear_alone_is_rescaled():
    program, model, example = _program(loud_layer_norm)
    batches = _batches(example)
    found = preflight(program, "coreml", "fp16", batches, synthetic=True)
    (fix,) = rescale_into_norms(program, found["findings"])
    assert fix["producer"] == "proj (Linear)" and fix["divided_by"] >= 2
    fixed = program.exported.module()
    for b in batches:
        assert torch.allclose(fixed(*b), model(*b), atol=1e-5), "a LayerNorm is blind to its input's scale"
    assert model.proj.weight.abs().max() > 40, "the PyTorch module (the parity reference) keeps its weights"
    assert predicted_parity(program, batches, [], target_name="coreml")["cosine"] > 0.9999, "fp16 LayerNorm now"
    assert preflight(program, "coreml", "fp16", batches, True)["findings"] == []


def test_an_overflowing_layer_norm_fed_by_a_residual_is_rescaled_by_one_op_before_it():
    program, model, example = _program(loud_residual_norm)
    batches = _batches(example)
    found = preflight(program, "coreml", "fp16", batches, synthetic=True)
    assert rescale_into_norms(program, found["findings"]) == [], "its input also feeds the residual"
    (fix,) = scale_before_norms(program, found["findings"])
    assert fix["module"] == "norm (LayerNorm)" and fix["divided_by"] >= 2
    assert fix["eps"] == pytest.approx(1e-5 / fix["divided_by"] ** 2), "the eps scaled with the input"
    fixed = program.exported.module()
    (scaled,) = [n for n in fixed.graph.nodes if n.target is torch.ops.aten.mul.Tensor
                 and n.args[1] == 1 / fix["divided_by"]]
    assert [str(u.target) for u in scaled.users] == ["aten.layer_norm.default"], "only the norm reads it"
    for b in batches:
        assert torch.allclose(fixed(*b), model(*b), atol=1e-5), "LN(x / s, eps / s^2) is LN(x, eps)"
    assert predicted_parity(program, batches, [], target_name="coreml")["cosine"] > 0.9999, "fp16 LayerNorm now"
    assert preflight(program, "coreml", "fp16", batches, True)["findings"] == []


def test_fp32_norms_asked_of_a_format_without_per_op_precision_are_rescaled_and_said_so():
    program, _, _ = _program(loud_residual_norm)
    rec = run(program, "onnx", "fp16", None, norms="fp32")
    assert [f["fix"] for f in rec["fixes"]] == ["rescaled before the LayerNorm"] and program.keep_fp32 == []
    assert "no per-op precision" in rec["norms_note"]
    program, _, _ = _program(loud_residual_norm)
    rec = run(program, "tensorrt", "fp16", None, norms="fp32")
    assert [f["fix"] for f in rec["fixes"]] == ["kept in fp32"] and program.keep_fp32 == ["layer_norm"]


def test_an_overflowing_layer_norm_is_found_and_kept_in_fp32():
    program, _, example = _program(loud_residual_norm)
    batches = _batches(example)
    found = preflight(program, "tensorrt", "fp16", batches, synthetic=True)
    (reduction,) = [f for f in found["findings"] if f["kind"] == "reduction"]
    assert reduction["module"] == "norm (LayerNorm)" and reduction["max_square"] > 65504
    keep = keep_fp32(found["findings"])
    assert keep == [reduction["node"]]
    assert predicted_parity(program, batches, target_name="tensorrt")["cosine"] < 0.95
    assert predicted_parity(program, batches, keep, target_name="tensorrt")["cosine"] > 0.9999


@pytest.mark.parametrize("make,target", [(masked_scores, "host"), (loud_layer_norm, "host"),
                                         (loud_layer_norm, "pixel7")])
def test_the_prediction_agrees_with_the_runtimes_here(make, target, tmp_path, capsys):
    """Where a runtime exists the prediction is checked against it: onnxruntime's fp16 clamps constants and keeps
    LayerNorm's accumulation in fp32, LiteRT's fp16 weights run fp32 on the CPU, so neither hazard shows there, and
    the prediction for each says the same."""
    if target == "pixel7":
        pytest.importorskip("ai_edge_litert", reason="LiteRT (ai-edge-litert) not installed")
    name = make.__name__
    code = main(["export", f"tests.models:{name}", "--target", target, "--precision", "fp16", "--no-fp16-fixes",
                 "--out", str(tmp_path / "o"), "-q"])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    capsys.readouterr()
    measured, predicted = report["parity"], report["preflight"]["predicted_parity"]
    assert code == 0 and measured["measured"] and measured["passed"]
    assert FP16_POLICIES[report["target"]["format"]]["constants"] == "clamp" and predicted["passed"]
    assert predicted["cosine"] == pytest.approx(measured["cosine"], abs=1e-4)


@pytest.mark.parametrize("make,target,flags", [(masked_scores, "iphone15pro", []),
                                               (loud_layer_norm, "iphone15pro", []),
                                               (loud_residual_norm, "iphone12", []),
                                               (loud_residual_norm, "jetson-orin-nano", ["--fp16-norms", "fp32"])])
def test_fp16_exports_pass_with_the_fixes_and_fail_without(make, target, flags, tmp_path, capsys):
    """iphone12 converts to the neuralnetwork backend, which has no per-op precision: the residual-fed LayerNorm is
    rescaled in the graph there (the default everywhere); TensorRT keeps it fp32 when asked."""
    name = make.__name__
    code = main(["export", f"tests.models:{name}", "--target", target, "--out", str(tmp_path / "fixed"), "-q",
                 *flags])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "fixed" / "report.json").read_text())
    pre = report["preflight"]
    assert code == 0 and "numerics  pre-flight (fp16" in out and pre["fixes"], out
    assert pre["predicted_parity"]["passed"] and not pre["predicted_parity_without_fixes"]["cosine"] > 0.99
    assert {"on_data", "fresh"} <= set(pre["predicted_parity"]), "predicted on the data and on fresh inputs"
    assert pre["fix_check"]["cosine"] > 0.99999
    if target == "jetson-orin-nano":
        assert "--layerPrecisions=node_layer_norm:fp32" in (tmp_path / "fixed" / "build_engine.sh").read_text()
    if target == "iphone12":
        assert [f["fix"] for f in pre["fixes"]] == ["rescaled before the LayerNorm"]
    code = main(["export", f"tests.models:{name}", "--target", target, "--no-fp16-fixes",
                 "--out", str(tmp_path / "unfixed"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "predicted fp16 parity" in err and "drop --no-fp16-fixes" in err
    assert (tmp_path / "unfixed" / "report.json").is_file(), "the report is kept for a failed verdict"


def test_a_layer_norm_kept_in_fp32_in_the_core_ml_program(tmp_path, capsys):
    coremltools = pytest.importorskip("coremltools")
    assert main(["export", "tests.models:loud_residual_norm", "--target", "iphone15pro", "--fp16-norms", "fp32",
                 "--out", str(tmp_path / "o"), "-q"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["compile"]["kept_fp32"]["ops"] == ["layer_norm"]
    spec = coremltools.utils.load_spec(str(tmp_path / "o" / "model.mlpackage"))
    ops = [op for block in spec.mlProgram.functions["main"].block_specializations.values() for op in block.operations]
    dtypes = {op.type: op.outputs[0].type.tensorType.dataType for op in ops if op.type in ("layer_norm", "linear")}
    fp32, fp16 = coremltools.proto.MIL_pb2.FLOAT32, coremltools.proto.MIL_pb2.FLOAT16
    assert dtypes == {"layer_norm": fp32, "linear": fp16}, "the LayerNorm alone stays fp32 in an fp16 program"


def test_the_fixed_graph_is_what_litert_converts(tmp_path, capsys):
    """LiteRT traces a module again: it is given the fixed graph's, so the rescale before the norm is in the .tflite
    (one MUL more than without the fixes), and parity in LiteRT still compares against the user's own module."""
    pytest.importorskip("ai_edge_litert", reason="LiteRT (ai-edge-litert) not installed")
    ops = {}
    for name, flags in (("fixed", []), ("unfixed", ["--no-fp16-fixes"])):
        assert main(["export", "tests.models:loud_residual_norm", "--target", "pixel7", "--precision", "fp16",
                     "--out", str(tmp_path / name), "-q", *flags]) == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["parity"]["measured"] and report["parity"]["cosine"] > 0.9999
        ops[name] = report["compile"]["ops"]
    capsys.readouterr()
    assert ops["fixed"]["MUL"] == ops["unfixed"]["MUL"] + 1


def test_executorch_half_program_carries_the_fixes(tmp_path, capsys):
    """ExecuTorch's fp16 program is built from the fixed exported graph (its `mask.float()` cast made fp16): the
    finfo.min mask model exports and passes parity in ExecuTorch with the pre-flight's -1e4 (nothing left for the
    half program to clamp); without the fixes the half program clamps the constant itself, and says so."""
    pytest.importorskip("executorch", reason="ExecuTorch not installed")
    records = {}
    for name, flags in (("fixed", []), ("unfixed", ["--no-fp16-fixes"])):
        assert main(["export", "tests.models:masked_scores", "--target", "pixel7", "--format", "executorch",
                     "--precision", "fp16", "--out", str(tmp_path / name), "-q", *flags]) == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["parity"]["measured"] and report["parity"]["cosine"] > 0.999
        records[name] = report["compile"]["quantization"]
    capsys.readouterr()
    assert records["fixed"]["clamped_constants"] is None
    assert records["unfixed"]["clamped_constants"]["count"] == 1
