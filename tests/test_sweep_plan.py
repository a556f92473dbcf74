"""The plan of a sweep without running it: comparisons, which experiments wait for which, the report's rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.orchestrate.experiments import QueuedExperiment, compare_plan, leaders, shared_stage_keys
from pipeline.report.sweep import compare_rows, sweep_markdown
from tests.conftest import make_workspace, tiny_params


def test_compare_plan_runs_each_method_student_and_seed_against_the_student_alone():
    plan = compare_plan("cmp", ["kd", "dml"], ["a", "b"], [0, 1], known_students=["a", "b", "c"])
    assert len(plan) == 8
    kd = next(e for e in plan if e.name == "cmp-kd-b-s1")
    assert kd.overrides == {"distill.methods": ["kd"]} and kd.seed == 1
    assert kd.targets == ("evaluate_teacher", "evaluate_baseline@b", "evaluate_distill@b-kd")
    dml = next(e for e in plan if e.name == "cmp-dml-a-s0")
    assert dml.overrides == {"online.methods": ["dml"]} and dml.targets[-1] == "evaluate_online@a-dml"
    assert dml.labels == {"method": "dml", "student": "a"}
    with pytest.raises(ValueError, match=r"unknown \['nope'\]; allowed: .*crd"):
        compare_plan("cmp", ["kd", "nope"], ["a"], [0], ["a"])
    with pytest.raises(ValueError, match=r"\['z'\] not in params.yaml `students`; there: a, b"):
        compare_plan("cmp", ["kd"], ["z"], [0], ["a", "b"])


def test_an_experiment_waits_for_the_first_one_that_runs_the_same_teacher(tmp_path: Path):
    ws = make_workspace(tmp_path / "ws", tiny_params())
    shared = shared_stage_keys(ws)
    assert "train_teacher" in shared and "evaluate_teacher" in shared
    assert not any("@" in s for s in shared)  # per-student and per-method stages move with the params
    assert "export" not in shared  # it depends on every student: not the same in two experiments
    assert "seed" in shared["train_teacher"][0]

    plan = [QueuedExperiment(f"e{i}", {}, seed) for i, seed in enumerate([0, 1, 0, 1, 2])]
    base = {"seed": 0, "teacher": {"model": "tinynet_m"}, "train": {"epochs": 2}}
    params = {e.name: {**base, "seed": e.seed} for e in plan}
    params["e4"] = {**base, "seed": 0, "teacher": {"model": "tinynet_s"}}  # seed 0, another teacher
    waits = leaders(plan, params, shared, {e.name: None for e in plan})
    assert waits == {"e0": set(), "e1": set(), "e2": {"e0"}, "e3": {"e1"}, "e4": set()}
    # an experiment whose targets do not reach the teacher waits for no one
    only_data = {e.name: {"evaluate_baseline@tinynet_s"} for e in plan}
    assert all(not w for w in leaders(plan, params, shared, only_data).values())


def test_compare_rows_pair_each_seed_with_its_own_student_alone():
    plan = [QueuedExperiment(f"c-kd-a-s{s}", {}, s, labels={"method": "kd", "student": "a"}) for s in (0, 1)]
    metrics = {0: (80.0, 75.0), 1: (82.0, 79.0)}
    table = [{"name": f"c-kd-a-s{s}", "params": {}, "metrics": {
        "metrics/kd/a.json": {"top1": m}, "metrics/baseline/a.json": {"top1": alone},
        "metrics/teacher.json": {"top1": 90.0}}} for s, (m, alone) in metrics.items()]
    (row,) = compare_rows(table, plan, {"c-kd-a-s0": 10.0, "c-kd-a-s1": 14.0})
    assert row["seeds"] == 2 and row["top1_mean"] == 81.0 and row["alone_mean"] == 77.0
    assert row["gain_mean"] == 4.0 and row["gain_std"] == pytest.approx(2 ** 0.5, abs=1e-4)  # gains 5 and 3
    assert row["wall_s_mean"] == 12.0 and row["teacher_mean"] == 90.0
    assert row["gap_recovered_mean"] == pytest.approx((5 / 15 + 3 / 11) / 2, abs=1e-4)
    assert [d["seed"] for d in row["per_seed"]] == [0, 1] and "p_value" not in row["per_seed"][0]
    md = sweep_markdown([], "c", [row], [{"name": "c-x", "why": "exited with 1", "log": "Traceback"}])
    assert "| kd | a | 2 | 81.00 ± 1.41 | 77.00 ± 2.83 | +4.00 ± 1.41 | +0.30 ± 0.04 | — | 90.00 ± 0.00 | 12.0 |" in md
    assert "| kd | a | 0 | 80.00 | 75.00 | +5.00 | — | — | — | no per-image predictions |" in md
    assert "## Failed experiments (1)" in md and "Traceback" in md


def test_each_seed_of_a_comparison_gets_its_own_exact_mcnemar_test():
    from scipy.stats import binomtest

    plan = [QueuedExperiment(f"c-kd-a-s{s}", {}, s, labels={"method": "kd", "student": "a"}) for s in (0, 1)]
    # seed 0: 12 images only KD gets right, 1 only the student alone (significant); seed 1: 3 against 2 (noise)
    pairs = {0: [(True, False)] * 12 + [(False, True)] + [(True, True)] * 80 + [(False, False)] * 7,
             1: [(True, False)] * 3 + [(False, True)] * 2 + [(True, True)] * 90 + [(False, False)] * 5}
    correct = {f"c-kd-a-s{s}": {"kd/a": [a for a, _ in p], "baseline/a": [b for _, b in p]} for s, p in pairs.items()}
    table = [{"name": f"c-kd-a-s{s}", "params": {}, "metrics": {
        "metrics/kd/a.json": {"top1": float(sum(a for a, _ in p))}, "metrics/baseline/a.json":
            {"top1": float(sum(b for _, b in p))}, "metrics/teacher.json": {"top1": 99.0}}} for s, p in pairs.items()]
    (row,) = compare_rows(table, plan, None, correct)
    s0, s1 = row["per_seed"]
    assert (s0["only_model"], s0["only_alone"], s1["only_model"], s1["only_alone"]) == (12, 1, 3, 2)
    assert s0["p_value"] == pytest.approx(binomtest(1, 13, 0.5).pvalue) and s0["significant"]
    assert s1["p_value"] == pytest.approx(binomtest(2, 5, 0.5).pvalue) and not s1["significant"]
    assert (row["paired_seeds"], row["better_seeds"], row["worse_seeds"]) == (2, 1, 0)
    md = sweep_markdown([], "c", [row])
    assert "| 1 / 0 of 2 |" in md
    assert f"| kd | a | 0 | 92.00 | 81.00 | +11.00 | 12 | 1 | {s0['p_value']:.3g} | better, significant |" in md
    assert f"| kd | a | 1 | 93.00 | 92.00 | +1.00 | 3 | 2 | {s1['p_value']:.3g} | within noise |" in md
