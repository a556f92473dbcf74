"""The concurrent flow against plain `dvc repro`, from fresh clones of one commit, in one run.

    python benchmarks/parallel_repro.py              # clones HEAD twice into a temp folder
    python benchmarks/parallel_repro.py --jobs 2 --gpus 8 --keep

Prints (issue 12 targets):
1. wall time of `dvc repro` and of `kdpipe run --jobs N` (target on this 2-core machine:
   jobs 2 <= 0.70x), and whether both clones end with the same dvc.lock hashes (the
   timed stages, benchmark and report, aside);
2. a model of the same run on a machine with G GPUs: the stage durations measured in
   the concurrent run (each stage had its own core, as it would have its own GPU), the
   DAG from dvc.yaml, the flow's own scheduling rule (:mod:`pipeline.orchestrate.schedule`):
   predicted wall time with --jobs G vs one stage at a time;
3. a no-change `kdpipe run --jobs N` on the finished pipeline (target < 30 s).

Both runs use the current Python environment (kdpipe installed); each clone runs its own code.
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

#: Stages whose outs are timings: they differ between any two runs.
TIMED = {"benchmark", "report"}


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return dt, proc.stdout


def flow_result(out: str) -> dict:
    """The JSON that ``kdpipe run`` prints last (its first line is a bare ``{``)."""
    return json.loads(out[out.rindex("\n{\n") + 1:] if not out.startswith("{\n") else out)


def lock_entries(ws: Path) -> dict:
    return yaml.safe_load((ws / "dvc.lock").read_text())["stages"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="2", help="kdpipe run --jobs (default 2)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the modelled machine (default 8)")
    ap.add_argument("--keep", action="store_true", help="keep the clones and print their paths")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from pipeline.orchestrate.dag import stage_graph
    from pipeline.orchestrate.schedule import simulate

    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-parallel-"))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    serial, flow = tmp / "serial", tmp / "flow"
    for ws in (serial, flow):
        subprocess.run(["git", "clone", "-q", str(REPO), str(ws)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=serial, capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {os.cpu_count()} cores; clones in {tmp}", flush=True)

    t_serial, _ = timed(["dvc", "repro"], serial, env)
    print(f"dvc repro              : {t_serial:7.1f} s", flush=True)
    t_flow, out = timed(["kdpipe", "run", "--jobs", args.jobs, "--no-record"], flow, env)
    result = flow_result(out)
    ratio = t_flow / t_serial
    print(f"kdpipe run --jobs {result['jobs']:<4} : {t_flow:7.1f} s  = {ratio:.2f}x dvc repro   "
          f"target <= 0.70x: {'PASS' if ratio <= 0.70 else 'FAIL'}", flush=True)

    a, b = lock_entries(serial), lock_entries(flow)
    differ = sorted(s for s in set(a) | set(b) if s not in TIMED and a.get(s) != b.get(s))
    print(f"dvc.lock: {len(a)} stages; equal hashes outside {sorted(TIMED)}: "
          f"{'PASS' if not differ else 'FAIL ' + ', '.join(differ)}")

    graph = stage_graph(flow)
    seconds = result["seconds"]
    one = simulate(graph, set(graph.order), seconds, 1)
    many = simulate(graph, set(graph.order), seconds, args.gpus)
    print(f"model, {args.gpus} GPUs (stage durations of this run, the flow's schedule): "
          f"{many:.0f} s with --jobs {args.gpus} vs {one:.0f} s one at a time = {many / one:.2f}x")
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    print("  longest stages: " + ", ".join(f"{s} {t:.0f} s" for s, t in slowest))

    t_again, out = timed(["kdpipe", "run", "--jobs", args.jobs, "--no-record"], flow, env)
    again = flow_result(out)
    print(f"no-change kdpipe run --jobs {args.jobs}: {t_again:5.1f} s, {len(again['ran'])} stages ran   "
          f"target < 30 s: {'PASS' if t_again < 30 and not again['ran'] else 'FAIL'}")

    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "dvc_repro_s": t_serial, "flow_s": t_flow, "ratio": ratio,
                                         "jobs": result["jobs"], "lock_differs": differ, "stage_seconds": seconds,
                                         "model": {"gpus": args.gpus, "parallel_s": many, "serial_s": one},
                                         "no_change_s": t_again}, indent=1))
    if args.keep:
        print(f"clones kept: {serial} {flow}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
