"""DVC locks with real DVC processes: live ones are never touched, stale ones are explained and cleared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.dvc_locks import LockBusyError, StaleLockError, clear_stale, ensure_unlocked, inspect_locks

pytestmark = pytest.mark.slow  # real DVC processes and DVC's lock time-outs (~45 s)

#: A stage that, when $HOLD names a file, runs until that file is removed: tests act while it runs, however
#: slow the machine, and let it end (or kill it) when they are done. Without $HOLD it ends at once.
SLOW_STAGE = {"stages": {"slow": {"cmd": "python -c \"import os, time, pathlib; hold = os.environ.get('HOLD'); "
                                         "[time.sleep(0.05) for _ in iter(lambda: bool(hold) and os.path.exists(hold), False)]; "
                                         "pathlib.Path('o.txt').write_text('x')\"", "outs": ["o.txt"]}}}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    ws = tmp_path / "repo"
    ws.mkdir()
    (ws / "dvc.yaml").write_text(json.dumps(SLOW_STAGE))
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=ws, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=ws, check=True)
    return ws


def start_repro(ws: Path) -> subprocess.Popen:
    """`dvc repro` with its stage running, held until ``hold_file(ws)`` is removed."""
    hold = hold_file(ws)
    hold.write_text("")
    proc = subprocess.Popen(["dvc", "repro"], cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "HOLD": str(hold)})
    # wait for the stage's own process: DVC then holds its rwlock entry and leaves the file alone
    # until the stage ends (it rewrites the file in place while taking and dropping locks)
    # (no deadline of our own: a hang is pytest-timeout's to stop, however slow the machine)
    rw = ws / ".dvc" / "tmp" / "rwlock"
    while not (rw.is_file() and "pid" in rw.read_text() and _stage_running(proc.pid)):
        assert proc.poll() is None, "dvc repro ended without its stage being seen running"
        time.sleep(0.1)
    return proc


def hold_file(ws: Path) -> Path:
    return ws.parent / "hold"  # outside the repository: no part of what DVC sees


def _stage_running(pid: int) -> bool:
    try:
        return any("hold = os.environ" in " ".join(c.cmdline()) for c in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def kdpipe(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--workspace", str(ws)],
                          capture_output=True, text=True, timeout=60)


def test_a_live_dvc_process_is_reported_and_its_lock_never_removed(repo: Path):
    proc = start_repro(repo)
    try:
        rw = repo / ".dvc" / "tmp" / "rwlock"
        before = rw.read_bytes()
        report = inspect_locks(repo)
        assert report.busy and [h.pid for h in report.live] == [proc.pid]
        assert "wait for it to finish" in report.explain()
        with pytest.raises(LockBusyError):
            clear_stale(repo)
        with pytest.raises(LockBusyError):
            ensure_unlocked(repo)
        out = kdpipe(repo, "unlock")
        assert out.returncode == 1 and "nothing removed" in out.stderr
        assert rw.read_bytes() == before
    finally:
        hold_file(repo).unlink()
        assert proc.wait(timeout=120) == 0  # the live run was not disturbed
    assert (repo / "o.txt").read_text() == "x"


def test_a_killed_run_leaves_a_dead_pid_that_dvc_clears_itself(repo: Path):
    proc = start_repro(repo)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    report = inspect_locks(repo)
    assert not report.busy and [h.pid for h in report.stale] == [proc.pid] and not report.blocking
    assert "no longer exists" in report.explain()
    ensure_unlocked(repo)  # DVC drops dead PIDs at its next command: nothing to do
    done = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not inspect_locks(repo).has_stale


def test_a_reused_pid_blocks_dvc_until_kdpipe_unlock(repo: Path):
    proc = start_repro(repo)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rw = repo / ".dvc" / "tmp" / "rwlock"
    other = subprocess.Popen(["sleep", "120"])  # stands for an unrelated program that got the dead run's PID
    try:
        time.sleep(1.1)
        rw.write_text(rw.read_text().replace(str(proc.pid), str(other.pid)))
        os.utime(rw, (time.time() - 60, time.time() - 60))  # the entry predates the program
        blocked = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, timeout=120)
        assert blocked.returncode != 0 and "is busy" in blocked.stderr  # what users hit without us
        report = inspect_locks(repo)
        assert report.blocking and "now belongs to another program" in report.explain()
        with pytest.raises(StaleLockError, match="kdpipe unlock"):
            ensure_unlocked(repo)
        shown = kdpipe(repo, "locks")
        assert shown.returncode == 1 and "kdpipe unlock" in shown.stdout
        out = kdpipe(repo, "unlock")
        assert out.returncode == 0 and f"PID {other.pid}" in out.stdout
        assert other.poll() is None  # the unrelated program is untouched
        done = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        other.kill()
        other.wait()


def test_an_rwlock_cut_short_by_a_kill_is_detected_and_cleared(repo: Path):
    proc = start_repro(repo)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rw = repo / ".dvc" / "tmp" / "rwlock"
    whole = rw.read_text()
    for cut in ("", whole[: len(whole) // 2]):  # killed after DVC truncated the file / half-way through its write
        rw.write_text(cut)
        stuck = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, timeout=120)
        assert stuck.returncode != 0 and "JSON structure is corrupted" in stuck.stderr  # DVC alone is stuck for good
        report = inspect_locks(repo)
        assert report.rwlock_corrupt and report.blocking and not report.busy
        assert "killed while writing it" in report.explain()
        with pytest.raises(StaleLockError, match="kdpipe unlock"):
            ensure_unlocked(repo)
    out = kdpipe(repo, "unlock")
    assert out.returncode == 0 and "unreadable" in out.stdout, out.stderr
    assert not rw.exists()
    done = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (repo / "o.txt").read_text() == "x"


def test_a_stale_hardlink_lock_is_detected_and_cleared(repo: Path):
    subprocess.run(["dvc", "config", "core.hardlink_lock", "true"], cwd=repo, check=True)
    # a DVC process killed while holding the repository lock (hard-link locks outlive their process)
    killed = subprocess.run([sys.executable, "-c", "import os, signal\nfrom dvc.lock import make_lock\n"
                             "make_lock('.dvc/tmp/lock', tmp_dir='.dvc/tmp', hardlink_lock=True).lock()\n"
                             "os.kill(os.getpid(), signal.SIGKILL)"], cwd=repo)
    assert killed.returncode == -signal.SIGKILL
    stuck = subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert stuck.returncode != 0 and "Unable to acquire lock" in stuck.stderr
    report = inspect_locks(repo)
    assert report.hardlink_lock_stale and report.blocking and not report.busy
    assert "left by a killed run" in report.explain()
    assert any("hard-link lock" in r for r in clear_stale(repo))
    ok = subprocess.run(["dvc", "status"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_the_flow_in_progress_counts_as_busy_for_others(repo: Path):
    from pipeline.orchestrate.lock import workspace_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from pipeline.orchestrate.lock import workspace_lock\n"
                               "with workspace_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n"
                               "    time.sleep(600)", str(repo)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        report = inspect_locks(repo)
        assert report.flow_pid == holder.pid and report.busy
        with pytest.raises(Exception, match="busy"):
            with workspace_lock(repo, timeout=1):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert not inspect_locks(repo).busy
    with workspace_lock(repo, timeout=1):
        assert inspect_locks(repo).flow_pid is None  # our own hold is not someone else's


def test_dvc_daemons_do_not_count_and_a_just_ended_command_is_waited_for(repo: Path, tmp_path: Path):
    # stand-ins with DVC's command lines: `dvc daemon analytics` (DVC starts it as a command ends), the forked
    # copy of the ended command (`dvc init`) that waits for its daemon, a command that ends within the settle
    # time, a long one
    fake = tmp_path / "site" / "dvc" / "__main__.py"
    fake.parent.mkdir(parents=True)
    # each says it started, then runs until its hold file (the last argument) is removed; `init` first does
    # DVC's double fork (fork, setsid, fork, the middle one exits), and the second copy starts the daemon and
    # waits: a process in a session whose leader has gone, under the command line of the ended command
    fake.write_text("import os, subprocess, sys, time\n"
                    "if sys.argv[1] == 'init':\n"
                    "    os.setsid()\n"
                    "    if os.fork() > 0:\n"
                    "        os._exit(0)\n"
                    "    child = subprocess.Popen([sys.executable, sys.argv[0], 'daemon', 'updater', sys.argv[-1]],\n"
                    "                             stdout=subprocess.DEVNULL)\n"
                    "print('started', flush=True)\n"
                    "while os.path.exists(sys.argv[-1]):\n    time.sleep(0.05)\n")

    def start(*args: str) -> subprocess.Popen:
        hold = tmp_path / f"hold-{args[0]}"
        hold.write_text("")
        proc = subprocess.Popen([sys.executable, str(fake), *args, str(hold)], cwd=repo, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "started"
        return proc

    waiter = start("init", "-q")
    daemon = start("daemon", "analytics")
    ending = start("status")
    try:
        from pipeline.dvc_locks import live_dvc_processes

        assert live_dvc_processes(repo) == [ending.pid]
        rw = repo / ".dvc" / "tmp" / "rwlock"
        rw.write_text("")
        (tmp_path / "hold-status").unlink()  # `status` ends now, on its own; clear_stale waits for it
        assert clear_stale(repo, settle_s=120) == [f"unreadable {rw}"]  # (120 s: an upper bound, not a wait)
        # clear_stale returned instead of refusing, so it saw `status` end; the kernel may still be tearing the
        # process down (no command line or cwd left, not yet a zombie), so wait for its exit status, not poll
        assert ending.wait(timeout=120) == 0 and daemon.poll() is None
        long = start("repro")
        try:
            rw.write_text("")
            with pytest.raises(LockBusyError, match=str(long.pid)):
                clear_stale(repo, settle_s=1)
            assert rw.read_text() == ""  # nothing removed while it lives
        finally:
            long.kill()
            long.wait()
    finally:
        for hold in tmp_path.glob("hold-*"):
            hold.unlink()  # the waiter's daemon child ends with it
        for p in (daemon, ending, waiter):
            p.kill()
            p.wait()
