"""``reports/pareto.png``: accuracy against latency, one panel per device profile, Pareto front drawn.

Each point is one deployed file run by one runtime (model x runtime x precision);
colour is the precision, marker the role, a thick orange edge marks OpenVINO. The front (no other point both faster and more accurate) is drawn as a
step line, its points numbered and named in a box, and the profile's latency budget
as a dashed line; files over the profile's size budget are drawn hollow. Matplotlib runs
on the Agg backend (no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.report.rows import label, pareto_front, row_latency

COLOURS = {"fp32": "#1f77b4", "fp16": "#2ca02c", "bf16": "#9467bd", "int8": "#d62728"}
#: Edge colour and width of a point by runtime (onnxruntime's is the plain thin black edge).
RUNTIME_EDGES = {"onnxruntime": ("black", 0.4), "openvino": ("#ff7f0e", 1.8)}
MARKERS = {"teacher": "*", "baseline": "o", "distilled": "D", "online": "s"}


def pareto_plot(rows: Sequence[dict[str, Any]], profiles: Sequence[dict[str, Any]], statistic: str, out: Path,
                dpi: int = 120) -> Path:
    """Draw the accuracy/latency plot of ``rows`` for every profile and write it atomically to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from pipeline.engine.atomic import atomic_write

    n = max(1, len(profiles))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), squeeze=False)
    for ax, prof in zip(axes[0], profiles, strict=True):
        name = prof["name"]
        pts = [(r, row_latency(r, name, statistic)) for r in rows]
        pts = [(r, lat) for r, lat in pts if lat is not None]
        ax.set_title(f"{name} ({prof.get('threads') or 'all'} thread(s), batch {prof.get('batch_sizes', [1])[0]})")
        ax.set_xlabel(f"{statistic} latency (ms, log scale)")
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
            ax.scatter(lat, r["top1"], c="none" if over else colour, marker=MARKERS.get(r["role"], "o"),
                       s=90 if r["role"] == "teacher" else 45, alpha=0.85, edgecolors=colour if over else edge,
                       linewidths=max(1.2, width) if over else width, zorder=3)
        front = pareto_front([(lat, r["top1"]) for r, lat in pts])
        fx = [pts[i][1] for i in front]
        fy = [pts[i][0]["top1"] for i in front]
        ax.step(fx, fy, where="post", color="black", lw=1.2, alpha=0.7, zorder=2, label="Pareto front")
        # Number the front's points and name them in a box: labels beside clustered points would collide.
        names = []
        for k, i in enumerate(front, start=1):
            r, lat = pts[i]
            ax.annotate(str(k), (lat, r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8,
                        fontweight="bold", zorder=4)
            names.append(f"{k}. {label(r)}  ({lat:.3g} ms, {r['top1']:.2f}%)")
        ax.text(0.98, 0.03, "Pareto front\n" + "\n".join(names), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, family="monospace", multialignment="left", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
                zorder=5)
        budget = prof.get("latency_budget_ms")
        if budget is not None:
            ax.axvline(budget, color="grey", ls="--", lw=1, label=f"budget {budget:g} ms")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = min(fy + [r["top1"] for r, _ in pts]), max(r["top1"] for r, _ in pts)
        ax.set_ylim(lo - max(1.0, 0.15 * (hi - lo)), hi + max(0.5, 0.05 * (hi - lo)))
    handles = [Line2D([], [], color=c, marker="o", ls="", label=p) for p, c in COLOURS.items()]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=r) for r, m in MARKERS.items()]
    if any(r.get("runtime", "onnxruntime") != "onnxruntime" for r in rows):
        handles.append(Line2D([], [], color="white", marker="o", ls="", markeredgecolor=RUNTIME_EDGES["openvino"][0],
                              markeredgewidth=RUNTIME_EDGES["openvino"][1], label="OpenVINO"))
    handles += [Line2D([], [], color="black", label="Pareto front"),
                Line2D([], [], color="grey", ls="--", label="latency budget")]
    if any(p.get("size_budget_kib") is not None for p in profiles):
        handles.append(Line2D([], [], color="grey", marker="o", ls="", markerfacecolor="none",
                              label="over the size budget"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Accuracy against latency of every deployed model (upper left is better)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(out, lambda fh: fh.write(buf.getvalue()))
