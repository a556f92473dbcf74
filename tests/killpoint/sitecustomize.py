"""Kill points for tests: stage processes that stop at a chosen point and wait to be killed.

A test that must SIGKILL a run *at* a point (while a given run is still training, or
after a stage wrote its outs but before DVC recorded them) cannot time the kill: how
long an epoch takes moves with the machine and its load. Instead it puts this folder
on ``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up, in every process: DVC's
own and the stage commands it starts) and sets ``KDPIPE_KILLPOINTS`` to a comma-separated
list of points:

``epoch:<run label>:<epoch>:<step>``
    the training run labelled ``<run label>`` (``teacher``, ``kd/tinynet_s``) stops just
    before batch ``<step>`` (0-based) of epoch ``<epoch>`` (1-based, as the progress lines
    count): epoch ``<epoch> - 1``'s checkpoint is written, epoch ``<epoch>`` is under way;
``start:<stage module>``
    the stage process ``python -m <stage module>`` stops before it imports anything;
``exit:<stage module>``
    that stage process stops after its body returned (its outs are written) and before it
    exits, so DVC has not recorded it;
``killworker:<stage module>``
    the first such stage process to start (of all processes that share the folder
    ``$KDPIPE_KILLPOINTS_ONCE``) SIGKILLs the Dask worker above it, the nearest ancestor
    that ``multiprocessing`` started, and waits to die with it; later ones run unchanged.

A stopped process prints ``KILLPOINT reached <point>`` to stderr and sleeps until it is
killed. Processes that match no point run unchanged; nothing of the project's own code
knows about this.

``KDPIPE_STAGE_STARTS`` names a file to which every stage process appends a line
``<stage module> <args>`` as it starts: tests count which stages really ran (a stage
DVC restores from its run-cache starts no process).
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import sys
import time

_POINTS = [p.strip() for p in os.environ.get("KDPIPE_KILLPOINTS", "").split(",") if p.strip()]


def _stage_module() -> str | None:
    argv = list(getattr(sys, "orig_argv", []))
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        return module if module.startswith("stages.") else None
    return None


def _wait_for_kill(point: str) -> None:
    print(f"KILLPOINT reached {point}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def _first(point: str) -> bool:
    """Whether this is the first process to reach ``point`` (an exclusive create in $KDPIPE_KILLPOINTS_ONCE)."""
    folder = os.environ["KDPIPE_KILLPOINTS_ONCE"]
    try:
        os.close(os.open(os.path.join(folder, point.replace(":", "-")), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _kill_worker(point: str) -> None:
    import psutil

    worker = next(p for p in psutil.Process().parents() if "multiprocessing" in " ".join(p.cmdline()))
    print(f"KILLPOINT reached {point}: killing Dask worker {worker.pid}", file=sys.stderr, flush=True)
    worker.kill()
    _wait_for_kill(point)


class _PatchProgress(importlib.abc.MetaPathFinder):
    """Wraps ``Progress.steps`` of ``pipeline.engine.progress`` once the stage imports it (from its own checkout)."""

    def __init__(self, epochs: list[tuple[str, int, int, str]]) -> None:
        self.epochs = epochs

    def find_spec(self, name, path, target=None):  # noqa: ANN001 - importlib's signature
        if name != "pipeline.engine.progress":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module, points = spec.loader.exec_module, self.epochs

        def exec_module(module) -> None:  # noqa: ANN001
            run_module(module)
            original = module.Progress.steps

            def steps(progress, iterable, epoch, total=None):  # noqa: ANN001
                for step, item in enumerate(original(progress, iterable, epoch, total)):
                    for label, at_epoch, at_step, point in points:
                        if progress.label == label and epoch + 1 == at_epoch and step == at_step:
                            _wait_for_kill(point)
                    yield item

            module.Progress.steps = steps

        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    stage = _stage_module()
    if stage is None:
        return
    starts = os.environ.get("KDPIPE_STAGE_STARTS")
    if starts:
        argv = list(getattr(sys, "orig_argv", []))
        with open(starts, "a") as f:  # one short line per write: appends from several processes stay whole
            f.write(" ".join([stage, *argv[argv.index("-m") + 2:]]) + "\n")
    epochs = []
    for point in _POINTS:
        kind, _, rest = point.partition(":")
        if kind == "start" and rest == stage:
            _wait_for_kill(point)
        elif kind == "exit" and rest == stage:
            atexit.register(_wait_for_kill, point)
        elif kind == "killworker" and rest == stage and _first(point):
            _kill_worker(point)
        elif kind == "epoch":
            label, epoch, step = rest.rsplit(":", 2)
            epochs.append((label, int(epoch), int(step), point))
    if epochs:
        sys.meta_path.insert(0, _PatchProgress(epochs))


_install()
