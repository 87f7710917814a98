"""``--buckets auto``: the bucket set, at most ``--max-buckets`` of them, that minimises the expected latency over
the calibration data's real lengths (each sentence runs padded to the smallest bucket that holds it). Every
candidate length is priced where the device is: measured in the format's own runtime when the device is this
machine and that runtime runs here (one artifact built with a bucket per candidate, each bucket timed), else by
the device's latency model on the exported program itself."""

from __future__ import annotations

import math

STEP = 8  # candidate bucket lengths: the data's lengths rounded up to a multiple of this (and the range's maximum)
MAX_MEASURED = 12  # measured pricing builds one bucket per candidate: at most this many (the step widens past it)


def candidates(lengths: list[int], lo: int, hi: int, step: int = STEP) -> list[int]:
    """Example:
        >>> candidates([3, 9, 17, 40], 1, 64)
        [8, 16, 24, 40, 64]
    """
    return sorted({min(max(step * math.ceil(n / step), lo), hi) for n in lengths} | {hi})


def choose(lengths: list[int], cost: dict[int, float], max_count: int) -> tuple[list[int], float]:
    """The buckets (a subset of ``cost``'s lengths, the largest always among them) that minimise the mean of
    ``cost[bucket]`` over ``lengths``, at most ``max_count`` of them: a dynamic programme over the sorted candidates.

    Example:
        >>> choose([5, 6, 7, 60], {8: 1.0, 16: 2.0, 64: 8.0}, 2)
        ([8, 64], 2.75)
        >>> choose([5, 6, 7, 60], {8: 1.0, 16: 2.0, 64: 8.0}, 1)
        ([64], 8.0)
    """
    sizes = sorted(cost)
    counts = [sum(1 for n in lengths if (sizes[j - 1] if j else 0) < n <= s) for j, s in enumerate(sizes)]
    inf = float("inf")
    best = [[inf] * (max_count + 1) for _ in sizes]  # best[j][k]: lengths up to sizes[j], k buckets, last at j
    back = [[-1] * (max_count + 1) for _ in sizes]
    for j in range(len(sizes)):
        best[j][1] = cost[sizes[j]] * sum(counts[: j + 1])
        for k in range(2, max_count + 1):
            for i in range(j):
                if best[i][k - 1] < inf:
                    value = best[i][k - 1] + cost[sizes[j]] * sum(counts[i + 1: j + 1])
                    if value < best[j][k] - 1e-12:
                        best[j][k], back[j][k] = value, i
    last = len(sizes) - 1
    k = min(range(1, max_count + 1), key=lambda kk: (best[last][kk], kk))
    chosen, j = [], last
    while j >= 0 and k >= 1:
        chosen.append(sizes[j])
        j, k = back[j][k], k - 1
    return sorted(chosen), best[last][len(chosen)] / len(lengths)


def expected_ms(lengths: list[int], buckets, cost_at) -> float:
    from slimx.export.shapes import pick_bucket

    return sum(cost_at(pick_bucket(n, buckets)) for n in lengths) / len(lengths)


def histogram(lengths: list[int], bins: int = 8) -> list[dict]:
    hi = max(lengths)
    width = max(1, math.ceil(hi / bins))
    edges = range(math.ceil(hi / width))
    return [{"from": b * width + 1, "to": (b + 1) * width,
             "count": sum(1 for n in lengths if b * width < n <= (b + 1) * width)} for b in edges]


def auto_buckets(program, calib, device, precision: str, fixed: tuple[int, ...], max_count: int | None,
                 measure=None) -> dict:
    """Choose the buckets; returns the record the report keeps (histogram, choice, expected latency of both).

    ``measure``: ``lengths -> ({length: ms}, how, extra record)``, timing an artifact with a bucket at each length
    in the format's runtime (``measured_prices``), for a device that is this machine; None prices with the
    estimator."""
    from slimx.export.shapes import lengths_of, seq_range_of

    lo, hi = seq_range_of(program.inputs)
    lengths = [min(max(n, lo), hi) for n in lengths_of(calib.batches, program.inputs)]
    count = max_count or len(fixed)
    if measure is not None:
        step = STEP
        while len(candidates(lengths, lo, hi, step)) > MAX_MEASURED:
            step *= 2
        wanted = candidates(lengths, lo, hi, step)
        prices, priced_by, extra = measure(sorted(set(wanted) | set(fixed)))
    else:
        step, wanted, extra = STEP, candidates(lengths, lo, hi), {}
        prices, priced_by = estimated_prices(program, device, precision, sorted(set(wanted) | set(fixed)))
    chosen, mean = choose(lengths, {n: prices[n] for n in wanted}, count)
    base = expected_ms(lengths, fixed, prices.__getitem__)
    return {"buckets": chosen, "max_buckets": count, "samples": len(lengths), "histogram": histogram(lengths),
            "expected_ms": round(mean, 4), "fixed_rule": {"buckets": list(fixed), "expected_ms": round(base, 4)},
            "priced_by": priced_by, "candidate_step": step,
            "prices_ms": {str(k): round(v, 4) for k, v in sorted(prices.items())}, **extra}


def smooth(lengths: list[int], ms: list[float]) -> list[float]:
    """Timings of one artifact at several lengths, with the noise of a shared machine taken out: the least-squares
    quadratic in the length (a fixed cost, the linear layers, attention's square) fitted to relative error, then
    made non-decreasing (a longer bucket never costs less).

    Example:
        >>> [round(v, 2) for v in smooth([8, 16, 24, 32, 64], [1.0, 2.3, 2.7, 4.1, 8.0])]
        [1.02, 2.01, 3.0, 3.99, 7.94]
    """
    import numpy as np

    n, y = np.asarray(lengths, dtype=float), np.asarray(ms, dtype=float)
    if len(n) < 4:
        return list(np.maximum.accumulate(y))
    fitted = np.polyval(np.polyfit(n, y, 2, w=1.0 / y), n)
    return [float(v) for v in np.maximum.accumulate(np.maximum(fitted, 1e-6))]


def estimated_prices(program, device, precision: str, lengths: list[int]) -> tuple[dict[int, float], str]:
    from slimx.devices.estimator import default_setting, estimate_latency
    from slimx.devices.opmix import op_mix

    setting = default_setting(device, precision)
    prices = {n: float(estimate_latency(op_mix(program.exported, n), device, setting, top=0)["total_ms"])
              for n in lengths}
    return prices, f"the estimator of {device.name} ({setting.key}) on the exported program at each length"


def measured_prices(program, target, device, options, runner, work_dir, calib_batches=None, runs: int = 20,
                    warmup: int = 3, seed: int = 0):
    """``auto_buckets``' ``measure`` for a device that is this machine: the artifact built once with a bucket at
    every length asked (its format's own buckets: LiteRT signatures), then each bucket timed in ``runner`` on
    inputs of exactly that length (every position real)."""
    import dataclasses
    from pathlib import Path

    from slimx.devices.timing import inputs_at_length

    def measure(lengths: list[int]) -> tuple[dict[int, float], str]:
        artifact = target.compile(program, device, dataclasses.replace(options, buckets=tuple(lengths)),
                                  Path(work_dir), calib_batches=calib_batches)
        measured = []
        for n in lengths:
            inputs = inputs_at_length(program.inputs, n, seed)
            measured.append(float(runner.time(artifact, inputs, warmup=warmup, runs=runs).median_ms))
        prices = dict(zip(lengths, smooth(lengths, measured), strict=True))
        return prices, (f"measured here in {target.name}'s runtime ({runner.name}): one artifact with a bucket at "
                        f"each of the {len(lengths)} lengths, each timed {runs} times (median), smoothed by a "
                        "quadratic in the length"), {
            "measured_ms": {str(n): round(v, 4) for n, v in zip(lengths, measured, strict=True)}}

    return measure
