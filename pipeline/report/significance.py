"""What each evaluated model's top-1 is worth: its 95 % interval and, for a distilled or online student, the
paired test against the same student trained alone and the share of the teacher's gap it recovers.

Read from what the evaluate stages wrote: ``metrics/<run>.json`` (top-1, test images) and
``plots/confusion/<run>.json`` (one ``{actual, predicted}`` row per test image, in the
test split's order, so two runs' rows pair image by image). The report stage and
``kdpipe results`` print the same rows (:func:`significance_rows`), in a table and in
words (:func:`significance_markdown`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.stats import ALPHA, accuracy_interval, gap_recovered, paired_test


def confusion_path(key: str) -> str:
    """Where the evaluate stage of run ``key`` writes its per-image predictions, relative to the workspace."""
    return f"plots/confusion/{key}.json"


def correct_of(confusion_json: str) -> list[bool]:
    """Whether each test image was right, from the text of a confusion file (``[{actual, predicted}, ...]``)."""
    return [r["actual"] == r["predicted"] for r in json.loads(confusion_json)]


def read_correct(root: Path, keys: list[str]) -> dict[str, list[bool]]:
    """Per run, whether it got each test image right (from its confusion rows); runs without the file are left out."""
    out: dict[str, list[bool]] = {}
    for key in keys:
        f = root / confusion_path(key)
        if f.is_file():
            out[key] = correct_of(f.read_text())
    return out


def _role(key: str) -> str:
    return "teacher" if key == "teacher" else ("baseline" if key.startswith("baseline/") else "distilled")


def significance_rows(metrics: dict[str, dict[str, Any]], correct: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """One row per evaluated run: top-1 and its 95 % Wilson interval; for a distilled or online student also
    the exact McNemar test against ``baseline/<student>`` on the same images and the gap recovered.

    Teacher first, then per student: alone, then its methods in name order.
    """
    teacher = metrics.get("teacher", {}).get("top1")
    order = sorted(metrics, key=lambda k: (k != "teacher", k.split("/")[-1], _role(k) != "baseline", k))
    rows: list[dict[str, Any]] = []
    for key in order:
        m = metrics[key]
        n = int(m.get("test_samples") or len(correct.get(key, [])))
        if not n or m.get("top1") is None:
            continue
        right = sum(correct[key]) if key in correct else round(float(m["top1"]) * n / 100)
        low, high = accuracy_interval(right, n)
        student = None if key == "teacher" else key.split("/", 1)[1]
        row: dict[str, Any] = {"run": key, "role": _role(key), "student": student,
                               "method": key.split("/")[0] if _role(key) == "distilled" else None,
                               "top1": float(m["top1"]), "ci_low": low, "ci_high": high, "test_images": n}
        alone = f"baseline/{student}"
        if row["role"] == "distilled" and key in correct and alone in correct:
            t = paired_test(correct[key], correct[alone])
            alone_top1 = float(metrics[alone]["top1"])
            row.update({"alone_top1": alone_top1, "vs_alone": t.difference, "only_model": t.only_model,
                        "only_alone": t.only_reference, "p_value": t.p_value, "significant": t.significant,
                        "gap_recovered": None if teacher is None else gap_recovered(row["top1"], alone_top1,
                                                                                    float(teacher))})
        rows.append(row)
    return rows


def _pct(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def verdict(row: dict[str, Any]) -> str:
    """The paired result of one distilled row in words."""
    if "p_value" not in row:
        return "no paired test (its student alone was not evaluated)"
    sign = "better" if row["vs_alone"] > 0 else "worse"
    if row["significant"]:
        return f"{sign} than alone, significant (p = {row['p_value']:.2g} < {ALPHA:g})"
    return f"within noise (p = {row['p_value']:.2g}: no significant difference at {ALPHA:g})"


def significance_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section on what distillation buys: the table, then which differences are real."""
    if not rows:
        return []
    n = rows[0]["test_images"]
    out = ["## What distillation buys (PyTorch FP32, test split)", "",
           f"Top-1 on the {n} test images with its 95 % Wilson interval (one image is {100 / n:.2g} points). "
           "Each distilled or online student is compared with the same student trained alone on the same images: "
           "the images only one of the two gets right, the exact McNemar p (a two-sided binomial test on those), "
           "and the gap recovered, (student - alone) / (teacher - alone).", "",
           "| model | top-1 % | 95 % interval | vs alone (points) | only it right | only alone right | McNemar p | "
           "gap recovered | verdict |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paired = "p_value" in r
        out.append(f"| `{r['run']}` | {r['top1']:.2f} | {r['ci_low']:.2f}–{r['ci_high']:.2f} | "
                   f"{_pct(r.get('vs_alone'), '+.2f')} | {r.get('only_model', '–')} | {r.get('only_alone', '–')} | "
                   f"{_pct(r.get('p_value'), '.3g')} | {_pct(r.get('gap_recovered'), '.2f')} | "
                   f"{verdict(r) if paired else r['role']} |")
    paired = [r for r in rows if "p_value" in r]
    real = [r for r in paired if r["significant"]]
    noise = [r for r in paired if not r["significant"]]
    out.append("")
    if paired:
        if real:
            out.append(f"Significant at {ALPHA:g}: " + ", ".join(
                f"`{r['run']}` ({r['vs_alone']:+.2f} points, p = {r['p_value']:.2g})" for r in real) + ".")
        else:
            out.append(f"No distilled or online student differs significantly from its student alone at {ALPHA:g}.")
        if noise:
            out.append("Within noise (the test set cannot tell them from the student alone): "
                       + ", ".join(f"`{r['run']}` ({r['vs_alone']:+.2f}, p = {r['p_value']:.2g})" for r in noise)
                       + ".")
    teacher = next((x["top1"] for x in rows if x["run"] == "teacher"), None)
    gap_free = [r["student"] for r in rows if r["role"] == "baseline" and teacher is not None and r["top1"] >= teacher]
    if gap_free:
        out.append(f"The student alone matches or beats the teacher for {', '.join(gap_free)}: there is no gap "
                   "to recover there, and distillation cannot show what it buys.")
    out.append("")
    return out
