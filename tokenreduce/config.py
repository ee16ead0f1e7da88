"""YAML pipeline configuration: parsing, validation with line numbers, JSON schema.

The format (kept stable; docs and tools rely on it)::

    pipeline:
      - {stage: projector, reducer: apet, budget: 64, params: {basis_tokens: 10}}
      - {stage: llm_layer, layer: 16, reducer: apet, budget: 32}
    positions: compact          # optional: compact | original (default: the adapter's)
    video_budget: per_frame     # optional: per_frame | per_video

``budget`` is an int >= 1 (absolute) or a float in (0, 1] (ratio of the tokens present).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import ConfigError, StageError, UnknownNameError
from .params import format_validation_error
from .pipeline import Pipeline, Positions, Step, VideoBudget
from .registry import get_registry
from .stages import Stage


class StepConfig(BaseModel):
    """One step of a pipeline as written in YAML."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage = Field(description="Hook point: vision_encoder, projector or llm_layer.")
    reducer: str = Field(description="Registered reducer name (see `tokenreduce list`).")
    budget: Union[int, float] = Field(  # noqa: UP007 - pydantic reads the union literally
        description="Tokens to keep: an int >= 1, or a float in (0, 1] as a ratio of the tokens present."
    )
    layer: int | None = Field(default=None, ge=0, description="Decoder layer index (llm_layer steps only).")
    params: dict[str, Any] = Field(default_factory=dict, description="Reducer parameters.")


class PipelineConfig(BaseModel):
    """A whole YAML file."""

    model_config = ConfigDict(extra="forbid")

    pipeline: list[StepConfig] = Field(min_length=1, description="Reducer steps, applied in model order.")
    positions: Positions | None = Field(
        default=None, description="compact (renumber) or original (keep position ids); default: the adapter's."
    )
    video_budget: VideoBudget = Field(default="per_frame", description="Budget per video frame or per whole video.")


# -- loading ---------------------------------------------------------------------------------


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


def _where(source: str, root: yaml.Node | None, path: tuple, at_key: bool = False) -> str:
    node = _locate(root, path, at_key)
    dotted = ".".join(str(p) for p in path) or "(root)"
    if node is None:
        return f"{source}: {dotted}"
    mark = node.start_mark
    return f"{source}:{mark.line + 1}:{mark.column + 1}: {dotted}"


def _build_step(cfg: StepConfig) -> Step:
    cls = get_registry().reducer_class(cfg.reducer)
    if cfg.budget is True or cfg.budget is False:  # pragma: no cover - pydantic turns YAML bools into ints
        raise ConfigError("budget must be a number")
    reducer = cls(cfg.budget, stage=cfg.stage, **cfg.params)
    return Step(cfg.stage, reducer, cfg.layer)


def parse_config(data: Any, source: str = "<config>", root: yaml.Node | None = None) -> Pipeline:
    """Validate a parsed YAML/JSON mapping and build the :class:`Pipeline`.

    Raises :class:`ConfigError` with ``file:line:col: field.path: message`` lines.
    """
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
            where = _where(source, root, tuple(e["loc"]), at_key=e["type"] == "extra_forbidden")
            lines.append(f"{where}: {e['msg']}{got}")
        raise ConfigError("invalid pipeline config:\n" + "\n".join(lines)) from None
    steps, problems = [], []
    for i, step_cfg in enumerate(cfg.pipeline):
        base = ("pipeline", i)
        try:
            steps.append(_build_step(step_cfg))
        except UnknownNameError as err:
            problems.append(f"{_where(source, root, base + ('reducer',))}: {err}")
        except StageError as err:
            problems.append(f"{_where(source, root, base + ('stage',))}: {err}")
        except ConfigError as err:
            msg = str(err)
            if msg.startswith("invalid parameters"):
                # Point at the first parameter the message names, else at params.
                named = [p for p in step_cfg.params if f"\n{p}:" in msg]
                path = base + (("params", named[0]) if named else ("params",))
                problems.append(f"{_where(source, root, path, at_key=bool(named))}: {msg}")
            else:  # the step's own rules (layer)
                problems.append(f"{_where(source, root, base + ('layer',))}: {msg}")
        except ValueError as err:  # budget range and similar
            problems.append(f"{_where(source, root, base + ('budget',))}: {err}")
    if problems:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(problems))
    try:
        return Pipeline(steps, positions=cfg.positions, video_budget=cfg.video_budget)
    except ConfigError as err:
        raise ConfigError(f"{_where(source, root, ('pipeline',))}: {err}") from None


def load_config(path: str | os.PathLike[str]) -> Pipeline:
    """Load and validate a YAML pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return loads_config(path.read_text(), source=str(path))


def loads_config(text: str, source: str = "<string>") -> Pipeline:
    """Load and validate a YAML pipeline from a string."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    return parse_config(data, source, root)


# -- JSON schema -----------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """JSON schema of the YAML format, with each registered reducer's parameters.

    Each reducer contributes one step variant (``reducer`` fixed to its name, ``stage``
    restricted to its stages, ``params`` its own model), so editors complete and check
    parameters per reducer.
    """
    variants = []
    for name, entry in sorted(get_registry().reducers.items()):
        cls = entry.cls
        stages = tuple(sorted(s.value for s in cls.stages))
        model = create_model(
            f"Step_{name.replace('-', '_')}",
            __base__=StepConfig,
            __doc__=f"{name}: {cls.summary()}",
            stage=(Literal[stages], Field(description="Hook point; this reducer supports: " + ", ".join(stages))),
            reducer=(Literal[name], Field(description=cls.summary())),
            params=(cls.Params, Field(default_factory=cls.Params, description=f"Parameters of {name}.")),
        )
        variants.append(model)
    step_type = Union[tuple(variants)] if variants else StepConfig  # type: ignore[valid-type]
    schema_model = create_model(
        "TokenReducePipeline",
        __base__=PipelineConfig,
        pipeline=(list[step_type], Field(min_length=1, description="Reducer steps.")),  # type: ignore[valid-type]
    )
    schema = schema_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tokenreduce pipeline"
    return schema


__all__ = ["PipelineConfig", "StepConfig", "format_validation_error", "json_schema", "load_config", "loads_config", "parse_config"]
