"""The model-adapter interface: :class:`Adapter` and the :class:`StageRecord` s it writes.

Kept apart from :mod:`tokenreduce.adapter` (which patches models and finds their adapter
through the registry) because the registry checks that adapter classes subclass
:class:`Adapter`: the interface sits below the registry, the patching above it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .requirements import Provision, check_context
from .stages import Stage

if TYPE_CHECKING:  # annotations only: building a Pipeline (from YAML) needs the registry
    from .pipeline import Pipeline, Step


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
        self._handle: Any = None  # the Handle of patch(), set by it: the adapter keeps its handle alive

    @classmethod
    def matches(cls, model: Any) -> bool:
        names = {c.__name__ for c in type(model).__mro__}
        return bool(names & set(cls.model_classes))

    def validate(self) -> None:
        """Raise early (at patch time) if the pipeline cannot run on this model.

        The default checks the context (:meth:`check_context`); an override adds its own
        rules and calls :meth:`check_context` (or ``super().validate()``) for the context.
        """
        self.check_context()

    def provides(self, stage: Stage) -> Provision | None:
        """What context this adapter gives reducers at ``stage`` on :attr:`model`.

        ``None`` (the default): the adapter declares nothing there and :meth:`check_context`
        checks nothing. Give the fields, why the others are missing (``reasons``) and, at
        ``llm_layer``, the attention queries and layers it recomputes.
        """
        return None

    def check_context(self) -> None:
        """Raise :class:`~tokenreduce.errors.MissingContextError` for a step whose reducer
        requires context that :meth:`provides` does not list at the step's stage."""
        check_context(self.pipeline, self.provides, model=type(self.model).__name__, adapter=self.name)

    @abc.abstractmethod
    def attach(self) -> None:
        """Install hooks / patches on :attr:`model`."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Remove everything :meth:`attach` installed; the model behaves as never patched."""

    def steps(self, stage: Stage) -> list[Step]:
        return self.pipeline.at(stage)


__all__ = ["Adapter", "StageRecord"]
