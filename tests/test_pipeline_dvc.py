"""End to end: `dvc repro` of a tiny configuration in a temporary git repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import KILLPOINT_REACHED, killpoint_env, make_workspace, tiny_params

pytestmark = pytest.mark.slow


def dvc(ws: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    # one benchmark profile at batch 1, FP32 and INT8 (tests/test_deploy*.py cover variants and profiles)
    params = tiny_params(students={"tinynet_s": {}, "resnet8": {"train": {"epochs": 1}}}, online={"methods": ["dml"]},
                         benchmark={"warmup": 1, "iterations": 5, "max_seconds": 0.05, "torch_reference": False,
                                    "variants": ["fp32", "int8"],
                                    "profiles": [{"name": "edge-1core", "threads": 1, "batch_sizes": [1],
                                                  "latency_budget_ms": 100.0}]})
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


#: The Dask run's targets: every kind of training stage (teacher, student alone, offline and online
#: distillation) and evaluation, with independent branches to run side by side.
DASK_TARGETS = ["evaluate_distill@tinynet_s-kd", "evaluate_online@tinynet_s-dml", "evaluate_baseline@resnet8"]
DASK_STAGES = {"train_teacher", "distill@tinynet_s-kd", "evaluate_distill@tinynet_s-kd", "online@tinynet_s-dml",
               "evaluate_online@tinynet_s-dml", "train_student@resnet8", "evaluate_baseline@resnet8"}


def test_a_concurrent_flow_on_a_dask_cluster_writes_the_dvc_lock_of_a_serial_repro(workspace: Path, tmp_path: Path):
    """`kdpipe run --dask local:2` (a real LocalCluster of 2 worker processes, two stages at a time), from a
    clone of the same commit: DVC ends where the serial `dvc repro` ended, every hash equal.

    Seven of the pipeline's stages, one of each kind (the deploy stages after them form a chain that runs one
    stage at a time, as serially; tests/test_kill_points.py checks their outs byte for byte). The thread runner
    (`--jobs 2`) runs the same loop (prepare and record on the host, commands in slots): tests/test_flow_kill.py
    compares its dvc.lock with a serial repro's, tests/test_parallel_flow.py its scheduling.
    """
    pytest.importorskip("prefect_dask", reason="the dask extra is not installed: pip install -e '.[dask]'")
    ws = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace), str(ws)], check=True)
    # as a user runs it: no Prefect server of one's own, so the flow starts Prefect's temporary server and gives
    # its address to the cluster's workers (the other tests share one server: tests/conftest.py prefect_api)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--dask", "local:2", "--no-record",
                           *[a for t in DASK_TARGETS for a in ("--target", t)]], cwd=ws,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    serial = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    flow = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert set(flow) == DASK_STAGES
    assert [s for s in flow if serial[s] != flow[s]] == []
    assert json.loads(dvc(ws, "status", "--json", "--with-deps", *DASK_TARGETS)) == {}
    assert "Running stage" not in dvc(ws, "repro", *DASK_TARGETS)


@pytest.mark.parametrize(("edited", "rerun"), [
    ("pipeline/deploy/benchmark.py", {"benchmark"}),  # (the report re-runs after it: new timings)
    ("pipeline/report/plots.py", {"report"}),
    ("pipeline/config/deploy.py", {"export", "quantize", "tensorrt", "bundle", "benchmark", "report"}),
    ("pipeline/distill/offline/kd.py", {"distill@tinynet_s-kd", "distill@resnet8-kd"}),
])
def test_editing_code_reruns_only_the_stages_that_run_it(workspace: Path, edited: str, rerun: set[str]):
    """dvc.yaml's per-stage code deps (tests/test_stage_deps.py), seen by DVC itself: training stays up to date.

    ``dvc status`` names the stages whose own deps changed; those downstream re-run only if these change their outs.
    """
    ws = workspace
    original = (ws / edited).read_text()
    (ws / edited).write_text(original + "\n# an edit\n")
    try:
        status = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=ws, capture_output=True, text=True).stdout)
    finally:
        (ws / edited).write_text(original)
    assert set(status) == rerun, sorted(status)


def test_changing_one_student_reruns_only_its_stages(workspace: Path):
    ws = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["students"]["resnet8"]["train"]["epochs"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=ws, capture_output=True, text=True).stdout)
    assert set(status) == {"train_student@resnet8", "distill@resnet8-kd", "online@resnet8-dml"}
    subprocess.run(["git", "checkout", "params.yaml"], cwd=ws, check=True)


def test_exp_run_with_a_changed_method_param_reruns_only_that_method(workspace: Path):
    subprocess.run(["git", "add", "-A"], cwd=workspace, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline results"], cwd=workspace, check=True)
    # every evaluation, so every training stage, is a target; the all-model deploy stages after them are not
    evaluations = ["evaluate_teacher", *(f"evaluate_baseline@{s}" for s in ("tinynet_s", "resnet8")),
                   *(f"evaluate_{kind}@{s}-{m}" for kind, m in (("distill", "kd"), ("online", "dml"))
                     for s in ("tinynet_s", "resnet8"))]
    out = dvc(workspace, "exp", "run", "-S", "distill.kd.temperature=2.0", *evaluations)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    assert ran == ["distill@resnet8-kd", "distill@tinynet_s-kd",
                   "evaluate_distill@resnet8-kd", "evaluate_distill@tinynet_s-kd"]
    table = dvc(workspace, "exp", "show", "--json")
    assert "distill.kd.temperature" in table or "temperature" in table


def _state_dict(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_repro_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path):
    import signal

    import torch

    params = tiny_params(train={"epochs": 6}, teacher={"model": "tinynet_l", "route_every": 2})
    a = make_workspace(tmp_path / "uninterrupted", params)
    b = make_workspace(tmp_path / "killed", params)
    dvc(a, "repro", "train_teacher")

    # killed during epoch 3, at a kill point: where the kill lands does not depend on the machine's speed
    proc = subprocess.Popen(["dvc", "repro", "train_teacher"], cwd=b, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=killpoint_env(dict(os.environ), "epoch:teacher:3:1"))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if KILLPOINT_REACHED in line:
            break
    assert proc.poll() is None, "".join(seen[-30:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "runs" / "teacher" / "model.pt").exists()  # nothing half-written as an out

    out = dvc(b, "repro", "train_teacher")
    assert "[teacher] resuming after epoch 2 " in out, out
    info = json.loads((b / "runs" / "teacher" / "train.json").read_text())
    record_a = json.loads((a / "runs/teacher/train.json").read_text())
    record_b = dict(info)
    # two separate repositories: their commits (in the provenance) differ, nothing else may
    assert record_a.pop("provenance")["git_revision"] != record_b.pop("provenance")["git_revision"]
    assert record_a == record_b
    sa, sb = _state_dict(a / "runs/teacher/model.pt"), _state_dict(b / "runs/teacher/model.pt")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "runs/teacher/model.pt").read_bytes() == (b / "runs/teacher/model.pt").read_bytes()
    ta = json.loads((a / "runs/teacher/train.json").read_text())["final"]
    assert ta == info["final"]
