"""The statistics of the reports against values computed here by hand, and the words they are reported in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.cli import main as kdpipe
from pipeline.report.significance import read_correct, significance_markdown, significance_rows
from pipeline.stats import accuracy_interval, gap_recovered, paired_test

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval, from its formula (Wilson 1927), in percent."""
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def exact_two_sided(b: int, c: int) -> float:
    """The exact McNemar p from the binomial coefficients: twice the smaller tail of Binomial(b + c, 1/2)."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def pairs(only_model: int, only_ref: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    model = [True] * only_model + [False] * only_ref + [True] * both + [False] * neither
    ref = [False] * only_model + [True] * only_ref + [True] * both + [False] * neither
    return model, ref


@pytest.mark.parametrize(("k", "n"), [(357, 359), (355, 359), (81, 263), (0, 10), (10, 10), (1, 2)])
def test_the_interval_is_wilsons(k: int, n: int):
    low, high = accuracy_interval(k, n)
    want = wilson(k, n)
    assert low == pytest.approx(max(0.0, want[0]), abs=1e-9) and high == pytest.approx(min(100.0, want[1]), abs=1e-9)
    assert 0 <= low <= 100 * k / n <= high <= 100


def test_a_bad_count_is_refused():
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        accuracy_interval(5, 4)
    with pytest.raises(ValueError, match="total > 0"):
        accuracy_interval(0, 0)


@pytest.mark.parametrize(("b", "c"), [(12, 8), (10, 0), (0, 10), (3, 2), (40, 25), (1, 0)])
def test_the_paired_test_is_the_exact_binomial_on_the_discordant_images(b: int, c: int):
    model, ref = pairs(b, c, 300, 39)
    t = paired_test(model, ref)
    assert (t.only_model, t.only_reference, t.both, t.neither, t.total) == (b, c, 300, 39, b + c + 339)
    assert t.p_value == pytest.approx(exact_two_sided(b, c), rel=1e-9)
    assert t.difference == pytest.approx(100 * (b - c) / (b + c + 339))
    assert t.significant == (exact_two_sided(b, c) < 0.05)


def test_the_known_digits_case_and_the_edges():
    # DESIGN.md: on digits, KD's +1.1 points for tinynet_xs were 12 images against 8, exact p = 0.50
    t = paired_test(*pairs(12, 8, 320, 19))
    assert round(t.p_value, 4) == 0.5034 and not t.significant
    assert paired_test(*pairs(0, 0, 5, 5)).p_value == 1.0  # no discordant image: nothing to tell them apart
    with pytest.raises(ValueError, match="same images: 3 predictions against 2"):
        paired_test([True, False, True], [True, True])


def test_gap_recovered():
    assert gap_recovered(90.0, 80.0, 100.0) == pytest.approx(0.5)
    assert gap_recovered(78.0, 80.0, 100.0) == pytest.approx(-0.1)
    assert gap_recovered(85.0, 80.0, 80.0) is None and gap_recovered(85.0, 81.0, 80.0) is None


def write_runs(root: Path, runs: dict[str, list[bool]]) -> None:
    """metrics/<run>.json and plots/confusion/<run>.json as the evaluate stage writes them."""
    for key, right in runs.items():
        rows = [{"actual": "a", "predicted": "a" if ok else "b"} for ok in right]
        for folder, doc in (("plots/confusion", rows),
                            ("metrics", {"top1": 100 * sum(right) / len(right), "test_samples": len(right)})):
            f = root / folder / f"{key}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(doc))


def a_workspace(root: Path) -> None:
    alone = [True] * 70 + [False] * 30
    kd = [True] * 70 + [True] * 12 + [False] * 18  # 12 images only KD gets right, none only alone: p = 2 ** -11
    dml = [True] * 68 + [False] * 2 + [True] * 3 + [False] * 27  # 3 against 2: noise
    write_runs(root, {"teacher": [True] * 90 + [False] * 10, "baseline/s": alone, "kd/s": kd, "dml/s": dml})


def test_the_rows_and_the_words_say_which_differences_are_real(tmp_path: Path):
    a_workspace(tmp_path)
    metrics = {k: json.loads((tmp_path / "metrics" / f"{k}.json").read_text())
               for k in ("teacher", "baseline/s", "kd/s", "dml/s")}
    rows = significance_rows(metrics, read_correct(tmp_path, list(metrics)))
    assert [r["run"] for r in rows] == ["teacher", "baseline/s", "dml/s", "kd/s"]
    kd = next(r for r in rows if r["run"] == "kd/s")
    assert (kd["only_model"], kd["only_alone"]) == (12, 0) and kd["p_value"] == pytest.approx(2 ** -11)
    assert kd["gap_recovered"] == pytest.approx(12 / 20) and kd["significant"]
    assert (kd["ci_low"], kd["ci_high"]) == pytest.approx(wilson(82, 100))
    dml = next(r for r in rows if r["run"] == "dml/s")
    assert dml["p_value"] == pytest.approx(1.0) and not dml["significant"] and dml["vs_alone"] == pytest.approx(1.0)
    assert "p_value" not in next(r for r in rows if r["run"] == "baseline/s")

    md = "\n".join(significance_markdown(rows))
    assert "Significant at 0.05: `kd/s` (+12.00 points, p = 0.00049)." in md
    assert "Within noise (the test set cannot tell them from the student alone): `dml/s` (+1.00, p = 1)." in md
    assert "| `kd/s` | 82.00 | " in md and "better than alone, significant" in md
    assert "no gap to recover" not in md

    # a student alone at the teacher's level: the report says so, not that distillation failed
    write_runs(tmp_path, {"baseline/s": [True] * 95 + [False] * 5})
    metrics["baseline/s"] = json.loads((tmp_path / "metrics" / "baseline/s.json").read_text())
    md = "\n".join(significance_markdown(significance_rows(metrics, read_correct(tmp_path, list(metrics)))))
    assert "The student alone matches or beats the teacher for s: there is no gap to recover" in md
    assert "No distilled or online student differs significantly" not in md  # kd is now significantly worse
    assert "worse than alone, significant" in md


def test_kdpipe_results_prints_the_intervals_and_the_paired_verdicts(tmp_path: Path, capsys):
    a_workspace(tmp_path)
    assert kdpipe(["results", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "95% interval" in out and "McNemar p" in out
    assert "against the student alone on the same 100 test images (exact McNemar, 0.05):" in out
    assert "kd/s: +12.00 points, better than alone, significant (p = 0.00049 < 0.05)" in out
    assert "dml/s: +1.00 points, within noise (p = 1: no significant difference at 0.05)" in out
