"""A Prefect flow run killed mid-stage (SIGKILL of the whole process group): the next run
continues from where DVC and the checkpoints stand, and puts params.yaml back.

The kill lands at a kill point (the teacher stops before epoch 3, after epoch 2's
checkpoint), so where it lands does not depend on the machine's speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engine.atomic import file_sha256
from tests.conftest import KILLPOINT_REACHED, killpoint_env, make_workspace, tiny_params

pytestmark = pytest.mark.slow

PARAMS = tiny_params(data={"synthetic_samples": 1200}, teacher={"model": "tinynet_m", "train": {"epochs": 6}})


def test_killed_flow_resumes_the_stage_and_restores_params(tmp_path: Path):
    ref = make_workspace(tmp_path / "ref", PARAMS)
    subprocess.run(["dvc", "repro", "train_teacher"], cwd=ref, check=True, capture_output=True)

    ws = make_workspace(tmp_path / "ws", PARAMS)
    original = (ws / "params.yaml").read_text()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--target", "train_teacher", "--no-record"]
    proc = subprocess.Popen([*cmd, "--set", "distill.kd.temperature=3"], cwd=ws, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=killpoint_env(dict(os.environ), "epoch:teacher:3:0"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if KILLPOINT_REACHED in line:
            os.killpg(proc.pid, signal.SIGKILL)  # flow, temporary server, DVC and the stage at once
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert "temperature: 3" in (ws / "params.yaml").read_text()  # killed with the override applied
    assert not (ws / "runs" / "teacher" / "model.pt").exists()

    again = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "put back as it was before a run that was killed" in out
    assert "[teacher] resuming after epoch 2 " in out
    assert (ws / "params.yaml").read_text() == original
    assert file_sha256(ws / "runs" / "teacher" / "model.pt") == file_sha256(ref / "runs" / "teacher" / "model.pt")
    status = subprocess.run(["dvc", "status", "train_teacher"], cwd=ws, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
