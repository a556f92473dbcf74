"""A budget pick in words (``why`` in the report): what fits, the reference, what is within noise, why it won.

The decisions are :mod:`pipeline.report.decisions`'; this module only says them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.report.decisions import SIZE_TIE, Noise, Pick, row_key
from pipeline.report.rows import label, misses_budgets
from pipeline.stats import accuracy_interval


def _names(rows: Sequence[dict[str, Any]], most: int = 3) -> str:
    """``a, b and c`` (``a, b, c and 4 more`` past ``most``)."""
    shown = [label(r) for r in rows[:most]]
    rest = len(rows) - len(shown)
    if rest:
        return ", ".join(shown) + f" and {rest} more"
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" and {shown[-1]}"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def explain(pick: Pick, rows: Sequence[dict[str, Any]], profile: str, budget: float | None, size: float | None,
            statistic: str, noise: Noise, test_images: int | None = None) -> str:
    """The pick in words: what fits, the reference, how many are within noise of it, why the pick won,
    which more accurate rows each budget left out, and (unpaired rows) what the pick's 95 % interval holds."""
    reasons = {id(r): misses_budgets(r, profile, budget, size, statistic) for r in rows}
    limits = " and ".join(x for x in (f"{statistic} <= {budget:g} ms" if budget is not None else "",
                                      f"file <= {size:g} KiB" if size is not None else "") if x)
    words = [f"{len(pick.fitting)} of {len(rows)} models meet {limits}."]
    row, ref = pick.row, pick.reference
    if row is None or ref is None:
        return " ".join(words + ["None fits, so there is no pick."])
    paired = noise.paired(ref, ref)
    images = len(noise.correct[row_key(ref)]) if paired else test_images
    others = [r for r in pick.candidates if r is not ref]
    test = f"exact McNemar p >= {noise.alpha:g} on the same {images} test images"
    if row is ref:
        words.append(f"The pick, {label(row)}, is the most accurate of them ({row['top1']:.2f} %).")
    else:
        p = noise.p_value(row, ref)
        words.append(f"The pick, {label(row)} ({row['top1']:.2f} %), is the cheapest of the models within noise of "
                     f"the most accurate, {label(ref)} ({ref['top1']:.2f} %"
                     f"{f', McNemar p = {p:.2f}' if p is not None else ''}).")
    if pick.rule == "cheapest_within_noise" and paired:
        words.append(f"{_plural(len(others), 'other fitting model is', 'other fitting models are')} within noise of "
                     f"{label(ref)} ({test})." if others else f"No other fitting model is within noise of {label(ref)} "
                     f"(each is less accurate, exact McNemar p < {noise.alpha:g}).")
    elif pick.rule == "cheapest_within_noise":
        words.append("Without per-image predictions accuracies are compared as points"
                     + (f": {_plural(len(others), 'other fitting model ties', 'other fitting models tie')} with it."
                        if others else "."))
    if pick.rule == "cheapest_within_noise" and len(pick.candidates) > 1:
        words.append(_why_cheapest(pick, statistic))
    better = sorted((r for r in rows if reasons[id(r)] and r["top1"] > row["top1"]), key=lambda r: -r["top1"])
    if better:
        shown = "; ".join(f"{label(r)} ({r['top1']:.2f} %: {', '.join(reasons[id(r)])})" for r in better[:3])
        more = f" and {len(better) - 3} more" if len(better) > 3 else ""
        words.append(f"More accurate but left out: {shown}{more}.")
    else:
        words.append("No model that misses the budgets is more accurate.")
    if pick.rule == "most_accurate" and paired:
        words.append(f"{_plural(len(others), 'other fitting model is', 'other fitting models are')} within noise of "
                     f"it ({test}): on this test set the pick is not shown better than "
                     f"{'it' if len(others) == 1 else 'them'}." if others
                     else f"Every other fitting model is less accurate beyond noise (exact McNemar p < {noise.alpha:g}).")
    elif not paired and test_images:
        low, high = accuracy_interval(round(row["top1"] * test_images / 100), int(test_images))
        close = [r for r in pick.fitting if r is not row and r["top1"] >= low]
        some = "1 other fitting model has" if len(close) == 1 else f"{len(close)} other fitting models have"
        words.append(f"{some} top-1 inside the pick's 95 % interval ({low:.2f}-{high:.2f} %): on {test_images} "
                     f"test images the pick is not shown better than {'it' if len(close) == 1 else 'them'}."
                     if close else f"No other fitting model reaches the pick's 95 % interval ({low:.2f}-{high:.2f} %).")
    return " ".join(words)


def _why_cheapest(pick: Pick, statistic: str) -> str:
    """Why the pick won among the candidates: latency beyond noise, then file size, then accuracy."""
    row = pick.row
    assert row is not None
    steps = []
    slower = [r for r in pick.candidates if r not in pick.faster]
    if len(pick.faster) == 1:
        steps.append(f"{label(row)} is faster beyond noise than the other {_plural(len(slower), 'candidate', 'candidates')} "
                     f"(95 % {statistic} intervals)")
    else:
        if slower:
            steps.append(f"{_names(slower)} {'is' if len(slower) == 1 else 'are'} slower beyond noise than another "
                         f"(95 % {statistic} intervals)")
        steps.append(f"{_names(pick.faster)} tie in latency within noise")
        if len(pick.smallest) == 1:
            rest = sorted(r["bytes"] for r in pick.faster if r is not row)
            steps.append(f"{label(row)} is the smallest file ({row['bytes'] / 1024:.1f} KiB against "
                         f"{rest[0] / 1024:.1f} KiB)")
        else:
            level = [r for r in pick.smallest if r is not row and r["top1"] == row["top1"]]
            tied = f" (with {_names(level)}: the first in the report's order)" if level else ""
            steps.append(f"{_names(pick.smallest)} are within {SIZE_TIE * 100:g} % in file size, and {label(row)} is "
                         f"the most accurate of them{tied}")
    return f"Of the {len(pick.candidates)} within noise, {'; '.join(steps)}."
