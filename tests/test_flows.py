"""Prefect flow over DVC stages: order, retries, params overrides, experiments, artifacts, logs.

The workspaces here are real git + DVC repositories whose stages are small shell
commands (a stage that kills itself once, one that fails on bad input), so the
orchestration is tested for real in seconds; tests/test_deployments.py runs the
project's own pipeline through a real server and worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import init_repo, tiny_params, write_params
from tests.prefect_api import artifacts, flow_run_logs, task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")  # one Prefect server for every flow here

FLAKY = """\
import os, signal, sys
from pathlib import Path
n = int(Path("attempts").read_text()) + 1 if Path("attempts").exists() else 1
Path("attempts").write_text(str(n))
print(f"flaky attempt {n}", flush=True)
if n == 1:
    os.kill(os.getpid(), signal.SIGKILL)
Path("out").mkdir(exist_ok=True)
Path("out/flaky.txt").write_text("ok")
"""

BAD = """\
import sys
from pathlib import Path
n = int(Path("bad_attempts").read_text()) + 1 if Path("bad_attempts").exists() else 1
Path("bad_attempts").write_text(str(n))
print("data.label_noise: Input should be less than 1 (got 1.5)", file=sys.stderr)
sys.exit(2)
"""

DVC_YAML = {
    "stages": {
        "first": {"cmd": "python -c \"import pathlib,yaml; p=yaml.safe_load(open('params.yaml')); "
                         "pathlib.Path('out').mkdir(exist_ok=True); "
                         "pathlib.Path('out/first.txt').write_text(str(p['distill']['kd']['temperature']))\"",
                  "params": ["distill.kd.temperature"], "outs": ["out/first.txt"]},
        "second": {"cmd": "python -c \"import pathlib; pathlib.Path('out/second.txt')"
                          ".write_text(pathlib.Path('out/first.txt').read_text() + '!')\"",
                   "deps": ["out/first.txt"], "outs": ["out/second.txt"]},
        "flaky": {"cmd": "python flaky.py", "deps": ["out/second.txt"], "outs": ["out/flaky.txt"]},
        "bad": {"cmd": "python bad.py", "outs": ["out/bad.txt"]},
    }
}


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    ws = tmp_path / "toy"
    ws.mkdir()
    (ws / "flaky.py").write_text(FLAKY)
    (ws / "bad.py").write_text(BAD)
    (ws / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    write_params(ws / "params.yaml", tiny_params())
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text("# the toy workspace's params (this comment must survive overrides)\n" + text)
    (ws / ".gitignore").write_text("/out/\n/attempts\n/bad_attempts\n/.kdpipe/\n")
    return init_repo(ws, "toy")


def test_stage_order_follows_dependencies(toy: Path):
    from pipeline.orchestrate.dag import stage_order

    order = stage_order(toy)
    assert order.index("first") < order.index("second") < order.index("flaky")
    assert stage_order(toy, ["second"]) == ["first", "second"]
    with pytest.raises(ValueError, match="unknown stage"):
        stage_order(toy, ["nope"])


def test_flow_retries_a_killed_stage_records_an_experiment_and_restores_params(toy: Path):
    from pipeline.flows import pipeline_flow
    from pipeline.orchestrate.experiments import experiment_table

    before = (toy / "params.yaml").read_text()
    state = pipeline_flow(params={"distill.kd.temperature": 2.5}, targets=["flaky"], workspace=str(toy),
                          experiment="toy-t25", return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["ran"] == ["first", "second", "flaky"]
    assert (toy / "attempts").read_text() == "2"  # killed once by SIGKILL, retried, passed
    assert (toy / "out" / "second.txt").read_text() == "2.5!"
    assert (toy / "params.yaml").read_text() == before  # overrides applied for the run only
    exps = {e["name"]: e for e in experiment_table(toy)}
    assert exps["toy-t25"]["params"]["distill.kd.temperature"] == 2.5

    run_id = state.state_details.flow_run_id
    logs = flow_run_logs(run_id)
    assert any("flaky attempt 1" in m for m in logs), "stage output must reach the run's log"
    assert any("flaky attempt 2" in m for m in logs)
    flaky = [t for t in task_runs(run_id) if t["name"] == "flaky"]  # task runs are named after their stages
    assert flaky and flaky[0]["run_count"] == 2 and flaky[0]["state"]["type"] == "COMPLETED"

    # nothing changed: every stage is skipped by DVC, no experiment is needed to tell
    again = pipeline_flow(params={"distill.kd.temperature": 2.5}, targets=["flaky"], workspace=str(toy),
                          record=False)
    assert again["ran"] == [] and set(again["stages"].values()) == {"up to date"}
    assert (toy / "attempts").read_text() == "2"


def test_failed_stage_with_bad_input_is_not_retried_and_its_message_is_logged(toy: Path):
    from pipeline.flows import StagesFailedError, pipeline_flow

    state = pipeline_flow(targets=["bad"], workspace=str(toy), return_state=True)
    assert state.is_failed()
    with pytest.raises(StagesFailedError) as info:
        state.result()
    bad = info.value.failures["bad"]
    assert bad.status == 2 and not bad.transient
    assert "label_noise" in str(info.value)
    assert (toy / "bad_attempts").read_text() == "1"  # deterministic failure: no retry
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any("data.label_noise: Input should be less than 1" in m for m in logs)


def test_unknown_param_key_fails_before_any_stage_and_touches_nothing(toy: Path):
    from pipeline.config.base import ConfigError
    from pipeline.flows import pipeline_flow

    before = (toy / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"distill\.kd\.temprature.*allowed keys"):
        pipeline_flow(params={"distill.kd.temprature": 2}, workspace=str(toy))
    with pytest.raises(ConfigError, match=r"train\.optimizer\.lr"):
        pipeline_flow(params={"train": {"optimizer": {"lr": -1}}}, workspace=str(toy))
    assert (toy / "params.yaml").read_text() == before
    assert not (toy / "out").exists() and not (toy / "dvc.lock").exists()


def test_flow_repairs_an_rwlock_a_kill_cut_short_but_stops_on_a_claim_it_cannot_judge(toy: Path):
    from pipeline.dvc_locks import StaleLockError
    from pipeline.flows import pipeline_flow

    rw = toy / ".dvc" / "tmp" / "rwlock"
    rw.parent.mkdir(parents=True, exist_ok=True)
    rw.write_text('{"write": {"out/first.txt": {"pid": 1')  # DVC's in-place rewrite killed half-way
    state = pipeline_flow(targets=["first"], workspace=str(toy), record=False, return_state=True)
    assert state.is_completed(), state.message
    assert (toy / "out" / "first.txt").read_text() == "4.0"
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any("unreadable" in m and "rwlock" in m and "killed DVC run" in m for m in logs)
    # an entry whose PID is alive but is not DVC's is left to `kdpipe unlock`, with the reason
    rw.write_text(json.dumps({"write": {"out/first.txt": {"pid": os.getppid(), "cmd": "dvc repro"}}}))
    os.utime(rw, (0, 0))  # written before that process started: its PID was reused
    with pytest.raises(StaleLockError, match="kdpipe unlock"):
        pipeline_flow(targets=["first"], workspace=str(toy), record=False)


def test_flow_publishes_results_and_report_artifacts(toy: Path):
    from pipeline.flows import pipeline_flow

    (toy / "metrics").mkdir()
    (toy / "metrics" / "teacher.json").write_text(json.dumps({"top1": 91.5, "params": 10, "macs": 20}))
    (toy / "reports").mkdir()
    (toy / "reports" / "results.md").write_text("# Results\n\n| model | top1 |\n|---|---|\n| teacher | 91.5 |\n")
    pipeline_flow(targets=["first"], workspace=str(toy), experiment="artifacts-check", record=False)
    by_key = artifacts(["artifacts-check-results", "artifacts-check-report"])
    assert by_key["artifacts-check-results"]["type"] == "table"
    assert "91.5" in by_key["artifacts-check-results"]["data"]
    assert by_key["artifacts-check-report"]["type"] == "markdown"
    assert "# Results" in by_key["artifacts-check-report"]["data"]


def test_cli_run_reports_bad_params_in_one_line(toy: Path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--set", "data.label_noise=1.5",
                           "--workspace", str(toy)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "data.label_noise" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--set", "nonsense",
                           "--workspace", str(toy)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_apply_params_keeps_comments_and_validates_first(toy: Path):
    from pipeline.config.base import ConfigError
    from pipeline.orchestrate.params import apply_params, parse_assignments

    f = toy / "params.yaml"
    before = apply_params(f, parse_assignments(["distill.kd.temperature=3", "students.resnet8={}"]))
    text = f.read_text()
    assert text.startswith("# the toy workspace's params")
    data = yaml.safe_load(text)
    assert data["distill"]["kd"]["temperature"] == 3
    assert list(data["students"]) == ["tinynet_s", "resnet8"] and data["students"]["resnet8"] == {}
    f.write_text(before)
    with pytest.raises(ConfigError, match="teacher.model"):
        apply_params(f, {"teacher.model": "resnet9000"})
    assert f.read_text() == before


def test_sweep_plan_crosses_grid_and_seeds_and_refuses_seed_in_the_grid():
    from pipeline.orchestrate.experiments import sweep_plan

    plan = sweep_plan("s", {"a": [1, 2], "b": ["x"]}, [0, 3])
    assert [(e.name, e.overrides, e.seed) for e in plan] == [
        ("s-c0-s0", {"a": 1, "b": "x"}, 0), ("s-c0-s3", {"a": 1, "b": "x"}, 3),
        ("s-c1-s0", {"a": 2, "b": "x"}, 0), ("s-c1-s3", {"a": 2, "b": "x"}, 3)]
    with pytest.raises(ValueError, match="seeds"):
        sweep_plan("s", {"seed": [1, 2]}, [0])
    with pytest.raises(ValueError, match=r"no values for \['a'\]"):
        sweep_plan("s", {"a": []}, [0])


def test_results_artifact_rows_carry_the_runtime_and_survive_unmeasured_profiles(tmp_path):
    """The Prefect results table: one row per model x runtime x variant; a profile a row was not measured on
    (a device that ran another bundle, a variant left out of the benchmark) is an empty cell, not a crash."""
    from pipeline.flows import _results_rows

    (tmp_path / "reports").mkdir()
    row = {"run": "kd/tinynet_xs", "arch": "tinynet_xs", "top1": 90.0, "params": 10, "bytes": 100}
    (tmp_path / "reports" / "results.json").write_text(json.dumps({"rows": [
        {**row, "runtime": "openvino", "precision": "bf16", "latency": {"server": {"p50_ms": 0.5}, "pi5": None}},
        {**row, "precision": "int8", "latency": {"server": None}}]}))
    rows = _results_rows(tmp_path)
    assert rows[0]["runtime"] == "openvino" and rows[0]["server p50 ms"] == 0.5 and rows[0]["pi5 p50 ms"] is None
    assert rows[1]["runtime"] == "onnxruntime" and rows[1]["server p50 ms"] is None
