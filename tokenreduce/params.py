"""Base of every reducer's pydantic parameter model."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError, did_you_mean


# Field names are short and share prefixes (basis_tokens, basis_blend, basis_order): only a
# close spelling is worth suggesting.
FIELD_CUTOFF = 0.7


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits ``True``/``False`` (``bool``, ``Any``, a ``Literal[True]``, a union of those)."""
    if annotation is bool or annotation is Any or annotation is object:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(a, bool) for a in args)
    return any(_accepts_bool(a) for a in args)


class ReducerParams(BaseModel):
    """Parameters of a reducer. Subclass it and declare fields with ``Field(description=...)``.

    Unknown keys are errors (``extra="forbid"``): a typo in a YAML file must not be
    silently ignored. Instances are frozen so a reducer's configuration cannot drift.
    ``True``/``False`` are refused for fields that are not booleans: pydantic would read
    ``basis_tokens: true`` as 1 (YAML ``yes`` too), a silent wrong setting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not _accepts_bool(field.annotation):
                raise ValueError(f"a boolean is not allowed here; give a value of type {_type_name(field.annotation)}")
        return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _message(e: dict) -> str:
    # A validator's own ValueError reads "Value error, ..." in pydantic; the text is enough.
    if e["type"] == "value_error" and "error" in e.get("ctx", {}):
        return str(e["ctx"]["error"])
    return e["msg"]


def format_validation_error(err: ValidationError, prefix: str = "", fields: Any = None) -> str:
    """One line per problem: ``field.path: message (got value)``.

    ``fields``: the names a misspelt (unknown) key is compared with for a "did you mean".
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        got = e.get("input")
        shown = "" if e["type"] == "missing" else f" (got {got!r})"
        hint = ""
        if fields is not None and e["type"] == "extra_forbidden" and e["loc"]:
            hint = did_you_mean(e["loc"][-1], fields, cutoff=FIELD_CUTOFF)
        lines.append(f"{loc or '(root)'}: {_message(e)}{shown}{'.' if hint else ''}{hint}")
    return "\n".join(lines)


def build_params(model: type[ReducerParams], values: dict, owner: str) -> ReducerParams:
    try:
        return model(**values)
    except ValidationError as err:
        msg = format_validation_error(err, fields=model.model_fields)
        raise ConfigError(f"invalid parameters for reducer {owner!r}:\n{msg}") from None
