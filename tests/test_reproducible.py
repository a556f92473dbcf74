"""Same params, same bytes: two trainings in two workspaces write identical outs; provenance says what made them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import __version__
from pipeline.config import parse_params
from pipeline.provenance import git_state, provenance
from pipeline.runs import RunId, evaluate, train
from tests.conftest import REPO, tiny_params

RUNS = (RunId("teacher"), RunId("baseline", "tinynet_s"), RunId("distill", "tinynet_s", "kd"))
OUT_FOLDERS = ("runs", "metrics", "plots", "live")


def git_workspace(root: Path, date: str = "2024-01-01T00:00:00+00:00") -> Path:
    """A git checkout with one commit; the same ``date`` gives the same revision in every copy."""
    root.mkdir(parents=True)
    (root / "README.md").write_text("workspace\n")
    (root / "params.yaml").write_text("seed: 0\n")
    env = {**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date, "GIT_AUTHOR_NAME": "ci",
           "GIT_AUTHOR_EMAIL": "ci@example.invalid", "GIT_COMMITTER_NAME": "ci",
           "GIT_COMMITTER_EMAIL": "ci@example.invalid"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "workspace"]):
        subprocess.run(["git", *cmd], cwd=root, env=env, check=True, capture_output=True)
    return root


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file of every out folder, keyed by its path in the workspace."""
    out = {}
    for folder in OUT_FOLDERS:
        for f in sorted((root / folder).rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def train_and_evaluate(params, root: Path) -> None:
    for run in RUNS:
        train(params, run, root)
    for run in RUNS:
        evaluate(params, run, root)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: fastest on one thread, and kind to a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def twins(tmp_path_factory, one_thread) -> tuple[Path, Path, object]:
    """The same training and evaluation run in two workspaces of the same checkout."""
    params = parse_params(tiny_params(train={"epochs": 3}))
    base = tmp_path_factory.mktemp("twins")
    a, b = git_workspace(base / "a"), git_workspace(base / "b")
    for ws in (a, b):
        train_and_evaluate(params, ws)
    return a, b, params


def test_same_params_give_the_same_bytes_in_every_out(twins):
    a, b, _ = twins
    da, db = digests(a), digests(b)
    assert any(k.endswith("model.pt") for k in da) and any(k.startswith("metrics/") for k in da)
    assert da.keys() == db.keys()
    differ = sorted(k for k in da if da[k] != db[k])
    assert not differ, f"outs differ between two runs of the same params: {differ}"
    for run in RUNS:
        ma, mb = (json.loads(run.metrics_file(ws).read_text()) for ws in (a, b))
        assert ma == mb
        ta, tb = (json.loads((run.out_dir(ws) / "train.json").read_text()) for ws in (a, b))
        assert ta["final"] == tb["final"] and "seconds" not in ta  # no wall-clock in a compared file


def test_train_json_and_metrics_record_provenance(twins):
    a, _, params = twins
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=a, capture_output=True, text=True).stdout.strip()
    teacher = RunId("teacher")
    record = json.loads((teacher.out_dir(a) / "train.json").read_text())["provenance"]
    assert record["git_revision"] == revision and record["git_dirty"] is False  # outs are untracked: still clean
    assert record["kdpipe"] == __version__ and record["torch"] == torch.__version__.split("+")[0]
    assert record["python"] == ".".join(map(str, sys.version_info[:3])) and record["device"] == "cpu"
    assert len(record["params_sha256"]) == 64
    model_meta = torch.load(teacher.out_dir(a) / "model.pt", weights_only=True)["meta"]
    assert model_meta["params_sha256"] == record["params_sha256"]
    assert "git_revision" not in model_meta  # the weights file depends on params, code and libraries only
    metrics = json.loads(teacher.metrics_file(a).read_text())["provenance"]
    assert metrics["git_revision"] == revision and metrics["train_params_sha256"] == record["params_sha256"]


def test_another_commit_keeps_the_weights_bytes_and_records_its_revision(tmp_path, twins):
    a, _, params = twins
    c = git_workspace(tmp_path / "c", date="2024-06-01T00:00:00+00:00")
    train(params, RunId("teacher"), c)
    for name in ("model.pt", "route/epoch_0001.pt"):
        assert (RunId("teacher").out_dir(a) / name).read_bytes() == (RunId("teacher").out_dir(c) / name).read_bytes()
    ta, tc = (json.loads((RunId("teacher").out_dir(ws) / "train.json").read_text()) for ws in (a, c))
    assert ta["provenance"]["git_revision"] != tc["provenance"]["git_revision"]
    ta["provenance"].pop("git_revision"), tc["provenance"].pop("git_revision")
    assert ta == tc


def test_params_hash_follows_the_runs_own_params(tmp_path, one_thread):
    base = tiny_params(train={"epochs": 1})
    hashes = {}
    for name, p in {"base": base, "other_student_lr": {**base, "students": {"tinynet_s": {}, "tinynet_xs": {
            "train": {"lr": 0.2}}}}, "seed": {**base, "seed": 1}}.items():
        root = tmp_path / name
        train(parse_params(p), RunId("teacher"), root)
        hashes[name] = json.loads((root / "runs/teacher/train.json").read_text())["provenance"]["params_sha256"]
    assert hashes["base"] == hashes["other_student_lr"]  # another run's params do not touch the teacher's
    assert hashes["base"] != hashes["seed"]


def test_git_state_dirty_ignores_pipeline_state_files(tmp_path):
    assert git_state(tmp_path) == (None, None)  # not a checkout: no revision, no error
    ws = git_workspace(tmp_path / "ws")
    revision, dirty = git_state(ws)
    assert revision and len(revision) == 40 and dirty is False
    (ws / "params.yaml").write_text("seed: 1\n")  # dvc exp run -S edits it; params_sha256 records it
    (ws / "dvc.lock").write_text("schema: '2.0'\n")  # untracked outs and lock files do not count
    assert git_state(ws) == (revision, False)
    (ws / "README.md").write_text("changed\n")
    assert git_state(ws) == (revision, True)


def test_provenance_is_cheap_and_reads_versions_without_importing():
    code = ("import sys; from pipeline.provenance import provenance; "
            "p = provenance('x', packages=('torch', 'onnxruntime', 'no-such-package'), git=False); "
            "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules, 'imported'; "
            "assert p['onnxruntime'] and p['torch'] and p['no-such-package'] is None, p; "
            "assert 'git_revision' not in p, p")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert set(provenance("h", git=False)) == {"kdpipe", "python", "torch", "device", "params_sha256"}
