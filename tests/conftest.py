"""Shared fixtures: a tiny, fast configuration and a workspace copy for end-to-end runs."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("KDPIPE_PROGRESS", "lines")
# Prefect's files (its profile, a temporary server's database) go with this test process, not into ~/.prefect
_PREFECT_HOME = tempfile.mkdtemp(prefix="kdpipe-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)  # registered first, so it runs after Prefect's own exit hooks
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def tiny_params(**sections: dict) -> dict:
    """A params mapping that trains in seconds: synthetic data, tiny nets, two epochs."""
    p = {
        "seed": 0,
        "data": {"name": "synthetic", "synthetic_samples": 240, "synthetic_classes": 4, "synthetic_image_size": 8},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.05}},
        "teacher": {"model": "tinynet_m", "route_every": 1},
        "students": {"tinynet_s": {}},
        "distill": {"methods": ["kd"]},
        "online": {"methods": []},
        "evaluate": {"batch_size": 128},
        # every profile and variant, measured briefly: the timings of these runs are never asserted
        "benchmark": {"warmup": 1, "iterations": 5, "max_seconds": 0.05, "torch_reference": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(p.get(k), dict):
            p[k] = {**p[k], **v}
        else:
            p[k] = v
    return p


def write_params(path: Path, params: dict, complete: bool = True) -> Path:
    """Write params as DVC needs them: every key spelled out (DVC tracks keys, not schema defaults)."""
    if complete:
        from pipeline.config.base import ConfigError
        from pipeline.params import parse_params

        try:
            params = parse_params(params).model_dump(mode="json")
        except ConfigError:
            pass  # a test that writes bad params on purpose
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_workspace(dest: Path, params: dict) -> Path:
    """A git + DVC repository holding the project's pipeline code and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("pipeline", "stages", "pretrained"):
        shutil.copytree(REPO / item, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / item, dest / item)
    # the report stage's real-device input, as a fresh clone has it (this checkout's filed devices stay out)
    (dest / "device_results").mkdir()
    shutil.copy2(REPO / "device_results" / "README.md", dest / "device_results" / "README.md")
    write_params(dest / "params.yaml", params)
    return init_repo(dest)


def init_repo(dest: Path, message: str = "workspace") -> Path:
    """Make ``dest`` (its files already there) a git + DVC repository with one commit holding them."""
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "ci@example.invalid")
    run("git", "config", "user.name", "ci")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", message)
    return dest


#: Printed by a stage process that reached a kill point of ``killpoint_env`` (``tests/killpoint/sitecustomize.py``).
KILLPOINT_REACHED = "KILLPOINT reached "


def killpoint_env(env: dict[str, str], *points: str) -> dict[str, str]:
    """``env`` with the kill points ``points`` armed: stage processes started with it stop there and wait to be killed.

    Tests that SIGKILL a run use them so where the kill lands does not depend on the machine's speed.
    """
    folder = str(REPO / "tests" / "killpoint")
    return {**env, "PYTHONPATH": os.pathsep.join([folder, *filter(None, [env.get("PYTHONPATH")])]),
            "KDPIPE_KILLPOINTS": ",".join(points)}


class CrashAfterEpoch(Exception):
    """Raised by :func:`fit_until_crash` to stop a training run the way a crash would."""


def fit_until_crash(epoch: int, *fit_args, **fit_kwargs) -> None:
    """Run ``fit`` until epoch ``epoch`` (0-based) has ended and its checkpoint is written, then crash it.

    Tests of resuming use it to leave exactly the state a crash after that epoch leaves.
    """
    from pipeline.engine import loop

    original = loop.Progress.epoch_done

    def crash(self, done: int, metrics: dict) -> None:  # noqa: ANN001 - a Progress method
        original(self, done, metrics)
        if done == epoch:
            raise CrashAfterEpoch

    loop.Progress.epoch_done = crash
    try:
        with pytest.raises(CrashAfterEpoch):
            loop.fit(*fit_args, **fit_kwargs)
    finally:
        loop.Progress.epoch_done = original


#: The files that take longest (minutes each: whole pipelines, clusters, servers), longest first. They are
#: handed out first, so with one file per worker (-n auto --dist loadfile) no worker is left with a long file
#: at the end while the others idle. Only the order depends on this list; a stale entry costs balance, not tests.
LONGEST_FIRST = ("test_pipeline_dvc.py", "test_kill_points.py", "test_deploy_dvc.py", "test_sweep_cluster.py",
                 "test_parallel_flow.py", "test_deployments.py", "test_flow_kill.py", "test_flows.py")


def pytest_xdist_auto_num_workers(config) -> int:  # noqa: ANN001 - pytest-xdist hook
    """Workers for ``-n auto``: one per core, and one more per two cores.

    The slow tests spend part of their time waiting (on subprocesses starting, servers,
    DVC locks), so one worker per core left the cores idle: a fresh-clone run on 2 cores
    used 28.4 CPU-minutes in 20.5 minutes (69% of the 2 cores).
    """
    cores = os.cpu_count() or 1
    return cores + max(1, cores // 2)


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ANN001 - pytest hook
    """Put the longest files first, each file's tests in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep collection order


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001 - pytest hook
    """Prefect stops its temporary server at interpreter exit and logs that to a stream pytest has
    closed by then; without this, logging prints a "--- Logging error ---" traceback after the summary."""
    logging.raiseExceptions = False


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> Iterator[dict[str, str]]:
    """One real Prefect server for the flows of this test process, in it and in the subprocesses its tests start.

    Without it each flow process starts Prefect's temporary server (15 to 25 s of CPU each on a 2-core machine);
    tests/test_pipeline_dvc.py keeps one run on a temporary server, as `kdpipe run` works for a user.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.prefect_api import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as env:
        patch = pytest.MonkeyPatch()
        patch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])  # subprocesses
        try:
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):  # this process, Prefect imported or not
                yield env
        finally:
            patch.undo()


@pytest.fixture
def tiny() -> dict:
    return tiny_params()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one intra-op thread for a module's tests (restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
