"""What the fused-kernel tests share: Triton compiled on CUDA or interpreted on CPU, and tied inputs.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates (Triton's own library at ``import
triton``), so on CPU it is set around the first import only, then restored. Triton 3.6's
interpreter imports ``triton.experimental.gluon`` at its first launch, whose import asserts that
mode: it is imported inside the window too. Triton <= 3.6's interpreter turns a runtime loop
bound into a 1-element array and calls ``int()`` on it, which numpy >= 2.4 refuses (triton issue
#9171): install numpy < 2.4 beside Triton to run these tests on CPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

import tokenreduce
from tokenreduce import ReductionContext, graphs
from tokenreduce_plugins import kernels

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "") in ("", "0")
DEVICE = "cuda" if CUDA else "cpu"


def import_kernels(*names: str) -> tuple:
    """``(triton, module, ...)`` for ``tokenreduce_plugins.kernels.<name>`` (or a dotted module path):
    compiled on CUDA, else interpreted (the calling test module is skipped where Triton does not import)."""

    def load() -> tuple:
        triton = pytest.importorskip("triton")
        paths = (n if "." in n else f"tokenreduce_plugins.kernels.{n}" for n in names)
        return (triton, *(importlib.import_module(p) for p in paths))

    if CUDA:
        return load()
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        loaded = load()
        try:
            importlib.import_module("triton.experimental.gluon")
        except ImportError:  # a Triton without Gluon: nothing imported late
            pass
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return loaded


def skip_unless_interpreted(triton, functions: list[Callable]) -> None:
    """On CPU: skip the calling module unless these kernels were made interpreted (not compiled earlier in the process)."""
    if CUDA:
        return
    interpreted = getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)
    if interpreted is None or not all(isinstance(f, interpreted) for f in (*functions, triton.language.standard.max)):
        pytest.skip("Triton or the kernels were imported without TRITON_INTERPRET before this module", allow_module_level=True)


def _version(text: str) -> tuple[int, int]:
    return tuple(int(v) for v in text.split(".")[:2])  # type: ignore[return-value]


def numpy_mark(triton) -> pytest.MarkDecorator:
    """Skip on CPU where Triton's interpreter cannot run runtime-bounded loops (numpy >= 2.4, Triton <= 3.6)."""
    return pytest.mark.skipif(
        not CUDA and _version(np.__version__) >= (2, 4) and _version(triton.__version__) <= (3, 6),
        reason=f"Triton {triton.__version__}'s interpreter fails with numpy {np.__version__} (triton issue #9171); "
        "use numpy < 2.4",
    )


def tied_tokens(draw, gen: torch.Generator, b: int, n: int) -> torch.Tensor:
    """``(B, N, D)`` float32 tokens with ties: rounded to few directions, duplicates, zero tokens."""
    d = draw(st.sampled_from([2, 3, 8]))
    x = torch.randn(b, n, d, generator=gen)
    if draw(st.booleans()):
        x = x.round()  # few distinct directions: equal similarities and equal best matches
    for _ in range(draw(st.integers(0, 3))):  # duplicates: similarity 1 to a twin
        src, dst = torch.randint(0, n, (2,), generator=gen).tolist()
        x[:, dst] = x[:, src]
    if draw(st.booleans()):
        x[:, torch.randint(0, n, (1,), generator=gen)] = 0.0  # similarities +0.0 and -0.0
    return x


@st.composite
def similarities(draw, nan: bool = False, n_min: int = 4, n_max: int = 80):
    """``(sim (B, N, N) float32, b, n, gen)``: cosine similarities of tied tokens; with ``nan``,
    a few NaN entries and -0.0 / +0.0 entries planted."""
    b, n = draw(st.integers(1, 3)), draw(st.integers(n_min, n_max))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.nn.functional.normalize(tied_tokens(draw, gen, b, n), dim=-1)
    sim = (x @ x.transpose(1, 2)).contiguous()
    if nan:
        for value in draw(st.lists(st.sampled_from([float("nan"), -0.0, 0.0]), min_size=1, max_size=6)):
            i, j = torch.randint(0, n, (2,), generator=gen).tolist()
            sim[torch.randint(0, b, (1,), generator=gen), i, j] = value
    return sim, b, n, gen


cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (and TRITON_INTERPRET unset)")


@pytest.fixture(autouse=True)
def no_tf32(full_float32):
    """Autouse where imported: these tests compare CUDA runs with CPU runs and the official fixtures,
    so reducers' products run in full float32 (``full_float32`` in conftest.py)."""


@contextmanager
def torch_loop():
    """The torch loops, also on CUDA (``TOKENREDUCE_NO_TRITON=1``)."""
    with mock.patch.dict(os.environ, {kernels.DISABLE_ENV: "1"}):
        yield


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [v.to(DEVICE) for v in tensors]


def assert_same_reduction(got, want) -> None:
    """``got`` (on DEVICE) keeps what ``want`` (on CPU) keeps: indices, tokens and every info entry."""
    assert torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.tokens.cpu(), want.tokens)
    assert got.info.keys() == want.info.keys()
    for key, value in want.info.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got.info[key].cpu(), value), key
        else:
            assert got.info[key] == value, key


def vispruner_cuda_inputs(b: int, n: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ReductionContext]:
    """Random CUDA tokens and [CLS] attention for the VisPruner kernels' CUDA tests."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=gen, device="cuda").to(dtype)
    att = torch.rand(b, n, generator=gen, device="cuda")
    return tokens, ReductionContext(cls_attention=att)


def check_vispruner_fixture(dispatch: Callable[[], Any]) -> None:
    """The official VisPruner fixture (tests/test_vispruner.py's) through the kernels ``dispatch()`` selects.

    On CPU (the interpreter) the kept tokens must be the official ones. On an H200, CUDA's float32
    products flip a near-tie of case 0 for the torch loop as well (seen 2026-12-02, full float32):
    there the kernels must keep what the torch loop keeps on the same device.
    """
    data = dict(np.load(Path(__file__).parent / "fixtures" / "baselines" / "vispruner.npz"))
    for k in sorted({int(key.split("_")[0][4:]) for key in data}):
        get = lambda key: torch.from_numpy(np.asarray(data[f"case{k}_{key}"])).to(DEVICE)  # noqa: B023, E731
        context = ReductionContext(cls_attention=get("cls_attention_heads").mean(dim=1))
        reducer = tokenreduce.create(
            "vispruner", int(data[f"case{k}_budget"]), important_ratio=float(data[f"case{k}_important_ratio"])
        )
        with dispatch(), graphs.eager():
            out = reducer(get("tokens"), context=context)
        if not CUDA:
            assert out.indices.tolist() == data[f"case{k}_kept"].tolist(), f"case {k}"
            continue
        with torch_loop(), graphs.eager():
            want = reducer(get("tokens"), context=context)
        assert torch.equal(out.indices, want.indices), f"case {k}"
