"""SIGKILL `dvc repro` at chosen points, again and again: the pipeline ends exactly where an uninterrupted run does.

A tiny pipeline (synthetic data; a teacher, one student alone and distilled by KD; every
evaluate; export, quantize, tensorrt, bundle, benchmark, report) runs once uninterrupted
in a reference workspace. A clone of it (same commit, so the same provenance) then runs
``dvc repro`` ten times, each run killed with SIGKILL, its whole process group; a last
``dvc repro`` runs to the end. Then:

* every out exists and equals the reference's bytes, except what holds wall-clock
  figures (benchmark timings and the report built on them);
* ``dvc status`` is clean, ``dvc.lock`` records the reference's hashes (but for the timed
  outs), every file of DVC's cache matches the hash it is filed under, no temp file of a
  killed write is left in the out folders, and no training state is left;
* a training stage that was killed mid-training resumed from exactly its last finished
  epoch (its log says ``resuming after epoch N``), never starting afresh, and one killed
  after its training finished but before DVC recorded it trained nothing the next time.

Where a kill lands must not depend on how fast the machine is (an epoch here takes a few
hundredths of a second), so the first three kills land at *kill points*
(``tests/killpoint/sitecustomize.py``: the stage process stops there and the test kills
it): the teacher mid-epoch at a seeded epoch and batch, the teacher's stage after it
wrote its outs and before DVC recorded them, the KD student mid-epoch. The other seven
land at seeded points of the run (a stage, and a time within what that stage took in
the reference run), anywhere from a stage's start-up to DVC's lock and cache writes; the
report stage stops at its start in those runs, so each of them is killed by then at the
latest and every one of the ten runs is killed whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.dvc_locks import inspect_locks
from tests.conftest import KILLPOINT_REACHED, killpoint_env, make_workspace, tiny_params

pytestmark = pytest.mark.slow

SEED = 7
KILLS = 10
EPOCHS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KDPIPE_PROGRESS": "lines", "PYTHONUNBUFFERED": "1"}
REACHED = KILLPOINT_REACHED
PARAMS = tiny_params(
    data={"synthetic_samples": 160},
    train={"epochs": EPOCHS},
    teacher={"model": "tinynet_m", "route_every": 4},
    export={"include_teacher": False},
    quantize={"calibration_samples": 32, "fp16": False, "tensorrt_qdq": False},
    benchmark={"warmup": 1, "iterations": 5, "max_seconds": 0.05, "variants": ["fp32", "int8"],
               "torch_reference": False, "profiles": [{"name": "one", "threads": 1, "batch_sizes": [1],
                                                       "latency_budget_ms": 100.0}]},
)
OUT_FOLDERS = ("runs", "live", "metrics", "plots", "exports", "bundles", "reports")
#: Outs holding wall-clock figures: the benchmark and what the report builds on it.
TIMED = {"reports/benchmark.json", "reports/results.json", "reports/results.md", "reports/pareto.png"}
#: Stages whose lock entries hold hashes of those timed outs.
TIMED_STAGES = {"benchmark", "report"}
#: Temp siblings of pipeline/engine/atomic.py: ``.<name>.<random>.tmp`` (file or folder) and ``.<name>.old-<pid>``.
TEMP_NAME = re.compile(r"^\..+\.kdtmp-\d+-.*$")
RESUMED = re.compile(r"^\[(?P<run>[^\]]+)\] resuming after epoch (?P<epoch>\d+) ", re.M)


def leftovers(ws: Path) -> list[str]:
    """Temp files and folders of atomic writes that a killed process left behind."""
    found = [p for p in ws.iterdir() if TEMP_NAME.match(p.name)]
    for folder in OUT_FOLDERS:
        found += [p for p in (ws / folder).rglob("*") if TEMP_NAME.match(p.name)]
    return sorted(p.relative_to(ws).as_posix() for p in found)


def outs(ws: Path) -> dict[str, bytes]:
    """Every out file with its bytes (temp leftovers aside)."""
    found = {}
    for folder in OUT_FOLDERS:
        for f in sorted((ws / folder).rglob("*")):
            if f.is_file() and not any(TEMP_NAME.match(part) for part in f.relative_to(ws).parts):
                found[f.relative_to(ws).as_posix()] = f.read_bytes()
    return found


def lock_hashes(ws: Path) -> dict[tuple[str, str, str], str]:
    """(stage, deps|outs, path) -> hash from ``dvc.lock``, but for the timed stages."""
    found = {}
    for stage, entry in yaml.safe_load((ws / "dvc.lock").read_text())["stages"].items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []) if stage not in TIMED_STAGES else []:
                found[(stage, kind, item["path"])] = item["md5"]
    return found


def resume_state(ws: Path) -> dict[str, int]:
    """Run -> epoch of its resume checkpoint (``.kdpipe/state/<run>/main/last.pt``), for runs that have one."""
    import torch

    found = {}
    for last in (ws / ".kdpipe" / "state").glob("**/main/last.pt"):
        run = last.parent.parent.relative_to(ws / ".kdpipe" / "state").as_posix()
        found[run] = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
    return found


def cache_problems(ws: Path) -> tuple[list[str], int]:
    """Files of ``.dvc/cache`` whose bytes do not match the hash they are filed under (and how many were checked).

    Objects (``files/md5/ab/cdef...``, ``.dir`` listings too) are named by the md5 of
    their bytes; run-cache entries (``runs/<key>/<value>``) by DVC's sha256 of the lock
    data they hold. Anything else (a leftover temp file) is a problem too.
    """
    from dvc.utils import dict_sha256
    from dvc.utils.serialize import (  # DVC's YAML 1.2 reader: PyYAML reads a dumped 1e-05 as a string
        YAMLFileCorruptedError,
        parse_yaml,
    )

    problems, checked = [], 0
    for f in sorted((ws / ".dvc" / "cache").rglob("*")):
        if not f.is_file():
            continue
        parts = f.relative_to(ws / ".dvc" / "cache").parts
        if parts[:2] == ("files", "md5") and len(parts) == 4:
            ok = hashlib.md5(f.read_bytes()).hexdigest() == parts[2] + parts[3].removesuffix(".dir")
        elif parts[0] == "runs" and len(parts) == 4:
            try:
                ok = dict_sha256(parse_yaml(f.read_text(), str(f)), exclude=["size", "nfiles"]) == parts[3]
            except (YAMLFileCorruptedError, AttributeError, TypeError):
                ok = False
        else:
            ok = False
        checked += 1
        if not ok:
            problems.append("/".join(parts))
    return problems, checked


def timed_repro(ws: Path, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """An uninterrupted ``dvc repro``: its duration and its output lines with their times since the start."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["dvc", "repro"], cwd=ws, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = [(time.monotonic() - t0, line.rstrip("\n")) for line in proc.stdout]
    proc.wait()
    log.write_text("\n".join(text for _, text in lines) + "\n")
    assert proc.returncode == 0, f"dvc repro failed in {ws}:\n{log.read_text()}"
    return time.monotonic() - t0, lines


def killed_repro(ws: Path, log: Path, after: str, later: tuple[str, ...] = (), offset: float = 0.0,
                 points: tuple[str, ...] = ()) -> dict:
    """``dvc repro`` killed (SIGKILL to its whole process group) ``offset`` s after the line ``after``
    appears in its output (or, if it does not come, any of ``later``), unless it ends first.

    ``points`` are kill points (``tests/killpoint/sitecustomize.py``) where its stage processes stop
    and wait; the line each prints when reached counts as ``after`` too.
    """
    t0 = time.monotonic()
    env = killpoint_env(ENV, *points)
    with log.open("w") as out:
        proc = subprocess.Popen(["dvc", "repro"], cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        kill_at, killed = None, False
        while proc.poll() is None:
            now = time.monotonic()
            if kill_at is None and any(line in log.read_text() for line in (after, *later, REACHED)):
                kill_at = now + offset
            if (kill_at is not None and now >= kill_at) or now - t0 > 300:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.02)
    text = log.read_text()
    repaired = False
    if killed and inspect_locks(ws).rwlock_corrupt:
        # the kill landed inside DVC's in-place rewrite of .dvc/tmp/rwlock (truncate, then write):
        # DVC alone would now refuse every command; the remedy we document is `kdpipe unlock`
        fix = subprocess.run([sys.executable, "-m", "pipeline.cli", "unlock", "--workspace", str(ws)],
                             capture_output=True, text=True, timeout=120)
        assert fix.returncode == 0 and "unreadable" in fix.stdout, fix.stdout + fix.stderr
        repaired = True
    if not killed and proc.returncode != 0:  # e.g. a lock a killed run left behind: report DVC's own words
        pytest.fail(f"dvc repro after a kill failed by itself (exit {proc.returncode}):\n{text}")
    return {"at_s": round(time.monotonic() - t0, 2), "killed": killed, "rwlock_repaired": repaired, "log": text,
            "stages": re.findall(r"Running stage '([^']+)'", text),
            "resumed": {m["run"]: int(m["epoch"]) for m in RESUMED.finditer(text)}}


def check_resumed(previous_state: dict[str, int], attempt: dict) -> None:
    """A run that left a resume checkpoint at epoch N and trained again says it resumed after epoch N."""
    assert "starting afresh" not in attempt["log"], attempt["log"]
    for run, epoch in previous_state.items():
        if f"[{run}] epoch" in attempt["log"] or f"[{run}] resuming" in attempt["log"]:
            assert attempt["resumed"].get(run) == epoch, (run, epoch, attempt["log"])


def test_ten_kills_then_a_full_run_end_where_an_uninterrupted_run_does(tmp_path: Path):
    t_start = time.monotonic()
    ref = make_workspace(tmp_path / "reference", PARAMS)
    ws = tmp_path / "killed"
    subprocess.run(["git", "clone", "-q", str(ref), str(ws)], check=True)  # same commit: same provenance
    logs = tmp_path / "logs"
    logs.mkdir()

    expected_s, lines = timed_repro(ref, logs / "reference.log")
    reference = outs(ref)
    assert sum(text.startswith("[teacher] epoch ") for _, text in lines) == EPOCHS
    starts = [(t, m[1]) for t, text in lines if (m := re.match(r"Running stage '([^']+)'", text))]
    stages = [name for _, name in starts]
    took = {name: end - t for (t, name), end in zip(starts, [t for t, _ in starts[1:]] + [expected_s], strict=True)}

    rng = random.Random(SEED)
    # Kill points: the teacher mid-epoch (epoch e, batch b: epoch e - 1 is its last checkpoint), the teacher's
    # stage once its outs are written but before DVC records them, the KD student mid-epoch.
    teacher_at, kd_at = rng.randint(2, EPOCHS - 1), rng.randint(2, EPOCHS - 1)
    plan = [{"after": REACHED, "points": (f"epoch:teacher:{teacher_at}:{rng.randint(0, 3)}",)},
            {"after": REACHED, "points": ("exit:stages.train_teacher",)},
            {"after": REACHED, "points": (f"epoch:kd/tinynet_s:{kd_at}:{rng.randint(0, 3)}",)}]
    # Then seven at seeded points of the run: a stage (the k-th kill in the k-th seventh of the pipeline's
    # stages) and a time within the duration that stage took in the reference run; the report stage waits at
    # its start, so a run that gets that far before the time is up is killed there.
    spread = KILLS - len(plan)
    for i in (int((k + rng.random()) * len(stages) / spread) for k in range(spread)):
        plan.append({"after": f"Running stage '{stages[i]}'", "offset": rng.uniform(0.0, took[stages[i]]),
                     "later": tuple(f"Running stage '{name}'" for name in stages[i + 1:]),
                     "points": ("start:stages.report",)})
    attempts, state = [], {}
    for i, when in enumerate(plan):
        attempt = killed_repro(ws, logs / f"kill_{i:02d}.log", **when)
        check_resumed(state, attempt)
        state = resume_state(ws)
        attempts.append({**when, **attempt, "state_left": state})
    final_s, final_lines = timed_repro(ws, logs / "final.log")
    final = {"log": "\n".join(t for _, t in final_lines),
             "resumed": {m["run"]: int(m["epoch"]) for m in RESUMED.finditer("\n".join(t for _, t in final_lines))}}
    check_resumed(state, final)

    summary = {
        "reference_s": round(expected_s, 1), "final_s": round(final_s, 1),
        "total_s": round(time.monotonic() - t_start, 1),
        "stage_seconds": {k: round(v, 1) for k, v in took.items()},
        "kills": [{k: a.get(k) for k in ("after", "points", "offset", "at_s", "killed", "rwlock_repaired", "stages",
                                                "resumed", "state_left")}
                  for a in attempts],
        "final_resumed": final["resumed"],
        "dvc_lock_notes": sorted({re.sub(r"\(Pid \d+\)", "(Pid N)", line) for a in [*attempts, final]
                                  for line in a["log"].splitlines() if "lock" in line.lower() and "dvc.lock" not in line}),
        "leftovers": leftovers(ws),
    }
    print(json.dumps(summary, indent=1))
    (logs / "summary.json").write_text(json.dumps(summary, indent=1))

    assert all(a["killed"] for a in attempts), f"every run should have been killed mid-way: {summary}"
    # the teacher was killed in epoch teacher_at, after epoch teacher_at - 1's checkpoint, and resumed from it
    assert attempts[0]["state_left"].get("teacher") == teacher_at - 1, summary
    assert attempts[1]["resumed"].get("teacher") == teacher_at - 1, summary
    # killed after its training finished but before DVC recorded it: the rerun trained no epoch
    assert attempts[1]["state_left"].get("teacher") == EPOCHS, summary
    assert attempts[2]["resumed"].get("teacher") == EPOCHS and "[teacher] epoch " not in attempts[2]["log"], summary
    assert "nothing left to train" in attempts[2]["log"], summary
    assert attempts[2]["state_left"].get("kd/tinynet_s") == kd_at - 1, summary
    resumed = {run for a in [*attempts, final] for run, epoch in a["resumed"].items() if epoch >= 1}
    assert {"teacher", "kd/tinynet_s"} <= resumed, f"training did not resume after a kill: {summary}"

    got = outs(ws)
    assert got.keys() == reference.keys(), sorted(got.keys() ^ reference.keys())
    differ = sorted(k for k in reference if k not in TIMED and got[k] != reference[k])
    assert not differ, f"outs differ from the uninterrupted run: {differ}"
    assert all((ws / k).stat().st_size > 0 for k in TIMED)

    status = subprocess.run(["dvc", "status", "--json"], cwd=ws, env=ENV, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout + status.stderr
    problems, checked = cache_problems(ws)
    assert checked > 20 and not problems, f"half-written or stray files in .dvc/cache: {problems}"
    # finished runs' kept state is gone once DVC recorded them (every later stage prunes it)
    assert not (ws / ".kdpipe" / "state").exists() or not any((ws / ".kdpipe" / "state").rglob("last.pt"))

    lock_ref, lock_got = lock_hashes(ref), lock_hashes(ws)
    assert len(lock_ref) > 30 and lock_got == lock_ref  # every dep and out hash DVC recorded, as uninterrupted

    stray = leftovers(ws)
    assert not stray, f"temp files of killed writes left in the out folders: {stray}"
