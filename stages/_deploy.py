"""What the deployment stages share: run a stage body, turning deployment errors into clean exits.

``stages/_common.run_stage`` already handles params, checkpoint and model errors; a
:class:`~pipeline.deploy.DeployError` (failed parity, empty calibration set, missing
export, hostile archive) is also something the user fixes from the message, so it is
printed as ``<stage>: error: <message>`` with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.deploy import DeployError
from pipeline.params import Params
from stages._common import run_stage


def run_deploy_stage(name: str, body: Callable[[Params], object]) -> None:
    """:func:`stages._common.run_stage` for a deployment stage (DeployError -> one line, exit 2)."""

    def guarded(params: Params) -> object:
        try:
            return body(params)
        except DeployError as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            sys.exit(2)

    run_stage(name, guarded)
