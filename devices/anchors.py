"""Anchors: a user's own timings of a device, which put its estimates on the user's measurement setup.

The shipped profile's estimate is for the setup its data came from (a timing tool, an OS and runtime version);
another setup differs from it by about one factor for every model (``bench/results/estimator_generalization.md``,
leave-one-setup-out). A user who has timed a few models on their own device knows that factor: with k anchors of
log ratio l_i = log(measured / estimated), the anchored estimate is ``estimate x exp(mean l)`` and its 80%
interval ``exp(+-t * s * sqrt(1 + 1/k))``, where s pools the family's within-setup spread s0 (``anchoring.toml``,
measured leave-one-setup-out, weight ``prior_weight``) with the anchors' own, and t is Student's 0.9 quantile at
those degrees of freedom: anchors that agree narrow the interval, anchors that disagree widen it, and a spread
the family's data cannot explain (a chi-square test at 1%) is said in words.

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

    @property
    def log_ratio(self) -> float:
        return math.log(self.measured_ms / self.estimated_ms)


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
            "source": table["within_setup_log_sd_source"]}


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


def combine(log_ratios: list[float], prior_sd: float, prior_weight: float, coverage: float = COVERAGE) -> dict:
    """The anchored factor and interval from k anchors' log ratios (see the module text).

    Example:
        >>> got = combine([math.log(0.8), math.log(0.84)], prior_sd=0.1, prior_weight=4)
        >>> round(got["factor"], 3), got["k"], got["disagree"]
        (0.82, 2, False)
        >>> lo, hi = got["interval_factors"]; round(lo, 2), round(hi, 2)
        (0.85, 1.18)
        >>> combine([0.0, 1.2], prior_sd=0.1, prior_weight=4)["disagree"]
        True
    """
    from scipy.stats import chi2, t

    k = len(log_ratios)
    mean = sum(log_ratios) / k
    ss = sum((v - mean) ** 2 for v in log_ratios)
    dof = prior_weight + k - 1
    sd = math.sqrt((prior_weight * prior_sd ** 2 + ss) / dof)
    half = float(t.ppf(0.5 + coverage / 2, dof)) * sd * math.sqrt(1 + 1 / k)
    own = math.sqrt(ss / (k - 1)) if k > 1 else None
    disagree = k > 1 and ss / prior_sd ** 2 > float(chi2.ppf(1 - DISAGREE_P, k - 1))
    return {"k": k, "factor": math.exp(mean), "interval_factors": [math.exp(-half), math.exp(half)],
            "sd": sd, "own_sd": own, "disagree": bool(disagree)}


# --------------------------------------------------------------------------- applying anchors to an estimate


def standing(device, setting, state: dict | None = None) -> dict:
    """The anchors of ``device`` for ``setting`` and what they say: ``mine`` (all of them), ``used`` (those taken
    against the current fit), ``got`` (``combine``'s answer for the used ones, or None) and ``record`` (setup,
    count, stale, and where any are used the factor, its interval, the spread and a note when they disagree).
    ``state``: the anchors file as read (default: the cached one)."""
    state = anchors_of(device.name) if state is None else state
    current = fingerprint(device, setting)
    mine = [a for a in state["anchors"] if a.setting == setting.key]
    used = [a for a in mine if a.fit == current]
    record = {"setup": state["setup"], "count": len(used), "stale": len(mine) - len(used)}
    got = None
    if used:
        prior = spread_prior(device.name, setting.key)
        got = combine([a.log_ratio for a in used], prior["sd"], prior["weight"])
        record.update({"factor": round(got["factor"], 4),
                       "interval_factors": [round(v, 4) for v in got["interval_factors"]],
                       "spread_sd": None if got["own_sd"] is None else round(got["own_sd"], 4),
                       "prior_sd": prior["sd"], "prior_basis": prior["basis"], "disagree": got["disagree"]})
        if got["disagree"]:
            record["note"] = disagreement(device.name, used, got, prior)
    return {"current": current, "mine": mine, "used": used, "got": got, "record": record}


def apply(est: dict, device, setting) -> dict:
    """Put an estimate (``estimate_latency``'s dict) on the user's setup where the device has anchors for its
    setting: the total, the per-op figures and the interval, with an ``anchors`` record saying so."""
    state = anchors_of(device.name)
    if not any(a.setting == setting.key for a in state["anchors"]):
        return est
    now = standing(device, setting, state)
    record, got = now["record"], now["got"]
    if got is None:
        record["note"] = (f"{record['stale']} anchor(s) of {device.name} were taken against another fit of "
                          f"{setting.key}: not used (run `slimx devices anchor {device.name} --refresh`)")
        est["anchors"] = record
        return est
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
