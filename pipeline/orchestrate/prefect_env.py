"""Prefect settings kdpipe needs, set as environment defaults before Prefect reads its settings.

Prefect reads its settings from the environment when it is first imported, so the flow
modules call :func:`set_defaults` before ``import prefect``. A user's own value of any of
these wins (only unset variables are given a default), and worker processes started from
the flow inherit them.
"""

from __future__ import annotations

import os

#: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``: how long a run without
#: ``PREFECT_API_URL`` waits for the temporary Prefect server it starts. Prefect's 20 s is
#: less than its first start takes on a 2-core machine (about 23 s here with an idle CPU:
#: the database is created then; about 15 s later), so a busy machine failed runs with
#: "Timed out while attempting to connect to ephemeral Prefect API server".
#: It is a bound, not a wait: a server that is up is used at once.
EPHEMERAL_STARTUP_TIMEOUT_S = 180

DEFAULTS = {
    # no network here or on many edge build hosts: Prefect's telemetry would only log errors
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_STARTUP_TIMEOUT_S),
}


def set_defaults() -> None:
    """Give each of :data:`DEFAULTS` its value where the environment does not set it."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
