"""The runners this host has, by name: each runs an artifact in its own runtime and times it.

All share the protocol of ``targets.base.Runner``: ``session(path)``, ``run(artifact, inputs)`` and
``time(artifact, inputs, warmup, runs) -> Timing`` (min/p50/p90/max, threads, runtime version, per-op
times where the runtime gives them). Each target declares its own runners (``Target.runners``); this
module only adds PyTorch eager, which takes the Program itself as its artifact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from slimx._core.errors import UsageError
from slimx.targets.base import RunnerInfo, Timing, timed_calls, to_numpy_inputs

TORCH_RUNNER = RunnerInfo("torch", "torch", "torch-cpu-fp32", "PyTorch eager on the CPU",
                          make=lambda threads=None: TorchEagerRunner(threads=threads))


def runner_infos() -> dict[str, RunnerInfo]:
    """Every runner by name: the ones each registered target declares, then PyTorch eager."""
    from slimx.targets import all_targets

    out = {}
    for target in all_targets():
        for info in target.runners:
            out.setdefault(info.name, info)
    out[TORCH_RUNNER.name] = TORCH_RUNNER
    return out


def runner_info(name: str) -> RunnerInfo:
    infos = runner_infos()
    if name not in infos:
        raise UsageError(f"runner {name!r}", "is not a runner slimx knows", f"use one of {', '.join(infos)}")
    return infos[name]


def runner_missing_reason(name: str) -> str | None:
    """None when runner ``name`` can run on this host, else why not."""
    return runner_info(name).missing()


def available_runners() -> list[str]:
    return [n for n, info in runner_infos().items() if info.missing() is None]


def get_runner(name: str, threads: int | None = None):
    """A runner instance by name; UsageError with the reason when it cannot run here."""
    info = runner_info(name)
    why = info.missing()
    if why:
        raise UsageError(f"runner {name}", why, f"use one of {', '.join(available_runners())}")
    return info.make(threads=threads)


def default_runner_of(fmt: str) -> str:
    """The runner that runs artifacts of format ``fmt`` by default."""
    from slimx.targets import get_target

    target = get_target(fmt)
    if target.default_runner is None:
        raise UsageError(f"format {fmt}", "declares no runner", "profile it through an agent that has one")
    return target.default_runner


class RunnerLatencyModel:
    """A runner as a ``slim.base.LatencyModel``: a module compiled to the runner's format and timed here.

    Example:
        >>> import torch
        >>> got = RunnerLatencyModel("onnxruntime", threads=1, runs=5).latency(torch.nn.Linear(8, 8),
        ...                                                                   (torch.randn(1, 8),))  # doctest: +SKIP
        >>> got["kind"]  # doctest: +SKIP
        'measured'
    """

    kind = "measured"
    device = "host"

    def __init__(self, runner: str = "onnxruntime", threads: int | None = None, warmup: int = 3,
                 runs: int = 30) -> None:
        self.runner = get_runner(runner, threads=threads)
        self.format = runner_info(runner).format
        self.warmup, self.runs = warmup, runs

    def latency(self, module, example_inputs: tuple) -> dict:
        import tempfile

        from slimx.export.intake import spec_from_tensor
        from slimx.export.program import Program, export_program

        specs = [spec_from_tensor(f"input_{i}", t) for i, t in enumerate(example_inputs)]
        program = Program("model", export_program(module, example_inputs), module, specs, ["output"])
        with tempfile.TemporaryDirectory(prefix="slimx-latency-") as tmp:
            artifact = compile_for(program, self.format, Path(tmp))
            timing = self.runner.time(artifact, tuple(example_inputs), warmup=self.warmup, runs=self.runs)
        return {"ms": round(timing.median_ms, 4), "kind": self.kind, "device": self.device,
                "interval_ms": [round(timing.min_ms, 4), round(timing.p90_ms, 4)], "runtime": timing.runtime}


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

    def session(self, artifact):
        return self._module(artifact)

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
                samples = timed_calls(lambda: module(*inputs), warmup, runs)
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


def compile_for(program, fmt: str, out: Path):
    """The artifact a runner of format ``fmt`` times (the Program itself for PyTorch eager)."""
    from slimx.targets import CompileOptions, get_target

    if fmt == "torch":
        return program
    out.mkdir(parents=True, exist_ok=True)
    return get_target(fmt).compile(program, None, CompileOptions(), out)
