"""The conformance kit on the reference reducers, and proof that it catches broken ones
(wrong structure, batch dependence, NaN or infinite scores, overflow on large inputs)."""

import pytest
import torch

from tokenreduce import InvalidInputError, Reducer, ScoringReducer, make_reduction, ops
from tokenreduce.testing import check_reducer, large_magnitude
from tokenreduce_plugins.pool import PoolReducer
from tokenreduce_plugins.random_select import RandomReducer


def test_random_conforms():
    check_reducer(RandomReducer, max_examples=25)


def test_pool_conforms():
    check_reducer(PoolReducer, square_grid=True, max_examples=25)


class _Descending(ScoringReducer):
    """Returns indices in descending order (broken)."""

    name = "descending"

    def score(self, tokens, valid, context):
        return tokens.float().sum(-1)

    def reduce(self, tokens, counts, valid, context):
        out = super().reduce(tokens, counts, valid, context)
        out.indices = out.indices.flip(1)
        return out


class _BatchDependent(ScoringReducer):
    """Scores depend on the other rows of the batch (broken)."""

    name = "batch-dependent"

    def score(self, tokens, valid, context):
        return tokens.float().sum(-1) + tokens.float().sum(-1).mean(0, keepdim=True) * 100


class _KeepsPadding(Reducer):
    """Keeps the first T positions, padded or not (broken)."""

    name = "keeps-padding"

    def reduce(self, tokens, counts, valid, context):
        slots = ops.slot_mask(counts)
        idx = torch.arange(slots.shape[1], device=slots.device).expand_as(slots).masked_fill(~slots, -1)
        return make_reduction(tokens, idx, slots)


class _Float32Out(ScoringReducer):
    """Returns float32 features whatever the input dtype (broken)."""

    name = "float32-out"

    def score(self, tokens, valid, context):
        return tokens.float().sum(-1)

    def reduce(self, tokens, counts, valid, context):
        out = super().reduce(tokens, counts, valid, context)
        out.tokens = out.tokens.float()
        return out


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_Descending, "ascending|padded slots"),
        (_BatchDependent, "rows are not independent|features differ"),
        (_KeepsPadding, "padded token was kept"),
        (_Float32Out, "dtype"),
    ],
)
def test_kit_catches_broken_reducers(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_reducer(cls, max_examples=40, stage="projector")


# -- scores and numerics -----------------------------------------------------------------------


class _NaNScores(ScoringReducer):
    """Scores NaN wherever a feature sum is negative (broken: NaN ranks first in a descending sort)."""

    name = "nan-scores"

    def score(self, tokens, valid, context):
        s = tokens.float().sum(-1)
        return torch.where(s < 0, torch.full_like(s, float("nan")), s)


class _InfScores(ScoringReducer):
    """Scores +inf for the first token of every row (broken: non-finite)."""

    name = "inf-scores"

    def score(self, tokens, valid, context):
        s = tokens.float().sum(-1)
        s[:, 0] = float("inf")
        return s


class _SumsInInputDtype(ScoringReducer):
    """Keeps the top-T, then adds the row mean computed in the input dtype (broken: overflows)."""

    name = "sums-in-input-dtype"

    def score(self, tokens, valid, context):
        return tokens.float()[..., 0]  # finite at any magnitude: the overflow is in reduce()

    def reduce(self, tokens, counts, valid, context):
        indices, slots, info = self.select(tokens, counts, valid, context)
        kept = ops.gather_rows(tokens, indices)
        mean = (tokens * valid.unsqueeze(-1)).sum(dim=1, keepdim=True) / valid.sum(dim=1).view(-1, 1, 1)
        return make_reduction(tokens, indices, slots, features=kept + mean.to(tokens.dtype), info=info)


class _ScoreOverflows(ScoringReducer):
    """Scores by the squared norm in float32 (broken: infinite for bfloat16 tokens beyond ~1e19)."""

    name = "score-overflows"

    def score(self, tokens, valid, context):
        return tokens.float().square().sum(-1)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_ScoreOverflows, r"non-finite score for a valid token of torch\.bfloat16 input of magnitude up to .*: inf\)"),
        (_NaNScores, r"score\(\) returned a non-finite score for a valid token .*: nan\)"),
        (_InfScores, r"score\(\) returned a non-finite score for a valid token .*: inf\)"),
        (_SumsInInputDtype, r"non-finite output for finite torch\.(float16|bfloat16) input of magnitude"),
    ],
)
def test_kit_catches_non_finite_scores_and_overflow(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_reducer(cls, max_examples=40, stage="projector")


def test_nan_scores_are_refused_at_call_time_with_the_reducer_named():
    x = torch.tensor([[[1.0, 2.0], [-3.0, 1.0], [0.5, 0.5], [2.0, 2.0]]])
    with pytest.raises(InvalidInputError, match=r"reducer 'nan-scores': score\(\) gave nan for valid token 1 of row 0"):
        _NaNScores(2)(x)
    # A padded token's score is ignored, whatever it is.
    out = _NaNScores(2)(x, mask=torch.tensor([[True, False, True, True]]))
    assert out.indices.tolist() == [[0, 3]]


def test_large_magnitude_input_keeps_its_dtype_range():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        big = large_magnitude(x, dtype, 0.99, positive=True)
        assert big.dtype == dtype and bool(torch.isfinite(big).all()) and bool((big >= 0).all())
        assert float(big.float().max()) == pytest.approx(0.99 * torch.finfo(dtype).max, rel=1e-2)
        assert not bool(torch.isfinite(big.sum(dim=1)).all())  # sums overflow the input dtype


def test_kit_prints_what_it_checked_on_success(capsys):
    check_reducer(RandomReducer, max_examples=5, params={"seed": 3})
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line
    assert "check_reducer('random', params={'seed': 3}): passed 15 examples " in out
    assert "(5 at llm_layer, 5 at projector, 5 at vision_encoder) on cpu" in out
    assert "finite scores" in out and "large-magnitude" in out and "row independence" in out
