"""Which ready stage starts first, and how long a run of the DAG takes on N slots.

Ready stages start in order of their critical path: the longest chain of work from
the stage to the end of the DAG, weighted by how long each stage took last time
(``.kdpipe/stage_seconds.json``; one second for a stage never timed). So the teacher
starts before evaluations, and the export chain before the last students' reports.
:func:`simulate` plays the same rule on N slots with given durations: the model of a
machine with more GPUs in ``benchmarks/parallel_repro.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pipeline.engine.atomic import atomic_write_json
from pipeline.orchestrate.dag import StageGraph

SECONDS_FILE = Path(".kdpipe") / "stage_seconds.json"
UNTIMED_S = 1.0


def load_seconds(root: Path) -> dict[str, float]:
    """Each stage's duration in the last run that ran it (empty when none was timed or the file is unreadable)."""
    try:
        data = json.loads((root / SECONDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def save_seconds(root: Path, seconds: Mapping[str, float]) -> None:
    """Remember the durations of the stages that just ran (earlier ones of the others are kept)."""
    merged = {**load_seconds(root), **{k: round(float(v), 2) for k, v in seconds.items()}}
    atomic_write_json(root / SECONDS_FILE, dict(sorted(merged.items())))


def critical_path(graph: StageGraph, seconds: Mapping[str, float]) -> dict[str, float]:
    """Per stage: its own duration plus the longest chain of durations downstream of it."""
    downstream: dict[str, list[str]] = {s: [] for s in graph.order}
    for s, ups in graph.upstream.items():
        for u in ups:
            downstream.setdefault(u, []).append(s)
    path: dict[str, float] = {}
    for s in reversed(graph.order):  # sinks first
        path[s] = seconds.get(s, UNTIMED_S) + max((path[d] for d in downstream.get(s, [])), default=0.0)
    return path


def pick(ready: list[str], running: list[str], jobs: int, graph: StageGraph, priority: Mapping[str, float]) -> list[str]:
    """Which of the ``ready`` stages start now, next to ``running``, on ``jobs`` slots.

    Highest critical path first. An exclusive stage starts only on an idle machine and
    nothing starts beside it; while it waits for the running ones to end, the stages
    after it in priority wait too (so it is never starved).
    """
    if any(s in graph.exclusive for s in running):
        return []
    order = {s: i for i, s in enumerate(graph.order)}
    start: list[str] = []
    for s in sorted(ready, key=lambda s: (-priority.get(s, 0.0), order[s])):
        if len(running) + len(start) >= jobs:
            break
        if s in graph.exclusive:
            if not running and not start:
                start.append(s)
            break
        start.append(s)
    return start


def simulate(graph: StageGraph, todo: set[str], seconds: Mapping[str, float], jobs: int) -> float:
    """Wall time of running ``todo`` with :func:`pick` on ``jobs`` slots, each stage taking ``seconds[stage]``."""
    priority = critical_path(graph, seconds)
    done = {s for s in graph.order if s not in todo}
    running: dict[str, float] = {}  # stage -> end time
    now = 0.0
    while len(done) < len(graph.order):
        ready = [s for s in graph.order if s not in done and s not in running
                 and all(u in done for u in graph.upstream.get(s, []))]
        for s in pick(ready, list(running), jobs, graph, priority):
            running[s] = now + seconds.get(s, UNTIMED_S)
        if not running:
            raise ValueError("the DAG cannot progress: a stage waits for one outside it")
        first = min(running, key=running.__getitem__)
        now = running.pop(first)
        done.add(first)
    return now
