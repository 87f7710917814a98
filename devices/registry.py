"""Device profiles: one TOML file per device under ``devices/profiles``; adding a device is adding a file.

Every figure (a number outside ``format_options``) carries a sibling ``<field>_source`` string
saying where it comes from; a profile without one is refused on load.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from slimx._core.errors import UsageError
from slimx._core.registry import Registry
from slimx.devices.records import ComputeUnit, EstimatorSetting

PROFILE_DIR = Path(__file__).parent / "profiles"
_NOT_FIGURES = {"schema_version", "format_options"}


@dataclass(frozen=True)
class DeviceProfile:
    """A device as data: aliases, default format, compute units, memory, runtimes, estimator settings, sources.

    ``raw`` is the file's own tables: only for rewriting the file (``slimx devices calibrate``) and for
    printing it whole; everything else reads the typed fields.
    """

    name: str
    display_name: str
    kind: str
    default_format: str
    aliases: tuple[str, ...] = ()
    compute_units: tuple[ComputeUnit, ...] = ()
    memory: dict = field(default_factory=dict)
    runtimes: dict = field(default_factory=dict)
    format_options: dict = field(default_factory=dict)
    measured: bool = False
    estimator: dict = field(default_factory=dict, compare=False)  # setting key -> EstimatorSetting
    estimator_default: str | None = None
    match_device: str | None = None  # published rows of this device name calibrate it
    rank_multiple: int | None = None  # hardware-friendly multiple for factorization ranks
    raw: dict = field(default_factory=dict, compare=False)

    def unit(self, name: str) -> ComputeUnit | None:
        return next((cu for cu in self.compute_units if cu.name == name), None)

    def peak(self, unit: str, dtype: str) -> float | None:
        """Peak rate of one compute unit in G(FL)OP/s for ``dtype`` (fp32, fp16, int8), if known."""
        cu = self.unit(unit)
        return cu.peak(dtype) if cu is not None else None

    def to_dict(self) -> dict:
        return dict(self.raw)


_TOP_KEYS = {"schema_version", "name", "display_name", "kind", "default_format", "aliases", "compute_units",
             "memory", "runtimes", "format_options", "measured", "estimator", "match_device", "rank_multiple",
             "totals"}


def check_sources(data: dict, where: str = "") -> list[str]:
    """Names of the figures in ``data`` that lack a ``<name>_source`` sibling."""
    missing = []
    for key, value in data.items():
        if key in _NOT_FIGURES:
            continue
        path = f"{where}{key}"
        if isinstance(value, dict):
            missing += check_sources(value, f"{path}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    missing += check_sources(item, f"{path}[{i}].")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not str(data.get(f"{key}_source", "")).strip():
                missing.append(path)
    return missing


def parse_profile(data: dict, origin: str) -> DeviceProfile:
    for key in ("name", "display_name", "kind", "default_format"):
        if key not in data:
            raise ValueError(f"device profile {origin} has no {key!r}")
    unknown = sorted({k for k in data if not k.endswith("_source")} - _TOP_KEYS)
    if unknown:
        raise ValueError(f"device profile {origin}: unknown key(s) {', '.join(unknown)}")
    missing = check_sources(data)
    if missing:
        raise ValueError(f"device profile {origin}: figures without a source: {', '.join(missing)}")
    tables = data.get("estimator", {})
    settings = {key: EstimatorSetting.from_table(key, table, data["default_format"], origin)
                for key, table in tables.items() if isinstance(table, dict)}
    default = tables.get("default")
    if default is not None and default not in settings:
        raise ValueError(f"device profile {origin}: estimator default {default!r} is not one of its settings")
    return DeviceProfile(
        name=data["name"],
        display_name=data["display_name"],
        kind=data["kind"],
        default_format=data["default_format"],
        aliases=tuple(data.get("aliases", ())),
        compute_units=tuple(ComputeUnit.from_table(t, origin) for t in data.get("compute_units", ())),
        memory=dict(data.get("memory", {})),
        runtimes=dict(data.get("runtimes", {})),
        format_options=dict(data.get("format_options", {})),
        measured=bool(data.get("measured", False)),
        estimator=settings,
        estimator_default=default,
        match_device=data.get("match_device"),
        rank_multiple=data.get("rank_multiple"),
        raw=data,
    )


def user_profile_dir() -> Path:
    """Where calibrated copies of profiles go when the packaged file is not the place (the host, a wheel).

    A profile there replaces the packaged one of the same name. ``SLIMX_DEVICES_DIR`` overrides it.
    """
    import os

    from slimx.devices.host import cache_dir

    return Path(os.environ.get("SLIMX_DEVICES_DIR") or cache_dir() / "devices")


def profile_path(name: str) -> Path:
    """The file a device's profile is loaded from (a user copy first, then the packaged one)."""
    return _registry().get(name)


@lru_cache(maxsize=1)
def _registry() -> Registry[Path]:
    reg: Registry[Path] = Registry("device")
    paths = {p.name: p for p in sorted(PROFILE_DIR.glob("*.toml"))}
    user = user_profile_dir()
    if user.is_dir():
        paths.update({p.name: p for p in sorted(user.glob("*.toml"))})
    for path in paths.values():
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        reg.add(data["name"], path, aliases=tuple(data.get("aliases", ())))
    return reg


def reload_profiles() -> None:
    """Forget the cached profile index (after a calibration wrote a file)."""
    _registry.cache_clear()


def device_names() -> list[str]:
    return _registry().names()


def load_device(name: str, measure_host: bool = True) -> DeviceProfile:
    """Load a device profile by name or alias; the host's figures are measured (and cached).

    Example:
        >>> load_device("iphone12").default_format
        'coreml'
    """
    reg = _registry()
    path = reg.get(name)
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    if data.get("measured") and measure_host:
        from slimx.devices.host import measured_host_figures

        data = measured_host_figures(data)
    try:
        return parse_profile(data, str(path))
    except ValueError as exc:
        raise UsageError(f"device {name}", str(exc), "fix the profile file") from exc


def list_devices(measure_host: bool = True) -> list[DeviceProfile]:
    return [load_device(n, measure_host=measure_host) for n in device_names()]
