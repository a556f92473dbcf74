"""The orchestration's parts that need no flow: the stage DAG's schedule, device slots, --jobs and --dask values."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.orchestrate.dag import StageGraph
from pipeline.orchestrate.runners import DaskTarget, parse_dask
from pipeline.orchestrate.schedule import critical_path, load_seconds, pick, save_seconds, simulate
from pipeline.orchestrate.slots import SlotPlan, claim, parse_jobs, plan_slots

# teacher -> kd, dkd; student -> kd, dkd; kd, dkd -> export -> bench (exclusive) -> report; notes -> report
GRAPH = StageGraph(
    order=["notes", "student", "teacher", "dkd", "kd", "export", "bench", "report"],
    upstream={"notes": [], "student": [], "teacher": [], "dkd": ["student", "teacher"], "kd": ["student", "teacher"],
              "export": ["dkd", "kd"], "bench": ["export"], "report": ["bench", "notes"]},
    exclusive=frozenset({"bench"}),
)
SECONDS = {"notes": 1, "student": 4, "teacher": 10, "dkd": 6, "kd": 5, "export": 3, "bench": 2, "report": 1}


def test_critical_path_weights_each_chain_by_its_durations():
    path = critical_path(GRAPH, SECONDS)
    assert path["report"] == 1 and path["bench"] == 3 and path["export"] == 6
    assert path["teacher"] == 10 + 6 + 6  # through dkd, the longer of its two children
    assert path["notes"] == 2
    untimed = critical_path(GRAPH, {})
    assert untimed["teacher"] == 5  # teacher, dkd, export, bench, report: one second each


def test_pick_starts_the_longest_chain_first_and_fills_the_free_slots():
    prio = critical_path(GRAPH, SECONDS)
    assert pick(["notes", "student", "teacher"], [], 2, GRAPH, prio) == ["teacher", "student"]
    assert pick(["notes", "student"], ["teacher"], 2, GRAPH, prio) == ["student"]
    assert pick(["notes"], ["teacher", "student"], 2, GRAPH, prio) == []


def test_an_exclusive_stage_waits_for_an_idle_machine_and_nothing_starts_beside_it():
    prio = critical_path(GRAPH, SECONDS)
    assert pick(["bench", "notes"], ["kd"], 4, GRAPH, prio) == []  # bench is first in line: it waits, notes too
    assert pick(["bench", "notes"], [], 4, GRAPH, prio) == ["bench"]
    assert pick(["notes"], ["bench"], 4, GRAPH, prio) == []


def test_simulate_plays_the_schedule_on_n_slots():
    todo = set(GRAPH.order)
    serial = simulate(GRAPH, todo, SECONDS, 1)
    assert serial == sum(SECONDS.values())
    # two slots: teacher | student+notes, then dkd | kd, export, bench alone, report
    assert simulate(GRAPH, todo, SECONDS, 2) == 10 + 6 + 3 + 2 + 1
    assert simulate(GRAPH, todo, SECONDS, 8) == 10 + 6 + 3 + 2 + 1  # the critical path bounds it
    assert simulate(GRAPH, {"report"}, SECONDS, 2) == 1  # only what is to run counts


def test_stage_seconds_are_kept_across_runs(tmp_path: Path):
    assert load_seconds(tmp_path) == {}
    save_seconds(tmp_path, {"teacher": 10.123})
    save_seconds(tmp_path, {"kd": 2})
    assert load_seconds(tmp_path) == {"kd": 2.0, "teacher": 10.12}
    (tmp_path / ".kdpipe" / "stage_seconds.json").write_text("{not json")
    assert load_seconds(tmp_path) == {}  # an unreadable file only loses the priorities


def test_jobs_values():
    assert parse_jobs("3") == 3 and parse_jobs(2) == 2 and parse_jobs("auto") == "auto"
    for bad in ("0", "-1", "two", "", 0):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            parse_jobs(bad)


def test_gpu_slots_get_one_gpu_each_and_auto_picks_their_number(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    plan = plan_slots("auto", cpu_threads=1)
    assert plan.jobs == 2 and plan.gpus == ("3", "5")
    assert plan.slot(1).env()["CUDA_VISIBLE_DEVICES"] == "5" and plan.slot(1).env()["OMP_NUM_THREADS"] == "1"
    assert plan_slots(4, cpu_threads=1).slot(3).gpu == "5"  # more jobs than GPUs share them round-robin


def test_cpu_slots_fix_the_thread_count_or_share_the_cores(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("pipeline.orchestrate.slots.cpu_cores", lambda: 8)
    assert plan_slots("auto", cpu_threads=2) == SlotPlan(4, (), 2)
    assert plan_slots(2, cpu_threads=None) == SlotPlan(2, (), 4)
    env = plan_slots(2, cpu_threads=None).slot(0).env()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4"


def test_claimed_slots_are_distinct_while_held():
    plan = SlotPlan(2, ("0", "1"), 1)
    with claim(plan) as a, claim(plan) as b:
        assert {a.gpu, b.gpu} == {"0", "1"}
    with claim(plan) as c:
        assert c.index in (0, 1)


def test_dask_values():
    assert parse_dask("local:2") == DaskTarget(workers=2)
    assert parse_dask("tcp://10.0.0.5:8786") == DaskTarget(address="tcp://10.0.0.5:8786")
    assert parse_dask("scheduler:8786").address == "scheduler:8786"
    for bad in ("local:0", "local", "somewhere", "tcp://"):
        with pytest.raises(ValueError, match="--dask"):
            parse_dask(bad)
