"""A pipeline: the ordered reducer steps applied to a model, and how one is built from YAML.

Building a pipeline from YAML lives here because :meth:`Pipeline.coerce` accepts a file
and the YAML loader returns a :class:`Pipeline`: in two modules they would import each
other. The format itself (schema, strict reading, error places) is
:mod:`tokenreduce.config_format`; :mod:`tokenreduce.config` is the public face of both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config_format import (
    PipelineConfig,
    Positions,
    StepConfig,
    VideoBudget,
    pydantic_lines,
    read_file,
    read_yaml,
    where,
)
from .errors import ConfigError, StageError, UnknownNameError
from .reducer import Reducer
from .registry import get_registry
from .requirements import DECODER_QK_FIELDS, Requirement, decoder_reads
from .stages import Stage


# Context fields an llm_layer step can only get from a decoder layer's queries and keys.
DECODER_QK_CONTEXT = DECODER_QK_FIELDS


def _requires(reducer: Reducer) -> tuple[Requirement, ...]:
    """The reducer's requirements; a malformed per-instance declaration is a ConfigError."""
    try:
        reqs = tuple(reducer.requires)
    except (TypeError, ValueError) as err:  # e.g. an instance's own attention_query="bogus"
        raise ConfigError(f"reducer {reducer.name!r}: {err}") from None
    bad = [r for r in reqs if not isinstance(r, Requirement)]
    if bad:
        raise ConfigError(f"reducer {reducer.name!r}: requires holds Requirement objects, not {bad[0]!r}")
    return reqs


def reads_decoder_qk(reducer: Reducer) -> bool:
    """Whether an ``llm_layer`` step of ``reducer`` reads a decoder layer's q/k (attention rows or keys)."""
    return any(r.reads_decoder_qk for r in _requires(reducer))


def check_decoder_step(reducer: Reducer, layer: int) -> None:
    """The rules of an ``llm_layer`` step that hold for every model (the layer count needs one).

    Part of building every :class:`Step`, so ``tokenreduce validate`` and ``tokenreduce run``
    reject the same steps; the decoder adapter checks the layer range once it has the model.
    """
    reqs = _requires(reducer)
    if not any(r.reads_decoder_qk for r in reqs):
        return
    try:
        _, read_layer = decoder_reads(reqs)
    except ValueError as err:
        raise ConfigError(f"reducer {reducer.name!r}: {err}") from None
    if read_layer == "previous" and layer == 0:
        raise ConfigError(
            f"reducer {reducer.name!r} reads the attention of the previous layer, so its layer must be >= 1, got layer=0"
        )


@dataclass
class Step:
    """One reducer at one stage (and, for ``llm_layer``, one decoder layer)."""

    stage: Stage
    reducer: Reducer
    layer: int | None = None

    def __post_init__(self) -> None:
        self.stage = type(self.reducer)._check_stage(self.stage)
        if self.reducer.stage is None:
            self.reducer.stage = self.stage
        elif self.reducer.stage != self.stage:
            raise ConfigError(
                f"reducer {self.reducer.name!r} was built for stage {self.reducer.stage.value!r} "
                f"but the step is at stage {self.stage.value!r}"
            )
        if self.reducer.budget is None:
            raise ConfigError(f"step {self.reducer.name!r} at {self.stage.value} has no budget")
        if self.stage is Stage.LLM_LAYER:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
                raise ConfigError(f"an llm_layer step needs layer >= 0 (an int), got layer={self.layer!r}")
            check_decoder_step(self.reducer, self.layer)
        elif self.layer is not None:
            raise ConfigError(f"layer={self.layer} is only allowed at stage llm_layer, not {self.stage.value}")


@dataclass
class Pipeline:
    """Ordered steps plus model-level options.

    Attributes:
        steps: the reducer steps. At most one step per encoder-side stage; any number
            of ``llm_layer`` steps at distinct, increasing layers (a PyramidDrop-style
            schedule).
        positions: ``compact`` renumbers the shortened sequence, ``original`` keeps the
            kept tokens' original position ids; ``None`` means the adapter's default
            (``compact`` for LLaVA models, ``original`` for Qwen).
        video_budget: for videos, whether a step's budget is per frame or per video.
        fast: opt into the fast execution path (see the docs' Speed page): adapters run
            what they can faster (e.g. a windowed vision tower's windows as one attention
            call per layer) and warn, naming the reason, about what still runs eagerly.
            Kept indices and greedy tokens stay those of the default path.
    """

    steps: list[Step] = field(default_factory=list)
    positions: Positions | None = None
    video_budget: VideoBudget = "per_frame"
    fast: bool = False

    def __post_init__(self) -> None:
        seen: set[Stage] = set()
        last_layer = -1
        for step in self.steps:
            if step.stage is Stage.LLM_LAYER:
                assert step.layer is not None
                if step.layer <= last_layer:
                    raise ConfigError(
                        f"llm_layer steps must have increasing layers; got layer {step.layer} after {last_layer}"
                    )
                last_layer = step.layer
            elif step.stage in seen:
                raise ConfigError(f"stage {step.stage.value!r} appears twice; use one step per encoder-side stage")
            seen.add(step.stage)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def at(self, stage: Stage | str) -> list[Step]:
        stage = Stage(stage)
        return [s for s in self.steps if s.stage is stage]

    @classmethod
    def coerce(cls, obj: object) -> Pipeline:
        """Build a pipeline from a YAML path, a Pipeline, a Step, a reducer, or a list of those.

        A bare reducer becomes one step at its own ``stage`` (or its default stage).
        """
        if isinstance(obj, Pipeline):
            return obj
        if isinstance(obj, (str,)) or hasattr(obj, "__fspath__"):
            return load_config(obj)  # type: ignore[arg-type]
        items = obj if isinstance(obj, (list, tuple)) else [obj]
        steps = []
        for item in items:
            if isinstance(item, Step):
                steps.append(item)
            elif isinstance(item, Reducer):
                stage = item.stage or item._default_stage()
                if stage is Stage.LLM_LAYER:
                    raise ConfigError(
                        f"reducer {item.name!r} at llm_layer needs a layer: wrap it as Step('llm_layer', reducer, layer=K)"
                    )
                steps.append(Step(stage, item))
            else:
                raise ConfigError(f"cannot build a pipeline step from {item!r}")
        return cls(steps)


# -- from YAML ------------------------------------------------------------------------------------


def _build_step(cfg: StepConfig) -> Step:
    cls = get_registry().reducer_class(cfg.reducer)
    reducer = cls(cfg.budget, stage=cfg.stage, **cfg.params)
    return Step(cfg.stage, reducer, cfg.layer)


def parse_config(data: Any, source: str = "<config>", root: yaml.Node | None = None) -> Pipeline:
    """Validate a parsed YAML/JSON mapping and build the :class:`Pipeline`.

    Raises :class:`ConfigError` with ``file:line:col: field.path: message`` lines.
    """
    if not isinstance(data, dict):
        what = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"invalid pipeline config:\n{where(source, root, ())}: the top level must be a mapping with a "
            f"'pipeline' list of steps, got {what}"
        )
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(pydantic_lines(err, source, root))) from None
    steps, problems = [], []
    for i, step_cfg in enumerate(cfg.pipeline):
        base = ("pipeline", i)
        try:
            steps.append(_build_step(step_cfg))
        except UnknownNameError as err:
            problems.append(f"{where(source, root, base + ('reducer',))}: {err}")
        except StageError as err:
            problems.append(f"{where(source, root, base + ('stage',))}: {err}")
        except ConfigError as err:
            msg = str(err)
            if msg.startswith("invalid parameters"):
                # Point at the first parameter the message names, else at params.
                named = [p for p in step_cfg.params if f"\n{p}:" in msg]
                path = base + (("params", named[0]) if named else ("params",))
                problems.append(f"{where(source, root, path, at_key=bool(named))}: {msg}")
            else:  # the step's own rules (layer)
                problems.append(f"{where(source, root, base + ('layer',))}: {msg}")
        except ValueError as err:  # budget range and similar
            problems.append(f"{where(source, root, base + ('budget',))}: {err}")
    if problems:
        raise ConfigError("invalid pipeline config:\n" + "\n".join(problems))
    try:
        return Pipeline(steps, positions=cfg.positions, video_budget=cfg.video_budget, fast=cfg.fast)
    except ConfigError as err:
        raise ConfigError(f"{where(source, root, ('pipeline',))}: {err}") from None


def load_config(path: str | os.PathLike[str]) -> Pipeline:
    """Load and validate a YAML pipeline file."""
    path = Path(path)
    return loads_config(read_file(path), source=str(path))


def load_with_nodes(text: str, source: str) -> tuple[Pipeline, yaml.Node | None]:
    """The pipeline and the YAML node tree (for pointing later errors at lines)."""
    data, root = read_yaml(text, source)
    return parse_config(data, source, root), root


def loads_config(text: str, source: str = "<string>") -> Pipeline:
    """Load and validate a YAML pipeline from a string."""
    return load_with_nodes(text, source)[0]
