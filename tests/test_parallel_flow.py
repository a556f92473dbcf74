"""The pipeline flow runs the DVC DAG concurrently: on threads here, or on a real Dask LocalCluster.

The workspaces are real git + DVC repositories with small Python stages, so what is
checked is the orchestration itself: two independent stages run side by side (each
waits until it sees the other has started: run one after the other, the first would
never see it), an exclusive stage runs alone, a failed stage stops only what depends
on it, DVC records every stage that ran and restores one its run-cache knows, and a
Dask worker killed mid-stage makes the stage run again elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import init_repo, tiny_params, write_params
from tests.prefect_api import flow_run_logs, task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")  # one Prefect server for every flow here

#: A stage: marks itself running (``running/NAME``) while it works, waits for the stages named in
#: ``--beside`` to have started, refuses to run next to ``--alone-with`` stages, writes out/NAME.txt.
STAGE = """\
import argparse, os, pathlib, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--beside", nargs="*", default=[])
ap.add_argument("--alone-with", nargs="*", default=[])
ap.add_argument("--kill-worker-once", action="store_true")
ap.add_argument("--param")
a = ap.parse_args()
run, started = pathlib.Path("running"), pathlib.Path("started")
run.mkdir(exist_ok=True); started.mkdir(exist_ok=True)
(run / a.name).touch(); (started / a.name).touch()
count = pathlib.Path(f"count/{a.name}")
count.parent.mkdir(exist_ok=True)
count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
print(f"{a.name}: run {count.read_text()}", flush=True)
if a.kill_worker_once and count.read_text() == "1":
    import psutil  # the Dask worker: the nearest process above this one that multiprocessing started
    worker = next(p for p in psutil.Process().parents() if "multiprocessing" in " ".join(p.cmdline()))
    print(f"{a.name}: killing the Dask worker that runs me (PID {worker.pid})", flush=True)
    worker.kill()
    time.sleep(60)
def alone():
    others = [p.name for p in run.iterdir() if p.name in a.alone_with]
    if others:
        sys.exit(f"{a.name} ran beside {others}")
alone()
deadline = time.monotonic() + 300  # a guard against a deadlock, not a measure: only a serial run waits this long
while not all((started / b).exists() for b in a.beside):
    if time.monotonic() > deadline:
        sys.exit(f"{a.name}: {a.beside} never started beside me")
    time.sleep(0.05)
time.sleep(0.3)
alone()
text = a.name
if a.param:
    import yaml
    text += "=" + str(yaml.safe_load(open("params.yaml"))["distill"]["kd"]["temperature"])
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path(f"out/{a.name}.txt").write_text(text)
(run / a.name).unlink()
"""


def stage(name: str, *args: str, deps: tuple[str, ...] = (), **extra) -> dict:
    return {"cmd": f"python stage.py {name} {' '.join(args)}".strip(), "deps": ["stage.py", *deps],
            "outs": [f"out/{name}.txt"], **extra}


DAG = {
    "stages": {
        "left": stage("left", "--beside", "right"),
        "right": stage("right", "--beside", "left"),
        "join": stage("join", deps=("out/left.txt", "out/right.txt")),
        "side": stage("side", "--alone-with", "solo", deps=("out/join.txt",)),
        "solo": stage("solo", "--alone-with", "side", deps=("out/join.txt",),
                      meta={"kdpipe": {"exclusive": True}}),
        "bad": {"cmd": "python -c \"import sys; print('data.label_noise: Input should be less than 1'); sys.exit(2)\"",
                "outs": ["out/bad.txt"]},
        "after_bad": stage("after_bad", deps=("out/bad.txt",)),
        "temp": stage("temp", "--param", "t", params=["distill.kd.temperature"]),
    }
}


def toy_workspace(root: Path, dag: dict) -> Path:
    root.mkdir()
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    write_params(root / "params.yaml", tiny_params())
    (root / ".gitignore").write_text("/out/\n/running/\n/started/\n/count/\n/.kdpipe/\n")
    return init_repo(root, "toy")


def dvc_status(ws: Path, *targets: str) -> dict:
    from dvc.repo import Repo

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        with Repo(str(ws)) as repo:
            return repo.status(targets=list(targets) or None)
    finally:
        os.chdir(cwd)


def test_independent_stages_run_side_by_side_and_a_failure_stops_only_what_depends_on_it(tmp_path: Path):
    from pipeline.flows import StagesFailedError, pipeline_flow

    ws = toy_workspace(tmp_path / "toy", DAG)
    state = pipeline_flow(workspace=str(ws), jobs=2, record=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(StagesFailedError) as info:
        state.result()
    err = info.value
    assert list(err.failures) == ["bad"] and err.failures["bad"].status == 2 and err.blocked == ["after_bad"]
    assert "1 stage(s) failed: bad" in str(err) and "label_noise" in str(err) and "after_bad" in str(err)
    for name in ("left", "right", "join", "side", "solo", "temp"):
        assert (ws / "out" / f"{name}.txt").read_text().startswith(name)
    assert not (ws / "out" / "after_bad.txt").exists()
    # every stage that ran is recorded by DVC; only the failed one and what it blocks are not
    assert set(dvc_status(ws)) == {"bad", "after_bad"}
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"left", "right", "join", "side", "solo", "temp"}

    run_id = state.state_details.flow_run_id
    runs = {t["name"]: t for t in task_runs(run_id)}
    assert {"left", "right", "join", "side", "solo", "bad", "temp"} <= set(runs)  # one task run per stage, by name
    assert "after_bad" not in runs
    assert runs["bad"]["run_count"] == 1  # exit 2 is not retried
    logs = flow_run_logs(run_id)
    assert any("left: run 1" in m for m in logs) and any("data.label_noise" in m for m in logs)
    seconds = json.loads((ws / ".kdpipe" / "stage_seconds.json").read_text())
    assert set(seconds) == {"left", "right", "join", "side", "solo", "temp"}


def test_a_stage_the_run_cache_knows_is_restored_not_run(tmp_path: Path):
    from pipeline.flows import pipeline_flow

    ws = toy_workspace(tmp_path / "toy", {"stages": {"temp": DAG["stages"]["temp"]}})
    first = pipeline_flow(workspace=str(ws), jobs=2, record=False)
    assert first["stages"] == {"temp": "ran"}
    other = pipeline_flow(workspace=str(ws), jobs=2, record=False, params={"distill.kd.temperature": 7.5})
    assert other["stages"] == {"temp": "ran"} and (ws / "count" / "temp").read_text() == "2"
    # params.yaml is back at its own value: DVC's run-cache has that run, so nothing runs
    back = pipeline_flow(workspace=str(ws), jobs=2, record=False)
    assert back["stages"] == {"temp": "restored"}
    assert (ws / "count" / "temp").read_text() == "2"
    assert (ws / "out" / "temp.txt").read_text() == "temp=4.0"
    assert dvc_status(ws) == {}
    again = pipeline_flow(workspace=str(ws), jobs=2, record=False)
    assert again["stages"] == {"temp": "up to date"}


@pytest.mark.slow
def test_on_a_dask_local_cluster_stages_run_in_two_workers_and_a_killed_worker_reruns_its_stage(tmp_path: Path):
    pytest.importorskip("prefect_dask", reason="the dask extra is not installed: pip install -e '.[dask]'")
    from pipeline.flows import pipeline_flow

    dag = {"stages": {"left": DAG["stages"]["left"], "right": DAG["stages"]["right"],
                      "join": stage("join", "--kill-worker-once", deps=("out/left.txt", "out/right.txt"))}}
    ws = toy_workspace(tmp_path / "toy", dag)
    state = pipeline_flow(workspace=str(ws), dask="local:2", record=False, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["jobs"] == 2 and set(result["stages"].values()) == {"ran"}
    assert int((ws / "count" / "join").read_text()) >= 2  # its worker was killed on the first run: it ran again
    assert (ws / "out" / "join.txt").read_text() == "join"
    assert dvc_status(ws) == {}
    logs = flow_run_logs(state.state_details.flow_run_id)
    # the killed worker's unsent log lines die with it; the run that passed reports to the flow's log
    assert any("join: run 2" in m for m in logs) and any("left: run 1" in m for m in logs)
