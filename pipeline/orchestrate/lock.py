"""One kdpipe flow per workspace: the flow lock in ``.kdpipe/flow.lock``.

The lock is a ``filelock`` (``flock`` on POSIX), so the kernel releases it when the
flow's process dies: a killed run never leaves it behind. The holder's PID lives in
``.kdpipe/flow.pid`` beside it (``kdpipe locks`` names the holder from there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_DIR = ".kdpipe"
LOCK_FILE = "flow.lock"
PID_FILE = "flow.pid"


class WorkspaceBusyError(RuntimeError):
    """Another kdpipe flow holds this workspace; DVC commands for one workspace never run concurrently."""


def flow_pid(root: Path) -> int | None:
    """The PID written by the flow that holds (or last held) ``root``'s flow lock, if any."""
    try:
        text = (Path(root) / LOCK_DIR / PID_FILE).read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def workspace_lock(root: Path, timeout: float = 600.0) -> Iterator[None]:
    """Hold the workspace for one flow run; after ``timeout`` seconds of waiting, WorkspaceBusyError names the holder."""
    lock_dir = Path(root) / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / LOCK_FILE), timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise WorkspaceBusyError(
            f"workspace {root} is busy: another kdpipe run (PID {flow_pid(root) or '?'}) holds "
            f"{lock_dir / LOCK_FILE}; waited {timeout:.0f} s") from None
    try:
        (lock_dir / PID_FILE).write_text(str(os.getpid()))
        yield
    finally:
        lock.release()
