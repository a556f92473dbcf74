"""Same params, same bytes: two runs in two workspaces write identical outs; provenance says what made them.

Two git checkouts of the same commit train, evaluate and deploy the same tiny params
through the pipeline's own functions; every out (weights, metrics, plots, curves, ONNX
files, bundles, export and quantize reports) must match byte for byte. Only what holds
wall-clock measurements (the benchmark and the report built on it) may differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import __version__
from pipeline.deploy.benchmark import benchmark_all
from pipeline.deploy.bundle import bundle_all
from pipeline.deploy.export import export_all
from pipeline.deploy.metadata import read_metadata
from pipeline.deploy.quantize import quantize_all
from pipeline.deploy.tensorrt_build import build_all
from pipeline.engine.atomic import file_sha256
from pipeline.params import parse_params
from pipeline.provenance import git_state, provenance
from pipeline.report.results import report_all
from pipeline.runs import RunId, evaluate, train
from tests.conftest import REPO, tiny_params

RUNS = (RunId("teacher"), RunId("baseline", "tinynet_s"), RunId("distill", "tinynet_s", "kd"))
OUT_FOLDERS = ("runs", "metrics", "plots", "live", "exports", "bundles", "reports")
#: Outs that hold wall-clock measurements: latency figures and what is built on them.
TIMED = {"reports/benchmark.json", "reports/results.json", "reports/results.md", "reports/pareto.png"}
DEPLOY_STAGES = (export_all, quantize_all, build_all, bundle_all, benchmark_all, report_all)


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
                out[f.relative_to(root).as_posix()] = file_sha256(f)
    return out


def run_pipeline(params, root: Path) -> None:
    """What ``dvc repro`` runs, stage by stage, in-process."""
    for run in RUNS:
        train(params, run, root)
    for run in RUNS:
        evaluate(params, run, root)
    for stage in DEPLOY_STAGES:
        stage(params, root)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: fastest on one thread, and kind to a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def twins(tmp_path_factory, one_thread) -> tuple[Path, Path, object]:
    """The same pipeline run in two workspaces of the same checkout."""
    params = parse_params(tiny_params(
        train={"epochs": 3}, quantize={"calibration_samples": 32},
        benchmark={"warmup": 1, "iterations": 5, "max_seconds": 0.05, "variants": ["fp32"], "torch_reference": False,
                   "profiles": [{"name": "edge-1core", "threads": 1, "batch_sizes": [1], "latency_budget_ms": 100.0}]}))
    base = tmp_path_factory.mktemp("twins")
    a, b = git_workspace(base / "a"), git_workspace(base / "b")
    for ws in (a, b):
        run_pipeline(params, ws)
    return a, b, params


def test_same_params_give_the_same_bytes_in_every_out(twins):
    a, b, _ = twins
    da, db = digests(a), digests(b)
    for needle in ("runs/teacher/model.pt", "metrics/kd/tinynet_s.json", "exports/onnx/teacher/model.onnx",
                   "exports/quantized/kd/tinynet_s/model_int8.onnx", "bundles/tinynet_s-kd.tar.gz",
                   "reports/export.json", "reports/quantize.json"):
        assert needle in da
    assert da.keys() == db.keys()
    differ = sorted(k for k in da if da[k] != db[k] and k not in TIMED)
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
    # MACs are counted once, by training, into the model file; evaluate reports that count of the same network
    from pipeline.engine.checkpoint import load_model_file
    from pipeline.models.complexity import count_macs

    model, info = load_model_file(teacher.out_dir(a) / "model.pt")
    assert model_meta["macs"] == count_macs(model, info["in_channels"], info["image_size"]) > 0
    assert json.loads(teacher.metrics_file(a).read_text())["macs"] == model_meta["macs"]


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


def test_deploy_outputs_record_provenance(twins):
    a, _, _ = twins
    revision, _ = git_state(a)
    onnx_meta = read_metadata(a / "exports/onnx/kd/tinynet_s/model.onnx")
    assert onnx_meta["provenance"]["onnxruntime"] and "git_revision" not in onnx_meta["provenance"]
    int8 = read_metadata(a / "exports/quantized/kd/tinynet_s/model_int8.onnx")
    assert int8["provenance"]["params_sha256"] != onnx_meta["provenance"]["params_sha256"]  # quantize's own params
    for name in ("export", "quantize", "benchmark"):
        made = json.loads((a / "reports" / f"{name}.json").read_text())["provenance"]
        assert made["git_revision"] == revision and made["git_dirty"] is False and made["kdpipe"] == __version__
    manifest = json.loads((a / "bundles/tinynet_s-kd/bundle.json").read_text())
    assert manifest["provenance"]["git_revision"] == revision
    assert f"at git revision `{revision[:12]}`" in (a / "bundles/tinynet_s-kd/README.md").read_text()
    results = json.loads((a / "reports/results.json").read_text())["provenance"]
    assert {"metrics/teacher.json", "reports/export.json", "reports/results.json"} <= set(results)
    md = (a / "reports/results.md").read_text()
    section = md[md.index("## Provenance"):]
    assert f"`{revision[:12]}`" in section and "`metrics/kd/tinynet_s.json`" in section
    assert section.count("\n| `") == len(results)  # one row per output


def test_onnx_files_hold_no_path_of_this_machine(twins):
    """The exporter's stack traces name the source files by absolute path: two checkouts would differ."""
    a, _, _ = twins
    for f in (a / "exports").rglob("*.onnx"):
        data = f.read_bytes()
        assert str(REPO).encode() not in data and b'.py", line' not in data, f
