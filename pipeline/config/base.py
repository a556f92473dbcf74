"""What every params schema shares: the strict base model and errors that say what is wrong and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message names the key and what is allowed."""

class Strict(BaseModel):
    """Base of every params section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_method_list(methods: list[str], allowed: tuple[str, ...], kind: str) -> list[str]:
    """A ``methods:`` list: known names, none twice."""
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ValueError(f"unknown {kind}(s) {bad}; allowed: {', '.join(allowed)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods listed twice: {methods}")
    return methods


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """Walk the schema along an error location to list the keys allowed at its parent."""
    node: Any = model
    for part in loc[:-1]:
        if node is None:
            return None
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return None
            node = field.annotation
        else:  # dict[str, X]: the key is free, the value is X
            args = getattr(node, "__args__", ())
            node = args[-1] if args else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return None

def problem_line(key: str, e: dict[str, Any], suffix: str = "") -> str:
    """One indented line for one pydantic error: the key, what is wrong and the value given."""
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = "" if isinstance(value, dict) or f"got {value}" in msg else f" (got {value!r})"
    return f"  {key}: {msg}{shown}{suffix}"

def error_message(source: str, problems: list[str]) -> str:
    """One line for a single problem, else a heading and one indented line per problem."""
    if len(problems) == 1:
        return f"invalid params in {source}: {problems[0].strip()}"
    return "\n".join([f"invalid params in {source}:", *problems])


def format_validation_error(err: ValidationError, source: str, schema: type[BaseModel]) -> str:
    """The dotted key, what is wrong, the value given, what is allowed, for every problem (keys as in ``schema``)."""
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            problems.append(f"  {key}: unknown key{hint}")
            continue
        problems.append(problem_line(key, e))
    return error_message(source, problems)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of a params file; a ConfigError naming the file and where it is broken."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p.resolve()}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif getattr(err, "position", None) is not None:  # a reader error: a character YAML does not allow
            where = f" at character {err.position + 1}"
        else:
            where = ""
        problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or ["unreadable"])[0]
        raise ConfigError(f"{p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p} is not UTF-8 text: {err}") from None
