"""Inspect DVC's locks in a workspace: who holds them, which are stale, what to do.

DVC guards a repository with two locks under ``.dvc/tmp``:

* ``lock``: the repository lock. By default an ``fcntl`` lock (zc.lockfile) that the
  kernel releases when its process dies, so a killed run cannot leave it held; with
  ``core.hardlink_lock`` (network file systems) it is a flufl hard-link lock that
  DVC keeps "for good" (a 365-day lifetime), so a killed run leaves it behind.
* ``rwlock``: a JSON table of the outs each running command reads or writes, keyed
  by PID. DVC clears entries of dead PIDs by itself, but an entry whose PID now
  belongs to another (non-DVC) process blocks every later run.

:func:`inspect_locks` classifies both; :func:`clear_stale` removes only what no live
DVC process holds, and refuses to touch anything while the repository lock is held.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil


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

    @property
    def live(self) -> list[LockHolder]:
        return [h for h in self.rwlock if h.live_dvc]

    @property
    def stale(self) -> list[LockHolder]:
        return [h for h in self.rwlock if not h.live_dvc]

    @property
    def busy(self) -> bool:
        return self.repo_lock_held or bool(self.live)

    @property
    def has_stale(self) -> bool:
        return bool(self.stale) or self.hardlink_lock_stale or self.rwlock_corrupt

    def explain(self) -> str:
        """A human explanation: what holds what and the command that fixes it."""
        tmp = self.root / ".dvc" / "tmp"
        lines: list[str] = []
        if self.repo_lock_held:
            who = f"PID {self.repo_lock_pid}" if self.repo_lock_pid else "another process"
            lines.append(f"the DVC repository lock {tmp / 'lock'} is held by {who}: a DVC command is running "
                         "in this workspace; wait for it to finish")
        for h in self.live:
            lines.append(f"live DVC process PID {h.pid} ({h.cmd}) holds {', '.join(h.paths)}; wait for it to finish")
        for h in self.stale:
            why = "no longer exists" if not h.alive else "now belongs to another program"
            lines.append(f"stale entry in {tmp / 'rwlock'}: PID {h.pid} ({h.cmd}) {why}; "
                         f"it holds {', '.join(h.paths)}")
        if self.rwlock_corrupt:
            lines.append(f"{tmp / 'rwlock'} is not valid JSON (a run was killed while writing it)")
        if self.hardlink_lock_stale:
            lines.append(f"hard-link repository lock {tmp / 'lock'} was left by a killed run (core.hardlink_lock)")
        if self.has_stale:
            if self.busy:
                lines.append("stale locks are left alone while a DVC process is live; run `kdpipe unlock` after it ends")
            else:
                lines.append("no DVC process is running here: `kdpipe unlock` removes the stale entries "
                             "(it never removes a lock a live DVC process holds)")
        return "\n".join(lines) if lines else "no DVC locks held"


def _is_dvc_process(pid: int) -> tuple[bool, bool]:
    """(alive, looks like DVC) for a PID; zombies count as dead."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, False
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False, False
    except psutil.AccessDenied:
        return True, True  # cannot tell: treat as a live DVC process (never delete its lock)
    return True, "dvc" in cmdline.lower()


def _probe_repo_lock(lock: Path) -> tuple[bool, int | None]:
    """Whether the fcntl repository lock is held right now (probe without blocking), and by which PID."""
    if not lock.exists():
        return False, None
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False, None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                text = lock.read_text(errors="replace").strip().split()
                pid = int(text[0]) if text and text[0].isdigit() else None
                return True, pid
            raise
        fcntl.lockf(fd, fcntl.LOCK_UN, 1)
        return False, None
    finally:
        os.close(fd)


def _hardlink_mode(root: Path) -> bool:
    cfg = root / ".dvc" / "config"
    if not cfg.is_file():
        return False
    text = cfg.read_text().replace(" ", "").lower()
    return "hardlink_lock=true" in text


def inspect_locks(root: Path | str = ".") -> LockReport:
    """Classify every lock of the DVC workspace at ``root`` (nothing is changed)."""
    root = Path(root).resolve()
    tmp = root / ".dvc" / "tmp"
    report = LockReport(root=root)
    lock = tmp / "lock"
    if _hardlink_mode(root):
        if lock.exists():
            # flufl writes "<hostname>.<pid>..." claim names into the lock file
            text = lock.read_text(errors="replace")
            pids = [int(p) for p in text.replace("|", ".").split(".") if p.isdigit()]
            alive = any(_is_dvc_process(p)[0] for p in pids)
            report.repo_lock_held = alive
            report.repo_lock_pid = pids[0] if pids else None
            report.hardlink_lock_stale = not alive
    else:
        report.repo_lock_held, report.repo_lock_pid = _probe_repo_lock(lock)

    rw = tmp / "rwlock"
    if rw.is_file():
        try:
            table = json.loads(rw.read_text() or "{}")
        except ValueError:
            report.rwlock_corrupt = True
            table = {}
        by_pid: dict[int, LockHolder] = {}
        for mode in ("read", "write"):
            for path, infos in (table.get(mode) or {}).items():
                for info in infos if isinstance(infos, list) else [infos]:
                    pid = int(info.get("pid", -1))
                    if pid not in by_pid:
                        alive, is_dvc = _is_dvc_process(pid) if pid > 0 else (False, False)
                        by_pid[pid] = LockHolder(pid=pid, cmd=str(info.get("cmd", "?")), alive=alive, is_dvc=is_dvc)
                    by_pid[pid].paths.append(f"{path} ({mode})")
        report.rwlock = list(by_pid.values())
    return report


def ensure_unlocked(root: Path | str = ".") -> LockReport:
    """Raise :class:`LockBusyError` or :class:`StaleLockError` (with the explanation) unless the workspace is free."""
    report = inspect_locks(root)
    if report.busy:
        raise LockBusyError(report.explain())
    if report.has_stale:
        raise StaleLockError(report.explain())
    return report


def clear_stale(root: Path | str = ".") -> list[str]:
    """Remove stale lock entries; refuses (LockBusyError) while any live DVC process holds the workspace.

    The repository lock is taken for the duration, so no DVC command can start meanwhile.
    Returns a description of each thing removed.
    """
    root = Path(root).resolve()
    report = inspect_locks(root)
    if report.busy:
        raise LockBusyError(report.explain())
    from dvc.lock import make_lock

    tmp = root / ".dvc" / "tmp"
    removed: list[str] = []
    if report.hardlink_lock_stale:
        (tmp / "lock").unlink(missing_ok=True)
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
            table = json.loads(rw.read_text() or "{}")
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
            tmp_file = rw.with_suffix(".kdpipe-tmp")
            tmp_file.write_text(json.dumps(table))
            os.replace(tmp_file, rw)
            removed += [f"rwlock entry of PID {h.pid} ({h.cmd})" for h in again.stale]
    return removed
