"""The stage DAG of a workspace's ``dvc.yaml``: order, upstream stages, what needs to run, which run alone.

DVC's own graph (``Repo.index.graph``) is the source; edges point from a stage to the
stages it depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.orchestrate.repo import open_repo

#: ``meta: {kdpipe: {exclusive: true}}`` on a stage in dvc.yaml: it runs with no other stage beside it
#: (the benchmark: latencies measured next to a training run would measure the training run).
EXCLUSIVE_META = ("kdpipe", "exclusive")


@dataclass(frozen=True)
class StageGraph:
    """The stages to consider, in dependency order, with each one's direct upstream stages among them."""

    order: list[str]
    upstream: dict[str, list[str]]
    exclusive: frozenset[str]

    def downstream_of(self, stage: str) -> set[str]:
        """Every stage that depends on ``stage``, directly or not."""
        out: set[str] = set()
        frontier = [stage]
        while frontier:
            s = frontier.pop()
            for other, ups in self.upstream.items():
                if s in ups and other not in out:
                    out.add(other)
                    frontier.append(other)
        return out


def _meta_flag(stage, keys: Sequence[str]) -> bool:  # noqa: ANN001 - a dvc Stage
    node = getattr(stage, "meta", None) or {}
    for k in keys:
        if not isinstance(node, dict):
            return False
        node = node.get(k)
    return bool(node)


def stage_graph(root: Path, targets: Sequence[str] | None = None) -> StageGraph:
    """The DAG of ``root``'s dvc.yaml; with ``targets``, only those stages and what they depend on.

    Raises ValueError naming an unknown target and the stages there are.
    """
    import networkx as nx

    with open_repo(root) as repo:
        graph = repo.index.graph
        by_name = {s.addressing: s for s in graph.nodes}
        if targets:
            unknown = [t for t in targets if t not in by_name]
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}; stages of {root / 'dvc.yaml'}: {sorted(by_name)}")
            keep: set = set()
            for t in targets:
                keep |= nx.descendants(graph, by_name[t]) | {by_name[t]}
            graph = graph.subgraph(keep)
        order = [s.addressing for s in
                 nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: s.addressing)]
        upstream = {s.addressing: sorted(d.addressing for d in graph.successors(s)) for s in graph.nodes}
        exclusive = frozenset(s.addressing for s in graph.nodes if _meta_flag(s, EXCLUSIVE_META))
    return StageGraph(order, upstream, exclusive)


def stage_order(root: Path, targets: Sequence[str] | None = None) -> list[str]:
    """Stage names of the workspace's dvc.yaml in an order where every stage follows its dependencies."""
    return stage_graph(root, targets).order


def stages_to_run(root: Path, graph: StageGraph) -> set[str]:
    """Which stages of ``graph`` DVC would run: those it reports changed, and everything downstream of them."""
    with open_repo(root) as repo:
        changed = set(repo.status()) & set(graph.order)  # the whole repository at once: 5x faster than per target
    todo = set(changed)
    for name in changed:
        todo |= graph.downstream_of(name)
    return todo
