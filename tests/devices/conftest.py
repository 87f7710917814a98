"""Fixtures the device tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def scratch_profiles(tmp_path, monkeypatch):
    """A user profile folder of the test's own (calibrated profiles, anchors), forgotten afterwards."""
    from slimx.devices.registry import reload_profiles

    monkeypatch.setenv("SLIMX_DEVICES_DIR", str(tmp_path / "profiles"))
    reload_profiles()
    yield tmp_path / "profiles"
    monkeypatch.delenv("SLIMX_DEVICES_DIR")
    reload_profiles()
