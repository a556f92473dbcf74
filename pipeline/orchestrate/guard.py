"""A stage command's guard: the process between the flow and the stage's shell that takes the
stage's whole process tree down when the flow (or the Dask worker) that started it dies.

Why a process of its own: the kernel's parent-death signal (``PR_SET_PDEATHSIG``) reaches
only the direct child. Whether that child is the stage's Python depends on the shell:
bash runs the last command of ``-c`` in place, dash (``/bin/sh`` on Debian, what runs
when ``$SHELL`` is unset, as under CI) forks it. So a killed flow left its stages
running under dash, writing outs the next run also writes. The guard gets the signal
itself, is the subreaper of everything below it, and kills all of it.

It stays in the flow's process group, so Ctrl-C in a terminal still reaches the stage
as before. Run as ``python -I .../guard.py LAUNCHER_PID ARGV...``: by path, in isolated mode, so
it starts the same whether or not the package is importable from the stage's folder.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def supported() -> bool:
    """Whether the kernel has the two prctl(2) options the guard needs (Linux)."""
    return sys.platform.startswith("linux")


def argv(command: list[str]) -> list[str]:
    """``command`` run under a guard that dies with (and takes down everything started by) this process."""
    return [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *command]


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def kill_descendants() -> int:
    """SIGKILL every process below this one until none is left; returns how many were killed.

    Repeats because a process can fork between the listing and the kill; as the
    subreaper, its orphans come back under this process and the next round finds them.
    """
    me, killed = psutil.Process(), 0
    for _ in range(20):
        kids = me.children(recursive=True)
        if not kids:
            break
        for kid in kids:
            try:
                kid.kill()
                killed += 1
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(kids, timeout=5)
    return killed


def _on_parent_death(signum: int, _frame: object) -> None:
    kill_descendants()
    os._exit(128 + signal.SIGKILL)


def main(args: list[str]) -> int:
    """Run ``args[1:]`` and exit as it exits; if process ``args[0]`` (the launcher) dies first, kill it all."""
    if len(args) < 2 or not args[0].isdigit():
        print(f"usage: python -I {__file__} LAUNCHER_PID COMMAND...", file=sys.stderr)
        return 2
    launcher = int(args[0])
    signal.signal(signal.SIGTERM, _on_parent_death)
    # Ctrl-C reaches the stage from the terminal (one process group); the guard waits for its exit.
    # A handler, not SIG_IGN: an ignored signal would stay ignored in the command after exec.
    signal.signal(signal.SIGINT, lambda *_: None)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        return 128 + signal.SIGKILL
    status = subprocess.call(args[1:])
    if status < 0:  # killed by a signal: die of the same one, so the launcher sees what it would have seen
        if -status != signal.SIGKILL:
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
