"""Descriptions of parameter models for the CLI and the docs (generated, never hand-copied)."""

from __future__ import annotations

import types
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``list[StepConfig]``; a ``Literal`` shows its values' type
    (the values themselves go in the range column)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(dict.fromkeys(type(a).__name__ for a in args))
    if origin is Union or origin is types.UnionType:
        return " | ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is not None and args:
        return f"{_type_name(origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _range(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    choices = _choices(field.annotation)
    if choices:
        parts.append(" | ".join(choices))
    return ", ".join(parts)


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a ``Literal`` or ``Enum`` annotation, also inside ``Optional``."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(m.value) for m in annotation]
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    if get_origin(annotation) in (Union, types.UnionType):
        return [c for a in get_args(annotation) for c in _choices(a)]
    return []


def params_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str, str]]:
    """``(name, type, default, range, description)`` for each field of a parameter model."""
    rows = []
    for name, field in model.model_fields.items():
        if field.default_factory is not None:  # its ``default`` is PydanticUndefined too
            shown = repr(field.default_factory())
        elif field.default is PydanticUndefined:
            shown = "(required)"
        else:
            shown = repr(field.default)
        rows.append((name, _type_name(field.annotation), shown, _range(field), field.description or ""))
    return rows
