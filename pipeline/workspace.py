"""DVC operations on one workspace, as the orchestration layer needs them.

The flows in :mod:`pipeline.flows` and the ``kdpipe`` CLI drive DVC through these
functions so that DVC's cache, lock file and lineage stay the single truth: stages
run through DVC (``Repo.reproduce``, in process, ~30 ms each instead of ~0.7 s for a
``dvc`` subprocess), params changes go through the schema before touching
``params.yaml``, and runs are recorded as DVC experiments.

Nothing here imports torch or Prefect.
"""

from __future__ import annotations

import contextvars
import fcntl
import io
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.base import ConfigError
from pipeline.engine.atomic import atomic_write_text
from pipeline.params import parse_params


class StageFailedError(RuntimeError):
    """A DVC stage failed. ``transient`` says whether running it again can pass.

    Transient: the stage's process was killed by a signal (a killed worker, the OOM
    killer) or DVC could not take its lock. Deterministic: the stage exited with an
    error of its own (exit 2 is bad params or input; 1 is a crash), which a retry
    would only repeat.
    """

    def __init__(self, stage: str, message: str, status: int | None, transient: bool, tail: str = "") -> None:
        self.stage, self.status, self.transient, self.tail = stage, status, transient, tail
        detail = f"\n--- last output of {stage} ---\n{tail}" if tail else ""
        super().__init__(f"stage {stage} failed: {message}{detail}")


class WorkspaceBusyError(RuntimeError):
    """Another kdpipe flow holds this workspace; DVC commands for one workspace never run concurrently."""


# -- serialising DVC work on a workspace -----------------------------------------


@contextmanager
def workspace_lock(root: Path, timeout: float = 600.0) -> Iterator[None]:
    """Hold the workspace for one flow run (fcntl lock in ``.kdpipe/flow.lock``; released if the process dies)."""
    lock_dir = Path(root) / ".kdpipe"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / "flow.lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = Path(lock_dir / "flow.lock").read_text().strip() or "?"
                    raise WorkspaceBusyError(
                        f"workspace {root} is busy: another kdpipe run (PID {holder}) holds {lock_dir / 'flow.lock'}; "
                        f"waited {timeout:.0f} s") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


@contextmanager
def _inside(root: Path) -> Iterator[None]:
    """Work from the workspace folder: DVC names stages and resolves targets relative to the current directory."""
    before = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


# -- the DAG ----------------------------------------------------------------------


def stage_order(root: Path, targets: Sequence[str] | None = None) -> list[str]:
    """Stage names of the workspace's dvc.yaml in an order where every stage follows its dependencies.

    With ``targets``, only those stages and what they depend on.
    """
    import networkx as nx
    from dvc.repo import Repo

    with _inside(root), Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {s.addressing: s for s in graph.nodes}
        if targets:
            unknown = [t for t in targets if t not in by_name]
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}; stages of {root / 'dvc.yaml'}: {sorted(by_name)}")
            keep: set = set()
            for t in targets:
                keep |= nx.descendants(graph, by_name[t]) | {by_name[t]}
            graph = graph.subgraph(keep)
        order = list(nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: s.addressing))
    return [s.addressing for s in order]


def stages_to_run(root: Path, order: Sequence[str]) -> set[str]:
    """Which of ``order`` will do work: those DVC reports changed, and everything downstream of them."""
    import networkx as nx
    from dvc.repo import Repo

    with _inside(root), Repo(str(root)) as repo:
        changed = set(repo.status()) & set(order)  # the whole repository at once: 5x faster than per target
        graph = repo.index.graph
        by_name = {s.addressing: s for s in graph.nodes}
        todo = set(changed)
        for name in changed:
            if name in by_name:
                todo |= {s.addressing for s in nx.ancestors(graph, by_name[name])}  # stages that depend on it
    return todo & set(order)


# -- running one stage --------------------------------------------------------------


@contextmanager
def tee_output(on_line: Callable[[str], None]) -> Iterator[None]:
    """Copy everything written to file descriptors 1 and 2 (this process and its children) to ``on_line``.

    Stage commands are child processes of DVC that inherit our descriptors; a pipe in
    their place lets the flow put their output into its run log while the terminal
    still shows it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with open(r, "rb", closefd=True) as pipe:
            for raw in pipe:
                os.write(saved_out, raw)
                try:
                    on_line(raw.decode(errors="replace").rstrip("\n"))
                except Exception:  # noqa: BLE001 - a logging failure must not break the stage
                    pass

    # the reader runs in a copy of the caller's context, so loggers find the current (Prefect) run
    reader = threading.Thread(target=contextvars.copy_context().run, args=(pump,), name="kdpipe-tee", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        reader.join(timeout=10)
        os.close(saved_out)
        os.close(saved_err)


_EXIT = re.compile(r"exited with (-?\d+)")


def reproduce_stage(root: Path, stage: str, on_line: Callable[[str], None] | None = None, force: bool = False) -> bool:
    """Run one stage through DVC (``dvc repro --single-item``); returns whether it ran (False: up to date).

    Raises :class:`StageFailedError` telling whether a retry can pass.
    """
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    tail: list[str] = []

    def collect(line: str) -> None:
        tail.append(line)
        del tail[:-40]
        if on_line is not None:
            on_line(line)

    try:
        with tee_output(collect), _inside(root), Repo(str(root)) as repo:
            ran = repo.reproduce(stage, single_item=True, force=force)
    except LockError as err:
        raise StageFailedError(stage, f"DVC lock busy: {err}", None, True, "\n".join(tail)) from err
    except DvcException as err:
        cause: BaseException | None = err
        status = None
        while cause is not None:
            m = _EXIT.search(str(cause))
            if m:
                status = int(m.group(1))
                break
            cause = cause.__cause__ or cause.__context__
        killed = status is not None and (status < 0 or status in (128 + 9, 128 + 15))
        why = f"killed by signal {-status if status < 0 else status - 128}" if killed else str(err)
        if status == 2:
            why = "bad params or input (exit 2)"
        raise StageFailedError(stage, why, status, killed, "\n".join(tail)) from err
    return bool(ran)


# -- params -------------------------------------------------------------------------


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}`` (nested dicts and dotted keys both work)."""
    flat: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=2", "c=[x, y]"]`` from the command line -> ``{"a.b": 2, "c": ["x", "y"]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.kd.temperature=2")
        out[key.strip().lstrip("+")] = yaml.safe_load(value) if value.strip() else None
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section (got {nxt!r})")
        node = nxt
    node[parts[-1]] = value


def merged_params(params_file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The params of ``params_file`` with ``overrides`` applied, validated by the schema (ConfigError)."""
    from pipeline.params import load_params

    load_params(params_file)  # the file itself must be valid first
    data = yaml.safe_load(params_file.read_text()) or {}
    for key, value in flatten(overrides).items():
        _set_path(data, key, value)
    parse_params(data, source=f"{params_file.name} with overrides {', '.join(flatten(overrides)) or '(none)'}")
    return data


def apply_params(params_file: Path, overrides: Mapping[str, Any]) -> str:
    """Write ``overrides`` into ``params_file`` (comments kept) after the schema accepted them.

    Returns the file's previous text so the caller can put it back. Nothing is written
    when validation fails.
    """
    from ruamel.yaml import YAML

    before = params_file.read_text()
    merged_params(params_file, overrides)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(before)
    for key, value in flatten(overrides).items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(params_file, buf.getvalue(), keep_mode=True)
    return before


PARAMS_BACKUP = Path(".kdpipe") / "params.before-run.yaml"


def apply_run_params(root: Path, overrides: Mapping[str, Any]) -> None:
    """Apply a run's overrides to ``params.yaml``, keeping the previous text in ``.kdpipe/`` until
    :func:`restore_run_params` puts it back (so a run killed in between is undone by the next one)."""
    params_file = root / "params.yaml"
    merged_params(params_file, overrides)  # validate before keeping anything
    backup = root / PARAMS_BACKUP
    backup.parent.mkdir(parents=True, exist_ok=True)
    restore_text(backup, params_file.read_text())
    apply_params(params_file, overrides)


def restore_run_params(root: Path) -> bool:
    """Put back the ``params.yaml`` a run changed (also one a killed run left); returns whether it did."""
    backup = root / PARAMS_BACKUP
    if not backup.is_file():
        return False
    restore_text(root / "params.yaml", backup.read_text())
    backup.unlink()
    return True


def restore_text(path: Path, text: str) -> None:
    """Put a file's earlier text back atomically."""
    atomic_write_text(path, text, keep_mode=True)


# -- experiments ----------------------------------------------------------------------


def is_git_repo(root: Path) -> bool:
    """Whether ``root`` is a git work tree with at least one commit (DVC experiments need one)."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0


def save_experiment(root: Path, name: str | None, targets: Sequence[str] | None = None) -> str | None:
    """Record the workspace (params, dvc.lock, metrics of ``targets``, default all) as a DVC experiment."""
    from dvc.repo import Repo

    untracked = [p for p in ("dvc.lock",) if (root / p).exists()]
    with _inside(root), Repo(str(root)) as repo:
        repo.experiments.save(targets=list(targets) if targets else None, name=name, force=True,
                               include_untracked=untracked)
    return name


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class QueuedExperiment:
    """One queued run of a sweep: its experiment name, overrides and seed."""

    name: str
    overrides: dict[str, Any]
    seed: int


def _dvc_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def sweep_plan(prefix: str, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int]) -> list[QueuedExperiment]:
    """Every combination of ``grid`` values times every seed, with readable experiment names."""
    keys = list(grid)
    if "seed" in keys:
        raise ValueError("sweep grid: give seeds with `seeds` (CLI --seeds), not as the grid key `seed`")
    empty = [k for k in keys if not list(grid[k])]
    if empty:
        raise ValueError(f"sweep grid: no values for {empty}")
    plan: list[QueuedExperiment] = []
    for ci, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = dict(zip(keys, combo, strict=True))
        for seed in seeds:
            plan.append(QueuedExperiment(f"{prefix}-c{ci}-s{seed}", overrides, int(seed)))
    return plan


def queue_experiments(root: Path, plan: Sequence[QueuedExperiment], targets: Sequence[str] = ()) -> None:
    """``dvc exp run --queue`` for each planned run (validated by the schema first: nothing is queued on bad params)."""
    for exp in plan:
        merged_params(root / "params.yaml", {**exp.overrides, "seed": exp.seed})
    present = flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})
    for exp in plan:
        sets: list[str] = []
        for k, v in flatten({**exp.overrides, "seed": exp.seed}).items():
            new = "" if k in present else "+"  # DVC (Hydra) needs + for a key params.yaml does not have yet
            sets += ["-S", f"{new}{k}={_dvc_value(v)}"]
        _dvc(root, "exp", "run", "--queue", "-n", exp.name, *sets, *targets)


def run_queue(root: Path, jobs: int, names: Sequence[str], poll: float = 2.0, timeout: float = 24 * 3600,
              on_progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Start ``jobs`` queue workers and wait until every named experiment finished; returns name -> status."""
    _dvc(root, "queue", "start", "-j", str(jobs))
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = queue_status(root)
        mine = {n: status.get(n, "Unknown") for n in names}
        pending = [n for n, s in mine.items() if s in ("Queued", "Running", "Unknown")]
        line = ", ".join(f"{s}: {sum(1 for v in mine.values() if v == s)}" for s in sorted(set(mine.values())))
        if on_progress and line != last:
            on_progress(line)
            last = line
        if not pending:
            return mine
        if time.monotonic() > deadline:
            raise TimeoutError(f"sweep did not finish in {timeout:.0f} s: {line}")
        time.sleep(poll)


def queue_status(root: Path) -> dict[str, str]:
    """Experiment name -> queue status (Queued, Running, Success, Failed) from ``dvc queue status``."""
    out = _dvc(root, "queue", "status")
    status: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] != "Task" and not line.startswith("Worker"):
            status[parts[1]] = parts[-1]
    return status


def experiment_table(root: Path) -> list[dict[str, Any]]:
    """Every experiment of ``dvc exp show --json`` as {name, params (flat), metrics {file: dict}}."""
    import json

    data = json.loads(_dvc(root, "exp", "show", "--json", "--no-fetch"))
    rows: list[dict[str, Any]] = []

    def add(rev: dict[str, Any]) -> None:
        d = rev.get("data") or {}
        params = ((d.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = {f: (v or {}).get("data") or {} for f, v in (d.get("metrics") or {}).items()}
        rows.append({"name": rev.get("name") or rev.get("rev"), "params": flatten(params), "metrics": metrics})

    for base in data:
        add(base)
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev)
    return rows
