"""The import graph of the project's own modules, read from the source with :mod:`ast`.

A helper for tests (not a test module itself): nothing is imported or executed, so it
works on any tree (the repository, or a synthetic package written to ``tmp_path``) and
costs milliseconds.

Modules are named as Python names them: ``pipeline/engine/loop.py`` is
``pipeline.engine.loop`` and ``pipeline/engine/__init__.py`` is the package
``pipeline.engine``. An edge ``a -> b`` means that running module ``a`` (at import
time or when one of its functions runs) imports module ``b``:

* module-level and function-level (lazy) imports both count: a lazy import runs
  whenever the function does, so it is as real a dependency as a top-level one;
* imports under ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``) do not count:
  they never run (the ``else:`` branch of such an ``if`` does, and counts);
* ``from pkg.mod import name`` resolves to ``pkg.mod.name`` when that is a project
  module (a submodule), else to ``pkg.mod`` (``name`` is an attribute of it);
  relative imports (``from . import x``, ``from ..a import b``) are resolved against
  the importing module's package;
* importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so it
  also adds the edges to ``a.b`` and ``a`` (the *implicit parent* edges). For the same
  reason every module has implicit edges to its own parent packages. Both are in the
  graph by default; :func:`import_graph` can leave them out (``implicit_parents``) or
  leave out just the edges from a module to the packages containing it
  (``own_packages``), which the cycle test needs (see ``tests/test_import_cycles.py``).

Imports by name (``importlib.import_module``) count where the name can be read from
the source (:func:`explicit_imports`). Only project modules appear: imports of the
standard library or third-party packages are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import networkx as nx

#: The top-level packages whose modules make up the graph by default.
PROJECT_PACKAGES: tuple[str, ...] = ("pipeline", "stages")


def module_files(root: Path, packages: Iterable[str] = PROJECT_PACKAGES) -> dict[str, Path]:
    """Every module under ``root/<package>/`` for each of ``packages``, by dotted name.

    A folder counts as a package only when it (and every folder above it up to
    ``root/<package>``) holds an ``__init__.py``, as Python's regular import requires;
    loose scripts in other folders are left out.
    """
    root = Path(root)
    out: dict[str, Path] = {}
    for top in packages:
        base = root / top
        if not (base / "__init__.py").is_file():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            folders = [root.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
            if not all((f / "__init__.py").is_file() for f in folders):
                continue
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def parents(module: str) -> list[str]:
    """The packages Python imports before ``module``: ``a.b.c`` -> ``["a", "a.b"]``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (any ``<x>.TYPE_CHECKING``)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runnable_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: everywhere but under ``if TYPE_CHECKING:``.

    The ``else:`` branch of such an ``if`` does run, so it is searched.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _is_import_call(node: ast.AST) -> bool:
    """A call of ``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return name in ("import_module", "__import__")


def _resolve_base(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute name a ``from ... import`` reads from, or None if it climbs above the top."""
    if not node.level:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)] if node.level - 1 < len(package) else []
    if not anchor:
        return None
    return ".".join([*anchor, node.module]) if node.module else ".".join(anchor)


def explicit_imports(module: str, path: Path, known: Iterable[str], dynamic: bool = True) -> set[str]:
    """The modules among ``known`` that ``module``'s runnable imports name.

    ``import a.b`` names ``a.b``; ``from a import b`` names ``a.b`` if that is a known
    module, else ``a`` (``b`` is then an attribute of ``a``); ``from a import *`` names
    ``a``. Parent packages reached only implicitly are not included (see
    :func:`import_graph`).

    With ``dynamic`` (the default), imports by name count too: a call
    ``importlib.import_module("a.b")`` (or ``__import__``) with a literal name names
    ``a.b``, and in a module that calls ``import_module`` with a computed name (a
    registry looping over a tuple of module names), every string literal that is
    exactly a known module's name counts as imported by it. That is a heuristic, but
    the only way a static reading sees such a registry's modules at all.
    """
    known = set(known)
    path = Path(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    literals: set[str] = set()
    computed_import = False
    for node in _runnable_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_base(module, is_package, node)
            if base is None:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
        elif dynamic and _is_import_call(node):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if arg.value in known:
                    out.add(arg.value)
            else:
                computed_import = True
        elif dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            literals.add(node.value)
    if computed_import:
        out |= literals
    out.discard(module)
    return out


def import_graph(
    root: Path,
    packages: Iterable[str] = PROJECT_PACKAGES,
    implicit_parents: bool = True,
    own_packages: bool = True,
    dynamic: bool = True,
) -> dict[str, set[str]]:
    """For every project module under ``root``, the project modules it imports (module docstring).

    With the defaults the graph is what Python really runs: an import of ``a.b.c``
    adds ``a.b`` and ``a``, and every module depends on its own parent packages (they
    are imported before it). ``implicit_parents=False`` keeps only the modules the
    source names (:func:`explicit_imports`). ``own_packages=False`` keeps the implicit
    parents of what is imported but drops those that are packages containing the
    importing module (``a.b.c`` -> ``a.b``, ``a``), unless the source names them
    explicitly. ``dynamic``: see :func:`explicit_imports`. A module never appears among
    its own imports.
    """
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        explicit = explicit_imports(module, path, files, dynamic)
        implicit: set[str] = set()
        if implicit_parents:
            for name in [*explicit, module]:
                implicit.update(p for p in parents(name) if p in files)
            if not own_packages:
                implicit -= set(parents(module))
        graph[module] = (explicit | implicit) - {module}
    return graph


def to_networkx(graph: Mapping[str, Iterable[str]]) -> nx.DiGraph:
    """The graph as a :class:`networkx.DiGraph` (every module a node, even one without edges)."""
    g = nx.DiGraph()
    g.add_nodes_from(graph)
    g.add_edges_from((a, b) for a, targets in graph.items() for b in targets)
    return g


def closure(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not, including ``start`` itself."""
    seen = {start}
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def restrict(graph: Mapping[str, Iterable[str]], prefix: str) -> dict[str, set[str]]:
    """The subgraph of modules named ``prefix`` or ``prefix.<...>`` (edges between them only)."""
    keep = {m for m in graph if m == prefix or m.startswith(prefix + ".")}
    return {m: {t for t in graph[m] if t in keep} for m in keep}


def collapse(graph: Mapping[str, Iterable[str]], depth: int = 2) -> dict[str, set[str]]:
    """The graph between groups of modules: each module counted as its first ``depth`` name parts.

    With ``depth=2``, ``pipeline.engine.loop`` and ``pipeline.engine.checkpoint`` are both
    ``pipeline.engine``, so an edge between two modules becomes one between their
    packages (``pipeline.engine -> pipeline.distill``); edges inside a group are dropped.
    """
    def group(m: str) -> str:
        return ".".join(m.split(".")[:depth])

    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(group(a), set()).update(group(t) for t in targets if group(t) != group(a))
    return out


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The elementary cycles of the graph, each as its modules in order (first not repeated).

    Each cycle starts at its smallest module name and the list is sorted, so the
    output is stable. A graph with many tangled cycles can have exponentially many;
    ``networkx.simple_cycles`` enumerates them lazily, and real import graphs are small.
    """
    found = []
    for cyc in nx.simple_cycles(to_networkx(graph)):
        i = cyc.index(min(cyc))
        found.append(cyc[i:] + cyc[:i])
    return sorted(found, key=lambda c: (len(c), c))


def format_cycle(cycle: list[str]) -> str:
    """``["a", "b"]`` -> ``"a -> b -> a"``."""
    return " -> ".join([*cycle, cycle[0]])
