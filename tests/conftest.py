"""Shared test settings: deterministic torch, a small thread count for 2-core CI."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def full_float32():
    """Reducers' float32 products in full float32 on CUDA (tokenreduce.precision), for tests that compare a
    CUDA run with a CPU run, an official fixture or a direct call of a reducer's internals (no TF32 there)."""
    from tokenreduce import precision

    before = precision.matmul_mode()
    precision.configure(matmul="highest")
    try:
        yield
    finally:
        precision.configure(matmul=before)
