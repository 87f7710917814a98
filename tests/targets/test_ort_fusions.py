"""onnxruntime's transformer fusions on the onnx format: what fuses, that the fused graph still matches PyTorch
with padding masks, that dynamic int8 then quantizes the attention (QAttention), and the way back (--no-fuse)."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch

from slimx._core.inputs import sample_inputs
from slimx.cli import main
from slimx.devices import load_device
from slimx.export import load_model
from slimx.export.shapes import at_length
from slimx.targets import CompileOptions, get_target, ort_fusions

FAST = ["--runs", "30", "--warmup", "1", "-q"]


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture
def bert_program(tiny_bert_dir):
    from slimx.export.program import deployment_form, program_of
    from slimx.export.shapes import apply_shape_policy

    loaded = load_model(f"hf:{tiny_bert_dir}", input_shapes=["1x16"])
    loaded.inputs = apply_shape_policy(loaded.inputs, loaded.max_positions, None, None, False)
    return program_of(deployment_form(loaded))


def _cosines(program, artifact, runner, length, seeds=range(6)):
    out, padded = [], 0
    for seed in seeds:
        batch = sample_inputs(at_length(program.inputs, length), seed=seed)
        padded += int(batch[1].sum()) < batch[1].numel()
        with torch.no_grad():
            ref = program.module(*batch).numpy().ravel()
        got = runner.run(artifact, batch)[0].ravel()
        out.append(float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)))
    assert padded, "some of the masks have padding"
    return out


def test_bert_attention_fuses_with_the_mask_as_index_and_matches_pytorch(tmp_path, bert_program):
    target = get_target("onnx")
    artifact = target.compile(bert_program, load_device("host"), CompileOptions(), tmp_path)
    fused = artifact.meta["fusions"]
    assert fused["applied"]["attention"] == 2 and fused["applied"]["attention_mask_index"] == 2, fused
    assert fused["applied"]["skip_layer_normalization"] >= 2 and fused["checked_cosine"] >= 0.99999
    assert fused["applied"]["embed_layer_normalization"] == 1, fused
    ops = _ops(artifact.path)
    assert ops["Attention"] == 2 and ops["Softmax"] == 0 and ops["Erf"] == 0, ops
    # the three lookups, their sum and its LayerNorm are one op reading the ids as int32
    assert ops["EmbedLayerNormalization"] == 1 and ops["Gather"] == 0 and ops["LayerNormalization"] == 0, ops
    for node in onnx.load(str(artifact.path)).graph.node:
        if node.op_type == "Attention":
            assert "qkv_hidden_sizes" not in {a.name for a in node.attribute}
            assert node.input[3] == "slimx_mask_index" and (len(node.input) < 6 or not node.input[5])
    runner = target.runner(threads=1)
    for length in (5, 11, 16):  # padded masks at several lengths of the dynamic axis
        assert min(_cosines(bert_program, artifact, runner, length)) > 0.99999


def test_dynamic_int8_of_the_fused_graph_quantizes_the_attention(tmp_path, bert_program):
    target = get_target("onnx")
    artifact = target.compile(bert_program, load_device("host"), CompileOptions(precision="int8-weights"), tmp_path)
    ops = _ops(artifact.path)
    assert ops["QAttention"] == 2 and ops["Attention"] == 0, ops
    assert ops["QEmbedLayerNormalization"] == 1 and ops["EmbedLayerNormalization"] == 0, ops  # int8 tables
    assert min(_cosines(bert_program, artifact, target.runner(threads=1), 12)) > 0.98


def test_static_int8_and_no_fuse_keep_plain_onnx(tmp_path, bert_program):
    from slimx.targets.onnx import OnnxOptions

    target = get_target("onnx")
    plain = target.compile(bert_program, load_device("host"), CompileOptions(format_options=OnnxOptions(fuse=False)),
                           tmp_path)
    assert plain.meta["fusions"] == {"applied": {}, "skipped": "--no-fuse"}
    assert not any(n.domain == "com.microsoft" for n in onnx.load(str(plain.path)).graph.node)
    assert "static int8" in target._fuse(plain.path, bert_program, "int8")["skipped"]


def test_a_fused_graph_that_disagrees_is_not_kept(tmp_path, bert_program, monkeypatch):
    target = get_target("onnx")
    plain = target.compile(bert_program, load_device("host"), CompileOptions(format_options=target.options(
        {"fuse": False})), tmp_path)
    before = plain.path.read_bytes()
    monkeypatch.setattr(ort_fusions, "CHECK_COSINE", 1.5)  # no graph can agree this well: the check must refuse
    record = ort_fusions.fuse_for_onnxruntime(plain.path, [sample_inputs(bert_program.inputs, seed=1)],
                                              mask_input="attention_mask")
    assert record["applied"] == {} and "kept unfused" in record["skipped"]
    assert plain.path.read_bytes() == before, "the unfused file is left as it was"
    assert not list(tmp_path.glob(".*partial")), "no temporary file is left behind"


def test_an_embedding_fusion_that_disagrees_is_dropped_alone(tmp_path, bert_program, monkeypatch):
    target = get_target("onnx")
    plain = target.compile(bert_program, load_device("host"), CompileOptions(format_options=target.options(
        {"fuse": False})), tmp_path)
    real = ort_fusions._embed_layer_norm

    def off_by_one_position(model):  # a wrong fusion: every position takes the next position's row
        fused = real(model)
        table = model.graph.initializers["slimx_position_plus_type"]
        import onnx_ir as ir

        table.const_value = ir.tensor(np.roll(table.const_value.numpy(), -1, axis=0))
        return fused

    monkeypatch.setattr(ort_fusions, "_embed_layer_norm", off_by_one_position)
    record = ort_fusions.fuse_for_onnxruntime(plain.path, [sample_inputs(bert_program.inputs, seed=1)],
                                              mask_input="attention_mask")
    assert "embed_layer_normalization" not in record["applied"] and record["applied"]["attention"] == 2, record
    assert "embedding fusion differed" in record["notes"][0] and record["checked_cosine"] >= 0.99999
    ops = _ops(plain.path)
    assert ops["Attention"] == 2 and ops["EmbedLayerNormalization"] == 0 and ops["Gather"] >= 2, ops


def test_the_embedding_pattern_is_only_fused_where_positions_count_from_zero():
    import onnx_ir as ir

    def sliced(values, start):
        data = ir.Value(name="d", const_value=ir.tensor(np.asarray(values, np.int64)))
        starts = ir.Value(name="s", const_value=ir.tensor(np.asarray([start], np.int64)))
        ends = ir.Value(name="e")
        axes = ir.Value(name="a", const_value=ir.tensor(np.asarray([1], np.int64)))
        return ir.node("Slice", inputs=[data, starts, ends, axes]).outputs[0]

    assert ort_fusions._is_positions(sliced([list(range(8))], 0))
    assert not ort_fusions._is_positions(sliced([list(range(8))], 2))  # positions from 2: not what the op assumes
    assert not ort_fusions._is_positions(sliced([[0, 1, 2, 4]], 0))
    zeros = ir.Value(name="z", const_value=ir.tensor(np.zeros((1, 8), np.int64)))
    gathered = ir.node("GatherElements", inputs=[zeros, sliced([list(range(8))], 0)]).outputs[0]
    assert ort_fusions._all_zero(gathered)
    ones = ir.Value(name="o", const_value=ir.tensor(np.ones((1, 8), np.int64)))
    assert not ort_fusions._all_zero(ir.node("GatherElements", inputs=[ones, gathered]).outputs[0])


def test_cli_no_fuse_and_its_refusal_for_other_formats(tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "o"
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x16", "--out", str(out), *FAST]) == 0
    assert "onnxruntime fusions Attention x2" in capsys.readouterr().out
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x16", "--out", str(out), "--no-fuse",
                 *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["compile"]["fusions"]["skipped"] == "--no-fuse" and report["config"]["no_fuse"] is True
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x16", "--target", "pixel7", "--no-fuse",
                 "--out", str(tmp_path / "t"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--no-fuse" in err and "tflite" in err and len(err.strip().splitlines()) == 1
