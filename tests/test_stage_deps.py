"""Every DVC stage depends on the code it runs, and no stage on code it does not run.

DVC re-runs a stage when one of its deps changes, so ``dvc.yaml`` must list every file
of the project a stage's outs depend on, and should list nothing more: editing the
report's plot code must not retrain the teacher. For each stage (as DVC expands
``dvc.yaml``, through DVC's own API) this test computes what its outs depend on:

* the import closure of its module (``python -m stages.<x>`` in its ``cmd``) inside
  ``pipeline/`` and ``stages/``, module-level and function-level imports
  (``tests/import_graph.py``);
* the schema module of every params section the stage declares (``distill.kd`` is
  :mod:`pipeline.distill.offline.kd`, ``data`` is :mod:`pipeline.config.training`) and
  its closure, since a schema's defaults are values the stage reads;
* files a stage reads as data: the bundle copies the edge runtime's files into every
  bundle.

What :mod:`pipeline.params` imports is left out of the closure: every stage validates the
whole params file (a typo anywhere stops the first stage), but the sections a stage does
not declare cannot change its outs. Then every file of that set must be covered by a dep
(the file or a folder above it), and a folder dep must hold no module outside the set,
unless it is a package without sub-packages whose ``__init__`` the stage runs (``pipeline/models``:
its files are one unit); ``pipeline`` itself, ``pipeline/distill`` or ``pipeline/deploy`` never are.
"""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.import_graph import closure, import_graph, module_files

#: The whole-file validation: its imports do not count towards a stage's deps (module docstring).
VALIDATION = "pipeline.params"


@cache
def _graph() -> dict[str, set[str]]:
    graph = {m: set(deps) for m, deps in import_graph(REPO).items()}
    graph[VALIDATION] = set()
    return graph


@cache
def _files() -> dict[str, Path]:
    return module_files(REPO)


def _stages() -> list[tuple[str, str, list[str], list[str]]]:
    """(name, cmd, path deps, params keys) of every stage, as DVC expands dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    found = []
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            paths = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            keys = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
            found.append((stage.addressing, stage.cmd, paths, keys))
    return found


def _schema_module(key: str) -> str:
    """The module holding the schema of params key ``key`` (``seed``, ``data``, ``distill.kd``, ``teacher.model``)."""
    from pipeline.params import Params

    section, _, rest = key.partition(".")
    field = Params.model_fields[section]
    annotation = field.annotation
    if section in ("distill", "online") and rest:
        method = rest.split(".")[0]
        sub = annotation.model_fields[method].annotation
        return sub.__module__ if method != "methods" else annotation.__module__
    module = getattr(annotation, "__module__", "builtins")
    if module in ("builtins", "typing"):  # seed, students: dict[str, StudentConfig]
        args = getattr(annotation, "__args__", ())
        module = args[-1].__module__ if args and hasattr(args[-1], "model_fields") else VALIDATION
    return module


def _data_files(stage_module: str) -> set[Path]:
    """Files a stage reads as data rather than importing."""
    if stage_module != "stages.bundle":
        return set()
    from pipeline.deploy.bundle import RUNTIME_FILES

    return {Path(p).resolve() for p in RUNTIME_FILES.values()}


def needed_files(cmd: str, keys: list[str]) -> set[Path]:
    """The project files the outs of a stage with this ``cmd`` and these params keys depend on."""
    argv = shlex.split(cmd)
    module = argv[argv.index("-m") + 1]
    graph = _graph()
    modules = closure(graph, module)
    for key in keys:
        modules |= closure(graph, _schema_module(key))
    files = _files()
    return {files[m].resolve() for m in modules if m in files} | _data_files(module)


def _flat_package(folder: Path, needed: set[Path]) -> bool:
    """A package without sub-packages whose ``__init__`` the stage runs: its modules are one unit (models, data, engine)."""
    init = (folder / "__init__.py").resolve()
    return init in needed and not any((sub / "__init__.py").is_file() for sub in folder.iterdir() if sub.is_dir())


def _covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


STAGES = _stages()


@pytest.mark.parametrize(("name", "cmd", "paths", "keys"), STAGES, ids=[s[0] for s in STAGES])
def test_stage_deps_are_the_code_it_runs(name: str, cmd: str, paths: list[str], keys: list[str]):
    needed = needed_files(cmd, keys)
    deps = [(REPO / p).resolve() for p in paths]
    missing = sorted(p.relative_to(REPO).as_posix() for p in needed if not _covered(p, deps))
    assert not missing, f"dvc.yaml: stage {name} runs code it does not list as deps: {missing}"
    for dep in deps:
        if dep.is_dir() and (dep == REPO / "pipeline" or REPO / "pipeline" in dep.parents) and not _flat_package(dep, needed):
            extra = sorted(p.relative_to(REPO).as_posix() for p in dep.rglob("*.py")
                           if "__pycache__" not in p.parts and p.resolve() not in needed)
            assert not extra, (f"dvc.yaml: stage {name} depends on {dep.relative_to(REPO)}, which holds code it does "
                               f"not run (list files instead): {extra}")


def test_editing_report_or_benchmark_code_retrains_nothing():
    """The issue's check, by the same rule: no training or evaluation stage needs report or benchmark code."""
    for name, cmd, _, keys in STAGES:
        if name.split("@")[0] in ("train_teacher", "train_student", "distill", "online") or name.startswith("evaluate"):
            touched = sorted(p.relative_to(REPO).as_posix() for p in needed_files(cmd, keys)
                             if p.is_relative_to(REPO / "pipeline" / "report") or p.is_relative_to(REPO / "pipeline" / "deploy"))
            assert not touched, f"{name} runs deployment/report code: {touched}"


def test_the_rule_finds_a_missing_dep(tmp_path: Path):
    """needed_files sees a method's own module and the schemas: the rule can fail."""
    needed = needed_files("python -m stages.distill --student s --method dkd", ["seed", "data", "distill.dkd"])
    rel = {p.relative_to(REPO).as_posix() for p in needed}
    assert {"pipeline/distill/offline/dkd.py", "pipeline/config/training.py", "pipeline/runs.py",
            "stages/distill.py", "stages/_common.py", "pipeline/params.py"} <= rel
    assert "pipeline/distill/offline/kd.py" not in rel and "pipeline/config/deploy.py" not in rel
    assert not any(p.startswith("pipeline/report/") for p in rel)


def test_a_device_budget_reruns_only_the_report():
    """The bundle and benchmark stages list the benchmark keys they read one by one, leaving out
    ``device_budgets`` (the report's alone): a device's budget must not re-measure every model. A new
    benchmark key must be listed there too, or a change to it would not re-run the benchmark."""
    from pipeline.config.deploy import BenchmarkConfig

    keys = {name: set(k) for name, _, _, k in _stages()}
    fields = {f"benchmark.{f}" for f in BenchmarkConfig.model_fields}
    assert "benchmark" not in keys["benchmark"] and "benchmark" not in keys["bundle"]
    assert {k for k in keys["benchmark"] if k.startswith("benchmark.")} == fields - {"benchmark.device_budgets"}
    assert {k for k in keys["bundle"] if k.startswith("benchmark.")} == {
        "benchmark.variants", "benchmark.warmup", "benchmark.iterations", "benchmark.max_seconds",
        "benchmark.rounds", "benchmark.profiles"}
    assert "benchmark" in keys["report"]
