"""Where training runs keep their resume state, and when a finished run's state may go.

A run trains in ``.kdpipe/state/<run>/`` (ignored by git and DVC): resume checkpoint,
route checkpoints, DVCLive logs; see :mod:`pipeline.engine.loop`. When the run has
written its outs, its state is *kept*, marked finished, because the stage is not done
yet: DVC still has to hash the outs, cache them and write ``dvc.lock``. A kill in that
window makes the next ``dvc repro`` run the stage again, and the kept state (same
fingerprint, every epoch done) lets it write the same outs again without training.

A finished state is pruned once DVC has recorded exactly those outs: ``dvc.lock`` holds
an out entry for each of the run's out folders whose hash is the hash of the folder as
it is now. Every stage prunes at its start (:func:`prune_recorded`), so after a whole
``dvc repro`` no finished state is left but that of a stage DVC did not record.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from pipeline.engine.atomic import atomic_write_json, file_digest

STATE_ROOT = Path(".kdpipe") / "state"
#: Marker of a finished run's state folder: the out folders (relative to the workspace) it wrote.
FINISHED = "finished.json"
#: Temp siblings of atomic writes, which ``.dvcignore`` hides from DVC's hashes.
_TEMP_MARK = ".kdtmp-"


def clear_finished(state_dir: Path) -> None:
    """A run is starting in ``state_dir``: its state is no longer prunable (its outs are being replaced)."""
    (state_dir / FINISHED).unlink(missing_ok=True)


def mark_finished(state_dir: Path, outs: list[Path], root: Path) -> None:
    """Record that the run in ``state_dir`` has written ``outs`` (folders under ``root``)."""
    atomic_write_json(state_dir / FINISHED, {"outs": sorted(p.relative_to(root).as_posix() for p in outs)})


def dvc_dir_hash(folder: Path) -> str:
    """The hash ``dvc.lock`` records for an out folder (``<md5>.dir``), computed as DVC 3 computes it.

    DVC hashes the JSON listing of the folder's files (relative path and md5 of each,
    sorted by path); files ``.dvcignore`` hides (temp siblings of atomic writes) are left
    out. ``tests/test_run_state.py`` checks this against real DVC runs.
    """
    listing = [{"md5": file_digest(f, "md5"), "relpath": f.relative_to(folder).as_posix()}
               for f in sorted(folder.rglob("*"))
               if f.is_file() and not any(part.startswith(".") and _TEMP_MARK in part for part in f.relative_to(folder).parts)]
    listing.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"  # noqa: S324


def _recorded_outs(root: Path) -> dict[str, set[str]]:
    """Out path -> the hashes ``dvc.lock`` records for it (any stage); empty when there is no readable lock."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    found: dict[str, set[str]] = {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    for entry in (stages or {}).values():
        for out in (entry or {}).get("outs") or []:
            if isinstance(out, dict) and "path" in out and "md5" in out:
                found.setdefault(str(out["path"]), set()).add(str(out["md5"]))
    return found


def finished_states(root: Path) -> list[Path]:
    """State folders of runs that finished (their outs written) and are kept until DVC records them."""
    base = root / STATE_ROOT
    return sorted(marker.parent for marker in base.glob(f"**/{FINISHED}")) if base.is_dir() else []


def prune_recorded(root: Path = Path(".")) -> list[str]:
    """Remove the finished states whose outs ``dvc.lock`` records as they are now; returns the runs removed.

    Anything unreadable or different keeps the state: keeping costs disk space, removing
    too early costs a retraining.
    """
    states = finished_states(root)
    if not states:
        return []
    recorded = _recorded_outs(root)
    removed = []
    for state in states:
        try:
            outs = json.loads((state / FINISHED).read_text(encoding="utf-8"))["outs"]
            done = bool(outs) and all((root / out).is_dir() and dvc_dir_hash(root / out) in recorded.get(out, ())
                                      for out in outs)
        except (OSError, ValueError, KeyError, TypeError):
            done = False
        if done:
            shutil.rmtree(state, ignore_errors=True)
            removed.append(state.relative_to(root / STATE_ROOT).as_posix())
    return removed
