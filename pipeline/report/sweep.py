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

from pipeline.stats import ALPHA, gap_recovered, paired_test

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


def compare_rows(experiments: Iterable[dict[str, Any]], plan: Iterable[Any],
                 seconds: dict[str, float] | None = None,
                 correct: dict[str, dict[str, list[bool]]] | None = None) -> list[dict[str, Any]]:
    """One row per (method, student) of a comparison: top-1 over seeds, and the gain over the student alone.

    The gain is paired: in each seed's experiment, the method's model minus the student
    trained alone with that seed (both in the same experiment), then mean and sample std
    of those differences, and of the gap recovered. ``correct``: per experiment, each
    run's right/wrong per test image; with it, each seed also gets its exact McNemar
    test against that seed's student alone, and the row counts the seeds significant at
    0.05. ``seconds``: each experiment's wall time.
    """
    by_name = {e["name"]: e for e in experiments}
    cells: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for q in plan:
        method, student = q.labels.get("method"), q.labels.get("student")
        exp = by_name.get(q.name)
        if not method or not student or exp is None:
            continue
        model = exp["metrics"].get(f"metrics/{method}/{student}.json", {}).get("top1")
        alone = exp["metrics"].get(f"metrics/baseline/{student}.json", {}).get("top1")
        teacher = exp["metrics"].get("metrics/teacher.json", {}).get("top1")
        if not isinstance(model, int | float) or not isinstance(alone, int | float):
            continue
        cell = cells.setdefault((method, student), {"top1": [], "alone": [], "gain": [], "teacher": [], "gap": [],
                                                    "s": [], "per_seed": []})
        cell["top1"].append(float(model))
        cell["alone"].append(float(alone))
        cell["gain"].append(float(model) - float(alone))
        seed: dict[str, Any] = {"seed": q.seed, "top1": float(model), "alone": float(alone),
                                "gain": round(float(model) - float(alone), 4)}
        if isinstance(teacher, int | float):
            cell["teacher"].append(float(teacher))
            gap = gap_recovered(float(model), float(alone), float(teacher))
            seed["gap_recovered"] = gap
            if gap is not None:
                cell["gap"].append(gap)
        right = (correct or {}).get(q.name, {})
        mine, theirs = right.get(f"{method}/{student}"), right.get(f"baseline/{student}")
        if mine is not None and theirs is not None and len(mine) == len(theirs):
            t = paired_test(mine, theirs)
            seed.update({"only_model": t.only_model, "only_alone": t.only_reference, "p_value": t.p_value,
                         "significant": t.significant})
        cell["per_seed"].append(seed)
        if seconds and q.name in seconds:
            cell["s"].append(seconds[q.name])
    rows: list[dict[str, Any]] = []
    for (method, student), c in cells.items():
        row: dict[str, Any] = {"method": method, "student": student, "seeds": len(c["top1"])}
        for key in ("top1", "alone", "gain", "teacher", "gap"):
            if c[key]:
                name = "gap_recovered" if key == "gap" else key
                row[f"{name}_mean"], row[f"{name}_std"] = (round(x, 4) for x in _mean_std(c[key]))
        row["per_seed"] = sorted(c["per_seed"], key=lambda d: d["seed"])
        tested = [d for d in c["per_seed"] if "p_value" in d]
        if tested:
            row["paired_seeds"] = len(tested)
            row["better_seeds"] = sum(d["significant"] and d["gain"] > 0 for d in tested)
            row["worse_seeds"] = sum(d["significant"] and d["gain"] < 0 for d in tested)
        if c["s"]:
            row["wall_s_mean"] = round(sum(c["s"]) / len(c["s"]), 1)
        rows.append(row)
    return rows


def sweep_markdown(rows: Sequence[dict[str, Any]], name: str, compare: Sequence[dict[str, Any]] = (),
                   failures: Sequence[dict[str, Any]] = ()) -> str:
    """The sweep's report: the comparison (if any), every model as mean ± std over seeds, the failed experiments."""
    out = [f"# Sweep {name}", ""]

    def pm(r: dict[str, Any], m: str, spec: str) -> str:
        return f"{r[m + '_mean']:{spec}} ± {r[m + '_std']:{spec.lstrip('+')}}" if f"{m}_mean" in r else "—"

    if compare:
        out += ["## Methods against the student alone", "",
                "Top-1 % on the test split, mean ± sample standard deviation over seeds. The gain is paired: "
                "each seed's model minus the student trained alone with the same seed, in the same experiment; "
                "gap recovered = (model - alone) / (teacher - alone). Each seed's exact McNemar test (on the test "
                f"images only one of the two gets right) counts as significant at p < {ALPHA:g}.", "",
                "| method | student | seeds | top-1 % | student alone % | gain (points) | gap recovered | "
                "seeds significantly better / worse | teacher % | wall s / run |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in compare:
            wall = f"{r['wall_s_mean']:.1f}" if "wall_s_mean" in r else "—"
            sig = f"{r['better_seeds']} / {r['worse_seeds']} of {r['paired_seeds']}" if "paired_seeds" in r else "—"
            out.append(f"| {r['method']} | {r['student']} | {r['seeds']} | {pm(r, 'top1', '.2f')} | "
                       f"{pm(r, 'alone', '.2f')} | {pm(r, 'gain', '+.2f')} | {pm(r, 'gap_recovered', '+.2f')} | "
                       f"{sig} | {pm(r, 'teacher', '.2f')} | {wall} |")
        out += ["", "### Each seed against its student alone", "",
                "| method | student | seed | top-1 % | alone % | gain | only it right | only alone right | "
                "McNemar p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in compare:
            for d in r.get("per_seed", []):
                if "p_value" in d:
                    word = (("better" if d["gain"] > 0 else "worse") + ", significant") if d["significant"] \
                        else "within noise"
                    tail = f"{d['only_model']} | {d['only_alone']} | {d['p_value']:.3g} | {word}"
                else:
                    tail = "— | — | — | no per-image predictions"
                out.append(f"| {r['method']} | {r['student']} | {d['seed']} | {d['top1']:.2f} | {d['alone']:.2f} | "
                           f"{d['gain']:+.2f} | {tail} |")
        out += ["", "## Every model", ""]
    out += ["Test metrics, mean ± sample standard deviation over seeds.", "",
            "| configuration | model | seeds | top-1 % | NLL | ECE |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['model']} | {r['seeds']} | {pm(r, 'top1', '.2f')} | "
                   f"{pm(r, 'nll', '.3f')} | {pm(r, 'ece', '.3f')} |")
    if failures:
        out += ["", f"## Failed experiments ({len(failures)})", ""]
        for f in failures:
            out += [f"### {f['name']}", "", f"{f['why']}", ""]
            if f.get("log"):
                out += ["```", f["log"].rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def write_sweep(root: Path, name: str, rows: Sequence[dict[str, Any]], compare: Sequence[dict[str, Any]] = (),
                failures: Sequence[dict[str, Any]] = (), experiments: Sequence[dict[str, Any]] = ()) -> Path:
    """Write ``reports/sweeps/<name>.json`` and ``.md`` (atomically); returns the markdown path."""
    from pipeline.engine.atomic import atomic_write_json, atomic_write_text

    base = root / "reports" / "sweeps"
    atomic_write_json(base / f"{name}.json", {"name": name, "rows": list(rows), "compare": list(compare),
                                              "failures": list(failures), "experiments": list(experiments)})
    md = base / f"{name}.md"
    atomic_write_text(md, sweep_markdown(rows, name, compare, failures))
    return md
