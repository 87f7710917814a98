"""Device profiles (data files), measuring runners, and (later) the per-op latency estimator."""

from slimx.devices.registry import DeviceProfile, device_names, list_devices, load_device

__all__ = ["DeviceProfile", "device_names", "list_devices", "load_device"]
