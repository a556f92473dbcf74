"""The sweep flow: params x seeds (or methods x students x seeds) as DVC experiments, each in its own clone,
spread over this machine's slots or a Dask cluster.

Each experiment is one Prefect task named after it. The task clones the workspace's
commit, applies the experiment's params, runs ``dvc exp run`` and pushes the
experiment back (:mod:`pipeline.orchestrate.isolated`); it runs in a thread here
(``jobs``) or on a Dask worker (``dask``), so one command scales from a laptop to a
cluster whose machines share the workspace path. Outs go through DVC: the workspace's
cache directory, or a DVC remote (``remote``).

An experiment that would run a stage an earlier one runs with the same params (the
teacher of a seed) waits for that one, then restores the stage from DVC's run-cache:
the teacher trains once per distinct teacher params. A failed experiment is named in
the report with its log and the others go on; one whose process was killed is retried,
one whose Dask worker died runs again elsewhere; running the same sweep again runs only
the experiments the workspace does not have yet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.orchestrate.prefect_env import set_defaults

set_defaults()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402

from pipeline.flows import (  # noqa: E402
    RETRIES,
    RETRY_DELAY_S,
    _artifact_key,
    _ensure_unlocked,
    _is_transient,
    _run_name,
    _stage_output_logger,
)
from pipeline.orchestrate import experiments as exps  # noqa: E402
from pipeline.orchestrate import slots  # noqa: E402
from pipeline.orchestrate.isolated import (  # noqa: E402
    ExperimentJob,
    base_commit,
    pull_back,
    run_in_clone,
    shared_cache_dir,
    uncommitted,
)
from pipeline.orchestrate.runners import DaskTarget, parse_dask, task_runner  # noqa: E402


@task(name="experiment", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_is_transient)
def experiment_task(job: ExperimentJob, plan: slots.SlotPlan) -> float:
    """Run one experiment in its own clone, in a device slot, its output in this task's log; returns its seconds."""
    out = _stage_output_logger()
    try:
        with slots.claim(plan) as slot:
            return run_in_clone(job, out.info, slot.env())
    finally:
        for handler in out.handlers:  # sent before the task ends: a Dask worker killed later must not take them
            handler.flush()


def _plan(root: Path, prefix: str, grid: dict[str, list[Any]] | None, seeds: list[int], targets: list[str] | None,
          methods: list[str] | None, students: list[str] | None) -> list[exps.QueuedExperiment]:
    if methods or students:
        return exps.compare_plan(prefix, methods or [], students or [], seeds, exps.known_students(root))
    return exps.sweep_plan(prefix, grid or {}, seeds, targets or ())


def check_plan(root: Path, plan: list[exps.QueuedExperiment]) -> dict[str, str]:
    """Experiment name -> why the schema refuses its params, for those it refuses."""
    from pipeline.config.base import ConfigError
    from pipeline.orchestrate.params import merged_params

    bad: dict[str, str] = {}
    for exp in plan:
        try:
            merged_params(root / "params.yaml", exp.params())
        except (ConfigError, ValueError) as err:
            bad[exp.name] = str(err)
    return bad


def _already_done(root: Path, plan: list[exps.QueuedExperiment]) -> set[str]:
    """Experiments of the plan the workspace has, with the params the plan gives them."""
    from pipeline.orchestrate.params import flatten

    have = {e["name"]: e["params"] for e in exps.experiment_table(root)}
    done = set()
    for exp in plan:
        params = have.get(exp.name)
        if params is not None and all(params.get(k) == v for k, v in flatten(exp.params()).items()):
            done.add(exp.name)
    return done


def _waits(root: Path, plan: list[exps.QueuedExperiment]) -> dict[str, set[str]]:
    from pipeline.orchestrate.dag import stage_graph
    from pipeline.orchestrate.params import merged_params

    shared = exps.shared_stage_keys(root)
    params_of = {e.name: merged_params(root / "params.yaml", e.params()) for e in plan}
    reach: dict[tuple[str, ...], set[str] | None] = {}
    for e in plan:
        if e.targets not in reach:
            try:
                reach[e.targets] = set(stage_graph(root, list(e.targets)).order) if e.targets else None
            except ValueError:  # a target only this experiment's params create: assume every shared stage
                reach[e.targets] = None
    return exps.leaders(plan, params_of, shared, {e.name: reach[e.targets] for e in plan})


@flow(name="kdpipe-sweep")
def sweep_flow(
    grid: dict[str, list[Any]] | None = None,
    seeds: list[int] | None = None,
    jobs: int | None = None,
    targets: list[str] | None = None,
    workspace: str = ".",
    name: str | None = None,
    dask: str | None = None,
    remote: str | None = None,
    methods: list[str] | None = None,
    students: list[str] | None = None,
) -> dict[str, Any]:
    """Run every combination of ``grid`` x ``seeds`` (or ``methods`` x ``students`` x ``seeds``) as DVC
    experiments, each in its own clone, and write the report ``reports/sweeps/<name>.{md,json}``.

    ``grid``: param key -> list of values, e.g. ``{"distill.kd.temperature": [2, 4]}``.
    ``methods``/``students``: a comparison: each method x student x seed once, against the
    student alone. ``jobs``: experiments at once here (default 1, or every Dask worker).
    ``dask``: ``local:N`` or a scheduler address. ``remote``: a DVC remote to share outs
    through instead of the workspace's cache directory.
    """
    from pipeline.report.sweep import aggregate, compare_rows, write_sweep

    log = get_run_logger()
    root = Path(workspace).resolve()
    seeds = [int(s) for s in (seeds or [0])]
    prefix = _artifact_key(name or _run_name("sweep"))
    plan = _plan(root, prefix, grid, seeds, targets, methods, students)
    target: DaskTarget | None = parse_dask(dask) if dask else None
    rev = base_commit(root)
    _ensure_unlocked(root, log)  # the host reads and pulls experiments with DVC here
    dirty = uncommitted(root)
    if dirty:
        log.warning("the sweep runs commit %s; these changes are not committed and not in it: %s", rev[:8],
                    ", ".join(dirty))

    failures: dict[str, dict[str, Any]] = {n: {"name": n, "why": f"bad params: {why}", "log": ""}
                                           for n, why in check_plan(root, plan).items()}
    done = _already_done(root, plan)
    waits = _waits(root, [e for e in plan if e.name not in failures])
    todo = [e for e in plan if e.name not in failures and e.name not in done]
    log.info("%d experiments (%d already in the workspace, %d refused by the schema), %d to run, from commit %s",
             len(plan), len(done), len(failures), len(todo), rev[:8])
    cache_dir = None if remote else shared_cache_dir(root)
    seconds: dict[str, float] = {}
    if todo:
        seconds = _run_experiments(root, rev, todo, waits, jobs, target, cache_dir, remote, failures, done,
                                   prefix, len(plan), log)

    table = exps.experiment_table(root)
    rows = aggregate(table, plan)
    compare = compare_rows(table, plan, seconds, _paired_predictions(root, table, plan)) if methods or students \
        else []
    listed = [{"name": e.name, "seed": e.seed, "overrides": e.overrides, "targets": list(e.targets),
               "status": "failed" if e.name in failures else "done", "seconds": seconds.get(e.name)} for e in plan]
    md = write_sweep(root, prefix, rows, compare, list(failures.values()), listed)
    if rows:
        create_table_artifact(table=compare or rows, key=f"{prefix}-sweep",
                              description="mean and spread over seeds per model")
    create_markdown_artifact(markdown=md.read_text(), key=f"{prefix}-sweep-report")
    log.info("report: %s", md)
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(plan)} sweep experiments failed: {sorted(failures)} (their "
                           f"logs are in {md})")
    return {"experiments": [e.name for e in plan], "table": rows, "compare": compare, "seconds": seconds,
            "ran": sorted(seconds)}


def _paired_predictions(root: Path, table: list[dict[str, Any]],
                        plan: list[exps.QueuedExperiment]) -> dict[str, dict[str, list[bool]]]:
    """Per comparison experiment, the method's and the student alone's right/wrong per test image (their
    confusion files, read from the experiment's outs), for each seed's paired test."""
    from pipeline.report.significance import confusion_path, correct_of

    revs = {e["name"]: e.get("rev") for e in table}
    out: dict[str, dict[str, list[bool]]] = {}
    for q in plan:
        method, student, rev = q.labels.get("method"), q.labels.get("student"), revs.get(q.name)
        if not method or not student or not rev:
            continue
        keys = {confusion_path(k): k for k in (f"{method}/{student}", f"baseline/{student}")}
        texts = exps.read_outs(root, rev, list(keys))
        out[q.name] = {keys[path]: correct_of(text) for path, text in texts.items()}
    return out


def _run_experiments(root: Path, rev: str, todo: list[exps.QueuedExperiment], waits: dict[str, set[str]],
                     jobs: int | None, target: DaskTarget | None, cache_dir: str | None, remote: str | None,
                     failures: dict[str, dict[str, Any]], done: set[str], prefix: str, total: int,
                     log: Any) -> dict[str, float]:
    """Submit each experiment once those it waits for have ended, at most as many as there are slots;
    returns the seconds of those that ran. Failed ones land in ``failures``."""
    from pipeline.params import load_params

    cpu_threads = load_params(root / "params.yaml").cpu_threads
    seconds: dict[str, float] = {}
    ended = set(done) | set(failures)
    pending = list(todo)
    running: dict[Any, tuple[exps.QueuedExperiment, float]] = {}
    resubmits: dict[str, int] = {}
    wanted = jobs if jobs is not None else (target.workers if target and target.workers else None)
    with task_runner(wanted or 1, target) as runner:
        if wanted is None and target is not None:
            wanted = max(1, sum(runner.client.nthreads().values()))
        plan = slots.plan_slots(wanted or 1, cpu_threads)
        log.info("%s%s", plan.describe(), f" ({target.describe()})" if target else "")

        def progress() -> None:
            counts = {"queued": len(pending), "running": len(running), "done": len(ended - set(failures)),
                      "failed": len(failures)}
            log.info("sweep %s: %s", prefix, ", ".join(f"{k} {v}" for k, v in counts.items()))
            create_table_artifact(table=[{"experiment": n, "status": s} for n, s in _statuses(
                todo, pending, running, ended, failures).items()], key=f"{prefix}-progress",
                description=f"sweep {prefix}: {counts['done']} done, {counts['failed']} failed of {total}")

        def submit_ready() -> None:
            for exp in list(pending):
                if len(running) >= plan.jobs:
                    return
                if waits.get(exp.name, set()) - ended:
                    continue  # its leader still runs the stages it shares
                pending.remove(exp)
                job = ExperimentJob(exp.name, str(root), rev, exp.params(), list(exp.targets), cache_dir, remote)
                task_ = experiment_task.with_options(name=exp.name, task_run_name=exp.name)
                running[runner.submit(task_, parameters={"job": job, "plan": plan})] = (exp, time.monotonic())

        submit_ready()
        progress()
        while running:
            fut = next(iter(as_completed(list(running))))
            exp, t0 = running.pop(fut)
            fut.wait()
            if fut.state.is_completed():
                seconds[exp.name] = fut.result()
                try:
                    if remote:
                        pull_back(root, [exp.name], remote)
                    log.info("%s: done in %.1f s", exp.name, seconds[exp.name])
                except Exception as err:  # noqa: BLE001 - pushed but not pulled back: it counts as failed
                    failures[exp.name] = {"name": exp.name, "why": f"dvc exp pull failed: {err}", "log": ""}
                ended.add(exp.name)
            elif not fut.state.is_final() and resubmits.get(exp.name, 0) < RETRIES:
                resubmits[exp.name] = resubmits.get(exp.name, 0) + 1
                pending.insert(0, exp)  # its worker died: run it again, elsewhere
                log.warning("%s: its task ended %s (its worker died?); running it again", exp.name,
                            fut.state.type.value)
            else:
                err = fut.state.result(raise_on_failure=False) if fut.state.is_final() else None
                failures[exp.name] = {"name": exp.name, "why": getattr(err, "why", None) or str(err or fut.state.message),
                                      "log": getattr(err, "tail", "")}
                log.error("%s: failed after %.1f s: %s", exp.name, time.monotonic() - t0, failures[exp.name]["why"])
                ended.add(exp.name)
            submit_ready()
            progress()
    return seconds


def _statuses(todo: list[exps.QueuedExperiment], pending: list[exps.QueuedExperiment], running: dict[Any, Any],
              ended: set[str], failures: dict[str, Any]) -> dict[str, str]:
    queued = {e.name for e in pending}
    active = {e.name for e, _ in running.values()}
    return {e.name: "failed" if e.name in failures else "running" if e.name in active else "queued"
            if e.name in queued else "done" if e.name in ended else "queued" for e in todo}
