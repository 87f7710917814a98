"""Fidelity of a compressed model to the original on real data: output cosine, nearest-neighbour agreement
for embeddings, and task accuracy when labels are given."""

from __future__ import annotations

import numpy as np


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray], labels: list[int] | None = None) -> dict:
    """Compare per-sample outputs (one array per sample, e.g. an embedding or logits).

    Example:
        >>> a = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 1.0])]
        >>> result = fidelity(a, a)
        >>> result["cosine_mean"], result["nn_agreement"]
        (1.0, 1.0)
    """
    ref = np.stack([np.asarray(r, dtype=np.float64).ravel() for r in reference])
    got = np.stack([np.asarray(c, dtype=np.float64).ravel() for c in candidate])
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)).clip(min=1e-12)
    out = {"samples": len(ref), "cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6)}
    if len(ref) >= 3:
        out["nn_agreement"] = round(float((_nearest(ref) == _nearest(got)).mean()), 4)
    if labels is not None:
        out["accuracy_reference"] = round(float((ref.argmax(1) == np.asarray(labels)).mean()), 4)
        out["accuracy"] = round(float((got.argmax(1) == np.asarray(labels)).mean()), 4)
    return out


def _nearest(x: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def torch_fidelity(reference_model, candidate_model, batches: list[tuple], labels=None) -> dict:
    from slimx.export.parity import torch_outputs

    ref = [torch_outputs(reference_model, b)[0] for b in batches]
    got = [torch_outputs(candidate_model, b)[0] for b in batches]
    return fidelity(ref, got, labels)
