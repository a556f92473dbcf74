"""Aggregate a sweep of DVC experiments: mean and spread over seeds, per configuration and model.

A sweep runs each configuration (a set of params overrides) once per seed as a DVC
experiment; the rows here group the experiments by configuration and read every
model's test metrics (``metrics/<run>.json``) from ``dvc exp show``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

METRICS = ("top1", "top5", "nll", "ece")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _config_label(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "(params.yaml)"


def aggregate(experiments: Iterable[dict[str, Any]], plan: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per (configuration, model): seeds found, and mean / sample std of each metric.

    ``experiments``: rows of :func:`pipeline.orchestrate.experiments.experiment_table`; ``plan``: the
    sweep's :class:`~pipeline.orchestrate.experiments.QueuedExperiment` list (names, overrides, seeds).
    """
    by_name = {e["name"]: e for e in experiments}
    groups: dict[str, dict[str, dict[str, list[float]]]] = {}
    seeds: dict[str, dict[str, list[int]]] = {}
    for q in plan:
        exp = by_name.get(q.name)
        if exp is None:
            continue
        label = _config_label(q.overrides)
        for file, data in exp["metrics"].items():
            if not (file.startswith("metrics/") and file.endswith(".json")):
                continue
            if not any(isinstance(data.get(m), int | float) for m in METRICS):
                continue  # a metrics file declared in dvc.yaml that this experiment did not produce
            model = file[len("metrics/"):-len(".json")]
            cell = groups.setdefault(label, {}).setdefault(model, {m: [] for m in METRICS})
            for m in METRICS:
                if isinstance(data.get(m), int | float):
                    cell[m].append(float(data[m]))
            seeds.setdefault(label, {}).setdefault(model, []).append(q.seed)
    rows: list[dict[str, Any]] = []
    for label, models in groups.items():
        for model, cell in sorted(models.items()):
            row: dict[str, Any] = {"config": label, "model": model, "seeds": len(seeds[label][model])}
            for m, values in cell.items():
                if values:
                    row[f"{m}_mean"], row[f"{m}_std"] = (round(x, 4) for x in _mean_std(values))
            rows.append(row)
    return rows


def sweep_markdown(rows: Sequence[dict[str, Any]], name: str) -> str:
    """The aggregated table as markdown: top-1 and NLL as mean ± std over seeds."""
    out = [f"# Sweep {name}", "", "Test metrics, mean ± sample standard deviation over seeds.", "",
           "| configuration | model | seeds | top-1 % | NLL | ECE |", "|---|---|---|---|---|---|"]

    def cell(r: dict[str, Any], m: str, spec: str) -> str:
        return f"{r[m + '_mean']:{spec}} ± {r[m + '_std']:{spec}}" if f"{m}_mean" in r else "—"

    for r in rows:
        out.append(f"| {r['config']} | {r['model']} | {r['seeds']} | {cell(r, 'top1', '.2f')} | "
                   f"{cell(r, 'nll', '.3f')} | {cell(r, 'ece', '.3f')} |")
    return "\n".join(out) + "\n"


def write_sweep(root: Path, name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``reports/sweeps/<name>.json`` and ``.md`` (atomically); returns the markdown path."""
    from pipeline.engine.atomic import atomic_write_json, atomic_write_text

    base = root / "reports" / "sweeps"
    atomic_write_json(base / f"{name}.json", {"name": name, "rows": list(rows)})
    md = base / f"{name}.md"
    atomic_write_text(md, sweep_markdown(rows, name))
    return md
