"""The evaluate stage's test metrics of a workspace, one row per run (``kdpipe results``, the flows' table).

Reads ``metrics/<run>.json`` as the evaluate stage wrote them; no torch, no Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path


def collect_results(root: Path = Path(".")) -> list[dict]:
    """Every evaluated run of a workspace as one row: run id plus its test metrics."""
    rows = []
    base = root / "metrics"
    for f in sorted(base.rglob("*.json")):
        key = f.relative_to(base).with_suffix("").as_posix()
        rows.append({"run": key, **json.loads(f.read_text())})
    return rows
