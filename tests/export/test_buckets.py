"""Shape buckets where a format has no usable dynamic axis (issue 11): one .tflite signature per sequence
length, CoreML enumerated shapes (or a bounded range where coremltools allows no enumeration), TensorRT one
optimisation profile per bucket; runners pick the smallest bucket that fits and pad inside it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from slimx._core.errors import SlimxFailure, UsageError
from slimx.cli import main
from slimx.export.shapes import bucket_sizes, fit_to_bucket, pick_bucket

FAST = ["--runs", "30", "--warmup", "1", "-q"]


def _export_with_text(out, bert_dir, device):
    """The tiny BERT exported for ``device`` at 1x32 with three short sentences as calibration text."""
    calib = out.parent / "calib.txt"
    calib.write_text("the cat sat on the mat\nhello world\na dog and a cat and a bird\n")
    assert main(["export", f"hf:{bert_dir}", "--input-shape", "1x32", "--target", device, "--calib", str(calib),
                 "--out", str(out), *FAST]) == 0
    return out


def test_bucket_lists_and_choice():
    assert bucket_sizes(1, 64) == (16, 32, 64)
    assert bucket_sizes(20, 100) == (32, 64, 100), "buckets below the range's minimum are dropped"
    assert bucket_sizes(1, 16) == (16,)
    assert bucket_sizes(1, 64, "48, 8") == (8, 48)
    for bad, needle in (("8,abc", "not a list"), ("8,100", r"\[100\] outside")):
        with pytest.raises(UsageError, match=needle):
            bucket_sizes(1, 64, bad)
    assert pick_bucket(1, (16, 32)) == 16 and pick_bucket(17, (16, 32)) == 32
    with pytest.raises(SlimxFailure, match=r"longer than the artifact's largest bucket.*--truncate"):
        pick_bucket(33, (16, 32))
    assert pick_bucket(33, (16, 32), truncate=True) == 32
    ids = np.arange(5).reshape(1, 5)
    padded, = fit_to_bucket([ids], 8)
    assert padded.tolist() == [[0, 1, 2, 3, 4, 0, 0, 0]]
    assert fit_to_bucket([ids], 3)[0].tolist() == [[0, 1, 2]]


def test_tflite_text_model_gets_one_signature_per_bucket(tmp_path, capsys, tiny_bert_dir):
    from ai_edge_litert.interpreter import Interpreter

    from slimx.targets import get_target
    from slimx.targets.base import Artifact
    from slimx.targets.tflite import LiteRTRunner

    out = _export_with_text(tmp_path / "t", tiny_bert_dir, "pixel7")
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    shapes = report["shapes"]
    assert shapes["form"] == "buckets" and shapes["buckets"] == [16, 32, 64] and "litert-torch" in shapes["why"]
    assert "sequence buckets 16, 32, 64" in printed
    signatures = Interpreter(model_path=str(out / "model.tflite")).get_signature_list()
    assert sorted(signatures) == ["seq_16", "seq_32", "seq_64"]
    parity = report["parity"]
    assert parity["passed"] and {p["size"] for p in parity["per_shape"]} >= {1, 8, 64}
    assert all(p["cosine"] > 0.9999 for p in parity["per_shape"]), "padding inside a bucket is masked out"
    over = report["host_latency"]["over_lengths"] if report.get("host_latency") else report["latency"]["over_lengths"]
    assert [r["length"] for r in over["lengths"]] == [16, 32, 64] and over["buckets"] == [16, 32, 64]
    assert "smallest bucket" in over["on_data"]["method"]

    target = get_target("tflite")
    specs = target.read_inputs(out / "model.tflite")
    assert [s.dynamic for s in specs] == [((1, 1, 64),)] * 2, "a bare bucketed .tflite reads as dynamic up to 64"
    artifact = Artifact("tflite", out / "model.tflite", specs, ["last_hidden_state"])
    ids, mask = np.ones((1, 7), np.int64), np.ones((1, 7), np.int64)
    (hidden,) = LiteRTRunner(threads=1).run(artifact, (ids, mask))
    assert hidden.shape[:2] == (1, 7), "per-token outputs are cut back to the input's length"
    long = (np.ones((1, 70), np.int64), np.ones((1, 70), np.int64))
    with pytest.raises(SlimxFailure, match="largest bucket"):
        LiteRTRunner(threads=1).run(artifact, long)
    assert LiteRTRunner(threads=1, truncate=True).run(artifact, long)[0].shape[:2] == (1, 64)
    capsys.readouterr()
    assert main(["profile", str(out / "model.tflite"), "--runs", "30"]) == 0
    assert "lengths by sequence length" in capsys.readouterr().out


def test_tflite_static_int8_calibrates_a_bucketed_model(tmp_path, capsys, tiny_bert_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(["the cat sat on the mat", "hello world", "a dog and a cat and a bird"] * 6))
    out = tmp_path / "q"
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", "--target", "pixel7", "--precision",
                 "int8", "--buckets", "8,32", "--calib", str(calib), "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shapes"]["buckets"] == [8, 32] and report["parity"]["passed"]
    assert {p["size"] for p in report["parity"]["per_shape"]} >= {1, 32}


def _flexible(path):
    import coremltools as ct

    from slimx.targets.coreml import flexible_shapes

    return flexible_shapes(ct.models.MLModel(str(path), skip_model_load=sys.platform != "darwin").get_spec())


@pytest.mark.parametrize("device,extra,form", [
    ("iphone12", [], "EnumeratedShapes"),  # neuralnetwork (iOS14): enumerated on every input
    ("iphone15pro", [], "RangeDim"),  # mlprogram iOS17: one enumerated input at most, and the model has two
    ("iphone15pro", ["--deployment-target", "iOS18"], "EnumeratedShapes"),
])
def test_coreml_flexible_sequence_shapes(tmp_path, capsys, tiny_bert_dir, device, extra, form):
    out = tmp_path / "c"
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", "--target", device, *extra,
                 "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shapes"]["built"]["form"] == form
    flexible = _flexible(out / "model.mlpackage")
    assert set(flexible) == {"input_ids", "attention_mask"}
    if form == "EnumeratedShapes":
        assert sorted(flexible["input_ids"]["enumerated"]) == [[1, 16], [1, 32], [1, 64]]
    else:
        assert flexible["input_ids"] == {"range": [[1, 1], [1, 64]]}
        assert "iOS18" in report["shapes"]["why"]


def test_tensorrt_buckets_become_optimisation_profiles(tmp_path, capsys, tiny_bert_dir):
    out = tmp_path / "j"
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", "--target", "jetson-orin-nano",
                 "--buckets", "16,64", "--out", str(out), *FAST]) == 0
    script = (out / "build_engine.sh").read_text()
    assert ("--profile=0 --minShapes=input_ids:1x1,attention_mask:1x1 --optShapes=input_ids:1x16,"
            "attention_mask:1x16 --maxShapes=input_ids:1x16,attention_mask:1x16 --profile=1 "
            "--minShapes=input_ids:1x17,attention_mask:1x17") in script
    report = json.loads((out / "report.json").read_text())
    assert report["shapes"]["built"]["form"] == "optimisation profiles"
    assert report["parity"]["proxy"]["passed"], "the ONNX stays dynamic over the whole range"


@pytest.mark.parametrize("args,needle", [
    (["--buckets", "16"], "--buckets 16"),  # host: ONNX keeps a dynamic axis, no buckets to build
    (["--target", "pixel7", "--buckets", "16,100"], "outside the sequence range 1..64"),
    (["--target", "pixel7", "--static", "--buckets", "16"], "--buckets 16"),
])
def test_bucket_requests_that_cannot_apply_are_usage_errors(tmp_path, capsys, tiny_bert_dir, args, needle):
    assert main(["export", f"hf:{tiny_bert_dir}", "--input-shape", "1x32", *args, "--out", str(tmp_path / "x"),
                 *FAST]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_estimates_follow_the_length_and_the_data(tmp_path, capsys, tiny_bert_dir):
    out = _export_with_text(tmp_path / "e", tiny_bert_dir, "iphone12")
    over = json.loads((out / "report.json").read_text())["latency"]["over_lengths"]
    costs = [r["median_ms"] for r in over["lengths"]]
    assert [r["length"] for r in over["lengths"]] == [16, 32, 64] and costs == sorted(costs) and costs[0] < costs[-1]
    assert over["on_data"]["median_ms"] == costs[0], "short sentences run in the 16-token bucket"
    assert "lengths   on your data (3 samples" in capsys.readouterr().out


def test_auto_buckets_minimise_the_expected_latency_over_the_data(tmp_path, tiny_bert_dir, capsys):
    from slimx.export.buckets import choose

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(["a short one.", "two words", "one", "a somewhat longer sentence of a few more words",
                               "short again", "tiny"] * 3) + "\n")
    out = tmp_path / "auto"
    assert main(["export", f"hf:{tiny_bert_dir}", "--target", "pixel7", "--buckets", "auto", "--max-buckets", "2",
                 "--calib", str(text), "--calib-samples", "18", "--out", str(out), "-q"]) == 0
    shown = capsys.readouterr().out
    shapes = json.loads((out / "report.json").read_text())["shapes"]
    auto = shapes["auto"]
    assert len(shapes["buckets"]) <= 2 and shapes["buckets"][-1] == 64, "the range's maximum stays a bucket"
    assert auto["expected_ms"] <= auto["fixed_rule"]["expected_ms"] and sum(h["count"] for h in auto["histogram"]) == 18
    prices = {int(k): v for k, v in auto["prices_ms"].items()}
    lengths = [h["to"] for h in auto["histogram"] for _ in range(h["count"])]
    assert choose(lengths, {k: prices[k] for k in prices if k % 8 == 0 or k == 64}, 2)[0][-1] == 64
    assert "auto from 18 calibration lengths" in shown
    assert main(["export", f"hf:{tiny_bert_dir}", "--target", "pixel7", "--buckets", "auto",
                 "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "--buckets auto" in capsys.readouterr().err
    assert main(["export", f"hf:{tiny_bert_dir}", "--target", "pixel7", "--max-buckets", "2",
                 "--out", str(tmp_path / "y"), "-q"]) == 2


def test_auto_buckets_on_this_machine_are_priced_by_measurement(tmp_path, tiny_bert_dir, capsys):
    """The device is this machine and LiteRT runs here: each candidate length is timed in LiteRT (one .tflite with
    a signature per candidate), not estimated; the chosen buckets are among those timed."""
    pytest.importorskip("ai_edge_litert", reason="LiteRT (ai-edge-litert) not installed")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(["a short one.", "two words", "one", "a somewhat longer sentence of a few more words",
                               "short again", "tiny"] * 3) + "\n")
    out = tmp_path / "auto"
    assert main(["export", f"hf:{tiny_bert_dir}", "--target", "host", "--format", "tflite", "--buckets", "auto",
                 "--max-buckets", "2", "--calib", str(text), "--calib-samples", "18", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    auto = report["shapes"]["auto"]
    assert auto["priced_by"].startswith("measured here in tflite's runtime (litert)"), auto["priced_by"]
    prices = {int(k): v for k, v in auto["prices_ms"].items()}
    assert set(auto["buckets"]) <= set(prices) and set(auto["fixed_rule"]["buckets"]) <= set(prices)
    assert all(v > 0 for v in prices.values()) and set(auto["measured_ms"]) == set(auto["prices_ms"])
    assert list(prices.values()) == sorted(prices.values()), "smoothed: a longer bucket never costs less"
    assert auto["expected_ms"] <= auto["fixed_rule"]["expected_ms"]
    assert report["compile"]["buckets"]["sizes"] == auto["buckets"], "the artifact is built with the chosen set"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], "no candidate artifact left"
