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
