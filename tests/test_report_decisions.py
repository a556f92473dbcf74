"""The report's decisions beyond noise (pipeline/report/decisions.py): McNemar on the same test images, separated
latency intervals, one graph a tie; the front and the pick do not move when latency points jitter inside their
intervals; both pick rules; results.md opens with the picks; the Pareto plot's legend fits its figure."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.config.deploy import ReportConfig
from pipeline.report.decisions import (
    Noise,
    choose,
    correct_from_predictions,
    latency_interval,
    noise_front,
    row_key,
)
from pipeline.report.markdown import markdown, profile_lines
from pipeline.report.results import model_summary, read_predictions, summarize
from pipeline.report.rows import best_under_budget, label, pareto_front, row_latency
from pipeline.stats import paired_test

IMAGES = 359


def _row(run: str, precision: str, top1_right: int, p50: float | None, ci: tuple[float, float] | None = None,
         graph: str | None = None, kib: float = 30.0, runtime: str = "onnxruntime", role: str = "distilled",
         profile: str = "edge") -> dict:
    student, method = (run.split("/")[1], run.split("/")[0]) if "/" in run else (None, None)
    head = None if p50 is None else {"p50_ms": p50, "p90_ms": p50 * 1.2, "p99_ms": p50 * 1.5,
                                     **({"p50_ci_ms": list(ci), "ci_level": 0.95, "rounds": 7} if ci else {})}
    return {"run": run, "role": role, "student": student, "method": method, "arch": student or "tinynet_l",
            "runtime": runtime, "precision": precision, "top1": 100.0 * top1_right / IMAGES, "top5": 100.0,
            "bytes": int(kib * 1024), "bundle": run.replace("/", "-"), "graph_sha256": graph, "params": 1000,
            "macs": 5000, "latency": {profile: head}}


def _correct(right: int, shift: int = 0) -> list[bool]:
    """``right`` correct images of IMAGES; ``shift`` moves which ones (so two vectors disagree on 2 x shift images)."""
    base = [i < right for i in range(IMAGES)]
    return base[shift:] + base[:shift] if shift else base


def _predictions(rows: list[dict], correct: dict) -> dict:
    """A ``reports/predictions.json`` document: label 0 everywhere, class 0 where right and 1 where wrong."""
    models: dict = {}
    for r in rows:
        run, runtime, variant = row_key(r)
        models.setdefault(run, {}).setdefault(runtime, {})[variant] = [0 if ok else 1 for ok in correct[row_key(r)]]
    return {"format": "kdpipe-predictions/1", "test_images": IMAGES, "labels": [0] * IMAGES, "models": models}


def _scene() -> tuple[list[dict], dict]:
    """Students whose fp32 files share one graph, INT8 files, OpenVINO, a teacher too large for the device.

    Latency intervals of the fp32 files overlap (onnxruntime's also share one graph), the INT8 file
    is separated from them; accuracies differ by a few images (within noise) except the weak baseline.
    """
    g = "graph-xs-fp32"
    rows = [
        _row("teacher", "fp32", 352, 0.090, (0.088, 0.093), "graph-l", kib=1144, role="teacher"),
        _row("baseline/xs", "fp32", 300, 0.0312, (0.0305, 0.0320), g, role="baseline"),
        _row("kd/xs", "fp32", 350, 0.0313, (0.0306, 0.0321), g, kib=30.2),
        _row("ekd/xs", "fp32", 351, 0.0310, (0.0304, 0.0319), g, kib=30.1),
        _row("ekd/xs", "int8", 352, 0.0450, (0.0440, 0.0462), "graph-xs-int8", kib=12.0),
        _row("dkd/xs", "fp32", 349, 0.0318, (0.0309, 0.0322), g),
        _row("ekd/xs", "fp32", 351, 0.0304, (0.0296, 0.0312), g, runtime="openvino", kib=30.1),
    ]
    correct = {row_key(r): _correct(round(r["top1"] * IMAGES / 100), shift=i) for i, r in enumerate(rows)}
    return rows, correct


PROFILE = [{"name": "edge", "latency_budget_ms": 1.0, "size_budget_kib": 256}]


def _jitter(rows: list[dict], rng: random.Random) -> list[dict]:
    """The same rows with each latency point moved to a random place inside its interval."""
    out = []
    for r in rows:
        head = dict(r["latency"]["edge"])
        low, high = head["p50_ci_ms"]
        head["p50_ms"] = rng.uniform(low, high)
        out.append({**r, "latency": {"edge": head}})
    return out


# --------------------------------------------------------------------------- noise on each axis


def test_one_image_is_within_noise_and_many_are_beyond_it():
    a, b = _row("kd/xs", "fp32", 351, 0.1), _row("at/xs", "fp32", 350, 0.1)
    c = _row("baseline/xs", "fp32", 320, 0.1, role="baseline")
    noise = Noise({row_key(a): _correct(351), row_key(b): _correct(350), row_key(c): _correct(320)})
    assert noise.p_value(a, b) == pytest.approx(paired_test(_correct(351), _correct(350)).p_value) == 1.0
    assert noise.accuracy(a, b) == noise.accuracy(b, a) == 0  # one test image of 359: not beyond noise
    assert noise.p_value(a, c) < 1e-6 and noise.accuracy(a, c) == 1 and noise.accuracy(c, a) == -1
    assert Noise({**noise.correct}, alpha=1e-12).accuracy(a, c) == 0  # the level is a setting
    # without per-image predictions the top-1 are compared as points: any difference counts
    assert Noise().accuracy(a, b) == 1 and Noise().accuracy(b, a) == -1 and Noise().accuracy(a, a) == 0


def test_latency_needs_separated_intervals_and_one_graph_always_ties():
    fast = _row("kd/xs", "fp32", 350, 0.030, (0.029, 0.031), graph="g")
    near = _row("at/xs", "fp32", 350, 0.0305, (0.0300, 0.0320), graph="h")
    slow = _row("dkd/xs", "fp32", 350, 0.040, (0.039, 0.041), graph="g")
    other = _row("rkd/xs", "fp32", 350, 0.040, (0.039, 0.041), graph="h")
    noise = Noise()
    assert noise.latency(fast, near, "edge") == 0  # overlapping intervals
    assert noise.latency(fast, other, "edge") == 1 and noise.latency(other, fast, "edge") == -1
    assert noise.latency(fast, slow, "edge") == 0  # separated, but one graph: only the weights differ
    assert not noise.dominates(fast, slow, "edge") and noise.ties(fast, slow, "edge")
    ov = {**slow, "runtime": "openvino"}
    assert noise.latency(fast, ov, "edge") == 1  # another runtime runs the graph its own way
    point = _row("a/xs", "fp32", 350, 0.030)  # no interval: the point itself
    assert latency_interval(point, "edge").text() == "0.03" and noise.latency(point, other, "edge") == 1
    assert latency_interval({**point, "latency": {"edge": {"p50_ms": 0.03, "p50_ci_ms": [0.031, 0.04]}}},
                            "edge").low == 0.03  # widened to hold the point
    assert latency_interval(point, "server") is None and noise.latency(point, {**point, "latency": {}}, "edge") == 0


def test_dominance_needs_one_axis_beyond_noise_and_the_other_not_worse():
    a = _row("kd/xs", "fp32", 350, 0.030, (0.029, 0.031))
    b = _row("at/xs", "fp32", 300, 0.0305, (0.0295, 0.0315))  # far less accurate, same latency within noise
    c = _row("rkd/xs", "fp32", 300, 0.020, (0.019, 0.021))  # far less accurate but faster beyond noise
    noise = Noise({row_key(a): _correct(350), row_key(b): _correct(300), row_key(c): _correct(300)})
    assert noise.dominates(a, b, "edge") and not noise.dominates(b, a, "edge")
    assert not noise.dominates(a, c, "edge") and not noise.dominates(c, a, "edge")  # a trade-off
    assert [[label(r) for r in g] for g in noise_front([a, b, c], "edge", noise=noise)] == [["xs/rkd fp32"],
                                                                                            ["xs/kd fp32"]]


# --------------------------------------------------------------------------- front and pick do not move


def test_front_and_pick_stay_put_while_latency_points_jitter_inside_their_intervals():
    rows, correct = _scene()
    rng = random.Random(0)
    fronts, picks, raw_fronts, raw_picks = set(), set(), set(), set()
    for _ in range(60):
        jittered = _jitter(rows, rng)
        s = summarize(jittered, PROFILE, "p50", IMAGES, "cheapest_within_noise", correct)["edge"]
        fronts.add(tuple(tuple(g["model"] for g in group) for group in s["pareto_groups"]))
        picks.add(s["pick"]["model"])
        pts = [(row_latency(r, "edge"), r["top1"]) for r in jittered]
        raw_fronts.add(tuple(pareto_front(pts)))
        raw_picks.add(label(best_under_budget(jittered, "edge", 1.0, size_kib=256)))
    assert len(fronts) == 1 and len(picks) == 1, (fronts, picks)
    assert len(raw_fronts) > 1  # the raw-point front did move with the same jitter
    # the fp32 files tie within noise on both axes: one group, which dominates the slower INT8 file (one image
    # more) and the teacher; of the group the smallest files (within 1 %), then the most accurate, row order
    assert fronts == {(("xs/dkd fp32", "xs/kd fp32", "xs/ekd fp32", "xs/ekd fp32 OpenVINO"),)}
    assert picks == {"xs/ekd fp32"} and raw_picks == {"xs/ekd int8"}


def test_files_of_one_graph_tie_on_the_front_as_a_group():
    g = "graph-xs"
    rows = [_row("kd/xs", "fp32", 350, 0.0300, (0.0299, 0.0301), g),
            _row("at/xs", "fp32", 351, 0.0310, (0.0309, 0.0311), g),  # separated, but the same graph
            _row("baseline/xs", "fp32", 349, 0.0320, (0.0319, 0.0321), g, role="baseline")]
    correct = {row_key(r): _correct(round(r["top1"] * IMAGES / 100), shift=3 * i) for i, r in enumerate(rows)}
    s = summarize(rows, [{"name": "edge"}], "p50", IMAGES, correct=correct)["edge"]
    assert [[m["model"] for m in grp] for grp in s["pareto_groups"]] == [["xs/baseline fp32", "xs/kd fp32",
                                                                          "xs/at fp32"]]
    assert s["pareto_front"] == ["xs/baseline fp32", "xs/kd fp32", "xs/at fp32"] and s["pick"] is None
    # without the hash the fastest file is alone on the front: its interval is separated, accuracy within noise
    plain = [{**r, "graph_sha256": None} for r in rows]
    assert summarize(plain, [{"name": "edge"}], "p50", IMAGES, correct=correct)["edge"]["pareto_front"] == [
        "xs/kd fp32"]


def test_cheapest_within_noise_prefers_the_faster_then_the_smaller_file_and_says_why():
    ref = _row("ekd/xs", "int8", 352, 0.045, (0.044, 0.046), "q", kib=12.0)
    fast = _row("kd/xs", "fp32", 351, 0.031, (0.030, 0.032), "f", kib=30.0)
    twin = _row("at/xs", "fp32", 350, 0.031, (0.0305, 0.0315), "f", kib=30.2)  # same graph, 0.7 % larger
    small = _row("dkd/xs", "fp32", 349, 0.031, (0.0302, 0.0318), "f2", kib=20.0)
    weak = _row("baseline/xs", "fp32", 300, 0.020, (0.019, 0.021), "f3", kib=10.0, role="baseline")
    rows = [ref, fast, twin, small, weak]
    correct = {row_key(r): _correct(round(r["top1"] * IMAGES / 100), shift=i) for i, r in enumerate(rows)}
    noise = Noise(correct)
    pick = choose(rows, "edge", 1.0, None, rule="cheapest_within_noise", noise=noise)
    # the reference is the most accurate; the weak baseline is faster but significantly less accurate
    assert pick.reference is ref and weak not in pick.candidates and len(pick.candidates) == 4
    assert pick.faster == [fast, twin, small] and pick.row is small  # ref is slower beyond noise; smallest file
    s = summarize(rows, [{"name": "edge", "latency_budget_ms": 1.0}], "p50", IMAGES, correct=correct)["edge"]
    assert s["pick"]["model"] == "xs/dkd fp32" and s["reference"] == "xs/ekd int8" and s["rule"] == \
        "cheapest_within_noise"
    assert s["pick"]["latency_ci_ms"] == [0.0302, 0.0318] and s["pick"]["runtime"] == "onnxruntime"
    why = s["why"]
    assert why.startswith("5 of 5 models meet p50 <= 1 ms. The pick, xs/dkd fp32 (97.21 %), is the cheapest of "
                          "the models within noise of the most accurate, xs/ekd int8 (98.05 %")
    assert "3 other fitting models are within noise of xs/ekd int8 (exact McNemar p >= 0.05 on the same 359" in why
    assert "xs/ekd int8 is slower beyond noise than another (95 % p50 intervals)" in why
    assert "xs/kd fp32, xs/at fp32 and xs/dkd fp32 tie in latency within noise" in why
    assert "xs/dkd fp32 is the smallest file (20.0 KiB against 30.0 KiB)" in why
    # files within 1 % in size tie: then the most accurate of them
    rows2 = [ref, fast, twin]
    p2 = choose(rows2, "edge", 1.0, None, rule="cheapest_within_noise", noise=noise)
    assert p2.smallest == [fast, twin] and p2.row is fast
    assert "are within 1 % in file size, and xs/kd fp32 is the most accurate of them" in summarize(
        rows2, [{"name": "edge", "latency_budget_ms": 1.0}], "p50", IMAGES, correct=correct)["edge"]["why"]


def test_most_accurate_keeps_the_old_rule():
    rows, correct = _scene()
    s = summarize(rows, PROFILE, "p50", IMAGES, "most_accurate", correct)["edge"]
    old = best_under_budget(rows, "edge", 1.0, size_kib=256)
    assert s["pick"]["model"] == label(old) == "xs/ekd int8" and s["rule"] == "most_accurate"
    assert "The pick, xs/ekd int8, is the most accurate of them (98.05 %)." in s["why"]
    assert "other fitting models are within noise of it (exact McNemar" in s["why"]
    cheap = summarize(rows, PROFILE, "p50", IMAGES, "cheapest_within_noise", correct)["edge"]
    assert cheap["pick"]["model"] != s["pick"]["model"]
    with pytest.raises(ValueError, match="unknown pick rule"):
        choose(rows, "edge", 1.0, None, rule="fastest")
    assert ReportConfig().pick == "cheapest_within_noise" and ReportConfig().alpha == 0.05


def test_predictions_become_right_and_wrong_per_row(tmp_path):
    rows, correct = _scene()
    doc = _predictions(rows, correct)
    assert correct_from_predictions(doc) == correct
    assert correct_from_predictions(None) == {}
    doc["models"]["kd/xs"]["onnxruntime"]["fp32"] = [0, 1]  # not one class per label: left out
    assert ("kd/xs", "onnxruntime", "fp32") not in correct_from_predictions(doc)
    import json

    from pipeline.deploy.artifacts import DeployError

    f = tmp_path / "predictions.json"
    assert read_predictions(f) is None  # an older workspace: no file
    f.write_text(json.dumps({**doc, "format": "kdpipe-predictions/0"}))
    with pytest.raises(DeployError, match="format"):
        read_predictions(f)


# --------------------------------------------------------------------------- results.md and the plot


def test_results_md_opens_with_the_picks_then_the_summary_and_the_front():
    rows, correct = _scene()
    summary = summarize(rows, PROFILE, "p50", IMAGES, correct=correct)
    best = model_summary(rows, PROFILE, "p50", "cheapest_within_noise", correct)
    quantize = {"test_images": IMAGES, "models": {}}
    md = markdown(rows, summary, PROFILE, {"models": {}}, quantize, None, None, "p50", best=best)
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[:4] == ["## Picks (p50 latency with its 95 % interval, file size; rule `cheapest_within_noise`)",
                            "## Summary: each model's best variant per runtime",
                            "## Pareto front per profile (fastest first; beyond noise only, ties grouped)",
                            "## Models"]
    assert "| edge | 1 | 256 | xs/ekd fp32 | 97.77 | 0.031 [0.0304–0.0319] | 30.1 | cheapest_within_noise |" in md
    assert "| edge | 1 (tie of 4) | xs/ekd fp32 OpenVINO | 97.77 | 0.0304 [0.0296–0.0312] | 30.1 |" in md
    assert f"- **edge**: {summary['edge']['why']}" in md
    # the summary: one row per model and runtime (ekd has two runtimes), its best variant by the rule
    assert [(b["run"], b["runtime"], b["precision"]) for b in best] == [
        ("teacher", "onnxruntime", "fp32"), ("baseline/xs", "onnxruntime", "fp32"), ("kd/xs", "onnxruntime", "fp32"),
        ("ekd/xs", "onnxruntime", "fp32"), ("dkd/xs", "onnxruntime", "fp32"), ("ekd/xs", "openvino", "fp32")]
    assert best[3]["latency"]["edge"] == {"ms": 0.031, "ci_ms": [0.0304, 0.0319]}
    assert "| `kd/xs` | distilled | onnxruntime | fp32 | 97.49 |" in md and "0.0313 [0.0306–0.0321]" in md
    lines = profile_lines("edge", summary["edge"])
    assert lines[0].startswith("  edge: xs/ekd fp32 (97.77 %, p50 0.031 [0.0304–0.0319] ms, 30.1 KiB; rule "
                               "cheapest_within_noise).")
    assert lines[2].startswith("    1. xs/dkd fp32 (97.21 %, 0.0318 [0.0309–0.0322]) = xs/kd fp32 (97.49 %, ")


def _inside(fig, artist) -> bool:
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


@pytest.mark.parametrize("profiles", [1, 3])
def test_the_plot_legend_and_front_names_fit_inside_the_figure(profiles):
    import matplotlib.pyplot as plt

    from pipeline.report.plots import pareto_figure

    rows, correct = _scene()
    rows = rows + [{**r, "runtime": "openvino", "precision": "bf16"} for r in rows[:3]]
    names = [f"p{i}" for i in range(profiles)]
    rows = [{**r, "latency": {n: r["latency"]["edge"] for n in names}} for r in rows]
    profs = [{"name": n, "threads": 1, "latency_budget_ms": 1.0, "size_budget_kib": 256} for n in names]
    summary = summarize(rows, profs, "p50", IMAGES, correct=correct)
    fig = pareto_figure(rows, profs, "p50", {n: s["pareto_groups"] for n, s in summary.items()})
    try:
        fig.canvas.draw()
        assert len(fig.legends) == 1 and _inside(fig, fig.legends[0])
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "tie within noise" in labels and "OpenVINO" in labels  # the scene's fp32 files tie on the front
        for ax in fig.axes:
            assert all(_inside(fig, t) for t in ax.texts)  # the front's names under each panel
            assert any(t.get_text().startswith("Pareto front (beyond noise):") for t in ax.texts)
            assert any(type(p).__name__ == "Rectangle" and p.get_facecolor()[:3] != (1, 1, 1) for p in ax.patches)
            assert any(type(c).__name__ == "LineCollection" for c in ax.collections)  # the latency error bars
        assert _inside(fig, fig._suptitle)
    finally:
        plt.close(fig)


def test_kdpipe_results_prints_each_pick_and_front_with_intervals(tmp_path, capsys):
    import json

    from pipeline.cli import main as kdpipe

    rows, correct = _scene()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "teacher.json").write_text(json.dumps({"top1": 98.05, "test_samples": IMAGES}))
    (tmp_path / "reports").mkdir()
    summary = summarize(rows, PROFILE, "p50", IMAGES, correct=correct)
    (tmp_path / "reports" / "results.json").write_text(json.dumps({"profiles": summary}))
    assert kdpipe(["results", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  edge: xs/ekd fp32 (97.77 %, p50 0.031 [0.0304–0.0319] ms, 30.1 KiB; rule cheapest_within_noise)." in out
    assert "    Pareto front, fastest first (p50 ms [95 % interval]; = ties within noise):" in out
    assert " = xs/ekd fp32 OpenVINO (97.77 %, 0.0304 [0.0296–0.0312])" in out


def test_one_graph_at_another_precision_is_not_a_latency_tie():
    """OpenVINO's bf16 variant runs the fp32 file's graph with bf16 kernels: same hash, other computation."""
    f32 = _row("kd/xs", "fp32", 350, 0.030, (0.0299, 0.0301), "g", runtime="openvino")
    bf16 = _row("kd/xs", "bf16", 350, 0.050, (0.0499, 0.0501), "g", runtime="openvino")
    twin = _row("at/xs", "fp32", 350, 0.031, (0.0309, 0.0311), "g", runtime="openvino")
    ort = _row("kd/xs", "fp32", 350, 0.040, (0.0399, 0.0401), "g")
    noise = Noise()
    assert noise.latency(f32, bf16, "edge") == 1 and noise.dominates(f32, bf16, "edge")
    assert noise.latency(f32, twin, "edge") == 0  # the same graph, runtime and precision
    assert noise.latency(f32, ort, "edge") == 1  # another runtime runs it with its own kernels


def test_files_of_one_graph_share_the_latency_all_of_them_measured():
    """Per round the median over the graph's files, then the median over rounds with its order-statistic interval."""
    from pipeline.deploy.edge.edge_timing import quantile_interval
    from pipeline.report.decisions import pool_graphs

    rounds = {"kd/xs": [0.010, 0.011, 0.030, 0.010, 0.012, 0.011, 0.010, 0.013, 0.011],
              "at/xs": [0.011, 0.010, 0.012, 0.029, 0.010, 0.011, 0.012, 0.010, 0.011],
              "dkd/xs": [0.012, 0.011, 0.011, 0.010, 0.031, 0.010, 0.011, 0.011, 0.012]}
    rows = []
    for run, values in rounds.items():
        r = _row(run, "fp32", 350, float(np.median(values)), tuple(quantile_interval(values)), "g")
        r["latency"]["edge"]["round_p50_ms"] = values
        r["latency"]["dev"] = dict(r["latency"]["edge"])  # a device profile: its rounds do not line up
        rows.append(r)
    other = _row("kd/xs", "int8", 350, 0.02, (0.019, 0.021), "g")  # the same graph hash at another precision
    other["latency"]["edge"]["round_p50_ms"] = [0.02] * 9
    pool_graphs([*rows, other], ["edge"])
    per_round = [float(np.median(v)) for v in zip(*rounds.values(), strict=True)]
    want_ci = [round(x, 4) for x in quantile_interval(per_round)]
    for r in rows:
        head = r["latency"]["edge"]
        assert head["graph_p50_ms"] == round(float(np.median(per_round)), 4) and head["graph_p50_ci_ms"] == want_ci
        assert head["graph_files"] == 3 and "graph_p50_ms" not in r["latency"]["dev"]
        assert latency_interval(r, "edge").low == want_ci[0]
        assert latency_interval(r, "edge", pooled=False).point == head["p50_ms"]  # the file's own stays
    assert "graph_p50_ms" not in other["latency"]["edge"]  # alone in its (graph, runtime, precision)


def test_files_timed_side_by_side_compare_paired_by_round():
    """A drift within the run widens each file's own interval, but lands on both sides of a per-round ratio."""
    from pipeline.report.decisions import pool_graphs

    drift = [1.0, 1.6, 1.0, 1.7, 1.1, 1.0, 1.65, 1.05, 1.0]
    fast_rounds = [0.010 * d for d in drift]
    slow_rounds = [0.0125 * d for d in drift]  # 25 % slower in every round
    fast = _row("kd/xs", "fp32", 350, 0.0105, (0.010, 0.0165), "g32")
    slow = _row("kd/xs", "fp16", 350, 0.0131, (0.0125, 0.0206), "g16", kib=15.0)
    fast["latency"]["edge"]["round_p50_ms"], slow["latency"]["edge"]["round_p50_ms"] = fast_rounds, slow_rounds
    apart = {**slow, "runtime": "openvino", "latency": {"edge": dict(slow["latency"]["edge"])}}
    noise = Noise()
    assert noise.latency(fast, slow, "edge") == 0  # own intervals overlap: without pairing, a tie
    pool_graphs([fast, slow, apart], ["edge"])
    assert noise.latency(fast, slow, "edge") == 1 and noise.latency(slow, fast, "edge") == -1
    assert noise.latency(fast, apart, "edge") == 0  # another runtime: another timing process, intervals decide
    pick = choose([fast, slow], "edge", 1.0, None, noise=noise)
    assert pick.row is fast  # the smaller fp16 file is slower beyond noise: the cheapest is the fp32 file
