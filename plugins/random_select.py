"""``random``: keep a seeded random subset. The floor every method should beat."""

from __future__ import annotations

import torch
from pydantic import Field

from tokenreduce import ReducerParams, ScoringReducer, Stage


class RandomParams(ReducerParams):
    seed: int = Field(default=0, ge=0, description="Seed of the random scores (same positions for every row).")


class RandomReducer(ScoringReducer):
    """Keep a uniformly random subset of tokens (seeded, deterministic).

    Scores are drawn once per call from a CPU generator seeded with ``seed``, shape
    ``(N,)``, and shared by all rows, so the choice is identical across devices and a
    row's choice does not depend on the other rows of the batch.
    """

    name = "random"
    stages = frozenset(Stage)
    Params = RandomParams
    paper = "Uniform random selection (baseline)."

    def score(self, tokens, valid, context):
        gen = torch.Generator().manual_seed(self.params.seed)
        scores = torch.rand(tokens.shape[1], generator=gen)
        return scores.to(tokens.device).expand(tokens.shape[0], -1)
