"""Descriptions of parameter models for the CLI and the docs (generated, never hand-copied)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _range(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    args = getattr(field.annotation, "__args__", ())
    literals = [a for a in args if isinstance(a, str)]
    if literals:
        parts.append(" | ".join(literals))
    return ", ".join(parts)


def params_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str, str]]:
    """``(name, type, default, range, description)`` for each field of a parameter model."""
    rows = []
    for name, field in model.model_fields.items():
        default = field.default
        if default is PydanticUndefined:
            shown = "(required)"
        elif field.default_factory is not None:
            shown = repr(field.default_factory())
        else:
            shown = repr(default)
        rows.append((name, _type_name(field.annotation), shown, _range(field), field.description or ""))
    return rows
