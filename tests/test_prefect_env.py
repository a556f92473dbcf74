"""The Prefect settings kdpipe gives defaults to reach Prefect itself, and a user's own values win."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.orchestrate.prefect_env import EPHEMERAL_STARTUP_TIMEOUT_S

# the way `kdpipe run --dask` goes: the CLI checks for the dask extra before it imports the flow
PROBE = ("from pipeline.orchestrate.runners import dask_available\n"
         "dask_available()\n"
         "import pipeline.sweeps\n"
         "from prefect.settings import get_current_settings\n"
         "s = get_current_settings().server\n"
         "print(s.ephemeral.startup_timeout_seconds, s.analytics_enabled)\n")


def probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_the_flow_modules_set_prefect_defaults_before_prefect_reads_them_and_user_values_win():
    # Prefect's own 20 s startup bound for its temporary server failed runs on a busy 2-core machine
    assert probe() == [str(EPHEMERAL_STARTUP_TIMEOUT_S), "False"]
    assert probe(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="45",
                 PREFECT_SERVER_ANALYTICS_ENABLED="true") == ["45", "True"]
