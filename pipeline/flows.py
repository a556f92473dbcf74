"""Prefect flows over the DVC pipeline: the stage DAG run concurrently, runs recorded as DVC experiments.

``pipeline_flow`` runs the stages of ``dvc.yaml`` as a DAG of Prefect tasks, one task
per stage named after it: every stage whose upstream stages are done starts, up to
``jobs`` at a time, each in its own device slot (a GPU, or a share of the CPU cores;
:mod:`pipeline.orchestrate.slots`). The commands run in threads of this process or
on a Dask cluster (``dask``); DVC stays the record: each stage is prepared and
recorded by DVC itself on this host, one at a time (:mod:`pipeline.orchestrate.record`),
so ``dvc.lock``, the cache and DVC's run-cache are what ``dvc repro`` writes, and a
stage the run-cache knows is restored, not run. A stage that failed for a reason that
can pass (its process was killed, DVC's lock was busy) is retried; one that failed on
its own (bad params exit with 2, a crash with 1) is not, and stops only what depends
on it. One flow holds a workspace at a time.

Flow parameters ``params`` override params.yaml for that run (validated by the schema
before anything runs); the run is saved as a DVC experiment and params.yaml is put
back as it was, so every run is "the workspace's params + this run's overrides".

``pipeline.sweeps.sweep_flow`` runs a grid of params x seeds (or a comparison of
methods) as DVC experiments, each in its own clone, on the same task runners.

Both publish their tables and reports as Prefect artifacts. They run with no server
(Prefect starts a temporary one) or as deployments on a process work pool
(``prefect.yaml``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline.orchestrate.prefect_env import set_defaults

set_defaults()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.futures import as_completed  # noqa: E402

from pipeline.dvc_locks import ensure_unlocked  # noqa: E402
from pipeline.orchestrate import experiments as exps  # noqa: E402
from pipeline.orchestrate import params as run_params  # noqa: E402
from pipeline.orchestrate import record as dvc_record  # noqa: E402
from pipeline.orchestrate import schedule, slots  # noqa: E402
from pipeline.orchestrate.command import StageFailedError, run_stage_command  # noqa: E402
from pipeline.orchestrate.dag import StageGraph, stage_graph, stages_to_run  # noqa: E402
from pipeline.orchestrate.lock import workspace_lock  # noqa: E402
from pipeline.orchestrate.runners import DaskTarget, parse_dask, task_runner  # noqa: E402

RETRIES = 2
RETRY_DELAY_S = 5
#: How a stage ended when it did not fail.
DONE = ("ran", "restored", "up to date")


class StagesFailedError(RuntimeError):
    """Some stages failed (``failures``: stage -> its StageFailedError); ``blocked`` did not run because of them."""

    def __init__(self, failures: dict[str, BaseException], blocked: list[str]) -> None:
        self.failures, self.blocked = failures, blocked
        lines = [f"{len(failures)} stage(s) failed: {', '.join(failures)}"]
        for err in failures.values():
            lines.append(str(err))
        if blocked:
            lines.append(f"not run because a stage they depend on failed: {', '.join(blocked)}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # noqa: ANN204 - Prefect pickles a failed flow's exception
        return (type(self), (self.failures, self.blocked))


def _is_transient(task_, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry only failures that can pass: killed stage processes, a busy DVC lock."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001
            return False
    return isinstance(exc, StageFailedError) and exc.transient


def _stage_output_logger() -> logging.Logger:
    """A logger that sends stage output to the task run's log in the Prefect API only.

    Not to the console: the console already shows the output as the stage prints it.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("kdpipe.stage_output")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@task(name="dvc-stage", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_is_transient)
def stage_command(stage: str, commands: list[str], cwd: str, env: dict[str, str], plan: slots.SlotPlan,
                  prefix: bool = False) -> str:
    """Run one DVC stage's command in a device slot, its output in this task's log; returns "ran".

    Runs wherever the task runner puts it (a thread here, a Dask worker elsewhere);
    recording with DVC happens afterwards on the flow's host.
    """
    out = _stage_output_logger()

    def on_line(line: str) -> None:
        sys.stdout.write(f"{stage} | {line}\n" if prefix else f"{line}\n")
        sys.stdout.flush()
        out.info(line)

    try:
        with slots.claim(plan) as slot:
            run_stage_command(stage, commands, cwd, {**os.environ, **env, **slot.env()}, on_line)
    finally:
        for handler in out.handlers:  # sent before the task ends: a Dask worker killed later must not take them along
            handler.flush()
    return "ran"


def _run_dag(root: Path, graph: StageGraph, todo: set[str], plan: slots.SlotPlan, runner: Any, force: bool,
             log: Any) -> tuple[dict[str, str], dict[str, float], dict[str, BaseException], list[str]]:
    """Run ``todo`` of ``graph``: each stage once its upstream stages are done, at most ``plan.jobs`` at once,
    the longest remaining chain first (:mod:`pipeline.orchestrate.schedule`).

    Returns each stage's outcome, the seconds each run took, the failures and the stages
    they blocked.
    """
    state = {s: "pending" for s in graph.order}
    futures: dict[str, Any] = {}
    running: dict[Any, tuple[str, float]] = {}
    seconds: dict[str, float] = {}
    failures: dict[str, BaseException] = {}
    blocked: list[str] = []
    resubmits: dict[str, int] = {}
    priority = schedule.critical_path(graph, schedule.load_seconds(root))
    total = len(todo)

    def finished() -> int:
        return sum(1 for s in graph.order if s in todo and state[s] not in ("pending", "running"))

    def ready() -> list[str]:
        """Settle what needs no run (up to date, blocked by a failure); return the stages free to start."""
        free = []
        for s in graph.order:  # dependency order: an upstream stage is settled before its downstream ones
            if state[s] != "pending":
                continue
            ups = graph.upstream.get(s, [])
            if any(state[u] in ("failed", "blocked") for u in ups):
                state[s] = "blocked"
                blocked.append(s)
            elif all(state[u] in DONE for u in ups):
                if s in todo:
                    free.append(s)
                else:
                    state[s] = "up to date"
        return free

    def start_ready() -> None:
        while True:
            chosen = schedule.pick(ready(), [n for n, _ in running.values()], plan.jobs, graph, priority)
            if not chosen:
                return
            for s in chosen:
                try:
                    prep = dvc_record.prepare(root, s, force)
                except Exception as err:  # noqa: BLE001 - DVC refused the stage: it fails, the rest go on
                    state[s], failures[s] = "failed", err
                    log.error("%s: could not be prepared by DVC: %s", s, err)
                    continue
                if prep.action != "run":
                    state[s] = prep.action
                    log.info("%s: %s (%d/%d)", s, "restored from DVC's run-cache" if prep.action == "restored"
                             else "up to date", finished(), total)
                    continue
                task_ = stage_command.with_options(name=s, task_run_name=s)
                fut = runner.submit(task_, parameters={"stage": s, "commands": prep.commands, "cwd": prep.cwd,
                                                       "env": prep.env, "plan": plan, "prefix": plan.jobs > 1},
                                    wait_for=[futures[u] for u in graph.upstream.get(s, []) if u in futures])
                futures[s] = fut
                running[fut] = (s, time.monotonic())
                state[s] = "running"
                log.info("%s: started", s)

    start_ready()
    while running:
        fut = next(iter(as_completed(list(running))))
        s, t0 = running.pop(fut)
        fut.wait()
        seconds[s] = round(time.monotonic() - t0, 2)
        if fut.state.is_completed():
            try:
                dvc_record.record(root, s)
                state[s] = "ran"
                log.info("%s: ran in %.1f s, recorded by DVC (%d/%d)", s, seconds[s], finished(), total)
            except Exception as err:  # noqa: BLE001
                state[s], failures[s] = "failed", err
                log.error("%s: %s", s, err)
        elif not fut.state.is_final() and resubmits.get(s, 0) < RETRIES:
            # a Dask worker died under the task and the attempt on another worker found the task run taken:
            # Prefect hands back an unfinished state; the stage runs again as a new task run
            resubmits[s] = resubmits.get(s, 0) + 1
            state[s] = "pending"
            log.warning("%s: its task ended %s (its worker died?); running it again", s, fut.state.type.value)
        else:
            err = fut.state.result(raise_on_failure=False) if fut.state.is_final() else None
            state[s] = "failed"
            failures[s] = err if isinstance(err, BaseException) else RuntimeError(f"stage {s}: {fut.state.message}")
            log.error("%s: failed after %.1f s: %s", s, seconds[s], getattr(err, "why", err))
        start_ready()
    ready()  # settle the stages the last failures blocked
    schedule.save_seconds(root, {s: t for s, t in seconds.items() if state[s] == "ran"})
    return {s: state[s] for s in graph.order}, seconds, failures, blocked


def _results_rows(root: Path) -> list[dict[str, Any]]:
    """Compact rows for the results table artifact: the report's rows, or the metrics files before a report."""
    results = root / "reports" / "results.json"
    rows: list[dict[str, Any]] = []
    if results.is_file():
        for r in json.loads(results.read_text())["rows"]:
            lat = {f"{p} p50 ms": (v or {}).get("p50_ms") for p, v in (r.get("latency") or {}).items()}
            rows.append({"model": r["run"], "runtime": r.get("runtime", "onnxruntime"), "precision": r["precision"],
                         "arch": r["arch"], "top1": r.get("top1"),
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
    jobs: int | str | None = None,
    dask: str | None = None,
) -> dict[str, Any]:
    """Reproduce the DVC pipeline of ``workspace`` as a concurrent DAG, with ``params`` overrides.

    ``params``: dotted keys or nested sections, e.g. ``{"distill.kd.temperature": 2}``.
    ``targets``: stage names to reproduce (with what they depend on); all when empty.
    ``record``: save the run as a DVC experiment named ``experiment`` (default: the flow run's name).
    ``jobs``: stages at a time, or "auto" (one per GPU; on CPU one per ``cpu_threads`` cores);
    default 1, or every worker of the Dask cluster.
    ``dask``: run the stage commands on a Dask cluster: ``local:N`` or a scheduler address.
    """
    from pipeline.params import load_params

    log = get_run_logger()
    root = Path(workspace).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"workspace {root} has no dvc.yaml (flow parameter `workspace`)")
    target: DaskTarget | None = parse_dask(dask) if dask else None
    if jobs is not None:
        slots.parse_jobs(jobs)
    with workspace_lock(root):
        if run_params.restore_run_params(root):
            log.warning("params.yaml put back as it was before a run that was killed with overrides applied")
        _ensure_unlocked(root, log)
        if params:
            run_params.apply_run_params(root, params)
        try:
            if params:
                log.info("params overrides: %s", run_params.flatten(params))
            cpu_threads = load_params(root / "params.yaml").cpu_threads
            graph = stage_graph(root, targets)
            todo = set(graph.order) if force else stages_to_run(root, graph)
            log.info("%d of %d stages need to run: %s", len(todo), len(graph.order),
                     ", ".join(s for s in graph.order if s in todo))
            known = target is None or target.workers or jobs is not None or not todo  # else: ask the cluster
            plan = slots.plan_slots(_jobs_wanted(jobs, target), cpu_threads) if known else None
            # nothing to run: no threads, no cluster to start
            with task_runner(plan.jobs if plan else 1, target) if todo else nullcontext() as runner:
                plan = plan or slots.plan_slots(_jobs_wanted(jobs, target, runner), cpu_threads)
                if todo:
                    log.info("%s%s", plan.describe(), f" ({target.describe()})" if target else "")
                outcome, seconds, failures, blocked = _run_dag(root, graph, todo, plan, runner, force, log)
            if failures:
                raise StagesFailedError(failures, blocked)
            name = None
            if record and exps.is_git_repo(root):
                name = exps.save_experiment(root, experiment or _run_name("kdpipe-run"), graph.order if targets else None)
                log.info("recorded as DVC experiment %s (`dvc exp show`)", name)
            elif record:
                log.warning("%s is not a git repository with a commit: run not recorded as a DVC experiment", root)
        finally:
            run_params.restore_run_params(root)
    publish(root, experiment or "kdpipe")
    ran = [s for s, o in outcome.items() if o == "ran"]
    return {"workspace": str(root), "stages": outcome, "ran": ran, "seconds": seconds, "jobs": plan.jobs,
            "experiment": name}


def _jobs_wanted(jobs: int | str | None, target: DaskTarget | None, runner: Any = None) -> int | str:
    """``jobs`` as given, else 1 here, the local cluster's size, or (once connected) the cluster's worker threads."""
    if jobs is not None:
        return slots.parse_jobs(jobs)
    if target is None:
        return 1
    if target.workers:
        return target.workers
    if runner is None:
        return 1
    return max(1, sum(runner.client.nthreads().values()))


def _ensure_unlocked(root: Path, log: Any) -> None:
    """Stop on DVC locks held or left stale; an rwlock a kill cut short is removed (and logged) instead."""
    for fixed in ensure_unlocked(root, repair_cut_rwlock=True).repaired:
        log.warning("removed %s left by a killed DVC run", fixed)
