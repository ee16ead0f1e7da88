"""Budgets: how many tokens a reducer keeps.

A budget is one of

* an ``int`` ``>= 1``: keep that many tokens;
* a ``float`` in ``(0, 1]``: keep that fraction of the row's valid tokens, rounded
  half up (``floor(r * n + 0.5)``) and never below 1. A reducer whose official code
  rounds otherwise says so in its ``ratio_rounding`` class attribute (see
  :data:`RATIO_ROUNDINGS`): ``"floor"`` (``int(r * n)``) or ``"half_even"``
  (Python's ``round(r * n)``);
* a callable ``n -> int``: computed from the row's valid token count ``n``.

Whatever the form, a row keeps ``min(budget, n)`` tokens: a budget at or above the
number of valid tokens is the identity (all kept, features unchanged), not an error.
``bool`` is rejected (``True`` is an ``int`` in Python, almost surely a mistake), and so
is a float above 1 (``64.5`` is neither a token count nor a ratio; it is never truncated).
Text (the command line) goes through :func:`parse_budget`: ``"64"`` is an int, ``"0.25"``
and ``"1.0"`` are ratios.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Literal, Union

import torch

from .errors import InvalidInputError

Budget = Union[int, float, Callable[[int], int]]

#: How a ratio budget's ``r * n`` becomes a count (before the floor of 1 and the cap at n).
RatioRounding = Literal["half_up", "half_even", "floor"]
RATIO_ROUNDINGS: dict[str, Callable[[float], int]] = {
    "half_up": lambda x: math.floor(x + 0.5),  # the library default
    "half_even": round,  # Python's round(), e.g. DivPrune's int(round(r * n))
    "floor": math.floor,  # int(r * n) for r * n >= 0, e.g. PyramidDrop
}


def budget_rule(name: str = "budget") -> str:
    """The rule every budget error states, so a message never names only one of the forms."""
    return f"{name} must be a positive int (tokens to keep) or a ratio in (0, 1] (fraction of the tokens present)"


def check_budget(budget: object, name: str = "budget") -> Budget:
    """Validate the *form* of a budget (without knowing ``n``) and return it."""
    rule = budget_rule(name)
    if isinstance(budget, bool) or budget is None:
        raise InvalidInputError(f"{name}={budget!r} is not a budget: {rule}, or a callable n -> int")
    if isinstance(budget, int):
        if budget < 1:
            raise InvalidInputError(f"{name}={budget} is out of range: an absolute budget must be >= 1; {rule}")
        return budget
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            # 64.5 or 64.0: never read as 64 tokens (the form decides the meaning).
            hint = "; a number of tokens must be an int" if budget > 1 and math.isfinite(budget) else ""
            raise InvalidInputError(f"{name}={budget} is out of range: a ratio budget must be in (0, 1]{hint}; {rule}")
        return budget
    if callable(budget):
        return budget
    raise InvalidInputError(f"{name}={budget!r} has type {type(budget).__name__}: {rule}, or a callable n -> int")


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def parse_budget(text: str, name: str = "budget") -> int | float:
    """A budget typed as text (command line): ``"64"`` -> 64 tokens, ``"0.25"`` / ``"1.0"`` -> a ratio.

    The written form decides, as in YAML: digits only make an int, anything else must be a
    float in (0, 1]. ``"64.5"``, ``"0"``, ``"true"`` raise :class:`InvalidInputError` with the rule.
    """
    raw = str(text).strip()
    if _INT_TEXT.fullmatch(raw):
        return check_budget(int(raw), name)  # type: ignore[return-value]
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInputError(f"{name}={text!r} is not a number: {budget_rule(name)}") from None
    return check_budget(value, name)  # type: ignore[return-value]


def resolve_budget(budget: Budget, n: int, name: str = "budget", *, rounding: RatioRounding = "half_up") -> int:
    """Number of tokens to keep out of ``n`` valid ones (always in ``[min(1, n), n]``).

    ``rounding`` applies to ratio budgets only (a reducer passes its ``ratio_rounding``).
    """
    budget = check_budget(budget, name)
    if rounding not in RATIO_ROUNDINGS:
        raise InvalidInputError(f"rounding={rounding!r} is not one of {', '.join(RATIO_ROUNDINGS)}")
    if n <= 0:
        return 0
    if isinstance(budget, int):
        t = budget
    elif isinstance(budget, float):
        t = max(1, RATIO_ROUNDINGS[rounding](budget * n))
    else:
        t = budget(n)
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise InvalidInputError(f"{name} callable returned {t!r} for n={n}: it must return an int >= 1")
    return min(t, n)


def resolve_budgets(
    budget: Budget, valid_counts: torch.Tensor, name: str = "budget", *, rounding: RatioRounding = "half_up"
) -> torch.Tensor:
    """Per-row budgets ``(B,)`` int64 on the counts' device, for per-row valid counts ``(B,)``."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        check_budget(budget, name)
        return valid_counts.clamp(max=budget)
    # Ratios and callables depend on each row's n; B is small and this runs on host ints.
    counts = valid_counts.tolist()
    cache: dict[int, int] = {}
    out = [cache.setdefault(n, resolve_budget(budget, n, name, rounding=rounding)) for n in counts]
    return torch.tensor(out, dtype=torch.long, device=valid_counts.device)
