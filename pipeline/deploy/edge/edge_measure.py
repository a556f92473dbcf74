"""How a bundle's models are measured: cold start and memory per file, latency in interleaved rounds.

Copied into every bundle (numpy and a runtime only, Python 3.9+); the pipeline's
benchmark stage and the bundle's ``bench.py`` both call :func:`measure_files`, so the
code timed on a device is the code timed in the pipeline. For the files of one runtime:

1. each file in a fresh process of its own (worker mode ``cold``): the runtime's import,
   per profile the session creation and the first run, a few runs at every batch size,
   and the process's peak resident memory, which is therefore that file's alone;
2. all files together in one more process (worker mode ``time``): per profile every
   file's session is opened, and the files are timed round-robin in
   ``rounds`` rounds (:func:`edge_timing.interleaved_rounds`), so a drift of the machine
   hits all of them alike; each percentile is the median over rounds with its 95 %
   interval (:func:`edge_timing.round_stats`).

``python edge_measure.py cold|time|peak SPEC_JSON`` prints one JSON line: the result or
``{"error": ...}``. ``peak`` times GEMM models and prints the multiply-accumulates per
second they reach (the machine's practical peak through that runtime).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__:  # imported from the pipeline (pipeline.deploy.edge)
    from pipeline.deploy.edge import edge_runtime, edge_timing
else:  # run as a script, in a bundle on a device or by the pipeline's benchmark: the files beside this one
    import edge_runtime  # type: ignore[no-redef]
    import edge_timing  # type: ignore[no-redef]

EdgeError = edge_runtime.EdgeError

#: Interleaved timing rounds when a caller names none (the pipeline's ``benchmark.rounds``).
DEFAULT_ROUNDS = 15


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where the platform cannot tell).

    Linux: the address space's high-water mark (``VmHWM``), which starts afresh at exec;
    ``ru_maxrss`` does not, so a worker started from a large process (a test runner, a
    stage that imported torch) would report its parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 2)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 2)


def time_runs(fn: Callable[[], Any], warmup: int, iterations: int, max_seconds: float) -> np.ndarray:
    """Run ``fn`` ``warmup`` times untimed, then time it: milliseconds of each timed run (the GEMM peak's timing).

    Timing stops after ``iterations`` runs or ``max_seconds``, whichever comes first,
    but never before :data:`edge_timing.MIN_RUNS_PER_ROUND` runs.
    """
    for _ in range(max(0, warmup)):
        fn()
    times: list = []
    start = time.perf_counter()
    while len(times) < iterations:
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
        if len(times) >= edge_timing.MIN_RUNS_PER_ROUND and time.perf_counter() - start > max_seconds:
            break
    return np.asarray(times, dtype=np.float64) / 1e6


#: Latency keys a headline copies from the first batch size's figures.
_HEADLINE_KEYS = ("p50_ms", "p90_ms", "p99_ms", "p50_ci_ms", "p90_ci_ms", "p99_ci_ms", "ci_level", "rounds",
                  "round_p50_ms", "round_p90_ms", "round_p99_ms")


def headline(result: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any] | None:
    """The figures the report uses for one profile of a measurement: latency (p50/p90/p99, their intervals
    where measured) at its first batch size, throughput at its largest (None when the profile was not measured)."""
    prof = result.get("profiles", {}).get(profile["name"])
    if not prof or prof.get("status") != "ok":
        return None
    sizes = [int(b) for b in prof["batches"]]
    first, largest = prof["batches"][str(min(sizes))], prof["batches"][str(max(sizes))]
    return {"batch": first["batch"], **{k: first[k] for k in _HEADLINE_KEYS if k in first},
            "throughput_batch": largest["batch"], "throughput_ips": largest["throughput_ips"]}


def _import_ms(runtime: str) -> float:
    """Milliseconds to import ``runtime`` (and create its core object): the first part of a cold start.

    Near zero when the runtime was imported already in this process: the workers are fresh processes.
    """
    t0 = time.perf_counter()
    edge_runtime.check_runtime(runtime)
    if runtime == "openvino":
        edge_runtime.openvino_module().import_openvino().Core()
    return round((time.perf_counter() - t0) * 1e3, 3)


def _profile_skip(runtime: str, providers: list) -> str | None:
    """Why a profile cannot run with ``runtime`` here (None when it can)."""
    if runtime == "openvino":
        other = [p for p in providers if p != "CPUExecutionProvider"]
        return f"OpenVINO runs on the CPU here, not on {other}" if other else None
    missing = [p for p in providers if p not in edge_runtime.import_onnxruntime().get_available_providers()]
    return f"execution provider(s) {missing} not available" if missing else None


def _providers(prof: dict[str, Any]) -> list:
    return list(prof.get("providers") or ["CPUExecutionProvider"])


def _open(path: Path, prof: dict[str, Any], runtime: str, precision: str) -> Any:
    """A session for ``path`` as profile ``prof`` asks (threads, providers, graph optimisation)."""
    return edge_runtime.open_session(path, int(prof.get("threads", 0)), _providers(prof),
                                     str(prof.get("graph_optimization", "all")), runtime=runtime, precision=precision)


def _feeds(sess: Any, batch_sizes: list, rng: np.random.Generator) -> list:
    """(batch size, input feed) of seeded random data per batch size, in the session's input type."""
    name, chw, dtype = edge_runtime.input_facts(sess)
    return [(int(b), {name: rng.standard_normal((int(b), *chw)).astype(dtype)}) for b in batch_sizes]


def _run(sess: Any, feed: dict, path: Path, batch: int) -> None:
    try:
        sess.run(None, feed)
    except Exception as err:  # the runtimes' own exception types
        raise EdgeError(f"{path.name}: inference failed at batch {batch}: {edge_runtime.first_line(err)}") from None


def cold_start(model: str | Path, profiles: list, warmup: int = 10, seed: int = 0, runtime: str = "onnxruntime",
               precision: str = "f32") -> dict[str, Any]:
    """The per-file part of a measurement, meant for a fresh process: cold start and peak memory, no latency.

    Per profile: session creation and the first run at the first batch size (the
    runtime's import is paid once, by the first profile), then ``warmup`` runs at every
    batch size, so the peak resident memory holds every buffer the timed runs need. A
    profile the runtime cannot serve here (a missing execution provider; a GPU provider
    for OpenVINO) is recorded as skipped, with the reason.
    """
    path = edge_runtime.check_model_file(Path(model))
    import_ms = _import_ms(runtime)
    baseline = peak_rss_mb()
    out: dict[str, Any] = {"model": path.name, "file_bytes": path.stat().st_size, "runtime": runtime,
                           "runtime_version": edge_runtime.runtime_version(runtime), "profiles": {}}
    if runtime == "openvino":
        out["precision"] = precision
    rng = np.random.default_rng(seed)
    for prof in profiles:
        name = str(prof["name"])
        skip = _profile_skip(runtime, _providers(prof))
        if skip:
            out["profiles"][name] = {"status": "skipped", "reason": skip}
            continue
        t0 = time.perf_counter()
        sess = _open(path, prof, runtime, precision)
        session_ms = (time.perf_counter() - t0) * 1e3
        feeds = _feeds(sess, list(prof.get("batch_sizes", [1])), rng)
        t0 = time.perf_counter()
        _run(sess, feeds[0][1], path, feeds[0][0])
        first_run_ms = (time.perf_counter() - t0) * 1e3
        for b, feed in feeds:
            for _ in range(max(1, int(warmup))):
                _run(sess, feed, path, b)
        out["profiles"][name] = {"status": "ok", "threads": int(prof.get("threads", 0)), "providers": _providers(prof),
                                 "graph_optimization": str(prof.get("graph_optimization", "all")),
                                 "cold_start": {"session_ms": round(session_ms, 3),
                                                "first_run_ms": round(first_run_ms, 3)}}
        del sess
    out["cold_start"] = {"import_ms": import_ms}
    out["baseline_rss_mb"] = baseline
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def time_models(models: list, profiles: list, warmup: int = 10, iterations: int = 200, max_seconds: float = 2.0,
                rounds: int = DEFAULT_ROUNDS, seed: int = 0, runtime: str = "onnxruntime") -> list:
    """Latency of several model files timed together: per model, ``{profile: {batch: figures}}``.

    ``models`` holds ``{"model": path, "precision": p}``. Per profile the sessions of all
    files are open at once and every (file, batch size) is timed in interleaved rounds;
    ``iterations`` and ``max_seconds`` are each file's budget per batch size, split
    across the rounds. Profiles the runtime cannot serve are left out (``cold_start``
    records why).
    """
    paths = [edge_runtime.check_model_file(Path(m["model"])) for m in models]
    out: list = [{} for _ in models]
    rng = np.random.default_rng(seed)
    for prof in profiles:
        if _profile_skip(runtime, _providers(prof)):
            continue
        slots: list = []
        where: list = []
        sessions = [_open(p, prof, runtime, str(m.get("precision", "f32"))) for p, m in zip(paths, models)]  # noqa: B905 (Python 3.9 devices)
        for i, sess in enumerate(sessions):
            for b, feed in _feeds(sess, list(prof.get("batch_sizes", [1])), rng):
                _run(sess, feed, paths[i], b)  # a failing file names itself before any timing
                slots.append(lambda sess=sess, feed=feed: sess.run(None, feed))
                where.append((i, b))
        per_slot = edge_timing.interleaved_rounds(slots, rounds, warmup, iterations, max_seconds)
        for (i, b), ms in zip(where, per_slot):  # noqa: B905
            out[i].setdefault(str(prof["name"]), {})[str(b)] = edge_timing.round_stats(ms, b)
        del sessions, slots
    return out


def merge(cold: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """One file's measurement: its :func:`cold_start` result with each measured profile's ``batches`` from
    :func:`time_models`."""
    out = {**cold, "profiles": {}}
    for name, prof in cold["profiles"].items():
        out["profiles"][name] = {**prof, "batches": timing[name]} if prof.get("status") == "ok" else prof
    return out


def measure_model(model: str | Path, profiles: list, warmup: int = 10, iterations: int = 200,
                  max_seconds: float = 2.0, seed: int = 0, runtime: str = "onnxruntime", precision: str = "f32",
                  rounds: int = DEFAULT_ROUNDS) -> dict[str, Any]:
    """Cold start, memory and latency of one model in this process (:func:`cold_start` then :func:`time_models`).

    For a per-file peak memory and cold start run it in a fresh process, or use :func:`measure_files`.
    """
    cold = cold_start(model, profiles, warmup, seed, runtime, precision)
    timing = time_models([{"model": str(model), "precision": precision}], profiles, warmup, iterations, max_seconds,
                         rounds, seed, runtime)[0]
    return merge(cold, timing)


def _worker_json(mode: str, spec: dict[str, Any], timeout: float | None, what: str) -> dict[str, Any]:
    """Run this file's worker ``mode`` on ``spec`` in a fresh interpreter; its JSON result, or an EdgeError."""
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgeError(f"measuring {what} took longer than {timeout:.0f} s") from None
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:] or ["no output"]
        raise EdgeError(f"measuring {what} failed (exit {proc.returncode}): {tail[0]}") from None
    if "error" in result:
        raise EdgeError(f"measuring {what} failed: {result['error']}")
    return result


def worker_timeout(profiles: list, files: int, warmup: int, max_seconds: float) -> float:
    """A generous wall-clock limit (s) for a worker measuring ``files`` files: a hung runtime must not hang the caller."""
    runs = sum(len(p.get("batch_sizes", [1])) for p in profiles)
    return 120.0 + files * runs * (3.0 * max_seconds + 0.05 * warmup + 10.0)


def measure_files(files: list, profiles: list, warmup: int = 10, iterations: int = 200, max_seconds: float = 2.0,
                  rounds: int = DEFAULT_ROUNDS, runtime: str = "onnxruntime",
                  progress: Callable[[str], None] | None = None) -> list:
    """Measure model files with ``runtime``: a fresh process per file (cold start, memory), then one that times
    them all in interleaved rounds; one result per ``(path, precision)`` of ``files``, in order."""
    colds = []
    for i, (path, precision) in enumerate(files, start=1):
        spec = {"model": str(path), "profiles": profiles, "warmup": warmup, "runtime": runtime,
                "precision": precision}
        colds.append(_worker_json("cold", spec, worker_timeout(profiles, 1, warmup, 0.0), f"{path} with {runtime}"))
        if progress:
            progress(f"[{i}/{len(files)}] {path} ({runtime}{'' if precision == 'f32' else ', ' + precision}): "
                     "cold start and memory")
    if not files:
        return []
    if progress:
        progress(f"{len(files)} file(s) ({runtime}): timing in {rounds} interleaved rounds")
    spec = {"models": [{"model": str(p), "precision": pr} for p, pr in files], "profiles": profiles,
            "warmup": warmup, "iterations": iterations, "max_seconds": max_seconds, "rounds": rounds,
            "runtime": runtime}
    timing = _worker_json("time", spec, worker_timeout(profiles, len(files), warmup, max_seconds),
                          f"{len(files)} file(s) with {runtime}")["results"]
    return [merge(c, t) for c, t in zip(colds, timing)]  # noqa: B905 (Python 3.9 devices)


def measure_peak(gemms: list, threads: list, runtime: str = "onnxruntime", warmup: int = 3, iterations: int = 20,
                 max_seconds: float = 2.0, precision: str = "f32") -> dict[str, Any]:
    """Multiply-accumulates per second of GEMM models through ``runtime``, per thread count.

    Each GEMM is ``{"precision": "fp32"|"int8", "model": path, "macs": int}``: a model
    whose inputs are fed seeded random data of their own shape and type. The best run's
    rate (the p50 is recorded as well) is the practical peak a model could reach on this
    machine with that runtime and thread count. ``precision`` is OpenVINO's inference
    precision, which a GEMM's own ``"hint"`` overrides (bf16: the peak of its bf16 variant).
    """
    edge_runtime.check_runtime(runtime)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"runtime": runtime, "runtime_version": edge_runtime.runtime_version(runtime), "peaks": {}}
    for gemm in gemms:
        path = edge_runtime.check_model_file(Path(gemm["model"]))
        per_threads: dict[str, Any] = {}
        for t in threads:
            if runtime == "openvino":
                sess = edge_runtime.openvino_module().OpenVinoSession(path, int(t), str(gemm.get("hint", precision)))
            else:
                sess = edge_runtime.import_onnxruntime().InferenceSession(
                    str(path), edge_runtime.session_options(int(t)), providers=["CPUExecutionProvider"])
            feed = {}
            for inp in sess.get_inputs():
                dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}[inp.type]
                shape = [int(d) for d in inp.shape]
                feed[inp.name] = (rng.standard_normal(shape) if dtype == np.float32
                                  else rng.integers(0, 100, shape)).astype(dtype)
            ms = time_runs(lambda feed=feed, sess=sess: sess.run(None, feed), warmup, iterations, max_seconds)
            macs = int(gemm["macs"])
            per_threads[str(int(t))] = {"threads": int(t), "runs": int(ms.size), "macs": macs,
                                        "best_ms": float(f"{ms.min():.5g}"), "p50_ms": float(f"{np.median(ms):.5g}"),
                                        "gmacs_per_s": float(f"{macs / float(ms.min()) / 1e6:.5g}"),
                                        "p50_gmacs_per_s": float(f"{macs / float(np.median(ms)) / 1e6:.5g}")}
            del sess
        out["peaks"][str(gemm["precision"])] = per_threads
    return out


def _worker(argv: list) -> int:
    """``cold|time|peak SPEC_JSON``: print the result (or ``{"error": ...}``) as one JSON line."""
    if len(argv) != 2 or argv[0] not in ("cold", "time", "peak"):
        print("usage: python edge_measure.py cold|time|peak SPEC_JSON", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[1])
        runtime, warmup = str(spec.get("runtime", "onnxruntime")), int(spec.get("warmup", 10))
        if argv[0] == "cold":
            result = cold_start(spec["model"], spec["profiles"], warmup, runtime=runtime,
                                precision=str(spec.get("precision", "f32")))
        else:
            common = {"warmup": warmup, "iterations": int(spec.get("iterations", 200)),
                      "max_seconds": float(spec.get("max_seconds", 2.0)), "runtime": runtime}
            if argv[0] == "time":
                result = {"results": time_models(spec["models"], spec["profiles"],
                                                 rounds=int(spec.get("rounds", DEFAULT_ROUNDS)), **common)}
            else:
                result = measure_peak(spec["gemms"], [int(t) for t in spec["threads"]],
                                      precision=str(spec.get("precision", "f32")), **common)
    except EdgeError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    except (KeyError, ValueError, TypeError) as err:
        print(json.dumps({"error": f"bad measurement spec: {err}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
