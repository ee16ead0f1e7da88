"""Model adapters: apply a :class:`~tokenreduce.pipeline.Pipeline` to a stock transformers model.

The core defines only the interface and the bookkeeping; concrete adapters (which know
specific model classes) are plugins, registered through the
``tokenreduce_register_adapters`` hook like any third-party adapter.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .pipeline import Pipeline, Step
from .registry import get_registry
from .stages import Stage


@dataclass
class StageRecord:
    """What one step did during the last forward pass, per reduced unit (image/frame/sequence)."""

    stage: Stage
    reducer: str
    layer: int | None
    tokens_before: list[int]
    tokens_after: list[int]
    indices: list[torch.Tensor] = field(default_factory=list)
    info: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class Adapter(abc.ABC):
    """Base of model adapters.

    Subclasses set ``name`` and ``model_classes`` (class names matched against the
    model's MRO) and implement :meth:`attach` / :meth:`detach`, which must restore the
    model exactly. During each forward they append :class:`StageRecord` s to
    :attr:`records` (cleared at the start of every top-level forward).
    """

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    default_positions: ClassVar[str] = "compact"

    def __init__(self, model: torch.nn.Module, pipeline: Pipeline):
        self.model = model
        self.pipeline = pipeline
        self.positions = pipeline.positions or self.default_positions
        self.records: list[StageRecord] = []

    @classmethod
    def matches(cls, model: Any) -> bool:
        names = {c.__name__ for c in type(model).__mro__}
        return bool(names & set(cls.model_classes))

    def validate(self) -> None:
        """Raise early (at patch time) if the pipeline cannot run on this model."""

    @abc.abstractmethod
    def attach(self) -> None:
        """Install hooks / patches on :attr:`model`."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Remove everything :meth:`attach` installed; the model behaves as never patched."""

    def steps(self, stage: Stage) -> list[Step]:
        return self.pipeline.at(stage)


class Handle:
    """Returned by :func:`patch`; ``remove()`` restores the model. Also a context manager."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self._removed = False

    @property
    def records(self) -> list[StageRecord]:
        """Per-step records of the most recent forward pass."""
        return self.adapter.records

    def remove(self) -> None:
        if not self._removed:
            self.adapter.detach()
            self._removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def patch(model: torch.nn.Module, pipeline: Any) -> Handle:
    """Apply ``pipeline`` (YAML path, Pipeline, reducer or list) to ``model`` until ``remove()``."""
    pipe = Pipeline.coerce(pipeline)
    cls = get_registry().adapter_for(model)
    adapter = cls(model, pipe)
    adapter.validate()
    adapter.attach()
    return Handle(adapter)


@contextmanager
def apply(model: torch.nn.Module, pipeline: Any) -> Iterator[Handle]:
    """``with tokenreduce.apply(model, pipeline) as handle:``; the model is restored on exit, also on errors."""
    handle = patch(model, pipeline)
    try:
        yield handle
    finally:
        handle.remove()
