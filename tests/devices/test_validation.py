"""Grouped cross-validation, the baseline and intervals (issue 12): a fit is scored on families it never saw."""

from __future__ import annotations

import numpy as np

from slimx.devices.validation import (
    family_of,
    fit_baseline,
    grouped_cv,
    interval_coverage,
    nested_coverage,
    predict_baseline,
    summarize,
)


def _families(seed=0):
    """Five families of four models each; latency is 1 ms per GMAC times a per-family factor (what leaving a
    row out cannot see: its siblings carry the family's factor into the fit)."""
    rng = np.random.default_rng(seed)
    factors = {"a": 0.6, "b": 0.8, "c": 1.0, "d": 1.3, "e": 1.7}
    groups, gmacs, measured = [], [], []
    for fam, f in factors.items():
        for size in rng.uniform(0.5, 4.0, 4):
            groups.append(fam)
            gmacs.append(size)
            measured.append(size * f)
    return groups, np.array(gmacs), np.array(measured)


def test_leaving_a_family_out_shows_what_leaving_a_row_out_hides():
    groups, gmacs, measured = _families()
    onehot = np.array([[g == f for f in "abcde"] for g in groups], dtype=float)

    def per_family(train, test):  # a model free enough to learn each family's factor from its siblings
        x = np.hstack([onehot * gmacs[:, None]])
        w, *_ = np.linalg.lstsq(x[train], measured[train], rcond=None)
        return np.maximum(x[test] @ w, 1e-3)

    loo = summarize(np.array([per_family(np.setdiff1d(np.arange(20), [i]), np.array([i]))[0] for i in range(20)]),
                    measured, "leave-one-out")
    grouped = grouped_cv(20, groups, per_family, measured)
    assert loo["mape_pct"] < 1 and grouped["mape_pct"] > 50, (loo["mape_pct"], grouped["mape_pct"])
    assert grouped["method"] == "leave-one-family-out (5 families)" and grouped["groups"] == list("abcde")


def test_interval_covers_unseen_families_about_as_stated():
    groups, gmacs, measured = _families(1)

    def pooled(train, test):  # one slope for everyone: the spread between families is the error
        slope = np.median(measured[train] / gmacs[train])
        return gmacs[test] * slope

    cv = grouped_cv(20, groups, pooled, measured)
    lo, hi = cv["interval_factors"]
    assert lo < 1 < hi
    assert 0.6 <= interval_coverage(gmacs * np.median(measured / gmacs), measured, [lo, hi]) <= 1.0
    nested = nested_coverage(groups, pooled, measured)
    assert nested["method"].startswith("nested") and 0.0 <= nested["coverage"] <= 1.0
    assert nested_coverage(groups[:12], pooled, measured[:12])["coverage"] is None, "3 families: too few"


def test_too_few_families_is_said_not_guessed():
    cv = grouped_cv(4, ["a", "a", "b", "b"], lambda tr, te: np.ones(len(te)), np.ones(4))
    assert cv["errors_pct"] == [] and "too few" in cv["method"]


def test_baseline_is_non_negative_and_relative():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(0.1, 5, 30), rng.uniform(0.1, 1, 30), np.zeros(30), np.ones(30)])
    y = x @ np.array([1.5, 0.0, 0.0, 0.3]) * rng.uniform(0.95, 1.05, 30)
    coef = fit_baseline(x, y)
    assert all(v >= 0 for v in coef.values()) and abs(coef["ms_per_gmac"] - 1.5) < 0.15
    assert np.median(np.abs(predict_baseline(x, coef) / y - 1)) < 0.05


def test_case_rows_are_their_own_groups():
    assert family_of("case:conv/64x64/k3s1/56") == "case:conv/64x64/k3s1/56"
    cv = grouped_cv(3, ["case:a", "case:b", "case:c"], lambda tr, te: np.ones(len(te)), np.ones(3))
    assert cv["method"] == "leave-one-case-out (3 cases)"
