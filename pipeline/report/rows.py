"""The rows of the deployment report and what is computed on them: latency, budgets, label.

:func:`pareto_front` and :func:`best_under_budget` compare raw points (the ``most_accurate``
pick rule); the report's front and its default pick decide beyond noise only
(:mod:`pipeline.report.decisions`).

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
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
RUNTIME_ORDER = {"onnxruntime": 0, "openvino": 1}
RUNTIME_NAMES = {"onnxruntime": "onnxruntime", "openvino": "OpenVINO"}


def _peak_precision(precision: str) -> str:
    """Which GEMM peak a variant is compared with: INT8 and bf16 their own, FP32 and FP16 (run in float32) FP32's."""
    return precision if precision in ("int8", "bf16") else "fp32"


def _efficiency(b: dict[str, Any], macs: float | None, runtime: str, precision: str, profiles: Sequence[dict[str, Any]],
                peaks: dict[str, Any]) -> dict[str, Any]:
    """Per profile: achieved GMAC/s at the throughput batch and its fraction of the runtime's GEMM peak there."""
    from pipeline.deploy.peak import achieved

    out: dict[str, Any] = {}
    for prof in profiles:
        h = (b.get("headline") or {}).get(prof["name"])
        res = (b.get("profiles") or {}).get(prof["name"]) or {}
        peak = ((peaks.get(runtime) or {}).get("peaks") or {}).get(_peak_precision(precision), {}).get(
            str(int(res.get("threads", prof.get("threads", 0)))))
        out[prof["name"]] = None if not h else achieved(macs, h.get("throughput_ips"),
                                                        peak.get("gmacs_per_s") if peak else None)
    return out


def build_rows(export: dict[str, Any], quantize: dict[str, Any], benchmark: dict[str, Any] | None,
               metrics: dict[str, dict[str, Any]], profiles: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join the stage reports into rows (one per model x runtime x variant), teacher first, then by student and role.

    onnxruntime's rows take their accuracy from the quantize stage's own scores, another
    runtime's rows from that runtime's run of the same file on the test split
    (``quantize.json`` ``runtimes``); latency (with its intervals where the benchmark gives them),
    cold start, memory and ``graph_sha256`` (the graph without its weights: equal hashes run one
    graph) come from the benchmark.
    """
    rows: list[dict[str, Any]] = []
    bench = benchmark or {}
    bench_models, peaks = bench.get("models", {}), bench.get("peak", {})
    for key, ex in export["models"].items():
        acc = quantize["models"].get(key, {})
        m = metrics.get(key, {})
        scored = {"onnxruntime": {v: acc[v] for v in PRECISION_ORDER if v in acc},
                  **{rt: dict(per) for rt, per in (acc.get("runtimes") or {}).items()}}
        for runtime, variants in scored.items():
            for precision, score in variants.items():
                b = bench_models.get(key, {}).get(runtime, {}).get(precision, {})
                latency = {prof["name"]: (b.get("headline") or {}).get(prof["name"]) for prof in profiles}
                cold = {name: res.get("cold_start") for name, res in (b.get("profiles") or {}).items()
                        if res.get("status") == "ok"}
                rows.append({
                    "run": key, "bundle": ex.get("bundle"), "role": ex["role"], "student": ex.get("student"),
                    "method": ex.get("method"), "arch": ex.get("arch"), "runtime": runtime, "precision": precision,
                    "top1": score["top1"], "top5": score["top5"],
                    "params": m.get("params"), "macs": m.get("macs"), "bytes": score["bytes"],
                    "peak_rss_mb": b.get("peak_rss_mb"), "graph_sha256": b.get("graph_sha256"), "latency": latency,
                    "import_ms": (b.get("cold_start") or {}).get("import_ms"), "cold_start": cold,
                    "efficiency": _efficiency(b, m.get("macs"), runtime, precision, profiles, peaks),
                })
    rows.sort(key=lambda r: (ROLE_ORDER.get(r["role"], 9) > 0, str(r["student"]), ROLE_ORDER.get(r["role"], 9),
                             str(r["method"]), RUNTIME_ORDER.get(r["runtime"], 9), PRECISION_ORDER[r["precision"]]))
    return rows


def row_latency(row: dict[str, Any], profile: str, statistic: str = "p50", pooled: bool = False) -> float | None:
    """A row's latency (ms) under ``profile`` for ``statistic`` (p50/p90/p99), or None if not measured.

    ``pooled``: the latency of the row's graph where the report pooled the files that run it
    (``graph_<statistic>_ms``, :func:`pipeline.report.decisions.pool_graphs`), else the file's own.
    """
    h = (row.get("latency") or {}).get(profile)
    value = None
    if h:
        value = h.get(f"graph_{statistic}_ms") if pooled and h.get(f"graph_{statistic}_ms") is not None \
            else h.get(f"{statistic}_ms")
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
    lat = row_latency(row, profile, statistic, pooled=True)
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
        lat = row_latency(r, profile, statistic, pooled=True)
        return math.inf if lat is None else lat

    return min(ok, key=lambda r: (-r["top1"], latency(r), r["bytes"]))


def label(row: dict[str, Any]) -> str:
    """Short name of a row: ``<student>/<method or baseline> <precision>`` (``teacher <arch>`` for the teacher),
    with the runtime after it when it is not onnxruntime (``... int8 OpenVINO``)."""
    who = f"teacher {row['arch']}" if row["role"] == "teacher" else (
        f"{row['student']}/{'baseline' if row['role'] == 'baseline' else row['method']}")
    runtime = row.get("runtime", "onnxruntime")
    return f"{who} {row['precision']}" + ("" if runtime == "onnxruntime" else f" {RUNTIME_NAMES.get(runtime, runtime)}")
