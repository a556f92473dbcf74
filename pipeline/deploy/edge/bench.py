"""Latency table of this bundle's models: ``python bench.py``.

For each model variant and device profile (threads, batch sizes, execution providers;
the defaults come from ``bundle.json``, i.e. the pipeline's params), prints p50/p90/p99
latency and throughput per batch size, the file size and the peak memory of the
process. Each model runs in its own process (``edge_runtime.py measure``) so its peak
memory is its own; warm-up runs are excluded and onnxruntime's intra-op spinning is
off. Needs numpy and onnxruntime only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edge_runtime import EdgeError, check_model_file, resolve_inside

HERE = Path(__file__).resolve().parent


def read_manifest() -> dict:
    """The bundle manifest ``bundle.json`` beside this script."""
    try:
        return json.loads((HERE / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EdgeError(f"cannot read the bundle manifest {HERE / 'bundle.json'}: {err}") from None


def measure_in_subprocess(model: Path, profiles: list[dict], warmup: int, iterations: int, max_seconds: float,
                          timeout: float | None = None) -> dict:
    """Run ``edge_runtime.py measure`` on one model in a fresh interpreter; its JSON result (or an EdgeError)."""
    spec = {"model": str(model), "profiles": profiles, "warmup": warmup, "iterations": iterations,
            "max_seconds": max_seconds}
    proc = subprocess.run([sys.executable, str(HERE / "edge_runtime.py"), "measure", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgeError(f"measuring {model.name} failed (exit {proc.returncode}): {tail[0]}") from None
    if "error" in result:
        raise EdgeError(result["error"])
    return result


def table(rows: list[dict]) -> str:
    """The latency rows as an aligned text table."""
    cols = ["model", "profile", "threads", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput_ips", "file_kb",
            "peak_rss_mb"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731,B905 (Python 3.9 devices)
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status (0 ok, 2 unusable input)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", help="variants to measure (default: the benchmark variants in bundle.json)")
    ap.add_argument("--model", action="append", help="an ONNX file inside this bundle (repeatable)")
    ap.add_argument("--profiles", nargs="*", help="profile names from bundle.json (default: all)")
    ap.add_argument("--threads", type=int, nargs="*", help="ad-hoc profiles with these thread counts instead")
    ap.add_argument("--batch-sizes", type=int, nargs="*", help="batch sizes of the ad-hoc profiles (default 1 8)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--json", help="also write the full results to this JSON file")
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
        models = manifest.get("models", {})
        if args.model:
            targets = [(Path(m).name, check_model_file(resolve_inside(m, HERE))) for m in args.model]
        else:
            names = args.variants or list(bench.get("variants") or models)
            unknown = sorted(set(names) - set(models))
            if unknown:
                raise EdgeError(f"unknown variant(s) {unknown}; bundle.json has {sorted(models)}")
            targets = [(n, check_model_file(resolve_inside(models[n]["file"], HERE))) for n in names]
        warmup = args.warmup if args.warmup is not None else int(bench.get("warmup", 10))
        iterations = args.iterations if args.iterations is not None else int(bench.get("iterations", 200))
        max_seconds = args.max_seconds if args.max_seconds is not None else float(bench.get("max_seconds", 2.0))
        rows, full = [], {}
        for label, path in targets:
            res = measure_in_subprocess(path, profiles, warmup, iterations, max_seconds)
            full[label] = res
            for pname, prof in res["profiles"].items():
                if prof.get("status") != "ok":
                    rows.append({"model": label, "profile": pname, "threads": f"skipped: {prof.get('reason')}"})
                    continue
                for b, st in prof["batches"].items():
                    rows.append({"model": label, "profile": pname, "threads": prof["threads"] or "all", "batch": b,
                                 "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"], "p99_ms": st["p99_ms"],
                                 "throughput_ips": st["throughput_ips"], "file_kb": round(res["file_bytes"] / 1024, 1),
                                 "peak_rss_mb": res.get("peak_rss_mb")})
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        return 0
    except EdgeError as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
