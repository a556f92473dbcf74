"""No import cycles between the modules of ``pipeline/`` (imports go one way:
stages -> runs -> engine/distill -> models/data -> config).

The graph is read from the source (``tests/import_graph.py``), function-level imports
included (a lazy import is still a dependency; laziness only hides a cycle until the
function runs), ``if TYPE_CHECKING:`` imports excluded (they never run).

Two kinds of edge are left out here, each for a reason:

* Implicit edges from a module to the packages that contain it. Python runs
  ``pipeline/distill/__init__.py`` before any ``pipeline.distill.x``, so the edge
  ``pipeline.distill.x -> pipeline.distill`` is always there; when the package's
  ``__init__`` re-exports ``x`` (``from pipeline.distill.base import Distiller``), the
  edge back makes a "cycle" every package with re-exports would have, and it is harmless:
  the package starts first, imports ``x``, and ``x`` finds what it imports from its
  siblings complete. Explicit imports of one's own package (``from pipeline.distill
  import Phase`` inside ``pipeline.distill.x``) are kept: those do read a half-run
  ``__init__``. Implicit edges to *other* packages (importing ``pipeline.models.base``
  runs ``pipeline/models/__init__.py``) are kept too: they run code that may close a
  real cycle.
* Imports by name (``importlib.import_module``): the method registry
  (``pipeline.distill.registry.load_methods``) imports the method modules by name,
  and each method module imports the registry to register itself. That is the plugin
  pattern, not a layering problem: the registry names its plugins only as data and
  loads them in a function, after it has finished initialising. (The stage dependency
  checks do count these edges: the methods are code a training stage runs.)
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.import_graph import closure, collapse, cycles, format_cycle, import_graph, restrict

REPO = Path(__file__).resolve().parent.parent


def cycle_graph(root: Path, package: str = "pipeline") -> dict[str, set[str]]:
    """The graph the cycle rule is checked on (module docstring)."""
    graph = import_graph(root, packages=(package,), own_packages=False, dynamic=False)
    return restrict(graph, package)


def test_no_import_cycles_in_pipeline():
    found = cycles(cycle_graph(REPO))
    assert not found, "import cycles between pipeline modules:\n" + "\n".join(map(format_cycle, found))


def test_no_import_cycles_between_pipeline_packages():
    """The same between sub-packages (``pipeline.engine``, ``pipeline.distill``, ...) and top-level modules.

    Two modules can avoid a cycle while their packages have one (``engine.loop`` importing
    ``distill.base`` while ``distill.offline.common`` imports ``engine.checkpoint``): the
    layers then depend on each other, which the one-way rule forbids.
    """
    found = cycles(collapse(cycle_graph(REPO), depth=2))
    assert not found, "import cycles between pipeline packages:\n" + "\n".join(map(format_cycle, found))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_helper_on_a_synthetic_package(tmp_path):
    """The helper sees a real (lazy) cycle, ignores TYPE_CHECKING imports and the package-re-export pattern."""
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub.low import Low\n",  # re-export: the harmless package <-> child edges
        "pkg/sub/__init__.py": "",
        "pkg/sub/low.py": """
            from typing import TYPE_CHECKING

            from . import util

            if TYPE_CHECKING:
                from pkg.high import High  # never runs: no edge
            else:
                import pkg.other  # runs: an edge

            class Low:
                def make(self):
                    from ..high import High  # function-level: an edge, and a real cycle with pkg.high
                    return High()
            """,
        "pkg/sub/util.py": "import json\n",
        "pkg/high.py": "from pkg.sub.low import Low\nfrom pkg.sub import util, missing_attr\n",
        "pkg/other.py": "import importlib\n\ndef load():\n    return importlib.import_module('pkg.plugin')\n",
        "pkg/plugin.py": "",
        "notapkg/loose.py": "import pkg\n",
    })
    full = import_graph(tmp_path, packages=("pkg", "notapkg"))
    assert set(full) == {"pkg", "pkg.sub", "pkg.sub.low", "pkg.sub.util", "pkg.high", "pkg.other", "pkg.plugin"}
    # relative imports resolved; TYPE_CHECKING's body skipped but its else branch kept; function-level counted;
    # implicit parents of what is imported and of the module itself added
    assert full["pkg.sub.low"] == {"pkg.sub.util", "pkg.other", "pkg.high", "pkg.sub", "pkg"}
    # ``from pkg.sub import util, missing_attr``: the submodule, and the package for the attribute
    assert full["pkg.high"] == {"pkg.sub.low", "pkg.sub.util", "pkg.sub", "pkg"}
    assert full["pkg.other"] == {"pkg.plugin", "pkg"}  # import by a literal name
    assert import_graph(tmp_path, packages=("pkg",), dynamic=False)["pkg.other"] == {"pkg"}
    assert import_graph(tmp_path, packages=("pkg",), implicit_parents=False)["pkg.sub.low"] == {
        "pkg.sub.util", "pkg.other", "pkg.high"}

    # between packages: pkg.high and pkg.sub import each other (through pkg.sub.low)
    assert collapse(full, depth=2)["pkg.high"] == {"pkg.sub", "pkg"}

    # closure includes the start module
    assert closure(full, "pkg.plugin") == {"pkg.plugin", "pkg", "pkg.sub.low", "pkg.sub.util", "pkg.other",
                                           "pkg.high", "pkg.sub"}
    assert closure({"a": set()}, "a") == {"a"}

    # the cycle rule: the real cycle only, not pkg <-> pkg.sub.low through the re-export
    found = [format_cycle(c) for c in cycles(cycle_graph(tmp_path, "pkg"))]
    assert found == ["pkg.high -> pkg.sub.low -> pkg.high"]
    # with a module's own packages counted, the harmless package/child cycle shows up as well
    assert ["pkg", "pkg.sub.low"] in cycles(import_graph(tmp_path, packages=("pkg",)))

    # the TYPE_CHECKING import alone makes no cycle: drop the function-level one and none is left
    low = tmp_path / "pkg/sub/low.py"
    low.write_text(low.read_text().replace("from ..high import High  # function-level", "High = None  #"))
    assert cycles(cycle_graph(tmp_path, "pkg")) == []


def test_distiller_satisfies_the_engine_protocol():
    """The loop trains a :class:`~pipeline.engine.trainable.Trainable`; every method's base class is one."""
    from torch import nn

    from pipeline.distill.base import Distiller, Vanilla
    from pipeline.engine.trainable import Trainable

    assert isinstance(Vanilla(nn.Linear(2, 2)), Trainable)
    members = [n for n in vars(Trainable) if not n.startswith("_") or n == "__call__"]
    missing = [n for n in members if callable(getattr(Trainable, n)) and not hasattr(Distiller, n)]
    assert not missing
