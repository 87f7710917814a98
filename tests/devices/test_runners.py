"""Runners by name: the ones this host has, the reason for the ones it lacks, and the PyTorch eager runner."""

import platform
import time

import pytest

from slimx._core.errors import UsageError
from slimx._core.inputs import InputSpec
from slimx.devices.runners import available_runners, get_runner, runner_missing_reason
from slimx.export.program import Program, export_program
from tests.models import TinyConvBN, seeded


def test_onnxruntime_and_torch_are_always_here():
    assert {"onnxruntime", "torch"} <= set(available_runners())


@pytest.mark.skipif(platform.system() == "Darwin", reason="CoreML prediction exists on macOS")
def test_missing_runtime_names_itself():
    assert "macOS" in runner_missing_reason("coreml")
    with pytest.raises(UsageError, match="macOS"):
        get_runner("coreml")
    with pytest.raises(UsageError, match="not a runner"):
        runner_missing_reason("nope")


def test_torch_eager_runner_times_with_per_op_and_per_module():
    seeded(0)
    model = TinyConvBN().eval()
    example = (model.example_inputs() if hasattr(model, "example_inputs") else None) or (
        __import__("torch").randn(1, 3, 16, 16),)
    program = Program("tiny", export_program(model, example), model, [InputSpec("x", tuple(example[0].shape))],
                      ["y"])
    timing = get_runner("torch", threads=1).time(program, example, warmup=2, runs=10)
    assert timing.runtime == "torch" and timing.runs == 10 and timing.threads == 1
    assert timing.min_ms <= timing.median_ms <= timing.p90_ms <= timing.max_ms
    # the convolution's self time lands in whichever aten op does the work (convolution, mkldnn_convolution, ...)
    assert any("conv" in op["op"] for op in timing.per_op), timing.per_op
    assert {"conv1", "conv2", "head"} <= {n["module"] for n in timing.per_node}


def test_runner_latency_model_measures_a_module():
    import torch

    from slimx.devices.runners import RunnerLatencyModel

    got = RunnerLatencyModel("onnxruntime", threads=1, runs=5).latency(torch.nn.Linear(32, 32), (torch.randn(1, 32),))
    assert got["kind"] == "measured" and got["device"] == "host" and got["runtime"] == "onnxruntime"
    assert 0 < got["interval_ms"][0] <= got["ms"] <= got["interval_ms"][1]


def test_a_measured_latency_says_how_far_to_trust_it():
    from slimx.devices.records import Latency
    from slimx.targets.base import OtherLoad, Timing

    steady = Timing.from_samples([10.0 + 0.01 * (i % 5) for i in range(50)], load=0.02, runtime="ort",
                                 runtime_version="1", warmup=1, threads=2)
    assert steady.p10_ms <= steady.median_ms <= steady.p90_ms
    lo, hi = steady.median_ci_ms
    assert lo <= steady.median_ms <= hi and steady.trust is None
    assert "p10-p90" in Latency.measured("host", steady).line() and "NOTE" not in Latency.measured("host",
                                                                                                    steady).line()
    noisy = Timing.from_samples([40.0, 118.0, 79.0, 60.0, 95.0, 45.0, 110.0, 70.0] * 5, load=0.6, runtime="ort",
                                runtime_version="1", warmup=1, threads=2)
    assert "spread wide" in noisy.trust and "busy with other work (60%" in noisy.trust
    assert "NOTE spread wide" in Latency.measured("host", noisy).line()
    share = OtherLoad()
    time.sleep(0.3)
    value = share.share()
    assert value is None or 0.0 <= value <= 1.0
