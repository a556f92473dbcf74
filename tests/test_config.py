"""Params validation: every bad value fails before any work, naming key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.base import ConfigError
from pipeline.params import load_params, parse_params
from tests.conftest import REPO, tiny_params, write_params


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if v is None or (isinstance(v, dict) and all(x is None for x in v.values())):
            continue  # optional knobs left unset need not be spelled out
        out.add(prefix + str(k))
        if isinstance(v, dict) and not (prefix == "" and k == "students"):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_repository_params_are_valid_and_complete():
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    p = load_params(REPO / "params.yaml")
    assert p.data.name == "digits"
    assert p.students and p.distill.methods
    # DVC tracks params by key: every key of the schema must be spelled out in the file
    missing = _keys(p.model_dump(mode="json")) - _keys(raw)
    assert not missing, f"params.yaml lacks keys DVC needs to track: {sorted(missing)}"


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_params(data, source="params.yaml")
    return str(exc.value)


def test_unknown_top_level_key_lists_allowed_keys():
    msg = _error({**tiny_params(), "trian": {}})
    assert "trian: unknown key" in msg
    assert "train" in msg and "students" in msg


def test_unknown_nested_key_is_named_with_its_path():
    p = tiny_params()
    p["train"]["optimizer"] = {"lrr": 0.1}
    msg = _error(p)
    assert "train.optimizer.lrr: unknown key" in msg
    assert "lr" in msg and "momentum" in msg


@pytest.mark.parametrize(
    ("section", "body", "key", "value"),
    [
        ("train", {"optimizer": {"lr": -0.1}}, "train.optimizer.lr", "-0.1"),
        ("data", {"label_noise": 1.5}, "data.label_noise", "1.5"),
        ("data", {"name": "imagenet"}, "data.name", "imagenet"),
        ("train", {"epochs": "many"}, "train.epochs", "many"),
        ("teacher", {"model": "resnet9000"}, "teacher.model", "resnet9000"),
        ("distill", {"methods": ["kd", "magic"]}, "distill.methods", "magic"),
        ("distill", {"kd": {"temperature": 0}}, "distill.kd.temperature", "0"),
    ],
)
def test_bad_values_name_key_value_and_allowed(section, body, key, value):
    msg = _error(tiny_params(**{section: body}))
    assert key in msg
    assert value in msg


def test_unknown_model_message_lists_allowed_names():
    msg = _error(tiny_params(teacher={"model": "resnet9000"}))
    assert "resnet8x4" in msg and "tinynet_s" in msg


def test_unknown_student_name_is_rejected():
    msg = _error(tiny_params(students={"not_a_net": {}}))
    assert "students" in msg and "not_a_net" in msg


def test_student_override_is_applied_and_validated():
    p = parse_params(tiny_params(students={"tinynet_s": {"train": {"epochs": 5, "lr": 0.2}}}))
    cfg = p.student_train("tinynet_s")
    assert cfg.epochs == 5 and cfg.optimizer.lr == 0.2
    assert p.teacher_train().epochs == 2
    msg = _error(tiny_params(students={"tinynet_s": {"train": {"epochs": 0}}}))
    assert "students.tinynet_s.train.epochs" in msg


def test_schedule_must_fit_the_epochs():
    msg = _error(tiny_params(train={"epochs": 10, "schedule": {"name": "multistep", "milestones": [5, 12]}}))
    assert "milestones" in msg and "10" in msg


def test_not_yaml_names_file_and_line(tmp_path: Path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 0\ntrain: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_params(f)
    assert str(f) in str(exc.value) and "line" in str(exc.value)


def test_params_that_are_not_a_mapping(tmp_path: Path):
    f = tmp_path / "params.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(f)


def test_stage_with_bad_params_fails_before_any_work(tmp_path: Path):
    write_params(tmp_path / "params.yaml", tiny_params(train={"optimizer": {"lr": -1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train_teacher"], cwd=tmp_path, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert "train.optimizer.lr" in proc.stderr and "-1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
