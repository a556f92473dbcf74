"""Wall time of `dvc repro` from a fresh clone, and of a second `dvc repro` with nothing changed.

    python benchmarks/repro_time.py            # clones this repository's HEAD into a temp folder

Targets (issue 2): the first run under 10 minutes on 2 cores, the second under 15 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dt, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the clone and print its path")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-clone-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(tmp / "repo")], check=True)
    ws = tmp / "repo"
    first, out = timed(["dvc", "repro"], ws)
    stages = sum(1 for line in out.splitlines() if line.startswith("Running stage"))
    second, out2 = timed(["dvc", "repro"], ws)
    rerun = sum(1 for line in out2.splitlines() if line.startswith("Running stage"))
    print(f"first dvc repro : {first:7.1f} s  ({stages} stages ran)   target < 600 s: {'PASS' if first < 600 else 'FAIL'}")
    print(f"second dvc repro: {second:7.1f} s  ({rerun} stages ran)   target < 15 s : {'PASS' if second < 15 and rerun == 0 else 'FAIL'}")
    if args.keep:
        print(f"clone kept at {ws}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
