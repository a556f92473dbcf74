"""Sweeps and comparisons as the user runs them (`kdpipe sweep`, `kdpipe compare`): each experiment in its
own clone, on a real Dask LocalCluster of 2 worker processes or through a local-directory DVC remote;
every result back in `dvc exp show` of the workspace, the teacher trained once per distinct teacher
params, failures named in the report, a killed worker's experiment run again, a re-run running nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import killpoint_env, make_workspace, tiny_params

pytestmark = pytest.mark.usefixtures("prefect_api")  # one Prefect server for every sweep here

PARAMS = tiny_params(train={"epochs": 1}, teacher={"model": "tinynet_s"})


def kdpipe(ws: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=1500)


def started(log: Path) -> Counter:
    """How many times each stage module started (a stage restored from DVC's run-cache starts none)."""
    return Counter(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else Counter()


def experiments(ws: Path) -> dict[str, dict]:
    from pipeline.orchestrate.experiments import experiment_table

    return {e["name"]: e for e in experiment_table(ws)}


def counting_env(tmp_path: Path, *points: str) -> tuple[dict[str, str], Path]:
    once = tmp_path / "once"
    once.mkdir(exist_ok=True)
    log = tmp_path / "starts.log"
    env = killpoint_env(dict(os.environ), *points)
    return {**env, "KDPIPE_STAGE_STARTS": str(log), "KDPIPE_KILLPOINTS_ONCE": str(once)}, log


@pytest.mark.slow
def test_a_sweep_on_a_dask_local_cluster_survives_a_killed_worker_and_a_bad_point(tmp_path: Path):
    pytest.importorskip("prefect_dask", reason="the dask extra is not installed: pip install -e '.[dask]'")
    ws = make_workspace(tmp_path / "ws", PARAMS)
    env, starts = counting_env(tmp_path, "killworker:stages.distill")
    args = ["sweep", "--grid", "distill.kd.temperature=[2, 3, -1]", "--seeds", "0", "1",
            "--target", "evaluate_distill@tinynet_s-kd", "--dask", "local:2", "--name", "temps"]
    proc = kdpipe(ws, *args, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]  # the bad point fails the sweep, after the others finished
    assert "2 of 6 sweep experiments failed" in out
    assert "sweep temps: queued 2, running 2, done 0, failed 2" in out  # progress as it goes, then the end
    assert "sweep temps: queued 0, running 0, done 4, failed 2" in out

    report = json.loads((ws / "reports" / "sweeps" / "temps.json").read_text())
    failed = {f["name"]: f for f in report["failures"]}
    assert set(failed) == {"temps-c2-s0", "temps-c2-s1"}
    assert all("bad params" in f["why"] and "temperature" in f["why"] for f in failed.values())
    md = (ws / "reports" / "sweeps" / "temps.md").read_text()
    assert "## Failed experiments (2)" in md and "### temps-c2-s0" in md

    exps = experiments(ws)
    good = [f"temps-c{c}-s{s}" for c in (0, 1) for s in (0, 1)]
    for name in good:  # in the workspace's `dvc exp show`, metrics readable from the shared cache
        assert 0 <= exps[name]["metrics"]["metrics/kd/tinynet_s.json"]["top1"] <= 100, name
    assert exps["temps-c1-s1"]["params"]["distill.kd.temperature"] == 3 and exps["temps-c1-s1"]["params"]["seed"] == 1

    runs = started(starts)
    assert runs["stages.train_teacher"] == 2  # once per seed: the other experiments restored it
    assert runs["stages.distill"] == 5  # four experiments, and the one whose worker was killed ran again
    assert (tmp_path / "once" / "killworker-stages.distill").exists()

    rows = {(r["config"], r["model"]): r for r in report["rows"]}
    top1 = [exps[f"temps-c0-s{s}"]["metrics"]["metrics/kd/tinynet_s.json"]["top1"] for s in (0, 1)]
    assert rows[("distill.kd.temperature=2", "kd/tinynet_s")]["top1_mean"] == pytest.approx(sum(top1) / 2, abs=1e-3)
    assert rows[("distill.kd.temperature=2", "kd/tinynet_s")]["seeds"] == 2
    assert rows[("distill.kd.temperature=2", "kd/tinynet_s")]["top1_std"] == pytest.approx(
        abs(top1[0] - top1[1]) / 2 ** 0.5, abs=1e-3)  # the sample std of the two seeds

    again = kdpipe(ws, *args, env=env)  # only what is missing runs: nothing but the refused points
    assert again.returncode == 1 and "4 already in the workspace" in again.stdout + again.stderr
    assert started(starts) == runs


@pytest.mark.slow
def test_a_comparison_through_a_dvc_remote_pairs_each_method_with_its_student_alone(tmp_path: Path):
    # one seed, an offline and an online method: the mean and spread over seeds are the Dask test's
    ws = make_workspace(tmp_path / "ws", PARAMS)
    store = tmp_path / "store"
    subprocess.run(["dvc", "remote", "add", "store", str(store)], cwd=ws, check=True)
    subprocess.run(["git", "commit", "-qam", "a DVC remote"], cwd=ws, check=True)
    env, starts = counting_env(tmp_path)
    proc = kdpipe(ws, "compare", "--methods", "kd,dml", "--students", "tinynet_s", "--seeds", "0",
                  "--remote", "store", "-j", "2", "--name", "cmp", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert any(store.rglob("*")), "nothing was pushed to the DVC remote"

    exps = experiments(ws)  # pulled back from the remote: the metrics are in the workspace's cache
    report = json.loads((ws / "reports" / "sweeps" / "cmp.json").read_text())
    rows = {(r["method"], r["student"]): r for r in report["compare"]}
    assert set(rows) == {("kd", "tinynet_s"), ("dml", "tinynet_s")}
    for method in ("kd", "dml"):
        m = exps[f"cmp-{method}-tinynet_s-s0"]["metrics"]
        gain = m[f"metrics/{method}/tinynet_s.json"]["top1"] - m["metrics/baseline/tinynet_s.json"]["top1"]
        assert rows[(method, "tinynet_s")]["seeds"] == 1
        assert rows[(method, "tinynet_s")]["gain_mean"] == pytest.approx(gain, abs=1e-3)
        ran = next(e for e in report["experiments"] if e["name"] == f"cmp-{method}-tinynet_s-s0")
        assert rows[(method, "tinynet_s")]["wall_s_mean"] == pytest.approx(ran["seconds"], abs=0.1)  # its own run's
        # the seed's paired test, on the predictions read from the experiment's outs (pulled from the remote):
        # the images only one of the two gets right differ by exactly the gain in images
        (seed,) = rows[(method, "tinynet_s")]["per_seed"]
        n = m[f"metrics/{method}/tinynet_s.json"]["test_samples"]
        assert seed["only_model"] - seed["only_alone"] == round(gain * n / 100) and 0 < seed["p_value"] <= 1
    # the second experiment waited for the first, then restored its teacher through the remote's run-cache
    assert started(starts)["stages.train_teacher"] == 1
    md = (ws / "reports" / "sweeps" / "cmp.md").read_text()
    assert "| kd | tinynet_s | 1 |" in md and "student alone" in md and "### Each seed against its student alone" in md


def test_bad_comparisons_and_remotes_are_refused_in_one_line_before_anything_runs(tmp_path: Path, capsys):
    from pipeline.cli import main  # in this process: each is refused before a flow or a clone starts

    ws = make_workspace(tmp_path / "ws", PARAMS)

    def refused(*args: str) -> str:
        assert main([*args, "--workspace", str(ws)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line
        return err

    err = refused("compare", "--methods", "kd,nope", "--students", "tinynet_s")
    assert "unknown ['nope']; allowed:" in err and "dkd" in err
    assert "['resnet999'] not in params.yaml `students`" in refused("compare", "--methods", "kd", "--students",
                                                                    "resnet999")
    assert "--remote 'nowhere' is not a DVC remote" in refused("sweep", "--grid", "distill.kd.temperature=[2]",
                                                               "--remote", "nowhere")
    assert "temprature" in refused("sweep", "--grid", "distill.kd.temprature=[2]")  # every point refused: a typo
    assert not (ws / "reports" / "sweeps").exists() and experiments(ws).keys() <= {"workspace", "master", "main"}
