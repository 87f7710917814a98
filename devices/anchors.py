"""Anchors: a user's own timings of a device, which put its estimates on the user's measurement setup.

The shipped profile's estimate is for the setup its data came from (a timing tool, an OS and runtime version);
another setup differs from it by about one factor for every model (``bench/results/estimator_generalization.md``,
leave-one-setup-out). A user who has timed a few models on their own device knows that factor: with k anchors of
log ratio l_i = log(measured / estimated), the anchored estimate is ``estimate x exp(mean l)`` and its 80%
interval ``exp(+-t * s * sqrt(1 + 1/k))``, where s pools the family's within-setup spread s0 (``anchoring.toml``,
measured leave-one-setup-out, weight ``prior_weight``) with the anchors' own, and t is Student's 0.9 quantile at
those degrees of freedom: anchors that agree narrow the interval, anchors that disagree widen it, and a spread
the family's data cannot explain (a chi-square test at 1%) is said in words.

A setup differs by more than one factor: its runtime's cost per layer, against its cost per multiply-accumulate,
is its own too, so within one setup the log ratio drifts with a model's op density z = log(ops per GMAC) (on the
published tables a line in z takes the one-factor spread of 0.25-0.27 in log units to 0.10-0.20). Where the
anchors carry their op mix, the anchored log ratio is a line l = a + b (z - z_anchors) with b shrunk toward 0 by
the slope spread tau the family's other setups show (ridge: b = S_zl / (S_zz + s^2 / tau^2)); one anchor, or
anchors of one density, leave b at 0 and widen the interval of a model far from them in z by
(z - z_anchors)^2 var(b). The disagreement test then asks whether the anchors' spread is beyond what the
family's line-and-scatter allows.

Where the anchors carry the estimate's split into compute, memory and per-layer work (``PARTS``; every anchor
this slimx records), each part gets a factor of its own instead: l = log(sum_j s_j e^p_j), the p_j fitted to the
anchors with each shrunk toward 0 by how far the family's setups move that part (``part_spread``,
``anchoring.toml``'s part_log_sd). On the published tables, leave-one-setup-out with two anchors, that takes the
line's median error from 14.9 / 12.6 / 9.7% to 10.4 / 10.6 / 5.6% (Jetson, Apple Neural Engine, Pixel). The line
and one factor remain for older anchors.

Without anchors, the user's setup is one the fit never saw: ``unanchored`` widens the stated interval by the
family's spread between setups (``between_setup_sd``, ``anchoring.toml``'s setup_log_sd) in quadrature, Student's
t at as many degrees of freedom as setups it was measured on. Leave-one-setup-out that takes the coverage of an
unseen setup's rows from 35 / 50 / 1% to 78 / 82 / 100% (Jetson, Apple Neural Engine, Pixel).

Anchors live in a user layer (``<user profile folder>/anchors/<device>.json``) over the shipped profile, which is
never edited. Each anchor keeps the raw estimate it was taken against and that estimator's fingerprint, so a
recalibrated profile does not silently mix old and new (``slimx devices anchor D --refresh`` re-estimates them).
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from slimx._core.errors import UsageError

PRIOR_FILE = Path(__file__).parent / "anchoring.toml"
COVERAGE = 0.8
DISAGREE_P = 0.01  # anchors whose spread a chi-square test puts beyond the family's at this level: said so
DEFAULT_SETUP = "your setup"
# how many degrees of freedom the family's within-setup spread counts for against the anchors' own (set, not
# fitted: enough that two anchors which happen to agree closely do not claim a razor-thin interval)
PRIOR_WEIGHT = 6.0
# the farthest in op density (natural log, a factor of e^3 = 20 in ops per GMAC) a slope is carried from the
# anchors' mean: beyond it the line and the interval's widening are held, never extrapolated
MAX_DENSITY_STEP = 3.0
# op densities the line is believed over: the published tables' models span -6.7 (VGG) to 1.7 (the smallest
# MobileNets); one unit beyond either end. A model of almost no multiply-accumulates (a test's tiny MLP: 7) counts
# as the nearest end, so a line never explains a ratio by an op density no measured model had
DENSITY_RANGE = (-8.0, 3.0)
# the three parts of an estimate a setup may price differently from the profile's data (``estimator.split_parts``)
PARTS = ("compute", "memory", "per-layer")


@dataclass
class Anchor:
    model: str  # the MODEL spec timed
    input_shapes: list  # as given to the estimator (``--input-shape`` form)
    measured_ms: float
    estimated_ms: float  # the un-anchored estimate of the same model, same setting
    setting: str  # the estimator setting it anchors
    fit: str  # the estimator's fingerprint when it was taken
    source: str  # how it was measured: "given", "agent URL", "learned: slimx profile"
    when: str = ""
    gmacs: float | None = None  # the model's multiply-accumulates (compute ops), billions; None: an older anchor
    ops: int | None = None  # the ops priced
    shares: list | None = None  # the estimate's [compute, memory, per-layer] split (``PARTS``); None: older anchor

    @property
    def log_ratio(self) -> float:
        return math.log(self.measured_ms / self.estimated_ms)

    @property
    def density(self) -> float | None:
        return None if self.gmacs is None or self.ops is None else op_density(self.ops, self.gmacs)


def op_density(ops: int, gmacs: float) -> float:
    """z = log(thousands of ops priced per GMAC): how much of a model's time is per-layer cost rather than
    arithmetic (high for a small MobileNet, low for a VGG).

    Example:
        >>> round(op_density(1000, 1.0), 3), round(op_density(100, 4.0), 3)
        (0.0, -3.689)
    """
    return math.log(max(ops, 1) / 1e3 / max(gmacs, 1e-6))


def anchors_dir() -> Path:
    from slimx.devices.registry import user_profile_dir

    return user_profile_dir() / "anchors"


def anchors_path(device: str) -> Path:
    return anchors_dir() / f"{device}.json"


def read_anchors(device: str) -> dict:
    """``{"device", "setup", "anchors": [Anchor, ...]}`` of a device (no anchors: an empty list)."""
    path = anchors_path(device)
    if not path.is_file():
        return {"device": device, "setup": DEFAULT_SETUP, "anchors": []}
    try:
        data = json.loads(path.read_text())
        anchors = [Anchor(**a) for a in data.get("anchors", [])]
    except (ValueError, TypeError) as exc:
        raise UsageError(f"anchors file {path}", f"cannot be read ({type(exc).__name__}: {exc})",
                         f"fix or delete it (`slimx devices anchor {device} --clear`)") from None
    return {"device": device, "setup": data.get("setup") or DEFAULT_SETUP, "anchors": anchors}


def write_anchors(device: str, setup: str, anchors: list[Anchor]) -> Path:
    """Write the anchors file whole (a temporary file renamed over it: never half written)."""
    path = anchors_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"device": device, "setup": setup, "anchors": [asdict(a) for a in anchors]},
                              indent=2) + "\n")
    tmp.replace(path)
    _cached_anchors.cache_clear()
    return path


@lru_cache(maxsize=64)
def _cached_anchors(device: str, path: str, mtime: float) -> dict:
    return read_anchors(device)


def anchors_of(device: str) -> dict:
    """The device's anchors, read once per change of its file."""
    path = anchors_path(device)
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    return _cached_anchors(device, str(path), mtime)


def _plain(value):
    """JSON for what ``json`` cannot write: sets sorted (their order changes between processes), the rest as text."""
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def fingerprint(device, setting) -> str:
    """What an estimate of ``setting`` on ``device`` depends on: the setting's figures and the device's rates."""
    import dataclasses

    blob = json.dumps([dataclasses.asdict(setting), device.memory, [dataclasses.asdict(cu) for cu in
                                                                    device.compute_units]],
                      sort_keys=True, default=_plain)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- the spread the family's data shows


@lru_cache(maxsize=1)
def _priors() -> dict:
    with PRIOR_FILE.open("rb") as fh:
        return tomllib.load(fh)


def spread_prior(device: str, setting: str | None = None) -> dict:
    """The within-setup spread (sd of log measured/estimated among one setup's models) the family of ``device``
    (and of its estimator ``setting``) shows leave-one-setup-out, its weight, and where it comes from; devices
    and settings outside a family with such data get the default."""
    from slimx.devices.setups import FAMILIES

    data = _priors()
    family = next((f for f in FAMILIES.values() if any(m.profile == device for m in f.members)
                   and (setting is None or f.setting == setting) and f.name in data.get("family", {})), None)
    table = data["family"][family.name] if family is not None else None
    basis = f"the {family.name} family" if table else "the default (no family data for this device and setting)"
    table = table or data["default"]
    return {"sd": float(table["within_setup_log_sd"]), "weight": PRIOR_WEIGHT, "basis": basis,
            "source": table["within_setup_log_sd_source"], "line_sd": float(table["line_log_sd"]),
            "slope_sd": float(table["density_slope_sd"]),
            "part_sd": [float(v) for v in table["part_log_sd"]] if "part_log_sd" in table else None,
            "setup_sd": float(table["setup_log_sd"]) if "setup_log_sd" in table else None,
            "setups": float(table.get("setup_count", PRIOR_WEIGHT)), "setup_source": table.get("setup_source")}


def within_setup_sd(groups) -> float:
    """The spread of log ratios around each group's own median (groups: one setup on one device), over the
    groups of two or more rows: 1.4826 x the median absolute deviation, pooled (a normal's sd; robust to the odd
    model whose ops leave the accelerator, which a plain sd lets set every interval).

    Example:
        >>> round(within_setup_sd([[0.0, 0.2], [1.0, 1.2, 1.4], [5.0]]), 3)
        0.148
    """
    import numpy as np

    dev = []
    for g in groups:
        g = np.asarray(g, dtype=float)
        if len(g) >= 2:
            dev += list(np.abs(g - np.median(g)))
    return float(1.4826 * np.median(dev)) if dev else float("nan")


def between_setup_sd(groups) -> float:
    """How far a setup's own factor sits from the profile's: the root mean square of each group's median log ratio
    (groups: one setup on one device, each row predicted by a fit that never saw that setup; each group counts
    once). ``within_setup_sd`` is the spread about those medians, so the two add in quadrature to what a user
    whose setup is not anchored can expect.

    Example:
        >>> round(between_setup_sd([[0.0, 0.2], [1.0, 1.2, 1.4], [-0.5]]), 3)
        0.753
    """
    import numpy as np

    meds = [float(np.median(np.asarray(g, dtype=float))) for g in groups if len(g)]
    return math.sqrt(float(np.mean(np.square(meds)))) if meds else float("nan")


def unanchored_interval(interval_factors, setup_sd: float, setups: float = PRIOR_WEIGHT,
                        coverage: float = COVERAGE) -> list[float]:
    """The stated interval of a setup not anchored: each side of the profile's interval (a model unseen, its setup
    the profile's) put in quadrature with the family's spread between setups (``between_setup_sd``) times
    Student's t quantile at ``setups`` degrees of freedom, the number of setups that spread was measured on (a new
    setup's factor predicted from the factors of a few: the textbook predictive interval of a spread about a known
    centre).

    Example:
        >>> [round(v, 3) for v in unanchored_interval([0.8, 1.25], 0.5, setups=6)]
        [0.471, 2.125]
        >>> [round(v, 3) for v in unanchored_interval([0.8, 1.25], 0.5, setups=2)]
        [0.38, 2.635]
    """
    from scipy.stats import t

    h = float(t.ppf(0.5 + coverage / 2, setups)) * setup_sd
    lo, hi = interval_factors
    lo_h = math.sqrt(math.log(1 / max(lo, 1e-9)) ** 2 + h * h) if lo > 0 else math.inf
    return [math.exp(-lo_h), math.exp(math.sqrt(math.log(max(hi, 1e-9)) ** 2 + h * h))]


def setup_spread(groups) -> dict:
    """The family's scatter around a line in op density, and the spread of that line's slope, from groups of
    ``(log_ratios, densities)`` (one setup on one device each; groups of 4 or more rows with densities apart).
    ``line_sd``: 1.4826 x the median absolute deviation of the residuals of each group's own least-squares line
    (each scaled by sqrt(n / (n - 2)) for the two fitted numbers); ``slope_sd``: sqrt(mean b^2 - mean var(b)), the
    slopes' spread less their sampling noise, at least 0.05.

    Example:
        >>> z = [0.0, 1.0, 2.0, 3.0]
        >>> got = setup_spread([([0.0, 0.2, 0.4, 0.6], z), ([1.0, 0.9, 0.8, 0.7], z)])
        >>> round(got["slope_sd"], 3), got["groups"]
        (0.158, 2)
    """
    import numpy as np

    res, slopes, noise = [], [], []
    for lr, z in groups:
        lr, z = np.asarray(lr, dtype=float), np.asarray(z, dtype=float)
        zc = z - z.mean()
        s_zz = float(np.sum(zc * zc))
        if len(lr) < 4 or s_zz < 1e-9:
            continue
        b = float(np.sum(zc * (lr - lr.mean())) / s_zz)
        e = lr - lr.mean() - b * zc
        res += list(np.abs(e - np.median(e)) * math.sqrt(len(lr) / (len(lr) - 2)))
        slopes.append(b)
        noise.append(s_zz)
    if not slopes:
        return {"line_sd": float("nan"), "slope_sd": float("nan"), "groups": 0}
    line_sd = float(1.4826 * np.median(res))
    tau2 = float(np.mean(np.square(slopes)) - np.mean([line_sd ** 2 / s for s in noise]))
    return {"line_sd": line_sd, "slope_sd": math.sqrt(max(tau2, 0.05 ** 2)), "groups": len(slopes)}


def parts_log_ratio(log_factors, shares):
    """log(sum_j s_j e^p_j) for each row of ``shares`` (the profile's split of an estimate into ``PARTS``) under
    part log factors p, and its gradient in p (each part's share of the anchored time)."""
    import numpy as np

    w = np.log(np.maximum(np.atleast_2d(np.asarray(shares, dtype=float)), 1e-12)) + np.asarray(log_factors)[None, :]
    top = w.max(axis=1, keepdims=True)
    e = np.exp(w - top)
    total = e.sum(axis=1, keepdims=True)
    return (top + np.log(total))[:, 0], e / total


def fit_parts(log_ratios, shares, sd: float, part_sd, iters: int = 100):
    """The log factor of each part (compute, memory, per-layer) k anchors say, each shrunk toward 0 (the
    profile's own pricing) by how far setups move it (``part_sd``): the minimum of
    sum_i (l_i - log(sum_j s_ij e^p_j))^2 / sd^2 + sum_j p_j^2 / part_sd_j^2, by Gauss-Newton steps halved until
    they descend, from p = 0. Returns (p, its covariance at the minimum).

    Example:
        >>> import numpy as np
        >>> # a setup whose per-layer work costs 3x the profile's, compute and memory as priced
        >>> s = np.array([[0.9, 0.05, 0.05], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
        >>> p, _ = fit_parts(np.log(s @ [1, 1, 3]), s, 0.05, [0.5, 0.5, 1.5])
        >>> [round(float(np.exp(v)), 2) for v in p]
        [1.0, 1.01, 3.0]
    """
    import numpy as np

    lr = np.asarray(log_ratios, dtype=float)
    shares = np.atleast_2d(np.asarray(shares, dtype=float))
    prec = np.diag(1.0 / np.square(np.asarray(part_sd, dtype=float)))

    def objective(p):
        r = lr - parts_log_ratio(p, shares)[0]
        return float(r @ r) / sd ** 2 + float(p @ prec @ p)

    p = np.zeros(shares.shape[1])
    best = objective(p)
    for _ in range(iters):
        fitted, jac = parts_log_ratio(p, shares)
        step = np.linalg.solve(jac.T @ jac / sd ** 2 + prec, jac.T @ (lr - fitted) / sd ** 2 - prec @ p)
        scale = 1.0
        while (value := objective(p + scale * step)) > best:  # halved until it descends, at most to 1e-4
            scale /= 2
            if scale <= 1e-4:
                break
        if value > best:
            break
        p, gain, best = p + scale * step, best - value, value
        if gain < 1e-12:
            break
    jac = parts_log_ratio(p, shares)[1]
    return p, np.linalg.inv(jac.T @ jac / sd ** 2 + prec)


def part_spread(groups, sd: float, start: float = 2.0, floor: float = 0.05, iters: int = 200) -> dict:
    """How far measurement setups move each part's log factor, from groups of ``(log_ratios, shares)`` (one
    setup on one device each, 4 or more rows): the variance of p_j between groups by expectation-maximisation
    (each group's p fitted with the current variances, which become the mean of p_j^2 + var(p_j) over the
    groups), from ``start`` (a factor of e^2 either way, loose), at least ``floor``; ``sd``: the scatter of one
    setup's models (``setup_spread``'s line_sd).

    Example:
        >>> import numpy as np
        >>> s = np.array([[0.9, 0.05, 0.05], [0.6, 0.1, 0.3], [0.3, 0.1, 0.6], [0.1, 0.1, 0.8]])
        >>> groups = [(np.log(s @ [1, 1, f]), s) for f in (0.5, 1.0, 2.0, 4.0)]
        >>> got = part_spread(groups, 0.05)
        >>> [round(v, 2) for v in got["part_sd"]], got["groups"]
        ([0.05, 0.07, 0.85], 4)
    """
    import numpy as np

    groups = [(np.asarray(lr, dtype=float), np.atleast_2d(np.asarray(sh, dtype=float))) for lr, sh in groups
              if len(lr) >= 4]
    if not groups:
        return {"part_sd": None, "groups": 0}
    var = np.full(groups[0][1].shape[1], start ** 2)
    for _ in range(iters):
        moments = []
        for lr, sh in groups:
            p, cov = fit_parts(lr, sh, sd, np.sqrt(var))
            moments.append(p ** 2 + np.diag(cov))
        new = np.maximum(np.mean(moments, axis=0), floor ** 2)
        done = float(np.max(np.abs(np.log(new / var)))) < 1e-3
        var = new
        if done:
            break
    return {"part_sd": [float(v) for v in np.sqrt(var)], "groups": len(groups)}


def combine_parts(log_ratios: list[float], shares: list, target_shares, prior_sd: float, part_sd,
                  prior_weight: float, coverage: float = COVERAGE) -> dict:
    """The anchored factor and interval for a model whose estimate splits as ``target_shares`` (None: the anchors'
    mean split), from k anchors' log ratios and splits: each part's factor by ``fit_parts``; the interval from
    the scatter ``prior_sd`` (pooled with the anchors' residuals where they outnumber the parts) and the parts'
    uncertainty at the target (Student's t); disagreement by a chi-square test of the centred log ratios against
    what the scatter and the parts' spread allow.

    Example:
        >>> s = [[0.9, 0.05, 0.05], [0.2, 0.1, 0.7]]
        >>> got = combine_parts([0.0, 0.8], s, [0.1, 0.1, 0.8], 0.1, [0.3, 0.3, 1.0], 6)
        >>> round(got["factor"], 2), got["disagree"], [round(v, 2) for v in got["part_factors"]]
        (2.38, False, [0.92, 1.0, 2.73])
        >>> combine_parts([0.0, 0.8], s, s[0], 0.1, [0.3, 0.3, 1.0], 6)["factor"] < 1.1
        True
    """
    import numpy as np
    from scipy.stats import chi2, t

    lr = np.asarray(log_ratios, dtype=float)
    shares = np.atleast_2d(np.asarray(shares, dtype=float))
    k, n = shares.shape
    p, cov = fit_parts(lr, shares, prior_sd, part_sd)
    fitted, jac = parts_log_ratio(p, shares)
    ss = float(np.sum((lr - fitted) ** 2))
    own_dof = max(k - n, 0)
    dof = prior_weight + own_dof
    sd = math.sqrt((prior_weight * prior_sd ** 2 + (ss if own_dof else 0.0)) / dof)
    target = shares.mean(axis=0) if target_shares is None else np.asarray(target_shares, dtype=float)
    centre, grad = parts_log_ratio(p, target[None, :])
    half = float(t.ppf(0.5 + coverage / 2, dof)) * math.sqrt(sd ** 2 + float(grad[0] @ cov @ grad[0])
                                                              * (sd / prior_sd) ** 2)
    disagree = False
    if k > 1:  # centred: a setup may sit anywhere; the anchors' spread about their mean is what is tested
        centring = np.eye(k) - 1.0 / k
        allowed = centring @ (prior_sd ** 2 * np.eye(k) + jac @ np.diag(np.square(part_sd)) @ jac.T) @ centring
        rc = lr - lr.mean()
        disagree = float(rc @ np.linalg.pinv(allowed) @ rc) > float(chi2.ppf(1 - DISAGREE_P, k - 1))
    return {"k": k, "factor": math.exp(float(centre[0])), "interval_factors": [math.exp(-half), math.exp(half)],
            "sd": sd, "own_sd": float(np.std(lr, ddof=1)) if k > 1 else None, "disagree": bool(disagree),
            "slope": None, "part_factors": [math.exp(float(v)) for v in p]}


def combine(log_ratios: list[float], prior_sd: float, prior_weight: float, coverage: float = COVERAGE,
            densities: list[float] | None = None, target: float | None = None, slope_sd: float = 0.0,
            density_range: tuple[float, float] | None = DENSITY_RANGE) -> dict:
    """The anchored factor and interval from k anchors' log ratios (see the module text). With ``densities``
    (the anchors' op densities) and ``slope_sd`` > 0, the log ratio is a line in density and ``prior_sd`` the
    scatter around it; ``target`` is the density of the model estimated (None: the anchors' mean);
    ``density_range``: outside it a density counts as the nearest end (``DENSITY_RANGE``).

    Example:
        >>> got = combine([math.log(0.8), math.log(0.84)], prior_sd=0.1, prior_weight=4)
        >>> round(got["factor"], 3), got["k"], got["disagree"]
        (0.82, 2, False)
        >>> lo, hi = got["interval_factors"]; round(lo, 2), round(hi, 2)
        (0.85, 1.18)
        >>> combine([0.0, 1.2], prior_sd=0.1, prior_weight=4)["disagree"]
        True
        >>> line = combine([0.0, 0.4], 0.1, 6, densities=[-2.0, 0.0], target=0.0, slope_sd=0.2)
        >>> round(line["factor"], 3), round(line["slope"], 3), line["disagree"]
        (1.459, 0.178, False)
    """
    import numpy as np
    from scipy.stats import chi2, t

    lr = np.asarray(log_ratios, dtype=float)
    k = len(lr)
    mean = float(lr.mean())
    line = slope_sd > 0 and densities is not None
    z = np.asarray(densities, dtype=float) if line else np.zeros(k)
    if line and density_range is not None:
        z = np.clip(z, *density_range)
        target = None if target is None else min(max(target, density_range[0]), density_range[1])
    zc = z - z.mean()
    s_zz = float(np.sum(zc * zc))
    b = float(np.sum(zc * (lr - mean)) / (s_zz + prior_sd ** 2 / slope_sd ** 2)) if line else 0.0
    ss = float(np.sum((lr - mean - b * zc) ** 2))
    dof = prior_weight + k - 1
    sd = math.sqrt((prior_weight * prior_sd ** 2 + ss) / dof)
    var_b = 1.0 / (s_zz / sd ** 2 + 1.0 / slope_sd ** 2) if line else 0.0
    step = 0.0 if (target is None or not line) else max(-MAX_DENSITY_STEP, min(MAX_DENSITY_STEP, target - z.mean()))
    centre = mean + b * step
    half = float(t.ppf(0.5 + coverage / 2, dof)) * math.sqrt(sd ** 2 * (1 + 1 / k) + step ** 2 * var_b)
    own = math.sqrt(ss / (k - 1)) if k > 1 else None
    disagree = False
    if k > 1:  # the centred log ratios against what the family's scatter (and slope) allows: chi-square, k - 1
        cov = prior_sd ** 2 * (np.eye(k) - 1.0 / k) + slope_sd ** 2 * np.outer(zc, zc) * line
        rc = lr - mean
        disagree = float(rc @ np.linalg.pinv(cov) @ rc) > float(chi2.ppf(1 - DISAGREE_P, k - 1))
    return {"k": k, "factor": math.exp(centre), "interval_factors": [math.exp(-half), math.exp(half)],
            "sd": sd, "own_sd": own, "disagree": bool(disagree), "slope": b if line else None}


# --------------------------------------------------------------------------- applying anchors to an estimate


def answer(used: list[Anchor], prior: dict, target: float | None = None, target_shares=None) -> dict:
    """What these anchors say: a factor per part of the estimate (``combine_parts``) where every anchor carries
    the estimate's split and the family has the parts' spread; else the line in op density where every anchor
    carries its op mix; else one factor (``spread_prior``'s one-factor spread). ``target`` / ``target_shares``: the
    op density and the split of the model estimated (None: the anchors' own mean)."""
    densities = [a.density for a in used]
    lr = [a.log_ratio for a in used]
    if prior.get("part_sd") and all(a.shares for a in used):
        got = combine_parts(lr, [a.shares for a in used], target_shares, prior["line_sd"], prior["part_sd"],
                            prior["weight"])
        return got | {"prior_sd": prior["line_sd"]}
    if prior["slope_sd"] > 0 and all(d is not None for d in densities):
        got = combine(lr, prior["line_sd"], prior["weight"], densities=densities, target=target,
                      slope_sd=prior["slope_sd"])
        return got | {"prior_sd": prior["line_sd"]}
    return combine(lr, prior["sd"], prior["weight"]) | {"prior_sd": prior["sd"]}


def standing(device, setting, state: dict | None = None, target: float | None = None,
             target_shares=None) -> dict:
    """The anchors of ``device`` for ``setting`` and what they say: ``mine`` (all of them), ``used`` (those taken
    against the current fit), ``got`` (``combine``'s answer for the used ones, or None) and ``record`` (setup,
    count, stale, and where any are used the factor, its interval, the spread and a note when they disagree).
    ``state``: the anchors file as read (default: the cached one); ``target``: the op density of the model
    estimated and ``target_shares`` its split into ``PARTS`` (None: the factor at the anchors' own mean)."""
    state = anchors_of(device.name) if state is None else state
    current = fingerprint(device, setting)
    mine = [a for a in state["anchors"] if a.setting == setting.key]
    used = [a for a in mine if a.fit == current]
    record = {"setup": state["setup"], "count": len(used), "stale": len(mine) - len(used)}
    got = None
    if used:
        prior = spread_prior(device.name, setting.key)
        got = answer(used, prior, target, target_shares)
        record.update({"factor": round(got["factor"], 4),
                       "interval_factors": [round(v, 4) for v in got["interval_factors"]],
                       "spread_sd": None if got["own_sd"] is None else round(got["own_sd"], 4),
                       "prior_sd": got["prior_sd"], "prior_basis": prior["basis"], "disagree": got["disagree"],
                       "density_slope": None if got["slope"] is None else round(got["slope"], 4)})
        if got.get("part_factors"):
            record["part_factors"] = {name: round(v, 4) for name, v in zip(PARTS, got["part_factors"], strict=True)}
        elif prior.get("part_sd") and got["slope"] is not None:
            record["no_split"] = ("an anchor without the estimate's compute/memory/per-layer split (taken by an older "
                                  "slimx): a line in op density instead of a factor per part "
                                  f"(`slimx devices anchor {device.name} --refresh` records it)")
        if got["slope"] is None and not got.get("part_factors") and prior["slope_sd"] > 0:
            record["one_factor"] = ("an anchor without its op mix (taken by an older slimx): one factor for every "
                                    f"model (`slimx devices anchor {device.name} --refresh` records it)")
        if got["disagree"]:
            record["note"] = disagreement(device.name, used, got, prior | {"sd": got["prior_sd"]})
    return {"current": current, "mine": mine, "used": used, "got": got, "record": record}


def apply(est: dict, device, setting) -> dict:
    """Put an estimate (``estimate_latency``'s dict) on the user's setup where the device has anchors for its
    setting: the total, the per-op figures and the interval, with an ``anchors`` record saying so."""
    state = anchors_of(device.name)
    if not any(a.setting == setting.key for a in state["anchors"]):
        return unanchored(est, device, setting)
    now = standing(device, setting, state, op_density(est["ops"], est["gmacs"]), est.get("shares"))
    record, got = now["record"], now["got"]
    if got is None:
        record["note"] = (f"{record['stale']} anchor(s) of {device.name} were taken against another fit of "
                          f"{setting.key}: not used (run `slimx devices anchor {device.name} --refresh`)")
        est["anchors"] = record
        return unanchored(est, device, setting)
    f = got["factor"]
    total = est["total_ms"] * f
    lo, hi = got["interval_factors"]
    record.update({"unanchored_ms": est["total_ms"], "unanchored_interval_ms": est["interval_ms"],
                   "models": [a.model for a in now["used"]]})
    if record["stale"] and not got["disagree"]:
        record["note"] = (f"{record['stale']} older anchor(s) taken against another fit left out "
                          f"(`slimx devices anchor {device.name} --refresh`)")
    est.update({"total_ms": round(total, 4), "median_ms": round(total, 4),
                "fixed_ms": round(est["fixed_ms"] * f, 4),
                "interval_ms": [round(total * lo, 4), round(total * hi, 4)], "anchors": record,
                "setup": state["setup"]})
    for entry in est.get("per_op", []):
        entry["ms"] = round(entry["ms"] * f, 4)
    for entry in est.get("per_module", []):
        entry["ms"] = round(entry["ms"] * f, 4)
    for entry in est.get("per_node", []):
        entry["ms"] = round(entry["ms"] * f, 5)
    return est


def between_setups(device, setting) -> dict | None:
    """How far a setup's own factor moves for ``device`` in ``setting`` (its family's ``setup_log_sd``, the count
    of setups it was measured on, where that comes from), or None where an estimate is not widened for it: the
    measured host, whose setup is slimx's own runner and runtime, the one its fit was calibrated with."""
    if getattr(device, "measured", False):
        return None
    prior = spread_prior(device.name, setting.key)
    if prior["setup_sd"] is None:
        return None
    return {"setup_sd": prior["setup_sd"], "setups": prior["setups"], "basis": prior["basis"],
            "source": prior["setup_source"]}


def unanchored(est: dict, device, setting) -> dict:
    """An estimate no anchor of its setting puts on the user's setup: its stated interval is widened by how far
    the family's setups sit from the profile's (``unanchored_interval``, ``between_setups``), since the user's
    setup is, until anchored, one the fit never saw; the profile's own setup's interval is kept in the
    ``unanchored`` record."""
    between = between_setups(device, setting)
    if between is None or est.get("interval_ms") is None or not est.get("total_ms"):
        return est
    total = est["total_ms"]
    lo, hi = unanchored_interval([v / total for v in est["interval_ms"]], between["setup_sd"], between["setups"])
    est["unanchored"] = between | {"profile_setup_interval_ms": est["interval_ms"]}
    est["interval_ms"] = [round(total * lo, 4), round(total * hi, 4)]
    return est


def disagreement(device: str, used: list[Anchor], got: dict, prior: dict) -> str:
    ratios = ", ".join(f"{a.model} x{a.measured_ms / a.estimated_ms:.2f}" for a in used)
    return (f"the anchors of {device} disagree: measured/estimated {ratios} spread x{math.exp(got['own_sd']):.2f} "
            f"(1 sd), where one setup's models spread about x{math.exp(prior['sd']):.2f} in {prior['basis']}; check "
            "that they were timed the same way (same runtime, precision, input size), or drop the odd one "
            f"(`slimx devices anchor {device} --clear` and anchor again)")


def describe(est: dict) -> str:
    """The part of an estimate's label that names its anchors (empty without)."""
    rec = est.get("anchors")
    if not rec:
        return ""
    if not rec.get("count"):
        return f"; {rec['note']}"
    text = (f"; anchored to {rec['setup']!r} by {rec['count']} measurement{'s' if rec['count'] != 1 else ''} "
            f"(x{rec['factor']:.3f} on the un-anchored {rec['unanchored_ms']:.3f} ms)")
    return text + (f"; NOTE {rec['note']}" if rec.get("note") else "")


def clear(device_name: str) -> bool:
    path = anchors_path(device_name)
    existed = path.is_file()
    path.unlink(missing_ok=True)
    _cached_anchors.cache_clear()
    return existed
