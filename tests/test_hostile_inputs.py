"""Broken and hostile inputs stop a stage with one clear line naming the file or key, and touch nothing.

Every case runs through the entry point a user hits (``kdpipe check``, or a stage's
``run_stage`` exactly as ``python -m stages.<name>`` runs it, in the workspace as the
current folder) and checks three things: exit status 2, one line on stderr that names
the culprit (no traceback), and no file of the workspace written, changed or removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.cli import main as kdpipe
from pipeline.data import BadDatasetError, build_data
from pipeline.deploy.benchmark import benchmark_all
from pipeline.deploy.bundle import bundle_all
from pipeline.deploy.export import export_all
from pipeline.deploy.quantize import quantize_all
from pipeline.engine.checkpoint import save_model_file
from pipeline.models import build
from pipeline.params import parse_params
from pipeline.runs import RunId, evaluate, train
from stages._common import run_stage
from tests.conftest import tiny_params, write_params
from tests.test_data import write_folder


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails_cleanly(ws: Path, name: str, body: Callable, monkeypatch, capsys) -> str:
    """Run a stage body in ``ws`` as its stage module does; it must exit 2 with one line and touch nothing."""
    monkeypatch.chdir(ws)
    before = files(ws)
    with pytest.raises(SystemExit) as exc:
        run_stage(name, body)  # deployment errors are user errors too (pipeline.errors.UserError)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), err
    assert files(ws) == before, "a failing stage wrote, changed or removed files"
    return lines[0]


def workspace(root: Path, params: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", params)
    return root


def teach(params) -> None:
    train(params, RunId("teacher"))


# --------------------------------------------------------------------------- params.yaml


@pytest.mark.parametrize(("content", "needles"), [
    (b"seed: 0\ntrain: [unclosed\n", ["is not valid YAML at line 3"]),
    (b"train:\n\tepochs: 3\n", ["is not valid YAML at line 2", "'\\t'"]),
    (b"seed: 0\x00\n", ["is not valid YAML at character 8", "#x0000"]),
    (b"seed: !!python/object/apply:os.system ['echo pwned']\n", ["is not valid YAML", "python/object/apply"]),
    ("seed: café\n".encode("latin-1"), ["is not UTF-8 text"]),
    (b"- teacher\n- students\n", ["must be a YAML mapping of sections, got list"]),
    (b"42\n", ["must be a YAML mapping of sections, got int"]),
])
def test_params_that_are_not_usable_yaml_name_the_file(tmp_path, monkeypatch, capsys, content, needles):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_bytes(content)
    line = fails_cleanly(ws, "train_teacher", teach, monkeypatch, capsys)
    assert "params.yaml" in line and all(n in line for n in needles), line
    assert kdpipe(["check", str(ws / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(ws / "params.yaml") in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(("section", "key", "value", "needle"), [
    ("dkd", "beta", "eight", "distill.dkd.beta: Input should be a valid number"),
    ("dkd", "warmup_epochs", 2.5, "distill.dkd.warmup_epochs: Input should be a valid integer"),
    ("dkd", "betta", 8.0, "distill.dkd.betta: unknown key; allowed keys here: alpha, beta"),
    ("crd", "nce_m", 1.5, "distill.crd.nce_m: Input should be less than 1"),
    ("rco", "strategy", ["equal"], "distill.rco.strategy: Input should be 'equal' or 'greedy'"),
])
def test_wrong_value_deep_in_a_method_section_names_the_key(tmp_path, monkeypatch, capsys, section, key, value,
                                                             needle):
    params = tiny_params(distill={"methods": ["kd", section]})
    params["distill"][section] = {key: value}
    ws = workspace(tmp_path / "ws", params)
    body = lambda p: train(p, RunId("distill", "tinynet_s", section))  # noqa: E731 - as stages/distill.py
    line = fails_cleanly(ws, "distill", body, monkeypatch, capsys)
    assert "params.yaml" in line and needle in line, line
    assert repr(value) in line or "unknown key" in line


# --------------------------------------------------------------------------- checkpoints


def other_class_count(path: Path) -> None:
    """A valid model file, but for 10 classes where the data has 4."""
    save_model_file(path, build("tinynet_m", num_classes=10, in_channels=3, image_size=8), "tinynet_m", 10, 3, 8)


def truncated(path: Path) -> None:
    other_class_count(path)
    path.write_bytes(path.read_bytes()[:300])


def not_a_checkpoint(path: Path) -> None:
    path.write_text("model weights go here\n")


@pytest.mark.parametrize(("make", "needle"), [
    (other_class_count, "holds a network for 10 classes, expected 4"),
    (truncated, "truncated or not a torch checkpoint"),
    (not_a_checkpoint, "truncated or not a torch checkpoint"),
])
def test_a_broken_teacher_checkpoint_names_the_file_in_every_stage_that_loads_it(tmp_path, monkeypatch, capsys,
                                                                                  make, needle):
    ws = workspace(tmp_path / "ws", tiny_params())
    model = ws / "runs" / "teacher" / "model.pt"
    model.parent.mkdir(parents=True)
    make(model)
    stages = [
        ("evaluate", lambda p: evaluate(p, RunId("teacher"))),
        ("distill", lambda p: train(p, RunId("distill", "tinynet_s", "kd"))),
        ("export", export_all),
    ]
    for name, body in stages:
        line = fails_cleanly(ws, name, body, monkeypatch, capsys)
        assert "runs/teacher/model.pt" in line and needle in line, line
    assert not (ws / ".kdpipe").exists()  # no resume state started either


# --------------------------------------------------------------------------- ONNX files


def fake_exports(ws: Path, params) -> Path:
    """What the export stage leaves behind, except that the teacher's ONNX file is not ONNX."""
    from pipeline.deploy.artifacts import deployable_runs, variant_file

    models = {}
    for dep in deployable_runs(params):
        models[dep.key] = {"role": dep.role, "arch": dep.arch, "student": dep.student, "method": dep.method,
                           "bundle": dep.bundle_name}
        variant_file(ws, dep.key, "fp32").parent.mkdir(parents=True, exist_ok=True)
        variant_file(ws, dep.key, "fp32").write_bytes(b"this is not an ONNX model\n")
    (ws / "reports").mkdir()
    (ws / "reports/export.json").write_text(json.dumps({"models": models, "test_images": 48}))
    (ws / "reports/quantize.json").write_text(json.dumps({"models": {}}))
    (ws / "exports/tensorrt").mkdir(parents=True)
    (ws / "exports/tensorrt/status.json").write_text(json.dumps({"status": "skipped", "reason": "test"}))
    return variant_file(Path("."), "teacher", "fp32")


@pytest.mark.parametrize("stage", ["quantize", "bundle", "benchmark"])
def test_a_file_that_is_not_onnx_names_the_file_in_the_deploy_stages(tmp_path, monkeypatch, capsys, stage):
    raw = tiny_params(benchmark={"warmup": 1, "iterations": 5, "max_seconds": 0.05, "variants": ["fp32"],
                                 "torch_reference": False, "profiles": [{"name": "one", "threads": 1}]})
    ws = workspace(tmp_path / "ws", raw)
    bad = fake_exports(ws, parse_params(raw))
    body = {"quantize": quantize_all, "bundle": bundle_all, "benchmark": benchmark_all}[stage]
    line = fails_cleanly(ws, stage, body, monkeypatch, capsys)
    assert str(bad) in line and ("not an ONNX model" in line or "not a usable ONNX model" in line), line


def test_an_onnx_file_without_kdpipe_metadata_is_named(tmp_path, monkeypatch, capsys):
    import onnx

    raw = tiny_params()
    ws = workspace(tmp_path / "ws", raw)
    bad = fake_exports(ws, parse_params(raw))
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save_model(onnx.helper.make_model(graph), str(ws / bad))
    line = fails_cleanly(ws, "bundle", bundle_all, monkeypatch, capsys)
    assert str(bad) in line and "no kdpipe metadata" in line, line


# --------------------------------------------------------------------------- image folders


def image_folder(root: Path, classes=("cat", "dog", "owl")) -> Path:
    """Six training and two test images per class (plus a notes.txt the loader ignores)."""
    write_folder(root, classes)
    return root


def folder_params(root: Path, **data) -> dict:
    return tiny_params(data={"name": "imagefolder", "root": str(root), "image_size": 8, "val_fraction": 0.2, **data},
                       train={"epochs": 1}, teacher={"model": "tinynet_xs"})


def test_a_corrupted_image_stops_training_naming_the_file(tmp_path, monkeypatch, capsys):
    images = image_folder(tmp_path / "images")
    bad = images / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    ws = workspace(tmp_path / "ws", folder_params(images, bad_images="fail"))
    line = fails_cleanly(ws, "train_teacher", teach, monkeypatch, capsys)
    assert str(bad) in line and "unreadable image" in line and "data.bad_images: skip" in line, line


def test_a_corrupted_image_is_skipped_and_counted_under_skip(tmp_path, monkeypatch, capsys, caplog):
    images = image_folder(tmp_path / "images")
    bad = [images / "train" / "dog" / "broken.png", images / "val" / "owl" / "cut.png"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    (images / "val" / "owl" / "0.png").rename(bad[1])
    bad[1].write_bytes(bad[1].read_bytes()[:40])  # truncated mid-header
    raw = folder_params(images, bad_images="skip")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.imagefolder"):
        splits = build_data(parse_params(raw).data, 0)
    assert sorted(splits.skipped_files) == sorted(map(str, bad))
    assert len(splits.train) + len(splits.val) == 18 and len(splits.test) == 5  # broken.png was an extra file
    assert "skipped 2 unreadable image(s) (data.bad_images = skip)" in caplog.text
    ws = workspace(tmp_path / "ws", raw)  # and the stage trains on the rest
    monkeypatch.chdir(ws)
    run_stage("train_teacher", teach)
    assert (ws / "runs/teacher/model.pt").is_file()


@pytest.mark.parametrize(("policy", "make", "needle"), [
    ("fail", lambda d: None, "contains no images"),
    ("fail", lambda d: (d / "readme.txt").write_text("no images here"), "contains no images"),
    ("skip", lambda d: (d / "0.png").write_bytes(b"GIF89a broken"), "has no readable images (all 1 were skipped)"),
])
def test_a_class_folder_without_usable_images_is_named(tmp_path, monkeypatch, capsys, policy, make, needle):
    images = image_folder(tmp_path / "images")
    empty = images / "train" / "emu"
    empty.mkdir()
    (images / "val" / "emu").mkdir()
    Image.new("RGB", (9, 9)).save(images / "val" / "emu" / "0.png")
    make(empty)
    ws = workspace(tmp_path / "ws", folder_params(images, bad_images=policy))
    line = fails_cleanly(ws, "train_teacher", teach, monkeypatch, capsys)
    assert str(empty) in line and needle in line, line


def test_dataset_errors_are_value_errors_too(tmp_path):
    images = image_folder(tmp_path / "images", classes=("a", "b"))
    (images / "val" / "b").rename(images / "val" / "c")
    with pytest.raises(ValueError, match=r"only in train/: \['b'\], only in val/: \['c'\]") as exc:
        build_data(parse_params(folder_params(images)).data, 0)
    assert isinstance(exc.value, BadDatasetError)


def test_the_params_files_these_tests_write_are_complete(tmp_path):
    """Guard: the workspaces above fail for the reason each test names, not for a params typo."""
    ws = workspace(tmp_path / "ws", folder_params(tmp_path))
    assert kdpipe(["check", str(ws / "params.yaml")]) == 0
    assert yaml.safe_load((ws / "params.yaml").read_text())["data"]["name"] == "imagefolder"
