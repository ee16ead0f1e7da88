"""pluggy hook specifications: the whole plugin surface of tokenreduce.

A plugin is any module or object with functions marked ``@tokenreduce.hookimpl``,
found through the ``tokenreduce`` entry-point group (or registered by hand with
``tokenreduce.registry.get_registry().register_plugin(obj)``). Reducer classes can
also be declared directly in the ``tokenreduce.reducers`` entry-point group
(``name = "module:Class"``), which needs no hook at all.

The core reaches plugins only through these hooks and never imports one (a test reads
the import graph): whatever knows a model family or ships a default model is a plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

PROJECT = "tokenreduce"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tokenreduce_register_reducers() -> list[type]:
    """Return reducer classes (subclasses of :class:`tokenreduce.Reducer`) to register."""


@hookspec
def tokenreduce_register_adapters() -> list[type]:
    """Return model adapter classes (subclasses of :class:`tokenreduce.adapter.Adapter`) to register."""


@hookspec(firstresult=True)
def tokenreduce_default_model() -> object:
    """Return a builder ``(seed: int) -> (model, inputs)`` for the embedded default model that
    ``tokenreduce run`` uses (a tiny, seeded, random-weight VLM; no download). First result wins."""


@dataclass(frozen=True)
class DefaultEval:
    """What :func:`tokenreduce_default_eval` returns: the embedded evaluation default.

    Attributes:
        write_checkpoint: ``(folder) -> Path``: write a tiny checkpoint (model and
            processor, ``from_pretrained``-loadable) into ``folder`` unless it is already
            there; returns the checkpoint folder.
        write_tasks: ``(folder) -> Path``: write lmms-eval tasks ``tiny_pope`` and
            ``tiny_mc`` for that checkpoint into ``folder``; returns it.
        samples: ``(n) -> list[tokenreduce.evaluation.vlm.Sample]``: ``n`` seeded images
            with prompts, for ``tokenreduce fidelity`` without ``--inputs``.
    """

    write_checkpoint: Callable[[Path], Path]
    write_tasks: Callable[[Path], Path]
    samples: Callable[[int], list[Any]]


@hookspec(firstresult=True)
def tokenreduce_default_eval() -> DefaultEval:
    """Return the :class:`DefaultEval` that ``tokenreduce eval --model tiny`` and
    ``tokenreduce fidelity --model tiny`` use (no download). First result wins."""


@hookspec(firstresult=True)
def tokenreduce_vision_features(image: Any, model: Any, model_id: str, device: str) -> Any:
    """Patch tokens of ``image`` from ``model``'s vision tower, for ``tokenreduce show --model``.

    ``model`` is the checkpoint ``model_id`` as transformers' ``AutoModelForImageTextToText``
    loads it (float32, eval mode, on the CPU); ``device`` is where to run it. Return a
    :class:`tokenreduce.visualize.Features`, or ``None`` for a model this plugin does not
    know (the next plugin is asked). First result wins.
    """
