"""Checkpoints as data: atomic writes, ``weights_only`` loads, errors that name the file.

Two kinds of file exist. A *train state* (``last.pt``) holds everything needed to
resume a run exactly: the trainable weights, optimizer, scheduler, AMP scaler,
epoch, RNG states and the metric history. A *model file* (``model.pt``) holds one
deployable network: its registry name, the data shape it was built for, and its
weights, so it can be rebuilt anywhere the package is installed.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.engine.atomic import atomic_write
from pipeline.errors import UserError

MODEL_FORMAT = "kdpipe-model/1"
STATE_FORMAT = "kdpipe-train-state/1"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through an atomic write (temp file + fsync + rename)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return atomic_write(path, lambda fh: fh.write(data))


def load_torch(path: str | Path, expect_format: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse anything that is not plain data."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    with p.open("rb") as fh:
        head = fh.read(2)
    if not head.startswith((b"PK", b"\x80")):  # torch's zip format, or a (legacy) pickle of protocol >= 2
        raise CheckpointError(f"cannot read checkpoint {p}: truncated or not a torch checkpoint "
                              f"(it starts with {head!r}, neither a zip archive nor a pickle)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "Unsupported" in ln]
        why = lines[0].split(". Please use")[0] if lines else str(err).splitlines()[0]
        raise CheckpointError(
            f"refusing to load {p}: it holds objects other than tensors and plain data "
            f"(a pickle payload could run code): {why}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: truncated or not a torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} is not a kdpipe checkpoint (top level is {type(obj).__name__}, not a dict)")
    if expect_format is not None and obj.get("format") != expect_format:
        raise CheckpointError(f"{p} is not a {expect_format} file (format={obj.get('format')!r})")
    return obj


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Strictly load a state dict, turning shape/key mismatches into an error naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path} does not fit {what}: {detail}") from None


def save_model_file(
    path: str | Path,
    model: nn.Module,
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write one deployable network with what is needed to rebuild it from the registry."""
    payload = {
        "format": MODEL_FORMAT,
        "arch": arch,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_torch(payload, path)


def load_model_file(
    path: str | Path,
    expect_arch: str | None = None,
    expect_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from a model file; errors name the file and the mismatch."""
    from pipeline.models import build

    obj = load_torch(path, MODEL_FORMAT)
    try:
        arch, classes = str(obj["arch"]), int(obj["num_classes"])
        in_ch, size, state = int(obj["in_channels"]), int(obj["image_size"]), obj["state_dict"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is missing model metadata ({err})") from None
    if expect_arch is not None and arch != expect_arch:
        raise CheckpointError(f"{path} holds a {arch} network, expected {expect_arch}")
    if expect_classes is not None and classes != expect_classes:
        raise CheckpointError(f"{path} holds a network for {classes} classes, expected {expect_classes}")
    model = build(arch, num_classes=classes, in_channels=in_ch, image_size=size)
    load_weights(model, state, path, f"{arch} ({classes} classes, {in_ch} input channels)")
    model.eval()
    info = {"arch": arch, "num_classes": classes, "in_channels": in_ch, "image_size": size, **obj.get("meta", {})}
    return model, info


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensor bytes: equal exactly when the weights are, whatever the file format."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
