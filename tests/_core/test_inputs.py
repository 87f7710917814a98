import pytest
import torch

from slimx._core.errors import UsageError
from slimx._core.inputs import InputSpec, apply_input_shapes, parse_input_shapes, sample_inputs


def test_parse_forms():
    assert parse_input_shapes(["1x3x224x224"]) == [(None, (1, 3, 224, 224), None)]
    assert parse_input_shapes(["ids=1,64:int64"]) == [("ids", (1, 64), "int64")]


@pytest.mark.parametrize("bad", ["", "axb", "1x0x3", "x=1x2:complex64", "1x-3"])
def test_parse_rejects_bad_shapes(bad):
    with pytest.raises(UsageError) as info:
        parse_input_shapes([bad])
    assert info.value.exit_code == 2
    assert "--input-shape" in info.value.line()


def test_one_unnamed_shape_sets_every_text_input():
    specs = [InputSpec("input_ids", (1, 128), "int64", "tokens", 0, 100),
             InputSpec("attention_mask", (1, 128), "int64", "mask")]
    out = apply_input_shapes(specs, ["1x32"])
    assert [s.shape for s in out] == [(1, 32), (1, 32)]
    assert out[0].kind == "tokens" and out[0].high == 100


def test_named_shape_must_exist():
    with pytest.raises(UsageError, match="no input of that name"):
        apply_input_shapes([InputSpec("x", (1, 4))], ["y=1x4"])


def test_too_many_shapes():
    with pytest.raises(UsageError, match="2 shapes given"):
        apply_input_shapes([InputSpec("x", (1, 4))], ["1x4", "1x5"])


def test_samples_are_seeded_and_fit_their_specs():
    specs = [InputSpec("ids", (2, 16), "int64", "tokens", 5, 9), InputSpec("mask", (2, 16), "int64", "mask"),
             InputSpec("x", (2, 3), "float32")]
    a = sample_inputs(specs, seed=3)
    b = sample_inputs(specs, seed=3)
    c = sample_inputs(specs, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    ids, mask, x = a
    assert ids.dtype == torch.int64 and int(ids.min()) >= 5 and int(ids.max()) < 9
    assert set(mask.unique().tolist()) <= {0, 1}
    assert (mask[:, 0] == 1).all(), "every row attends to at least its first position"
    # the padding is a suffix: once a row drops to 0 it stays 0
    assert (mask[:, 1:] <= mask[:, :-1]).all()
    assert x.dtype == torch.float32 and x.shape == (2, 3)
