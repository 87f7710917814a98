import onnx
import pytest
import torch

from slimx._core.errors import SlimxFailure
from slimx.export import export_program, program_to_onnx
from tests.models import DataDependent, TinyViTBlock, eigh_model


def test_onnx_gets_slimx_io_names_and_passes_checks(tmp_path):
    torch.manual_seed(0)
    block = TinyViTBlock().eval()
    program = export_program(block, block.example_inputs())
    path = program_to_onnx(program, tmp_path / "m.onnx", ["tokens"], ["hidden"])
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["tokens"]
    assert [o.name for o in model.graph.output] == ["hidden"]
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 16, 32], "shape inference ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "no partial or external-data file left"


def test_io_name_that_clashes_with_an_internal_value(tmp_path):
    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(10, 4)

        def forward(self, ids):
            return self.embedding(ids).mean(1)

    program = export_program(Emb().eval(), (torch.randint(0, 10, (1, 5)),))
    path = program_to_onnx(program, tmp_path / "m.onnx", ["ids"], ["embedding"])
    onnx.checker.check_model(str(path), full_check=True)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["embedding"]


def test_data_dependent_control_flow_names_the_line():
    with pytest.raises(SlimxFailure) as info:
        export_program(DataDependent(), (torch.ones(2, 3),))
    line = info.value.line()
    assert "torch.export" in line and "models.py" in line and "data-dependent" in line
    assert "\n" not in line


def test_op_without_onnx_translation_names_op_and_module(tmp_path):
    model = eigh_model().eval()
    program = export_program(model, model.example_inputs())
    with pytest.raises(SlimxFailure) as info:
        program_to_onnx(program, tmp_path / "m.onnx", ["x"], ["y"])
    line = info.value.line()
    assert "aten._linalg_eigh" in line and "\n" not in line
    assert list(tmp_path.iterdir()) == [], "nothing half-written"
