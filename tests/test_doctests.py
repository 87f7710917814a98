"""The runnable examples in public docstrings stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "slimx._core.errors", "slimx._core.inputs", "slimx._core.registry", "slimx._core.progress",
    "slimx.export.parity", "slimx.export.binding", "slimx.export.shapes", "slimx.export.textdata",
    "slimx.devices.registry", "slimx.targets", "slimx.targets.base", "slimx.targets.tensorrt", "slimx.slim.base",
    "slimx.slim.lowrank", "slimx.slim.fidelity", "slimx.slim.dsformer", "slimx.devices.opmix",
    "slimx.devices.estimator", "slimx.devices.records", "slimx.devices.validation", "slimx.quant.onnx",
    "slimx.export.intake", "slimx.gate", "slimx.html", "slimx.sweep",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
