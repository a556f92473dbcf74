"""Contract with DVC's private lock formats: DVC's own code writes the locks, pipeline.dvc_locks reads them.

``pipeline/dvc_locks.py`` parses ``.dvc/tmp/lock`` (zc.lockfile fcntl lock, or a flufl hard-link lock with
``core.hardlink_lock``) and ``.dvc/tmp/rwlock`` (JSON table of the outs each running command reads/writes).
Neither is a public DVC interface, so the installed DVC writes them here (``Repo.lock``, ``dvc.lock.make_lock``,
``dvc.rwlock.rwlock``; nothing is hand-written) and our reader must see what DVC wrote. A failure here after a
DVC upgrade means the format moved: fix the reader before widening the ``dvc`` pin in pyproject.toml.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dvc_locks import (
    _hardlink_mode,
    _probe_repo_lock,
    _read_rwlock,
    clear_stale,
    inspect_locks,
    live_dvc_processes,
)

CHANGED = "DVC's lock format changed: update pipeline/dvc_locks.py and the dvc pin in pyproject.toml"
MISREAD = "pipeline.dvc_locks misreads a lock the installed DVC wrote"

# A DVC process as our code recognises one (a script named `dvc`, run in the workspace) that takes the locks
# the way a DVC command does: Repo(root).lock (its kind chosen by DVC from .dvc/config), then the rwlock for
# its deps/outs under the command line DVC records (" ".join(sys.argv), as dvc/stage/decorators.py does).
HOLDER = """\
import json, os, signal, sys
from dvc.repo import Repo
from dvc.rwlock import rwlock

spec = json.loads(os.environ["HOLDER_SPEC"])
with Repo(spec["root"]) as repo, repo.lock:
    hardlink = repo.config["core"].get("hardlink_lock", False)
    with rwlock(repo.tmp_dir, repo.fs, " ".join(sys.argv), spec["read"], spec["write"], hardlink):
        print(type(repo.lock).__name__, flush=True)
        if spec.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)  # killed while holding both locks
        sys.stdin.read()  # hold until the test closes our stdin
"""


def _repo(root: Path, **core: str) -> Path:
    """A git + DVC repository made by DVC's own code (``dvc init``, ``dvc config core.<key> <value>``)."""
    from dvc.repo import Repo

    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with Repo.init(str(root)) as repo, repo.config.edit() as conf:
        conf["core"]["analytics"] = "false"  # the string `dvc config` stores
        conf["core"].update(core)
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return _repo(tmp_path / "repo")


@pytest.fixture
def hardlink_repo(tmp_path: Path) -> Path:
    return _repo(tmp_path / "repo", hardlink_lock="true")


@pytest.fixture
def holder_script(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "dvc"
    script.parent.mkdir()
    script.write_text(HOLDER)
    return script


def start_holder(script: Path, root: Path, read=(), write=(), die=False) -> tuple[subprocess.Popen, str]:
    """Start a DVC process holding the repository lock and the rwlock; returns it and its lock class name."""
    spec = {"root": str(root), "read": [str(p) for p in read], "write": [str(p) for p in write], "die": die}
    proc = subprocess.Popen([sys.executable, str(script), "repro"], cwd=root, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOLDER_SPEC": json.dumps(spec)})
    if die:
        assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read()
        return proc, proc.stdout.read().strip()
    kind = proc.stdout.readline().strip()
    assert kind, f"the DVC lock holder did not start: {proc.stderr.read()}"
    return proc, kind


def stop_holder(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


def rwlock_table(root: Path) -> dict:
    rw = root / ".dvc" / "tmp" / "rwlock"
    assert rw.is_file(), f"{CHANGED}: DVC's rwlock is no longer at {rw}"
    try:
        return json.loads(rw.read_text())
    except ValueError as err:
        raise AssertionError(f"{CHANGED}: {rw} is not JSON ({err})") from None


def assert_rwlock_shape(table: dict, read: dict[str, list[dict]], write: dict[str, dict]) -> None:
    """The on-disk shape inspect_locks parses: {"read": {path: [{"pid", "cmd"}]}, "write": {path: {"pid", "cmd"}}}."""
    assert isinstance(table, dict) and set(table) <= {"read", "write"}, f"{CHANGED}: rwlock top level is {table!r}"
    assert table.get("read", {}) == read, f"{CHANGED}: rwlock 'read' is {table.get('read')!r}, expected {read!r}"
    assert table.get("write", {}) == write, f"{CHANGED}: rwlock 'write' is {table.get('write')!r}, expected {write!r}"


def test_dvc_rwlock_is_read_back_with_its_holder_paths_and_command(repo: Path):
    from dvc.fs import localfs
    from dvc.rwlock import rwlock

    tmp = repo / ".dvc" / "tmp"
    rw = tmp / "rwlock"
    data, model, plots = (str(repo / p) for p in ("data/train.csv", "models/teacher.pt", "plots"))
    me = {"pid": os.getpid(), "cmd": "dvc repro train"}
    with rwlock(str(tmp), localfs, me["cmd"], [data], [model, plots], False):
        table = rwlock_table(repo)
        assert_rwlock_shape(table, read={data: [me]}, write={model: me, plots: me})
        assert _read_rwlock(rw) == table, f"{CHANGED}: our reader refuses the rwlock DVC wrote: {table!r}"
        report = inspect_locks(repo)
        assert not report.rwlock_corrupt, f"{CHANGED}: our reader calls DVC's rwlock corrupt: {table!r}"
        assert [(h.pid, h.cmd) for h in report.rwlock] == [(os.getpid(), me["cmd"])], MISREAD
        (held,) = report.rwlock
        assert sorted(held.paths) == sorted([f"{data} (read)", f"{model} (write)", f"{plots} (write)"]), MISREAD
        assert held.live_dvc and report.busy and not report.has_stale and not report.blocking, MISREAD
        assert f"PID {os.getpid()} (dvc repro train) holds" in report.explain()
    after = rwlock_table(repo)
    assert_rwlock_shape(after, read={}, write={})  # DVC drops its entries (and empty sections) on release
    report = inspect_locks(repo)
    assert report.rwlock == [] and not report.rwlock_corrupt and not report.busy


def test_dvc_fcntl_repo_lock_is_seen_held_by_its_pid_and_then_free(repo: Path, holder_script: Path):
    from dvc.fs import localfs
    from dvc.repo import Repo
    from dvc.rwlock import rwlock

    lock = repo / ".dvc" / "tmp" / "lock"
    data, model = str(repo / "data.csv"), str(repo / "model.pt")
    proc, kind = start_holder(holder_script, repo, read=[data], write=[model])
    try:
        assert kind == "Lock", f"{CHANGED}: DVC's default repository lock is {kind}, not the zc.lockfile Lock"
        text = lock.read_text()
        assert text.split() == [str(proc.pid)], f"{CHANGED}: zc.lockfile lock {lock} holds {text!r}, not the PID"
        assert _probe_repo_lock(lock) == (True, proc.pid), f"{MISREAD}: the probe misses DVC's fcntl repository lock"
        # a second command reading the same dep: DVC keeps a list of readers per path
        other = {"pid": os.getpid(), "cmd": "dvc exp run"}
        with rwlock(str(lock.parent), localfs, other["cmd"], [data], [], False):
            theirs = {"pid": proc.pid, "cmd": f"{holder_script} repro"}
            assert_rwlock_shape(rwlock_table(repo), read={data: [theirs, other]}, write={model: theirs})
            report = inspect_locks(repo)
            assert report.repo_lock_held and report.repo_lock_pid == proc.pid, MISREAD
            assert f"is held by PID {proc.pid}" in report.explain()
            by_pid = {h.pid: h for h in report.rwlock}
            assert set(by_pid) == {proc.pid, os.getpid()} and all(h.live_dvc for h in report.rwlock), MISREAD
            assert by_pid[proc.pid].cmd == theirs["cmd"], MISREAD
            assert sorted(by_pid[proc.pid].paths) == [f"{data} (read)", f"{model} (write)"], MISREAD
            assert by_pid[os.getpid()].paths == [f"{data} (read)"], MISREAD
    finally:
        stop_holder(proc)
    assert _probe_repo_lock(lock) == (False, None)
    report = inspect_locks(repo)
    assert not report.repo_lock_held and report.rwlock == [] and not report.busy

    # held by this very process through DVC's API (Repo.lock), then released
    with Repo(str(repo)) as dvc_repo:
        with dvc_repo.lock:
            assert _probe_repo_lock(lock) == (True, os.getpid())
        assert _probe_repo_lock(lock) == (False, None)

    # the kernel drops an fcntl lock with its process: a killed DVC run leaves nothing held
    killed, _ = start_holder(holder_script, repo, read=[data], write=[model], die=True)
    assert lock.read_text().split() == [str(killed.pid)]  # the file and its PID stay behind ...
    report = inspect_locks(repo)
    assert not report.repo_lock_held and not report.busy  # ... but the lock does not
    assert [(h.pid, h.alive) for h in report.stale] == [(killed.pid, False)] and not report.blocking


def test_dvc_hardlink_repo_lock_is_seen_held_then_free_and_a_killed_one_is_cleared(
        hardlink_repo: Path, holder_script: Path):
    from dvc.fs import localfs
    from dvc.lock import make_lock
    from dvc.rwlock import rwlock

    repo = hardlink_repo
    tmp = repo / ".dvc" / "tmp"
    lock = tmp / "lock"
    assert _hardlink_mode(repo), f"{CHANGED}: our reader misses core.hardlink_lock in {(repo / '.dvc' / 'config').read_text()!r}"
    model = str(repo / "model.pt")
    proc, kind = start_holder(holder_script, repo, write=[model])
    try:
        assert kind == "HardlinkLock", f"{CHANGED}: with core.hardlink_lock DVC's repository lock is {kind}"
        claim = Path(lock.read_text())
        claim = claim if claim.is_absolute() else repo / claim
        assert claim.name.endswith(".lock") and claim.parent == tmp and os.path.samefile(lock, claim), (
            f"{CHANGED}: hard-link lock {lock} should name its claim file <tmp>/<md5>.lock, a hard link to it")
        assert live_dvc_processes(repo) == [proc.pid], MISREAD
        report = inspect_locks(repo)
        assert report.repo_lock_held and report.repo_lock_pid == proc.pid and not report.hardlink_lock_stale, MISREAD
        assert [(h.pid, h.paths) for h in report.live] == [(proc.pid, [f"{model} (write)"])], MISREAD
    finally:
        stop_holder(proc)
    assert not lock.exists() and not claim.exists(), f"{CHANGED}: DVC's hard-link lock outlives its release"
    assert not list(tmp.glob("*.lock")) and not (tmp / "rwlock.lock").exists()  # the rwlock guard is gone too
    report = inspect_locks(repo)
    assert not report.repo_lock_held and not report.hardlink_lock_stale and not report.busy and not report.has_stale

    # a DVC run killed while holding a hard-link lock leaves it behind for good: we see it stale and clear it
    killed, _ = start_holder(holder_script, repo, write=[model], die=True)
    assert lock.exists()
    claim = Path(lock.read_text())
    claim = claim if claim.is_absolute() else repo / claim
    report = inspect_locks(repo)
    assert report.hardlink_lock_stale and report.blocking and not report.busy
    assert [h.pid for h in report.stale] == [killed.pid]
    removed = clear_stale(repo, settle_s=0)
    assert any("hard-link lock" in r for r in removed) and f"rwlock entry of PID {killed.pid} ({holder_script} repro)" in removed
    assert not lock.exists() and not claim.exists()
    report = inspect_locks(repo)
    assert not report.has_stale and not report.busy
    assert_rwlock_shape(rwlock_table(repo), read={}, write={})  # what clear_stale wrote back ...
    again = make_lock(str(lock), tmp_dir=str(tmp), hardlink_lock=True)
    again.lock()  # ... and DVC takes its lock again at once
    again.unlock()
    with rwlock(str(tmp), localfs, "dvc repro", [], [model], True):
        pass  # DVC's schema accepts the rwlock clear_stale rewrote
