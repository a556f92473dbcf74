"""The DVC side of a stage, on the flow's host: prepare it as ``dvc repro`` would, record it after it ran.

``prepare`` decides, under DVC's repository lock, whether the stage has to run at
all (DVC's own ``changed``), removes its outs as ``repro`` does, and restores it from
the run-cache when DVC has seen the same deps and params before. ``record`` does what
``repro`` does after the command (``Stage.save`` with the run-cache, ``commit``,
``dump``: the same as ``dvc commit -f <stage>``), so ``dvc.lock``, the cache and the
run-cache are written by DVC itself. Both run one at a time per process
(:func:`pipeline.orchestrate.repo.open_repo`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.orchestrate.command import StageFailedError
from pipeline.orchestrate.repo import open_repo


@dataclass(frozen=True)
class Prepared:
    """What a stage needs: ``action`` is "run" (then ``commands`` in ``cwd``), "restored" or "up to date".

    ``env``: the variables DVC gives a stage command (``DVC_ROOT``, ``DVC_STAGE``), added to
    the environment of whichever process runs it."""

    stage: str
    action: str
    commands: list[str] = field(default_factory=list)
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)


#: DVC's repository lock busy (another DVC command in the workspace): tries, and seconds between them.
LOCK_TRIES, LOCK_WAIT_S = 4, 5.0


@contextmanager
def _locked_repo(root: Path, name: str) -> Iterator[Any]:
    """The repository under DVC's lock (as DVC's own commands take it); a lock another DVC command holds is
    waited for, then a transient failure."""
    from dvc.lock import LockError
    from dvc.repo import lock_repo

    for attempt in range(1, LOCK_TRIES + 1):
        with open_repo(root) as repo, ExitStack() as held:
            try:
                held.enter_context(lock_repo(repo))
            except LockError as err:
                if attempt == LOCK_TRIES:
                    raise StageFailedError(name, f"DVC's lock stayed busy: {err}", None, True) from err
            else:
                yield repo
                return
        time.sleep(LOCK_WAIT_S)


def _stage(repo: Any, name: str) -> Any:
    for stage in repo.index.stages:
        if stage.addressing == name:
            return stage
    raise ValueError(f"no stage {name!r} in {repo.root_dir}/dvc.yaml")


def _uses_run_cache(stage: Any) -> bool:
    """DVC writes a run-cache entry only when every out (metrics and plots aside) is cached."""
    return not any(not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot))


def prepare(root: Path, name: str, force: bool = False) -> Prepared:
    """Get stage ``name`` ready to run, or find it need not (up to date, or restored from DVC's run-cache)."""
    from dvc.env import DVC_ROOT, DVC_STAGE
    from dvc.stage.cache import RunCacheNotFoundError

    with _locked_repo(root, name) as repo:
        stage = _stage(repo, name)
        if not force and not stage.changed():
            return Prepared(name, "up to date")
        stage.remove_outs(ignore_remove=False, force=False)
        if not force:
            try:
                repo.stage_cache.restore(stage)
            except RunCacheNotFoundError:
                pass
            else:
                _save(stage)
                return Prepared(name, "restored")
        commands = [stage.cmd] if isinstance(stage.cmd, str) else list(stage.cmd)
        return Prepared(name, "run", commands, stage.wdir, {DVC_ROOT: repo.root_dir, DVC_STAGE: name})


def _save(stage: Any) -> None:
    stage.save(run_cache=_uses_run_cache(stage))
    stage.commit()
    stage.dump(update_pipeline=False)


def record(root: Path, name: str) -> None:
    """Record stage ``name`` after its command ran: hash deps and outs, cache the outs, write dvc.lock and the run-cache.

    A stage that did not write one of its outs fails here, as under ``dvc repro``.
    """
    from dvc.exceptions import DvcException

    with _locked_repo(root, name) as repo:
        stage = _stage(repo, name)
        try:
            _save(stage)
        except DvcException as err:
            raise StageFailedError(name, f"could not be recorded by DVC: {err}", None, False) from err
