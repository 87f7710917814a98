import numpy as np
import pytest
import torch

from slimx._core.errors import UsageError
from slimx._core.inputs import sample_inputs
from slimx.devices import load_device
from slimx.export import Program, export_program, load_model
from slimx.targets import CompileOptions, available_formats, get_target
from slimx.targets.onnx import OrtRunner


@pytest.fixture
def vit_program():
    loaded = load_model("tests.models:tiny_vit_block")
    exported = export_program(loaded.module, loaded.example_inputs)
    return Program(loaded.name, exported, loaded.module, loaded.inputs, ["hidden"])


def test_check_reports_supported_ops(vit_program):
    coverage = get_target("onnx").check(vit_program)
    assert coverage.ok and coverage.unsupported == {}
    assert any("linear" in op or "addmm" in op or "mm" in op for op in coverage.supported)


def test_check_flags_an_untranslatable_op_with_its_module():
    loaded = load_model("tests.models:eigh_model")
    program = Program(loaded.name, export_program(loaded.module, loaded.example_inputs), loaded.module,
                      loaded.inputs, ["y"])
    coverage = get_target("onnx").check(program)
    assert not coverage.ok
    assert "aten._linalg_eigh.default" in coverage.unsupported
    assert coverage.where["aten._linalg_eigh.default"].startswith("<root> (Eigh)")


def test_compile_run_and_time(tmp_path, vit_program):
    target = get_target("onnx")
    artifact = target.compile(vit_program, load_device("host"), CompileOptions(), tmp_path)
    assert artifact.path.name == "model.onnx" and artifact.bytes > 10_000 and artifact.meta["opset"] == 18
    runner = target.runner()
    x = sample_inputs(vit_program.inputs, seed=5)
    (got,) = runner.run(artifact, x)
    np.testing.assert_allclose(got, vit_program.module(*x).detach().numpy(), rtol=1e-4, atol=1e-5)
    timing = OrtRunner(threads=1).time(artifact, x, warmup=2, runs=30, profile_runs=3)
    assert timing.runs == 30 and timing.threads == 1
    assert timing.min_ms <= timing.median_ms <= timing.p90_ms <= timing.max_ms
    ops = {o["op"] for o in timing.per_op}
    assert ops & {"MatMul", "Gemm", "FusedMatMul"}, ops
    assert abs(sum(o["share"] for o in timing.per_op) - 1.0) < 0.01
    assert any(n["module"] for n in timing.per_node), "node times map back to module paths"


def test_every_format_is_registered_and_unknown_ones_answer_in_one_line():
    assert available_formats() == ["coreml", "executorch", "onnx", "tensorrt", "tflite"]
    with pytest.raises(UsageError) as info:
        get_target("tfjs")
    assert "unknown format 'tfjs'" in info.value.line() and "\n" not in info.value.line()


def test_artifact_save_copies(tmp_path, vit_program):
    artifact = get_target("onnx").compile(vit_program, load_device("host"), CompileOptions(), tmp_path)
    copy = artifact.save(tmp_path / "copy.onnx")
    assert copy.read_bytes() == artifact.path.read_bytes()
    assert torch.is_tensor(vit_program.module.example_inputs()[0])
