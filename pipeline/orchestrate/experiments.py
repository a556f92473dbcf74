"""Runs recorded as DVC experiments; the plan of a sweep (params x seeds) and which of its experiments
share stages.

Everything goes through DVC's Python API (``Repo.experiments``, ``Repo.index``), not its
command line's text. Running the experiments is :mod:`pipeline.orchestrate.isolated`'s.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.orchestrate.params import flatten
from pipeline.orchestrate.repo import open_repo


def head_commit(root: Path) -> str | None:
    """The commit ``root``'s work tree is on, or None when it is no git repository with a commit."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def is_git_repo(root: Path) -> bool:
    """Whether ``root`` is a git work tree with at least one commit (DVC experiments need one)."""
    return head_commit(root) is not None


def known_students(root: Path) -> list[str]:
    """The student names of ``root``'s params.yaml (none when it has no file)."""
    params = root / "params.yaml"
    return list((yaml.safe_load(params.read_text()) or {}).get("students") or {}) if params.is_file() else []


def save_experiment(root: Path, name: str | None, targets: Sequence[str] | None = None) -> str | None:
    """Record the workspace (params, dvc.lock, metrics of ``targets``, default all) as a DVC experiment."""
    untracked = [p for p in ("dvc.lock",) if (root / p).exists()]
    with open_repo(root) as repo:
        repo.experiments.save(targets=list(targets) if targets else None, name=name, force=True,
                              include_untracked=untracked)
    return name


@dataclass(frozen=True)
class QueuedExperiment:
    """One run of a sweep: its experiment name, overrides and seed, and the stages it reproduces (all if empty).

    ``labels`` are what the reports group by (e.g. ``{"method": "kd", "student": "resnet8"}``).
    """

    name: str
    overrides: dict[str, Any]
    seed: int
    targets: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """The overrides this experiment applies, its seed included."""
        return {**self.overrides, "seed": self.seed}


def sweep_plan(prefix: str, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
               targets: Sequence[str] = ()) -> list[QueuedExperiment]:
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
            plan.append(QueuedExperiment(f"{prefix}-c{ci}-s{seed}", overrides, int(seed), tuple(targets)))
    return plan


def compare_plan(prefix: str, methods: Sequence[str], students: Sequence[str], seeds: Sequence[int],
                 known_students: Sequence[str]) -> list[QueuedExperiment]:
    """Each method x student x seed once: the method alone in its list, the stages that evaluate it, the
    student alone and the teacher as targets (so the report can pair each model with its student alone).

    ValueError naming an unknown method or student, and what is allowed.
    """
    from pipeline.distill.registry import load_methods

    specs = load_methods()
    unknown = [m for m in methods if m not in specs]
    if unknown or not methods:
        raise ValueError(f"compare --methods: unknown {unknown or 'none given'}; allowed: {', '.join(sorted(specs))}")
    missing = [s for s in students if s not in known_students]
    if missing or not students:
        raise ValueError(f"compare --students: {missing or 'none given'} not in params.yaml `students`; "
                         f"there: {', '.join(known_students)}")
    if not seeds:
        raise ValueError("compare --seeds: give at least one seed")
    plan: list[QueuedExperiment] = []
    for method in methods:
        section, stage = ("distill", "distill") if specs[method].offline else ("online", "online")
        for student in students:
            targets = ("evaluate_teacher", f"evaluate_baseline@{student}", f"evaluate_{stage}@{student}-{method}")
            for seed in seeds:
                plan.append(QueuedExperiment(f"{prefix}-{method}-{student}-s{seed}", {f"{section}.methods": [method]},
                                             int(seed), targets, {"method": method, "student": student}))
    return plan


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def shared_stage_keys(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Stages that experiments with equal params share: stage -> (its param keys, its upstream stages).

    Those are the stages that neither come from a ``foreach``/``matrix`` (whose set moves
    with the params) nor depend on one: the teacher and what it needs. Two experiments
    that give such a stage the same param values run it identically, so DVC's run-cache
    lets the second restore what the first ran.
    """
    import networkx as nx
    from dvc.dependency.param import ParamsDependency

    with open_repo(root) as repo:
        graph = repo.index.graph
        out: dict[str, tuple[list[str], list[str]]] = {}
        for stage in graph.nodes:
            closure = nx.descendants(graph, stage) | {stage}
            if any("@" in s.addressing for s in closure):
                continue
            keys = sorted({k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params})
            out[stage.addressing] = (keys, sorted(s.addressing for s in graph.successors(stage)))
    return out


def leaders(plan: Sequence[QueuedExperiment], params_of: Mapping[str, Mapping[str, Any]],
            shared: Mapping[str, tuple[list[str], list[str]]],
            upstream_of_targets: Mapping[str, set[str] | None]) -> dict[str, set[str]]:
    """For each experiment, the earlier ones it waits for: those first to run a shared stage it runs too.

    ``params_of``: experiment name -> its merged params; ``upstream_of_targets``: experiment
    name -> the stages its targets reproduce (None: all). The wait is what makes a teacher
    train once per distinct teacher params however many experiments run at once; an
    experiment's leader runs the stage, the others restore it from DVC's run-cache.
    """
    order = _topological(shared)
    first: dict[str, str] = {}
    waits: dict[str, set[str]] = {}
    for exp in plan:
        keys: dict[str, str] = {}
        runs = upstream_of_targets.get(exp.name)
        for stage in order:
            params, ups = shared[stage]
            values = {k: _lookup(params_of[exp.name], k) for k in params}
            keys[stage] = json.dumps([stage, values, [keys[u] for u in ups if u in keys]], sort_keys=True, default=str)
        mine = {keys[s] for s in order if runs is None or s in runs}
        waits[exp.name] = {first[k] for k in mine if k in first}
        for k in mine:
            first.setdefault(k, exp.name)
    return waits


def _topological(shared: Mapping[str, tuple[list[str], list[str]]]) -> list[str]:
    done: list[str] = []
    seen: set[str] = set()

    def visit(s: str) -> None:
        if s in seen:
            return
        seen.add(s)
        for u in shared[s][1]:
            if u in shared:
                visit(u)
        done.append(s)

    for s in sorted(shared):
        visit(s)
    return done


def experiment_table(root: Path) -> list[dict[str, Any]]:
    """Every experiment ``dvc exp show`` lists, as {name, rev (its commit), params (flat), metrics {file: dict}}."""
    with open_repo(root) as repo:
        data = [exp.dumpd() for exp in repo.experiments.show(fetch_running=False)]
    rows: list[dict[str, Any]] = []

    def add(rev: dict[str, Any]) -> None:
        d = rev.get("data") or {}
        params = ((d.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = {f: (v or {}).get("data") or {} for f, v in (d.get("metrics") or {}).items()}
        rows.append({"name": rev.get("name") or rev.get("rev"), "rev": rev.get("rev"), "params": flatten(params),
                     "metrics": metrics})

    for base in data:
        add(base)
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev)
    return rows


def read_outs(root: Path, rev: str, paths: Sequence[str]) -> dict[str, str]:
    """The text of each of ``paths`` as experiment (or commit) ``rev`` recorded it, DVC outs included (read from
    the cache, where the sweep put or pulled them); paths that rev lacks are left out."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(root), rev=rev)
    out: dict[str, str] = {}
    for path in paths:
        try:
            out[path] = fs.read_text(path)
        except (FileNotFoundError, OSError):
            continue
    return out
