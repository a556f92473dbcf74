"""``kdpipe``: the command line around the pipeline.

Run the pipeline as a Prefect flow (``run``), sweep params and seeds or compare methods as
DVC experiments, each in its own clone (``sweep``, ``compare``), serve the flows as deployments (``serve``), show results, list models and
methods, validate params, inspect or clear stale DVC locks, and file results measured on a real
device (``device-results``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.report.metrics import collect_results


def _cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models import available
    from pipeline.models.registry import matches, model_info

    if args.source == "timm":
        from pipeline.models.timm_models import list_timm

        names = list_timm(args.pattern)
        for name in names:
            print(name)
        print(f"{len(names)} timm models" + (f" matching {args.pattern!r}" if args.pattern else "")
              + "; use one as teacher.model or a students key (nothing is downloaded)", file=sys.stderr)
        return 0 if names else 1
    for name in available(args.family):
        if not matches(name, args.pattern):
            continue
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
    from pipeline.config.base import ConfigError
    from pipeline.params import load_params

    try:
        p = load_params(args.params)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    runs = 1 + len(p.students) * (1 + len(p.distill.methods) + len(p.online.methods))
    print(f"{args.params}: ok ({p.data.name}, teacher {p.teacher.model}, students {', '.join(p.students)}, "
          f"methods {', '.join(p.distill.methods)}, online {', '.join(p.online.methods) or 'none'}; {runs} training runs)")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    if args.sweep:
        md = Path(args.root) / "reports" / "sweeps" / f"{args.sweep}.md"
        if not md.is_file():
            print(f"no sweep table {md}; run `kdpipe sweep --name {args.sweep} ...` first", file=sys.stderr)
            return 1
        print(md.read_text())
        return 0
    rows = collect_results(Path(args.root))
    if not rows:
        print(f"no results under {Path(args.root) / 'metrics'}; run `dvc repro` first", file=sys.stderr)
        return 1
    from pipeline.report.significance import read_correct, significance_rows, verdict

    by_run = {r["run"]: r for r in rows}
    stats = {r["run"]: r for r in significance_rows(by_run, read_correct(Path(args.root), list(by_run)))}
    cols = ["run", "top1", "95% interval", "top5", "nll", "ece", "teacher_agreement", "params", "macs", "vs alone",
            "McNemar p", "gap recovered"]
    print(" | ".join(cols))
    for r in rows:
        st = stats.get(r["run"], {})
        shown = {**r, "95% interval": f"{st['ci_low']:.2f}-{st['ci_high']:.2f}" if st else "",
                 "vs alone": st.get("vs_alone"), "McNemar p": st.get("p_value"), "gap recovered": st.get("gap_recovered")}
        cells = [f"{shown[c]:.4g}" if isinstance(shown.get(c), float) else str(shown.get(c) or "") for c in cols]
        print(" | ".join(cells))
    paired = [st for st in stats.values() if "p_value" in st]
    if paired:
        n = paired[0]["test_images"]
        print(f"\nagainst the student alone on the same {n} test images (exact McNemar, 0.05):")
        for st in paired:
            print(f"  {st['run']}: {st['vs_alone']:+.2f} points, {verdict(st)}")
    report = Path(args.root) / "reports" / "results.json"
    if report.is_file():  # the deployment report's pick per device profile, once the report stage has run
        from pipeline.report.markdown import profile_lines

        profiles = json.loads(report.read_text()).get("profiles", {})
        if profiles:
            print(f"\npick and Pareto front per device profile ({report}):")
        for name, s in profiles.items():
            print("\n".join(profile_lines(name, s)))
    return 0


def _fail(err: BaseException, code: int) -> int:
    print(f"kdpipe: {err}", file=sys.stderr)
    return code


def _run_flow(fn, **kwargs) -> int:  # noqa: ANN001
    """Call a flow; user errors become one message and exit 2, failures of a run exit 1."""
    from pipeline.config.base import ConfigError
    from pipeline.dvc_locks import LockBusyError, StaleLockError
    from pipeline.orchestrate.command import StageFailedError
    from pipeline.orchestrate.lock import WorkspaceBusyError

    try:
        result = fn(**kwargs)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return _fail(err, 2)
    except (StageFailedError, StaleLockError, LockBusyError, WorkspaceBusyError, RuntimeError) as err:
        return _fail(err, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1, default=str))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config.base import ConfigError
    from pipeline.orchestrate.params import merged_params, parse_assignments
    from pipeline.orchestrate.runners import dask_available, parse_dask
    from pipeline.orchestrate.slots import parse_jobs

    try:  # everything the user typed is checked before Prefect starts
        overrides = parse_assignments(args.set)
        merged_params(Path(args.workspace) / "params.yaml", overrides)
        jobs = parse_jobs(args.jobs) if args.jobs is not None else None
        if args.dask:
            parse_dask(args.dask)
            if not dask_available():
                raise ValueError("--dask needs prefect-dask and distributed: pip install -e '.[dask]'")
    except (ValueError, ConfigError) as err:
        return _fail(err, 2)
    from pipeline.flows import pipeline_flow

    return _run_flow(pipeline_flow, params=overrides or None, targets=args.target or None, workspace=args.workspace,
                     experiment=args.name, record=not args.no_record, force=args.force, jobs=jobs, dask=args.dask)


def _sweep_checks(args: argparse.Namespace, plan: list) -> None:
    """Refuse, before Prefect starts, what no experiment of the sweep could run with (ValueError)."""
    from pipeline.orchestrate.isolated import base_commit
    from pipeline.orchestrate.runners import dask_available, parse_dask
    from pipeline.sweeps import check_plan

    root = Path(args.workspace)
    refused = check_plan(root, plan)
    if plan and len(refused) == len(plan):  # all refused: a typo, not one bad point of the grid
        raise ValueError(next(iter(refused.values())))
    base_commit(root)
    if args.dask:
        parse_dask(args.dask)
        if not dask_available():
            raise ValueError("--dask needs prefect-dask and distributed: pip install -e '.[dask]'")
    if args.remote:
        from pipeline.orchestrate.repo import open_repo

        with open_repo(root.resolve()) as repo:
            remotes = sorted(repo.config.get("remote", {}))
        if args.remote not in remotes:
            raise ValueError(f"--remote {args.remote!r} is not a DVC remote of {root.resolve()}; remotes there: "
                             f"{', '.join(remotes) or 'none'} (add one with `dvc remote add NAME URL`)")


def _run_sweep(args: argparse.Namespace, plan: list, **kwargs) -> int:  # noqa: ANN003 - the flow's parameters
    try:
        _sweep_checks(args, plan)
    except ValueError as err:
        return _fail(err, 2)
    from pipeline.sweeps import sweep_flow

    code = _run_flow(sweep_flow, seeds=args.seeds, jobs=args.jobs, workspace=args.workspace, name=args.name,
                     dask=args.dask, remote=args.remote, **kwargs)
    md = Path(args.workspace) / "reports" / "sweeps" / f"{args.name}.md"
    if code in (0, 1) and md.is_file():
        print(md.read_text())
    return code


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.config.base import ConfigError
    from pipeline.orchestrate.experiments import sweep_plan
    from pipeline.orchestrate.params import parse_assignments

    try:
        grid = {k: v if isinstance(v, list) else [v] for k, v in parse_assignments(args.grid).items()}
        plan = sweep_plan(args.name, grid, args.seeds, args.target)
    except (ValueError, ConfigError) as err:
        return _fail(err, 2)
    return _run_sweep(args, plan, grid=grid, targets=args.target or None)


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.orchestrate.experiments import compare_plan, known_students

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    try:
        plan = compare_plan(args.name, methods, students, args.seeds, known_students(Path(args.workspace)))
    except ValueError as err:
        return _fail(err, 2)
    return _run_sweep(args, plan, methods=methods, students=students)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serve import serve

    serve(args.name, args.workspace)
    return 0


def _cmd_locks(args: argparse.Namespace) -> int:
    from pipeline.dvc_locks import LockBusyError, clear_stale, inspect_locks

    if not args.clear:
        report = inspect_locks(args.workspace)
        print(report.explain())
        return 1 if (report.busy or report.has_stale) else 0
    try:
        removed = clear_stale(args.workspace)
    except LockBusyError as err:
        return _fail(f"nothing removed: {err}", 1)
    print("\n".join(f"removed {r}" for r in removed) or "no stale locks")
    return 0


def _cmd_device_results(args: argparse.Namespace) -> int:
    """``device-results import FILE --device NAME`` / ``device-results list``: file or show real-device results."""
    from pipeline.deploy.artifacts import DeployError
    from pipeline.deploy.device_results import DEVICE_RESULTS, import_results, list_devices

    root = Path(args.root)
    try:
        if args.action == "import":
            done = import_results(root, Path(args.file), args.device)
            print(f"{'replaced' if done['replaced'] else 'filed'} the results of {done['bundle']} "
                  f"({', '.join(done['runtimes'])}; {done['variants']} measurement(s), profile {done['profile']}) "
                  f"in {done['file']}, which holds {len(done['bundles'])} bundle(s)")
            return 0
        devices = list_devices(root)
    except DeployError as err:
        return _fail(err, 2)
    if not devices:
        print(f"no device results under {root / DEVICE_RESULTS}; file some with: kdpipe device-results import "
              "results.json --device NAME", file=sys.stderr)
        return 0
    print("device | bundles | cpu | profile | imported")
    for d in devices:
        print(f"{d['device']} | {len(d['bundles'])}: {', '.join(d['bundles'])} | {d['cpu']} | {d['profile']} | "
              f"{d['imported_at']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdpipe`` command."""
    from pipeline.orchestrate.prefect_env import set_defaults

    set_defaults()  # before any command imports Prefect
    ap = argparse.ArgumentParser(prog="kdpipe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models", help="list the model registry (or, with --source timm, the installed timm's models)")
    m.add_argument("pattern", nargs="?", help="only names matching this glob (or containing this text)")
    m.add_argument("--family")
    m.add_argument("--source", choices=["registry", "timm"], default="registry",
                   help="registry: the registered models; timm: every model of the installed timm, as timm/<name>")
    m.set_defaults(fn=_cmd_models)
    sub.add_parser("methods", help="list distillation methods").set_defaults(fn=_cmd_methods)
    c = sub.add_parser("check", help="validate a params file")
    c.add_argument("params", nargs="?", default="params.yaml")
    c.set_defaults(fn=_cmd_check)
    r = sub.add_parser("results", help="table of every evaluated model")
    r.add_argument("--root", default=".")
    r.add_argument("--sweep", help="show the aggregated table of this sweep (reports/sweeps/NAME.md)")
    r.set_defaults(fn=_cmd_results)
    run = sub.add_parser("run", help="run the pipeline as a concurrent Prefect flow (one task per DVC stage), "
                                     "recorded as a DVC experiment")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a params key for this run (repeatable), e.g. distill.kd.temperature=2")
    run.add_argument("--target", action="append", default=[], metavar="STAGE",
                     help="reproduce only this stage and what it depends on (repeatable)")
    run.add_argument("--name", help="experiment name (default: the flow run's name)")
    run.add_argument("--no-record", action="store_true", help="do not save the run as a DVC experiment")
    run.add_argument("--force", action="store_true", help="re-run stages even if DVC finds them up to date")
    run.add_argument("-j", "--jobs", metavar="N|auto",
                     help="stages run at once, each in its own slot (a GPU, or CPU threads): a number or 'auto' "
                          "(one per GPU; on CPU one per cpu_threads cores); default 1, or every Dask worker")
    run.add_argument("--dask", metavar="ADDRESS|local:N",
                     help="run the stage commands on a Dask cluster (workers must share the workspace path), or "
                          "local:N for a LocalCluster of N worker processes; DVC records on this machine")
    run.add_argument("--workspace", default=".")
    run.set_defaults(fn=_cmd_run)
    sw = sub.add_parser("sweep", help="run params x seeds as DVC experiments, each in its own clone, here or on a "
                                      "Dask cluster; aggregate over seeds")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                    help="a params key and its values (YAML list), repeatable; combinations are crossed")
    sw.add_argument("--target", action="append", default=[], metavar="STAGE",
                    help="reproduce only this stage and what it depends on in each experiment (repeatable)")
    sw.add_argument("--name", default="sweep", help="sweep name: prefix of the experiments and reports/sweeps/NAME.md")
    cp = sub.add_parser("compare", help="each method x student x seed once, against the student alone and the "
                                        "teacher; reports/sweeps/NAME.md")
    cp.add_argument("--methods", required=True, metavar="M1,M2", help="methods to compare, e.g. kd,dkd,crd,dml")
    cp.add_argument("--students", required=True, metavar="S1,S2", help="students of params.yaml to distill into")
    cp.add_argument("--name", default="compare", help="comparison name: prefix of its experiments and its report")
    for p, fn in ((sw, _cmd_sweep), (cp, _cmd_compare)):
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("-j", "--jobs", type=int, help="experiments run at once (default 1, or every Dask worker)")
        p.add_argument("--dask", metavar="ADDRESS|local:N",
                       help="run each experiment as a task on a Dask cluster (workers see the workspace path), or "
                            "local:N for a LocalCluster of N worker processes")
        p.add_argument("--remote", metavar="NAME", help="share outs through this DVC remote (dvc exp push/pull) "
                                                        "instead of the workspace's cache directory")
        p.add_argument("--workspace", default=".")
        p.set_defaults(fn=fn)
    sv = sub.add_parser("serve", help="serve the flows as Prefect deployments from this process")
    sv.add_argument("--name", default="kdpipe")
    sv.add_argument("--workspace", default=".")
    sv.set_defaults(fn=_cmd_serve)
    lk = sub.add_parser("locks", help="show who holds this workspace's DVC locks and which are stale")
    lk.add_argument("--workspace", default=".")
    lk.set_defaults(fn=_cmd_locks, clear=False)
    ul = sub.add_parser("unlock", help="remove stale DVC locks (never one a live DVC process holds)")
    ul.add_argument("--workspace", default=".")
    ul.set_defaults(fn=_cmd_locks, clear=True)
    dr = sub.add_parser("device-results", help="file results measured on a real device (bundle's bench.py --json) "
                                               "for the report, or list what is filed")
    dsub = dr.add_subparsers(dest="action", required=True)
    di = dsub.add_parser("import", help="check a bench.py --json file against the workspace's bundles and file it "
                                        "under device_results/NAME.json")
    di.add_argument("file", help="the device-results JSON that bench.py --json wrote on the device")
    di.add_argument("--device", required=True, help="the device's name (letters, digits, _ . -): the report's "
                                                    "profile name, and benchmark.device_budgets' key")
    dl = dsub.add_parser("list", help="the filed devices: bundles, CPU, profile, date imported")
    for p in (di, dl):
        p.add_argument("--root", default=".", help="the workspace (default: here)")
        p.set_defaults(fn=_cmd_device_results)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
