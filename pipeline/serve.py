"""``kdpipe serve``: both flows as deployments served from this process (no work pool needed)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.flows import pipeline_flow
from pipeline.sweeps import sweep_flow


def serve(name: str = "kdpipe", workspace: str = ".") -> None:
    """Serve the pipeline flow as deployment ``name`` and the sweep flow as ``name-sweep``, for ``workspace``."""
    from prefect import serve as prefect_serve

    root = str(Path(workspace).resolve())
    os.chdir(workspace)
    prefect_serve(
        pipeline_flow.to_deployment(name=name, parameters={"workspace": root}),
        sweep_flow.to_deployment(name=f"{name}-sweep", parameters={"workspace": root}),
    )
