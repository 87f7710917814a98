import pickle

import pytest
import torch
from safetensors.torch import save_file

from slimx._core.errors import UsageError
from slimx.export import load_model
from slimx.export.weights import apply_state_dict, read_state_dict
from tests.models import TinyMLP


class Evil:  # anything torch.load(weights_only=True) must refuse
    def __reduce__(self):
        return (print, ("unpickled!",))


def _trained():
    torch.manual_seed(5)
    return TinyMLP()


def test_safetensors_round_trip(tmp_path):
    src = _trained()
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    loaded = load_model("tests.models:tiny_mlp", weights=str(path))
    assert loaded.weights["matched"] == 4 and loaded.weights["missing"] == [] and loaded.weights["unexpected"] == []
    torch.testing.assert_close(loaded.module.fc1.weight, src.fc1.weight, rtol=0, atol=0)


def test_torch_state_dict_nested_and_prefixed(tmp_path):
    src = _trained()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    state = read_state_dict(path)
    record = apply_state_dict(TinyMLP(), state, str(path))
    assert record["matched"] == 4


def test_missing_and_unexpected_keys_reported(tmp_path):
    state = _trained().state_dict()
    state.pop("fc2.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    loaded = load_model("tests.models:tiny_mlp", weights=str(path))
    assert loaded.weights["missing"] == ["fc2.bias"]
    assert loaded.weights["unexpected"] == ["extra.weight"]


def test_pickled_objects_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"fc1.weight": Evil()}, fh)
    with pytest.raises(UsageError) as info:
        read_state_dict(path)
    assert "unpickled!" not in capsys.readouterr().out
    assert info.value.exit_code == 2
    assert "will not unpickle" in info.value.line() or "not a readable torch checkpoint" in info.value.line()


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        read_state_dict(path)


def test_missing_file_and_wrong_shapes(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    state = TinyMLP(d_in=5).state_dict()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(UsageError, match="wrong shape"):
        load_model("tests.models:tiny_mlp", weights=str(path))


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UsageError, match="none of its 1 keys match"):
        load_model("tests.models:tiny_mlp", weights=str(path))
