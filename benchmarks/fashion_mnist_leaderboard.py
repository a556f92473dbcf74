"""Every method on Fashion-MNIST over several seeds, through the sweep machinery: the leaderboard of
docs/benchmarks.md.

    python benchmarks/fashion_mnist_leaderboard.py                    # 15 methods x tinynet_xs x seeds 0 1 2
    python benchmarks/fashion_mnist_leaderboard.py --methods kd,dml --seeds 0 --out /tmp/board.md

In a fresh clone of HEAD with ``recipes/fashion_mnist.yaml`` as its params.yaml (committed
there), it runs

1. ``kdpipe compare --methods ... --students <the recipe's student> --seeds ... --jobs N``:
   one DVC experiment per method x seed, each against the student alone and the teacher
   trained with the same seed (top-1, paired gain, each seed's exact McNemar test, gap
   recovered, wall time per experiment);
2. ``dvc repro`` of the clone (seed 0; DVC's run-cache restores the training runs the
   comparison made, then exports, quantizes and benchmarks every model): INT8 drop and
   latency per method, from ``reports/results.json``.

It prints the leaderboard as markdown (and writes it to ``--out``), with the machine, the
commit and the wall times. Needs Fashion-MNIST's four IDX files under ``--data-root``
(Debian: ``apt-get install dataset-fashion-mnist``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "fashion_mnist.yaml"
ALL = "kd,fitnets,at,ab,rkd,crd,dkd,reviewkd,sskd,rco,eskd,dml,one,okddip,ekd"
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` in ``cwd`` with its output in ``log``; its wall time, or exit with the log's tail."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def check_data(root: Path) -> None:
    """Exit with what to install when the IDX files are not there (plain or .gz)."""
    missing = [n for n in IDX if not (root / n).is_file() and not (root / f"{n}.gz").is_file()
               and not (root / "FashionMNIST" / "raw" / n).is_file()
               and not (root / "FashionMNIST" / "raw" / f"{n}.gz").is_file()]
    if missing:
        sys.exit(f"Fashion-MNIST's IDX files are not under {root} (missing {', '.join(missing)}): install them "
                 "with `apt-get install dataset-fashion-mnist` or pass --data-root")


def pm(mean: float | None, std: float | None, spec: str = ".2f") -> str:
    return "—" if mean is None else f"{mean:{spec}} ± {std:{spec.lstrip('+')}}"


def leaderboard(compare: list[dict[str, Any]], results: dict[str, Any], quantize: dict[str, Any],
                profile: str) -> list[str]:
    """The markdown table: one row per method, best mean top-1 first, then the student alone and the teacher."""
    lat = {(r["run"], r["precision"]): (r["latency"].get(profile) or {}).get("p50_ms") for r in results["rows"]}

    def deployed(run: str) -> str:  # seed 0's INT8 drop and latencies of one run's ONNX files
        drop = (quantize["models"].get(run) or {}).get("int8_top1_drop")
        fp32, int8 = lat.get((run, "fp32")), lat.get((run, "int8"))
        return (f"{'—' if drop is None else f'{drop:+.2f}'} | "
                f"{'—' if fp32 is None else f'{fp32:.3f}'} / {'—' if int8 is None else f'{int8:.3f}'}")

    out = ["| method | seeds | top-1 % | gain over alone (points) | seeds significantly better / worse | "
           "gap recovered | INT8 drop (points, seed 0) | " + f"{profile} p50 ms FP32 / INT8 (seed 0) | wall s / run |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(compare, key=lambda r: -r["top1_mean"]):
        run = f"{r['method']}/{r['student']}"
        sig = f"{r['better_seeds']} / {r['worse_seeds']} of {r['paired_seeds']}" if "paired_seeds" in r else "—"
        out.append(f"| {r['method']} | {r['seeds']} | {pm(r['top1_mean'], r['top1_std'])} | "
                   f"{pm(r['gain_mean'], r['gain_std'], '+.2f')} | {sig} | "
                   f"{pm(r.get('gap_recovered_mean'), r.get('gap_recovered_std'), '+.2f')} | "
                   f"{deployed(run)} | "
                   f"{r.get('wall_s_mean', '—')} |")
    first = compare[0]
    for who, key, role in (("student alone", f"baseline/{first['student']}", "alone"), ("teacher", "teacher", "teacher")):
        out.append(f"| *{who}* | {first['seeds']} | {pm(first.get(f'{role}_mean'), first.get(f'{role}_std'))} | "
                   f"— | — | — | {deployed(key)} | — |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=ALL, help=f"comma-separated (default: all 15, {ALL})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="experiments at once (default 2)")
    ap.add_argument("--data-root", type=Path, help="folder of the IDX files (default: the recipe's data.root)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--keep", action="store_true", help="keep the clone and print its path")
    args = ap.parse_args()

    recipe = yaml.safe_load(RECIPE.read_text())
    root = args.data_root or Path(recipe["data"]["root"])
    check_data(root)
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-fmnist-"))
    ws = tmp / "ws"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run(["git", "clone", "-q", str(REPO), str(ws)], check=True)
    recipe["data"]["root"] = str(root.resolve())
    (ws / "params.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "Fashion-MNIST benchmark recipe"], cwd=ws, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD~1"], cwd=ws, capture_output=True,
                            text=True).stdout.strip()
    student = next(iter(recipe["students"]))
    methods = [m for m in args.methods.split(",") if m]
    print(f"commit {commit}; {len(methods)} methods x {student} x seeds {args.seeds} = "
          f"{len(methods) * len(args.seeds)} experiments, {args.jobs} at once; clone in {ws}", flush=True)

    t_compare = run(["kdpipe", "compare", "--methods", ",".join(methods), "--students", student, "--seeds",
                     *map(str, args.seeds), "--jobs", str(args.jobs), "--name", "fmnist"], ws, env,
                    tmp / "compare.log")
    print(f"kdpipe compare: {t_compare:.0f} s", flush=True)
    # seed 0's whole pipeline for the deployment figures: the training runs come back from the run-cache
    seed0 = {**recipe, "seed": 0}
    seed0["distill"]["methods"] = [m for m in methods if m in recipe["distill"]["methods"]]
    seed0["online"]["methods"] = [m for m in methods if m in recipe["online"]["methods"]]
    (ws / "params.yaml").write_text(yaml.safe_dump(seed0, sort_keys=False))
    t_repro = run(["dvc", "repro"], ws, env, tmp / "repro.log")
    print(f"dvc repro (seed 0, export to report): {t_repro:.0f} s", flush=True)

    sweep = json.loads((ws / "reports" / "sweeps" / "fmnist.json").read_text())
    results = json.loads((ws / "reports" / "results.json").read_text())
    quantize = json.loads((ws / "reports" / "quantize.json").read_text())
    env_facts = results.get("environment", {})
    f = recipe
    header = [f"Fashion-MNIST, teacher `{f['teacher']['model']}`, student `{student}`, seeds "
              f"{' '.join(map(str, args.seeds))}; {f['data']['train_fraction'] * 100:g} % of the training images "
              f"after a {f['data']['val_fraction'] * 100:g} % validation split, {f['train']['epochs']} student "
              f"epochs ({f['teacher']['train']['epochs']} for the teacher), the 10,000 official test images "
              "(recipes/fashion_mnist.yaml).", "",
              f"Measured at commit {commit} on {env_facts.get('cpu') or platform.processor()} "
              f"({os.cpu_count()} logical cores), onnxruntime {env_facts.get('onnxruntime')}, "
              f"{time.strftime('%Y-%m-%d')}: `kdpipe compare` {t_compare / 60:.1f} min with {args.jobs} at once, "
              f"then `dvc repro` of seed 0 {t_repro / 60:.1f} min; {(t_compare + t_repro) / 60:.1f} min in all.", ""]
    board = leaderboard(sweep["compare"], results, quantize, "edge-1core")
    picks = [f"- **{n}**: {s.get('why', '')}" for n, s in results.get("profiles", {}).items() if s.get("why")]
    text = "\n".join(header + board + (["", "Seed 0's pick per device profile:", ""] + picks if picks else [])) + "\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    if args.keep:
        print(f"clone kept: {ws} (its reports/sweeps/fmnist.md has every seed's paired test)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
