"""The report's decisions that measurement noise cannot move: who dominates whom, the Pareto front, the budget pick.

Two rows (a model file run by one runtime at one precision) differ only beyond noise:

* **accuracy**: the exact McNemar test (:func:`pipeline.stats.paired_test`) of their
  predictions on the same test images (``reports/predictions.json``) gives p < alpha
  (0.05 by default, ``report.alpha``). Where either row has no per-image predictions
  (an old workspace) there is nothing to pair, and their top-1 are compared as points:
  any difference counts, as the report did before. That never makes the pick less
  accurate than it should be, only the front longer than it need be;
* **latency** under a profile: rows the benchmark timed side by side (one runtime and
  profile of one benchmark run: the same interleaved rounds) are compared *paired by
  round*, as McNemar pairs images: per round the ratio of their latencies, and one is
  faster only when the 95 % order-statistic interval of the median ratio lies wholly
  below 1. A drift of the machine within the run lands on both sides of a ratio and
  cancels, where it widens each row's own interval. Other rows (two runtimes, a device)
  are faster only when their 95 % intervals of the reported statistic are separated,
  i.e. one's upper end lies below the other's lower end; a latency without an interval
  (an old file, a device without one) is the point ``[v, v]``. Two rows with the same
  ``graph_sha256``, runtime and precision run the same graph (only the weights differ):
  their latency ties by construction, and :func:`pool_graphs` gives them the latency all
  their files measured together.

A row dominates another when it is better beyond noise on one axis and not worse beyond
noise on the other (:meth:`Noise.dominates`). The front (:func:`noise_front`) is every
measured row no other dominates, in tie groups: front rows that tie on both axes. The
budget pick (:func:`choose`) follows ``report.pick``. Only intervals, graphs and test
images decide: latency points that move inside their intervals move nothing. Nothing
here reads files or needs torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.report.rows import best_under_budget, misses_budgets, row_latency
from pipeline.stats import ALPHA, paired_test

#: The budget pick rules (``report.pick``).
PICK_RULES = ("cheapest_within_noise", "most_accurate")
#: Files whose sizes differ by less than this share of the smaller tie on size.
SIZE_TIE = 0.01

RowKey = tuple[str, str, str]


def row_key(row: dict[str, Any]) -> RowKey:
    """``(run, runtime, precision)``: how a row is named in ``reports/predictions.json``."""
    return str(row["run"]), str(row.get("runtime", "onnxruntime")), str(row["precision"])


def correct_from_predictions(predictions: dict[str, Any] | None) -> dict[RowKey, list[bool]]:
    """Per row key, whether each test image was right, from the parsed ``reports/predictions.json``.

    Lists whose length is not the number of labels are left out (they cannot be paired).
    """
    if not predictions:
        return {}
    labels = [int(y) for y in predictions.get("labels") or []]
    out: dict[RowKey, list[bool]] = {}
    for run, runtimes in (predictions.get("models") or {}).items():
        for runtime, variants in (runtimes or {}).items():
            for variant, classes in (variants or {}).items():
                if len(classes) == len(labels):
                    out[(run, runtime, variant)] = [int(c) == y for c, y in zip(classes, labels, strict=True)]
    return out


@dataclass(frozen=True)
class Interval:
    """A latency (ms): the reported point and its 95 % interval (``low == high == point`` without one)."""

    point: float
    low: float
    high: float

    def text(self) -> str:
        """``0.0312 [0.0301–0.0330]``, or the point alone when there is no interval."""
        if self.low == self.high == self.point:
            return ms(self.point)
        return f"{ms(self.point)} [{ms(self.low)}–{ms(self.high)}]"


def ms(value: float | None) -> str:
    """A latency in ms with four significant digits (the intervals of tiny models are 0.001 ms wide)."""
    return "–" if value is None else f"{value:.4g}"


def latency_interval(row: dict[str, Any], profile: str, statistic: str = "p50", pooled: bool = True) -> Interval | None:
    """A row's latency under ``profile`` with its interval, or None when not measured.

    ``pooled`` (what every decision uses): the latency of the row's graph where
    :func:`pool_graphs` gave it one (``graph_<statistic>_ms`` and ``_ci_ms``), else the
    file's own (``<statistic>_ms``, ``<statistic>_ci_ms``). A missing or malformed interval
    is the point itself; the interval is widened to hold the point if it does not.
    """
    head = (row.get("latency") or {}).get(profile) or {}
    use_graph = pooled and head.get(f"graph_{statistic}_ms") is not None
    point = row_latency(row, profile, statistic, pooled=use_graph)
    if point is None:
        return None
    ci = head.get(f"graph_{statistic}_ci_ms" if use_graph else f"{statistic}_ci_ms")
    try:
        low, high = (float(ci[0]), float(ci[1])) if ci is not None and len(ci) == 2 else (point, point)
    except (TypeError, ValueError):
        low, high = point, point
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        low, high = point, point
    return Interval(point, min(low, point), max(high, point))


def graph_key(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(graph_sha256, runtime, precision)``: rows with equal keys run one computation (None without a hash)."""
    graph = row.get("graph_sha256")
    return (str(graph), str(row.get("runtime", "onnxruntime")), str(row["precision"])) if graph else None


def pool_graphs(rows: Sequence[dict[str, Any]], profiles: Sequence[str], statistic: str = "p50") -> None:
    """Give the rows that run one graph one latency per profile: the graph's, measured by all its files.

    Files of one graph (equal :func:`graph_key`) run the same computation, so each file's
    latency is a sample of one quantity; taken alone, their intervals differ by noise and
    would place some of them beside another graph and some not. The benchmark times every
    file of a runtime and profile in the same interleaved rounds, so round k of one file
    and round k of another were measured side by side: per round the median over the
    graph's files is one value of the graph's latency, and over the rounds their median
    and its 95 % order-statistic interval (:func:`pipeline.deploy.edge.edge_timing.
    quantile_interval`, as the benchmark's own) become ``graph_<statistic>_ms`` and
    ``graph_<statistic>_ci_ms`` of every member, with ``graph_files``. Only the named
    ``profiles`` (the benchmark's: a device measures bundles in separate runs, whose
    rounds do not line up), only graphs of two files or more whose files all carry
    ``round_<statistic>_ms`` of one length; others keep their own figures. Every row of a
    named profile with round values also gets ``graph_round_<statistic>_ms`` (its graph's
    per-round values, its own when alone), which :meth:`Noise.latency` pairs by round.
    """
    from pipeline.deploy.edge.edge_timing import quantile_interval

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        key = graph_key(r)
        if key is not None:
            groups.setdefault(key, []).append(r)
    for members in groups.values():
        for prof in profiles:
            heads = [(r.get("latency") or {}).get(prof) for r in members]
            rounds = [h.get(f"round_{statistic}_ms") for h in heads if h]
            if len(rounds) != len(members) or not all(rounds) or len({len(x) for x in rounds}) != 1:
                continue
            per_round = [statistics.median(values) for values in zip(*rounds, strict=True)]
            for h in heads:
                h[f"graph_round_{statistic}_ms"] = [round(v, 6) for v in per_round]  # what pairs by round
            if len(members) < 2:
                continue
            low, high = quantile_interval(per_round)
            for h in heads:
                h[f"graph_{statistic}_ms"] = round(statistics.median(per_round), 4)
                h[f"graph_{statistic}_ci_ms"] = [round(low, 4), round(high, 4)]
                h["graph_files"] = len(members)


def paired_rounds(a: dict[str, Any], b: dict[str, Any], profile: str,
                  statistic: str = "p50") -> list[tuple[float, float]] | None:
    """The (a, b) latency of each round both rows were timed in side by side, or None when they were not.

    Side by side: one runtime and a benchmark profile (:func:`pool_graphs` gave both
    ``graph_round_<statistic>_ms`` of one length: one timing process, the same rounds).
    """
    if a.get("runtime", "onnxruntime") != b.get("runtime", "onnxruntime"):
        return None
    ra = ((a.get("latency") or {}).get(profile) or {}).get(f"graph_round_{statistic}_ms")
    rb = ((b.get("latency") or {}).get(profile) or {}).get(f"graph_round_{statistic}_ms")
    if not ra or not rb or len(ra) != len(rb) or min(min(ra), min(rb)) <= 0:
        return None
    return [(float(x), float(y)) for x, y in zip(ra, rb, strict=True)]


def ratio_interval(pairs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The 95 % order-statistic interval of the median per-round ratio a/b (the benchmark's own interval routine)."""
    from pipeline.deploy.edge.edge_timing import quantile_interval

    return quantile_interval([x / y for x, y in pairs])


@dataclass
class Noise:
    """What is beyond noise between two rows: accuracy by the paired test on the same images, latency paired by
    round where both were timed side by side, else by separated intervals."""

    correct: dict[RowKey, list[bool]] = field(default_factory=dict)
    alpha: float = ALPHA
    _p: dict[tuple[RowKey, RowKey], float] = field(default_factory=dict, repr=False)

    def paired(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        """Whether both rows have per-image predictions on the same test images."""
        ca, cb = self.correct.get(row_key(a)), self.correct.get(row_key(b))
        return ca is not None and cb is not None and len(ca) == len(cb) and len(ca) > 0

    def p_value(self, a: dict[str, Any], b: dict[str, Any]) -> float | None:
        """The exact McNemar p of ``a`` against ``b`` on the same test images (None when they cannot be paired)."""
        if not self.paired(a, b):
            return None
        ka, kb = sorted((row_key(a), row_key(b)))
        if (ka, kb) not in self._p:
            self._p[(ka, kb)] = paired_test(self.correct[ka], self.correct[kb]).p_value
        return self._p[(ka, kb)]

    def accuracy(self, a: dict[str, Any], b: dict[str, Any]) -> int:
        """+1 when ``a`` is more accurate than ``b`` beyond noise, -1 when less, 0 when within noise.

        Paired rows: the McNemar p must be below :attr:`alpha`, the sign is the images each
        alone gets right. Unpaired rows: their top-1 as points (module docstring).
        """
        p = self.p_value(a, b)
        if p is None:
            return (a["top1"] > b["top1"]) - (a["top1"] < b["top1"])
        if p >= self.alpha:
            return 0
        ca, cb = self.correct[row_key(a)], self.correct[row_key(b)]
        only_a = sum(x and not y for x, y in zip(ca, cb, strict=True))
        only_b = sum(y and not x for x, y in zip(ca, cb, strict=True))
        return (only_a > only_b) - (only_a < only_b)

    @staticmethod
    def same_graph(a: dict[str, Any], b: dict[str, Any]) -> bool:
        """Whether both rows run one graph (equal ``graph_sha256``) with one runtime at one precision: a latency
        tie by construction. (OpenVINO's bf16 variant runs the fp32 file's graph with other kernels: no tie.)"""
        ga, gb = a.get("graph_sha256"), b.get("graph_sha256")
        return (bool(ga) and ga == gb and a.get("runtime", "onnxruntime") == b.get("runtime", "onnxruntime")
                and a.get("precision") == b.get("precision"))

    def latency(self, a: dict[str, Any], b: dict[str, Any], profile: str, statistic: str = "p50") -> int:
        """+1 when ``a`` is faster than ``b`` beyond noise under ``profile``, -1 when slower, 0 when tied.

        Rows timed in the same rounds (:func:`paired_rounds`): the 95 % interval of the median
        per-round ratio a/b lies below 1 (faster) or above it (slower). Others: separated
        intervals. The same graph ties; an unmeasured row compares as 0.
        """
        ia, ib = latency_interval(a, profile, statistic), latency_interval(b, profile, statistic)
        if ia is None or ib is None or self.same_graph(a, b):
            return 0
        pairs = paired_rounds(a, b, profile, statistic)
        if pairs is not None:
            low, high = ratio_interval(pairs)
            return (high < 1.0) - (low > 1.0)
        return (ia.high < ib.low) - (ib.high < ia.low)

    def dominates(self, a: dict[str, Any], b: dict[str, Any], profile: str, statistic: str = "p50") -> bool:
        """Whether ``a`` is better than ``b`` beyond noise on one axis and not worse beyond noise on the other."""
        lat = self.latency(a, b, profile, statistic)
        if lat < 0:
            return False
        acc = self.accuracy(a, b)
        return (lat > 0 and acc >= 0) or (acc > 0 and lat >= 0)

    def ties(self, a: dict[str, Any], b: dict[str, Any], profile: str, statistic: str = "p50") -> bool:
        """Whether neither axis tells ``a`` from ``b`` beyond noise."""
        return self.latency(a, b, profile, statistic) == 0 and self.accuracy(a, b) == 0


def noise_front(rows: Sequence[dict[str, Any]], profile: str, statistic: str = "p50",
                noise: Noise | None = None) -> list[list[dict[str, Any]]]:
    """The Pareto front under ``profile`` as tie groups, fastest group first.

    A measured row is on the front when no other measured row dominates it beyond noise;
    front rows that tie on both axes are grouped (connected ties, so a group is never split).
    Two front rows in different groups are separated on both axes, the less accurate being the
    faster, so the order is by top-1 (ascending) and the report's row order: neither moves with
    a latency point inside its interval.
    """
    noise = noise or Noise()
    order = {id(r): i for i, r in enumerate(rows)}
    measured = [r for r in rows if latency_interval(r, profile, statistic) is not None]
    front = [r for r in measured if not any(o is not r and noise.dominates(o, r, profile, statistic)
                                            for o in measured)]
    groups: list[list[dict[str, Any]]] = []
    seen: set[int] = set()
    for r in front:
        if id(r) in seen:
            continue
        group, todo = [], [r]
        seen.add(id(r))
        while todo:
            x = todo.pop()
            group.append(x)
            for y in front:
                if id(y) not in seen and noise.ties(x, y, profile, statistic):
                    seen.add(id(y))
                    todo.append(y)
        groups.append(sorted(group, key=lambda g: (g["top1"], order[id(g)])))
    return sorted(groups, key=lambda g: (min(x["top1"] for x in g), min(order[id(x)] for x in g)))


@dataclass
class Pick:
    """The budget pick of one profile and how it was reached (what :func:`pipeline.report.why.explain` puts in words)."""

    rule: str
    row: dict[str, Any] | None
    fitting: list[dict[str, Any]]
    reference: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    faster: list[dict[str, Any]] = field(default_factory=list)
    smallest: list[dict[str, Any]] = field(default_factory=list)


def choose(rows: Sequence[dict[str, Any]], profile: str, budget_ms: float | None, size_kib: float | None,
           statistic: str = "p50", rule: str = "cheapest_within_noise", noise: Noise | None = None) -> Pick:
    """The pick under a profile's budgets by ``rule`` (the rows that fit: latency point within ``budget_ms``,
    file within ``size_kib``).

    ``most_accurate``: the most accurate row that fits (ties: faster, then smaller), as before.
    ``cheapest_within_noise``: the most accurate fitting row is the reference; the candidates are
    the fitting rows not less accurate than it beyond noise; of those, drop every one slower beyond
    noise than another (an unmeasured one is slower than any measured), then keep the smallest
    files (within :data:`SIZE_TIE`), and of those take the most accurate (then the report's row
    order). Only top-1, intervals, graphs and sizes decide, never a latency point.
    """
    if rule not in PICK_RULES:
        raise ValueError(f"unknown pick rule {rule!r}: one of {', '.join(PICK_RULES)}")
    noise = noise or Noise()
    order = {id(r): i for i, r in enumerate(rows)}
    fitting = [r for r in rows if not misses_budgets(r, profile, budget_ms, size_kib, statistic)]
    if not fitting:
        return Pick(rule, None, fitting)
    if rule == "most_accurate":
        row = best_under_budget(rows, profile, budget_ms, statistic, size_kib)
        return Pick(rule, row, fitting, reference=row, candidates=[r for r in fitting if noise.accuracy(r, row) >= 0])
    reference = min(fitting, key=lambda r: (-r["top1"], order[id(r)]))
    candidates = [r for r in fitting if noise.accuracy(r, reference) >= 0]
    measured = [r for r in candidates if latency_interval(r, profile, statistic) is not None]
    faster = [r for r in measured if not any(noise.latency(o, r, profile, statistic) > 0 for o in measured)] \
        if measured else list(candidates)
    least = min(r["bytes"] for r in faster)
    smallest = [r for r in faster if r["bytes"] <= least * (1 + SIZE_TIE)]
    row = min(smallest, key=lambda r: (-r["top1"], order[id(r)]))
    return Pick(rule, row, fitting, reference, candidates, faster, smallest)


def best_variants(rows: Sequence[dict[str, Any]], profile: str | None, statistic: str = "p50",
                  rule: str = "cheapest_within_noise", noise: Noise | None = None) -> list[dict[str, Any]]:
    """Each model and runtime's best variant by ``rule`` among its own variants, with no budget, latency under
    ``profile`` (None: accuracy alone decides), in the report's row order: the summary's rows."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["run"]), str(r.get("runtime", "onnxruntime"))), []).append(r)
    out = []
    for variants in groups.values():
        pick = choose(variants, profile or "", None, None, statistic, rule, noise).row
        if pick is not None:
            out.append(pick)
    return out
