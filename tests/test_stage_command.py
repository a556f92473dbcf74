"""Running a stage's command (pipeline.orchestrate.command and its guard): exit statuses reach
the flow as DVC would report them, and a killed launcher takes the stage's whole process tree
down with it under any shell, including dash, which forks the command instead of exec'ing it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from pipeline.orchestrate import guard
from pipeline.orchestrate.command import StageFailedError, run_stage_command

SHELLS = [s for s in ("/bin/sh", "/bin/bash") if Path(s).exists()]


@pytest.mark.parametrize("shell", SHELLS)
def test_output_lines_and_exit_statuses_reach_the_caller(tmp_path: Path, shell: str):
    env = {**os.environ, "SHELL": shell}
    lines: list[str] = []
    run_stage_command("ok", ["echo one; echo two"], str(tmp_path), env, lines.append)
    assert lines == ["one", "two"]

    with pytest.raises(StageFailedError) as bad:
        run_stage_command("bad", ["echo why; exit 2"], str(tmp_path), env)
    assert (bad.value.status, bad.value.transient, bad.value.tail) == (2, False, "why")

    with pytest.raises(StageFailedError) as killed:  # the stage's own process killed: a retry can pass
        run_stage_command("killed", ["kill -9 $$"], str(tmp_path), env)
    assert killed.value.transient and "killed by signal 9" in str(killed.value)


@pytest.mark.skipif(not guard.supported(), reason="the guard needs Linux prctl(2)")
@pytest.mark.parametrize("shell", SHELLS)
def test_a_killed_launcher_takes_the_whole_stage_tree_with_it(tmp_path: Path, shell: str):
    # the stage: a shell that starts a background child and a foreground one, as a stage with
    # data-loader workers would; each writes its PID, then all of them sleep
    pids = tmp_path / "pids"
    code = f"import os, time; print(os.getpid(), file=open({str(pids)!r}, 'a'), flush=True); time.sleep(600)"
    sleeper = f"{sys.executable} -c \"{code}\""
    launcher = textwrap.dedent(f"""
        import os
        from pipeline.orchestrate.command import run_stage_command
        run_stage_command("s", [{f"{sleeper} & {sleeper}; wait"!r}], {str(tmp_path)!r}, {{**os.environ, "SHELL": {shell!r}}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=Path(__file__).parents[1], start_new_session=True)
    try:
        while not pids.exists() or len(pids.read_text().split()) < 2:  # pytest-timeout stops a hang
            assert proc.poll() is None, "the launcher ended before its stage started"
            psutil.wait_procs([psutil.Process(proc.pid)], timeout=0.1)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert {int(p) for p in pids.read_text().split()} <= {p.pid for p in tree}
        proc.send_signal(signal.SIGKILL)  # the launcher alone, as the OOM killer or a lost Dask worker would
        proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=120)  # a guard against a hang, not a measure
        assert not alive, f"processes outlived their launcher: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left, if anything
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not guard.supported(), reason="the guard needs Linux prctl(2)")
def test_the_guard_refuses_bad_arguments_with_a_usage_line():
    out = subprocess.run([*guard.argv(["true"])[:3], "not-a-pid", "true"], capture_output=True, text=True)
    assert out.returncode == 2 and "guard.py LAUNCHER_PID COMMAND" in out.stderr
