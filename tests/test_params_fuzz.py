"""Property-based fuzzing of the params schema: every invalid config is a ConfigError naming its key.

Each example starts from the valid default params (every key spelled out, as
params.yaml holds them) and breaks one thing, found by walking the schema itself
(:mod:`pipeline.config`) alongside the values: a value of the wrong type, a number or
length out of its range, ``null`` where the key is not optional, an unknown key at any
depth (deep inside a method's section such as ``distill.dkd`` too), a bad element in a
list. The schema must answer with :class:`~pipeline.config.ConfigError` whose message
names the dotted key path (or the section whose check failed), never with another
exception from deeper code. Some examples also go through the entry points a user
hits: ``kdpipe check`` and a stage's ``run_stage``, which must exit with status 2 and
a message without a traceback, before any stage work starts.
"""

from __future__ import annotations

import copy
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline.cli import main as kdpipe
from pipeline.config.base import ConfigError
from pipeline.params import Params, parse_params

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENTRY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEFAULTS: dict[str, Any] = Params().model_dump(mode="json")
KEY_ALPHABET = st.characters(min_codepoint=48, max_codepoint=122).filter(str.isalnum) | st.just("_")


@dataclass(frozen=True)
class Node:
    """One place in the params: its path, its (unwrapped) annotation, constraints, and whether null is allowed."""

    path: tuple[str | int, ...]
    annotation: Any
    constraints: tuple[Any, ...]
    nullable: bool

    @property
    def dotted(self) -> str:
        return ".".join(str(p) for p in self.path)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _walk(annotation: Any, value: Any, path: tuple, constraints: tuple, nullable: bool) -> list[Node]:
    base, optional = _unwrap(annotation)
    nodes = [Node(path, base, constraints, nullable or optional)]
    if value is None:
        return nodes
    if _is_model(base):
        for name, field in base.model_fields.items():
            nodes += _walk(field.annotation, value[name], (*path, name), tuple(field.metadata), False)
    elif get_origin(base) is dict:  # students: the key is a model name, the body may be null (= defaults)
        for key, item in value.items():
            nodes += _walk(get_args(base)[1], item, (*path, key), (), True)
    elif get_origin(base) is list:
        for i, item in enumerate(value):
            nodes += _walk(get_args(base)[0], item, (*path, i), (), False)
    return nodes


NODES: list[Node] = _walk(Params, DEFAULTS, (), (), False)[1:]
SECTIONS = [n for n in [Node((), Params, (), False)] + NODES if _is_model(n.annotation)]
LISTS = [n for n in NODES if get_origin(n.annotation) is list]
NUMBERS = [n for n in NODES if n.annotation in (int, float) and any(
    isinstance(c, (at.Gt, at.Ge, at.Lt, at.Le)) for c in n.constraints)]
SIZED = [n for n in NODES if any(isinstance(c, (at.MinLen, at.MaxLen)) for c in n.constraints)]
NOT_NULLABLE = [n for n in NODES if not n.nullable]


def wrong_values(annotation: Any) -> st.SearchStrategy:
    """Values no lax pydantic coercion turns into ``annotation``."""
    junk_dict = st.just({"unexpected": 1})
    if annotation is bool:
        return st.sampled_from(["maybe", 2, -1, [True]]) | junk_dict
    if annotation is int:
        return st.sampled_from(["twelve", "1.5", 2.5, [1]]) | junk_dict | st.floats(0.1, 0.9)
    if annotation is float:
        return st.sampled_from(["fast", "1,5", [0.5]]) | junk_dict | st.text(alphabet="xyz", min_size=1)
    if annotation is str:
        return st.sampled_from([12, 3.5, True, ["a"]]) | junk_dict
    if get_origin(annotation) is Literal:
        return st.sampled_from(["not-an-option", 3, ["x"]]) | junk_dict
    if get_origin(annotation) in (list, dict) or _is_model(annotation):
        return st.sampled_from([7, "text", 2.5, True]) | (junk_dict if get_origin(annotation) is list else st.just(7))
    raise AssertionError(f"no wrong values for {annotation}")


def out_of_range(node: Node) -> st.SearchStrategy:
    """Numbers just or far beyond a bound; strings and lists shorter or longer than allowed."""
    options = []
    for c in node.constraints:
        step = 1 if node.annotation is int else 1e-6
        if isinstance(c, at.Gt):
            options += [c.gt, c.gt - step, c.gt - 1000]
        elif isinstance(c, at.Ge):
            options += [c.ge - step, c.ge - 1000]
        elif isinstance(c, at.Lt):
            options += [c.lt, c.lt + step, c.lt * 1000 + 1000]
        elif isinstance(c, at.Le):
            options += [c.le + step, c.le * 1000 + 1000]
        elif isinstance(c, at.MinLen) and c.min_length > 0:
            options += ["" if node.annotation is str else []]
        elif isinstance(c, at.MaxLen):
            options += ["a" * (c.max_length + 1)]
    return st.sampled_from([int(v) if node.annotation is int else v for v in options])


def bad_element(annotation: Any) -> st.SearchStrategy:
    """An element a list of ``annotation`` must refuse."""
    if annotation is str:  # method names, providers
        return st.sampled_from([7, None, ["nested"]]) | st.just({"unexpected": 1})
    if get_origin(annotation) is Literal:
        return st.sampled_from(["int4", "FP32", 8, None])
    if annotation is int:  # milestones, batch sizes: positive integers
        return st.sampled_from(["two", 2.5, None, 0, -3])
    if _is_model(annotation):  # device profiles
        return st.sampled_from([5, "edge", None, {"bogus": 1}, {"name": "no spaces allowed"}])
    raise AssertionError(f"no bad elements for {annotation}")


def set_at(data: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(data)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def get_at(data: dict, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


@st.composite
def broken_params(draw) -> tuple[dict, tuple]:
    """A copy of the defaults with one thing broken, and the path of what was broken."""
    kind = draw(st.sampled_from(["wrong_type", "out_of_range", "null", "unknown_key", "bad_element"]))
    event(kind)
    if kind == "wrong_type":
        node = draw(st.sampled_from(NODES))
        return set_at(DEFAULTS, node.path, draw(wrong_values(node.annotation))), node.path
    if kind == "out_of_range":
        node = draw(st.sampled_from(NUMBERS + SIZED))
        return set_at(DEFAULTS, node.path, draw(out_of_range(node))), node.path
    if kind == "null":
        node = draw(st.sampled_from(NOT_NULLABLE))
        return set_at(DEFAULTS, node.path, None), node.path
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS))
        allowed = set(section.annotation.model_fields)
        key = draw(st.text(KEY_ALPHABET, min_size=1, max_size=12).filter(lambda k: k not in allowed)
                   | st.integers(-5, 5))
        body = get_at(DEFAULTS, section.path)
        changed = {**copy.deepcopy(body), key: draw(st.sampled_from([1, "x", None, {"deep": True}]))}
        return (set_at(DEFAULTS, section.path, changed) if section.path else changed), (*section.path, key)
    node = draw(st.sampled_from(LISTS))
    items = list(get_at(DEFAULTS, node.path) or [])  # a list left null (teacher.train.milestones) starts empty
    where = draw(st.integers(0, len(items)))
    items.insert(where, draw(bad_element(get_args(node.annotation)[0])))
    return set_at(DEFAULTS, node.path, items), (*node.path, where)


def assert_names_the_key(message: str, path: tuple, source: str) -> None:
    """The message is the schema's and names the broken key: its path or a key below it (a field of a
    broken list element), or the list or section whose own check failed."""
    assert message.startswith(f"invalid params in {source}"), message
    assert "Traceback" not in message
    full = ".".join(str(p) for p in path)
    text = " " + " ".join(message.split())
    below = re.search(rf" {re.escape(full)}(\.\S+)?: ", text)
    above = [a for a in (".".join(str(p) for p in path[:i]) for i in range(1, len(path))) if f" {a}: " in text]
    assert below or above, f"{full} is not named in:\n{message}"


# --------------------------------------------------------------------------- the schema itself


def test_the_walk_covers_the_schema():
    dotted = {n.dotted for n in NODES}
    for key in ("distill.dkd.beta", "distill.reviewkd.warmup_epochs", "online.okddip.num_peers", "train.optimizer.lr",
                "students.tinynet_s.train.epochs", "benchmark.profiles.0.batch_sizes.0", "bundle.variants.2"):
        assert key in dotted, key
    assert len(SECTIONS) > 25 and len(LISTS) >= 8 and len(NUMBERS) > 80
    assert parse_params(copy.deepcopy(DEFAULTS)) == Params()


@FUZZ
@given(broken_params())
def test_every_broken_config_is_a_config_error_naming_the_key(case):
    data, path = case
    with pytest.raises(ConfigError) as exc:
        parse_params(copy.deepcopy(data), source="params.yaml")
    assert_names_the_key(str(exc.value), path, "params.yaml")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@FUZZ
@given(st.sampled_from([Node((), Params, (), False)] + NODES), JSON)
def test_any_value_anywhere_is_accepted_or_a_config_error(node, value):
    """Arbitrary YAML-like data at any place: the schema accepts it or says why, never crashes deeper."""
    data = set_at(DEFAULTS, node.path, value) if node.path else value
    try:
        parse_params(copy.deepcopy(data), source="params.yaml")
    except ConfigError as err:
        assert str(err).startswith(("invalid params in params.yaml", "params.yaml must be a YAML mapping"))


# --------------------------------------------------------------------------- the entry points


@ENTRY
@given(broken_params())
def test_kdpipe_check_exits_2_with_the_message(case):
    data, path = case
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "params.yaml"
        f.write_text(yaml.safe_dump(data, sort_keys=False))
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = kdpipe(["check", str(f)])
    assert code == 2
    message = err.getvalue().strip()
    assert_names_the_key(message, path, str(f))
    lines = message.splitlines()
    assert len(lines) == 1 or (lines[0].endswith(":") and all(ln.startswith("  ") for ln in lines[1:])), message


@ENTRY
@given(broken_params())
def test_a_stage_refuses_a_broken_config_before_any_work(case):
    import contextlib
    import io
    import os

    from stages._common import run_stage

    data, path = case
    ran = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        err = io.StringIO()
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
                run_stage("train_teacher", ran.append)
        finally:
            os.chdir(cwd)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["params.yaml"]
    assert exc.value.code == 2 and not ran
    message = err.getvalue().strip()
    assert message.startswith("train_teacher: error: ")
    assert_names_the_key(message.removeprefix("train_teacher: error: "), path, "params.yaml")
