"""Parity: how close an artifact's outputs are to the PyTorch model's on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


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
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs vs {len(candidate)} from the artifact")
    per = []
    for ref, got in zip(reference, candidate, strict=True):
        ref = np.asarray(ref, dtype=np.float64).ravel()
        got = np.asarray(got, dtype=np.float64).ravel()
        if ref.shape != got.shape:
            raise ValueError(f"output sizes differ: {ref.size} vs {got.size}")
        diff = got - ref
        norm_ref, norm_got = np.linalg.norm(ref), np.linalg.norm(got)
        if norm_ref == 0 and norm_got == 0:
            cosine = 1.0
        elif norm_ref == 0 or norm_got == 0:
            cosine = 0.0
        else:
            cosine = float(np.dot(ref, got) / (norm_ref * norm_got))
        per.append({
            "cosine": min(cosine, 1.0),
            "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
            "rel_err": float(np.linalg.norm(diff) / max(norm_ref, 1e-12)),
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
