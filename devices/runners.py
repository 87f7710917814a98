"""The runners this host has, by name: each runs an artifact in its own runtime and times it.

All share the protocol of ``targets.base.Runner``: ``run(artifact, inputs)`` and
``time(artifact, inputs, warmup, runs) -> Timing`` (min/p50/p90/max, threads, runtime version, per-op
times where the runtime gives them). The PyTorch eager runner takes the Program itself as its artifact.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

from slimx._core.errors import UsageError
from slimx.targets.base import Timing, to_numpy_inputs


@dataclass(frozen=True)
class RunnerInfo:
    name: str
    format: str  # the artifact format it runs ("torch": the Program itself)
    setting: str  # the estimator setting its measurements calibrate on the host
    description: str


RUNNERS = {
    "onnxruntime": RunnerInfo("onnxruntime", "onnx", "onnxruntime-cpu-fp32", "onnxruntime, CPU execution provider"),
    "onnxruntime-cuda": RunnerInfo("onnxruntime-cuda", "onnx", "onnxruntime-cuda-fp32",
                                   "onnxruntime, CUDA execution provider"),
    "onnxruntime-tensorrt": RunnerInfo("onnxruntime-tensorrt", "onnx", "onnxruntime-tensorrt-fp32",
                                       "onnxruntime, TensorRT execution provider"),
    "litert": RunnerInfo("litert", "tflite", "tflite-cpu-fp32", "LiteRT interpreter, XNNPACK CPU"),
    "tensorrt": RunnerInfo("tensorrt", "tensorrt", "tensorrt-gpu-fp16", "TensorRT engine on the local GPU"),
    "coreml": RunnerInfo("coreml", "coreml", "coreml-all-fp16", "CoreML prediction (macOS)"),
    "torch": RunnerInfo("torch", "torch", "torch-cpu-fp32", "PyTorch eager on the CPU"),
}


def runner_missing_reason(name: str) -> str | None:
    """None when runner ``name`` can run on this host, else why not."""
    if name not in RUNNERS:
        raise UsageError(f"runner {name!r}", "is not a runner slimx knows", f"use one of {', '.join(RUNNERS)}")
    if name == "onnxruntime":
        return None
    if name in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        import onnxruntime

        provider = "CUDAExecutionProvider" if name.endswith("cuda") else "TensorrtExecutionProvider"
        if provider not in onnxruntime.get_available_providers():
            return f"onnxruntime on this host has no {provider} (install onnxruntime-gpu with CUDA/TensorRT)"
        return None
    if name == "litert":
        try:
            import ai_edge_litert  # noqa: F401
        except ImportError:
            return "ai-edge-litert is not installed (pip install 'slimx[tflite]')"
        return None
    if name == "tensorrt":
        from slimx.targets.tensorrt import tensorrt_status

        ok, why = tensorrt_status()
        return None if ok else why
    if name == "coreml":
        if platform.system() != "Darwin":
            return "CoreML runs predictions only on macOS"
        return None
    return None


def available_runners() -> list[str]:
    return [n for n in RUNNERS if runner_missing_reason(n) is None]


def get_runner(name: str, threads: int | None = None):
    """A runner instance by name; UsageError with the reason when it cannot run here."""
    why = runner_missing_reason(name)
    if why:
        raise UsageError(f"runner {name}", why, f"use one of {', '.join(available_runners())}")
    if name.startswith("onnxruntime"):
        from slimx.targets.onnx import OrtRunner

        providers = {"onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                              "CPUExecutionProvider"]}.get(name)
        return OrtRunner(threads=threads, providers=providers)
    if name == "litert":
        from slimx.targets.tflite import LiteRTRunner

        return LiteRTRunner(threads=threads)
    if name == "tensorrt":
        from slimx.targets.tensorrt import TensorRTRunner

        return TensorRTRunner()
    if name == "coreml":
        from slimx.targets.coreml import CoreMLRunner

        return CoreMLRunner()
    return TorchEagerRunner(threads=threads)


# artifact formats: the file suffixes they come in, and the runner that runs each by default
FORMAT_SUFFIXES = {"onnx": (".onnx",), "tflite": (".tflite",), "coreml": (".mlpackage",),
                   "tensorrt": (".plan", ".engine")}
FORMAT_OF_SUFFIX = {suffix: fmt for fmt, suffixes in FORMAT_SUFFIXES.items() for suffix in suffixes}
DEFAULT_RUNNER = {"onnx": "onnxruntime", "tflite": "litert", "coreml": "coreml", "tensorrt": "tensorrt"}


class TorchEagerRunner:
    """PyTorch eager on the CPU; the artifact is the Program (its deployment-form module).

    Per-op times come from ``torch.profiler`` (self CPU time per ATen op); per-module times from forward
    hooks on leaf modules, keyed by module path.
    """

    name = "torch"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1

    @property
    def version(self) -> str:
        import torch

        return torch.__version__

    @staticmethod
    def _module(artifact):
        module = getattr(artifact, "module", None)
        if module is None:
            raise UsageError("the torch runner", "needs a PyTorch model, and this artifact has none",
                             "pass the MODEL, not an exported file")
        return module

    def run(self, artifact, inputs: tuple, session=None):
        import torch

        with torch.inference_mode():
            out = self._module(artifact)(*inputs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return to_numpy_inputs(tuple(outs))

    def time(self, artifact, inputs: tuple, warmup: int = 5, runs: int = 50, per_op: bool = True) -> Timing:
        import torch

        module = self._module(artifact)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    module(*inputs)
                samples = []
                for _ in range(runs):
                    start = time.perf_counter_ns()
                    module(*inputs)
                    samples.append((time.perf_counter_ns() - start) / 1e6)
                ops, nodes = self.profile(module, inputs) if per_op else ([], [])
        finally:
            torch.set_num_threads(old_threads)
        return Timing.from_samples(samples, runtime=self.name, runtime_version=self.version, warmup=warmup,
                                   threads=self.threads, per_op=ops, per_node=nodes)

    @staticmethod
    def profile(module, inputs: tuple, runs: int = 5, top: int = 15):
        import torch
        from torch.profiler import ProfilerActivity, profile

        leaf_ms: dict[str, float] = {}
        starts: dict[str, int] = {}
        handles = []
        for path, sub in module.named_modules():
            if path and not any(True for _ in sub.children()):
                def pre(_m, _a, path=path):
                    starts[path] = time.perf_counter_ns()

                def post(_m, _a, _o, path=path):
                    leaf_ms[path] = leaf_ms.get(path, 0.0) + (time.perf_counter_ns() - starts.pop(path)) / 1e6
                handles += [sub.register_forward_pre_hook(pre), sub.register_forward_hook(post)]
        try:
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    module(*inputs)
        finally:
            for h in handles:
                h.remove()
        events = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        ops = [{"op": e.key, "ms": round(e.self_cpu_time_total / 1000 / runs, 4),
                "share": round(e.self_cpu_time_total / total, 4), "count": e.count // runs}
               for e in sorted(events, key=lambda e: -e.self_cpu_time_total)][:top]
        nodes = [{"node": p, "module": p, "ms": round(ms / runs, 4)}
                 for p, ms in sorted(leaf_ms.items(), key=lambda kv: -kv[1])][:top]
        return ops, nodes
