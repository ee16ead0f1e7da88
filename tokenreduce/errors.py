"""Exceptions raised by tokenreduce. All derive from :class:`TokenReduceError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


class TokenReduceError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInputError(TokenReduceError, ValueError):
    """A tensor or argument given to a reducer is malformed (shape, dtype, NaN, range)."""


def close_matches(name: object, known: Iterable[str], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """Known names close to ``name``: an exact case-insensitive match first (``TOME`` ->
    ``tome``), else spelling neighbours (``basis_token`` -> ``basis_tokens``)."""
    if not isinstance(name, str):
        return []
    by_lower: dict[str, str] = {}
    for k in sorted(known):
        by_lower.setdefault(k.lower(), k)
    folded = name.lower()
    if folded in by_lower and by_lower[folded] != name:
        return [by_lower[folded]]
    scored = sorted(
        ((difflib.SequenceMatcher(None, folded, k).ratio(), k) for k in by_lower), key=lambda rk: (-rk[0], rk[1])
    )
    scored = [(r, k) for r, k in scored if r >= cutoff]
    # Only the best few: 'basis_token' suggests 'basis_tokens', not every 'basis_*' field.
    best = scored[0][0] if scored else 0.0
    return [by_lower[k] for r, k in scored[:n] if r >= best - 0.1]


def did_you_mean(name: object, known: Iterable[str], cutoff: float = 0.5) -> str:
    """`` Did you mean 'x'?`` (with a leading space), or ``""`` when nothing is close."""
    close = close_matches(name, known, cutoff=cutoff)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class UnknownNameError(TokenReduceError, KeyError):
    """A reducer or adapter name is not registered.

    ``broken`` maps the names of plugins that failed to load to their errors: asking for
    one of them says it is installed but broken (and why), and any other unknown name
    lists them, as the name asked for may be one a broken plugin would have provided.
    """

    def __init__(self, kind: str, name: str, known: Iterable[str], broken: Mapping[str, str] | None = None):
        known = sorted(known)
        self.broken = dict(broken or {})
        if isinstance(name, str) and name in self.broken:
            self.message = (
                f"{kind} {name!r} is installed but its plugin failed to load: {self.broken[name]}. "
                "Fix or reinstall that plugin (`tokenreduce list` shows every broken plugin)."
            )
        else:
            self.message = f"unknown {kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known) or '(none)'}."
            only_case = isinstance(name, str) and name.lower() in {k.lower() for k in known}
            if self.broken and not only_case:
                lines = "".join(f"\n  {b}: {e}" for b, e in sorted(self.broken.items()))
                self.message += f" These plugins failed to load (one may provide it):{lines}"
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


class AlreadyPatchedError(TokenReduceError, RuntimeError):
    """A model (or a module it shares with another model) already carries a live pipeline.

    One pipeline per model at a time: remove the live handle first. The message names
    that handle (its pipeline and where it was created).
    """
