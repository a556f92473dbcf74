"""``reports/pareto.png``: accuracy against latency, one panel per device profile, Pareto front drawn.

Each point is one deployed file run by one runtime (model x runtime x precision), with
its latency's 95 % interval as a horizontal error bar; colour is the precision, marker
the role, a thick orange edge marks OpenVINO. The front is the report's
(:func:`pipeline.report.decisions.noise_front`: beyond noise only), drawn as a step line;
its groups are numbered (one number per group, named under the panel), and a group of
models that tie within noise on both axes is a shaded box spanning their intervals and
top-1s. The profile's latency budget is a dashed line; files over the profile's size
budget are drawn hollow. The legend sits under the panels, inside the figure (constrained
layout). Matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.report.decisions import latency_interval, noise_front, row_key
from pipeline.report.rows import label

COLOURS = {"fp32": "#1f77b4", "fp16": "#2ca02c", "bf16": "#9467bd", "int8": "#d62728"}
#: Edge colour and width of a point by runtime (onnxruntime's is the plain thin black edge).
RUNTIME_EDGES = {"onnxruntime": ("black", 0.4), "openvino": ("#ff7f0e", 1.8)}
MARKERS = {"teacher": "*", "baseline": "o", "distilled": "D", "online": "s"}


def pareto_plot(rows: Sequence[dict[str, Any]], profiles: Sequence[dict[str, Any]], statistic: str, out: Path,
                dpi: int = 120, fronts: dict[str, list[list[dict[str, Any]]]] | None = None) -> Path:
    """Draw the accuracy/latency plot of ``rows`` for every profile and write it atomically to ``out``.

    ``fronts``: per profile, the report's front as tie groups (``pareto_groups`` of the summary:
    entries naming run, runtime and precision); without it the front is computed here, top-1
    compared as points.
    """
    import matplotlib.pyplot as plt

    from pipeline.engine.atomic import atomic_write

    fig = pareto_figure(rows, profiles, statistic, fronts)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(out, lambda fh: fh.write(buf.getvalue()))


def _front_rows(rows: Sequence[dict[str, Any]], profile: str, statistic: str,
                fronts: dict[str, list[list[dict[str, Any]]]] | None) -> list[list[dict[str, Any]]]:
    """The front of ``profile`` as groups of ``rows`` (the given groups matched by run, runtime and precision)."""
    if fronts is None or profile not in fronts:
        return noise_front(rows, profile, statistic)
    by_key = {row_key(r): r for r in rows}
    groups = [[by_key[k] for k in (row_key(g) for g in group) if k in by_key] for group in fronts[profile]]
    return [g for g in groups if g]


def pareto_figure(rows: Sequence[dict[str, Any]], profiles: Sequence[dict[str, Any]], statistic: str,
                  fronts: dict[str, list[list[dict[str, Any]]]] | None = None) -> Any:
    """The figure :func:`pareto_plot` saves (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import FuncFormatter, NullFormatter

    n = max(1, len(profiles))
    fig, axes = plt.subplots(1, n, figsize=(max(7.0, 5.6 * n), 6.2), squeeze=False, layout="constrained")
    any_tie = False
    for ax, prof in zip(axes[0], profiles, strict=True):
        name = prof["name"]
        pts = [(r, latency_interval(r, name, statistic)) for r in rows]
        pts = [(r, lat) for r, lat in pts if lat is not None]
        ax.set_title(f"{name} ({prof.get('threads') or 'all'} thread(s), batch {prof.get('batch_sizes', [1])[0]})")
        ax.set_xlabel(f"{statistic} latency (ms, log scale; bars: 95 % interval)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        size = prof.get("size_budget_kib")
        for r, lat in pts:
            over = size is not None and r["bytes"] / 1024 > size  # hollow: the file does not fit the device
            colour = COLOURS.get(r["precision"], "grey")
            edge, width = RUNTIME_EDGES.get(r.get("runtime", "onnxruntime"), ("black", 0.4))
            if lat.high > lat.low:
                ax.errorbar(lat.point, r["top1"], xerr=[[lat.point - lat.low], [lat.high - lat.point]], fmt="none",
                            ecolor=colour, elinewidth=0.8, alpha=0.6, zorder=2)
            ax.scatter(lat.point, r["top1"], c="none" if over else colour, marker=MARKERS.get(r["role"], "o"),
                       s=90 if r["role"] == "teacher" else 45, alpha=0.85, edgecolors=colour if over else edge,
                       linewidths=max(1.2, width) if over else width, zorder=3)
        groups = _front_rows([r for r, _ in pts], name, statistic, fronts)
        lats = {id(r): lat for r, lat in pts}
        front = sorted((r for g in groups for r in g), key=lambda r: lats[id(r)].point)
        ax.step([lats[id(r)].point for r in front], [r["top1"] for r in front], where="post", color="black", lw=1.2,
                alpha=0.7, zorder=2)
        names = []
        for k, group in enumerate(groups, start=1):
            top = max(group, key=lambda g: g["top1"])  # one number per group, by its most accurate member
            ax.annotate(str(k), (lats[id(top)].point, top["top1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, fontweight="bold", zorder=4)
            if len(group) > 1:  # a tie: one box over the group's intervals and top-1s
                any_tie = True
                x0, x1 = min(lats[id(r)].low for r in group), max(lats[id(r)].high for r in group)
                y0, y1 = min(r["top1"] for r in group), max(r["top1"] for r in group)
                pad = 0.15
                ax.add_patch(Rectangle((x0 * 0.97, y0 - pad), x1 * 1.03 - x0 * 0.97, y1 - y0 + 2 * pad,
                                       facecolor="gold", edgecolor="darkgoldenrod", alpha=0.25, lw=0.8, zorder=1))
            if len(group) == 1:
                r = group[0]
                names.append(f"{k}. {label(r)}  ({lats[id(r)].text()} ms, {r['top1']:.2f} %)")
            else:  # a tie: its most accurate member, how many tie with it, the span of their intervals and top-1s
                r = max(group, key=lambda g: g["top1"])
                lo, hi = min(lats[id(g)].low for g in group), max(lats[id(g)].high for g in group)
                least = min(g["top1"] for g in group)
                top1 = f"{r['top1']:.2f}" if least == r["top1"] else f"{least:.2f}–{r['top1']:.2f}"
                names.append(f"{k}. {label(r)} and {len(group) - 1} tied within noise  ({lo:.4g}–{hi:.4g} ms, "
                             f"{top1} %)")
        shown = names[:8] + ([f"... {len(names) - 8} more groups"] if len(names) > 8 else [])
        ax.text(0.0, -0.14, "Pareto front (beyond noise):\n" + "\n".join(shown), transform=ax.transAxes,
                ha="left", va="top", fontsize=7, family="monospace")
        budget = prof.get("latency_budget_ms")
        if budget is not None:
            ax.axvline(budget, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        tops = [r["top1"] for r, _ in pts]
        lo, hi = min(tops), max(tops)
        ax.set_ylim(lo - max(1.0, 0.15 * (hi - lo)), hi + max(0.5, 0.05 * (hi - lo)))
    handles = [Line2D([], [], color=c, marker="o", ls="", label=p) for p, c in COLOURS.items()]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=r) for r, m in MARKERS.items()]
    if any(r.get("runtime", "onnxruntime") != "onnxruntime" for r in rows):
        handles.append(Line2D([], [], color="white", marker="o", ls="", markeredgecolor=RUNTIME_EDGES["openvino"][0],
                              markeredgewidth=RUNTIME_EDGES["openvino"][1], label="OpenVINO"))
    handles += [Line2D([], [], color="black", label="Pareto front"),
                Line2D([], [], color="grey", ls="--", label="latency budget")]
    if any_tie:
        handles.append(Patch(facecolor="gold", edgecolor="darkgoldenrod", alpha=0.4, label="tie within noise"))
    if any(p.get("size_budget_kib") is not None for p in profiles):
        handles.append(Line2D([], [], color="grey", marker="o", ls="", markerfacecolor="none",
                              label="over the size budget"))
    fig.suptitle("Accuracy against latency of every deployed model (upper left is better)" if n > 1
                 else "Accuracy against latency of every deployed model\n(upper left is better)")
    _fit_legend(fig, handles)
    return fig


def _fit_legend(fig: Any, handles: list[Any]) -> Any:
    """The legend under the panels in as many columns as fit the figure's width (fewer until it fits)."""
    width = fig.bbox.width
    renderer = fig.canvas.get_renderer()  # sizes the legend alone: drawing the whole figure per try costs seconds
    for ncol in range(len(handles), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
        if ncol == 1 or legend.get_window_extent(renderer).width <= width:
            return legend
        legend.remove()
    return None
