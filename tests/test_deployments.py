"""A real Prefect server on 127.0.0.1, a process worker, `prefect deploy` and deployment runs.

Everything runs as a user would run it from the README (`prefect server start`,
`prefect work-pool create`, `prefect worker start`, `prefect deploy`, `prefect deployment
run`), against a tiny configuration of the project's own pipeline in a temporary git +
DVC repository; every process started here is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, make_workspace, tiny_params
from tests.prefect_api import stop

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - local test server
        return json.loads(resp.read())


def post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(prefect_api: dict[str, str]) -> dict[str, str]:
    """The environment of this module's processes: the session's Prefect server (`prefect server start`)."""
    # a worker and a serving process look for new runs every 10 s by default: 1 s keeps the waits here short
    return {**os.environ, **prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "KDPIPE_PROGRESS": "lines",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}


def prefect(env: dict[str, str], cwd: Path, *args: str) -> str:
    proc = subprocess.run(["prefect", "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def wait_for_run(env: dict[str, str], run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}")
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def run_deployment(env: dict[str, str], ws: Path, *params: str, deployment: str = "kdpipe-pipeline/pipeline") -> dict:
    args = ["deployment", "run", deployment]
    for p in params:
        args += ["--param", p]
    out = prefect(env, ws, *args)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert run_id, out
    return wait_for_run(env, run_id.group(1))


def logs_of(env: dict[str, str], run_id: str, *expected: str, timeout: float = 60) -> str:
    """The run's log, once every ``expected`` text is in it (or ``timeout`` s have passed).

    The run's process ships its log to the server in batches, so the last lines (the
    error that failed the run, say) can arrive after the run's final state.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = post(f"{env['PREFECT_API_URL']}/logs/filter",
                    {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": 0, "sort": "TIMESTAMP_ASC"})
        text = "\n".join(r["message"] for r in rows)
        if all(e in text for e in expected) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_deployment_runs_on_a_process_worker(server: dict[str, str], tmp_path: Path):
    env = server
    ws = make_workspace(tmp_path / "ws", tiny_params(train={"epochs": 1}, teacher={"model": "tinynet_s"}))
    shutil.copy2(REPO / "prefect.yaml", ws / "prefect.yaml")
    subprocess.run(["git", "add", "prefect.yaml"], cwd=ws, check=True)
    subprocess.run(["git", "commit", "-qm", "prefect.yaml"], cwd=ws, check=True)

    prefect(env, ws, "work-pool", "create", "kdpipe", "--type", "process")
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "kdpipe"], cwd=ws, env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = prefect(env, ws, "deploy", "--all")
        assert "kdpipe-pipeline/pipeline" in out and "kdpipe-sweep/sweep" in out, out

        run = run_deployment(env, ws, 'targets=["evaluate_teacher"]', 'params={"distill.kd.temperature": 3.0}')
        assert run["state_type"] == "COMPLETED", (run["state"], logs_of(env, run["id"]),
                                                  (tmp_path / "worker.log").read_text()[-3000:])
        metrics = json.loads((ws / "metrics" / "teacher.json").read_text())
        assert 0 <= metrics["top1"] <= 100
        logs = logs_of(env, run["id"], "2 of 2 stages need to run", "[teacher] epoch 1/1")
        assert "2 of 2 stages need to run" in logs
        assert "[teacher] epoch 1/1" in logs  # the stage's own output is in the run's log
        arts = post(f"{env['PREFECT_API_URL']}/artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 10, "offset": 0,
                     "sort": "CREATED_DESC"})
        assert any(a["type"] == "table" and "teacher" in a["data"] for a in arts), arts
        exps = subprocess.run(["dvc", "exp", "show", "--json"], cwd=ws, capture_output=True, text=True).stdout
        assert f"kdpipe-{run['name']}" in exps  # the run is a recorded DVC experiment
        assert "temperature: 4.0" in (ws / "params.yaml").read_text()  # the override lasted one run only

        bad = run_deployment(env, ws, 'params={"train.optimizer.lrr": 0.1}')
        assert bad["state_type"] == "FAILED"
        bad_logs = logs_of(env, bad["id"], "train.optimizer.lrr", "allowed keys")
        assert "train.optimizer.lrr" in bad_logs and "allowed keys" in bad_logs
    finally:
        stop(worker)
        worker_log.close()


def test_kdpipe_serve_registers_both_flows_and_runs_a_triggered_run(server: dict[str, str], tmp_path: Path):
    env = server
    ws = make_workspace(tmp_path / "ws", tiny_params())
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(["kdpipe", "serve", "--name", "served", "--workspace", str(ws)], cwd=ws, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        names: set[str] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            rows = post(f"{env['PREFECT_API_URL']}/deployments/filter", {"limit": 50, "offset": 0})
            names = {r["name"] for r in rows}
            if {"served", "served-sweep"} <= names:
                break
            time.sleep(1)
        assert {"served", "served-sweep"} <= names, (tmp_path / "serve.log").read_text()[-3000:]
        served = next(r for r in rows if r["name"] == "served")
        assert served["parameters"]["workspace"] == str(ws.resolve())

        # a run triggered from the CLI is picked up and run by the serving process itself
        run = run_deployment(env, ws, 'targets=["train_teacher"]', "params={\"train.epochs\": 1}",
                             deployment="kdpipe-pipeline/served")
        assert run["state_type"] == "COMPLETED", (run["state"], logs_of(env, run["id"]),
                                                  (tmp_path / "serve.log").read_text()[-3000:])
        assert "[teacher] epoch 1/1" in logs_of(env, run["id"], "[teacher] epoch 1/1")
        assert (ws / "runs" / "teacher" / "model.pt").is_file()
    finally:
        stop(proc)
        log.close()
