"""Format options become `slimx export` flags from each target's options class."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slimx.config import ExportConfig
from slimx.targets import TARGETS, Target, option_flag_values, option_flags, register_target


def test_the_shipped_targets_options_are_flags_of_their_fields_types():
    flags = {of.dest: of for of in option_flags()}
    assert {"deployment_target", "compute_units", "palettize", "dla_core", "opt_len", "no_fuse"} <= set(flags)
    assert flags["no_fuse"].option == "fuse" and flags["no_fuse"].kind is bool and flags["no_fuse"].flag == "--no-fuse"
    assert flags["dla_core"].kind is int and flags["dla_core"].formats == ("tensorrt",)
    assert set(flags["compute_units"].choices) == {"all", "cpu_and_ne", "cpu_only", "cpu_and_gpu"}
    assert all(of.help for of in flags.values())


def test_flags_become_typed_format_options_and_the_report_keeps_its_keys():
    cfg = ExportConfig.from_flags({"no_fuse": True, "dla_core": "0", "compute_units": "cpu_only"})
    assert cfg.compile.format_options == {"fuse": False, "dla_core": 0, "compute_units": "cpu_only"}
    flat = cfg.flat()
    assert flat["no_fuse"] is True and flat["dla_core"] == 0 and flat["palettize"] is None
    assert list(flat).index("opset") + 1 == list(flat).index("deployment_target")
    assert ExportConfig.from_flags({k: v for k, v in flat.items() if k != "target"}).compile == cfg.compile
    assert option_flag_values({"fuse": True, "palettize": None, "dla_core": 1}) == {"dla_core": 1}


def test_two_targets_may_not_declare_one_option_with_two_types():
    @dataclass(frozen=True)
    class ClashOptions:
        dla_core: str | None = field(default=None, metadata={"help": "a text where tensorrt has a number"})

    @register_target
    class ClashTarget(Target):
        name = "clash-test"
        options_cls = ClashOptions

    try:
        with pytest.raises(TypeError, match=r"format option dla_core: .*one flag cannot be both"):
            option_flags()
    finally:
        TARGETS.remove("clash-test")
    assert "clash-test" not in TARGETS.names()
