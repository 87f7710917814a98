"""Quantization as a stage with a config: strict QuantConfig, handlers by (format, scheme), the config recorded
as data, a recipe's [quant] table reaching the artifact."""

from __future__ import annotations

import json

import pytest

from slimx._core.config import config_from_dict
from slimx._core.errors import UsageError
from slimx.cli import main
from slimx.quant import QUANTIZERS, QuantConfig, quantizer_for, schemes
from slimx.targets import all_targets


def test_config_is_strict_and_validates_itself():
    with pytest.raises(UsageError, match="unknown option"):
        config_from_dict(QuantConfig, {"precision": "int8", "bits": 4}, "[quant]")
    with pytest.raises(UsageError, match="target_cosine"):
        config_from_dict(QuantConfig, {"precision": "int8", "target_cosine": 1.5}, "[quant]")
    with pytest.raises(UsageError, match="not a regular expression"):
        config_from_dict(QuantConfig, {"precision": "int8", "keep_float": ["("]}, "[quant]")
    cfg = config_from_dict(QuantConfig, {"precision": "int8", "keep_float": ["fc2$"], "guard_rounds": "2"}, "q")
    assert cfg.keep_float == ("fc2$",) and cfg.guard_rounds == 2
    assert cfg.to_dict()["keep_float"] == ["fc2$"]


def test_every_format_has_a_default_handler_per_precision_it_builds():
    built = {"onnx": ("fp16", "int8-weights", "int8"), "tensorrt": ("int8",),
             "tflite": ("fp32", "fp16", "int8-weights", "int8"),
             "coreml-neuralnetwork": ("fp32", "fp16", "int8-weights"),
             "coreml-mlprogram": ("fp32", "fp16", "int8-weights", "int8"),
             "executorch": ("fp32", "fp16", "int8-weights", "int8")}
    for fmt, precisions in built.items():
        for precision in precisions:
            assert quantizer_for(fmt, QuantConfig(precision=precision)).precision == precision
    assert {q.format for q in map(QUANTIZERS.get, QUANTIZERS.names())} == set(built)
    assert {t.name for t in all_targets()} >= {"onnx", "tensorrt", "tflite"}
    with pytest.raises(UsageError, match="not a int8 scheme of onnx"):
        quantizer_for("onnx", QuantConfig(precision="int8", scheme="dynamic"))
    assert [q.scheme for q in schemes("onnx", "int8")] == ["static-qdq"]


def test_recipe_quant_table_reaches_the_artifact(tmp_path, capsys):
    """keep_float and the guard's target come from the recipe; the report records the config as data."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('version = 1\n\n[quant]\nprecision = "int8"\nkeep_float = ["fc2$"]\ntarget_cosine = 0.9\n')
    out = tmp_path / "o"
    code = main(["export", "tests.models:tiny_mlp", "--recipe", str(recipe), "--out", str(out), "--runs", "30",
                 "--warmup", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    quant = report["compile"]["quantization"]
    assert report["target"]["precision"] == "int8" and quant["scheme"] == "static-qdq"
    assert quant["config"]["keep_float"] == ["fc2$"] and quant["config"]["target_cosine"] == 0.9
    assert "fc2" in quant["kept_float"]["modules"], quant["kept_float"]
    assert report["passes"] == [] and "compression" not in report

    bad = tmp_path / "bad.toml"
    bad.write_text('[quant]\nprecision = "int8"\nscheme = "pt2e-static"\n')
    code = main(["export", "tests.models:tiny_mlp", "--recipe", str(bad), "--out", str(tmp_path / "b"), "-q"])
    assert code == 2 and "not a int8 scheme of onnx" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
