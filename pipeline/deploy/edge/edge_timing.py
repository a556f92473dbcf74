"""Interleaved timing rounds and latency intervals: what makes a latency figure a measurement, not a sample.

Copied into every bundle beside ``edge_runtime.py`` (numpy and the standard library only,
Python 3.9+). Timing every file in one block, one after the other, lets a slow drift of
the machine (a frequency step, a neighbour's load, the page cache) land on some files
and not on others. :func:`interleaved_rounds` instead times all files of one profile in
the same process in ``rounds`` rounds, round-robin, the order rotated each round, so a
drift hits every file alike, and :func:`round_stats` reports each percentile as the
median over the rounds with a distribution-free 95 % interval for it: the order-statistic
interval of a quantile (:func:`quantile_interval`; the one scipy's ``quantile_test``
gives, computed here with ``math.comb`` because a device has no scipy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Confidence level of every latency interval.
CI_LEVEL = 0.95

#: At least this many timed runs per file and round, whatever the time cap says.
MIN_RUNS_PER_ROUND = 5

#: Untimed runs of a file at the start of each of its rounds: the previous file's session
#: left its own buffers in the caches, and the first run after a switch pays for that.
SETTLE_RUNS = 2

#: The percentiles a latency result holds.
PERCENTILES = (50, 90, 99)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    return min(1.0, sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i) for i in range(min(k, n) + 1)))


def quantile_interval_ranks(n: int, q: float = 0.5, level: float = CI_LEVEL) -> tuple | None:
    """0-based ranks ``(lo, hi)`` of the sorted sample that bound the ``q`` quantile with confidence ``level``.

    The two-sided order-statistic interval, equal-tailed: ``lo`` is one less than the
    smallest k with P(Binomial(n, q) <= k) >= (1 - level) / 2, ``hi`` the smallest k
    with P(Binomial(n, q) > k) <= (1 - level) / 2 (scipy's ``quantile_test(...)
    .confidence_interval``). None when ``n`` is too small for that level (for the median
    at 95 %: fewer than 6 values).
    """
    if n <= 0 or not 0.0 < q < 1.0 or not 0.0 < level < 1.0:
        return None
    tail = (1.0 - level) / 2.0
    lo = next(k for k in range(n + 1) if _binom_cdf(k, n, q) >= tail) - 1
    hi = next(k for k in range(n + 1) if 1.0 - _binom_cdf(k, n, q) <= tail)
    if lo < 0 or hi >= n:
        return None
    return lo, hi


def quantile_interval(values: Sequence[float], q: float = 0.5, level: float = CI_LEVEL) -> tuple:
    """A ``level`` interval ``(low, high)`` for the ``q`` quantile of the population ``values`` were drawn from.

    Distribution-free (:func:`quantile_interval_ranks`); where there are too few values
    for that level it is ``(min, max)``, the widest the sample can say.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        raise ValueError("no values to bound")
    ranks = quantile_interval_ranks(int(x.size), q, level)
    lo, hi = ranks if ranks is not None else (0, x.size - 1)
    return float(x[lo]), float(x[hi])


def runs_per_round(iterations: int, max_seconds: float, rounds: int) -> tuple:
    """(timed runs, seconds cap) of one file in one round: the budget of one file split across ``rounds``."""
    rounds = max(1, int(rounds))
    return max(MIN_RUNS_PER_ROUND, math.ceil(int(iterations) / rounds)), float(max_seconds) / rounds


def interleaved_rounds(slots: Sequence[Callable[[], Any]], rounds: int, warmup: int, iterations: int,
                       max_seconds: float) -> list:
    """Milliseconds of every timed run, per slot and round: ``out[slot][round]`` is a float64 array.

    Each slot (a session and its input: one file at one batch size) is first run
    ``warmup`` times untimed. Then, ``rounds`` times, every slot takes its turn, the order
    rotated by one each round; a turn is :data:`SETTLE_RUNS` untimed runs and then timed
    runs until the round's share of ``iterations`` or ``max_seconds`` is spent, never
    fewer than :data:`MIN_RUNS_PER_ROUND`.
    """
    rounds = max(1, int(rounds))
    per_round, cap = runs_per_round(iterations, max_seconds, rounds)
    for fn in slots:
        for _ in range(max(0, int(warmup))):
            fn()
    out: list = [[] for _ in slots]
    k = len(slots)
    for r in range(rounds):
        for j in range(k):
            i = (r + j) % k
            fn = slots[i]
            for _ in range(SETTLE_RUNS):
                fn()
            times = []
            start = time.perf_counter()
            while len(times) < per_round:
                t0 = time.perf_counter_ns()
                fn()
                times.append(time.perf_counter_ns() - t0)
                if len(times) >= MIN_RUNS_PER_ROUND and time.perf_counter() - start > cap:
                    break
            out[i].append(np.asarray(times, dtype=np.float64) / 1e6)
    return out


def round_stats(per_round_ms: Sequence[np.ndarray], batch: int, level: float = CI_LEVEL) -> dict:
    """Latency figures of one slot from its rounds (:func:`interleaved_rounds`).

    ``pXX_ms`` is the median over the rounds of each round's XX-th percentile and
    ``pXX_ci_ms`` its ``level`` interval (:func:`quantile_interval` of the round values);
    ``round_pXX_ms`` lists each round's value (the report pools the rounds of files that
    run one graph); ``mean_ms`` and the throughput are those of all timed runs together.
    """
    rounds = [np.asarray(r, dtype=np.float64) for r in per_round_ms if len(r)]
    if not rounds:
        raise ValueError("no timed runs")
    every = np.concatenate(rounds)
    mean = float(every.mean())
    out: dict = {"batch": int(batch), "runs": int(every.size), "rounds": len(rounds), "ci_level": level}
    for pct in PERCENTILES:
        per = [float(np.percentile(r, pct)) for r in rounds]
        low, high = quantile_interval(per, 0.5, level)
        out[f"p{pct}_ms"] = round(float(np.median(per)), 4)
        out[f"p{pct}_ci_ms"] = [round(low, 4), round(high, 4)]
        out[f"round_p{pct}_ms"] = [round(v, 4) for v in per]
    out["mean_ms"] = round(mean, 4)
    out["throughput_ips"] = round(batch * 1000.0 / mean, 2) if mean > 0 else None
    return out
