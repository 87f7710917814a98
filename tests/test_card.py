"""`slimx card OUT`: the model card of an export folder, from its report alone."""

import hashlib

import pytest
import yaml

import slimx
from slimx.cli import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "out"
    return slimx.export("tests.models:tiny_mlp", "pixel7", format="onnx", out=out,
                        shapes={"input_shapes": ["2x16"]})


def test_the_card_carries_metadata_figures_hashes_and_the_way_to_reproduce(exported):
    path = exported.card()
    assert path == exported.out / "README.md"
    text = path.read_text()
    front = yaml.safe_load(text.split("---")[1])  # Hugging Face reads this block
    assert front["library_name"] == "slimx" and {"onnx", "fp32", "pixel7"} <= set(front["tags"])
    artifact = exported.artifacts[0]
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() in text
    report = exported.report.to_dict()
    assert f"cosine {report['parity']['cosine']:.6f}" in text  # copied from the report, not recomputed
    est = report["latency"]
    assert est["kind"] == "estimated" and f"{est['total_ms']:.3f} ms" in text and "80% interval" in text
    assert est["unanchored"] and "for a setup not anchored" in text, "no anchor: the interval says whose setup"
    assert "for a setup not anchored" in exported.latency.line() and "profile's own setup" in exported.latency.line()
    assert "| host | measured |" in text
    assert "slimx.export('tests.models:tiny_mlp', 'pixel7', format='onnx', precision='fp32')" in text
    assert not list(exported.out.glob(".*.partial"))


def test_the_cli_writes_a_card_and_refuses_a_folder_that_is_no_export(exported, tmp_path, capsys):
    dest = tmp_path / "card.md"
    assert main(["card", str(exported.out), "--output", str(dest)]) == 0
    assert dest.read_text().startswith("---\nlibrary_name: slimx")
    assert main(["card", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an export folder" in err
