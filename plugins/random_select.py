"""``random``: keep a seeded random subset. The floor every method should beat."""

from __future__ import annotations

import torch
from pydantic import Field

from tokenreduce import ReducerParams, ScoringReducer, Stage

# Seeded scores per (N, seed, device), made once: drawing them on the host and copying
# them to an accelerator in every call would wait for the device (a host-to-device copy
# from pageable memory synchronises) and could not be captured in a CUDA graph, which
# reads this tensor (kept for the life of the process; N floats per entry). Past the
# cap, scores are made per call again (correct, only slower, and never graphed).
_SCORES: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_MAX_CACHED = 256


def seeded_scores(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(N,)`` uniform scores from a CPU generator seeded with ``seed``, identical on every device."""
    key = (n, seed, torch.device(device))
    scores = _SCORES.get(key)
    if scores is None:
        with torch.inference_mode(False):  # an ordinary tensor, usable in and out of inference mode
            scores = torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(device)
        if len(_SCORES) < _MAX_CACHED:
            _SCORES[key] = scores
    return scores


class RandomParams(ReducerParams):
    seed: int = Field(default=0, ge=0, description="Seed of the random scores (same positions for every row).")


class RandomReducer(ScoringReducer):
    """Keep a uniformly random subset of tokens (seeded, deterministic).

    Scores are drawn from a CPU generator seeded with ``seed``, shape ``(N,)``, and shared
    by all rows, so the choice is identical across devices and a row's choice does not
    depend on the other rows of the batch. They are made once per (N, seed, device) and
    kept (:func:`seeded_scores`), so a call copies nothing from the host.
    """

    name = "random"
    stages = frozenset(Stage)
    Params = RandomParams
    paper = "Uniform random selection (baseline)."

    graph_safe = True

    def score(self, tokens, valid, context):
        # A copy: what the call returns (info["scores"]) must not alias the cache.
        return seeded_scores(tokens.shape[1], self.params.seed, tokens.device).clone().expand(tokens.shape[0], -1)
