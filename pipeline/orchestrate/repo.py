"""Opening a workspace's DVC repository in this process.

DVC resolves stage names and targets relative to the current directory, which is one
per process; every in-process DVC call of the orchestration goes through
:func:`open_repo`, which works from the workspace folder under one process-wide lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_DVC = threading.RLock()


@contextmanager
def open_repo(root: Path) -> Iterator[Any]:
    """``dvc.repo.Repo`` of ``root``, opened from inside it (one caller at a time in this process)."""
    from dvc.repo import Repo

    with _DVC:
        before = os.getcwd()
        os.chdir(root)
        try:
            with Repo(str(root)) as repo:
                yield repo
        finally:
            os.chdir(before)
