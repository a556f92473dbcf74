"""A concurrent flow killed with two training stages running (SIGKILL of the flow's process alone):
its stage processes die with it, and the next `kdpipe run --jobs 2` resumes both from their
checkpoints, puts params.yaml back and ends with the dvc.lock of an uninterrupted run.

The kill lands at kill points (the teacher before epoch 3, the student before epoch 3),
so where it lands does not depend on the machine's speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import KILLPOINT_REACHED, killpoint_env, make_workspace, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

PARAMS = tiny_params(data={"synthetic_samples": 1200}, teacher={"model": "tinynet_m", "train": {"epochs": 6}},
                     students={"tinynet_s": {"train": {"epochs": 4}}})
TRAINING = ["train_teacher", "train_student@tinynet_s"]


def test_killed_concurrent_flow_resumes_both_training_stages_and_restores_params(tmp_path: Path):
    ref = make_workspace(tmp_path / "ref", PARAMS)
    subprocess.run(["dvc", "repro", *TRAINING], cwd=ref, check=True, capture_output=True)
    ws = tmp_path / "ws"
    subprocess.run(["git", "clone", "-q", str(ref), str(ws)], check=True)  # the same commit: the same outs

    original = (ws / "params.yaml").read_text()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--jobs", "2", "--no-record",
           *[a for t in TRAINING for a in ("--target", t)]]
    proc = subprocess.Popen([*cmd, "--set", "distill.kd.temperature=3"], cwd=ws, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=killpoint_env(dict(os.environ), "epoch:teacher:3:0", "epoch:baseline/tinynet_s:3:0"))
    seen, reached = [], set()
    try:
        for line in proc.stdout:
            seen.append(line)
            if KILLPOINT_REACHED in line:
                reached.add(line.split(KILLPOINT_REACHED)[1].strip())
                if len(reached) == 2:
                    break
        stages = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if any(a.startswith("stages.") for a in p.cmdline())]
        assert len(stages) == 2, "".join(seen[-30:])  # both training stages are running
        proc.send_signal(signal.SIGKILL)  # the flow's process only
        proc.wait()
        gone, alive = psutil.wait_procs(stages, timeout=120)  # a guard against a hang, not a measure
        assert not alive, f"stage processes outlived the killed flow: {alive}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the session (Prefect's temporary server)
    assert "temperature: 3" in (ws / "params.yaml").read_text()  # killed with the override applied
    assert not (ws / "runs" / "teacher" / "model.pt").exists()

    again = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "put back as it was before a run that was killed" in out
    assert "[teacher] resuming after epoch 2 " in out
    assert "[baseline/tinynet_s] resuming after epoch 2 " in out
    assert (ws / "params.yaml").read_text() == original
    done = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    expected = yaml.safe_load((ref / "dvc.lock").read_text())["stages"]
    assert {s: done[s] for s in TRAINING} == {s: expected[s] for s in TRAINING}
    status = subprocess.run(["dvc", "status", *TRAINING], cwd=ws, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
