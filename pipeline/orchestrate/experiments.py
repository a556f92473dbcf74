"""Runs recorded as DVC experiments, and sweeps of params x seeds through DVC's experiment queue.

Everything goes through DVC's Python API (``Repo.experiments``), not its command
line's text.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.orchestrate.params import flatten, merged_params
from pipeline.orchestrate.repo import open_repo


def is_git_repo(root: Path) -> bool:
    """Whether ``root`` is a git work tree with at least one commit (DVC experiments need one)."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0


def save_experiment(root: Path, name: str | None, targets: Sequence[str] | None = None) -> str | None:
    """Record the workspace (params, dvc.lock, metrics of ``targets``, default all) as a DVC experiment."""
    untracked = [p for p in ("dvc.lock",) if (root / p).exists()]
    with open_repo(root) as repo:
        repo.experiments.save(targets=list(targets) if targets else None, name=name, force=True,
                              include_untracked=untracked)
    return name


@dataclass(frozen=True)
class QueuedExperiment:
    """One queued run of a sweep: its experiment name, overrides and seed."""

    name: str
    overrides: dict[str, Any]
    seed: int


def _dvc_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def sweep_plan(prefix: str, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int]) -> list[QueuedExperiment]:
    """Every combination of ``grid`` values times every seed, with readable experiment names."""
    keys = list(grid)
    if "seed" in keys:
        raise ValueError("sweep grid: give seeds with `seeds` (CLI --seeds), not as the grid key `seed`")
    empty = [k for k in keys if not list(grid[k])]
    if empty:
        raise ValueError(f"sweep grid: no values for {empty}")
    plan: list[QueuedExperiment] = []
    for ci, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = dict(zip(keys, combo, strict=True))
        for seed in seeds:
            plan.append(QueuedExperiment(f"{prefix}-c{ci}-s{seed}", overrides, int(seed)))
    return plan


def queue_experiments(root: Path, plan: Sequence[QueuedExperiment], targets: Sequence[str] = ()) -> None:
    """Queue each planned run as a DVC experiment (``dvc exp run --queue``); the schema checks every run first,
    so nothing is queued on bad params."""
    for exp in plan:
        merged_params(root / "params.yaml", {**exp.overrides, "seed": exp.seed})
    present = flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})
    with open_repo(root) as repo:
        for exp in plan:
            sets: list[str] = []
            for k, v in flatten({**exp.overrides, "seed": exp.seed}).items():
                new = "" if k in present else "+"  # DVC (Hydra) needs + for a key params.yaml does not have yet
                sets.append(f"{new}{k}={_dvc_value(v)}")
            repo.experiments.run(targets=list(targets) or None, params=sets, queue=True, name=exp.name)


def run_queue(root: Path, jobs: int, names: Sequence[str], poll: float = 2.0, timeout: float = 24 * 3600,
              on_progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Start ``jobs`` queue workers and wait until every named experiment finished; returns name -> status."""
    with open_repo(root) as repo:
        repo.experiments.celery_queue.start_workers(count=jobs)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = queue_status(root)
        mine = {n: status.get(n, "Unknown") for n in names}
        pending = [n for n, s in mine.items() if s in ("Queued", "Running", "Unknown")]
        line = ", ".join(f"{s}: {sum(1 for v in mine.values() if v == s)}" for s in sorted(set(mine.values())))
        if on_progress and line != last:
            on_progress(line)
            last = line
        if not pending:
            return mine
        if time.monotonic() > deadline:
            raise TimeoutError(f"sweep did not finish in {timeout:.0f} s: {line}")
        time.sleep(poll)


def queue_status(root: Path) -> dict[str, str]:
    """Experiment name -> queue status (Queued, Running, Success, Failed), from DVC's queue."""
    with open_repo(root) as repo:
        entries = repo.experiments.celery_queue.status()
    return {e["name"]: e["status"] for e in entries if e.get("name")}


def experiment_table(root: Path) -> list[dict[str, Any]]:
    """Every experiment ``dvc exp show`` lists, as {name, params (flat), metrics {file: dict}}."""
    with open_repo(root) as repo:
        data = [exp.dumpd() for exp in repo.experiments.show(fetch_running=False)]
    rows: list[dict[str, Any]] = []

    def add(rev: dict[str, Any]) -> None:
        d = rev.get("data") or {}
        params = ((d.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = {f: (v or {}).get("data") or {} for f, v in (d.get("metrics") or {}).items()}
        rows.append({"name": rev.get("name") or rev.get("rev"), "params": flatten(params), "metrics": metrics})

    for base in data:
        add(base)
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev)
    return rows
