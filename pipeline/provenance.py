"""What produced an output: code version, git revision, params hash, library versions, device.

:func:`provenance` builds one small dict that the stages write into their outputs
(``runs/<run>/model.pt`` and ``train.json``, ``metrics/<run>.json``, the ONNX
metadata, ``reports/*.json``, each bundle's ``bundle.json``) and that the report shows.

Reproducibility comes first: DVC caches outs and compares them by hash, and the same
params must give the same bytes. So nothing here depends on the clock or the host,
and the git facts are optional (``git=False``): files whose bytes must depend only on
params, code and libraries (model weights files, ONNX models) leave them out, while
records (``train.json``, metrics, reports, bundle manifests) carry them. Two runs of
the same checkout get the same revision, so their records are identical too.

Cheap on purpose: versions come from installed package metadata
(:mod:`importlib.metadata`), so asking for onnxruntime's version never imports it.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import __version__

#: Files the pipeline itself rewrites while it runs (DVC's lock file, params that
#: ``dvc exp run -S`` edits and ``params_sha256`` records, ignore files DVC appends
#: outs to); a change to them alone does not mark the tree dirty.
PIPELINE_STATE_FILES = ("dvc.lock", "params.yaml", ".gitignore")

GIT_TIMEOUT_S = 10.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    """Stdout of ``git -C root args`` (stripped), or None when git or the repository is missing."""
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(root: str | Path = ".") -> tuple[str | None, bool | None]:
    """``(revision, dirty)`` of the git checkout holding ``root``; ``(None, None)`` outside one.

    ``dirty`` is True when tracked files differ from the revision, not counting
    :data:`PIPELINE_STATE_FILES`; untracked files (outs, caches) are not counted either.
    """
    root = Path(root)
    revision = _git(root, "rev-parse", "--verify", "HEAD")
    if not revision:
        return None, None
    excludes = [f":(exclude,glob)**/{name}" for name in PIPELINE_STATE_FILES]
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes)
    return revision, None if status is None else bool(status)


def device_label(device: Any) -> str:
    """``cpu``, or ``cuda:0 (<GPU name>)`` for a CUDA ``torch.device`` (torch is only touched for CUDA)."""
    kind = getattr(device, "type", str(device))
    if kind != "cuda":
        return str(kind)
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"


def provenance(
    params_sha256: str | None = None,
    *,
    device: str = "cpu",
    packages: Iterable[str] = ("torch",),
    git: bool = True,
    root: str | Path = ".",
) -> dict[str, Any]:
    """What produced an output, as a flat JSON-able dict.

    Keys: ``kdpipe`` (package version), ``python``, one key per name in ``packages``
    (installed version, None if absent), ``device``, ``params_sha256`` (the hash of
    the resolved params the output depends on) and, with ``git``, ``git_revision``
    and ``git_dirty`` of the checkout holding ``root`` (None outside a git checkout).
    """
    out: dict[str, Any] = {"kdpipe": __version__, "python": platform.python_version()}
    for name in packages:
        out[name] = _version(name)
    out["device"] = device
    out["params_sha256"] = params_sha256
    if git:
        out["git_revision"], out["git_dirty"] = git_state(root)
    return out
