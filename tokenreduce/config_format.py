"""The YAML pipeline format, apart from building the pipeline: its pydantic schema, strict reading, error places.

* :class:`StepConfig` / :class:`PipelineConfig`: the fields of a file (their JSON schema,
  with each reducer's parameters, is :func:`tokenreduce.config.json_schema`).
* :func:`read_file` / :func:`read_yaml`: UTF-8 text and YAML, strictly (duplicate keys,
  bad bytes and YAML errors are :class:`~tokenreduce.errors.ConfigError` s naming the line).
* :func:`where` / :func:`pydantic_lines`: ``file:line:col: field.path`` for an error.

Building a :class:`~tokenreduce.pipeline.Pipeline` from this (reducers by name from the
registry) is :func:`tokenreduce.pipeline.parse_config`; this module knows no pipeline, so
that :mod:`tokenreduce.pipeline` can load YAML without an import cycle.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .budget import check_budget
from .errors import ConfigError, did_you_mean
from .params import FIELD_CUTOFF
from .stages import Stage

#: ``compact`` renumbers the shortened sequence, ``original`` keeps the kept tokens' position ids.
Positions = Literal["compact", "original"]
#: For videos, whether a step's budget is per frame or per whole video.
VideoBudget = Literal["per_frame", "per_video"]


def _yaml_budget(value: Any) -> Any:
    """The budget rules of the Python API (:func:`~tokenreduce.budget.check_budget`), minus callables."""
    if callable(value):
        raise ValueError("a budget in a config is a number: an int >= 1 (tokens to keep) or a ratio in (0, 1]")
    return check_budget(value)  # raises InvalidInputError, a ValueError, stating the rule


class StepConfig(BaseModel):
    """One step of a pipeline as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage = Field(description="Hook point: vision_encoder, projector or llm_layer.")
    reducer: str = Field(description="Registered reducer name (see `tokenreduce list`).")
    # The budget rules run before pydantic's int/float coercion, which would read
    # ``budget: yes`` as 1 and ``budget: "64"`` as 64.
    budget: Annotated[Union[int, float], BeforeValidator(_yaml_budget)] = Field(  # noqa: UP007
        description="Tokens to keep: an int >= 1, or a float in (0, 1] as a ratio of the tokens present."
    )
    # Strict: ``layer: true`` would otherwise mean layer 1, and ``layer: 2.0`` layer 2.
    layer: int | None = Field(default=None, ge=0, strict=True, description="Decoder layer index (llm_layer steps only).")
    params: dict[str, Any] = Field(default_factory=dict, description="Reducer parameters.")


class PipelineConfig(BaseModel):
    """A whole YAML file."""

    model_config = ConfigDict(extra="forbid")

    pipeline: list[StepConfig] = Field(min_length=1, description="Reducer steps, applied in model order.")
    positions: Positions | None = Field(
        default=None, description="compact (renumber) or original (keep position ids); default: the adapter's."
    )
    video_budget: VideoBudget = Field(default="per_frame", description="Budget per video frame or per whole video.")
    fast: bool = Field(default=False, strict=True, description="Opt into the fast execution path (same kept tokens).")


# -- error places -------------------------------------------------------------------------------


def _locate(node: yaml.Node | None, path: tuple, at_key: bool = False) -> yaml.Node | None:
    """The deepest YAML node along ``path`` (keys and list indices).

    With ``at_key`` the last mapping step yields the key node (for "unknown key" errors).
    """
    found = node
    for i, part in enumerate(path):
        if isinstance(found, yaml.MappingNode):
            want_key = at_key and i == len(path) - 1
            nxt = next(((k if want_key else v) for k, v in found.value if k.value == str(part)), None)
        elif isinstance(found, yaml.SequenceNode) and isinstance(part, int) and part < len(found.value):
            nxt = found.value[part]
        else:
            nxt = None
        if nxt is None:
            break
        found = nxt
    return found


def where(source: str, root: yaml.Node | None, path: tuple, at_key: bool = False) -> str:
    node = _locate(root, path, at_key)
    dotted = ".".join(str(p) for p in path) or "(root)"
    if node is None:
        return f"{source}: {dotted}"
    mark = node.start_mark
    return f"{source}:{mark.line + 1}:{mark.column + 1}: {dotted}"


def _field_names(loc: tuple) -> Any:
    """The keys allowed where an unknown key ``loc`` was found (for "did you mean")."""
    if len(loc) == 1:
        return PipelineConfig.model_fields
    if len(loc) == 3 and loc[0] == "pipeline":
        return StepConfig.model_fields
    return None


def pydantic_lines(err: ValidationError, source: str, root: yaml.Node | None) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        extra = e["type"] == "extra_forbidden"
        hint = did_you_mean(loc[-1], _field_names(loc) or (), cutoff=FIELD_CUTOFF) if extra and loc else ""
        # A validator's own ValueError reads "Value error, ..." in pydantic; its text is enough.
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        lines.append(f"{where(source, root, loc, at_key=extra)}: {msg}{got}{'.' if hint else ''}{hint}")
    return lines


# -- reading ---------------------------------------------------------------------------------------


def _decode(raw: bytes, source: str) -> str:
    """UTF-8 text (a UTF-8 or UTF-16 byte-order mark is honoured); anything else is a ConfigError."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        bad = raw[err.start : err.end].hex(" ")
        raise ConfigError(
            f"{source}:{line}:{col}: the file is not UTF-8 text (byte {bad}); save it as UTF-8"
        ) from None


def read_file(path: Path) -> str:
    """The text of a config file (UTF-8, or UTF-16 with a byte-order mark); a ConfigError otherwise."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    return _decode(raw, str(path))


def _yaml_error(err: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    place = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    text = "; ".join(p for p in (context, problem) if p) if problem else str(err)
    if "\\t" in text or "\t" in text:  # PyYAML writes the tab escaped
        text += " (YAML indents with spaces, not tabs)"
    return ConfigError(f"{place}: not valid YAML: {text}")


def _duplicate_keys(root: yaml.Node | None, source: str) -> list[str]:
    """``file:line:col: path: duplicate key`` for every key repeated in one mapping.

    PyYAML keeps the last value silently; here a repeated key is an error. Merge keys
    (``<<: *defaults``) may be overridden, as YAML intends.
    """
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, path: tuple) -> None:
        if id(node) in seen_nodes:  # aliases point at nodes already visited
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    continue
                ident = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else None
                if ident is not None and ident in first:
                    line = first[ident].start_mark.line + 1
                    dotted = ".".join(str(p) for p in (*path, key.value))
                    m = key.start_mark
                    problems.append(
                        f"{source}:{m.line + 1}:{m.column + 1}: {dotted}: duplicate key {key.value!r} "
                        f"(first given on line {line}); give each key once"
                    )
                elif ident is not None:
                    first[ident] = key
                walk(value, (*path, key.value if isinstance(key, yaml.ScalarNode) else "?"))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return problems


def read_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The parsed YAML and its node tree (for pointing later errors at lines); strict about duplicate keys."""
    try:
        # Composed once for locating errors (constructing a mapping rewrites merge keys in
        # place), and parsed again for the values.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise _yaml_error(err, source) from None
    duplicates = _duplicate_keys(root, source)
    if duplicates:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(duplicates))
    return data, root


__all__ = [
    "PipelineConfig",
    "Positions",
    "StepConfig",
    "VideoBudget",
    "pydantic_lines",
    "read_file",
    "read_yaml",
    "where",
]
