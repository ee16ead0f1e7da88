"""The conformance kit on the reference reducers, and proof that it catches broken ones."""

import pytest
import torch

from tokenreduce import Reducer, ScoringReducer, make_reduction, ops
from tokenreduce.testing import check_reducer
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
