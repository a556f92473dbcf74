"""The ``benchmark`` stage: every model x runtime x variant x device profile, timed the way a device runs it.

Each ONNX file is measured per runtime (``benchmark.runtimes``: onnxruntime, and
OpenVINO where installed, which adds a bf16 variant on CPUs that offer it) by the
bundle's own ``edge_measure.py`` (:func:`edge_measure.measure_files`), so the code timed
is the code shipped: a fresh process per file for its cold start and peak memory, then
one process per runtime that times all its files per profile in ``benchmark.rounds``
interleaved rounds (round-robin, so a drift of the machine hits every file alike). Per
profile and batch size: p50/p90/p99 latency (median over rounds) with 95 % intervals,
and the throughput; intra-op spinning off, warm-up runs excluded. Each result records
its ``graph_sha256`` (:mod:`pipeline.deploy.graph_identity`): files with one graph and
different weights, whose latencies differ by noise alone. PyTorch eager FP32 is
measured in the same run as the reference, all models in one process of their own and
in the same interleaved rounds. With ``benchmark.peak`` the same run times a large FP32
and INT8 GEMM per runtime and thread count (:mod:`pipeline.deploy.peak`), the practical
peak the report compares each model's MAC/s with. Results go to
``reports/benchmark.json`` (DVC metrics): ``models[run][runtime][variant]``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.deploy.artifacts import DeployError, deployable_runs, report_file, stage_provenance, variant_file
from pipeline.deploy.edge import edge_measure, edge_runtime, edge_timing
from pipeline.deploy.edge.edge_measure import headline
from pipeline.deploy.graph_identity import graph_sha256

MEASURE_SCRIPT = Path(edge_measure.__file__).resolve()


def _last_json(proc: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:]
        raise DeployError(f"measuring {what} failed (exit {proc.returncode}): {tail[0] if tail else ''}") from None
    if "error" in result:
        raise DeployError(f"measuring {what} failed: {result['error']}")
    return result


def measure_files(files: list[tuple[Path, str]], profiles: list[dict[str, Any]], warmup: int, iterations: int,
                  max_seconds: float, rounds: int, runtime: str = "onnxruntime") -> list[dict[str, Any]]:
    """Measure ``(file, precision)`` pairs with ``runtime`` as a bundle does (:func:`edge_measure.measure_files`),
    a line of progress per file; a failure is a :class:`DeployError`."""
    try:
        return edge_measure.measure_files([(str(f), p) for f, p in files], profiles, warmup, iterations, max_seconds,
                                          rounds, runtime, progress=lambda line: print(f"benchmark: {line}", flush=True))
    except edge_runtime.EdgeError as err:
        raise DeployError(str(err)) from None


def measure_onnx(path: Path, profiles: list[dict[str, Any]], warmup: int, iterations: int,
                 max_seconds: float, runtime: str = "onnxruntime", precision: str = "f32",
                 rounds: int = edge_measure.DEFAULT_ROUNDS) -> dict[str, Any]:
    """Measure one ONNX file with ``runtime`` (:func:`measure_files`); its result."""
    return measure_files([(path, precision)], profiles, warmup, iterations, max_seconds, rounds, runtime)[0]


def measure_peaks(runtime: str, threads: list[int], folder: Path, bf16: bool = False,
                  max_seconds: float = 2.0) -> dict[str, Any]:
    """This machine's GEMM peak through ``runtime`` per thread count, in a fresh process (``edge_measure.py peak``).

    ``bf16`` adds OpenVINO's FP32 GEMM compiled in bf16 (the peak of the bf16 variant).
    """
    from pipeline.deploy.peak import write_gemm_models

    gemms = write_gemm_models(folder)
    if bf16:  # the FP32 GEMM once more, compiled in bf16
        gemms.append({**next(g for g in gemms if g["precision"] == "fp32"), "precision": "bf16", "hint": "bf16"})
    spec = {"gemms": gemms, "threads": threads, "runtime": runtime, "warmup": 3, "iterations": 20,
            "max_seconds": max_seconds}
    timeout = 120.0 + len(gemms) * len(threads) * (3.0 * max_seconds + 30.0)
    proc = subprocess.run([sys.executable, str(MEASURE_SCRIPT), "peak", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    return _last_json(proc, f"the GEMM peak with {runtime}")


def measure_torch(model_files: list[Path], profiles: list[dict[str, Any]], warmup: int, iterations: int,
                  max_seconds: float, rounds: int = edge_measure.DEFAULT_ROUNDS) -> list[dict[str, Any]]:
    """Time PyTorch eager FP32 of model files in one fresh process (this module's ``torch-measure``).

    One process for all models: importing torch and the model registry costs seconds,
    more than timing a small model. The models are timed together in interleaved
    rounds, as the ONNX files are. Memory figures are therefore per process
    (``peak_rss_mb``, cumulative) plus ``model_rss_mb``, the resident memory a model
    added while it was loaded and first run.
    """
    spec = {"models": [str(f) for f in model_files], "profiles": profiles, "warmup": warmup,
            "iterations": iterations, "max_seconds": max_seconds, "rounds": rounds}
    proc = subprocess.run([sys.executable, "-m", "pipeline.deploy.benchmark", "torch-measure", json.dumps(spec)],
                          capture_output=True, text=True,
                          timeout=edge_measure.worker_timeout(profiles, len(model_files), warmup, max_seconds),
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))})
    return _last_json(proc, "PyTorch eager")["results"]


def _current_rss_mb() -> float | None:
    """Resident memory of this process now (Linux), MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 2)


def torch_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker body: PyTorch eager FP32 latency of each model file per profile (CPU; inference mode)."""
    import numpy as np
    import torch

    from pipeline.engine.checkpoint import load_model_file

    default_threads = torch.get_num_threads()
    baseline = edge_measure.peak_rss_mb()
    warmup, rounds = int(spec.get("warmup", 10)), int(spec.get("rounds", edge_measure.DEFAULT_ROUNDS))
    loaded, results = [], []
    with torch.inference_mode():
        for file in spec["models"]:
            before = _current_rss_mb()
            path = Path(file)
            model, info = load_model_file(path)
            model.eval()
            chw = (int(info["in_channels"]), int(info["image_size"]), int(info["image_size"]))
            model(torch.zeros((1, *chw)))
            after = _current_rss_mb()
            loaded.append((model, chw))
            results.append({"model": path.name, "file_bytes": path.stat().st_size, "torch": str(torch.__version__),
                            "profiles": {}, "baseline_rss_mb": baseline,
                            "model_rss_mb": None if before is None or after is None else round(after - before, 2)})
        rng = np.random.default_rng(0)
        for prof in spec["profiles"]:
            name = prof["name"]
            if "CPUExecutionProvider" not in (prof.get("providers") or ["CPUExecutionProvider"]):
                for out in results:
                    out["profiles"][name] = {"status": "skipped", "reason": "the reference runs on the CPU only"}
                continue
            torch.set_num_threads(int(prof.get("threads", 0)) or default_threads)
            slots, where = [], []
            for i, (model, chw) in enumerate(loaded):
                for b in prof.get("batch_sizes", [1]):
                    x = torch.from_numpy(rng.standard_normal((int(b), *chw)).astype(np.float32))
                    slots.append(lambda x=x, model=model: model(x))
                    where.append((i, int(b)))
            per_slot = edge_timing.interleaved_rounds(slots, rounds, warmup, int(spec.get("iterations", 200)),
                                                      float(spec.get("max_seconds", 2.0)))
            for (i, b), ms in zip(where, per_slot, strict=True):
                prof_out = results[i]["profiles"].setdefault(name, {"status": "ok", "threads": int(prof.get("threads", 0)),
                                                                    "providers": ["torch-cpu"], "batches": {}})
                prof_out["batches"][str(b)] = edge_timing.round_stats(ms, b)
    for out in results:
        out["peak_rss_mb"] = edge_measure.peak_rss_mb()
    return {"results": results}


def environment() -> dict[str, Any]:
    """The machine and library versions the figures were measured with (``runtimes``: name -> version or None)."""
    import onnxruntime

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    installed = edge_runtime.installed_runtimes()
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "runtimes": {r: edge_runtime.runtime_version(r) if r in installed else None for r in edge_runtime.RUNTIMES}}


def benchmark_all(params: Any, root: Path = Path(".")) -> dict[str, Any]:
    """The ``benchmark`` stage: measure every model x runtime x variant (+ PyTorch eager) x profile; writes the report."""
    import tempfile

    from pipeline.engine.atomic import atomic_write_json

    cfg = params.benchmark
    profiles = [p.model_dump(mode="json") for p in cfg.profiles]
    runtimes, skipped = edge_runtime.available_runtimes(list(cfg.runtimes))
    for runtime, why in skipped.items():
        print(f"benchmark: {runtime} skipped: {why}", flush=True)
    plans = {r: edge_runtime.runtime_variants(r, list(cfg.variants)) for r in runtimes}
    deps = deployable_runs(params)
    models: dict[str, Any] = {dep.key: {r: {v: {} for v, _, _ in plans[r]} for r in runtimes} for dep in deps}
    graphs: dict[str, str] = {}
    for runtime, plan in plans.items():
        targets: list[tuple[str, str, Path, str]] = []
        for dep in deps:
            for variant, file_variant, precision in plan:
                path = variant_file(root, dep.key, file_variant)
                if path.is_file():
                    targets.append((dep.key, variant, path, precision))
                else:
                    models[dep.key][runtime][variant] = {"status": "skipped", "reason": f"{path} not found"}
        print(f"benchmark: {runtime}: {len(targets)} file(s), a fresh process each, then {cfg.rounds} interleaved "
              "rounds", flush=True)
        results = measure_files([(t[2], t[3]) for t in targets], profiles, cfg.warmup, cfg.iterations,
                                cfg.max_seconds, cfg.rounds, runtime)
        for (key, variant, path, _), res in zip(targets, results, strict=True):
            sha = graphs.setdefault(str(path), graph_sha256(path))
            models[key][runtime][variant] = {"status": "ok", **res, "graph_sha256": sha}
        print(f"benchmark: {runtime} done", flush=True)
    if cfg.torch_reference:
        for dep, res in zip(deps, measure_torch([d.model_file(root) for d in deps], profiles, cfg.warmup,
                                                cfg.iterations, cfg.max_seconds, cfg.rounds), strict=True):
            models[dep.key]["torch"] = {"fp32": {"status": "ok", **res}}
        print("benchmark: PyTorch eager reference done", flush=True)
    for entry in models.values():
        for per_variant in entry.values():
            for res in per_variant.values():
                if res.get("status") == "ok":
                    res["headline"] = {p["name"]: headline(res, p) for p in profiles}
    peaks: dict[str, Any] = {}
    if cfg.peak:
        threads = sorted({int(p["threads"]) for p in profiles
                          if "CPUExecutionProvider" in (p.get("providers") or ["CPUExecutionProvider"])})
        with tempfile.TemporaryDirectory(prefix="kdpipe-gemm-") as scratch:
            for runtime in runtimes:
                peaks[runtime] = measure_peaks(runtime, threads, Path(scratch), bf16=any(
                    v == "bf16" for v, _, _ in plans[runtime]), max_seconds=cfg.max_seconds)
                print(f"benchmark: {runtime} GEMM peak done", flush=True)
    report = {"environment": environment(), "settings": {"warmup": cfg.warmup, "iterations": cfg.iterations,
                                                         "max_seconds": cfg.max_seconds, "rounds": cfg.rounds,
                                                         "ci_level": edge_timing.CI_LEVEL, "profiles": profiles,
                                                         "runtimes": runtimes, "runtimes_skipped": skipped,
                                                         "intra_op_spinning": False},
              "models": models, "peak": peaks, "provenance": stage_provenance(params, ("benchmark",), root)}
    atomic_write_json(report_file(root, "benchmark"), report)
    return report


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "torch-measure":
        try:
            print(json.dumps(torch_measure(json.loads(argv[1]))))
        except Exception as err:  # reported to the parent as one line
            print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
            return 2
        return 0
    print("usage: python -m pipeline.deploy.benchmark torch-measure SPEC_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
