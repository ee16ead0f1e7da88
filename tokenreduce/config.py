"""YAML pipeline configuration: parsing, validation with line numbers, JSON schema.

The format (kept stable; docs and tools rely on it)::

    pipeline:
      - {stage: projector, reducer: apet, budget: 64, params: {basis_tokens: 10}}
      - {stage: llm_layer, layer: 16, reducer: apet, budget: 32}
    positions: compact          # optional: compact | original (default: the adapter's)
    video_budget: per_frame     # optional: per_frame | per_video

``budget`` is an int >= 1 (absolute) or a float in (0, 1] (ratio of the tokens present).

Strict on purpose (a typo must never become a silent setting): unknown keys, duplicate
keys, booleans where numbers belong (``budget: yes``, ``layer: true``), quoted numbers
and non-UTF-8 files are errors that name the file, line and field.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from .budget import check_budget
from .errors import ConfigError, StageError, TokenReduceError, UnknownNameError, did_you_mean
from .params import FIELD_CUTOFF, format_validation_error
from .pipeline import Pipeline, Positions, Step, VideoBudget
from .registry import get_registry
from .stages import Stage


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
    reducer = cls(cfg.budget, stage=cfg.stage, **cfg.params)
    return Step(cfg.stage, reducer, cfg.layer)


def _field_names(loc: tuple) -> Any:
    """The keys allowed where an unknown key ``loc`` was found (for "did you mean")."""
    if len(loc) == 1:
        return PipelineConfig.model_fields
    if len(loc) == 3 and loc[0] == "pipeline":
        return StepConfig.model_fields
    return None


def _pydantic_lines(err: ValidationError, source: str, root: yaml.Node | None) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        extra = e["type"] == "extra_forbidden"
        hint = did_you_mean(loc[-1], _field_names(loc) or (), cutoff=FIELD_CUTOFF) if extra and loc else ""
        # A validator's own ValueError reads "Value error, ..." in pydantic; its text is enough.
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        lines.append(f"{_where(source, root, loc, at_key=extra)}: {msg}{got}{'.' if hint else ''}{hint}")
    return lines


def parse_config(data: Any, source: str = "<config>", root: yaml.Node | None = None) -> Pipeline:
    """Validate a parsed YAML/JSON mapping and build the :class:`Pipeline`.

    Raises :class:`ConfigError` with ``file:line:col: field.path: message`` lines.
    """
    if not isinstance(data, dict):
        what = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"invalid pipeline config:\n{_where(source, root, ())}: the top level must be a mapping with a "
            f"'pipeline' list of steps, got {what}"
        )
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(_pydantic_lines(err, source, root))) from None
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


def _read(path: Path) -> str:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    return _decode(raw, str(path))


def load_config(path: str | os.PathLike[str]) -> Pipeline:
    """Load and validate a YAML pipeline file."""
    path = Path(path)
    return loads_config(_read(path), source=str(path))


def _yaml_error(err: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    text = "; ".join(p for p in (context, problem) if p) if problem else str(err)
    if "\\t" in text or "\t" in text:  # PyYAML writes the tab escaped
        text += " (YAML indents with spaces, not tabs)"
    return ConfigError(f"{where}: not valid YAML: {text}")


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


def _load(text: str, source: str) -> tuple[Pipeline, yaml.Node | None]:
    """The pipeline and the YAML node tree (for pointing later errors at lines)."""
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
    return parse_config(data, source, root), root


def loads_config(text: str, source: str = "<string>") -> Pipeline:
    """Load and validate a YAML pipeline from a string."""
    return _load(text, source)[0]


# -- validation without a model ----------------------------------------------------------------


def validate_config(path: str | os.PathLike[str]) -> Pipeline:
    """What ``tokenreduce validate`` checks: every check of ``tokenreduce run`` that needs no model.

    The file is loaded exactly as ``run`` loads it (:func:`load_config`: YAML, fields,
    reducer parameters, the step rules of :class:`~tokenreduce.pipeline.Step`, e.g. a
    previous-layer attention reducer at layer 0). Then each step runs once, in order, on
    the seeded synthetic workload of ``tokenreduce run --synthetic`` (576 tokens, a 24x24
    grid, a stand-in context), so the reducer's own rules on its budget and parameters
    (e.g. ApET's ``basis_tokens`` < the tokens kept) are checked by the reducer's code.
    What needs the model (its layer count, its adapter) is checked by ``run``.
    """
    path = Path(path)
    pipe, root = _load(_read(path), str(path))
    _trial_run(pipe, str(path), root)
    return pipe


def _trial_run(pipe: Pipeline, source: str, root: yaml.Node | None) -> None:
    from .reducer import observe
    from .runner import run_synthetic

    called: list[int] = []
    with observe(lambda reducer, *_: called.append(id(reducer))):
        try:
            run_synthetic(pipe)
        except Exception as err:  # noqa: BLE001 - any failure is reported against its step
            i = next((j for j, s in enumerate(pipe.steps) if id(s.reducer) not in called), len(pipe.steps) - 1)
            step = pipe.steps[i]
            kind = "" if isinstance(err, TokenReduceError) else f"{type(err).__name__} (a bug in the reducer): "
            raise ConfigError(
                f"invalid pipeline config:\n{_where(source, root, ('pipeline', i))}: step {i} "
                f"({step.reducer.name} at {step.stage.value}) fails on the synthetic workload of "
                f"`tokenreduce run --synthetic` (no model needed): {kind}{err}"
            ) from None


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


__all__ = [
    "PipelineConfig",
    "StepConfig",
    "format_validation_error",
    "json_schema",
    "load_config",
    "loads_config",
    "parse_config",
    "validate_config",
]
