"""Atomic file and folder writes: a killed process never leaves a half-written artifact.

Also the pipeline's one file hash (:func:`file_sha256`) and JSON hash (:func:`sha256_json`),
which the artifacts written here are recorded and checked by.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.kdtmp-{os.getpid()}-"


def _clear_orphans(path: Path) -> None:
    """Remove temp siblings of ``path`` left by writers that were killed (their PID is gone).

    Temp names carry the writer's PID; ``.dvcignore`` hides them from DVC's hashes meanwhile.
    """
    marker = f".{path.name}.kdtmp-"
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if not entry.name.startswith(marker):
                continue
            pid = entry.name[len(marker):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if entry.name.endswith("-old") and not path.exists():
                os.replace(entry, path)  # killed mid-swap: the previous folder is the good one
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], Any], *, keep_mode: bool = False) -> Path:
    """Write a file through ``writer(fileobj)`` into a temp file beside it, then rename.

    On any error (ENOSPC included) the temp file is removed and the previous file at
    ``path``, if any, is left as it was. The new file is private to its owner (0600, as
    mkstemp makes it) unless ``keep_mode`` gives it the permission bits of the file it
    replaces (for files people or DVC own, such as ``params.yaml`` and DVC's ``rwlock``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_orphans(path)
    mode = None
    if keep_mode:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(path.stat().st_mode)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, *, keep_mode: bool = False) -> Path:
    """Atomically write UTF-8 text (``keep_mode`` as for :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), keep_mode=keep_mode)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write JSON (sorted keys, trailing newline) for stable diffs."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks: the pipeline's one file hash.

    SHA-256 records and checks artifacts; ``md5`` is what DVC files its objects under
    (:mod:`pipeline.run_state` compares with it). ``pipeline/deploy/edge/edge_runtime.py``
    keeps a copy of the SHA-256 case, because that file runs on the device without kdpipe;
    both give the standard SHA-256, so the hashes a bundle's manifest records here are the
    ones the device checks.
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (:func:`file_digest`)."""
    return file_digest(path, "sha256")


def sha256_json(obj: Any) -> str:
    """SHA-256 of a JSON-able value, keys sorted (stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temp sibling and swap it into place only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{_temp_prefix(path)}old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
