"""Reducers' float32 products on CUDA: TF32 inside reducer calls only, flags restored, CPU untouched."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce import ConfigError, precision


def flags() -> tuple:
    m = torch.backends.cuda.matmul
    return m.allow_tf32, m.fp32_precision, torch.get_float32_matmul_precision()


@pytest.mark.parametrize("start", ["highest", "high"])
def test_tf32_inside_the_block_and_every_flag_restored_after(start):
    before_global = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(start)
    try:
        before = flags()
        with precision.reducer_matmul(torch.device("cuda")):
            assert flags()[:2] == (True, "tf32")
        assert flags() == before
        with pytest.raises(RuntimeError), precision.reducer_matmul(torch.device("cuda")):
            raise RuntimeError("a reducer failing inside")
        assert flags() == before
    finally:
        torch.set_float32_matmul_precision(before_global)


def test_cpu_and_highest_leave_the_flags_alone():
    before = flags()
    with precision.reducer_matmul(torch.device("cpu")):
        assert flags() == before
    precision.configure(matmul="highest")
    try:
        assert precision.matmul_mode() == "highest"
        with precision.reducer_matmul(torch.device("cuda")):
            assert flags() == before
    finally:
        precision.configure(matmul="tf32")


def test_bad_setting_names_the_parameter_and_the_choices():
    with pytest.raises(ConfigError, match="matmul='fp8'.*tf32, highest"):
        precision.configure(matmul="fp8")


def test_a_reducer_call_restores_the_flags():
    before = flags()
    tokenreduce.create("divprune", budget=4)(torch.randn(2, 16, 8))
    assert flags() == before
