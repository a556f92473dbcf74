"""The rows of the deployment report and what is computed on them: latency, Pareto front, budget pick, label.

One row per deployed model x precision, joined from the deploy stages' reports and the
evaluate metrics (:func:`build_rows`). Both :mod:`pipeline.report.results` (tables,
summary) and :mod:`pipeline.report.plots` (the Pareto plot) read rows through these
functions; nothing here reads files or needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ROLE_ORDER = {"teacher": 0, "baseline": 1, "distilled": 2, "online": 3}
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}


def build_rows(export: dict[str, Any], quantize: dict[str, Any], benchmark: dict[str, Any] | None,
               metrics: dict[str, dict[str, Any]], profiles: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join the stage reports into rows (one per model x variant), teacher first, then by student and role."""
    rows: list[dict[str, Any]] = []
    bench_models = (benchmark or {}).get("models", {})
    for key, ex in export["models"].items():
        acc = quantize["models"].get(key, {})
        m = metrics.get(key, {})
        for precision in ("fp32", "fp16", "int8"):
            if precision not in acc:
                continue
            b = bench_models.get(key, {}).get(precision, {})
            latency = {}
            for prof in profiles:
                h = (b.get("headline") or {}).get(prof["name"])
                latency[prof["name"]] = h
            rows.append({
                "run": key, "bundle": ex.get("bundle"), "role": ex["role"], "student": ex.get("student"),
                "method": ex.get("method"), "arch": ex.get("arch"), "precision": precision,
                "top1": acc[precision]["top1"], "top5": acc[precision]["top5"],
                "params": m.get("params"), "macs": m.get("macs"), "bytes": acc[precision]["bytes"],
                "peak_rss_mb": b.get("peak_rss_mb"), "latency": latency,
            })
    rows.sort(key=lambda r: (ROLE_ORDER.get(r["role"], 9) > 0, str(r["student"]), ROLE_ORDER.get(r["role"], 9),
                             str(r["method"]), PRECISION_ORDER[r["precision"]]))
    return rows


def row_latency(row: dict[str, Any], profile: str, statistic: str = "p50") -> float | None:
    """A row's latency (ms) under ``profile`` for ``statistic`` (p50/p90/p99), or None if not measured."""
    h = (row.get("latency") or {}).get(profile)
    value = h.get(f"{statistic}_ms") if h else None
    return float(value) if value is not None and math.isfinite(float(value)) else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (lower latency, higher accuracy), ordered by latency.

    A point is on the front when no other point is at least as fast and at least as
    accurate while strictly better in one of the two. Of exact duplicates the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def misses_budgets(row: dict[str, Any], profile: str, budget_ms: float | None, size_kib: float | None,
         statistic: str = "p50") -> list[str]:
    """Why ``row`` does not meet a profile's budgets (empty when it does): latency over, unmeasured, file too large."""
    why: list[str] = []
    lat = row_latency(row, profile, statistic)
    if budget_ms is not None:
        if lat is None:
            why.append("latency not measured")
        elif lat > budget_ms:
            why.append(f"{statistic} {lat:.3f} ms > {budget_ms:g} ms")
    if size_kib is not None and row["bytes"] / 1024 > size_kib:
        why.append(f"{row['bytes'] / 1024:.1f} KiB > {size_kib:g} KiB")
    return why


def best_under_budget(rows: Sequence[dict[str, Any]], profile: str, budget_ms: float | None,
                      statistic: str = "p50", size_kib: float | None = None) -> dict[str, Any] | None:
    """The most accurate row that meets the latency budget and fits the size budget (ties: faster, then
    smaller); None if none does. A latency budget admits only measured rows."""
    ok = [r for r in rows if not misses_budgets(r, profile, budget_ms, size_kib, statistic)]
    if not ok:
        return None
    def latency(r: dict[str, Any]) -> float:  # a size-only budget admits unmeasured rows: they rank last
        lat = row_latency(r, profile, statistic)
        return math.inf if lat is None else lat

    return min(ok, key=lambda r: (-r["top1"], latency(r), r["bytes"]))


def label(row: dict[str, Any]) -> str:
    """Short name of a row: ``<student>/<method or baseline> <precision>`` (``teacher <arch>`` for the teacher)."""
    who = f"teacher {row['arch']}" if row["role"] == "teacher" else (
        f"{row['student']}/{'baseline' if row['role'] == 'baseline' else row['method']}")
    return f"{who} {row['precision']}"
