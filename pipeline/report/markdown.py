"""``reports/results.md`` and ``kdpipe results``'s lines: the report's sections as Markdown, from the rows and summary.

What a person reads, in order (:func:`markdown`): the picks and why, the one-screen
summary, the Pareto front per profile in tie groups, then the full table and the
sections after it (what distillation buys, INT8 against FP32, parity, other runtimes,
the hardware's limit, cold start and memory, provenance). Everything here formats what
:mod:`pipeline.report.results` and :mod:`pipeline.report.decisions` computed; nothing
reads files or decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.report.decisions import Interval, latency_interval, ms
from pipeline.report.rows import PRECISION_ORDER, RUNTIME_NAMES, label, row_latency
from pipeline.report.significance import significance_markdown
from pipeline.stats import accuracy_interval


def provenance_markdown(sources: dict[str, dict[str, Any]]) -> list[str]:
    """The "Provenance" section: one row per output, its producer's version, revision, params and libraries."""
    def short(v: Any) -> str:
        return f"`{v[:12]}`" if isinstance(v, str) and v else "–"

    def revision(p: dict[str, Any]) -> str:
        if not p.get("git_revision"):
            return "– (not a git checkout)"
        return short(p["git_revision"]) + (" + uncommitted changes" if p.get("git_dirty") else "")

    out = ["## Provenance", "",
           "What produced each output: the params hash covers the resolved params it depends on "
           "(for metrics, of the evaluation; the trained model's own is `train_params_sha256`).", "",
           "| output | kdpipe | git revision | params sha256 | trained with params | python | torch | onnxruntime | device |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, p in sources.items():
        out.append(f"| `{name}` | {fmt(p.get('kdpipe'))} | {revision(p)} | {short(p.get('params_sha256'))} | "
                   f"{short(p.get('train_params_sha256'))} | {fmt(p.get('python'))} | {fmt(p.get('torch'))} | "
                   f"{fmt(p.get('onnxruntime'))} | {fmt(p.get('device'))} |")
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _top1_interval(top1: float, images: int) -> tuple[float, float]:
    """The 95 % Wilson interval of an ONNX file's top-1 (%) over the ``images`` test images quantize ran it on."""
    return accuracy_interval(round(top1 * images / 100), int(images))


def _interval(top1: float, images: int | None) -> str:
    """:func:`_top1_interval` as the table shows it."""
    if not images:
        return "–"
    low, high = _top1_interval(top1, images)
    return f"{low:.2f}–{high:.2f}"


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], profiles: Sequence[dict[str, Any]],
             export: dict[str, Any], quantize: dict[str, Any], benchmark: dict[str, Any] | None,
             tensorrt: dict[str, Any] | None, statistic: str,
             provenance: dict[str, dict[str, Any]] | None = None,
             significance: list[dict[str, Any]] | None = None, best: list[dict[str, Any]] | None = None) -> str:
    """``reports/results.md``, what a person reads first first: the budget picks and why, the one-screen summary
    (``best``, from :func:`model_summary`), the Pareto front per profile in tie groups; then the full table
    with each top-1's and p50's 95 % interval, what distillation buys (when given, from
    :func:`pipeline.report.significance.significance_rows`), INT8 drop, parity, efficiency, cold start, eager
    reference and (when given, from :func:`provenance_sources`) the provenance of every input."""
    names = [p["name"] for p in profiles]
    env = (benchmark or {}).get("environment", {})
    out = ["# Deployment results", ""]
    if env:
        versions = env.get("runtimes") or {"onnxruntime": env.get("onnxruntime")}
        measured = ", ".join(f"{RUNTIME_NAMES.get(r, r)} {v}" for r, v in versions.items() if v)
        out += [f"Measured on {env.get('cpu')} ({env.get('logical_cores')} logical cores, AVX-512 VNNI: "
                f"{'yes' if env.get('avx512_vnni') else 'no'}), {measured}, "
                "intra-op spinning off, warm-up excluded. Accuracy is each ONNX file's own, run by its runtime on "
                f"the test split ({quantize.get('test_images', '?')} images).", ""]
        for runtime, why in ((benchmark or {}).get("settings", {}).get("runtimes_skipped") or {}).items():
            out += [f"Not measured with {RUNTIME_NAMES.get(runtime, runtime)}: {why}.", ""]
    images = quantize.get("test_images")
    rule = next((s.get("rule") for s in summary.values() if s.get("rule")), "cheapest_within_noise")
    out += picks_markdown(summary, names, statistic, rule)
    if best:
        out += [""] + best_markdown(best, names, images, rule, statistic)
    out += [""] + front_markdown(summary, names, statistic)
    head = ["model", "role", "runtime", "precision", "top-1 %", "95 % interval", "top-5 %", "params", "MMACs", "KiB"]
    for n in names:
        head += [f"{n} p50 ms", f"{n} p99 ms"]
    out += ["", "## Models", "", "Every file run by every runtime; p50 with its 95 % interval, each file's own (the picks, the "
            "summary and the fronts above use the latency of the file's graph, measured by all files that run it).",
            "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['run']}`", r["role"], RUNTIME_NAMES.get(r["runtime"], r["runtime"]), r["precision"],
                 fmt(r["top1"]), _interval(r["top1"], images),
                 fmt(r["top5"]),
                 fmt(r["params"], ","), fmt(None if r["macs"] is None else r["macs"] / 1e6, ".3f"),
                 fmt(r["bytes"] / 1024, ".1f")]
        for n in names:
            p50 = latency_interval(r, n, "p50", pooled=False)  # the file's own measurement
            cells += [p50.text() if p50 else "–", ms(row_latency(r, n, "p99"))]
        out.append("| " + " | ".join(cells) + " |")
    if significance:
        out += [""] + significance_markdown(significance)[:-1]
    out += ["", "## INT8 against FP32 (top-1 %)", "",
            "| model | FP32 | FP16 | INT8 | INT8 drop (points) | within budget | INT8 for TensorRT (symmetric) |",
            "|---|---|---|---|---|---|---|"]
    for key, acc in quantize["models"].items():
        out.append(f"| `{key}` | {fmt(acc['fp32']['top1'])} | {fmt(acc.get('fp16', {}).get('top1'))} | "
                   f"{fmt(acc.get('int8', {}).get('top1'))} | {fmt(acc.get('int8_top1_drop'))} | "
                   f"{fmt(acc.get('int8_within_budget'))} | {fmt(acc.get('int8_trt', {}).get('top1'))} |")
    recipe = quantize.get("recipe", {})
    if recipe:
        out += ["", f"INT8: QDQ, {recipe.get('calibration_method')} calibration on {recipe.get('calibration_samples')} "
                f"training images, per-channel weights: {recipe.get('per_channel')}, activations "
                f"{recipe.get('activation_type')}."]
    out += ["", "## ONNX export parity with PyTorch (FP32, whole test split)", "",
            "| model | max abs diff | worst image | top-1 mismatches |", "|---|---|---|---|"]
    for key, ex in export["models"].items():
        p = ex["parity"]
        out.append(f"| `{key}` | {p['max_abs_diff']:.2e} | {p['worst_index']} | {p['top1_mismatches']} |")
    out += runtime_parity_markdown(quantize)
    out += efficiency_markdown(rows, profiles, benchmark)
    out += cold_start_markdown(rows, profiles)
    bench_models = (benchmark or {}).get("models", {})
    if any("torch" in v for v in bench_models.values()):
        out += ["", "## PyTorch eager FP32 reference (same run)", "",
                "| model | profile | eager p50 ms | ONNX FP32 p50 ms | ONNX/eager | INT8 p50 ms |", "|---|---|---|---|---|---|"]
        for key, entry in bench_models.items():
            for n in names:
                ort = entry.get("onnxruntime") or {}
                t = (((entry.get("torch") or {}).get("fp32") or {}).get("headline") or {}).get(n)
                f = ((ort.get("fp32") or {}).get("headline") or {}).get(n)
                q = ((ort.get("int8") or {}).get("headline") or {}).get(n)
                if not t:
                    continue
                ratio = f["p50_ms"] / t["p50_ms"] if f and t["p50_ms"] else None
                out.append(f"| `{key}` | {n} | {t['p50_ms']:.3f} | {fmt(f and f['p50_ms'], '.3f')} | "
                           f"{fmt(ratio, '.2f')} | {fmt(q and q['p50_ms'], '.3f')} |")
    if tensorrt is not None:
        status = tensorrt.get("status")
        why = f": {tensorrt.get('reason')}" if tensorrt.get("reason") else ""
        out += ["", "## TensorRT", "", f"Engine build: **{status}**{why}. Each bundle carries `build_engine.py` and "
                "`build_engines.sh` (trtexec) to build engines on the target GPU."]
    if provenance:
        out += [""] + provenance_markdown(provenance)
    out += ["", "![accuracy against latency](pareto.png)", ""]
    return "\n".join(out)


def _latency_cell(entry: dict[str, Any]) -> str:
    """A summary entry's latency (``latency_ms``, ``latency_ci_ms``) as ``point [low–high]``."""
    point, ci = entry.get("latency_ms"), entry.get("latency_ci_ms")
    if point is None:
        return "–"
    low, high = ci if ci else (point, point)
    return latency_text(point, low, high)


def latency_text(point: float, low: float, high: float) -> str:
    """``point [low–high]`` in ms (the point alone when the interval is the point)."""
    return Interval(point, min(low, point), max(high, point)).text()


def profile_lines(name: str, s: dict[str, Any]) -> list[str]:
    """One profile's pick and Pareto front as ``kdpipe results`` prints them, latencies with their intervals."""
    stat = s.get("statistic", "p50")
    pick = s.get("pick")
    shown = (f"{pick['model']} ({fmt(pick['top1'])} %, {stat} {_latency_cell(pick)} ms, {fmt(pick.get('kib'), '.1f')} "
             f"KiB; rule {s.get('rule', 'most_accurate')})") if pick else "none"
    out = [f"  {name}: {shown}. {s.get('why', '')}".rstrip()]
    groups = s.get("pareto_groups") or [[{"model": m}] for m in s.get("pareto_front", [])]
    if groups:
        out.append(f"    Pareto front, fastest first ({stat} ms [95 % interval]; = ties within noise):")
    for k, group in enumerate(groups, start=1):
        out.append(f"    {k}. " + " = ".join(f"{g['model']} ({fmt(g.get('top1'))} %, {_latency_cell(g)})"
                                              for g in group))
    return out


def picks_markdown(summary: dict[str, Any], names: Sequence[str], statistic: str, rule: str) -> list[str]:
    """The opening section: each profile's budgets, its pick (top-1, latency with interval, KiB), and why."""
    out = [f"## Picks ({statistic} latency with its 95 % interval, file size; rule `{rule}`)", "",
           f"| profile | latency budget ms | size budget KiB | pick | top-1 % | {statistic} ms [95 % interval] | KiB "
           "| rule |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = summary[n]
        pick = s["pick"]
        out.append(f"| {n} | {fmt(s['budget_ms'], 'g')} | {fmt(s.get('size_budget_kib'), 'g')} | "
                   f"{pick['model'] if pick else ('none meets the budgets' if s.get('why') else 'no budget')} | "
                   f"{fmt(pick['top1']) if pick else '–'} | {_latency_cell(pick) if pick else '–'} | "
                   f"{fmt(pick.get('kib'), '.1f') if pick else '–'} | {s.get('rule', rule)} |")
    whys = [f"- **{n}**: {summary[n]['why']}" for n in names if summary[n].get("why")]
    if whys:
        out += ["", "Why each pick:", ""] + whys
    return out


def best_markdown(best: list[dict[str, Any]], names: Sequence[str], images: int | None, rule: str,
                  statistic: str) -> list[str]:
    """The one-screen summary: one row per model and runtime, its best variant by the rule, intervals."""
    out = ["## Summary: each model's best variant per runtime", "",
           f"The variant rule `{rule}` takes among the model's own files with no budget ({statistic} latency of "
           f"the first profile); {statistic} with its 95 % interval.", "",
           "| model | runtime | variant | top-1 % | 95 % interval | " + " | ".join(f"{n} {statistic} ms" for n in names)
           + " | KiB |", "|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for b in best:
        cells = []
        for n in names:
            lat = (b.get("latency") or {}).get(n)
            cells.append(latency_text(lat["ms"], *lat["ci_ms"]) if lat else "–")
        who = b["model"].rsplit(" ", 2 if b["runtime"] != "onnxruntime" else 1)[0]
        out.append(f"| {who} | {RUNTIME_NAMES.get(b['runtime'], b['runtime'])} | {b['precision']} | "
                   f"{fmt(b['top1'])} | {_interval(b['top1'], images)} | " + " | ".join(cells)
                   + f" | {fmt(b['kib'], '.1f')} |")
    return out


def front_markdown(summary: dict[str, Any], names: Sequence[str], statistic: str) -> list[str]:
    """The Pareto front per profile, fastest group first, one row per model; a group of models that tie on both
    axes within noise shares a number."""
    out = ["## Pareto front per profile (fastest first; beyond noise only, ties grouped)", "",
           f"| profile | # | model | top-1 % | {statistic} ms [95 % interval] | KiB |", "|---|---|---|---|---|---|"]
    for n in names:
        groups = summary[n].get("pareto_groups") or []
        if not groups:
            out.append(f"| {n} | – | not measured | – | – | – |")
        for k, group in enumerate(groups, start=1):
            tag = f"{k} (tie of {len(group)})" if len(group) > 1 else str(k)
            for g in group:
                out.append(f"| {n} | {tag} | {g['model']} | {fmt(g['top1'])} | {_latency_cell(g)} | "
                           f"{fmt(g['kib'], '.1f')} |")
    return out + ["", "A model is on the front when no other is better beyond noise on one axis (exact McNemar "
                  "p < alpha on the same test images; latency: the 95 % interval of the per-round ratio of files timed "
                  "side by side, or separated 95 % intervals across runtimes) and not worse beyond "
                  "noise on the other; files of one graph (equal `graph_sha256`) tie in latency."]


def runtime_parity_markdown(quantize: dict[str, Any]) -> list[str]:
    """The section on each other runtime's run of every file on the test split, against onnxruntime's."""
    lines = []
    for key, acc in quantize["models"].items():
        for runtime, per in (acc.get("runtimes") or {}).items():
            for variant, f in sorted(per.items(), key=lambda kv: PRECISION_ORDER.get(kv[0], 9)):
                ort_top1 = (acc.get(f["file_variant"]) or {}).get("top1")
                check = "yes" if f.get("within_tolerance") else "–"
                lines.append(f"| `{key}` | {RUNTIME_NAMES.get(runtime, runtime)} | {variant} | {f['max_abs_diff']:.2e} | "
                             f"{f['top1_mismatches']} | {fmt(f['top1'])} | {fmt(ort_top1)} | {check} |")
    if not lines:
        return []
    return ["", "## Other runtimes against onnxruntime (same file, whole test split)", "",
            "FP32 must agree within the export's parity tolerance (the stage fails otherwise); INT8 kernels round "
            "differently and bf16 keeps 8 bits of mantissa, so their figures are shown, not enforced.", "",
            "| model | runtime | variant | max abs diff | top-1 mismatches | top-1 % | onnxruntime top-1 % | "
            "FP32 within tolerance |", "|---|---|---|---|---|---|---|---|", *lines]


def efficiency_markdown(rows: list[dict[str, Any]], profiles: Sequence[dict[str, Any]],
                        benchmark: dict[str, Any] | None) -> list[str]:
    """The section on how close each model runs to the GEMM peak of its runtime, per profile."""
    peaks = (benchmark or {}).get("peak") or {}
    if not peaks:
        return []
    out = ["", "## How close to the hardware's limit", "",
           "Peak: the best run of a 1024x1024x1024 GEMM through the same runtime and thread count (FP32 `MatMul`, "
           "INT8 in QDQ form, bf16 where OpenVINO offers it), in GMAC/s. A model's rate is its MACs x its "
           "throughput at the profile's largest batch.", "",
           "| runtime | precision | threads | peak GMAC/s | p50 GMAC/s |", "|---|---|---|---|---|"]
    for runtime, res in peaks.items():
        for precision, per in (res.get("peaks") or {}).items():
            for t, f in per.items():
                out.append(f"| {RUNTIME_NAMES.get(runtime, runtime)} | {precision} | {t if t != '0' else 'all'} | "
                           f"{fmt(f['gmacs_per_s'], '.1f')} | {fmt(f['p50_gmacs_per_s'], '.1f')} |")
    names = [p["name"] for p in profiles if not p.get("device")]  # this host's peaks: not a device's
    out += ["", "| model | " + " | ".join(f"{n} GMAC/s | {n} % of peak" for n in names) + " |",
            "|---|" + "---|---|" * len(names)]
    for r in rows:
        if not any((r.get("efficiency") or {}).values()):
            continue  # not measured (a variant the benchmark leaves out)
        cells = []
        for n in names:
            e = (r.get("efficiency") or {}).get(n)
            frac = e.get("fraction_of_peak") if e else None
            cells += [fmt(e and e["gmacs_per_s"], ".2f"), fmt(None if frac is None else 100 * frac, ".1f")]
        out.append(f"| {label(r)} | " + " | ".join(cells) + " |")
    return out


def cold_start_markdown(rows: list[dict[str, Any]], profiles: Sequence[dict[str, Any]]) -> list[str]:
    """The section on cold start (runtime import, session creation, first run) and peak memory per runtime."""
    first = profiles[0]["name"] if profiles else None
    lines = []
    for r in rows:
        c = (r.get("cold_start") or {}).get(first) if first else None
        if not c:
            continue
        total = (r.get("import_ms") or 0.0) + c["session_ms"] + c["first_run_ms"]
        lines.append(f"| {label(r)} | {fmt(r.get('import_ms'), '.1f')} | {fmt(c['session_ms'], '.1f')} | "
                     f"{fmt(c['first_run_ms'], '.2f')} | {fmt(total, '.1f')} | {fmt(r.get('peak_rss_mb'), '.1f')} |")
    if not lines:
        return []
    return ["", f"## Cold start and memory ({first}, one fresh process per file and runtime)", "",
            "| model | import ms | session ms | first run ms | cold start ms | peak RSS MiB |",
            "|---|---|---|---|---|---|", *lines]
