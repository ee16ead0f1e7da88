"""Exceptions raised by tokenreduce. All derive from :class:`TokenReduceError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TokenReduceError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInputError(TokenReduceError, ValueError):
    """A tensor or argument given to a reducer is malformed (shape, dtype, NaN, range)."""


class UnknownNameError(TokenReduceError, KeyError):
    """A reducer or adapter name is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.message = f"unknown {kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}."
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class StageError(TokenReduceError, ValueError):
    """A reducer was asked to run at a stage it does not support."""


class MissingContextError(TokenReduceError, ValueError):
    """A reducer needs context (CLS token, attention rows, ...) that was not given."""


class ConfigError(TokenReduceError, ValueError):
    """A pipeline configuration is invalid; the message points at the field (and line)."""


class PluginError(TokenReduceError):
    """A plugin could not be loaded or registered."""
