"""Prefect flows over the DVC pipeline: one task per DVC stage, runs recorded as DVC experiments.

``pipeline_flow`` chains the stages of ``dvc.yaml`` in the DAG's order. Each stage runs
*through DVC* (so DVC's cache, lock file and lineage stay the truth; an up-to-date stage
is skipped by DVC in ~30 ms). A stage that failed for a reason that can pass (its
process was killed, DVC's lock was busy) is retried; one that failed on its own (bad
params exit with 2, a crash with 1) is not. One flow holds a workspace at a time, so
DVC commands for one workspace never run concurrently.

Flow parameters ``params`` override params.yaml for that run (validated by the schema
before anything runs); the run is saved as a DVC experiment and params.yaml is put
back as it was, so every run is "the workspace's params + this run's overrides".

``sweep_flow`` queues a grid of params x seeds as DVC experiments (``dvc exp run
--queue``), runs the queue with N workers and aggregates the results as mean and
spread per model.

Both publish their tables and reports as Prefect artifacts. They run with no server
(Prefect starts a temporary one) or as deployments on a process work pool
(``prefect.yaml``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

# no network here or on many edge build hosts: Prefect's telemetry would only log errors
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402

from pipeline import workspace as ws  # noqa: E402
from pipeline.dvc_locks import ensure_unlocked  # noqa: E402

RETRIES = 2
RETRY_DELAY_S = 5


def _is_transient(task_, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry only failures that can pass: killed stage processes, a busy DVC lock."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001
            return False
    return isinstance(exc, ws.StageFailedError) and exc.transient


def _stage_output_logger() -> logging.Logger:
    """A logger that sends stage output to the run's log in the Prefect API only.

    Not to the console: the console already shows the output, and the console handler
    writes to the descriptor being captured, which would loop.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("kdpipe.stage_output")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@task(name="dvc-stage", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_is_transient)
def run_stage(root: str, stage: str, force: bool = False, needed: bool = True) -> str:
    """One DVC stage through ``Repo.reproduce`` (single item); returns "ran" or "up to date".

    ``needed=False``: DVC's status (taken once, before any stage ran) found neither the stage
    nor anything upstream of it changed, so DVC would skip it; the task says so without
    opening the repository again.
    """
    if not needed:
        return "up to date"
    out = _stage_output_logger()
    ran = ws.reproduce_stage(Path(root), stage, on_line=out.info, force=force)
    return "ran" if ran else "up to date"


def _results_rows(root: Path) -> list[dict[str, Any]]:
    """Compact rows for the results table artifact: the report's rows, or the metrics files before a report."""
    results = root / "reports" / "results.json"
    rows: list[dict[str, Any]] = []
    if results.is_file():
        for r in json.loads(results.read_text())["rows"]:
            lat = {f"{p} p50 ms": v.get("p50_ms") for p, v in (r.get("latency") or {}).items()}
            rows.append({"model": r["run"], "precision": r["precision"], "arch": r["arch"], "top1": r.get("top1"),
                         "params": r.get("params"), "bytes": r.get("bytes"), **lat})
        return rows
    from pipeline.report.metrics import collect_results

    return [{"model": r["run"], "top1": r.get("top1"), "params": r.get("params"), "macs": r.get("macs")}
            for r in collect_results(root)]


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "kdpipe"


def publish(root: Path, key: str = "kdpipe") -> None:
    """Results table and markdown report of the workspace as Prefect artifacts."""
    rows = _results_rows(root)
    if rows:
        create_table_artifact(table=rows, key=f"{_artifact_key(key)}-results",
                              description=f"kdpipe results of {root}: accuracy, size, latency per model")
    report = root / "reports" / "results.md"
    if report.is_file():
        create_markdown_artifact(markdown=report.read_text(), key=f"{_artifact_key(key)}-report",
                                 description=f"kdpipe report of {root}")


def _run_name(default: str) -> str:
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return f"kdpipe-{_artifact_key(ctx.flow_run.name)}"
    return default


@flow(name="kdpipe-pipeline")
def pipeline_flow(
    params: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    workspace: str = ".",
    experiment: str | None = None,
    record: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Reproduce the DVC pipeline of ``workspace`` stage by stage, with ``params`` overrides.

    ``params``: dotted keys or nested sections, e.g. ``{"distill.kd.temperature": 2}``.
    ``targets``: stage names to reproduce (with what they depend on); all when empty.
    ``record``: save the run as a DVC experiment named ``experiment`` (default: the flow run's name).
    """
    log = get_run_logger()
    root = Path(workspace).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"workspace {root} has no dvc.yaml (flow parameter `workspace`)")
    with ws.workspace_lock(root):
        if ws.restore_run_params(root):
            log.warning("params.yaml put back as it was before a run that was killed with overrides applied")
        _ensure_unlocked(root, log)
        if params:
            ws.apply_run_params(root, params)
        try:
            if params:
                log.info("params overrides: %s", ws.flatten(params))
            order = ws.stage_order(root, targets)
            todo = ws.stages_to_run(root, order) if not force else set(order)
            log.info("%d of %d stages need to run: %s", len(todo), len(order), ", ".join(s for s in order if s in todo))
            outcome: dict[str, str] = {}
            for stage in order:
                outcome[stage] = run_stage.with_options(name=f"stage {stage}")(str(root), stage, force, stage in todo)
            name = None
            if record and ws.is_git_repo(root):
                name = ws.save_experiment(root, experiment or _run_name("kdpipe-run"), order if targets else None)
                log.info("recorded as DVC experiment %s (`dvc exp show`)", name)
            elif record:
                log.warning("%s is not a git repository with a commit: run not recorded as a DVC experiment", root)
        finally:
            ws.restore_run_params(root)
    publish(root, experiment or "kdpipe")
    ran = [s for s, o in outcome.items() if o == "ran"]
    return {"workspace": str(root), "stages": outcome, "ran": ran, "experiment": name}


def _ensure_unlocked(root: Path, log: Any) -> None:
    """Stop on DVC locks held or left stale; an rwlock a kill cut short is removed (and logged) instead."""
    for fixed in ensure_unlocked(root, repair_cut_rwlock=True).repaired:
        log.warning("removed %s left by a killed DVC run", fixed)


@flow(name="kdpipe-sweep")
def sweep_flow(
    grid: dict[str, list[Any]] | None = None,
    seeds: list[int] | None = None,
    jobs: int = 1,
    targets: list[str] | None = None,
    workspace: str = ".",
    name: str | None = None,
) -> dict[str, Any]:
    """Queue every combination of ``grid`` x ``seeds`` as a DVC experiment, run the queue, aggregate.

    ``grid``: param key -> list of values, e.g. ``{"distill.kd.temperature": [2, 4]}``.
    The aggregated table (mean and spread over seeds per model and configuration) is
    published as an artifact and written to ``reports/sweeps/<name>.md`` / ``.json``.
    """
    from pipeline.report.sweep import aggregate, sweep_markdown, write_sweep

    log = get_run_logger()
    root = Path(workspace).resolve()
    seeds = list(seeds or [0])
    prefix = _artifact_key(name or _run_name("sweep"))
    plan = ws.sweep_plan(prefix, grid or {}, seeds)
    log.info("queueing %d experiments (%d configurations x %d seeds)", len(plan), len(plan) // len(seeds), len(seeds))
    with ws.workspace_lock(root):
        _ensure_unlocked(root, log)
        ws.queue_experiments(root, plan, targets or ())
        status = ws.run_queue(root, jobs, [e.name for e in plan], on_progress=log.info)
    failed = [n for n, s in status.items() if s != "Success"]
    if failed:
        log.error("experiments that did not succeed: %s (see `dvc queue logs <name>`)", failed)
    table = aggregate(ws.experiment_table(root), plan)
    write_sweep(root, prefix, table)
    if table:
        create_table_artifact(table=table, key=f"{prefix}-sweep", description="mean and spread over seeds per model")
        create_markdown_artifact(markdown=sweep_markdown(table, prefix), key=f"{prefix}-sweep-report")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(plan)} sweep experiments failed: {failed}")
    return {"experiments": [e.name for e in plan], "table": table}


def serve(name: str = "kdpipe", workspace: str = ".") -> None:
    """Serve both flows as deployments from this process (no work pool needed): ``kdpipe serve``."""
    from prefect import serve as prefect_serve

    os.chdir(workspace)
    prefect_serve(
        pipeline_flow.to_deployment(name=name, parameters={"workspace": str(Path(workspace).resolve())}),
        sweep_flow.to_deployment(name=f"{name}-sweep", parameters={"workspace": str(Path(workspace).resolve())}),
    )
