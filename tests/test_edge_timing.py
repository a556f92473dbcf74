"""Interleaved timing rounds and the latency intervals (``edge_timing.py``), and the measurement that uses them.

The order-statistic interval is computed on the device without scipy; here it must equal
scipy's ``quantile_test(...).confidence_interval`` and cover the true median of a skewed
latency-like distribution at least 95 % of the time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.deploy.edge import edge_timing
from pipeline.deploy.edge.edge_measure import headline, measure_files
from pipeline.deploy.edge.edge_timing import (
    MIN_RUNS_PER_ROUND,
    SETTLE_RUNS,
    interleaved_rounds,
    quantile_interval,
    quantile_interval_ranks,
    round_stats,
)
from pipeline.deploy.export import export_onnx
from pipeline.models import build


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_the_interval_is_scipys_order_statistic_interval(q):
    rng = np.random.default_rng(1)
    for n in range(1, 90):
        x = rng.lognormal(0.0, 0.3, n)
        low, high = stats.quantile_test(x, q=float(np.median(x)), p=q).confidence_interval(0.95)
        ranks = quantile_interval_ranks(n, q)
        if math.isnan(low) or math.isnan(high):
            assert ranks is None, (n, q)
            assert quantile_interval(x, q) == (float(x.min()), float(x.max()))  # too few values: their range
        else:
            assert ranks is not None, (n, q)
            assert quantile_interval(x, q) == (low, high), (n, q)


def test_nine_rounds_bound_the_median_by_the_second_and_eighth_value():
    assert quantile_interval_ranks(9) == (1, 7)
    assert quantile_interval_ranks(5) is None and quantile_interval_ranks(6) == (0, 5)
    assert quantile_interval([5, 1, 9, 3, 7, 2, 8, 4, 6]) == (2.0, 8.0)


def test_the_median_interval_covers_the_true_median_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true_median = math.exp(0.0)  # lognormal(0, 0.5): a right-skewed, latency-like distribution
    hits = 0
    trials = 4000
    for _ in range(trials):
        low, high = quantile_interval(rng.lognormal(0.0, 0.5, 9))
        hits += low <= true_median <= high
    assert hits / trials >= 0.95 - 0.01  # exact coverage for n = 9 is 96.1 %


def test_rounds_visit_every_slot_once_per_round_in_rotated_order():
    calls: list[int] = []
    slots = [lambda i=i: calls.append(i) for i in range(3)]
    out = interleaved_rounds(slots, rounds=4, warmup=2, iterations=12, max_seconds=1e9)
    per_round = max(MIN_RUNS_PER_ROUND, math.ceil(12 / 4))
    assert [len(r) for r in out[0]] == [per_round] * 4 and len(out) == 3
    assert all(len(runs) == 4 for runs in out)
    warm, rest = calls[:6], calls[6:]
    assert warm == [0, 0, 1, 1, 2, 2]
    turn = SETTLE_RUNS + per_round
    starts = [rest[k * turn] for k in range(len(rest) // turn)]
    assert starts == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]  # round r starts with slot r mod 3


def test_a_time_cap_still_gives_the_minimum_runs_per_round():
    out = interleaved_rounds([lambda: None], rounds=3, warmup=0, iterations=1000, max_seconds=0.0)
    assert [len(r) for r in out[0]] == [MIN_RUNS_PER_ROUND] * 3


def test_round_stats_are_medians_over_rounds_with_intervals_that_hold_them():
    rng = np.random.default_rng(3)
    rounds = [rng.lognormal(-3.0, 0.2, 12) + 0.01 * r for r in range(9)]
    st = round_stats(rounds, batch=4)
    per_round = [float(np.percentile(r, 50)) for r in rounds]
    assert st["p50_ms"] == pytest.approx(float(np.median(per_round)), abs=1e-4)
    assert st["round_p50_ms"] == [round(v, 4) for v in per_round]
    for pct in (50, 90, 99):
        low, high = st[f"p{pct}_ci_ms"]
        assert low <= st[f"p{pct}_ms"] <= high
    assert st["p50_ci_ms"] == [round(v, 4) for v in sorted(per_round)[1:8:6]]
    assert st["rounds"] == 9 and st["runs"] == 108 and st["ci_level"] == edge_timing.CI_LEVEL
    assert st["throughput_ips"] == pytest.approx(4 * 1000 / float(np.concatenate(rounds).mean()), rel=1e-3)


def test_measure_files_times_files_together_and_keeps_each_cold_start_its_own(tmp_path):
    files = []
    for i, arch in enumerate(("tinynet_xs", "tinynet_s")):
        torch.manual_seed(i)
        model = build(arch, 10, 1, 8).eval()
        files.append((str(export_onnx(model, tmp_path / f"{arch}.onnx", in_channels=1, image_size=8, opset=17)), "f32"))
    profiles = [{"name": "one", "threads": 1, "batch_sizes": [1, 4]}]
    results = measure_files(files, profiles, warmup=2, iterations=30, max_seconds=0.2, rounds=6)
    assert [r["model"] for r in results] == ["tinynet_xs.onnx", "tinynet_s.onnx"]
    for res in results:
        prof = res["profiles"]["one"]
        assert prof["status"] == "ok" and prof["cold_start"]["session_ms"] > 0
        assert res["cold_start"]["import_ms"] > 0  # a fresh process pays the import: no other file shared it
        for b in ("1", "4"):
            st = prof["batches"][b]
            assert st["rounds"] == 6 and st["runs"] >= 6 * MIN_RUNS_PER_ROUND
            assert st["p50_ci_ms"][0] <= st["p50_ms"] <= st["p50_ci_ms"][1]
        top = headline(res, profiles[0])
        assert top["p50_ci_ms"] == prof["batches"]["1"]["p50_ci_ms"] and top["throughput_batch"] == 4
