"""onnxruntime as a runner: sessions, feeds, timing and its own per-op profiler.

Apart from the ONNX target (``targets.onnx``) so that the target's helpers (``targets.ort_fusions``) can run a
graph without importing the target that calls them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure, first_line
from slimx._core.inputs import to_numpy_inputs
from slimx.export.program import onnx_node_modules
from slimx.targets.base import Artifact, Timing

_ONNX_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OrtRunner:
    """onnxruntime on this host's CPU (or the execution providers given).

    Example:
        >>> runner = OrtRunner(threads=1)  # doctest: +SKIP
        >>> runner.time(artifact, inputs, warmup=5, runs=30).median_ms  # doctest: +SKIP
    """

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, providers: list[str] | None = None,
                 simulate_qdq: bool = False) -> None:
        """``simulate_qdq``: run Q/DQ pairs as written (float math on quantized values) instead of fusing
        them into onnxruntime's int8 kernels. That is the arithmetic of a TensorRT engine (int8 products,
        wide accumulation); the fused x86 kernels saturate on CPUs without VNNI (AVX2 only), which on
        this project's tiny MLP took symmetric int8 from cosine 0.9998 to 0.972."""
        self.threads = threads or os.cpu_count() or 1
        self.providers = providers or ["CPUExecutionProvider"]
        self.simulate_qdq = simulate_qdq

    @property
    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def session(self, path: Path, profile_dir: str | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if self.simulate_qdq:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(profile_dir, "ort")
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:
            raise SlimxFailure(f"onnxruntime could not load {path}", first_line(exc),
                               "check the model with onnx.checker, or try another --opset") from exc

    def feed(self, session, inputs: tuple) -> dict:
        """The session's input dict for ``inputs`` (tensors or arrays), cast to the dtypes the graph declares."""
        arrays = to_numpy_inputs(inputs)
        feed = {}
        for meta, arr in zip(session.get_inputs(), arrays, strict=True):
            want = _ONNX_DTYPE.get(meta.type)
            feed[meta.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
        return feed

    def run(self, artifact: Artifact, inputs: tuple, session=None) -> list[np.ndarray]:
        session = session or self.session(artifact.path)
        return session.run(None, self.feed(session, inputs))

    def time(self, artifact: Artifact, inputs: tuple, warmup: int = 5, runs: int = 50,
             per_op: bool = True, profile_runs: int = 10) -> Timing:
        """Median/p90 over ``runs`` timed calls after ``warmup``; per-op times from ORT's profiler.

        The profiler runs in a separate session so that its overhead stays out of the timings.
        """
        session = self.session(artifact.path)
        feed = self.feed(session, inputs)
        timing = Timing.measure(lambda: session.run(None, feed), warmup, runs, runtime=self.name,
                                runtime_version=self.version, threads=self.threads)
        if per_op:
            timing.per_op, timing.per_node = self.profile(artifact, inputs, profile_runs)
        return timing

    def profile(self, artifact: Artifact, inputs: tuple, runs: int = 10, top: int = 15):
        """Per-op-type and per-node times (ms per inference) from onnxruntime's own profiler."""
        node_scopes = onnx_node_modules(artifact.path)
        with tempfile.TemporaryDirectory(prefix="slimx-ortprof-") as tmp:
            session = self.session(artifact.path, profile_dir=tmp)
            feed = self.feed(session, inputs)
            session.run(None, feed)  # warm-up, excluded below
            session.end_profiling()
            session = self.session(artifact.path, profile_dir=tmp)
            for _ in range(runs):
                session.run(None, feed)
            trace = session.end_profiling()
            with open(trace) as fh:
                events = json.load(fh)
        by_op: dict[str, dict] = {}
        by_node: dict[str, dict] = {}
        for ev in events:
            if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
                continue
            op = ev.get("args", {}).get("op_name", "?")
            node = ev["name"][: -len("_kernel_time")]
            dur_ms = ev.get("dur", 0) / 1000.0
            entry = by_op.setdefault(op, {"op": op, "ms": 0.0, "calls": 0})
            entry["ms"] += dur_ms
            entry["calls"] += 1
            n = by_node.setdefault(node, {"node": node, "op": op, "ms": 0.0,
                                          "module": node_scopes.get(node.split("/")[0], "")})
            n["ms"] += dur_ms
        total = sum(e["ms"] for e in by_op.values()) or 1.0
        ops = []
        for e in sorted(by_op.values(), key=lambda e: -e["ms"]):
            ops.append({"op": e["op"], "ms": round(e["ms"] / runs, 4), "share": round(e["ms"] / total, 4),
                        "count": e["calls"] // runs})
        nodes = [{**n, "ms": round(n["ms"] / runs, 4)} for n in sorted(by_node.values(), key=lambda n: -n["ms"])]
        return ops, nodes[:top]
