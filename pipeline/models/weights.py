"""Local pretrained weight files: reading them safely and fitting them onto a network.

A weights file is data, never code: ``.safetensors`` files are read with
safetensors, anything else with ``torch.load(weights_only=True)``. Nothing is ever
downloaded. Every failure is a :class:`WeightsError` of one line that names the
file and what does not fit (missing, unexpected or mis-shaped keys).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.errors import UserError

#: keys under which training scripts commonly nest the state dict of a checkpoint
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")


class WeightsError(UserError, ValueError):
    """A weights file that is missing, unreadable or does not fit the network; one line naming the path."""


def _keys_line(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"{len(keys)} {what} ({shown})"


def read_state_file(path: str | Path, name: str) -> dict[str, Tensor]:
    """The state dict (names -> tensors) held by a local weights file, for model ``name``.

    A checkpoint that nests its state dict under ``state_dict``, ``model`` or
    ``model_state_dict`` is unwrapped; a ``module.`` prefix (DataParallel) is dropped.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file for {name!r} not found (or not a file): {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated, or not a tensor-only file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"cannot read weights file {p} for {name!r}: {first}") from None
    if isinstance(state, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(
            f"weights file {p} for {name!r} does not hold a state_dict (a mapping of names to tensors); "
            f"got {type(state).__name__}"
        )
    out = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def fit_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    path: str | Path,
    name: str,
    *,
    new: Callable[[str], bool] = lambda key: False,
    adapt: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> frozenset[str]:
    """Load ``state`` into ``model``; return the keys taken from the file.

    ``new(key)`` marks entries the model keeps as built (a new classifier for another
    class count): they may be absent from the file or differ in shape. ``adapt`` maps
    a key to a function turning the file's tensor into the model's (a first
    convolution for another number of input channels). Any other missing, unexpected
    or mis-shaped key is an error that names the file and the keys.
    """
    adapt = dict(adapt or {})
    own = model.state_dict()
    missing = [k for k in own if k not in state and not new(k)]
    unexpected = [k for k in state if k not in own and not new(k)]
    loaded: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in own or new(key):
            continue
        if key in adapt:
            value = adapt[key](value)
        if tuple(value.shape) != tuple(own[key].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            continue
        loaded[key] = value
    problems = [_keys_line(missing, "missing keys")] if missing else []
    problems += [_keys_line(unexpected, "unexpected keys")] if unexpected else []
    problems += [_keys_line(mismatched, "keys of another shape (file vs model)")] if mismatched else []
    if problems:
        raise WeightsError(f"weights file {Path(path)} does not fit {name!r}: {'; '.join(problems)}")
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return frozenset(loaded)
