"""Shapes in the input spec: dynamic sequence axes for text models by default, --seq-len / --batch / --static,
symbolic dimensions in the ONNX, parity and latency at several lengths (issue 11, ONNX and TensorRT part)."""

from __future__ import annotations

import json

import pytest

from slimx._core.errors import UsageError
from slimx._core.inputs import InputSpec
from slimx.cli import main
from slimx.export.shapes import apply_shape_policy, dynamic_shapes, parse_range

IDS = InputSpec("input_ids", (1, 128), "int64", "tokens", 0, 100)
MASK = InputSpec("attention_mask", (1, 128), "int64", "mask")
FAST = ["--runs", "30", "--warmup", "1", "-q"]


def test_text_models_get_a_dynamic_sequence_axis_by_default():
    specs = apply_shape_policy([IDS, MASK], max_positions=512)
    assert [s.dynamic for s in specs] == [((1, 1, 512),)] * 2 and specs[0].shape == (1, 128)
    narrowed = apply_shape_policy([IDS, MASK], max_positions=512, seq_len="8..64")
    assert narrowed[0].dynamic == ((1, 8, 64),) and narrowed[0].shape == (1, 64), "export shape clamped into range"
    assert apply_shape_policy([IDS, MASK], 512, static=True) == [IDS, MASK]
    both = apply_shape_policy([IDS, MASK], 512, batch="1..4")
    assert both[0].dynamic == ((0, 1, 4), (1, 1, 512))
    dims = dynamic_shapes(both)
    assert dims[0][1] is dims[1][1] and dims[0][0] is dims[1][0], "one Dim per named axis, shared by the inputs"


@pytest.mark.parametrize("kwargs,needle", [
    ({"seq_len": "1..1000"}, "past the model's 512 positions"),
    ({"seq_len": "64..8"}, "not a range of sizes"),
    ({"seq_len": "8..64", "static": True}, "--static"),
    ({"seq_len": "8..64", "shape_given": True}, "exports at length 128, outside the range 8..64"),
    ({"batch": "2..4", "shape_given": True}, "exports at batch 1, outside the range 2..4"),
])
def test_bad_shape_requests_are_usage_errors(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        apply_shape_policy([IDS, MASK], 512, **kwargs)
    with pytest.raises(UsageError, match="applies to text models"):
        apply_shape_policy([InputSpec("x", (1, 3, 8, 8))], None, seq_len="1..4")
    assert parse_range("2..9", "--batch") == (2, 9)
    inside = apply_shape_policy([IDS, MASK], 512, seq_len="8..128", batch="1..2", shape_given=True)
    assert inside[0].shape == (1, 128) and inside[0].dynamic == ((0, 1, 2), (1, 8, 128)), "a given shape inside"


def _onnx_input_dims(path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]


def test_text_model_exports_a_dynamic_onnx_with_parity_and_latency_over_lengths(tmp_path, capsys, tiny_bert_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat\nhello world\na dog and a cat and a bird\n")
    out = tmp_path / "o"
    code = main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", "--calib", str(calib), "--out", str(out),
                 *FAST])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shapes"]["form"] == "dynamic"
    assert {(d["input"], d["axis"], d["min"], d["max"]) for d in report["shapes"]["dynamic"]} == {
        ("input_ids", 1, 1, 64), ("attention_mask", 1, 1, 64)}
    dims = _onnx_input_dims(out / "model.onnx")
    assert dims[0][0] == 1 and isinstance(dims[0][1], str) and dims[0][1] == dims[1][1], dims
    parity = report["parity"]
    assert parity["passed"] and {p["size"] for p in parity["per_shape"]} >= {1, 8, 64}
    assert all(p["passed"] and p["cosine"] > 0.9999 for p in parity["per_shape"])
    over = report["latency"]["over_lengths"]
    assert over["lengths"][0]["length"] == 1 and over["lengths"][-1]["length"] == 64
    assert over["on_data"]["samples"] == 3 and over["on_data"]["median_ms"] > 0
    assert "on your data (3 samples" in printed
    # the bare file profiles at the same lengths: its symbolic sequence axis reads as dynamic
    assert main(["profile", str(out / "model.onnx"), "--runs", "30", "--json"]) == 0
    profiled = json.loads(capsys.readouterr().out)["over_lengths"]
    assert profiled["lengths"][0]["length"] == 1 and len(profiled["lengths"]) == 5

    static = tmp_path / "s"
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", "--static", "--out", str(static),
                 *FAST]) == 0
    assert _onnx_input_dims(static / "model.onnx") == [[1, 32], [1, 32]]
    assert json.loads((static / "report.json").read_text())["shapes"] == {"form": "static", "dynamic": [],
                                                                          "why": "--static"}


def test_tensorrt_script_carries_the_shape_profile(tmp_path, capsys, tiny_bert_dir):
    out = tmp_path / "j"
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", "--target", "jetson-orin-nano",
                 "--opt-len", "12", "--out", str(out), *FAST]) == 0
    script = (out / "build_engine.sh").read_text()
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in script
    assert "--optShapes=input_ids:1x12,attention_mask:1x12" in script
    assert "--maxShapes=input_ids:1x64,attention_mask:1x64" in script
    assert json.loads((out / "report.json").read_text())["parity"]["proxy"]["passed"]


def test_dynamic_batch_on_a_vision_model(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["export", "tests.models:tiny_vit_block", "--batch", "1..8", "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert _onnx_input_dims(out / "model.onnx")[0][0] != 1
    sizes = {(p["axis"], p["size"]): p["passed"] for p in report["parity"]["per_shape"]}
    assert sizes == {("batch", 1): True, ("batch", 8): True}


def test_a_model_that_fixes_the_axis_is_one_clear_failure():
    import torch

    from slimx._core.errors import SlimxFailure
    from slimx.export.program import export_program

    class FixedLength(torch.nn.Module):
        def forward(self, ids, mask):
            return ids.float().view(1, 16).sum(-1, keepdim=True) * mask.float().sum()

    specs = apply_shape_policy([IDS.with_shape((1, 16)), MASK.with_shape((1, 16))], max_positions=64)
    example = (torch.ones(1, 16, dtype=torch.int64), torch.ones(1, 16, dtype=torch.int64))
    with pytest.raises(SlimxFailure, match=r"dynamic seq axis: the model fixes it.*--static"):
        export_program(FixedLength(), example, specs)
