"""pluggy hook specifications: the whole plugin surface of tokenreduce.

A plugin is any module or object with functions marked ``@tokenreduce.hookimpl``,
found through the ``tokenreduce`` entry-point group (or registered by hand with
``tokenreduce.registry.get_registry().register_plugin(obj)``). Reducer classes can
also be declared directly in the ``tokenreduce.reducers`` entry-point group
(``name = "module:Class"``), which needs no hook at all.
"""

from __future__ import annotations

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
