import pytest
import torch

import tokenreduce as tr
from tokenreduce import (
    InvalidInputError,
    MissingContextError,
    ReducerParams,
    ReductionContext,
    ScoringReducer,
    Stage,
    StageError,
    UnknownNameError,
)
from tokenreduce.errors import ConfigError


def test_create_returns_configured_reducer_and_reduces():
    r = tr.create("random", budget=5, seed=3)
    out = r(torch.randn(2, 16, 8))
    assert out.tokens.shape == (2, 5, 8)
    assert out.indices.shape == (2, 5) and out.keep_mask.shape == (2, 16)
    assert out.keep_mask.sum(dim=1).tolist() == [5, 5]


def test_call_budget_overrides_constructor_budget():
    r = tr.create("random", budget=5)
    assert r(torch.randn(1, 16, 4), budget=3).num_kept == 3
    with pytest.raises(InvalidInputError, match="has no budget"):
        tr.create("random")(torch.randn(1, 4, 2))


def test_unknown_reducer_suggests_close_names():
    with pytest.raises(UnknownNameError, match=r"unknown reducer 'randon'\. Did you mean 'random'\?"):
        tr.create("randon", budget=3)


def test_bad_params_name_field_value_and_rule():
    with pytest.raises(ConfigError, match=r"seed: Input should be greater than or equal to 0 \(got -1\)"):
        tr.create("random", budget=3, seed=-1)
    with pytest.raises(ConfigError, match="sed: Extra inputs are not permitted"):
        tr.create("random", budget=3, sed=1)


@pytest.mark.parametrize(
    ("tokens", "mask", "match"),
    [
        (torch.randn(16, 8), None, r"must have shape \(B, N, D\), got \(16, 8\)"),
        (torch.tensor([[[1.0, float("nan")]]]), None, r"NaN or inf \(first at index \(0, 0, 1\)\)"),
        (torch.tensor([[[1.0], [float("inf")]]]), None, "NaN or inf"),
        (torch.randint(0, 3, (1, 4, 2)), None, "dtype must be one of"),
        (torch.randn(2, 4, 3), torch.ones(2, 5, dtype=torch.bool), r"mask must have shape \(B, N\)=\(2, 4\)"),
        (torch.randn(2, 4, 3), torch.ones(2, 4), "mask must be bool or integer"),
    ],
)
def test_bad_inputs_raise_clear_errors(tokens, mask, match):
    with pytest.raises(InvalidInputError, match=match):
        tr.create("random", budget=2)(tokens, mask=mask)


def test_finite_tokens_whose_sum_overflows_are_accepted():
    # The finiteness check sums first; an overflowing sum of finite values must fall
    # back to the elementwise check, not reject the input.
    x = torch.full((1, 8, 4), 3e38)
    assert tr.create("random", budget=2)(x).num_kept == 2
    with pytest.raises(InvalidInputError, match=r"NaN or inf \(first at index \(0, 3, 1\)\)"):
        x[0, 3, 1] = float("nan")
        tr.create("random", budget=2)(x)


class _Spy(ScoringReducer):
    """Records the context and counts it is called with (a test reducer)."""

    name = "spy"
    seen: list = []

    def score(self, tokens, valid, context):
        _Spy.seen.append(context)
        return tokens.float().sum(-1)


def test_uniform_count_is_set_without_a_mask_only_and_the_callers_context_is_untouched():
    _Spy.seen.clear()
    x = torch.randn(3, 10, 4)
    mine = ReductionContext(uniform_count=99)
    out = _Spy(0.5)(x, context=mine)
    assert _Spy.seen[-1].uniform_count == 5 and out.counts.tolist() == [5, 5, 5]
    assert mine.uniform_count == 99 and mine.stage is None, "the caller's context must not be modified"
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 6:] = False
    out = _Spy(0.5)(x, mask=valid, context=mine)
    assert _Spy.seen[-1].uniform_count is None and out.counts.tolist() == [5, 5, 3]
    # Budget at or above N without a mask: the identity, the reducer is not called.
    calls = len(_Spy.seen)
    assert _Spy(lambda n: n + 3)(x).info == {"identity": True} and len(_Spy.seen) == calls


def test_padded_tokens_are_never_kept_and_rows_keep_min_budget_valid():
    tokens = torch.randn(2, 10, 4)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 2:] = True
    out = tr.create("random", budget=5)(tokens, mask=mask)
    assert out.counts.tolist() == [3, 5]
    assert not bool((out.keep_mask & ~mask).any())
    assert out.indices[0].tolist()[3:] == [-1, -1]
    assert bool((out.tokens[0, 3:] == 0).all())


def test_budget_at_or_above_n_is_identity():
    tokens = torch.randn(2, 9, 4, dtype=torch.bfloat16)
    out = tr.create("pool", budget=9)(tokens)
    assert torch.equal(out.tokens, tokens)
    assert out.indices.tolist() == [list(range(9))] * 2
    assert out.info == {"identity": True}


class _NeedsCls(ScoringReducer):
    """Score by similarity to the CLS token (a test reducer)."""

    name = "needs-cls"
    stages = frozenset({Stage.PROJECTOR})
    required_context = frozenset({"cls_token"})

    def score(self, tokens, valid, context):
        return torch.einsum("bnd,bd->bn", tokens.float(), context.cls_token.float())


def test_missing_context_is_a_clear_error():
    r = _NeedsCls(2)
    with pytest.raises(MissingContextError, match=r"needs context cls_token; pass context=ReductionContext\(cls_token=...\)"):
        r(torch.randn(1, 5, 3))
    x = torch.randn(1, 5, 3)
    out = r(x, context=ReductionContext(cls_token=x[:, 0]))
    assert torch.equal(out.info["scores"], torch.einsum("bnd,bd->bn", x, x[:, 0]))


def test_unsupported_stage_is_rejected_at_construction():
    with pytest.raises(StageError, match="does not support stage 'llm_layer'; it supports: projector"):
        _NeedsCls(2, stage="llm_layer")
    with pytest.raises(StageError, match="stage='decoder' is not a stage"):
        _NeedsCls(2, stage="decoder")


def test_scoring_ties_break_to_lower_index():
    class Const(ScoringReducer):
        """Constant scores."""

        name = "const"

        def score(self, tokens, valid, context):
            return torch.zeros(tokens.shape[:2])

    out = Const(3)(torch.randn(2, 8, 2))
    assert out.indices.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_equality_and_repr():
    a = tr.create("random", budget=4, stage="projector", seed=1)
    assert a == tr.create("random", budget=4, stage="projector", seed=1)
    assert a != tr.create("random", budget=4, stage="projector", seed=2)
    assert repr(a) == "RandomReducer(budget=4, stage='projector', seed=1)"


def test_params_are_frozen():
    r = tr.create("random", budget=4)
    with pytest.raises(Exception, match="frozen"):
        r.params.seed = 3
