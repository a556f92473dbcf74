"""Inspect DVC's locks in a workspace: who holds them, which are stale, what to do.

DVC guards a repository with two locks under ``.dvc/tmp``:

* ``lock``: the repository lock. By default an ``fcntl`` lock (zc.lockfile) that the
  kernel releases when its process dies, so a killed run cannot leave it held; with
  ``core.hardlink_lock`` (network file systems) it is a flufl hard-link lock that
  DVC keeps "for good" (a 365-day lifetime), so a killed run leaves it behind.
* ``rwlock``: a JSON table of the outs each running command reads or writes, keyed
  by PID. DVC clears entries of dead PIDs by itself, but an entry whose PID now
  belongs to another (non-DVC) process blocks every later run, and so does the
  empty or cut-short file a run killed while rewriting it leaves behind.

:func:`inspect_locks` classifies both; :func:`clear_stale` removes only what no live
DVC process holds, and refuses to touch anything while the repository lock is held.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pipeline.engine.atomic import atomic_write_text
from pipeline.orchestrate.lock import LOCK_DIR, LOCK_FILE, flow_pid


class StaleLockError(RuntimeError):
    """A lock left by a killed DVC run blocks the workspace; the message says what to do."""


class LockBusyError(RuntimeError):
    """A live DVC process holds the workspace; waiting (or retrying later) is the remedy."""


@dataclass
class LockHolder:
    """One process named by a lock: its PID, the command recorded, and whether it is a live DVC process."""

    pid: int
    cmd: str
    alive: bool
    is_dvc: bool
    paths: list[str] = field(default_factory=list)

    @property
    def live_dvc(self) -> bool:
        return self.alive and self.is_dvc


@dataclass
class LockReport:
    """What holds a workspace's DVC locks right now."""

    root: Path
    repo_lock_held: bool = False
    repo_lock_pid: int | None = None
    hardlink_lock_stale: bool = False
    rwlock: list[LockHolder] = field(default_factory=list)
    rwlock_corrupt: bool = False
    flow_pid: int | None = None
    repaired: list[str] = field(default_factory=list)

    @property
    def live(self) -> list[LockHolder]:
        return [h for h in self.rwlock if h.live_dvc]

    @property
    def stale(self) -> list[LockHolder]:
        return [h for h in self.rwlock if not h.live_dvc]

    @property
    def busy(self) -> bool:
        return self.repo_lock_held or bool(self.live) or self.flow_pid is not None

    @property
    def has_stale(self) -> bool:
        return bool(self.stale) or self.hardlink_lock_stale or self.rwlock_corrupt

    @property
    def blocking(self) -> bool:
        """Stale locks that DVC will not clear by itself (it drops entries of dead PIDs on its own)."""
        reused = any(h.alive and not h.is_dvc for h in self.rwlock)
        return reused or self.hardlink_lock_stale or self.rwlock_corrupt

    def explain(self) -> str:
        """A human explanation: what holds what and the command that fixes it."""
        tmp = self.root / ".dvc" / "tmp"
        lines: list[str] = []
        if self.flow_pid is not None:
            lines.append(f"a kdpipe flow (PID {self.flow_pid}) is running in this workspace; wait for it to finish")
        if self.repo_lock_held:
            who = f"PID {self.repo_lock_pid}" if self.repo_lock_pid else "another process"
            lines.append(f"the DVC repository lock {tmp / 'lock'} is held by {who}: a DVC command is running "
                         "in this workspace; wait for it to finish")
        for h in self.live:
            lines.append(f"live DVC process PID {h.pid} ({h.cmd}) holds {', '.join(h.paths)}; wait for it to finish")
        for h in self.stale:
            why = ("no longer exists (DVC drops such entries itself)" if not h.alive
                   else "now belongs to another program, so DVC waits for it forever")
            lines.append(f"stale entry in {tmp / 'rwlock'}: PID {h.pid} ({h.cmd}) {why}; "
                         f"it holds {', '.join(h.paths)}")
        if self.rwlock_corrupt:
            lines.append(f"{tmp / 'rwlock'} is empty or not valid JSON (a DVC run was killed while writing it), "
                         "so every DVC command fails on it")
        if self.hardlink_lock_stale:
            lines.append(f"hard-link repository lock {tmp / 'lock'} was left by a killed run (core.hardlink_lock)")
        if self.has_stale:
            if self.busy:
                lines.append("stale locks are left alone while a DVC process is live; run `kdpipe unlock` after it ends")
            else:
                lines.append("no DVC process is running here: `kdpipe unlock` removes the stale entries "
                             "(it never removes a lock a live DVC process holds)")
        return "\n".join(lines) if lines else "no DVC locks held"


def _holder_state(pid: int, cmd: str, written: float) -> tuple[bool, bool]:
    """(alive, still the process that wrote the entry) for a PID named in the rwlock.

    A PID is the writer when its command line is the one recorded, or when the process
    already existed at the rwlock's last write (a reused PID belongs to a process started
    after the writer died, hence after the entry). Zombies count as dead; a process we may
    not inspect counts as the writer (never remove what might be live).
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, False
        same_cmd = " ".join(proc.cmdline()) == cmd
        return True, same_cmd or proc.create_time() <= written + 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False, False
    except psutil.AccessDenied:
        return True, True


def _flow_lock_holder(root: Path) -> int | None:
    """PID of the kdpipe flow holding this workspace (``.kdpipe/flow.lock``), if one does."""
    lock = root / LOCK_DIR / LOCK_FILE
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = flow_pid(root) or -1
        return None if pid == os.getpid() else pid  # the flow asking holds it itself
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _dvc_args(cmd: list[str]) -> list[str] | None:
    """The DVC arguments of a command line (``["repro", ...]``), or None when it is not a DVC command."""
    at = next((i for i, a in enumerate(cmd[:3])
               if Path(a).name == "dvc" or a.endswith(("dvc/__main__.py", "dvc/cli/__init__.py"))), None)
    if at is None and len(cmd) > 2 and cmd[1] == "-m" and cmd[2] == "dvc":
        at = 2
    return None if at is None else cmd[at + 1:]


def _is_daemon(proc: psutil.Process) -> bool:
    """Whether ``proc`` is one of DVC's daemons, which take no lock.

    DVC starts ``dvc daemon analytics|updater`` as a command ends, through a double fork:
    the forked copy keeps the command's own command line (``dvc init``, ``dvc repro``)
    and only waits for the daemon, for as long as the daemon lives (a network timeout on
    a machine without network). Both are recognised: the daemon by its arguments, the
    copy as a process whose every child is a daemon. (The copy is the second fork, so
    it is not its session's leader; a DVC command itself never has a daemon as a child.)
    """
    try:
        if (_dvc_args(proc.cmdline()) or [None])[0] == "daemon":
            return True
        children = proc.children()
        return bool(children) and all((_dvc_args(c.cmdline()) or [None])[0] == "daemon" for c in children)
    except (psutil.Error, ProcessLookupError):
        return True  # gone: it holds nothing


def live_dvc_processes(root: Path) -> list[int]:
    """PIDs of live DVC processes whose working directory is inside ``root`` (this user's processes).

    DVC's daemons (and the forked copy of a command that waits for one) are left out: they take no lock.
    """
    found: list[int] = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info.get("status") == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        if _dvc_args(info.get("cmdline") or []) is None or _is_daemon(proc):
            continue
        cwd = info.get("cwd")
        if cwd and (Path(cwd) == root or root in Path(cwd).parents):
            found.append(proc.pid)
    return found


def _probe_repo_lock(lock: Path) -> tuple[bool, int | None]:
    """Whether the fcntl repository lock is held right now (probe without blocking), and by which PID.

    zc.lockfile takes it with ``flock`` (a whole-file lock, which ``lockf``/POSIX record locks do not see).
    """
    if not lock.exists():
        return False, None
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                text = lock.read_text(errors="replace").strip().split()
                pid = int(text[0]) if text and text[0].isdigit() else None
                return True, pid
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def _hardlink_mode(root: Path) -> bool:
    cfg = root / ".dvc" / "config"
    if not cfg.is_file():
        return False
    text = cfg.read_text().replace(" ", "").lower()
    return "hardlink_lock=true" in text


def _read_rwlock(rw: Path) -> dict | None:
    """The rwlock table, or None when DVC would refuse it as corrupted.

    DVC rewrites the file in place (truncate, then write), so a process killed in
    between leaves it empty or cut short; DVC then fails every command on it.
    """
    try:
        table = json.loads(rw.read_text(errors="replace"))
    except ValueError:
        return None
    if not isinstance(table, dict) or any(not isinstance(table.get(m, {}), dict) for m in ("read", "write")):
        return None
    return table


def inspect_locks(root: Path | str = ".") -> LockReport:
    """Classify every lock of the DVC workspace at ``root`` (nothing is changed)."""
    root = Path(root).resolve()
    tmp = root / ".dvc" / "tmp"
    report = LockReport(root=root)
    lock = tmp / "lock"
    report.flow_pid = _flow_lock_holder(root)
    if _hardlink_mode(root):
        # a flufl lock file names its claim file, not a PID: whether it is live is told by the
        # DVC processes working in this workspace right now
        if lock.exists():
            live = live_dvc_processes(root) + ([report.flow_pid] if report.flow_pid else [])
            report.repo_lock_held = bool(live)
            report.repo_lock_pid = live[0] if live else None
            report.hardlink_lock_stale = not live
    else:
        report.repo_lock_held, report.repo_lock_pid = _probe_repo_lock(lock)

    rw = tmp / "rwlock"
    if rw.is_file():
        written = rw.stat().st_mtime
        table = _read_rwlock(rw)
        if table is None:
            report.rwlock_corrupt = True
            table = {}
        by_pid: dict[int, LockHolder] = {}
        for mode in ("read", "write"):
            for path, infos in (table.get(mode) or {}).items():
                for info in infos if isinstance(infos, list) else [infos]:
                    pid = int(info.get("pid", -1))
                    if pid not in by_pid:
                        cmd = str(info.get("cmd", "?"))
                        alive, same = _holder_state(pid, cmd, written) if pid > 0 else (False, False)
                        by_pid[pid] = LockHolder(pid=pid, cmd=cmd, alive=alive, is_dvc=same)
                    by_pid[pid].paths.append(f"{path} ({mode})")
        report.rwlock = list(by_pid.values())
    return report


def ensure_unlocked(root: Path | str = ".", repair_cut_rwlock: bool = False) -> LockReport:
    """Raise :class:`LockBusyError` or :class:`StaleLockError` (with the explanation) unless the workspace is free.

    Entries of dead PIDs do not count: DVC removes those itself at its next command.
    ``repair_cut_rwlock``: remove an rwlock a kill cut short when nothing else is wrong and
    no DVC process lives here; that file holds no live claim, so this is always safe and
    lets a killed run's next run go on by itself (see ``report.repaired``).
    """
    report = inspect_locks(root)
    if report.busy:
        raise LockBusyError(report.explain())
    if repair_cut_rwlock and report.rwlock_corrupt and not report.hardlink_lock_stale:
        repaired = clear_stale(root)
        report = inspect_locks(root)
        report.repaired = repaired
    if report.blocking:
        raise StaleLockError(report.explain())
    return report


def clear_stale(root: Path | str = ".", settle_s: float = 10.0) -> list[str]:
    """Remove stale lock entries; refuses (LockBusyError) while any live DVC process holds the workspace.

    A DVC command that just ended leaves a forked copy of itself for a few seconds (it
    starts DVC's analytics/updater daemon), so DVC processes are given ``settle_s`` to
    go away before refusing. The repository lock is taken for the duration, so no DVC
    command can start meanwhile. Returns a description of each thing removed.
    """
    root = Path(root).resolve()
    report = inspect_locks(root)
    if report.busy:
        raise LockBusyError(report.explain())
    from dvc.lock import make_lock

    tmp = root / ".dvc" / "tmp"
    removed: list[str] = []
    live = live_dvc_processes(root)
    deadline = time.monotonic() + settle_s
    while live and time.monotonic() < deadline:  # a DVC command's exit leaves a forked copy for a moment
        time.sleep(0.25)
        live = live_dvc_processes(root)
    if live:
        raise LockBusyError(f"DVC process(es) {live} are running in {root}; nothing removed while they live")
    if report.hardlink_lock_stale:
        claim = (tmp / "lock").read_text(errors="replace").strip()
        (tmp / "lock").unlink(missing_ok=True)
        if claim and Path(claim).name.endswith(".lock"):
            (root / claim if not Path(claim).is_absolute() else Path(claim)).unlink(missing_ok=True)
        removed.append(f"stale hard-link lock {tmp / 'lock'}")
    with make_lock(str(tmp / "lock"), tmp_dir=str(tmp), hardlink_lock=_hardlink_mode(root)):
        again = inspect_locks(root)  # re-check under the lock: nothing live may have appeared
        if again.live:
            raise LockBusyError(again.explain())
        rw = tmp / "rwlock"
        if again.rwlock_corrupt:
            rw.unlink()
            removed.append(f"unreadable {rw}")
        elif again.stale:
            table = _read_rwlock(rw) or {}
            dead = {h.pid for h in again.stale}
            for mode in ("read", "write"):
                entries = table.get(mode) or {}
                for path in list(entries):
                    infos = entries[path]
                    if isinstance(infos, list):
                        keep = [i for i in infos if int(i.get("pid", -1)) not in dead]
                        if keep:
                            entries[path] = keep
                        else:
                            del entries[path]
                    elif int(infos.get("pid", -1)) in dead:
                        del entries[path]
            atomic_write_text(rw, json.dumps(table), keep_mode=True)  # DVC's own compact json.dump format
            removed += [f"rwlock entry of PID {h.pid} ({h.cmd})" for h in again.stale]
    return removed
