"""Figures for this machine, measured rather than typed in, and cached per CPU model."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

_CACHE_VERSION = 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    base = os.environ.get("SLIMX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slimx")
    return Path(base)


def measure_sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 matrix multiply throughput through numpy's BLAS, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure_copy_bandwidth_gbs(mbytes: int = 128, repeats: int = 5) -> float:
    """Best-of-``repeats`` memory copy bandwidth (bytes read + written), in GB/s."""
    src = np.ones(mbytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def measured_host_figures(profile: dict, refresh: bool = False) -> dict:
    """Fill the host profile with figures measured here, cached under the slimx cache folder."""
    cores = os.cpu_count() or 1
    model = cpu_model()
    key = hashlib.sha1(f"{_CACHE_VERSION}|{model}|{cores}|{platform.machine()}".encode()).hexdigest()[:12]
    cache = cache_dir() / f"host-{key}.json"
    figures = None
    if cache.is_file() and not refresh:
        try:
            figures = json.loads(cache.read_text())
        except ValueError:
            figures = None
    if figures is None:
        figures = {
            "cpu_model": model,
            "cores": cores,
            "sgemm_gflops": round(measure_sgemm_gflops(), 1),
            "copy_gbs": round(measure_copy_bandwidth_gbs(), 1),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(figures))
            os.replace(tmp, cache)
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    when = f"measured by slimx on this machine at {figures['measured_at']}"
    out = dict(profile)
    out["display_name"] = f"This machine: {figures['cpu_model']} ({figures['cores']} cores, measured)"
    out["memory"] = {
        "mem_bandwidth_gbs": figures["copy_gbs"],
        "mem_bandwidth_gbs_source": f"{when} (numpy copy of 128 MiB, bytes read + written, best of 5)",
    }
    unit = dict(profile["compute_units"][0])
    unit.update({
        "description": figures["cpu_model"],
        "cores": figures["cores"],
        "cores_source": "os.cpu_count() on this machine",
        "peak_gflops_fp32": figures["sgemm_gflops"],
        "peak_gflops_fp32_source": f"{when} (numpy sgemm 1024^3, best of 5: attained, not theoretical peak)",
    })
    out["compute_units"] = [unit]
    out["runtimes"] = _host_runtimes()
    return out


def _host_runtimes() -> dict:
    from importlib import metadata

    out = {}
    for key, dist in (("onnx", "onnxruntime"), ("tflite", "ai-edge-litert"), ("coreml", "coremltools"),
                      ("tensorrt", "tensorrt")):
        try:
            out[key] = f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    out["runtimes_source"] = "installed packages on this machine"
    return out
