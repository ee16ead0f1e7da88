"""Patching model instances and restoring them exactly: the one patch/restore helper of every adapter.

Adapters never touch modeling code or classes: they set instance attributes (a wrapped
``forward``, a feature getter) and register hooks. :class:`Patches` remembers what each
attribute was (or that it was absent, so removal restores class lookup) and every hook
handle, and undoes them in reverse order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_MISSING = object()


class Patches:
    """Instance attributes set and hooks registered, undone by :meth:`restore`."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str | None, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering the instance's own attribute (or its absence)."""
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def hook(self, handle: Any) -> Any:
        """Remember a hook handle (``handle.remove()`` on restore); returns it."""
        self._undo.append((handle, None, None))
        return handle

    def on_restore(self, undo: Any) -> None:
        """Call ``undo()`` on restore (what no attribute or hook captures, e.g. a config property)."""
        if undo is not None:
            self._undo.append((_Call(undo), None, None))

    def restore(self) -> None:
        """Undo everything, last first."""
        while self._undo:
            obj, name, saved = self._undo.pop()
            if name is None:
                obj.remove()
            elif saved is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = saved


class _Call:
    """A callable that looks like a hook handle."""

    def __init__(self, fn: Any) -> None:
        self.remove = fn


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` for the duration of the block."""
    patches = Patches()
    patches.set(obj, name, value)
    try:
        yield
    finally:
        patches.restore()
