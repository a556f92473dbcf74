"""The ``distill`` and ``online`` sections: which methods run, and each method's own params.

A method declares its params schema in its own module and registers it with the method
(:func:`pipeline.distill.registry.register_method`); :func:`methods_section` builds the
section from those schemas, so a new method needs no change here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model, field_validator

from pipeline.config.base import Strict, check_method_list


def methods_section(name: str, schemas: dict[str, type[BaseModel]], default: list[str], doc: str) -> type[Strict]:
    """A params section ``name``: ``methods`` (a list of the names in ``schemas``) and one field per method."""
    allowed = tuple(schemas)
    kind = "online method" if name == "online" else "method"
    bad = [m for m in default if m not in allowed]
    if bad:
        raise ValueError(f"default {name}.methods {bad} are not registered methods: {', '.join(allowed)}")

    def known(cls: type, v: list[str]) -> list[str]:
        return check_method_list(v, allowed, kind)

    fields: dict[str, Any] = {"methods": (list[str], Field(default_factory=lambda: list(default)))}
    fields.update({method: (schema, Field(default_factory=schema)) for method, schema in schemas.items()})
    section = create_model(  # type: ignore[call-overload]
        f"{name.capitalize()}Config", __base__=Strict, __doc__=doc, __module__=__name__,
        __validators__={"_known": field_validator("methods")(classmethod(known))}, **fields,
    )
    return section
