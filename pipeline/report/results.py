"""One row per deployed model x variant, the Pareto front, the pick under each profile's budgets.

Inputs (written by earlier stages): ``reports/export.json`` (which models, roles,
parity), ``reports/quantize.json`` (top-1/top-5 and size of every ONNX file, run by
onnxruntime on the test split), ``reports/predictions.json`` (each file's class per test
image, per runtime: the paired tests of the picks and fronts), ``reports/benchmark.json``
(latency per device profile, with 95 % intervals), ``metrics/<run>.json`` (parameters and
MACs from the evaluate stage) and ``plots/confusion/<run>.json`` (each test image's
prediction, for the paired tests of :mod:`pipeline.report.significance`).
The rows are joined by :mod:`pipeline.report.rows`; their Pareto front and budget pick,
beyond noise only, are decided by :mod:`pipeline.report.decisions`; the Markdown is
written by :mod:`pipeline.report.markdown`. Outputs: ``reports/results.json``, ``reports/results.md`` and (via
:mod:`pipeline.report.plots`) ``reports/pareto.png``. Both results files end with the
provenance of every input (kdpipe version, git revision, params hash, library versions,
device) and of the report itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.report.decisions import (
    Noise,
    RowKey,
    best_variants,
    choose,
    correct_from_predictions,
    latency_interval,
    noise_front,
    pool_graphs,
)
from pipeline.report.markdown import markdown
from pipeline.report.metrics import collect_results
from pipeline.report.rows import build_rows, label
from pipeline.report.significance import read_correct, significance_rows
from pipeline.report.why import explain
from pipeline.stats import ALPHA


def _read(path: Path, stage: str) -> Any:
    from pipeline.deploy.artifacts import read_json

    return read_json(path, stage)


def _brief(row: dict[str, Any], profile: str, statistic: str) -> dict[str, Any]:
    """A row as the summary names it: label, run, runtime, precision, bundle, top-1, latency with interval, KiB."""
    lat = latency_interval(row, profile, statistic)
    return {"model": label(row), "run": row["run"], "runtime": row.get("runtime", "onnxruntime"),
            "precision": row["precision"], "bundle": row.get("bundle"), "top1": row["top1"],
            "latency_ms": None if lat is None else lat.point,
            "latency_ci_ms": None if lat is None else [lat.low, lat.high], "kib": round(row["bytes"] / 1024, 1)}


def summarize(rows: list[dict[str, Any]], profiles: Sequence[dict[str, Any]], statistic: str,
              test_images: int | None = None, rule: str = "cheapest_within_noise",
              correct: dict[RowKey, list[bool]] | None = None, alpha: float = ALPHA) -> dict[str, Any]:
    """Pareto front (in tie groups), budget pick and the pick's explanation per profile.

    Both decide only beyond noise (:mod:`pipeline.report.decisions`): accuracy by the exact
    McNemar test on the per-image ``correct`` of each row (``(run, runtime, precision)`` ->
    right/wrong per test image; rows without them compare top-1 as points), latency by
    paired rounds or separated 95 % intervals, the same graph a latency tie. The pick follows ``rule``
    (``report.pick``); ``why`` says in words what fits, the reference and what is within
    noise of it, why the pick won, which more accurate rows each budget left out, and (rows
    without predictions, given ``test_images``) what the pick's 95 % interval holds.
    """
    noise = Noise(dict(correct or {}), alpha)
    out: dict[str, Any] = {}
    for prof in profiles:
        name = prof["name"]
        groups = noise_front(rows, name, statistic, noise)
        budget, size = prof.get("latency_budget_ms"), prof.get("size_budget_kib")
        chosen = choose(rows, name, budget, size, statistic, rule, noise) \
            if budget is not None or size is not None else None
        pick = chosen.row if chosen else None
        out[name] = {
            "statistic": statistic,
            "rule": rule,
            "pareto_front": [label(r) for g in groups for r in g],
            "pareto_groups": [[_brief(r, name, statistic) for r in g] for g in groups],
            "budget_ms": budget,
            "size_budget_kib": size,
            "pick": None if pick is None else _brief(pick, name, statistic),
            "reference": None if chosen is None or chosen.reference is None else label(chosen.reference),
            "within_noise": [] if chosen is None or chosen.row is None else [label(r) for r in chosen.candidates],
            "why": explain(chosen, rows, name, budget, size, statistic, noise, test_images) if chosen else "",
        }
    return out


def provenance_sources(export: dict[str, Any], quantize: dict[str, Any], benchmark: dict[str, Any] | None,
                       tensorrt: dict[str, Any] | None, metrics: dict[str, dict[str, Any]],
                       own: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What produced each input of the report, and the report itself: output path -> provenance dict.

    Inputs written before provenance was recorded are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, m in metrics.items():
        if m.get("provenance"):
            out[f"metrics/{key}.json"] = m["provenance"]
    for name, doc in (("export", export), ("quantize", quantize), ("benchmark", benchmark)):
        if (doc or {}).get("provenance"):
            out[f"reports/{name}.json"] = doc["provenance"]
    if (tensorrt or {}).get("provenance"):
        out["exports/tensorrt/status.json"] = tensorrt["provenance"]
    out["reports/results.json"] = own
    return out


def model_summary(rows: list[dict[str, Any]], profiles: Sequence[dict[str, Any]], statistic: str, rule: str,
                  correct: dict[RowKey, list[bool]] | None = None, alpha: float = ALPHA) -> list[dict[str, Any]]:
    """One entry per model and runtime: its best variant by ``rule`` among its own (no budget, latency under the
    first profile), with top-1, KiB and per profile the latency with its interval (``latency`` in results.json's
    ``summary``)."""
    first = profiles[0]["name"] if profiles else None
    out = []
    for r in best_variants(rows, first, statistic, rule, Noise(dict(correct or {}), alpha)):
        entry = {k: v for k, v in _brief(r, first or "", statistic).items() if not k.startswith("latency")}
        entry["latency"] = {}
        for p in profiles:
            lat = latency_interval(r, p["name"], statistic)
            entry["latency"][p["name"]] = None if lat is None else {"ms": lat.point, "ci_ms": [lat.low, lat.high]}
        out.append(entry)
    return out


def read_predictions(path: Path) -> dict[str, Any] | None:
    """``reports/predictions.json`` (each file's class per test image, per runtime), or None when the quantize
    stage of an older workspace did not write it; a file of another format is a DeployError."""
    from pipeline.deploy.artifacts import PREDICTIONS_FORMAT, DeployError

    if not path.is_file():
        return None
    doc = _read(path, "quantize")
    if doc.get("format") != PREDICTIONS_FORMAT:
        raise DeployError(f"{path} has format {doc.get('format')!r}, not {PREDICTIONS_FORMAT!r}: re-run the "
                          "quantize stage (dvc repro quantize)")
    return doc


def report_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``report`` stage: write ``reports/results.json``, ``results.md`` and ``pareto.png``."""
    from pipeline.deploy.artifacts import REPORTS, report_file, stage_provenance, tensorrt_dir
    from pipeline.deploy.device_results import device_profiles
    from pipeline.engine.atomic import atomic_write_json, atomic_write_text
    from pipeline.report.plots import pareto_plot

    export = _read(report_file(root, "export"), "export")
    quantize = _read(report_file(root, "quantize"), "quantize")
    benchmark = _read(report_file(root, "benchmark"), "benchmark")
    trt_file = tensorrt_dir(root) / "status.json"
    tensorrt = json.loads(trt_file.read_text()) if trt_file.is_file() else None
    metrics: dict[str, dict[str, Any]] = {}
    for key in export["models"]:
        f = root / "metrics" / f"{key}.json"
        if f.is_file():
            metrics[key] = json.loads(f.read_text())
    profiles = [p.model_dump(mode="json") for p in params.benchmark.profiles]
    statistic, rule, alpha = params.report.latency_statistic, params.report.pick, params.report.alpha
    correct = correct_from_predictions(read_predictions(report_file(root, "predictions")))
    rows = build_rows(export, quantize, benchmark, metrics, profiles)
    profiles += device_profiles(root, dict(params.benchmark.device_budgets), rows)  # measured on the devices
    pool_graphs(rows, [p["name"] for p in profiles if not p.get("device")], statistic)  # one latency per graph
    summary = summarize(rows, profiles, statistic, quantize.get("test_images"), rule, correct, alpha)
    best = model_summary(rows, profiles, statistic, rule, correct, alpha)
    evaluated = {r.pop("run"): r for r in collect_results(root)}  # the teacher too, when it is not exported
    significance = significance_rows(evaluated, read_correct(root, list(evaluated)))
    sources = provenance_sources(export, quantize, benchmark, tensorrt, metrics,
                                 stage_provenance(params, ("benchmark", "report"), root))
    result = {"rows": rows, "profiles": summary, "statistic": statistic, "pick_rule": rule, "alpha": alpha,
              "summary": best, "significance": significance,
              "environment": benchmark.get("environment", {}),
              "tensorrt": None if tensorrt is None else {"status": tensorrt.get("status"),
                                                         "reason": tensorrt.get("reason")},
              "provenance": sources}
    pareto_plot(rows, profiles, statistic, root / REPORTS / "pareto.png", dpi=params.report.plot_dpi,
                fronts={name: s["pareto_groups"] for name, s in summary.items()})
    atomic_write_text(root / REPORTS / "results.md",
                      markdown(rows, summary, profiles, export, quantize, benchmark, tensorrt, statistic, sources,
                               significance, best))
    atomic_write_json(root / REPORTS / "results.json", result)
    return result
