"""The registry's lookup error, shared by the registered families and timm name resolution."""

from __future__ import annotations

import difflib

from pipeline.errors import UserError


class UnknownModelError(UserError, KeyError, ValueError):
    """A model name that is not registered.

    It is a ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad config value),
    so callers can catch either. The message names the bad name and lists the
    allowed ones.
    """

    def __init__(self, name: str, allowed: list[str], message: str | None = None) -> None:
        self.name = name
        self.allowed = allowed
        if message is None:
            close = difflib.get_close_matches(name, allowed, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            message = f"unknown model {name!r}{hint}; available models: {', '.join(allowed)}"
        self.message = message
        super().__init__(self.message)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return self.message

    def __reduce__(self) -> tuple[type[UnknownModelError], tuple[str, list[str], str]]:
        # Rebuild from (name, allowed, message), so the error survives pickling (worker processes).
        return (type(self), (self.name, self.allowed, self.message))
