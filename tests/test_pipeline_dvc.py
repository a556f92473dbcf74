"""End to end: `dvc repro` of a tiny configuration in a temporary git repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace, tiny_params

pytestmark = pytest.mark.slow


def dvc(ws: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    params = tiny_params(students={"tinynet_s": {}, "resnet8": {"train": {"epochs": 1}}})
    ws = make_workspace(tmp_path_factory.mktemp("ws"), params)
    dvc(ws, "repro")
    return ws


def test_repro_produces_every_model_metric_and_plot(workspace: Path):
    ws = workspace
    for run in ("teacher", "baseline/tinynet_s", "baseline/resnet8", "kd/tinynet_s", "kd/resnet8"):
        assert (ws / "runs" / run / "model.pt").is_file(), run
        m = json.loads((ws / "metrics" / f"{run}.json").read_text())
        for key in ("top1", "top5", "nll", "ece", "params", "macs", "checkpoint_bytes"):
            assert key in m, (run, key)
        assert 0 <= m["top1"] <= 100
        if run != "teacher":
            assert 0 <= m["teacher_agreement"] <= 100
        rows = json.loads((ws / "plots" / "confusion" / f"{run}.json").read_text())
        assert len(rows) == m["test_samples"] and set(rows[0]) == {"actual", "predicted"}
    routes = sorted(p.name for p in (ws / "runs" / "teacher" / "route").iterdir())
    assert routes == ["epoch_0001.pt", "epoch_0002.pt"]
    shown = dvc(ws, "metrics", "show", "--json")
    data = json.loads(shown)
    files = next(iter(data.values()))["data"]
    assert "metrics/kd/resnet8.json" in files and "metrics/teacher.json" in files
    out = dvc(ws, "plots", "show", "--json")
    assert "live" in out and "plots/confusion" in out
    assert not (ws / ".kdpipe" / "state" / "teacher").exists()  # resume state cleaned after success


def test_second_repro_skips_everything(workspace: Path):
    out = dvc(workspace, "repro")
    assert "Running stage" not in out
    assert "didn't change" in out or "up to date" in out


def test_changing_one_student_reruns_only_its_stages(workspace: Path):
    ws = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["students"]["resnet8"] = {"train": {"epochs": 2}}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=ws, capture_output=True, text=True).stdout)
    assert set(status) == {"train_student@resnet8", "distill@resnet8-kd"}
    out = dvc(ws, "repro")
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == ["distill@resnet8-kd", "evaluate_baseline@resnet8", "evaluate_distill@resnet8-kd",
                   "train_student@resnet8"]
