"""Overhead of the Prefect flow over a plain `dvc repro` of the same stages, and the no-change flow time.

    python benchmarks/flow_overhead.py                      # every stage of dvc.yaml, 1-epoch recipe
    python benchmarks/flow_overhead.py --epochs 0           # the repository's params unchanged (slow)

Two clones of this repository's HEAD get the same params (by default the repository's
params with every training run cut to one epoch and a short benchmark, so that all the
stages run but the stages' own work stays small and the overhead shows). One runs
`dvc repro`, the other `kdpipe run --no-record` (a temporary Prefect server started and
stopped inside the timing). Then both run again with nothing changed.

Targets (issue 6): flow - dvc repro < 20 s; the no-change flow < 30 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from repro_time import timed  # same folder: the script's directory is on sys.path

REPO = Path(__file__).resolve().parent.parent


def clone(dest: Path, epochs: int) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    if epochs > 0:
        p = yaml.safe_load((dest / "params.yaml").read_text())
        p["train"]["epochs"] = epochs
        p["teacher"]["train"]["epochs"] = epochs
        p["distill"]["ab"]["init_epochs"] = epochs
        p["benchmark"]["iterations"] = 10
        p["benchmark"]["warmup"] = 2
        (dest / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        subprocess.run(["git", "commit", "-qam", "short recipe"], cwd=dest, check=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of every run (0: keep params.yaml)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-flow-"))
    plain, flow = clone(tmp / "plain", args.epochs), clone(tmp / "flow", args.epochs)
    env_cmd = [sys.executable, "-m", "pipeline.cli", "run", "--no-record"]

    t_plain, out = timed(["dvc", "repro"], plain)
    n = sum(1 for line in out.splitlines() if line.startswith("Running stage"))
    t_flow, out_flow = timed(env_cmd, flow)
    n_flow = out_flow.count('": "ran"')
    t_plain2, _ = timed(["dvc", "repro"], plain)
    t_flow2, out2 = timed(env_cmd, flow)
    assert '": "ran"' not in out2, "the second flow run re-ran stages"

    over = t_flow - t_plain
    print(f"stages               : {n} by dvc repro, {n_flow} by the flow")
    print(f"dvc repro            : {t_plain:7.1f} s")
    print(f"kdpipe run (flow)    : {t_flow:7.1f} s   overhead {over:+.1f} s ({t_flow / t_plain:.3f}x)   "
          f"target < 20 s: {'PASS' if over < 20 else 'FAIL'}")
    print(f"no change, dvc repro : {t_plain2:7.1f} s")
    print(f"no change, flow      : {t_flow2:7.1f} s   target < 30 s: {'PASS' if t_flow2 < 30 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
