"""ONNX dynamic int8: per-channel weight scales only where a weight loses too much per tensor."""

from __future__ import annotations

import numpy as np
import torch

from slimx._core.inputs import InputSpec, sample_inputs
from slimx.devices import load_device
from slimx.export.program import Program, export_program
from slimx.quant import QuantConfig
from slimx.targets import CompileOptions, get_target
from tests.models import TinyMLP, seeded


def test_only_the_weight_with_outliers_gets_per_channel_scales(tmp_path):
    seeded(0)
    model = TinyMLP(64, 256, 64).eval()
    with torch.no_grad():
        model.fc2.weight[3, :8] *= 400  # a few outlier weights: per tensor, the rest of the matrix rounds away
    x = (torch.randn(1, 4, 64),)  # tokens: the linears export as MatMul (onnxruntime quantizes Gemm statically only)
    program = Program("mlp", export_program(model, x), model, [InputSpec("x", (1, 4, 64))], ["y"])
    target = get_target("onnx")
    options = CompileOptions(precision="int8-weights", quant=QuantConfig(precision="int8-weights"))
    artifact = target.compile(program, load_device("host"), options, tmp_path)
    record = artifact.meta["quantization"]
    assert len(record["per_channel_nodes"]) == 1 and "1 of 2 MatMul weights" in record["method"], record
    assert next(iter(record["per_channel_nodes"].values())) < 25
    inputs = sample_inputs(program.inputs, seed=2)
    got = target.runner(threads=1).run(artifact, inputs)[0]
    ref = model(*inputs).detach().numpy()
    got, ref = got.ravel(), ref.ravel()
    cosine = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cosine > 0.99, cosine

    everywhere = CompileOptions(precision="int8-weights", quant=QuantConfig(precision="int8-weights",
                                                                             per_channel_below_db=None))
    (tmp_path / "all").mkdir()
    plain = target.compile(program, load_device("host"), everywhere, tmp_path / "all")
    assert "per_channel_nodes" not in plain.meta["quantization"] and "per-channel" in \
        plain.meta["quantization"]["method"]


def _bert_program(tiny_bert_dir):
    from slimx.export import load_model, to_deployment

    loaded = load_model(f"hf:{tiny_bert_dir}", input_shapes=["1x16"])
    example = sample_inputs(loaded.inputs, seed=0)
    module, _ = to_deployment(loaded.module, example)
    return Program(loaded.name, export_program(module, example), module, loaded.inputs, loaded.output_names)


def _cosine(artifact, program, seed: int) -> float:
    inputs = sample_inputs(program.inputs, seed=seed)
    got = get_target("onnx").runner(threads=1).run(artifact, inputs)[0].ravel()
    ref = program.module(*inputs)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().numpy().ravel()
    return float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))


def test_the_non_vnni_path_chooses_its_weights_by_measured_error_whatever_the_host(tiny_bert_dir, tmp_path):
    from slimx.targets.onnx import OnnxOptions

    program = _bert_program(tiny_bert_dir)
    options = CompileOptions(precision="int8-weights", format_options=OnnxOptions(int8_cpu="avx2"))
    artifact = get_target("onnx").compile(program, load_device("host"), options, tmp_path)
    choice = artifact.meta["quantization"]["weight_choice"]
    assert choice["cpu_kind"] == "avx2" and choice["forced"]
    assert choice["tried"][0]["weights"] == "uint8", "without VNNI, uint8 weights (u8u8 kernels) come first"
    assert choice["chosen"] == {k: choice["tried"][-1][k] for k in ("weights", "reduced_range")}
    assert all(t["cosine"] < choice["floor"] for t in choice["tried"][:-1]), "the first to reach the floor is kept"
    assert _cosine(artifact, program, seed=5) > 0.98


def test_when_no_candidate_reaches_the_floor_the_closest_is_kept(tiny_bert_dir, tmp_path):
    program = _bert_program(tiny_bert_dir)
    options = CompileOptions(precision="int8-weights", quant=QuantConfig(precision="int8-weights", cpu_kind="vnni",
                                                                         target_cosine=1.0))
    artifact = get_target("onnx").compile(program, load_device("host"), options, tmp_path)
    choice = artifact.meta["quantization"]["weight_choice"]
    assert [(t["weights"], t["reduced_range"]) for t in choice["tried"]] == [("int8", False), ("uint8", False),
                                                                              ("int8", True)]
    kept = next(t for t in choice["tried"] if {"weights": t["weights"], "reduced_range": t["reduced_range"]}
                == choice["chosen"])
    assert kept["cosine"] == max(t["cosine"] for t in choice["tried"]), choice
