"""A comparison run one experiment at a time against the same comparison on a Dask LocalCluster, in one run.

    python benchmarks/sweep_scaling.py                       # kd,dkd x the first student x seeds 0 1
    python benchmarks/sweep_scaling.py --methods kd,dkd,crd --workers 8 --keep

Each side runs in its own fresh clone of HEAD (its own DVC cache: nothing is shared between
the two), with the repository's params.yaml. Prints (issue 13 targets):

1. wall time of ``kdpipe compare ... --jobs 1`` and of ``kdpipe compare ... --dask local:2``
   (target on this 2-core machine: dask <= 0.70x);
2. a model of 270 runs (15 methods x 6 teacher/student pairs x 3 seeds) on W workers: the
   experiment durations measured here (those that trained the teacher, and those that
   restored it from DVC's run-cache), the sweep's own rule (an experiment waits for the
   first one that trains its teacher), played on W slots against one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def compare(ws: Path, env: dict[str, str], methods: str, student: str, how: list[str]) -> tuple[float, dict]:
    cmd = ["kdpipe", "compare", "--methods", methods, "--students", student, "--seeds", "0", "1", "--name", "bench",
           *how]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    (ws / "compare.log").write_text(proc.stdout + proc.stderr)  # kept with --keep: where the time went
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return dt, json.loads((ws / "reports" / "sweeps" / "bench.json").read_text())


def model(leader_s: float, follower_s: float, workers: int, methods: int = 15, pairs: int = 6, seeds: int = 3) -> float:
    """Wall time of methods x pairs x seeds experiments on ``workers`` slots, as the sweep schedules them."""
    from pipeline.orchestrate.dag import StageGraph
    from pipeline.orchestrate.schedule import simulate

    order, upstream, seconds = [], {}, {}
    for p in range(pairs):
        for s in range(seeds):
            for m in range(methods):
                name = f"m{m}-p{p}-s{s}"
                order.append(name)
                upstream[name] = [] if m == 0 else [f"m0-p{p}-s{s}"]  # the first of a teacher trains it
                seconds[name] = leader_s if m == 0 else follower_s
    graph = StageGraph(order, upstream, frozenset())
    return simulate(graph, set(order), seconds, workers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="kd,dkd")
    ap.add_argument("--student", help="default: the first student of params.yaml")
    ap.add_argument("--workers", type=int, default=8, help="workers of the modelled cluster (default 8)")
    ap.add_argument("--keep", action="store_true", help="keep the clones and print their paths")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-sweep-bench-"))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    serial, dask = tmp / "jobs1", tmp / "dask"
    for ws in (serial, dask):
        subprocess.run(["git", "clone", "-q", str(REPO), str(ws)], check=True)
    student = args.student or next(iter(yaml.safe_load((serial / "params.yaml").read_text())["students"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=serial, capture_output=True,
                            text=True).stdout.strip()
    n = len(args.methods.split(",")) * 2
    print(f"commit {commit}, {os.cpu_count()} cores; {args.methods} x {student} x seeds 0 1 = {n} experiments; "
          f"clones in {tmp}", flush=True)

    t1, r1 = compare(serial, env, args.methods, student, ["--jobs", "1"])
    print(f"kdpipe compare --jobs 1        : {t1:7.1f} s", flush=True)
    t2, r2 = compare(dask, env, args.methods, student, ["--dask", "local:2"])
    ratio = t2 / t1
    print(f"kdpipe compare --dask local:2  : {t2:7.1f} s  = {ratio:.2f}x --jobs 1   "
          f"target <= 0.70x: {'PASS' if ratio <= 0.70 else 'FAIL'}", flush=True)

    # experiments with the first method train their seed's teacher (the sweep orders them first); the rest restore it
    first = args.methods.split(",")[0]
    runs = [e for e in r1["experiments"] if e["seconds"]]
    lead = [e["seconds"] for e in runs if e["name"].startswith(f"bench-{first}-")]
    follow = [e["seconds"] for e in runs if not e["name"].startswith(f"bench-{first}-")] or lead
    leader_s, follower_s = sum(lead) / len(lead), sum(follow) / len(follow)
    one, many = model(leader_s, follower_s, 1), model(leader_s, follower_s, args.workers)
    print(f"model, 270 runs (15 methods x 6 pairs x 3 seeds; {leader_s:.0f} s with a teacher to train, "
          f"{follower_s:.0f} s without): {many / 3600:.2f} h on {args.workers} workers vs {one / 3600:.2f} h "
          f"one at a time = {many / one:.3f}x")
    for row in r2["compare"]:
        print(f"  {row['method']:8s} {row['student']:12s} top-1 {row['top1_mean']:6.2f} ± {row['top1_std']:.2f}  "
              f"gain {row['gain_mean']:+.2f} ± {row['gain_std']:.2f}  ({row['seeds']} seeds)")

    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "jobs1_s": t1, "dask_s": t2, "ratio": ratio,
                                         "leader_s": leader_s, "follower_s": follower_s,
                                         "model": {"workers": args.workers, "parallel_s": many, "serial_s": one}},
                                        indent=1))
    if args.keep:
        print(f"clones kept: {serial} {dask}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
