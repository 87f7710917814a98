"""Parity: how close an artifact's outputs are to the PyTorch model's on the same inputs."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slimx._core.errors import SlimxFailure


@dataclass(frozen=True)
class ParityTolerance:
    """When parity fails: cosine below ``min_cosine`` or relative error above ``max_rel_err``."""

    min_cosine: float = 0.9999
    max_rel_err: float = 1e-3


@dataclass
class ParityResult:
    measured: bool
    runtime: str = ""
    n_inputs: int = 0
    cosine: float | None = None
    max_abs: float | None = None
    rel_err: float | None = None
    passed: bool | None = None
    tolerance: dict = field(default_factory=dict)
    per_output: list[dict] = field(default_factory=list)
    data: str = "random"
    reason: str = ""

    def to_dict(self) -> dict:
        if not self.measured:
            return {"measured": False, "reason": self.reason}
        out = asdict(self)
        out.pop("reason")
        return out


def compare_outputs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Cosine similarity, max abs error and relative L2 error of flattened outputs.

    Example:
        >>> a = [np.ones(4, dtype=np.float32)]
        >>> compare_outputs(a, a)["cosine"]
        1.0
        >>> compare_outputs(a, [np.array([1, np.nan, 1, 1])])["cosine"]  # a NaN the model does not give fails
        0.0
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs vs {len(candidate)} from the artifact")
    per = []
    for ref, got in zip(reference, candidate, strict=True):
        ref = np.asarray(ref, dtype=np.float64).ravel()
        got = np.asarray(got, dtype=np.float64).ravel()
        if ref.shape != got.shape:
            raise ValueError(f"output sizes differ: {ref.size} vs {got.size}")
        # NaN/inf the reference does not have: the worst score, whatever the finite part says (a NaN cosine would
        # vanish in min() across batches, which keeps the first of two values when either is NaN)
        bad = int(np.count_nonzero(~np.isfinite(got) & np.isfinite(ref)))
        if bad:
            finite = np.isfinite(got) & np.isfinite(ref)
            ref, got = ref[finite], got[finite]
        diff = got - ref
        norm_ref, norm_got = np.linalg.norm(ref), np.linalg.norm(got)
        if bad:
            cosine = 0.0
        elif norm_ref == 0 and norm_got == 0:
            cosine = 1.0
        elif norm_ref == 0 or norm_got == 0:
            cosine = 0.0
        else:
            cosine = float(np.dot(ref, got) / (norm_ref * norm_got))
        per.append({
            "cosine": min(cosine, 1.0),
            "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
            "rel_err": float(np.linalg.norm(diff) / max(norm_ref, 1e-12)) if not bad else 1.0,
            **({"non_finite": bad} if bad else {}),
        })
    return {
        "cosine": min(p["cosine"] for p in per),
        "max_abs": max(p["max_abs"] for p in per),
        "rel_err": max(p["rel_err"] for p in per),
        "per_output": per,
    }


def check_parity(reference_fn, candidate_fn, batches: list[tuple], runtime: str,
                 tolerance: ParityTolerance, data: str = "random") -> ParityResult:
    """Run both on every batch; report the worst cosine, max abs and relative error.

    Args:
        reference_fn: inputs -> list of numpy outputs (the PyTorch model).
        candidate_fn: inputs -> list of numpy outputs (the artifact in its runtime).
        batches: input tuples; at least one.
        runtime: the artifact's runtime, for the record.
        tolerance: when to call it failed.
        data: "random" or a description of the calibration data used.
    """
    worst = {"cosine": 1.0, "max_abs": 0.0, "rel_err": 0.0}
    per_output: list[dict] = []
    for batch in batches:
        stats = compare_outputs(reference_fn(batch), candidate_fn(batch))
        worst["cosine"] = min(worst["cosine"], stats["cosine"])
        worst["max_abs"] = max(worst["max_abs"], stats["max_abs"])
        worst["rel_err"] = max(worst["rel_err"], stats["rel_err"])
        if not per_output:
            per_output = [dict(p) for p in stats["per_output"]]
        else:
            for acc, p in zip(per_output, stats["per_output"], strict=True):
                acc["cosine"] = min(acc["cosine"], p["cosine"])
                acc["max_abs"] = max(acc["max_abs"], p["max_abs"])
                acc["rel_err"] = max(acc["rel_err"], p["rel_err"])
    passed = worst["cosine"] >= tolerance.min_cosine and worst["rel_err"] <= tolerance.max_rel_err
    return ParityResult(measured=True, runtime=runtime, n_inputs=len(batches), passed=passed,
                        tolerance=asdict(tolerance), per_output=per_output, data=data, **worst)


def torch_outputs(module, batch: tuple) -> list[np.ndarray]:
    """Run a PyTorch module and flatten its outputs to numpy arrays."""
    import torch
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        out = module(*batch)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves, _ = tree_flatten(out)
    return [t.detach().float().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------- an artifact against its model

PARITY_SEED_BASE = 1000  # parity inputs are drawn from seeds the export example never used


def selection_tolerance(record: dict | None) -> dict | None:
    """The loosest relative-error ceiling the applied passes ask parity for, with why, or None. A pass that puts a
    selection in the graph (top-k attention) asks for one: where two scores tie to float precision, PyTorch and
    the runtime may keep different keys, so a few outputs move by a step while the cosine stays at 0.99999."""
    asks = [p["parity"] for p in (record or {}).get("passes", []) if p.get("parity")]
    return max(asks, key=lambda a: a["max_rel_err"]) if asks else None


def run_parity(program, target, artifact, tol, *, n: int = 8, seed: int = 0, threads: int | None = None, calib=None,
               precision: str = "fp32", selection: dict | None = None, rel_err_given: bool = False) -> dict:
    """The artifact in its own runtime against the PyTorch model, on fresh inputs and on calibration data.

    For a quantized artifact this is its drift from the fp32 model. A dynamic text artifact is checked at
    several lengths (1, short, the calibration median, the maximum), a dynamic batch at its smallest and largest
    size (``per_shape``). Where the target's
    runtime is missing here but the target names a proxy (TensorRT: its ONNX in onnxruntime), the proxy is run
    too and reported as ``proxy``: evidence about the graph and its Q/DQ scales, not the engine.
    """
    import numpy as np

    from slimx._core.inputs import sample_inputs
    from slimx.export.shapes import at_length, at_real_lengths, lengths_of, seq_range_of

    if program.module is None:
        return {"measured": False, "reason": "the input was ONNX: there is no PyTorch model to compare against"}
    loosened = None
    if selection is not None and not rel_err_given and selection["max_rel_err"] > tol.max_rel_err:
        tol = dataclasses.replace(tol, max_rel_err=selection["max_rel_err"])
        loosened = selection["why"]
    seed = PARITY_SEED_BASE + seed
    specs = program.inputs
    seq = seq_range_of(specs)
    sizes = []  # (axis, size): the dynamic axes' sizes parity is checked at
    if seq is not None:
        real = lengths_of(calib.batches, specs) if calib is not None else []
        typical = int(np.median(real)) if real else specs[0].shape[1]
        sizes += [(1, n_) for n_ in sorted({seq[0], min(max(8, seq[0]), seq[1]), min(max(typical, seq[0]), seq[1]),
                                            seq[1]})]
    batch = next(((lo, hi) for s in specs for a, lo, hi in s.dynamic if a == 0), None)
    if batch is not None:
        sizes += [(0, batch[0]), (0, batch[1])]
    groups = None
    if not sizes:
        batches = [sample_inputs(specs, seed=seed + i) for i in range(n)]
    else:
        each = max(1, -(-n // len(sizes)))
        groups = {(axis, size): [sample_inputs(at_length(specs, size) if axis == 1 else
                                               [s.sized({0: size}) for s in specs], seed=seed + 100 * size + i)
                                 for i in range(each)] for axis, size in sizes}
        batches = [b for group in groups.values() for b in group]
    if calib is not None and seq is not None:  # the data as it will be sent: each sample at its real length
        calib = dataclasses.replace(calib, batches=at_real_lengths(calib.batches, program.input_names))
    runner = target.runner(threads=threads)
    if runner is not None:
        result = _parity_in(runner, artifact, artifact.path, program, batches, calib, tol, groups)
    else:
        result = {"measured": False, "reason": target.runner_missing_reason()}
    proxy = target.proxy(artifact, threads=threads)
    if proxy is not None:
        path, runner, what = proxy
        result["proxy"] = _parity_in(runner, artifact, path, program, batches, calib, tol, groups)
        result["proxy"]["what"] = what
    result["precision"] = precision
    if loosened is not None:
        result["tolerance_why"] = loosened
    return result


def _parity_in(runner, artifact, path, program, batches, calib, tol, groups=None) -> dict:
    view = dataclasses.replace(artifact, path=path)
    session = runner.session(path)
    seen: dict[int, tuple] = {}  # outputs per batch, so the per-length figures reuse the overall run

    def outputs(batch):
        if id(batch) not in seen:
            seen[id(batch)] = (torch_outputs(program.module, batch), runner.run(view, batch, session=session))
        return seen[id(batch)]

    def reference(batch):
        return outputs(batch)[0]

    def candidate(batch):
        return outputs(batch)[1]

    result = check_parity(reference, candidate, batches, runner.name, tol).to_dict()
    if groups:
        result["per_shape"] = []
        for (axis, size), group in groups.items():
            one = check_parity(reference, candidate, group, runner.name, tol)
            result["per_shape"].append({"axis": "seq" if axis == 1 else "batch", "size": size,
                                        "n_inputs": one.n_inputs, "cosine": one.cosine, "rel_err": one.rel_err,
                                        "passed": one.passed})
    if calib is not None:
        on_data = check_parity(lambda b: torch_outputs(program.module, b),
                               lambda b: runner.run(view, b, session=session), calib.batches, runner.name, tol,
                               data=calib.describe()).to_dict()
        result["calibration"] = on_data
        result["passed"] = result["passed"] and on_data["passed"]
    return result


def parity_failure(parity: dict, artifact_name: str, out: Path) -> SlimxFailure | None:
    """The failure to raise (exit 1, report kept) when parity, or the proxy's where the runtime is missing,
    failed; None when it passed or could not be measured."""
    proxy = parity.get("proxy") or {}
    if not parity.get("measured") and proxy.get("measured") and not proxy["passed"]:
        return SlimxFailure(
            f"parity of {proxy.get('what', 'the ONNX form')}",
            f"cosine {proxy['cosine']:.6f} / rel err {proxy['rel_err']:.2e} is past the tolerance "
            f"(min cosine {proxy['tolerance']['min_cosine']}, max rel err {proxy['tolerance']['max_rel_err']}); "
            f"the report is in {out / 'report.json'}",
            "use more or better --calib data, another --precision, or loosen --min-cosine / --max-rel-err",
        )
    if parity.get("measured") and not parity["passed"]:
        failed = parity  # the fresh inputs, or else the calibration data that failed
        where = f"on {parity.get('n_inputs')} fresh inputs"
        calib = parity.get("calibration") or {}
        if calib and not calib.get("passed", True) and (parity.get("cosine", 0) >= parity["tolerance"]["min_cosine"]
                                                          and parity.get("rel_err", 0) <= parity["tolerance"][
                                                              "max_rel_err"]):
            failed, where = calib, f"on the calibration data ({calib.get('n_inputs')} samples, worst sample)"
        return SlimxFailure(
            f"parity of {artifact_name}",
            f"cosine {failed['cosine']:.6f} / rel err {failed['rel_err']:.2e} {where} is past the tolerance "
            f"(min cosine {parity['tolerance']['min_cosine']}, max rel err {parity['tolerance']['max_rel_err']}); "
            f"the report is in {out / 'report.json'}",
            "inspect the report, or loosen --min-cosine / --max-rel-err if this drift is acceptable",
        )
    return None
