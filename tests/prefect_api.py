"""Read what a flow run left in the Prefect API (states, logs, task runs, artifacts) for assertions.

Raw JSON requests rather than the client's typed helpers: the typed artifact filter
joins task runs when given, which hides flow-level artifacts, and raw bodies keep the
assertions independent of client/server schema drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started (SIGKILL after 20 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real Prefect server on 127.0.0.1 (`prefect server start`, as the README starts one), stopped at the end.

    Yields the environment its clients need (``PREFECT_HOME``, ``PREFECT_API_URL``). The bound on its start
    is a guard against a server that never comes up, not a measure: a busy 2-core machine takes tens of seconds.
    """
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    with urllib.request.urlopen(f"{api}/health", timeout=10) as resp:  # noqa: S310 - local server
                        json.loads(resp.read())
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()}") from None
                    time.sleep(0.5)
            yield {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}
        finally:
            stop(proc)


def api(path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
    """One request to the current Prefect API (the server in PREFECT_API_URL, else the temporary one)."""
    from prefect.client.orchestration import get_client

    async def call() -> Any:
        async with get_client() as client:
            resp = await client._client.request(method, path, json=body)
            resp.raise_for_status()
            return resp.json()

    return asyncio.run(call())


def flow_run_logs(flow_run_id: Any) -> list[str]:
    """Every log message of a flow run and its tasks, oldest first."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the API through a background worker
    rows = api("/logs/filter", {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200, "offset": 0,
                                "sort": "TIMESTAMP_ASC"})
    return [r["message"] for r in rows]


def task_runs(flow_run_id: Any) -> list[dict[str, Any]]:
    """The task runs of a flow run (name, run_count, state)."""
    return api("/task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 200, "offset": 0,
                                     "sort": "EXPECTED_START_TIME_ASC"})


def artifacts(keys: list[str]) -> dict[str, dict[str, Any]]:
    """The latest artifact of each key."""
    rows = api("/artifacts/filter", {"artifacts": {"key": {"any_": keys}}, "limit": 50, "offset": 0,
                                     "sort": "CREATED_DESC"})
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["key"], r)
    return out
