"""``norm``: keep the tokens that stand out most from the average token."""

import torch
from pydantic import Field

import tokenreduce as tr
from tokenreduce.numerics import safe_scale


class NormParams(tr.ReducerParams):
    # Every field has a description and bounds: `tokenreduce info norm`, the JSON
    # schema and error messages are generated from them.
    ord: float = Field(default=2.0, ge=1.0, description="Order p of the p-norm.")
    centre: bool = Field(
        default=True,
        description="Measure tokens from their row's mean valid token (True) or from 0.",
    )


class Norm(tr.ScoringReducer):
    """Keep the tokens farthest from the mean token (largest p-norm).

    Tokens close to the average of an image carry little that the others do not; the
    ones far from it are the distinctive parts. The example of the tokenreduce
    documentation's "Writing a plugin" tutorial; not a published method.
    """

    name = "norm"
    stages = frozenset(tr.Stage)  # tensors only: it works at every stage
    Params = NormParams
    paper = "Tutorial example (no paper)."

    def score(self, tokens, valid, context):
        # Float32 whatever the input dtype; rows of extreme magnitude (bfloat16 reaches 3e38,
        # whose sums and squares overflow float32) divided by a power of two, which changes
        # no ranking within a row.
        x, _ = safe_scale(tokens, valid)
        if self.params.centre:
            w = valid.unsqueeze(-1).float()  # padded tokens must not move the mean
            count = w.sum(dim=1, keepdim=True).clamp_min(1)
            mean = (x * w).sum(dim=1, keepdim=True) / count
            x = x - mean
        return torch.linalg.vector_norm(x, ord=self.params.ord, dim=-1)
