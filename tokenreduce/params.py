"""Base of every reducer's pydantic parameter model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class ReducerParams(BaseModel):
    """Parameters of a reducer. Subclass it and declare fields with ``Field(description=...)``.

    Unknown keys are errors (``extra="forbid"``): a typo in a YAML file must not be
    silently ignored. Instances are frozen so a reducer's configuration cannot drift.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        got = e.get("input")
        shown = "" if e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{loc or '(root)'}: {e['msg']}{shown}")
    return "\n".join(lines)


def build_params(model: type[ReducerParams], values: dict, owner: str) -> ReducerParams:
    try:
        return model(**values)
    except ValidationError as err:
        raise ConfigError(f"invalid parameters for reducer {owner!r}:\n{format_validation_error(err)}") from None
