"""Model adapters: apply a :class:`~tokenreduce.pipeline.Pipeline` to a stock transformers model.

The core defines only the interface (:mod:`tokenreduce.adapter_base`, re-exported here) and
the bookkeeping; concrete adapters (which know specific model classes) are plugins,
registered through the ``tokenreduce_register_adapters`` hook like any third-party adapter.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .adapter_base import Adapter, StageRecord
from .errors import AlreadyPatchedError
from .pipeline import Pipeline
from .registry import get_registry


class Handle:
    """Returned by :func:`patch`; ``remove()`` restores the model. Also a context manager.

    A handle is *live* from :func:`patch` until ``remove()`` succeeds; ``remove()`` is
    idempotent. ``where`` says where it was created (``file:line in function``), so an
    :class:`~tokenreduce.errors.AlreadyPatchedError` can point at the code that forgot
    to remove it.
    """

    _count = itertools.count(1)

    def __init__(self, adapter: Adapter, *, where: str | None = None):
        self.adapter = adapter
        self.number = next(Handle._count)
        self.where = where or _call_site()
        self._removed = False

    @property
    def records(self) -> list[StageRecord]:
        """Per-step records of the most recent forward pass."""
        return self.adapter.records

    @property
    def live(self) -> bool:
        """Whether the model is still patched by this handle."""
        return not self._removed

    def describe(self) -> str:
        """``handle #N (adapter 'x', pipeline: ...; created at file:line in fn)``."""
        return (
            f"handle #{self.number} (adapter {self.adapter.name!r}, pipeline: {describe_pipeline(self.adapter.pipeline)}; "
            f"created at {self.where})"
        )

    def remove(self) -> None:
        """Restore the model exactly; a second call does nothing.

        If the adapter's ``detach()`` raises, the handle stays live (and the model stays
        registered as patched), so ``remove()`` can be called again.
        """
        with _LOCK:
            if self._removed:
                return
            self.adapter.detach()
            self._removed = True
            live = _LIVE.get(self.adapter.model)
            if live is not None and live.handle() is self:
                del _LIVE[self.adapter.model]

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<{self.describe()}{'' if self.live else ', removed'}>"


@dataclass
class _Live:
    """A live patch. Holds no reference to the model: a patched model the caller drops is
    freed as usual (a strong value in the weak-keyed map would keep its key alive)."""

    handle: weakref.ReferenceType[Handle]
    text: str  # handle.describe() at patch time, for when the handle itself is gone


# model -> its live patch. One pipeline per model at a time; the model itself carries no
# marker (no attribute, no submodule), so the core stays model-agnostic.
_LIVE: weakref.WeakKeyDictionary[Any, _Live] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()
_HERE = {os.path.normcase(os.path.abspath(__file__)), os.path.normcase(os.path.abspath(contextlib.__file__))}


def _call_site() -> str:
    """``file:line in function`` of the first caller outside this module and contextlib."""
    frame = sys._getframe(1)
    while frame is not None and os.path.normcase(os.path.abspath(frame.f_code.co_filename)) in _HERE:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def describe_pipeline(pipeline: Pipeline) -> str:
    """One line: ``projector: random(budget=9) -> llm_layer@2: fastv(budget=0.5)``."""
    steps = [
        f"{s.stage.value}{'' if s.layer is None else f'@{s.layer}'}: {s.reducer.name}(budget={s.reducer.budget!r})"
        for s in pipeline
    ]
    text = " -> ".join(steps) or "(no steps)"
    return text if pipeline.positions is None else f"{text} [positions={pipeline.positions}]"


def _modules(obj: Any) -> list[Any]:
    return list(obj.modules()) if isinstance(obj, torch.nn.Module) else [obj]


def _name_in(root: Any, target: Any) -> str:
    if isinstance(root, torch.nn.Module):
        for name, module in root.named_modules():
            if module is target:
                return name
    return "?"


def live_handle(model: Any) -> Handle | None:
    """The live handle patching ``model`` itself, or ``None`` (also when that handle was lost)."""
    with _LOCK:
        live = _LIVE.get(model)
        return None if live is None else live.handle()


def _refuse_overlap(model: Any) -> None:
    """Raise :class:`AlreadyPatchedError` if ``model``, a submodule or a parent of it carries a live patch."""
    mine = {id(m) for m in _modules(model)}
    for other, live in list(_LIVE.items()):
        theirs = _modules(other)
        if other is not model and not any(id(m) in mine for m in theirs):
            continue
        handle = live.handle()
        by = handle.describe() if handle is not None else f"{live.text}, since dropped without remove()"
        cls = type(model).__name__
        if other is model:
            what = f"it is already patched by {by}"
        elif id(other) in mine:
            what = f"its submodule {_name_in(model, other)!r} ({type(other).__name__}) is patched by {by}"
        elif any(m is model for m in theirs):
            what = f"it is the submodule {_name_in(other, model)!r} of a {type(other).__name__} patched by {by}"
        else:
            what = f"it shares submodules with a {type(other).__name__} patched by {by}"
        fix = (
            "call remove() on that handle (or leave its `with tokenreduce.apply(...)` block) first"
            if handle is not None
            else "its hooks are still installed and can no longer be removed; rebuild or reload the model"
        )
        raise AlreadyPatchedError(
            f"cannot patch this {cls}: {what}. tokenreduce applies one pipeline per model at a time and does not "
            f"stack pipelines; {fix}."
        )


def patch(model: torch.nn.Module, pipeline: Any) -> Handle:
    """Apply ``pipeline`` (YAML path, Pipeline, reducer or list) to ``model`` until ``remove()``.

    One pipeline per model at a time: patching a model that (or a submodule or parent of
    which) is already patched raises :class:`~tokenreduce.errors.AlreadyPatchedError`
    naming the live handle. ``handle.remove()`` restores the model exactly.
    """
    where = _call_site()
    pipe = Pipeline.coerce(pipeline)
    with _LOCK:
        _refuse_overlap(model)
        cls = get_registry().adapter_for(model)
        adapter = cls(model, pipe)
        adapter.validate()
        try:
            adapter.attach()
        except BaseException:
            # A half-installed patch (attach raised, or was interrupted) is taken off again.
            adapter.detach()
            raise
        handle = Handle(adapter, where=where)
        # The adapter is reachable from the model while patched (its hooks and wrappers
        # hold it), so this keeps the handle alive, for live_handle(), if the caller drops it.
        adapter._handle = handle
        _LIVE[model] = _Live(weakref.ref(handle), handle.describe())
        return handle


@contextmanager
def apply(model: torch.nn.Module, pipeline: Any) -> Iterator[Handle]:
    """``with tokenreduce.apply(model, pipeline) as handle:``; the model is restored on exit, also on errors.

    Refused (:class:`~tokenreduce.errors.AlreadyPatchedError`) inside another
    ``apply``/``patch`` of the same model: pipelines do not nest.
    """
    handle = patch(model, pipeline)
    try:
        yield handle
    finally:
        handle.remove()
