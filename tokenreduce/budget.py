"""Budgets: how many tokens a reducer keeps.

A budget is one of

* an ``int`` ``>= 1``: keep that many tokens;
* a ``float`` in ``(0, 1]``: keep that fraction of the row's valid tokens, rounded
  half up (``floor(r * n + 0.5)``) and never below 1;
* a callable ``n -> int``: computed from the row's valid token count ``n``.

Whatever the form, a row keeps ``min(budget, n)`` tokens: a budget at or above the
number of valid tokens is the identity (all kept, features unchanged), not an error.
``bool`` is rejected (``True`` is an ``int`` in Python, almost surely a mistake).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import torch

from .errors import InvalidInputError

Budget = Union[int, float, Callable[[int], int]]


def check_budget(budget: object, name: str = "budget") -> Budget:
    """Validate the *form* of a budget (without knowing ``n``) and return it."""
    if isinstance(budget, bool) or budget is None:
        raise InvalidInputError(
            f"{name}={budget!r} is not a budget: use an int >= 1, a float in (0, 1] or a callable n -> int"
        )
    if isinstance(budget, int):
        if budget < 1:
            raise InvalidInputError(f"{name}={budget} is out of range: an absolute budget must be >= 1")
        return budget
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise InvalidInputError(f"{name}={budget} is out of range: a ratio budget must be in (0, 1]")
        return budget
    if callable(budget):
        return budget
    raise InvalidInputError(
        f"{name}={budget!r} has type {type(budget).__name__}: use an int >= 1, a float in (0, 1] or a callable"
    )


def resolve_budget(budget: Budget, n: int, name: str = "budget") -> int:
    """Number of tokens to keep out of ``n`` valid ones (always in ``[min(1, n), n]``)."""
    budget = check_budget(budget, name)
    if n <= 0:
        return 0
    if isinstance(budget, int):
        t = budget
    elif isinstance(budget, float):
        t = max(1, math.floor(budget * n + 0.5))
    else:
        t = budget(n)
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise InvalidInputError(f"{name} callable returned {t!r} for n={n}: it must return an int >= 1")
    return min(t, n)


def resolve_budgets(budget: Budget, valid_counts: torch.Tensor, name: str = "budget") -> torch.Tensor:
    """Per-row budgets ``(B,)`` int64 on the counts' device, for per-row valid counts ``(B,)``."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        check_budget(budget, name)
        return valid_counts.clamp(max=budget)
    # Ratios and callables depend on each row's n; B is small and this runs on host ints.
    counts = valid_counts.tolist()
    cache: dict[int, int] = {}
    out = [cache.setdefault(n, resolve_budget(budget, n, name)) for n in counts]
    return torch.tensor(out, dtype=torch.long, device=valid_counts.device)
