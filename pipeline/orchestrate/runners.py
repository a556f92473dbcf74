"""Where a flow's stage commands run: threads of this process, or a Dask cluster through prefect-dask.

``--dask ADDRESS`` connects to a running scheduler (``tcp://host:8786``); its workers
must see the workspace at the same path (e.g. NFS), have kdpipe installed, and have
``PREFECT_API_URL`` set to the Prefect server the flow reports to (a temporary server on
the flow's 127.0.0.1 is out of their reach).
``--dask local:N`` starts a ``distributed.LocalCluster`` of N single-threaded worker
processes on 127.0.0.1 for the flow's duration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.orchestrate import prefect_env

prefect_env.set_defaults()  # this module's callers import Prefect and Dask through it

_LOCAL = re.compile(r"^local:(\d+)$")


@dataclass(frozen=True)
class DaskTarget:
    """A parsed ``--dask`` value: an address to connect to, or a local cluster of ``workers`` processes."""

    address: str | None = None
    workers: int | None = None

    def describe(self) -> str:
        """One line for the run's log."""
        return f"Dask LocalCluster of {self.workers} worker processes" if self.workers else f"Dask cluster {self.address}"


def parse_dask(spec: str) -> DaskTarget:
    """``local:N`` or a scheduler address (``tcp://host:port``, ``host:port``); ValueError naming the value otherwise."""
    spec = spec.strip()
    m = _LOCAL.match(spec)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"--dask {spec!r}: a local cluster needs at least one worker (local:N, N >= 1)")
        return DaskTarget(workers=n)
    if re.match(r"^(tcp|tls|ucx|inproc)://\S+$", spec) or re.match(r"^[\w.\-]+:\d+$", spec):
        return DaskTarget(address=spec)
    raise ValueError(f"--dask {spec!r}: expected local:N (a LocalCluster of N workers) or a scheduler address "
                     "such as tcp://10.0.0.5:8786")


def dask_available() -> bool:
    """Whether prefect-dask and distributed are installed (the ``dask`` extra).

    Looked up, not imported: importing prefect-dask imports Prefect, which would read its
    settings before :func:`pipeline.orchestrate.prefect_env.set_defaults` gave them kdpipe's defaults.
    """
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("distributed", "prefect_dask"))


def task_runner(jobs: int, dask: DaskTarget | None) -> Any:
    """A started-on-enter Prefect task runner: ``jobs`` threads, or the Dask target's cluster."""
    if dask is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=jobs)
    if not dask_available():
        raise ValueError("--dask needs prefect-dask and distributed: pip install -e '.[dask]'")
    from prefect_dask import DaskTaskRunner

    if dask.address:
        return DaskTaskRunner(address=dask.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": dask.workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": None, "env": worker_env()})


def worker_env() -> dict[str, str]:
    """What a local cluster's worker processes need to report to this flow's Prefect API.

    Without an API URL of its own each worker process starts a temporary Prefect server:
    its task runs, states and logs land there, not in the flow's, and a worker that is
    killed leaves that server running, an orphan.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url).rstrip("/")
    return {**prefect_env.DEFAULTS, "PREFECT_API_URL": url}
