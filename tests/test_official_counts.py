"""Ratio budgets keep the official counts: PyramidDrop floors, DivPrune rounds half to even.

Official expressions (read in the official code):

* PyramidDrop (Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``,
  ``pdrop_rank_drop``): ``keep_length = int(N * image_token_ratio_list[stage + 1])`` with
  the cumulative list ``[1.0, 0.5, 0.25, 0.125]`` of the published scripts
  (``scripts/v1_5/pdrop_eval/*.sh``: ``--image_token_ratio_list "[0.5,0.25,0.125]"``).
* DivPrune (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``DivPrune``):
  ``threshold_terms = int(round(threshold_ratio * image_feature_length))``.

Every other reducer keeps the library's half-up rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce import InvalidInputError, Pipeline, Reducer, ReductionContext, Step, create, resolve_budget
from tokenreduce.budget import resolve_budgets
from tokenreduce_plugins.divprune import DivPrune
from tokenreduce_plugins.pdrop import PDrop

from models import two_image_batch, one_thread, tiny_llava  # noqa: F401

OFFICIAL_PDROP_RATIOS = (0.5, 0.25, 0.125)  # cumulative, of the original N
PROPS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def official_pdrop_counts(n: int) -> list[int]:
    return [int(n * ratio) for ratio in OFFICIAL_PDROP_RATIOS]


def official_divprune_count(ratio: float, n: int) -> int:
    return int(round(ratio * n))


def pdrop_schedule_counts(n: int, b: int = 1, seed: int = 0, mask: torch.Tensor | None = None) -> list[list[int]]:
    """Chain three PDrop steps of ratio 0.5 on ``n`` tokens (the published per-step schedule)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 4, generator=gen)
    counts = []
    for _ in OFFICIAL_PDROP_RATIOS:
        att = torch.rand(b, 1, x.shape[1], generator=gen)
        out = PDrop(0.5, stage="llm_layer")(x, mask=mask, context=ReductionContext(attention=att))
        counts.append(out.counts.tolist())
        x, mask = out.tokens, None if mask is None else out.valid
    return counts


@pytest.mark.parametrize(("n", "expected"), [(577, [288, 144, 72]), (203, [101, 50, 25]), (576, [288, 144, 72])])
def test_pdrop_keeps_the_issue_counts(n, expected):
    assert official_pdrop_counts(n) == expected
    assert pdrop_schedule_counts(n) == [[c] for c in expected]


@PROPS
@given(n=st.integers(4, 1500).map(lambda k: 2 * k + 1))
def test_pdrop_schedule_equals_official_cumulative_floor_at_odd_n(n):
    assert pdrop_schedule_counts(n) == [[c] for c in official_pdrop_counts(n)]


@PROPS
@given(ns=st.lists(st.integers(4, 300).map(lambda k: 2 * k + 1), min_size=2, max_size=3))
def test_pdrop_counts_per_row_with_padding(ns):
    # Rows of different (odd) valid counts: each row keeps its own official count.
    n_max = max(ns)
    mask = torch.arange(n_max)[None] < torch.tensor(ns)[:, None]
    got = pdrop_schedule_counts(n_max, b=len(ns), mask=mask)
    assert got == [[official_pdrop_counts(n)[k] for n in ns] for k in range(3)]


@pytest.mark.usefixtures("one_thread")
def test_pdrop_schedule_in_llava_keeps_official_counts():
    # 36 image tokens: 36 -> 18 -> 9 -> 4 (int(36 * 0.125) = 4; half up would keep 5).
    model = tiny_llava(seed=0, attn_implementation="sdpa")
    batch = two_image_batch()
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    pipe = PDrop.schedule(layers=(1, 2, 3))
    with tr.apply(model, pipe) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        records = list(handle.records)
    counts = [36] + official_pdrop_counts(36)
    assert [(r.tokens_before, r.tokens_after) for r in records] == [
        ([counts[k]] * 2, [counts[k + 1]] * 2) for k in range(3)
    ]


@pytest.mark.parametrize(("n", "expected"), [(577, 288), (203, 102), (101, 50), (99, 50), (36, 18)])
def test_divprune_half_ratio_rounds_half_to_even(n, expected):
    assert official_divprune_count(0.5, n) == expected
    assert DivPrune(0.5)(torch.randn(1, n, 6)).num_kept == expected


@PROPS
@given(ratio=st.floats(0.01, 1.0), n=st.integers(1, 400).map(lambda k: 2 * k + 1))
def test_divprune_count_equals_official_at_odd_n(ratio, n):
    expected = min(n, max(1, official_divprune_count(ratio, n)))
    assert resolve_budget(ratio, n, rounding=DivPrune.ratio_rounding) == expected
    mask = torch.ones(2, n + 2, dtype=torch.bool)
    mask[:, n:] = False  # the padded path (resolve_budgets) too
    assert resolve_budgets(ratio, mask.sum(dim=1), rounding=DivPrune.ratio_rounding).tolist() == [expected] * 2


@PROPS
@given(n=st.integers(2, 120).map(lambda k: 2 * k + 1), half=st.booleans())
def test_divprune_reducer_keeps_official_count(n, half):
    ratio = 0.5 if half else 0.3
    x = torch.randn(1, n, 5, generator=torch.Generator().manual_seed(n))
    assert DivPrune(ratio)(x).num_kept == max(1, official_divprune_count(ratio, n))


def test_other_reducers_keep_half_up_rounding():
    assert Reducer.ratio_rounding == "half_up"
    assert (PDrop.ratio_rounding, DivPrune.ratio_rounding) == ("floor", "half_even")
    x = torch.randn(1, 577, 6)
    att = ReductionContext(attention=torch.rand(1, 1, 577))
    assert create("fastv", 0.5, stage="llm_layer")(x, context=att).num_kept == 289
    assert create("random", 0.5)(x).num_kept == 289
    assert create("tome", 0.5)(x).num_kept == 289


@pytest.mark.parametrize(
    ("ratio", "n", "counts"),
    [(0.5, 577, (289, 288, 288)), (0.5, 203, (102, 102, 101)), (0.5, 101, (51, 50, 50)), (0.01, 30, (1, 1, 1))],
)
def test_resolve_budget_roundings(ratio, n, counts):
    for rounding, expected in zip(("half_up", "half_even", "floor"), counts):
        assert resolve_budget(ratio, n, rounding=rounding) == expected
    assert resolve_budget(ratio, n) == counts[0]  # the default is unchanged
    assert resolve_budget(64, n, rounding="floor") == min(64, n)  # int budgets are exact


def test_unknown_rounding_is_rejected():
    with pytest.raises(InvalidInputError, match="rounding='ceil' is not one of half_up, half_even, floor"):
        resolve_budget(0.5, 10, rounding="ceil")


def test_pipeline_steps_keep_their_reducers_rounding():
    pipe = Pipeline([Step("projector", create("divprune", 0.5)), Step("llm_layer", create("pdrop", 0.5), layer=2)])
    assert [s.reducer.ratio_rounding for s in pipe] == ["half_even", "floor"]
