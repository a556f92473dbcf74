"""Running one stage's command: what ``dvc repro`` does between removing the outs and recording them.

This part runs where the work is done: a thread of the flow's process, or a Dask
worker on another machine that shares the workspace path. It needs nothing but the
command, the folder and the environment; recording with DVC stays on the flow's host.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

from pipeline.orchestrate import guard


class StageFailedError(RuntimeError):
    """A DVC stage failed. ``transient`` says whether running it again can pass.

    Transient: the stage's process was killed by a signal (a killed worker, the OOM
    killer) or DVC could not take its lock. Deterministic: the stage exited with an
    error of its own (exit 2 is bad params or input; 1 is a crash), which a retry
    would only repeat.
    """

    def __init__(self, stage: str, message: str, status: int | None, transient: bool, tail: str = "") -> None:
        self.stage, self.why, self.status, self.transient, self.tail = stage, message, status, transient, tail
        detail = f"\n--- last output of {stage} ---\n{tail}" if tail else ""
        super().__init__(f"stage {stage} failed: {message}{detail}")

    def __reduce__(self):  # noqa: ANN204 - pickled back from Dask workers with its fields
        return (type(self), (self.stage, self.why, self.status, self.transient, self.tail))


def _shell_argv(cmd: str) -> list[str]:
    """The command as DVC runs it (the user's shell without profile or rc files), under a guard.

    The guard (:mod:`pipeline.orchestrate.guard`) kills the stage's whole process tree when
    the flow or the Dask worker that started it dies; without it a killed flow leaves
    stage processes running, writing outs that the next run also writes. Not on Linux:
    no guard, and the stage outlives a killed flow, as under DVC.
    """
    shell = os.environ.get("SHELL") or "/bin/sh"
    name = os.path.basename(shell)
    flags = {"bash": ["--noprofile", "--norc"], "zsh": ["--no-rcs"]}.get(name, [])
    argv = [shell, *flags, "-c", cmd]
    return guard.argv(argv) if guard.supported() else argv


def describe_exit(status: int) -> tuple[str, bool]:
    """Why a stage command with exit status ``status`` failed, and whether a retry can pass."""
    killed = status < 0 or status in (128 + signal.SIGKILL, 128 + signal.SIGTERM)
    if killed:
        return f"killed by signal {-status if status < 0 else status - 128}", True
    if status == 2:
        return "bad params or input (exit 2)", False
    return f"exited with {status}", False


def run_stage_command(stage: str, commands: Sequence[str], cwd: str, env: Mapping[str, str],
                      on_line: Callable[[str], None] | None = None, tail_lines: int = 40) -> None:
    """Run the stage's commands one after the other in ``cwd`` with ``env``, each output line to ``on_line``.

    Raises :class:`StageFailedError` on the first that fails, with the last output lines.
    """
    tail: list[str] = []
    for cmd in commands:
        proc = subprocess.Popen(_shell_argv(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, close_fds=True)
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                del tail[:-tail_lines]
                if on_line is not None:
                    try:
                        on_line(line)
                    except Exception:  # noqa: BLE001 - a logging failure must not break the stage
                        pass
        status = proc.wait()
        if status != 0:
            why, transient = describe_exit(status)
            raise StageFailedError(stage, why, status, transient, "\n".join(tail))
