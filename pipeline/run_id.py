"""Which run a stage trains or reads, and where that run's outs live: no code beyond paths.

Deployment and report code name runs by :class:`RunId` without importing the training
stack (:mod:`pipeline.runs` re-exports it for the stages that train).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunId:
    """Which run: the teacher, a student alone (baseline) or a student distilled by a method.

    ``distill`` runs an offline method (frozen teacher), ``online`` an online one (networks
    trained together from scratch, no teacher stage); both are keyed ``<method>/<student>``
    (method names are unique across both kinds).
    """

    role: str  # "teacher" | "baseline" | "distill" | "online"
    student: str | None = None
    method: str | None = None

    @property
    def key(self) -> str:
        if self.role == "teacher":
            return "teacher"
        if self.role == "baseline":
            return f"baseline/{self.student}"
        return f"{self.method}/{self.student}"

    @property
    def arch(self) -> str:
        return str(self.student)

    def out_dir(self, root: Path) -> Path:
        return root / "runs" / self.key

    def live_dir(self, root: Path) -> Path:
        return root / "live" / self.key

    def metrics_file(self, root: Path) -> Path:
        return root / "metrics" / f"{self.key}.json"

    def plot_file(self, root: Path, kind: str) -> Path:
        return root / "plots" / kind / f"{self.key}.json"
