"""Params overrides for one run: parse ``--set KEY=VALUE``, validate with the schema, apply and undo.

A run's overrides are written into ``params.yaml`` (comments kept) only after the
schema accepted them; the previous text waits in ``.kdpipe/`` until the run puts it
back, so a run killed in between is undone by the next one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.base import ConfigError
from pipeline.engine.atomic import atomic_write_text
from pipeline.params import parse_params


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}`` (nested dicts and dotted keys both work)."""
    flat: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=2", "c=[x, y]"]`` from the command line -> ``{"a.b": 2, "c": ["x", "y"]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.kd.temperature=2")
        out[key.strip().lstrip("+")] = yaml.safe_load(value) if value.strip() else None
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section (got {nxt!r})")
        node = nxt
    node[parts[-1]] = value


def merged_params(params_file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The params of ``params_file`` with ``overrides`` applied, validated by the schema (ConfigError)."""
    from pipeline.params import load_params

    load_params(params_file)  # the file itself must be valid first
    data = yaml.safe_load(params_file.read_text()) or {}
    for key, value in flatten(overrides).items():
        _set_path(data, key, value)
    parse_params(data, source=f"{params_file.name} with overrides {', '.join(flatten(overrides)) or '(none)'}")
    return data


def apply_params(params_file: Path, overrides: Mapping[str, Any]) -> str:
    """Write ``overrides`` into ``params_file`` (comments kept) after the schema accepted them.

    Returns the file's previous text so the caller can put it back. Nothing is written
    when validation fails.
    """
    from ruamel.yaml import YAML

    before = params_file.read_text()
    merged_params(params_file, overrides)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(before)
    for key, value in flatten(overrides).items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(params_file, buf.getvalue(), keep_mode=True)
    return before


PARAMS_BACKUP = Path(".kdpipe") / "params.before-run.yaml"


def apply_run_params(root: Path, overrides: Mapping[str, Any]) -> None:
    """Apply a run's overrides to ``params.yaml``, keeping the previous text in ``.kdpipe/`` until
    :func:`restore_run_params` puts it back (so a run killed in between is undone by the next one)."""
    params_file = root / "params.yaml"
    merged_params(params_file, overrides)  # validate before keeping anything
    backup = root / PARAMS_BACKUP
    backup.parent.mkdir(parents=True, exist_ok=True)
    restore_text(backup, params_file.read_text())
    apply_params(params_file, overrides)


def restore_run_params(root: Path) -> bool:
    """Put back the ``params.yaml`` a run changed (also one a killed run left); returns whether it did."""
    backup = root / PARAMS_BACKUP
    if not backup.is_file():
        return False
    restore_text(root / "params.yaml", backup.read_text())
    backup.unlink()
    return True


def restore_text(path: Path, text: str) -> None:
    """Put a file's earlier text back atomically."""
    atomic_write_text(path, text, keep_mode=True)
