"""How far a latency fit can be trusted on models it never saw: grouped cross-validation, a small baseline to
beat, and intervals sized from held-out residuals.

Leave-one-row-out flatters a fit: a row's siblings (EfficientFormer-L3 when L1 is held out) stay in the
training set, so an error that is really "this family runs differently" never shows. Here rows are grouped
by architecture family (``efficientformer``, ``efficientformerv2``, ``repvit``, ``resnet``, ...) and every
family is predicted by a fit that saw none of it. That figure is what an estimate states as its expected
error, and the interval an estimate carries is cut from the same held-out residuals (measured / predicted) at
split-conformal ranks: with n held-out rows, the k-th smallest and k-th largest ratio, k = floor((n + 1) * 0.1),
never less than 1. Plain 10th/90th percentiles of a dozen rows are too narrow: nested grouped CV covered 64% of
iPhone 12 rows with them, where the conformal ranks cover 71% (and cover the 4-device Jetson family's
leave-one-device-out rows 68% of the time against 64%).

The baseline is latency = a * GMACs + b * op count + c * MB moved + d (non-negative, relative-error
weighted least squares): the per-op model ships for a setting only where its grouped error is at or below
the baseline's.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

INTERVAL_COVERAGE = 0.8  # the share of unseen models an interval is sized to cover
_FAMILY = re.compile(r"^(?:tf_|tv_|test_)?([a-z]+?(?:v\d+)?)(?=\d|_|$)")


def family_of(spec: str) -> str:
    """The architecture family of a sample: a timm model's name without its size. A microbench case is its
    own group: the cases are single ops chosen to pin the per-op parameters, not model families.

    Example:
        >>> [family_of(s) for s in ("timm:efficientformer_l1@224", "timm:efficientformerv2_s0@224",
        ...                         "timm:resnet50@224", "timm:mobilenetv3_large_100@224",
        ...                         "timm:tf_mobilenetv3_large_100@224", "case:linear/t128/384x1536")]
        ['efficientformer', 'efficientformerv2', 'resnet', 'mobilenetv3', 'mobilenetv3', 'case:linear/t128/384x1536']
    """
    kind, _, rest = spec.partition(":")
    if kind == "case":
        return spec
    name = rest.split("@")[0].lower()
    match = _FAMILY.match(name)
    return match.group(1) if match else name


def grouped_cv(n: int, groups: list[str], fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
               measured: np.ndarray) -> dict:
    """Leave-one-group-out: each group predicted by ``fit_predict(train_idx, test_idx)`` fitted without it.

    Returns signed % errors per row, their summary (mean and median absolute, within ±15%, Spearman rank
    correlation of predicted vs measured) and the interval factors: the (1 - c) / 2 and (1 + c) / 2 quantiles
    of measured / predicted over the held-out rows, c = ``INTERVAL_COVERAGE``.
    """
    names = sorted(set(groups))
    what = "case" if all(g.startswith("case:") for g in names) else "family"
    plural = "cases" if what == "case" else "families"
    if len(names) < 3:
        return {"method": f"none ({len(names)} {plural}: too few to leave one out)", "errors_pct": [],
                "groups": names}
    index = np.asarray([names.index(g) for g in groups])
    pred = np.empty(n)
    for g in range(len(names)):
        test = np.flatnonzero(index == g)
        train = np.flatnonzero(index != g)
        pred[test] = fit_predict(train, test)
    return summarize(pred, measured, f"leave-one-{what}-out ({len(names)} {plural})", names)


def summarize(pred: np.ndarray, measured: np.ndarray, method: str, groups: list[str] | None = None,
              weights: np.ndarray | None = None) -> dict:
    """Held-out errors of ``pred`` against ``measured`` and the interval factors they imply. ``weights``: how
    much each row counts (leave-one-device-out weighs each device's rows 1 / its row count, so that a device
    with 47 rows does not speak for a device without any); the figures are then weighted ones."""
    errors = (pred / measured - 1.0) * 100.0
    ratio = measured / pred
    w = np.full(len(errors), 1.0 / max(len(errors), 1)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    absolute = np.abs(errors)
    out = {"method": method, "errors_pct": errors.round(2).tolist(),
           "mape_pct": round(float(np.sum(w * absolute)), 2),
           "median_abs_pct": round(weighted_median(absolute, w), 2),
           "within_15pct": round(float(np.sum(w * (absolute <= 15.0))), 3),
           "max_abs_pct": round(float(np.max(absolute)), 2),
           "spearman": round(spearman(pred, measured), 3),
           "interval_factors": conformal_interval(ratio, INTERVAL_COVERAGE, weights)}
    if groups is not None:
        out["groups"] = groups
    return out


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at half the total weight (the mean of the two middle values where equal weights split evenly,
    as ``np.median``).

    Example:
        >>> weighted_median(np.array([1.0, 2.0, 10.0]), np.array([1.0, 1.0, 1.0]))
        2.0
        >>> weighted_median(np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4))
        2.5
        >>> weighted_median(np.array([1.0, 2.0, 10.0]), np.array([0.1, 0.1, 0.8]))
        10.0
    """
    order = np.argsort(values)
    v, c = np.asarray(values, float)[order], np.cumsum(np.asarray(weights, float)[order])
    c = c / c[-1]
    i = int(np.searchsorted(c, 0.5 - 1e-12))
    if abs(c[i] - 0.5) < 1e-12 and i + 1 < len(v):
        return float((v[i] + v[i + 1]) / 2)
    return float(v[i])


def conformal_interval(ratio: np.ndarray, coverage: float, weights: np.ndarray | None = None) -> list[float]:
    """``[lo, hi]`` factors from held-out ratios (measured / predicted) at split-conformal ranks: the k-th smallest
    and the k-th largest, k = floor((n + 1) * (1 - coverage) / 2), at least 1. For n exchangeable held-out rows a
    new row falls inside with probability at least ``coverage`` when k >= 1 by that formula; with fewer rows
    (n < 9 at 80%) k is held at 1, the whole observed range, which is then all the data can say.

    With ``weights`` (rows of unequal say), n is the effective count 1 / sum(w^2) of the normalised weights and
    the bounds are where the weights accumulated from either end first reach k / n; equal weights give the
    ranks above.

    Example:
        >>> conformal_interval(np.arange(1, 15) / 10, 0.8)  # 14 rows: k = 1, the extremes
        [0.1, 1.4]
        >>> conformal_interval(np.arange(1, 40) / 10, 0.8)  # 39 rows: k = 4
        [0.4, 3.6]
        >>> conformal_interval(np.arange(1, 40) / 10, 0.8, np.ones(39))  # the same
        [0.4, 3.6]
    """
    order = np.argsort(np.asarray(ratio, dtype=float))
    r = np.asarray(ratio, dtype=float)[order]
    n = len(r)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)[order]
    w = w / w.sum()
    n_eff = round(1.0 / float(np.sum(w ** 2)), 6)
    k = max(int(np.floor((n_eff + 1) * (1 - coverage) / 2 + 1e-9)), 1)
    level = min(k / n_eff, 1.0) - 1e-9
    lo = int(np.searchsorted(np.cumsum(w), level))
    hi = n - 1 - int(np.searchsorted(np.cumsum(w[::-1]), level))
    lo, hi = min(lo, n - 1), max(hi, 0)
    return [round(float(r[lo]), 4), round(float(r[hi]), 4)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties).

    Example:
        >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
        0.5
    """
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def nested_coverage(groups: list[str], fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    measured: np.ndarray) -> dict:
    """How often the stated interval covers an unseen family, measured honestly: for each family, the interval
    is cut from a grouped CV over the *other* families only, then the family is predicted by a fit without it
    and its rows are checked against that interval. Needs 4 or more families (3 left for the inner CV)."""
    names = sorted(set(groups))
    if len(names) < 4:
        return {"method": "none (needs 4 or more families)", "coverage": None}
    index = np.asarray([names.index(g) for g in groups])
    inside = np.zeros(len(groups), dtype=bool)
    for g in range(len(names)):
        rest = np.flatnonzero(index != g)
        test = np.flatnonzero(index == g)
        inner = grouped_cv(len(rest), [groups[i] for i in rest],
                           lambda tr, te, rest=rest: fit_predict(rest[tr], rest[te]), measured[rest])
        lo, hi = inner["interval_factors"]
        pred = fit_predict(rest, test)
        inside[test] = (measured[test] >= pred * lo) & (measured[test] <= pred * hi)
    return {"method": f"nested leave-one-family-out ({len(names)} families)",
            "coverage": round(float(inside.mean()), 3), "target": INTERVAL_COVERAGE}


def interval_coverage(pred: np.ndarray, measured: np.ndarray, factors: list[float]) -> float:
    """The share of rows whose measurement lies inside [pred * lo, pred * hi]."""
    lo, hi = factors
    return float(np.mean((measured >= pred * lo) & (measured <= pred * hi)))


# --- the baseline ---------------------------------------------------------------------------------------

BASELINE_TERMS = ("ms_per_gmac", "us_per_op", "ms_per_gb", "fixed_ms")


def baseline_features(features) -> np.ndarray:
    """[GMACs, op count, GB moved, 1] of a model's priced op mix (``estimator.Features``): what a
    three-term linear latency model sees."""
    from slimx.devices.opmix import COMPUTE_CLASSES, OP_CLASSES

    compute = np.isin(features.cls, [OP_CLASSES.index(c) for c in COMPUTE_CLASSES])
    gmacs = float(features.flops[compute].sum()) / 2e9
    return np.array([gmacs, float(len(features.cls)) / 1e3, float(features.bytes.sum()) / 1e9, 1.0])


def fit_baseline(x: np.ndarray, measured: np.ndarray) -> dict:
    """Non-negative least squares on relative error: minimise sum(((x @ w) - y) / y)^2, w >= 0.

    Example:
        >>> x = np.array([[1.0, 1, 0, 1], [2, 1, 0, 1], [4, 2, 0, 1]])
        >>> w = fit_baseline(x, x @ np.array([2.0, 0.5, 0, 0.1]))
        >>> round(w["ms_per_gmac"], 3), round(w["fixed_ms"], 3)
        (2.0, 0.1)
    """
    from scipy.optimize import nnls

    a = x / measured[:, None]
    w, _ = nnls(a, np.ones(len(measured)))
    return {"ms_per_gmac": float(w[0]), "us_per_op": float(w[1]), "ms_per_gb": float(w[2]), "fixed_ms": float(w[3])}


def predict_baseline(x: np.ndarray, coef: dict) -> np.ndarray:
    w = np.array([coef[t] for t in BASELINE_TERMS])
    return np.maximum(x @ w, 1e-6)


def baseline_parts(x: np.ndarray, coef: dict) -> np.ndarray:
    """The baseline's milliseconds per row of x = [GMACs, op count, GB, 1] split into [compute, memory, per-layer]:
    the GMACs term, the bytes term, the op and fixed terms (``devices.anchors.PARTS``).

    Example:
        >>> coef = {"ms_per_gmac": 2.0, "us_per_op": 0.5, "ms_per_gb": 1.0, "fixed_ms": 0.1}
        >>> baseline_parts(np.array([[1.0, 2.0, 0.5, 1.0]]), coef).round(2).tolist()
        [[2.0, 0.5, 1.1]]
    """
    terms = x * np.array([coef[t] for t in BASELINE_TERMS])
    return np.column_stack([terms[:, 0], terms[:, 2], terms[:, 1] + terms[:, 3]])
