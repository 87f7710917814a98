"""The ExecuTorch target: .pte files lowered to XNNPACK, run, proved and profiled in ExecuTorch's own runtime."""

from __future__ import annotations

import pytest

pytest.importorskip("executorch", reason="executorch is not installed (the optional extra slimx-edge[executorch])")

import numpy as np
import torch

from slimx._core.inputs import InputSpec, sample_inputs
from slimx.devices import load_device
from slimx.export import ParityTolerance, Program, check_parity, export_program, torch_outputs
from slimx.targets import CompileOptions, get_target, target_for_path


class QuietNorm(torch.nn.Module):
    """BERT's LayerNorm (eps 1e-12) fed small values (about 0.1): ExecuTorch 1.5.1's portable layer_norm in fp16
    turns it into inf (and is off by about 4 on unit-scale inputs), PyTorch's half LayerNorm does not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 256)
        self.norm = torch.nn.LayerNorm(256, eps=1e-12)
        self.head = torch.nn.Linear(256, 8)
        with torch.no_grad():
            self.fc.weight.mul_(0.3)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


def _program(module, specs, names=("y",)):
    from slimx.export.shapes import export_example

    module = module.eval()
    return Program("m", export_program(module, export_example(specs), specs), module, specs, list(names))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 2-layer BERT with a dynamic sequence axis (2..32), as `slimx export hf:DIR` builds it."""
    from slimx.export import load_model, to_deployment
    from slimx.export.shapes import export_example
    from tests.models import make_tiny_bert_dir

    folder = make_tiny_bert_dir(tmp_path_factory.mktemp("et-bert"))
    loaded = load_model(f"hf:{folder}", input_shapes=["1x16"])
    specs = [InputSpec(s.name, s.shape, s.dtype, s.kind, s.low, s.high, dynamic=((1, 2, 32),)) for s in loaded.inputs]
    module, _ = to_deployment(loaded.module, export_example(specs))
    return Program("bert", export_program(module, export_example(specs), specs), module, specs, loaded.output_names)


def _parity(artifact, program, precision, lengths=(5, 32), calib=None):
    from slimx.export.shapes import at_length
    from slimx.quant import DEFAULT_TOLERANCE

    runner = get_target("executorch").runner(threads=1)
    session = runner.session(artifact.path)
    batches = calib or [sample_inputs(at_length(program.inputs, n), seed=1000 + n) for n in lengths]
    tol = ParityTolerance(*DEFAULT_TOLERANCE[precision])
    return check_parity(lambda b: torch_outputs(program.module, b),
                        lambda b: runner.run(artifact, b, session=session), batches, runner.name, tol)


def test_a_dynamic_bert_runs_at_every_length_and_its_portable_ops_are_named(bert, tmp_path):
    target = get_target("executorch")
    coverage = target.check(bert)
    assert coverage.ok and coverage.supported.get("aten.linear.default", 0) >= 12  # 2 layers x 6 linears
    assert coverage.fallback.get("aten.native_layer_norm.default", 0) >= 5  # XNNPACK takes no LayerNorm here
    assert "LayerNorm" in coverage.where["aten.native_layer_norm.default"]
    assert any("portable kernels" in n for n in coverage.notes)
    artifact = target.compile(bert, load_device("pixel7"), CompileOptions(), tmp_path)
    assert artifact.path.name == "model.pte" and target_for_path(artifact.path) is target
    assert target.verify_file(artifact.path) is None
    assert artifact.meta["delegate_calls"] > 0 and artifact.meta["portable_ops"]["aten.native_layer_norm.default"]
    assert artifact.meta["io"]["inputs"][0]["max_shape"] == [1, 32]  # memory planned for the bound
    result = _parity(artifact, bert, "fp32", lengths=(2, 7, 32))
    assert result.passed and result.cosine > 0.99999, result
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\0" * 64)
    assert "corrupt" in target.verify_file(bad)


def test_the_runner_times_and_profiles_per_op_from_etdump(bert, tmp_path):
    target = get_target("executorch")
    artifact = target.compile(bert, load_device("host"), CompileOptions(), tmp_path)
    timing = target.runner(threads=1).time(artifact, sample_inputs(bert.inputs, seed=3), warmup=1, runs=5)
    assert timing.runtime == "executorch" and timing.runs == 5 and timing.median_ms > 0
    ops = {e["op"]: e for e in timing.per_op}
    gemm = [op for op in ops if op.startswith("xnnpack: Fully Connected")]
    assert gemm and ops[gemm[0]]["count"] >= 1, ops
    assert "portable: native_layer_norm.out" in ops  # the op the coverage check names, timed where it runs
    assert not any("Method::" in op for op in ops)  # the method's own span is not an op
    assert abs(sum(e["share"] for e in timing.per_op) - 1) < 0.01


@pytest.mark.parametrize("precision", ["int8-weights", "int8"])
def test_int8_through_the_xnnpack_quantizer(bert, tmp_path, precision):
    from slimx.export.shapes import at_length

    calib = [sample_inputs(at_length(bert.inputs, n), seed=200 + n) for n in (4, 9, 16, 16, 24, 30)]
    artifact = get_target("executorch").compile(bert, load_device("pixel7"), CompileOptions(precision=precision),
                                                tmp_path, calib_batches=calib)
    record = artifact.meta["quantization"]
    assert record["scheme"] == ("pt2e-dynamic" if precision == "int8-weights" else "pt2e-static")
    assert "linear and convolution layers" in record["method"]
    if precision == "int8":
        assert record["calibration_samples"] == 6 and record["guard"]["rounds"]
    result = _parity(artifact, bert, precision, lengths=(6, 20))
    assert result.passed, result


def test_fp16_keeps_layer_norm_in_fp32_where_the_portable_kernel_would_overflow(tmp_path):
    """ExecuTorch's portable layer_norm in fp16 is wrong here: without the fp32 LayerNorm this model fails parity
    with non-finite outputs, which parity scores as a failure (cosine 0), not as a pass."""
    from slimx.quant.executorch import _graph_layer_norms_in_fp32

    specs = [InputSpec("x", (2, 16), dynamic=((0, 1, 4),))]
    program = _program(QuietNorm(), specs)
    target = get_target("executorch")
    artifact = target.compile(program, load_device("pixel7"), CompileOptions(precision="fp16"), tmp_path)
    assert artifact.meta["quantization"]["kept_fp32"]["modules"] == ["norm"]
    assert artifact.meta["io"]["inputs"][0]["dtype"] == "float16"  # the runner casts fp32 inputs to it
    result = _parity(artifact, program, "fp16", calib=[sample_inputs(specs, seed=s) for s in (1, 2)])
    assert result.passed, result
    # the same program in half precision without the fp32 LayerNorm: the failure parity now catches
    import copy

    half = copy.deepcopy(program.module).half()
    assert _graph_layer_norms_in_fp32(copy.deepcopy(program.graph_module()).half()) == ["norm"]  # it finds it
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    x = torch.randn(2, 16).half()
    raw = to_edge_transform_and_lower(torch.export.export(half, (x,)), partitioner=[XnnpackPartitioner()])
    (tmp_path / "raw.pte").write_bytes(raw.to_executorch().buffer)
    from slimx.targets.base import Artifact

    plain = Artifact("executorch", tmp_path / "raw.pte", specs, ["y"])
    got = target.runner(threads=1).run(plain, (x.float(),))[0]
    assert not np.isfinite(got).all()
    bad = _parity(plain, program, "fp16", calib=[(x.float(),)])
    assert not bad.passed and bad.cosine == 0.0 and bad.per_output[0]["non_finite"] > 0


def test_estimates_carry_over_from_the_litert_setting_with_the_transfer_stated(tmp_path):
    import slimx

    specs = ["2x16"]
    result = slimx.export("tests.models:tiny_mlp", "pixel7", format="executorch", out=tmp_path / "p7",
                          shapes={"input_shapes": specs})
    latency = result.report.to_dict()["latency"]
    assert latency["kind"] == "estimated" and "same kernels" in latency["transfer"]
    assert "tflite-cpu-fp32" in latency["label"]
    assert "executorch estimated from the device's LiteRT" in latency["label"]
    phone = slimx.export("tests.models:tiny_mlp", "iphone12", format="executorch", out=tmp_path / "ip",
                         shapes={"input_shapes": specs})
    text = phone.report.to_dict()["latency"]
    assert "no estimator setting for executorch or for tflite" in text["reason"]


def test_the_gate_estimates_an_executorch_entry_with_the_litert_setting_and_says_so(capsys):
    import json

    from slimx.cli import main

    model = ["gate", "timm:mobilenetv2_050", "--format", "executorch", "--budget-ms", "50", "--json", "-q"]
    assert main([*model, "--device", "pixel7"]) == 0
    entry = json.loads(capsys.readouterr().out)["entries"][0]
    assert entry["kind"] == "estimated" and "same kernels" in entry["candidate"]["transfer"]
    assert entry["candidate"]["setting"] == "tflite-cpu-fp32"
    assert any(w.startswith("executorch estimated from the device's LiteRT") for w in entry["warnings"])
    assert main([*model, "--device", "iphone12"]) == 2  # no LiteRT setting to carry over: one line, usage
    assert "no estimator setting for executorch or for tflite" in capsys.readouterr().err


def test_unmasked_attention_lowers_without_the_safe_softmax_guards(tmp_path):
    """A ViT block's SDPA (no mask) as plain softmax: none of the guard ops XNNPACK cannot take is left to the
    portable kernels, and the values are the same."""
    from slimx.targets.executorch import _lower, delegation, plain_attention
    from tests.models import tiny_vit_block

    module = tiny_vit_block().eval()
    specs = [InputSpec("x", tuple(module.example_inputs()[0].shape))]
    program = _program(module, specs)
    guards = {"aten.where.self", "aten.any.dim", "aten.logical_not.default", "aten.eq.Scalar"}
    coverage = get_target("executorch").check(program)
    assert not guards & set(coverage.fallback), coverage.fallback
    assert plain_attention(program.exported) is not program.exported
    artifact = get_target("executorch").compile(program, load_device("pixel7"), CompileOptions(), tmp_path)
    assert _parity(artifact, program, "fp32", calib=[sample_inputs(specs, seed=s) for s in (1, 2)]).passed

    # a masked attention keeps the default decomposition (a fully masked row must give 0, not NaN)
    class Masked(torch.nn.Module):
        def forward(self, q, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    masked = _program(Masked(), [InputSpec("q", (1, 2, 4, 8)), InputSpec("mask", (1, 1, 4, 4), "bool", "mask")])
    assert plain_attention(masked.exported) is masked.exported
    _, left = delegation(_lower(masked.exported))
    assert guards & set(left)
