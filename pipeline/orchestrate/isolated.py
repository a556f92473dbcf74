"""One experiment of a sweep, run in its own temporary clone of the workspace's commit.

The clone runs where the task runner puts it (a thread here, a Dask worker on another
machine that sees the workspace path), so no experiment ever touches another one's
files. Outs are shared through DVC, one of two ways:

* a shared cache (default): the clone uses the workspace's DVC cache directory, run-cache
  included, so a stage an earlier experiment ran with the same deps and params is
  restored, not run again; the experiment's ref is pushed into the workspace
  (``dvc exp push --no-cache``);
* a DVC remote (``remote``): the clone has a cache of its own, pulls what it can from the
  remote first (``dvc exp run --pull``: outs and run-cache), and pushes the experiment
  with its outs and run-cache (``dvc exp push --run-cache -r NAME``); the flow's host
  then pulls it back (:func:`pull_back`).

Either way the experiment then shows in ``dvc exp show`` of the workspace.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.orchestrate.command import StageFailedError, run_stage_command


@dataclass(frozen=True)
class ExperimentJob:
    """What a worker needs to run one experiment: where the workspace is, which commit, which params."""

    name: str
    root: str
    rev: str
    overrides: dict[str, Any]
    targets: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    remote: str | None = None
    scratch: str | None = None


def _git(cwd: Path, *args: str) -> None:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailedError("clone", f"git {' '.join(args)} failed: {proc.stderr.strip()}", proc.returncode, False)


def base_commit(root: Path) -> str:
    """The commit a sweep runs: the workspace's HEAD (ValueError without one)."""
    from pipeline.orchestrate.experiments import head_commit

    rev = head_commit(root)
    if rev is None:
        raise ValueError(f"{root} is not a git repository with a commit: a sweep runs each experiment in a clone "
                         "of the workspace's commit (git init && git add -A && git commit)")
    return rev


def uncommitted(root: Path) -> list[str]:
    """Tracked files with changes a clone of HEAD would not have (the sweep warns about them)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                          text=True)
    return [line[3:] for line in proc.stdout.splitlines() if line.strip()]


def shared_cache_dir(root: Path) -> str:
    """The workspace's DVC cache directory (absolute), where clones keep their outs and run-cache."""
    from pipeline.orchestrate.repo import open_repo

    with open_repo(root) as repo:
        return str(Path(repo.cache.local_cache_dir).resolve())  # the root: DVC 3 files objects under files/md5


def run_in_clone(job: ExperimentJob, on_line: Callable[[str], None] | None = None,
                 env: Mapping[str, str] | None = None) -> float:
    """Clone, apply the overrides, ``dvc exp run``, push the experiment back; returns the seconds it took.

    Raises :class:`StageFailedError` (named after the experiment) with the last output
    lines when a step fails; the clone is removed either way.
    """
    from pipeline.orchestrate.params import apply_params

    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"kdpipe-{job.name}-", dir=job.scratch))
    clone = scratch / "ws"
    environ = {**os.environ, **(env or {})}
    try:
        subprocess.run(["git", "clone", "-q", "--no-checkout", job.root, str(clone)], check=True,
                       capture_output=True, text=True)
        _git(clone, "checkout", "-q", "--detach", job.rev)
        local = Path(job.root) / ".dvc" / "config.local"  # remotes and credentials kept out of git
        if local.is_file():
            shutil.copy2(local, clone / ".dvc" / "config.local")
        if job.remote:
            setup = ["dvc config --local core.remote " + shlex.quote(job.remote)]
            run = ["dvc exp run --pull"]
            push = f"dvc exp push --run-cache -r {shlex.quote(job.remote)} origin {shlex.quote(job.name)}"
        else:
            setup = ["dvc config --local cache.dir " + shlex.quote(job.cache_dir or str(Path(job.root) / ".dvc/cache"))]
            run = ["dvc exp run"]
            push = f"dvc exp push --no-cache origin {shlex.quote(job.name)}"
        if job.overrides:
            apply_params(clone / "params.yaml", job.overrides)  # the schema checked them before the sweep started
        cmd = " ".join([*run, "--name", shlex.quote(job.name), *(shlex.quote(t) for t in job.targets)])
        run_stage_command(job.name, [*setup, cmd, push], str(clone), environ, on_line)
    except subprocess.CalledProcessError as err:
        raise StageFailedError(job.name, f"git clone of {job.root} failed: {err.stderr.strip()}", err.returncode,
                               False) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return round(time.monotonic() - t0, 2)


def pull_back(root: Path, names: Sequence[str], remote: str) -> None:
    """On the host: the pushed experiments' outs from the DVC remote into the workspace's cache (``dvc exp pull``)."""
    from pipeline.orchestrate.repo import open_repo

    with open_repo(root) as repo:
        repo.experiments.pull(str(root), list(names), pull_cache=True, dvc_remote=remote)
