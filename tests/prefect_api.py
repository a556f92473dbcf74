"""Read what a flow run left in the Prefect API (states, logs, task runs, artifacts) for assertions.

Raw JSON requests rather than the client's typed helpers: the typed artifact filter
joins task runs when given, which hides flow-level artifacts, and raw bodies keep the
assertions independent of client/server schema drift.
"""

from __future__ import annotations

import asyncio
from typing import Any


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
