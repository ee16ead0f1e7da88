"""The plugin registry: built-in and third-party reducers and adapters, found through entry points.

Loading rules:

* Two entry-point groups are read: ``tokenreduce.reducers`` (``name = "module:Class"``)
  and ``tokenreduce`` (pluggy plugins implementing :mod:`tokenreduce.hookspecs`).
* The ``tokenreduce`` distribution itself (the built-ins) is loaded first, then other
  distributions in alphabetical order of distribution name, then entry-point name.
* Name clashes: the first registration of a name wins; a later one is recorded as a
  broken plugin ("duplicate name") and listed as such. Built-ins therefore cannot be
  shadowed by accident.
* Any failure while loading one plugin (import error, not a Reducer subclass, missing
  declarations, a hook that raises) is recorded in :attr:`Registry.broken` and never
  stops the other plugins from loading.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .adapter_base import Adapter
from .errors import PluginError, UnknownNameError
from .stages import Stage

REDUCER_GROUP = "tokenreduce.reducers"
PLUGIN_GROUP = "tokenreduce"
BUILTIN_DIST = "tokenreduce"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


@dataclass(frozen=True)
class ReducerEntry:
    """A registered reducer class and where it came from."""

    name: str
    cls: type
    source: str
    version: str


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    cls: type
    source: str
    version: str


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be registered, with the reason."""

    name: str
    source: str
    error: str


def validate_reducer_class(cls: object) -> None:
    """Raise :class:`PluginError` unless ``cls`` is a usable reducer class."""
    from .reducer import Reducer

    if not isinstance(cls, type) or not issubclass(cls, Reducer):
        what = "" if isinstance(cls, type) else f" (it is a {type(cls).__name__}, not a class)"
        raise PluginError(f"{cls!r} is not a subclass of tokenreduce.Reducer{what}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"{cls.__name__}.name={name!r} must be a lower-case name matching {_NAME_RE.pattern}")
    stages = getattr(cls, "stages", None)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise PluginError(f"{cls.__name__}.stages must be a non-empty set of tokenreduce.Stage")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, BaseModel)):
        raise PluginError(f"{cls.__name__}.Params must be a pydantic model")
    if getattr(cls, "__abstractmethods__", None):
        raise PluginError(f"{cls.__name__} does not implement {', '.join(sorted(cls.__abstractmethods__))}")


def validate_adapter_class(cls: object) -> None:
    if not isinstance(cls, type) or not issubclass(cls, Adapter):
        raise PluginError(f"{cls!r} is not a subclass of tokenreduce.adapter.Adapter")
    if not getattr(cls, "name", ""):
        raise PluginError(f"{cls.__name__}.name must be set")
    if getattr(cls, "__abstractmethods__", None):
        raise PluginError(f"{cls.__name__} does not implement {', '.join(sorted(cls.__abstractmethods__))}")


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _dist_version(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else "?"


def _load_order(eps: list[md.EntryPoint]) -> list[md.EntryPoint]:
    def key(ep: md.EntryPoint) -> tuple[int, str, str]:
        dist = _dist_name(ep)
        return (0 if dist.lower() == BUILTIN_DIST else 1, dist.lower(), ep.name)

    # The same distribution can be visible twice (e.g. an editable install plus a
    # stale egg-info on sys.path); keep one entry point per (group, name, value).
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for ep in sorted(eps, key=key):
        ident = (ep.group, ep.name, ep.value)
        if ident not in seen:
            seen.add(ident)
            unique.append(ep)
    return unique


class Registry:
    """Reducers and adapters by name. Use :func:`get_registry` for the shared instance."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.reducers: dict[str, ReducerEntry] = {}
        self.adapters: dict[str, AdapterEntry] = {}
        self.broken: list[BrokenPlugin] = []

    # -- registration --------------------------------------------------------------

    def register_reducer(self, cls: type, source: str = "manual", version: str = "?") -> ReducerEntry:
        """Register one reducer class; raises :class:`PluginError` if invalid or the name is taken."""
        validate_reducer_class(cls)
        name = cls.name  # type: ignore[attr-defined]
        if name in self.reducers:
            prev = self.reducers[name]
            if prev.cls is cls:
                return prev
            raise PluginError(f"duplicate reducer name {name!r}: already provided by {prev.source} ({prev.cls.__module__})")
        entry = ReducerEntry(name, cls, source, version)
        self.reducers[name] = entry
        return entry

    def register_adapter(self, cls: type, source: str = "manual", version: str = "?") -> AdapterEntry:
        validate_adapter_class(cls)
        name = cls.name  # type: ignore[attr-defined]
        if name in self.adapters:
            prev = self.adapters[name]
            if prev.cls is cls:
                return prev
            raise PluginError(f"duplicate adapter name {name!r}: already provided by {prev.source}")
        entry = AdapterEntry(name, cls, source, version)
        self.adapters[name] = entry
        return entry

    def register_plugin(self, plugin: Any, source: str = "manual", version: str = "?") -> None:
        """Register a pluggy plugin object and the reducers/adapters its hooks return."""
        self.pm.register(plugin, name=f"{source}:{getattr(plugin, '__name__', id(plugin))}")
        hooks = (
            (self.pm.hook.tokenreduce_register_reducers, self.register_reducer, "reducer"),
            (self.pm.hook.tokenreduce_register_adapters, self.register_adapter, "adapter"),
        )
        for hook, register, kind in hooks:
            impls = [i for i in hook.get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                try:
                    classes = impl.function() or []
                except Exception as err:  # a third-party hook may raise anything
                    self._broken(f"{source}:{impl.function.__name__}", source, err)
                    continue
                for cls in classes:
                    try:
                        register(cls, source, version)
                    except Exception as err:
                        self._broken(getattr(cls, "name", None) or repr(cls), source, err)

    def _broken(self, name: str, source: str, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}"
        if not isinstance(err, PluginError):
            tb = traceback.extract_tb(err.__traceback__)
            if tb:
                msg += f" (at {tb[-1].filename}:{tb[-1].lineno})"
        self.broken.append(BrokenPlugin(name, source, msg))

    def load_entry_points(self) -> None:
        """Load every installed plugin; failures go to :attr:`broken`."""
        eps = list(md.entry_points(group=REDUCER_GROUP)) + list(md.entry_points(group=PLUGIN_GROUP))
        for ep in _load_order(eps):
            source, version = _dist_name(ep), _dist_version(ep)
            try:
                obj = ep.load()
            except Exception as err:
                self._broken(ep.name, source, err)
                continue
            try:
                if ep.group == REDUCER_GROUP:
                    # What the object is comes first: a name mismatch is beside the point
                    # when the entry point names a function or a module.
                    try:
                        validate_reducer_class(obj)
                    except PluginError as err:
                        raise PluginError(f"entry point {ep.name!r} = {ep.value!r}: {err}") from None
                    if getattr(obj, "name", None) != ep.name:
                        raise PluginError(
                            f"entry point {ep.name!r} points at {obj!r} whose name is {getattr(obj, 'name', None)!r}; "
                            "the entry-point name must equal the reducer's name"
                        )
                    self.register_reducer(obj, source, version)
                else:
                    self.register_plugin(obj, source, version)
            except Exception as err:
                self._broken(ep.name, source, err)

    # -- lookup ----------------------------------------------------------------------

    def reducer_class(self, name: str) -> type:
        """The class registered as ``name``; :class:`UnknownNameError` (saying why) otherwise."""
        entry = self.reducers.get(name) if isinstance(name, str) else None
        if entry is None:
            broken = {b.name: f"{b.error} (from {b.source})" for b in self.broken}
            if not isinstance(name, str):
                raise UnknownNameError("reducer", name, self.reducers)
            raise UnknownNameError("reducer", name, self.reducers, broken)
        return entry.cls

    def adapter_for(self, model: Any) -> type:
        """The first registered adapter whose ``matches(model)`` is true."""
        for entry in self.adapters.values():
            if entry.cls.matches(model):
                return entry.cls
        known = ", ".join(sorted(self.adapters)) or "(none)"
        raise PluginError(f"no adapter for model class {type(model).__name__}; registered adapters: {known}")


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    with _lock:
        if _registry is None:
            reg = Registry()
            reg.load_entry_points()
            _registry = reg
        return _registry


def reset_registry() -> None:
    """Forget the loaded registry (e.g. after installing a plugin at run time)."""
    global _registry
    with _lock:
        _registry = None
    importlib.invalidate_caches()


def create(name: str, budget: Any = None, *, stage: Stage | str | None = None, **params: Any) -> Any:
    """Instantiate a registered reducer: ``tokenreduce.create("apet", budget=64)``."""
    cls = get_registry().reducer_class(name)
    return cls(budget, stage=stage, **params)
