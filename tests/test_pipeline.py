"""The export pipeline's stages: configs built from flags with defaults stated once, the flat config the report
records, and the latency model the compress stage hands to passes for the chosen device."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest

from slimx._core.errors import UsageError
from slimx.cli import main
from slimx.pipeline import ExportConfig

FAST = ["--runs", "30", "--warmup", "1", "-q"]


def test_flags_go_to_their_stage_and_absent_ones_take_the_default():
    cfg = ExportConfig.from_flags({"model": "m", "runs": 40, "calib": "c.txt", "dla_core": 0, "passes": ["lowrank"]})
    assert cfg.model.model == "m" and cfg.timing.runs == 40 and cfg.data.calib == "c.txt"
    assert cfg.compile.format_options == {"dla_core": 0} and cfg.compress.passes == ("lowrank",)
    assert cfg.timing.warmup == ExportConfig.default("warmup") == 5 and cfg.compile.device == "host"
    flat = cfg.flat()
    assert list(flat)[:4] == ["model", "target", "format", "out"] and flat["runs"] == 40 and flat["target"] == "host"
    with pytest.raises(UsageError, match="--runs"):
        ExportConfig.from_flags({"runs": 5})


@dataclass(frozen=True)
class ProbeConfig:
    pass


@pytest.fixture
def probe_pass():
    """A throwaway pass that records the context it was given and changes nothing."""
    from slimx.slim import PASSES, PassResult, register_pass

    seen = {}

    def plan(model, cfg, ctx):
        seen["ctx"] = ctx
        return []

    @register_pass("probe", ProbeConfig, plan=plan, selects=lambda model, cfg: [])
    def apply(model, plan, cfg, ctx):
        return PassResult(model=copy.deepcopy(model), name="probe", config={}, layers=[], summary={"changed": 0})

    yield seen
    PASSES.remove("probe")


def test_passes_get_the_devices_latency_model(probe_pass, tmp_path, capsys):
    code = main(["export", "tests.models:tiny_mlp", "--target", "iphone12", "--format", "onnx", "--pass", "probe",
                 "--out", str(tmp_path / "o"), *FAST])
    assert code == 0, capsys.readouterr().err
    model = probe_pass["ctx"].latency_model
    assert model.kind == "estimated" and model.device == "iphone12"
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["passes"][0]["name"] == "probe" and report["compression"]["fidelity"]["final"]["cosine_mean"] > 0.99
