"""What every stage shares: loading params once and turning known errors into clean exits."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, Params, load_params

# Errors a user can fix from the message alone: printed without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data import DatasetNotFoundError
    from pipeline.distill import MethodSetupError
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.engine.loop import NonFiniteLossError
    from pipeline.models import UnknownModelError

    return USER_ERRORS + (DatasetNotFoundError, MethodSetupError, CheckpointError, NonFiniteLossError, UnknownModelError)


def run_stage(name: str, body: Callable[[Params], object], params_path: str = "params.yaml") -> None:
    """Validate params, run ``body``; on a user error print ``<stage>: <message>`` and exit 2."""
    try:
        params = load_params(Path(params_path))
        body(params)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        if isinstance(err, _user_errors()):
            print(f"{name}: error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
