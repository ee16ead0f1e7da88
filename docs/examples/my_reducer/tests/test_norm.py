"""The plugin's own tests: the conformance kit, plus what makes ``norm`` itself."""

import torch
from my_reducer import Norm

import tokenreduce as tr
from tokenreduce.testing import check_reducer


def test_norm_passes_the_conformance_kit():
    check_reducer(Norm, max_examples=15)
    check_reducer(Norm, params={"ord": 1.0, "centre": False}, max_examples=10)


def test_norm_keeps_the_outlier():
    tokens = torch.zeros(1, 8, 4)
    tokens[0, 5] = 3.0  # the only token unlike the others
    out = tr.create("norm", budget=1)(tokens)
    assert out.indices.tolist() == [[5]]
