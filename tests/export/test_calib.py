import numpy as np
import pytest
import torch

from slimx._core.errors import UsageError
from slimx.export import load_calibration, load_model


def test_npz(tmp_path):
    loaded = load_model("tests.models:tiny_mlp")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    data = load_calibration(tmp_path / "c.npz", loaded, limit=3)
    assert data.kind == "npz" and len(data.batches) == 2 and data.total == 5, "5 samples make 2 batches of 2"
    assert data.batches[0][0].shape == (2, 16) and data.batches[0][0].dtype == torch.float32, \
        "samples are grouped into the model's own batch size (tiny_mlp takes 2)"


def test_npz_wrong_shape_and_names(tmp_path):
    loaded = load_model("tests.models:tiny_mlp")
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 15), dtype=np.float32))
    with pytest.raises(UsageError, match="samples of shape"):
        load_calibration(tmp_path / "c.npz", loaded)
    np.savez(tmp_path / "d.npz", y=np.zeros((5, 16), dtype=np.float32), z=np.zeros((5, 16), dtype=np.float32))
    with pytest.raises(UsageError, match="takes"):
        load_calibration(tmp_path / "d.npz", loaded)


def test_text_is_tokenized_with_the_models_tokenizer(tmp_path, tiny_bert_dir):
    loaded = load_model(f"hf:{tiny_bert_dir}", input_shapes=["1x12"])
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n\na dog runs\n")
    data = load_calibration(tmp_path / "t.txt", loaded, seed=1)
    assert data.kind == "text" and len(data.batches) == 2
    ids, mask = data.batches[0]
    assert ids.shape == (1, 12) and mask.shape == (1, 12)
    assert int(mask.sum()) < 12, "padded to the model's sequence length"


def test_text_longer_than_the_model_takes_is_refused_or_cut(tmp_path, tiny_bert_dir):
    from slimx.export.shapes import apply_shape_policy

    loaded = load_model(f"hf:{tiny_bert_dir}", input_shapes=["1x12"])
    loaded.inputs = apply_shape_policy(loaded.inputs, 20, None, None, False)  # a dynamic axis up to 20 tokens
    long = " ".join(["cat"] * 30)
    (tmp_path / "t.txt").write_text(f"the cat sat\n{' '.join(['dog'] * 15)}\n{long}\n")
    with pytest.raises(UsageError) as info:
        load_calibration(tmp_path / "t.txt", loaded, flag="--data")
    line = info.value.line()
    assert "--data" in line and "line 3 has 32 tokens, more than the 20" in line and "--truncate" in line
    data = load_calibration(tmp_path / "t.txt", loaded, truncate=True)
    lengths = sorted(b[0].shape[1] for b in data.batches)
    assert lengths == [12, 17, 20], "short text padded to the export length, longer kept whole, too long cut"
    assert all(int(b[1].sum()) == b[1].shape[1] for b in data.batches if b[0].shape[1] > 12)


def test_text_needs_a_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(UsageError, match="no tokenizer"):
        load_calibration(tmp_path / "t.txt", load_model("tests.models:tiny_mlp"))


def test_image_folder_uses_the_models_preprocessing(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), i * 60, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    loaded = load_model("timm:test_vit")
    data = load_calibration(tmp_path, loaded)
    assert data.kind == "images" and len(data.batches) == 3
    assert data.batches[0][0].shape == (1, 3, 160, 160)


def test_unknown_calibration_file(tmp_path):
    (tmp_path / "c.csv").write_text("1,2\n")
    with pytest.raises(UsageError, match=r"does not read \.csv"):
        load_calibration(tmp_path / "c.csv", load_model("tests.models:tiny_mlp"))


def test_package_text_is_real_sentences_disjoint_from_stdlib_text(tmp_path, capsys):
    from slimx.cli import main
    from slimx.export.textdata import package_sentences, stdlib_sentences

    out = tmp_path / "pkg.txt"
    assert main(["data", "package-text", "--out", str(out), "--count", "40", "--offset", "10"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 40 and len(set(lines)) == 40 and lines == package_sentences(40, 10)
    assert all(6 <= len(s.split()) <= 60 and s[0].isupper() for s in lines)
    assert not set(lines) & set(stdlib_sentences(5000)), "a package sentence held out as stdlib text"
    assert "wrote 40 sentences" in capsys.readouterr().out
