import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokenreduce import InvalidInputError, create, resolve_budget
from tokenreduce.budget import parse_budget, resolve_budgets


@pytest.mark.parametrize(
    ("budget", "n", "expected"),
    [
        (64, 576, 64),
        (576, 576, 576),
        (1000, 576, 576),  # budget >= N: identity, not an error
        (0.25, 576, 144),
        (0.1, 25, 3),  # 2.5 rounds half up
        (0.01, 10, 1),  # never below one token
        (1.0, 7, 7),
        (lambda n: n // 9, 576, 64),
        (lambda n: 10_000, 576, 576),
    ],
)
def test_budget_rules(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@given(st.floats(0.001, 1.0), st.integers(1, 10_000))
def test_ratio_rounds_half_up_and_stays_in_range(ratio, n):
    t = resolve_budget(ratio, n)
    assert 1 <= t <= n
    assert t == min(n, max(1, math.floor(ratio * n + 0.5)))


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        (0, "budget=0 is out of range: an absolute budget must be >= 1"),
        (-3, "budget=-3 is out of range"),
        (0.0, r"ratio budget must be in \(0, 1\]"),
        (1.5, r"ratio budget must be in \(0, 1\]"),
        (float("nan"), "ratio budget"),
        (True, "is not a budget"),
        ("64", "has type str"),
    ],
)
def test_bad_budgets_name_the_parameter_and_range(budget, match):
    with pytest.raises(InvalidInputError, match=match):
        resolve_budget(budget, 10)
    with pytest.raises(InvalidInputError, match=match):
        create("random", budget=budget)


def test_callable_budget_must_return_positive_int():
    with pytest.raises(InvalidInputError, match="callable returned 0"):
        resolve_budget(lambda n: 0, 10)
    with pytest.raises(InvalidInputError, match="callable returned 2.5"):
        resolve_budget(lambda n: 2.5, 10)


def test_per_row_budgets_follow_each_rows_valid_count():
    counts = torch.tensor([576, 100, 3])
    assert resolve_budgets(64, counts).tolist() == [64, 64, 3]
    assert resolve_budgets(0.5, counts).tolist() == [288, 50, 2]


@pytest.mark.parametrize("budget", [0, -1, 0.0, 1.5, 64.5, float("nan"), True, "64"])
def test_every_budget_error_states_the_whole_rule(budget):
    # Not only the rule of the form given: a user who typed 0 or 64.5 learns both forms.
    with pytest.raises(InvalidInputError, match=r"budget must be a positive int \(tokens to keep\) or a ratio in \(0, 1\]"):
        create("random", budget=budget)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64", 64), (" 7 ", 7), ("+3", 3), ("0.25", 0.25), ("1.0", 1.0), ("1", 1), (".5", 0.5), ("1e-1", 0.1)],
)
def test_parse_budget_reads_the_form_as_written(text, expected):
    value = parse_budget(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("64.5", r"--budget=64\.5 is out of range: .*a number of tokens must be an int"),
        ("64.0", r"--budget=64\.0 is out of range"),  # never read as 64 tokens
        ("0", r"--budget=0 is out of range: an absolute budget must be >= 1; --budget must be a positive int"),
        ("0.0", r"--budget must be a positive int \(tokens to keep\) or a ratio in \(0, 1\]"),
        ("-3", "--budget=-3 is out of range"),
        ("nan", r"--budget=nan is out of range"),
        ("true", r"--budget='true' is not a number"),
        ("", r"--budget='' is not a number"),
    ],
)
def test_parse_budget_refuses_what_it_would_have_to_guess(text, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_budget(text, "--budget")


@given(st.integers(1, 10**6))
def test_parse_budget_round_trips_token_counts(n):
    assert parse_budget(str(n)) == n
