"""Latency table of this bundle's models: ``python bench.py``.

For each runtime, model variant and device profile (threads, batch sizes, execution
providers; the defaults come from ``bundle.json``, i.e. the pipeline's params), prints
p50/p90/p99 latency with the p50's 95 % interval and throughput per batch size, the file
size and the peak memory of the process. Measured as the pipeline's benchmark measures
(``edge_measure.py``): each model in a process of its own for its cold start and peak
memory, then all models of a runtime timed together in ``--rounds`` interleaved rounds
(round-robin, so a drift of the device hits all alike; each percentile is the median
over rounds). Warm-up runs are excluded and onnxruntime's intra-op spinning is off.
Needs numpy and onnxruntime only (or OpenVINO instead of, or beside, it).

``--runtime onnxruntime openvino`` measures with both; OpenVINO also runs the fp32 file
in bf16 (its own variant) on CPUs that offer it. ``--json results.json`` writes the
figures as a device-results document (format ``kdpipe-device-results/1``: the bundle,
this device, the settings and per runtime and variant the full measurement with the
model file's sha256), which ``kdpipe device-results import results.json --device NAME``
files in the pipeline's workspace, where the report uses it as a device profile: the
device's figure is its first measured profile, so measure with the profile that
matches how the device runs the model (e.g. ``--threads 4 --batch-sizes 1 8``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_measure import DEFAULT_ROUNDS, measure_files
from edge_runtime import (
    RUNTIMES,
    EdgeError,
    check_model_file,
    file_sha256,
    installed_runtimes,
    resolve_inside,
    runtime_version,
)

HERE = Path(__file__).resolve().parent
#: What ``--json`` writes; ``kdpipe device-results import`` reads this format.
RESULTS_FORMAT = "kdpipe-device-results/1"
#: OpenVINO's extra variant: the fp32 file compiled with the bf16 inference precision.
BF16 = "bf16"


def read_manifest() -> dict:
    """The bundle manifest ``bundle.json`` beside this script."""
    try:
        return json.loads((HERE / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EdgeError(f"cannot read the bundle manifest {HERE / 'bundle.json'}: {err}") from None


def _openvino_module():  # noqa: ANN202 - the bundle's edge_openvino, or None
    """``edge_openvino`` beside this script, or None when the bundle has no copy of it."""
    try:
        import edge_openvino
    except ImportError:
        return None
    return edge_openvino


def runtime_versions() -> dict:
    """Every runtime of ``RUNTIMES`` and its installed version (None when it is not installed here)."""
    installed = installed_runtimes()
    versions: dict = {}
    for name in RUNTIMES:
        try:
            versions[name] = runtime_version(name) if name in installed else None
        except Exception:  # a broken installation, or no edge_openvino.py: the measurement says what is wrong
            versions[name] = None
    return versions


def cpu_name() -> str:
    """The CPU's model name: ``/proc/cpuinfo`` (x86 ``model name``, ARM boards' ``Model``/``Hardware``), else the OS's."""
    keys = ("model name", "hardware", "model", "cpu model", "processor")
    found: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            if sep and key in keys and key not in found and value and not value.isdigit():
                found[key] = value
    except OSError:
        pass
    for key in keys:
        if key in found:
            return found[key]
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def device_info() -> dict:
    """What the results were measured on: CPU, cores, OS, machine, Python and the runtimes' versions."""
    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "os": platform.platform(),
            "machine": platform.machine(), "python": platform.python_version(), "runtimes": runtime_versions()}


def choose_runtimes(wanted: list[str] | None) -> list[str]:
    """The runtimes to measure with: ``wanted`` (each must be installed), else onnxruntime, else openvino."""
    installed = installed_runtimes()
    if not wanted:
        if not installed:
            raise EdgeError("neither onnxruntime nor openvino is installed here; install one with: "
                            "pip install onnxruntime")
        return installed[:1]
    runtimes = list(dict.fromkeys(wanted))
    missing = [r for r in runtimes if r not in installed]
    if missing:
        raise EdgeError(f"runtime {missing[0]} is not installed here; install it with: pip install {missing[0]}")
    if "openvino" in runtimes and _openvino_module() is None:
        raise EdgeError(f"edge_openvino.py is missing from this bundle ({HERE}); re-copy the bundle")
    return runtimes


def pick_targets(manifest: dict, args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(variant label, model file, sha256) of each model to measure, every file checked before any is timed.

    Files the manifest lists must match its sha256 (unless ``--no-verify``), so the
    hashes the results record are those of the files measured. A ``--model`` file the
    manifest does not list is measured as it is, labelled by its file name. The label
    ``bf16`` (asked for by ``--variants bf16``) is the fp32 file, which OpenVINO runs in bf16.
    """
    models = manifest.get("models", {})
    verify = not args.no_verify
    if args.model:
        by_file = {m["file"]: v for v, m in models.items()}
        targets = []
        for m in args.model:
            path = resolve_inside(m, HERE)
            variant = by_file.get(path.name) if path.parent == HERE else None
            check_model_file(path, models[variant]["sha256"] if variant and verify else None)
            targets.append((variant or path.name, path, file_sha256(path)))
        return targets
    bench = manifest.get("benchmark", {})
    names = list(dict.fromkeys(args.variants or list(bench.get("variants") or models)))
    unknown = sorted(set(names) - set(models) - {BF16})
    if unknown:
        raise EdgeError(f"unknown variant(s) {unknown}; bundle.json has {sorted(models)}"
                        + (" (and bf16 with OpenVINO)" if "fp32" in models else ""))
    if BF16 in names and "fp32" not in models:
        raise EdgeError("the bf16 variant runs the fp32 file in bf16, and this bundle has no fp32 model")
    out = []
    for n in names:
        entry = models["fp32" if n == BF16 else n]
        path = check_model_file(resolve_inside(entry["file"], HERE), entry.get("sha256") if verify else None)
        out.append((n, path, file_sha256(path)))
    return out


def plan(targets: list[tuple[str, Path, str]], runtimes: list[str],
         variants_given: bool) -> list[tuple[str, str, Path, str, str]]:
    """(runtime, variant label, file, sha256, inference precision) of every measurement, in order.

    The ``bf16`` label is OpenVINO's only. Without ``--variants`` OpenVINO adds it (the
    fp32 file in bf16) where this CPU offers bf16, as the pipeline's benchmark does.
    """
    labels = [t[0] for t in targets]
    if BF16 in labels and "openvino" not in runtimes:
        raise EdgeError("bf16 is OpenVINO's variant (the fp32 file run in bf16): add --runtime openvino")
    steps = []
    for runtime in runtimes:
        wanted = list(targets)
        if runtime == "openvino":
            try:
                offers = bool(_openvino_module().offers_bf16())
            except Exception:  # a broken OpenVINO: its measurement below says what is wrong
                offers = False
            if BF16 in labels and not offers:
                raise EdgeError("this CPU's OpenVINO plugin does not offer bf16 (needs AVX512-BF16 or AMX)")
            fp32 = [t for t in targets if t[0] == "fp32"]
            if offers and fp32 and not variants_given and BF16 not in labels:
                wanted.append((BF16, fp32[0][1], fp32[0][2]))
        steps += [(runtime, label, path, sha, "bf16" if label == BF16 else "f32")
                  for label, path, sha in wanted if runtime == "openvino" or label != BF16]
    return steps


def table(rows: list[dict]) -> str:
    """The latency rows as an aligned text table."""
    cols = ["runtime", "model", "profile", "threads", "batch", "p50_ms", "p50_95%_interval", "p90_ms", "p99_ms",
            "throughput_ips", "file_kb", "peak_rss_mb"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i > 2 else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731,B905 (Python 3.9 devices)
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def table_rows(runtime: str, label: str, res: dict) -> list[dict]:
    """The table rows of one measurement: one per profile and batch size (one for a skipped profile)."""
    rows = []
    for pname, prof in res["profiles"].items():
        if prof.get("status") != "ok":
            rows.append({"runtime": runtime, "model": label, "profile": pname,
                         "threads": f"skipped: {prof.get('reason')}"})
            continue
        for b, st in prof["batches"].items():
            rows.append({"runtime": runtime, "model": label, "profile": pname, "threads": prof["threads"] or "all",
                         "batch": b, "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"], "p99_ms": st["p99_ms"],
                         "p50_95%_interval": "{}-{}".format(*st["p50_ci_ms"]) if st.get("p50_ci_ms") else "",
                         "throughput_ips": st["throughput_ips"], "file_kb": round(res["file_bytes"] / 1024, 1),
                         "peak_rss_mb": res.get("peak_rss_mb")})
    return rows


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON to ``path`` through a temp file beside it and a rename: never half a file."""
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status (0 ok, 2 unusable input)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", help="variants to measure (default: the benchmark variants in "
                                                  "bundle.json; bf16 with OpenVINO: the fp32 file in bf16)")
    ap.add_argument("--model", action="append", help="an ONNX file inside this bundle (repeatable)")
    ap.add_argument("--runtime", nargs="+", action="extend", choices=RUNTIMES,
                    help="runtime(s) to measure with, repeatable (default: onnxruntime, or openvino without it)")
    ap.add_argument("--profiles", nargs="*", help="profile names from bundle.json (default: all)")
    ap.add_argument("--threads", type=int, nargs="*", help="ad-hoc profiles with these thread counts instead")
    ap.add_argument("--batch-sizes", type=int, nargs="*", help="batch sizes of the ad-hoc profiles (default 1 8)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds (default: bundle.json's, else "
                                               f"{DEFAULT_ROUNDS}; at least 6 for a 95 %% interval)")
    ap.add_argument("--no-verify", action="store_true", help="skip the sha256 check against bundle.json")
    ap.add_argument("--json", help="also write the results as a device-results document to this file "
                                   "(for: kdpipe device-results import FILE --device NAME)")
    args = ap.parse_args(argv)
    try:
        manifest = read_manifest()
        bench = manifest.get("benchmark", {})
        profiles = list(bench.get("profiles") or [{"name": "cpu", "threads": 0, "batch_sizes": [1, 8]}])
        if args.profiles:
            unknown = sorted(set(args.profiles) - {p["name"] for p in profiles})
            if unknown:
                raise EdgeError(f"unknown profile(s) {unknown}; bundle.json has {[p['name'] for p in profiles]}")
            profiles = [p for p in profiles if p["name"] in args.profiles]
        if args.threads:
            sizes = args.batch_sizes or [1, 8]
            profiles = [{"name": f"{t}-threads", "threads": t, "batch_sizes": sizes} for t in args.threads]
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise EdgeError(f"cannot write {args.json}: folder {Path(args.json).resolve().parent} does not exist")
        runtimes = choose_runtimes(args.runtime)
        steps = plan(pick_targets(manifest, args), runtimes, bool(args.variants))
        warmup = args.warmup if args.warmup is not None else int(bench.get("warmup", 10))
        iterations = args.iterations if args.iterations is not None else int(bench.get("iterations", 200))
        max_seconds = args.max_seconds if args.max_seconds is not None else float(bench.get("max_seconds", 2.0))
        rounds = args.rounds if args.rounds is not None else int(bench.get("rounds", DEFAULT_ROUNDS))
        if rounds < 1:
            raise EdgeError(f"--rounds must be at least 1, got {rounds}")
        graphs = {m["file"]: m.get("graph_sha256") for m in manifest.get("models", {}).values()}
        rows: list[dict] = []
        results: dict = {r: {} for r in runtimes}
        for runtime in runtimes:
            mine = [s for s in steps if s[0] == runtime]
            measured = measure_files([(str(s[2]), s[4]) for s in mine], profiles, warmup, iterations, max_seconds,
                                     rounds, runtime, progress=lambda line: print(line, file=sys.stderr, flush=True))
            for (_, label, path, sha, _), res in zip(mine, measured):  # noqa: B905 (Python 3.9 devices)
                results[runtime][label] = {"status": "ok", **res, "file": path.name, "sha256": sha}
                if graphs.get(path.name):
                    results[runtime][label]["graph_sha256"] = graphs[path.name]
                rows += table_rows(runtime, label, res)
        print(table(rows))
        if args.json:
            now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (datetime.UTC is 3.11+; devices run 3.9)
            doc = {"format": RESULTS_FORMAT, "bundle": manifest.get("name"), "run": manifest.get("run"),
                   "source_sha256": manifest.get("source_sha256"), "device": device_info(),
                   "measured_at": now.isoformat(timespec="seconds"),
                   "settings": {"warmup": warmup, "iterations": iterations, "max_seconds": max_seconds,
                                "rounds": rounds, "profiles": profiles},
                   "results": results}
            try:
                write_json_atomic(Path(args.json), doc)
            except OSError as err:
                raise EdgeError(f"cannot write {args.json}: {err}") from None
        return 0
    except EdgeError as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
