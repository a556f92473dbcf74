"""Listing patterns for model names, shared by the registry's and timm's listings."""

from __future__ import annotations

import fnmatch


def matches(name: str, pattern: str | None) -> bool:
    """Whether a model name matches a listing pattern: a glob (``mobileone_s*``), else a substring."""
    if not pattern:
        return True
    return fnmatch.fnmatchcase(name, pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
