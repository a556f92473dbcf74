"""``kdpipe``: the command line around the pipeline (listing, checking params, showing results)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models import available
    from pipeline.models.registry import model_info

    for name in available(args.family):
        info = model_info(name)
        print(f"{name:22s} {info['family']:14s} {info.get('description', '')}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from pipeline.distill.registry import load_methods

    for name, spec in sorted(load_methods().items()):
        kind = "offline" if spec.offline else "online"
        doc = (spec.cls.__doc__ or "").strip().splitlines()[0] if spec.cls.__doc__ else ""
        print(f"{name:10s} {kind:8s} {doc}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_params

    try:
        p = load_params(args.params)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    runs = 1 + len(p.students) * (1 + len(p.distill.methods) + len(p.online.methods))
    print(f"{args.params}: ok ({p.data.name}, teacher {p.teacher.model}, students {', '.join(p.students)}, "
          f"methods {', '.join(p.distill.methods)}, online {', '.join(p.online.methods) or 'none'}; {runs} training runs)")
    return 0


def collect_results(root: Path = Path(".")) -> list[dict]:
    """Every evaluated run of a workspace as one row: run id plus its test metrics."""
    rows = []
    base = root / "metrics"
    for f in sorted(base.rglob("*.json")):
        key = f.relative_to(base).with_suffix("").as_posix()
        rows.append({"run": key, **json.loads(f.read_text())})
    return rows


def _cmd_results(args: argparse.Namespace) -> int:
    rows = collect_results(Path(args.root))
    if not rows:
        print(f"no results under {Path(args.root) / 'metrics'}; run `dvc repro` first", file=sys.stderr)
        return 1
    cols = ["run", "top1", "top5", "nll", "ece", "teacher_agreement", "params", "macs"]
    print(" | ".join(cols))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print(" | ".join(cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdpipe`` command."""
    ap = argparse.ArgumentParser(prog="kdpipe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--family")
    m.set_defaults(fn=_cmd_models)
    sub.add_parser("methods", help="list distillation methods").set_defaults(fn=_cmd_methods)
    c = sub.add_parser("check", help="validate a params file")
    c.add_argument("params", nargs="?", default="params.yaml")
    c.set_defaults(fn=_cmd_check)
    r = sub.add_parser("results", help="table of every evaluated model")
    r.add_argument("--root", default=".")
    r.set_defaults(fn=_cmd_results)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
