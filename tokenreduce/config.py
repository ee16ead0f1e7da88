"""YAML pipeline configuration: parsing, validation with line numbers, JSON schema.

The format (kept stable; docs and tools rely on it)::

    pipeline:
      - {stage: projector, reducer: apet, budget: 64, params: {basis_tokens: 10}}
      - {stage: llm_layer, layer: 16, reducer: apet, budget: 32}
    positions: compact          # optional: compact | original (default: the adapter's)
    video_budget: per_frame     # optional: per_frame | per_video
    fast: false                 # optional: the fast execution path (same kept tokens)

``budget`` is an int >= 1 (absolute) or a float in (0, 1] (ratio of the tokens present).

Strict on purpose (a typo must never become a silent setting): unknown keys, duplicate
keys, booleans where numbers belong (``budget: yes``, ``layer: true``), quoted numbers
and non-UTF-8 files are errors that name the file, line and field.

Where things live (all of them importable from here): the format (schema, strict reading)
is :mod:`tokenreduce.config_format`, building the pipeline from it is
:mod:`tokenreduce.pipeline` (so that ``Pipeline.coerce`` takes a file); this module adds
what needs more: :func:`validate_config` (a trial run) and :func:`json_schema` (the registry).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, create_model

from .config_format import PipelineConfig, StepConfig, read_file, where
from .errors import ConfigError, TokenReduceError
from .params import format_validation_error
from .pipeline import Pipeline, load_config, load_with_nodes, loads_config, parse_config
from .reducer import observe
from .registry import get_registry
from .runner import run_synthetic


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
    pipe, root = load_with_nodes(read_file(path), str(path))
    _trial_run(pipe, str(path), root)
    return pipe


def _trial_run(pipe: Pipeline, source: str, root: yaml.Node | None) -> None:
    called: list[int] = []
    with observe(lambda reducer, *_: called.append(id(reducer))):
        try:
            run_synthetic(pipe)
        except Exception as err:  # noqa: BLE001 - any failure is reported against its step
            i = next((j for j, s in enumerate(pipe.steps) if id(s.reducer) not in called), len(pipe.steps) - 1)
            step = pipe.steps[i]
            kind = "" if isinstance(err, TokenReduceError) else f"{type(err).__name__} (a bug in the reducer): "
            raise ConfigError(
                f"invalid pipeline config:\n{where(source, root, ('pipeline', i))}: step {i} "
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
