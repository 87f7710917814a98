import json
import zipfile

import onnx
import pytest
import torch

from slimx._core.errors import UsageError
from slimx.export import load_model
from tests.models import TinyMLP


def test_factory_with_example_inputs():
    loaded = load_model("tests.models:tiny_mlp")
    assert loaded.source == "factory"
    assert [(s.name, s.shape, s.dtype) for s in loaded.inputs] == [("x", (2, 16), "float32")]
    assert loaded.example_inputs[0].shape == (2, 16)


def test_factory_needs_examples_or_shapes():
    with pytest.raises(UsageError, match="has no example inputs"):
        load_model("tests.models:tiny_no_examples")
    loaded = load_model("tests.models:tiny_no_examples", input_shapes=["1x6"])
    assert loaded.inputs[0].shape == (1, 6) and loaded.inputs[0].name == "input"


@pytest.mark.parametrize("spec,match", [
    ("tests.nothere:f", "cannot import"),
    ("tests.models:nothing", "no callable"),
    ("tests.models:not_a_module", "not an nn.Module"),
])
def test_factory_errors(spec, match):
    with pytest.raises(UsageError, match=match):
        load_model(spec)


def test_timm_model():
    loaded = load_model("timm:test_vit")
    assert loaded.source == "timm" and loaded.inputs[0].shape == (1, 3, 160, 160)
    assert loaded.data_config["input_size"] == (3, 160, 160)
    assert any("random weights" in n for n in loaded.notes)


def test_timm_unknown_suggests():
    with pytest.raises(UsageError, match="did you mean"):
        load_model("timm:deit_tiny_patch16_22")


def test_hf_dir(tiny_bert_dir):
    loaded = load_model(f"hf:{tiny_bert_dir}")
    assert loaded.source == "hf" and loaded.output_names == ["last_hidden_state"]
    assert [s.name for s in loaded.inputs] == ["input_ids", "attention_mask"]
    assert loaded.inputs[0].high == loaded.module.model.config.vocab_size
    assert loaded.tokenizer("the cat sat")["input_ids"][0] == 2  # [CLS]


def test_hf_sentence_transformers_dir_pools_and_normalises(tiny_st_dir):
    loaded = load_model(f"hf:{tiny_st_dir}", input_shapes=["1x16"])
    assert loaded.output_names == ["embedding"]
    ids = torch.randint(5, 20, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.long)
    emb = loaded.module(ids, mask)
    assert emb.shape == (1, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1), rtol=0, atol=1e-5)


def test_hf_dir_errors(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        load_model(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(UsageError, match=r"no config\.json"):
        load_model(f"hf:{tmp_path}")


def test_unknown_model_form():
    with pytest.raises(UsageError) as info:
        load_model("minilmm")
    assert "did you mean 'minilm'" in info.value.line()


def _save_pt2(path):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    program = torch.export.export(model, model.example_inputs())
    torch.export.save(program, str(path))
    return model


def test_pt2_archive(tmp_path):
    model = _save_pt2(tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    assert loaded.source == "pt2" and loaded.program is not None
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded.module(x), model(x))
    with pytest.raises(UsageError, match="carries its own weights"):
        load_model(str(tmp_path / "m.pt2"), weights=str(tmp_path / "w.safetensors"))


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, edit(item.filename, data))


def test_pt2_that_would_unpickle_is_refused(tmp_path):
    _save_pt2(tmp_path / "m.pt2")

    def pickled(name, data):
        if name.endswith("weights_config.json"):
            cfg = json.loads(data)
            for meta in cfg["config"].values():
                meta["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    _rewrite(tmp_path / "m.pt2", tmp_path / "evil.pt2", pickled)
    with pytest.raises(UsageError, match="would need unpickling"):
        load_model(str(tmp_path / "evil.pt2"))


def test_corrupt_pt2_and_onnx(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a zip file"):
        load_model(str(tmp_path / "bad.pt2"))
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(UsageError, match="not a valid ONNX model"):
        load_model(str(tmp_path / "bad.onnx"))
    with pytest.raises(UsageError, match="no such file"):
        load_model(str(tmp_path / "missing.onnx"))


def test_onnx_input_with_symbolic_axes(tmp_path):
    model = TinyMLP().eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, model.example_inputs(), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    loaded = load_model(str(path))
    assert loaded.module is None and loaded.inputs[0].shape == (1, 16)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param
