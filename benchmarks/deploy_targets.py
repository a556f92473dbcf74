"""Issue 5 deployment targets, measured in one run; prints the figures and PASS/FAIL.

1. INT8 top-1 within 1.0 point of FP32 for every student of the params (default: the
   embedded digits default): each run of each student (its baseline and every method)
   is exported (dynamo), quantized (QDQ, per-channel, the params' calibration) and both
   files are scored by onnxruntime on the whole test split. Models come from
   ``--root``'s ``runs/`` (a ``dvc repro`` workspace); with ``--train`` the missing ones
   are trained first in a scratch folder with the pipeline's own code (the workspace's
   teacher is reused when it exists).
2. resnet8x4 at 32x32 (3 channels, 10 classes) on this CPU: INT8 ONNX throughput at
   batch 32 >= 2x the FP32 ONNX model, and FP32 ONNX batch-1 latency <= 0.7x PyTorch
   eager. Measured in one process, the contenders interleaved round by round (so a
   noisy neighbour hits them alike), warm-up excluded, onnxruntime spinning off,
   the same thread count for onnxruntime and PyTorch; each thread count of
   ``--threads`` is a separate check.

3. Issue 16, the runtimes and the hardware limit (``--runtimes``): resnet8x4 at 32x32 and
   timm's MobileNetV3-Small-100 at 224x224 (random weights), batch 32, all cores. The
   faster of onnxruntime and OpenVINO INT8 >= 4x onnxruntime FP32 throughput; FP32
   achieved MAC/s >= 50 % of the FP32 GEMM peak measured in the same run through the
   same runtime (reported whatever it is, with the operator types the time goes to,
   from onnxruntime's profiler); OpenVINO f32 vs onnxruntime max |delta logit| <= 1e-4
   for those models and every ``exports/onnx/**/model.onnx`` (the FP32 exports) under ``--root``.

    python benchmarks/deploy_targets.py                       # ./runs, threads 1 and all cores
    python benchmarks/deploy_targets.py --train               # train what is missing (scratch folder)
    python benchmarks/deploy_targets.py --skip-accuracy --threads 1
    python benchmarks/deploy_targets.py --skip-accuracy --skip-speed --runtimes   # issue 16's targets only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data import build_data  # noqa: E402
from pipeline.deploy.artifacts import calibration_indices, deployable_runs, split_arrays  # noqa: E402
from pipeline.deploy.edge.edge_runtime import open_session  # noqa: E402
from pipeline.deploy.export import export_onnx  # noqa: E402
from pipeline.deploy.quantize import quantize_int8, score  # noqa: E402
from pipeline.engine.checkpoint import load_model_file  # noqa: E402
from pipeline.models import build  # noqa: E402
from pipeline.params import load_params  # noqa: E402

MAX_INT8_DROP = 1.0
MIN_INT8_SPEEDUP = 2.0
MAX_ONNX_TO_EAGER = 0.7


def accuracy_target(params_path: str, root: Path, train_missing: bool) -> tuple[list[dict], bool]:
    """FP32 vs INT8 top-1 of every student run; (rows, all within the drop)."""
    from pipeline.runs import RunId, train

    params = load_params(params_path)
    deps = deployable_runs(params, include_teacher=False)
    missing = [d for d in deps if not d.model_file(root).is_file()]
    where = {d.key: root for d in deps}
    if missing:
        if not train_missing:
            raise SystemExit(f"no trained models under {root}/runs for {[d.key for d in missing]}: "
                             "run `dvc repro` first, or pass --train")
        # Train only what is missing, in a scratch folder (never into the workspace's DVC outs).
        scratch = Path(tempfile.mkdtemp(prefix="kdpipe-targets-"))
    try:
        if missing:
            os.environ.setdefault("KDPIPE_PROGRESS", "off")
            teacher = RunId("teacher").out_dir(root) / "model.pt"
            if any(d.role == "distilled" for d in missing):
                if teacher.is_file():
                    (scratch / "runs" / "teacher").mkdir(parents=True)
                    shutil.copyfile(teacher, scratch / "runs" / "teacher" / "model.pt")
                else:
                    train(params, RunId("teacher"), scratch)
            for d in missing:
                print(f"training {d.key} in {scratch} ...", flush=True)
                train(params, d.run, scratch)
                where[d.key] = scratch
        return _score_int8(params, deps, where)
    finally:
        if missing:
            shutil.rmtree(scratch, ignore_errors=True)


def _score_int8(params: Any, deps: list, where: dict[str, Path]) -> tuple[list[dict], bool]:
    """Export, quantize and score each run's FP32 and INT8 files on the test split."""
    data = build_data(params.data, params.seed)
    images, labels = split_arrays(data.test)
    q = params.quantize
    calib, _ = split_arrays(data.train_eval, calibration_indices(len(data.train_eval), q.calibration_samples,
                                                                 params.seed))
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="kdpipe-targets-onnx-") as tmp:
        for dep in deps:
            model, _ = load_model_file(dep.model_file(where[dep.key]), expect_classes=data.num_classes)
            fp32 = export_onnx(model, Path(tmp) / dep.key / "model.onnx", in_channels=data.in_channels,
                               image_size=data.image_size, opset=params.export.opset)
            int8 = Path(tmp) / dep.key / "model_int8.onnx"
            quantize_int8(fp32, int8, calib, method=q.calibration_method, per_channel=q.per_channel,
                          activation_type=q.activation_type, percentile=q.percentile,
                          histogram_bins=q.histogram_bins, batch_size=q.calibration_batch_size)
            a, b = score(fp32, images, labels, 256), score(int8, images, labels, 256)
            drop = a["top1"] - b["top1"]
            rows.append({"run": dep.key, "fp32_top1": a["top1"], "int8_top1": b["top1"], "drop": round(drop, 4),
                         "pass": drop <= MAX_INT8_DROP})
            ok &= drop <= MAX_INT8_DROP
    return rows, ok


def _interleaved(contenders: dict[str, Callable[[], object]], rounds: int, per_round: int, warmup: int) -> dict[str, float]:
    """Median over rounds of each contender's median run time (ms); contenders alternate every round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    medians: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            fn = contenders[name]
            times = []
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                fn()
                times.append((time.perf_counter_ns() - t0) / 1e6)
            medians[name].append(statistics.median(times))
    return {k: statistics.median(v) for k, v in medians.items()}


def speed_target(threads: int, rounds: int, calib_images: int, q) -> dict:
    """resnet8x4 at 32x32: INT8 vs FP32 ONNX throughput at batch 32, FP32 ONNX vs eager latency at batch 1."""
    from pipeline.data.synthetic import make_synthetic

    torch.manual_seed(0)
    model = build("resnet8x4", num_classes=10, in_channels=3, image_size=32).eval()
    pixels, _ = make_synthetic(max(64, calib_images), 10, 32, 0)
    calib = ((pixels[:calib_images].astype(np.float32) / 255.0) - 0.5) / 0.25
    n_threads = threads or (os.cpu_count() or 1)
    torch.set_num_threads(n_threads)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    x32 = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    t1, t32 = torch.from_numpy(x1), torch.from_numpy(x32)
    with tempfile.TemporaryDirectory(prefix="kdpipe-speed-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "r.onnx", in_channels=3, image_size=32, opset=18)
        int8 = Path(tmp) / "r_int8.onnx"
        quantize_int8(fp32, int8, calib, method=q.calibration_method, per_channel=q.per_channel,
                      activation_type=q.activation_type, batch_size=q.calibration_batch_size)
        s32, s8 = open_session(fp32, threads=threads), open_session(int8, threads=threads)
        with torch.inference_mode():
            b1 = _interleaved({"eager": lambda: model(t1), "onnx_fp32": lambda: s32.run(None, {"input": x1}),
                               "onnx_int8": lambda: s8.run(None, {"input": x1})}, rounds, 50, 20)
            b32 = _interleaved({"onnx_fp32": lambda: s32.run(None, {"input": x32}),
                                "onnx_int8": lambda: s8.run(None, {"input": x32}),
                                "eager": lambda: model(t32)}, rounds, 10, 3)
    thr = {k: 32 * 1000.0 / v for k, v in b32.items()}
    speedup = thr["onnx_int8"] / thr["onnx_fp32"]
    ratio = b1["onnx_fp32"] / b1["eager"]
    return {"threads": threads or f"all ({n_threads})", "batch1_ms": {k: round(v, 4) for k, v in b1.items()},
            "batch32_images_per_s": {k: round(v, 1) for k, v in thr.items()},
            "int8_vs_fp32_throughput": round(speedup, 3), "onnx_fp32_vs_eager_latency": round(ratio, 3),
            "pass_int8_throughput": speedup >= MIN_INT8_SPEEDUP, "pass_onnx_latency": ratio <= MAX_ONNX_TO_EAGER}


MIN_INT8_RUNTIME_SPEEDUP = 4.0
MIN_FP32_PEAK_FRACTION = 0.5
MAX_RUNTIME_DIFF = 1e-4


def _time_breakdown(path: Path, feed: dict[str, np.ndarray], runs: int = 5) -> list[tuple[str, float]]:
    """Share of onnxruntime's kernel time per operator type (largest first), from its own profiler."""
    import onnxruntime as ort

    from pipeline.deploy.edge.edge_runtime import session_options

    so = session_options(0)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="kdpipe-prof-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(ev.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    return sorted(((op, 100.0 * t / total) for op, t in per_op.items()), key=lambda kv: -kv[1])


def _runtime_models(tmp: Path, q: Any) -> list[dict[str, Any]]:
    """resnet8x4 at 32x32 and timm MobileNetV3-Small-100 at 224x224: FP32 and INT8 files, MACs per image."""
    from pipeline.data.synthetic import make_synthetic
    from pipeline.models.complexity import count_macs

    out = []
    for name, size in (("resnet8x4", 32), ("timm/mobilenetv3_small_100", 224)):
        torch.manual_seed(0)
        model = build(name, num_classes=10, in_channels=3, image_size=size).eval()
        pixels, _ = make_synthetic(64, 10, size, 0)
        calib = ((pixels.astype(np.float32) / 255.0) - 0.5) / 0.25
        folder = tmp / name.replace("/", "_")
        fp32 = export_onnx(model.export_form(), folder / "model_fp32.onnx",
                           in_channels=3, image_size=size, opset=18)
        int8 = folder / "model_int8.onnx"
        quantize_int8(fp32, int8, calib, method=q.calibration_method, per_channel=q.per_channel,
                      activation_type=q.activation_type, batch_size=q.calibration_batch_size)
        out.append({"name": name, "size": size, "fp32": fp32, "int8": int8, "macs": count_macs(model, 3, size)})
    return out


def runtime_targets(rounds: int, root: Path, q: Any) -> tuple[dict[str, Any], bool]:
    """Issue 16: INT8 speed-up over FP32 across runtimes, FP32 share of the GEMM peak, OpenVINO parity."""
    from pipeline.deploy.edge.edge_measure import measure_peak
    from pipeline.deploy.edge.edge_runtime import installed_runtimes, open_session
    from pipeline.deploy.peak import write_gemm_models

    if "openvino" not in installed_runtimes():
        raise SystemExit("openvino is not installed: pip install -e '.[openvino]'")
    ok, out = True, {"models": [], "parity": []}
    with tempfile.TemporaryDirectory(prefix="kdpipe-runtimes-") as tmp:
        peaks = {rt: measure_peak(write_gemm_models(Path(tmp) / "gemm"), [0], rt, max_seconds=3.0)["peaks"]
                 for rt in ("onnxruntime", "openvino")}
        out["peaks_gmacs_per_s"] = {rt: {p: v["0"]["gmacs_per_s"] for p, v in per.items()} for rt, per in peaks.items()}
        for m in _runtime_models(Path(tmp), q):
            x = np.random.default_rng(0).standard_normal((32, 3, m["size"], m["size"])).astype(np.float32)
            sessions = {"ort_fp32": open_session(m["fp32"]), "ort_int8": open_session(m["int8"]),
                        "ov_fp32": open_session(m["fp32"], runtime="openvino"),
                        "ov_int8": open_session(m["int8"], runtime="openvino")}
            ms = _interleaved({k: (lambda s=s, x=x: s.run(None, {"input": x})) for k, s in sessions.items()}, rounds, 5, 3)
            ips = {k: 32 * 1000.0 / v for k, v in ms.items()}
            best_int8 = max(ips["ort_int8"], ips["ov_int8"])
            speedup = best_int8 / ips["ort_fp32"]
            frac = {rt: m["macs"] * ips[f"{k}_fp32"] / 1e9 / peaks[rt]["fp32"]["0"]["gmacs_per_s"]
                    for rt, k in (("onnxruntime", "ort"), ("openvino", "ov"))}
            breakdown = _time_breakdown(m["fp32"], {"input": x})
            row = {"model": m["name"], "image_size": m["size"], "mmacs": round(m["macs"] / 1e6, 2),
                   "images_per_s": {k: round(v, 1) for k, v in ips.items()},
                   "int8_best_vs_ort_fp32": round(speedup, 3),
                   "fp32_fraction_of_peak": {k: round(v, 4) for k, v in frac.items()},
                   "ort_fp32_time_by_op_pct": {op: round(v, 1) for op, v in breakdown[:6]}}
            if m["name"] == "resnet8x4":
                row["pass_int8"] = speedup >= MIN_INT8_RUNTIME_SPEEDUP
                row["pass_fp32_peak"] = max(frac.values()) >= MIN_FP32_PEAK_FRACTION
                ok &= row["pass_int8"] and row["pass_fp32_peak"]
            out["models"].append(row)
            fp32_files = [(m["name"], m["fp32"], m["size"])]
            out["parity"] += _parity_rows(fp32_files)
        exported = sorted((root / "exports" / "onnx").glob("**/model.onnx"))
        out["parity"] += _parity_rows([(str(f.parent.relative_to(root / "exports" / "onnx")), f, None)
                                       for f in exported])
    ok &= all(r["pass"] for r in out["parity"])
    return out, ok


def _parity_rows(files: list[tuple[str, Path, int | None]]) -> list[dict[str, Any]]:
    """OpenVINO f32 against onnxruntime on 64 seeded images for each FP32 file."""
    from pipeline.deploy.edge.edge_runtime import input_facts, open_session

    rows = []
    for name, path, _ in files:
        ort_s, ov_s = open_session(path), open_session(path, runtime="openvino")
        _, chw, _ = input_facts(ort_s)
        x = np.random.default_rng(1).standard_normal((64, *chw)).astype(np.float32)
        a, b = ort_s.run(None, {"input": x})[0], ov_s.run(None, {"input": x})[0]
        diff = float(np.abs(a.astype(np.float64) - b).max())
        rows.append({"model": name, "max_abs_diff": diff, "max_abs_logit": float(np.abs(a).max()),
                     "pass": diff <= MAX_RUNTIME_DIFF})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".", help="workspace whose runs/ hold the trained models")
    ap.add_argument("--train", action="store_true", help="train missing models in a scratch folder")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="thread counts to check (0: all cores)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="leave out target 2 (issue 5's speed targets)")
    ap.add_argument("--runtimes", action="store_true", help="also check issue 16's runtime and peak targets")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    out: dict = {}
    ok = True
    if not args.skip_accuracy:
        rows, acc_ok = accuracy_target(args.params, Path(args.root), args.train)
        out["int8_accuracy"] = rows
        print(f"\n1. INT8 top-1 within {MAX_INT8_DROP} point of FP32 (onnxruntime, whole test split)")
        for r in rows:
            print(f"   {r['run']:24s} fp32 {r['fp32_top1']:7.3f}  int8 {r['int8_top1']:7.3f}  "
                  f"drop {r['drop']:+.3f}  {'PASS' if r['pass'] else 'FAIL'}")
        ok &= acc_ok
    q = load_params(args.params).quantize
    out["speed"] = []
    if not args.skip_speed:
        print("\n2. resnet8x4 at 32x32 (random weights; speed does not depend on them)")
    for threads in [] if args.skip_speed else args.threads:
        s = speed_target(threads, args.rounds, 64, q)
        out["speed"].append(s)
        b1, thr = s["batch1_ms"], s["batch32_images_per_s"]
        print(f"   threads {s['threads']}:")
        print(f"     batch 32 throughput: fp32 onnx {thr['onnx_fp32']:.0f}/s, int8 onnx {thr['onnx_int8']:.0f}/s, "
              f"eager {thr['eager']:.0f}/s -> int8/fp32 = {s['int8_vs_fp32_throughput']:.2f}x "
              f"(target >= {MIN_INT8_SPEEDUP}x)  {'PASS' if s['pass_int8_throughput'] else 'FAIL'}")
        print(f"     batch 1 latency: eager {b1['eager']:.3f} ms, fp32 onnx {b1['onnx_fp32']:.3f} ms, "
              f"int8 onnx {b1['onnx_int8']:.3f} ms -> onnx/eager = {s['onnx_fp32_vs_eager_latency']:.2f} "
              f"(target <= {MAX_ONNX_TO_EAGER})  {'PASS' if s['pass_onnx_latency'] else 'FAIL'}")
        ok &= s["pass_int8_throughput"] and s["pass_onnx_latency"]
    if args.runtimes:
        res, rt_ok = runtime_targets(args.rounds, Path(args.root), q)
        out["runtimes"] = res
        ok &= rt_ok
        print("\n3. runtimes and the hardware limit (batch 32, all cores, random weights)")
        print(f"   GEMM peak GMAC/s: {json.dumps(res['peaks_gmacs_per_s'])}")
        for r in res["models"]:
            ips = r["images_per_s"]
            print(f"   {r['model']} at {r['image_size']}x{r['image_size']} ({r['mmacs']} MMACs/image): images/s "
                  + ", ".join(f"{k} {v:.0f}" for k, v in ips.items()))
            verdict = ""
            if "pass_int8" in r:
                verdict = (f"  (target >= {MIN_INT8_RUNTIME_SPEEDUP}x)  {'PASS' if r['pass_int8'] else 'FAIL'}")
            print(f"     best INT8 / onnxruntime FP32 = {r['int8_best_vs_ort_fp32']:.2f}x{verdict}")
            frac = r["fp32_fraction_of_peak"]
            verdict = ""
            if "pass_fp32_peak" in r:
                verdict = f"  (target >= {MIN_FP32_PEAK_FRACTION:.0%})  {'PASS' if r['pass_fp32_peak'] else 'FAIL'}"
            print(f"     FP32 share of the FP32 GEMM peak: onnxruntime {frac['onnxruntime']:.1%}, "
                  f"OpenVINO {frac['openvino']:.1%}{verdict}")
            print("     onnxruntime FP32 time by operator: "
                  + ", ".join(f"{op} {pct:.0f}%" for op, pct in r["ort_fp32_time_by_op_pct"].items()))
        for r in res["parity"]:
            print(f"   OpenVINO f32 vs onnxruntime, {r['model']}: max |delta logit| {r['max_abs_diff']:.2e} "
                  f"(logits up to {r['max_abs_logit']:.3g}; target <= {MAX_RUNTIME_DIFF:g})  "
                  f"{'PASS' if r['pass'] else 'FAIL'}")
    print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
